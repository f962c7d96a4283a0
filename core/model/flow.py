"""Rectified-flow arithmetic of BAGEL's image generation (MODEL.md 5.2, 5.3): schedule, Euler step, CFG.

Conventions: t = 1 is pure noise and t = 0 data; ``x_t = (1 - t) x0 + t eps``; the model predicts
``v = eps - x0``; sampling steps *down* in t with ``x <- x - v dt``. The timestep shift ``s t / (1 + (s - 1) t)``
is applied to the schedule before the model sees t, and the CFG interval is tested on the shifted t.
Arithmetic follows the official code's order and float32 precision so results match it bit for bit on CPU.
"""

from __future__ import annotations

from typing import Literal, TypeAlias

import torch
from torch import Tensor

__all__ = [
    "RenormType",
    "shift_timesteps",
    "timestep_schedule",
    "euler_step",
    "guidance_active",
    "cfg_combine",
    "sample_training_timesteps",
    "noise_latents",
    "velocity_target",
]

RenormType: TypeAlias = Literal["global", "channel", "text_channel"]
_RENORM_TYPES = ("global", "channel", "text_channel")
_EPS = 1e-8  # the official guard against a zero norm


def shift_timesteps(t: Tensor, shift: float) -> Tensor:
    """Warp t toward the noisy end for ``shift > 1`` (``s t / (1 + (s - 1) t)``); identity at 1."""
    return shift * t / (1 + (shift - 1) * t)


def timestep_schedule(num_timesteps: int, shift: float, device: torch.device | str | None = None) -> Tensor:
    """``num_timesteps`` float32 points from 1 to 0, shifted; the sampler evaluates all but the last."""
    if num_timesteps < 2:
        raise ValueError(f"num_timesteps must be at least 2 (one evaluation), got {num_timesteps}")
    if shift <= 0:
        raise ValueError(f"timestep shift must be positive, got {shift}")
    return shift_timesteps(torch.linspace(1, 0, num_timesteps, device=device), shift)


def euler_step(x: Tensor, v: Tensor, t: Tensor | float, t_next: Tensor | float) -> Tensor:
    """One Euler update from ``t`` down to ``t_next``: ``x - v (t - t_next)``."""
    return x - v * (t - t_next)


def guidance_active(t: float, interval: tuple[float, float]) -> bool:
    """Whether CFG applies at shifted time ``t``: ``interval[0] < t <= interval[1]``."""
    return interval[0] < t <= interval[1]


def _norm(v: Tensor, per_token: bool) -> Tensor:
    """L2 norm per token (last dim) or over each image's tokens and channels (last two dims)."""
    return torch.linalg.vector_norm(v, dim=-1 if per_token else (-2, -1), keepdim=True)


def _renormed(v: Tensor, reference: Tensor, per_token: bool, renorm_min: float) -> Tensor:
    """Scale ``v`` down so its norm does not exceed ``reference``'s (and by at least ``renorm_min``)."""
    scale = (_norm(reference, per_token) / (_norm(v, per_token) + _EPS)).clamp(min=renorm_min, max=1.0)
    return v * scale


def cfg_combine(
    v_cond: Tensor,
    v_text_uncond: Tensor | None,
    v_img_uncond: Tensor | None,
    text_scale: float,
    img_scale: float,
    renorm_type: RenormType = "global",
    renorm_min: float = 0.0,
) -> Tensor:
    """Combine the CFG branches' velocities ``[..., tokens, channels]`` (one image per leading index).

    Text guidance needs ``text_scale > 1``; without it the official code applies no guidance at all, so neither
    do we. Image guidance needs ``img_scale > 1`` and ``v_img_uncond``. ``global`` renormalises the final result
    to ``v_cond``'s norm over the image, ``channel`` per token, ``text_channel`` per token before image guidance.
    """
    if renorm_type not in _RENORM_TYPES:
        raise ValueError(f"cfg renorm type must be one of {_RENORM_TYPES}, got {renorm_type!r}")
    if text_scale <= 1.0:
        return v_cond
    if v_text_uncond is None:
        raise ValueError("text guidance needs the text-unconditional velocity")
    use_img = img_scale > 1.0
    if use_img and v_img_uncond is None:
        raise ValueError("image guidance needs the image-unconditional velocity")
    v_text = v_text_uncond + text_scale * (v_cond - v_text_uncond)
    if renorm_type == "text_channel":
        v_text = _renormed(v_text, v_cond, per_token=True, renorm_min=renorm_min)
        return v_img_uncond + img_scale * (v_text - v_img_uncond) if use_img else v_text
    v = v_img_uncond + img_scale * (v_text - v_img_uncond) if use_img else v_text
    return _renormed(v, v_cond, per_token=renorm_type == "channel", renorm_min=renorm_min)


def sample_training_timesteps(
    num: int, shift: float = 1.0, generator: torch.Generator | None = None, device: torch.device | str | None = None
) -> Tensor:
    """Logit-normal training times ``sigmoid(N(0, 1))``, then shifted like the schedule."""
    return shift_timesteps(torch.sigmoid(torch.randn(num, generator=generator, device=device)), shift)


def noise_latents(x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """``x_t = (1 - t) x0 + t eps`` with one t per token row of ``x0`` ``[N, C]``."""
    return (1 - t[:, None]) * x0 + t[:, None] * noise


def velocity_target(x0: Tensor, noise: Tensor) -> Tensor:
    """The regression target ``eps - x0`` (velocity pointing from data to noise)."""
    return noise - x0
