"""Fused Q/K/V and gate/up products: same results, same checkpoint names, LoRA and reloads fall back to plain."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from core.model import lora
from core.model.bagel import Bagel
from core.model.checkpoint import load_bagel
from core.model.config import from_checkpoint_dir
from core.model.llm import Qwen2MoTModel


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
                         _mixed_and_text(plain.language_model.model, hidden)):
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_fused_weights_keep_the_checkpoint_names_and_share_memory(pair: tuple[Bagel, Bagel]) -> None:
    plain, fused = pair
    ours, ref = fused.state_dict(), plain.state_dict()
    assert list(ours) == list(ref)
    for name, tensor in ref.items():
        torch.testing.assert_close(ours[name], tensor, atol=0, rtol=0)
    attn = fused.language_model.model.layers[0].self_attn
    storage = attn.qkv[""].weight.untyped_storage().data_ptr()
    assert all(getattr(attn, f"{n}_proj").weight.untyped_storage().data_ptr() == storage for n in "qkv")
    with torch.no_grad():  # an in-place weight update reaches the fused product
        attn.k_proj.weight.mul_(1.0)
    assert attn.qkv[""].usable([attn.q_proj, attn.k_proj, attn.v_proj])


def test_an_active_lora_update_or_a_reassigning_load_turns_the_fused_path_off(tiny_dir: Path) -> None:
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
    assert not layer.mlp.gate_up.usable([layer.mlp.gate_proj, layer.mlp.up_proj])
    for ours, ref in zip(_mixed_and_text(fused.language_model.model, hidden),
                         _mixed_and_text(plain.language_model.model, hidden)):
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)

    reloaded = _fresh(tiny_dir)
    reloaded.language_model.model.fuse_projections()
    state = {k: v.clone() * 2 for k, v in reloaded.state_dict().items()}
    reloaded.load_state_dict(state, assign=True)
    layer = reloaded.language_model.model.layers[0]
    assert not layer.mlp.gate_up.usable([layer.mlp.gate_proj, layer.mlp.up_proj])
    doubled = _fresh(tiny_dir)
    doubled.load_state_dict(state)
    for ours, ref in zip(_mixed_and_text(reloaded.language_model.model, hidden),
                         _mixed_and_text(doubled.language_model.model, hidden)):
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
