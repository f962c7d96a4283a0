"""Fused Q/K/V and gate/up products: same results, same checkpoint names, LoRA on top, reloads fall back to plain;
the generation expert in FP8."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from core.model import lora
from core.model.bagel import Bagel
from core.model.checkpoint import load_bagel
from core.model.config import from_checkpoint_dir
from core.model.llm import Qwen2MoTModel
from core.model.projection import Projection


def _fresh(tiny_dir: Path) -> Bagel:
    cfg = from_checkpoint_dir(tiny_dir)
    return load_bagel(cfg, tiny_dir, device=torch.device("cpu"), dtype=torch.float32)


def _mixed_and_text(model: Qwen2MoTModel, hidden: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, hidden, generator=g)
    with torch.inference_mode():
        text = model(x, torch.arange(7)[None].expand(2, -1), causal=True)
        mixed = model(x, torch.full((2, 1), 3), causal=False, mixed=True)
    return text, mixed


@pytest.fixture(scope="module")
def pair(tiny_dir: Path) -> tuple[Bagel, Bagel]:
    plain, fused = _fresh(tiny_dir), _fresh(tiny_dir)
    fused.language_model.model.fuse_projections()
    return plain, fused


def test_fused_products_give_the_plain_results(pair: tuple[Bagel, Bagel]) -> None:
    plain, fused = pair
    hidden = plain.cfg.llm.hidden_size
    for ours, ref in zip(_mixed_and_text(fused.language_model.model, hidden),
                         _mixed_and_text(plain.language_model.model, hidden), strict=True):
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_fused_weights_keep_the_checkpoint_names_and_share_memory(pair: tuple[Bagel, Bagel]) -> None:
    plain, fused = pair
    ours, ref = fused.state_dict(), plain.state_dict()
    assert list(ours) == list(ref)
    for name, tensor in ref.items():
        torch.testing.assert_close(ours[name], tensor, atol=0, rtol=0)
    attn = fused.language_model.model.layers[0].self_attn
    storage = attn.projections["qkv"].weight.untyped_storage().data_ptr()
    assert all(getattr(attn, f"{n}_proj").weight.untyped_storage().data_ptr() == storage for n in "qkv")
    with torch.no_grad():  # an in-place weight update reaches the fused product
        attn.k_proj.weight.mul_(1.0)
    assert attn.projections["qkv"].usable([attn.q_proj, attn.k_proj, attn.v_proj])


def test_an_active_lora_update_rides_on_the_fused_path_and_a_reassigning_load_turns_it_off(tiny_dir: Path) -> None:
    plain, fused = _fresh(tiny_dir), _fresh(tiny_dir)
    fused.language_model.model.fuse_projections()
    hidden = plain.cfg.llm.hidden_size
    names = lora.attach_lora(plain, rank=2, seed=1)
    lora.attach_lora(fused, rank=2, seed=1)
    with torch.no_grad():  # non-zero B so that the update matters
        for model in (plain, fused):
            for module in lora.lora_modules(model).values():
                module.lora_B.fill_(0.01)
    assert names
    layer = fused.language_model.model.layers[0]
    assert layer.mlp.projections["gate_up"].usable([layer.mlp.gate_proj, layer.mlp.up_proj])
    for ours, ref in zip(_mixed_and_text(fused.language_model.model, hidden),
                         _mixed_and_text(plain.language_model.model, hidden), strict=True):
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)

    reloaded = _fresh(tiny_dir)
    reloaded.language_model.model.fuse_projections()
    state = {k: v.clone() * 2 for k, v in reloaded.state_dict().items()}
    reloaded.load_state_dict(state, assign=True)
    layer = reloaded.language_model.model.layers[0]
    assert not layer.mlp.projections["gate_up"].usable([layer.mlp.gate_proj, layer.mlp.up_proj])
    doubled = _fresh(tiny_dir)
    doubled.load_state_dict(state)
    for ours, ref in zip(_mixed_and_text(reloaded.language_model.model, hidden),
                         _mixed_and_text(doubled.language_model.model, hidden), strict=True):
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def _relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours - ref).norm() / ref.norm())


def test_fp8_products_stay_within_e4m3_rounding_and_keep_lora() -> None:
    g = torch.Generator().manual_seed(0)
    linears = [torch.nn.Linear(64, n, bias=True) for n in (48, 16)]
    for m in linears:
        torch.nn.init.normal_(m.weight, generator=g)
        torch.nn.init.normal_(m.bias, generator=g)
    x = torch.randn(3, 5, 64, generator=g)
    x[0, 0] = 0  # an all-zero token must not divide by zero
    with torch.no_grad():
        ref = torch.cat([m(x) for m in linears], dim=-1)
        projection = Projection(linears)
        projection.to_fp8(linears)
        ours = projection(x, linears)
    assert ours.shape == ref.shape and ours.dtype == ref.dtype
    assert _relative_error(ours, ref) < 0.05  # e4m3 keeps 3 mantissa bits: ~2-3 % per product
    torch.testing.assert_close(ours[0, 0], ref[0, 0])  # zero input: exactly the bias

    wrapped = [lora.LoRALinear(m) for m in linears]
    wrapped[1].init_trainable(rank=4, alpha=8, dtype=torch.float32, generator=g)
    with torch.no_grad():
        wrapped[1].lora_B.normal_(generator=g)
        update = wrapped[1].low_rank_update(x, x.dtype)
        with_lora = projection(x, wrapped)
    torch.testing.assert_close(with_lora[..., 48:] - ours[..., 48:], update, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(with_lora[..., :48], ours[..., :48], atol=0, rtol=0)


def test_fp8_generation_expert_leaves_text_exact_and_images_close(tiny_dir: Path) -> None:
    plain, fp8 = _fresh(tiny_dir), _fresh(tiny_dir)
    for model in (plain, fp8):
        model.language_model.model.fuse_projections()
    fp8.language_model.model.generation_expert_to_fp8()
    gen_mlp = fp8.language_model.model.layers[0].mlp_moe_gen
    assert gen_mlp.down_proj.weight.numel() == 0  # the bf16 copy is released
    assert fp8.language_model.model.layers[0].mlp.down_proj.weight.numel() > 0  # the und expert keeps its own
    hidden = plain.cfg.llm.hidden_size
    (text, mixed), (text_ref, mixed_ref) = (_mixed_and_text(m.language_model.model, hidden) for m in (fp8, plain))
    torch.testing.assert_close(text, text_ref, atol=0, rtol=0)  # und expert untouched
    torch.testing.assert_close(mixed[:, [0, -1]], mixed_ref[:, [0, -1]], atol=0.05, rtol=0.05)
    assert 0 < _relative_error(mixed[:, 1:-1], mixed_ref[:, 1:-1]) < 0.1


def test_fp8_needs_the_fused_projections(tiny_dir: Path) -> None:
    with pytest.raises(RuntimeError, match="fuse_projections"):
        _fresh(tiny_dir).language_model.model.generation_expert_to_fp8()


def _adapted_pair(tiny_dir: Path, layers: str) -> tuple[Bagel, Bagel, lora.Adapter]:
    """The plain and the fused model with the same random adapter active (``layers``: on every target, or on some
    members of some projections), the fused one's A factors stacked."""
    plain, fused = _fresh(tiny_dir), _fresh(tiny_dir)
    fused.language_model.model.fuse_projections()
    g = torch.Generator().manual_seed(3)
    for model in (plain, fused):
        lora.attach_lora(model, rank=None)
    factors = {
        name: (torch.randn(2, m.in_features, generator=g) * 0.3, torch.randn(m.out_features, 2, generator=g) * 0.3)
        for name, m in lora.lora_modules(plain).items()
        if layers == "all" or name.endswith(("k_proj", "v_proj_moe_gen", "up_proj", "o_proj"))
    }
    adapter = lora.Adapter("test@1", lora.AdapterMeta(base_model_hash="x", rank=2, alpha=4.0), factors)
    for model in (plain, fused):
        lora.activate(model, adapter)
    fused.language_model.model.stack_lora()
    return plain, fused, adapter


@pytest.mark.parametrize("layers", ["all", "some"])
def test_a_loaded_adapter_gives_the_plain_results_on_the_fused_path(tiny_dir: Path, layers: str) -> None:
    """A served adapter on the fused path (its A factors stacked per projection; gate/up's update first, the base
    product accumulated into it) equals it on the plain modules, also when it leaves some members of a projection
    alone."""
    plain, fused, adapter = _adapted_pair(tiny_dir, layers)
    hidden = plain.cfg.llm.hidden_size
    stacked = {"all": 4, "some": 0}[layers]  # Q/K/V and gate/up of both experts, where 2+ members have factors
    assert len(adapter.stacked) == stacked * plain.cfg.llm.num_hidden_layers
    for ours, ref in zip(_mixed_and_text(fused.language_model.model, hidden),
                         _mixed_and_text(plain.language_model.model, hidden), strict=True):
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)  # float32 sums in another order
    lora.deactivate(plain)
    base = _mixed_and_text(plain.language_model.model, hidden)
    assert _relative_error(_mixed_and_text(fused.language_model.model, hidden)[0], base[0]) > 1e-3  # it mattered


def test_an_adapter_on_the_fp8_generation_expert_stays_close(tiny_dir: Path) -> None:
    """FP8 products take the adapter's update on top: text exact, latents within FP8 rounding of the plain model."""
    plain, fused, _ = _adapted_pair(tiny_dir, "all")
    fused.language_model.model.generation_expert_to_fp8()
    hidden = plain.cfg.llm.hidden_size
    (text, mixed), (text_ref, mixed_ref) = (_mixed_and_text(m.language_model.model, hidden) for m in (fused, plain))
    torch.testing.assert_close(text, text_ref, atol=1e-4, rtol=1e-4)
    error = _relative_error(mixed[:, 1:-1], mixed_ref[:, 1:-1])
    assert 0 < error < 0.1
    lora.deactivate(plain)
    assert _relative_error(mixed[:, 1:-1], _mixed_and_text(plain.language_model.model, hidden)[1][:, 1:-1]) > 3 * error
