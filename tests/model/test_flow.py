"""Flow-matching schedule, Euler step and CFG arithmetic against hand-computed cases (MODEL.md 5.2, 5.3)."""

from __future__ import annotations

import math

import pytest
import torch

from core.model.flow import (
    cfg_combine,
    euler_step,
    guidance_active,
    noise_latents,
    sample_training_timesteps,
    shift_timesteps,
    timestep_schedule,
    velocity_target,
)


def test_schedule_without_shift_is_linspace() -> None:
    ts = timestep_schedule(5, 1.0)
    torch.testing.assert_close(ts, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))


def test_schedule_with_shift_three() -> None:
    ts = timestep_schedule(5, 3.0)
    expected = [3 * t / (1 + 2 * t) for t in (1.0, 0.75, 0.5, 0.25, 0.0)]  # 1, 0.9, 0.75, 0.5, 0
    torch.testing.assert_close(ts, torch.tensor(expected))
    assert ts.dtype == torch.float32


def test_fifty_timesteps_mean_forty_nine_evaluations_and_forty_one_guided() -> None:
    ts = timestep_schedule(50, 3.0)
    evaluated = ts[:-1].tolist()
    assert len(evaluated) == 49
    assert sum(guidance_active(t, (0.4, 1.0)) for t in evaluated) == 41


def test_guidance_interval_is_open_below_closed_above() -> None:
    assert guidance_active(1.0, (0.4, 1.0))
    assert not guidance_active(0.4, (0.4, 1.0))
    assert guidance_active(0.0001, (0.0, 1.0)) and not guidance_active(0.0, (0.0, 1.0))


def test_shift_fixes_the_ends() -> None:
    t = torch.tensor([0.0, 1.0])
    torch.testing.assert_close(shift_timesteps(t, 5.0), t)


def test_schedule_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        timestep_schedule(1, 3.0)
    with pytest.raises(ValueError):
        timestep_schedule(10, 0.0)


def test_euler_step() -> None:
    x, v = torch.tensor([1.0, 2.0]), torch.tensor([0.5, -1.0])
    torch.testing.assert_close(euler_step(x, v, 0.9, 0.75), torch.tensor([1.0 - 0.075, 2.0 + 0.15]))


# One image of two tokens with two channels; hand-computed below.
V_COND = torch.tensor([[3.0, 0.0], [0.0, 4.0]])
V_TEXT = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
V_IMG = torch.tensor([[2.0, 0.0], [0.0, 1.0]])


def test_cfg_no_guidance_when_text_scale_is_one() -> None:
    assert cfg_combine(V_COND, V_TEXT, V_IMG, 1.0, 2.0, "global") is V_COND


def test_cfg_global_text_only() -> None:
    # v_txt = [[1+4*2, 0], [0, 2+4*2]] = [[9, 0], [0, 10]]; |v_cond| = 5, |v_txt| = sqrt(181)
    out = cfg_combine(V_COND, V_TEXT, None, 4.0, 1.0, "global")
    torch.testing.assert_close(out, torch.tensor([[9.0, 0.0], [0.0, 10.0]]) * (5 / (math.sqrt(181) + 1e-8)))


def test_cfg_global_with_image_guidance() -> None:
    # v_txt = [[5, 0], [0, 6]] (scale 2); v = v_img + 1.5 (v_txt - v_img) = [[6.5, 0], [0, 8.5]]
    out = cfg_combine(V_COND, V_TEXT, V_IMG, 2.0, 1.5, "global")
    expected = torch.tensor([[6.5, 0.0], [0.0, 8.5]]) * (5 / (math.sqrt(6.5**2 + 8.5**2) + 1e-8))
    torch.testing.assert_close(out, expected)


def test_cfg_channel_renormalises_each_token() -> None:
    # v = [[6.5, 0], [0, 8.5]]; token norms 6.5 and 8.5 vs v_cond's 3 and 4
    out = cfg_combine(V_COND, V_TEXT, V_IMG, 2.0, 1.5, "channel")
    torch.testing.assert_close(out, torch.tensor([[3.0, 0.0], [0.0, 4.0]]), atol=1e-6, rtol=1e-6)


def test_cfg_text_channel_renormalises_before_image_guidance() -> None:
    # v_txt = [[5, 0], [0, 6]] -> per-token renorm to [[3, 0], [0, 4]]; then v_img + 1.5 (. - v_img)
    out = cfg_combine(V_COND, V_TEXT, V_IMG, 2.0, 1.5, "text_channel")
    torch.testing.assert_close(out, torch.tensor([[3.5, 0.0], [0.0, 5.5]]), atol=1e-6, rtol=1e-6)


def test_cfg_renorm_min_and_no_upscaling() -> None:
    out = cfg_combine(V_COND, V_TEXT, None, 4.0, 1.0, "global", renorm_min=1.0)
    torch.testing.assert_close(out, torch.tensor([[9.0, 0.0], [0.0, 10.0]]))
    small = cfg_combine(V_COND, V_COND * 1.1, None, 1.5, 1.0, "channel")  # 1.1 v + 1.5 (-0.1 v)
    torch.testing.assert_close(small, V_COND * 0.95)  # norm below v_cond's: the scale clamps at 1


def test_cfg_global_is_per_image_in_a_batch() -> None:
    batch = torch.stack([V_COND, 2 * V_COND])
    out = cfg_combine(batch, torch.stack([V_TEXT, 2 * V_TEXT]), None, 4.0, 1.0, "global")
    torch.testing.assert_close(out[1], 2 * out[0])
    torch.testing.assert_close(out[0], cfg_combine(V_COND, V_TEXT, None, 4.0, 1.0, "global"))


def test_cfg_rejects_missing_branches_and_unknown_renorm() -> None:
    with pytest.raises(ValueError):
        cfg_combine(V_COND, None, None, 4.0, 1.0)
    with pytest.raises(ValueError):
        cfg_combine(V_COND, V_TEXT, None, 4.0, 2.0)
    with pytest.raises(ValueError):
        cfg_combine(V_COND, V_TEXT, None, 4.0, 1.0, "pixel")  # type: ignore[arg-type]


def test_training_helpers() -> None:
    x0, eps = torch.full((3, 4), 2.0), torch.full((3, 4), -1.0)
    t = torch.tensor([0.0, 0.5, 1.0])
    torch.testing.assert_close(noise_latents(x0, eps, t)[:, 0], torch.tensor([2.0, 0.5, -1.0]))
    torch.testing.assert_close(velocity_target(x0, eps), torch.full((3, 4), -3.0))
    gen = torch.Generator().manual_seed(0)
    ts = sample_training_timesteps(1000, 3.0, generator=gen)
    assert ts.shape == (1000,) and bool(((ts > 0) & (ts < 1)).all())
    assert ts.mean() > 0.6  # shift 3 pushes the logit-normal (mean 0.5) toward noise
