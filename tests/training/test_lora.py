"""LoRA as a transformation from outside: both experts wrapped, exact at init, hot-swappable for serving."""

from __future__ import annotations

import pytest
import torch

from core.model.bagel import Bagel, init_random_
from core.model.config import BagelConfig, LLMConfig
from core.model.lora import (
    GEN_TARGETS,
    AdapterError,
    AdapterMeta,
    LoRALinear,
    activate,
    active_adapter,
    attach_lora,
    deactivate,
    load_adapter,
    lora_parameters,
    lora_state_dict,
    read_meta,
    save_adapter,
    using_adapter,
)
from core.model.vit import SiglipVisionConfig


def tiny_bagel() -> Bagel:
    cfg = BagelConfig(
        llm=LLMConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2),
        vit=SiglipVisionConfig(hidden_size=16, intermediate_size=24, num_attention_heads=2, num_hidden_layers=1),
        max_latent_size=8, vit_max_num_patch_per_side=8,
    )
    return init_random_(Bagel(cfg), seed=0)


def run(model: Bagel) -> torch.Tensor:
    x = torch.randn(1, 5, 32, generator=torch.Generator().manual_seed(1))
    return model.language_model.model(x, torch.arange(5)[None], causal=True)


def test_wraps_both_experts_and_starts_exact():
    model = tiny_bagel()
    before = run(model)
    keys = set(model.state_dict())
    names = attach_lora(model, rank=4, alpha=8.0)
    # 2 layers x (4 attention + 3 MLP projections) x 2 experts
    assert len(names) == 28
    assert any(n.endswith("q_proj_moe_gen") for n in names) and any(".mlp_moe_gen.down_proj" in n for n in names)
    assert {k for k in model.state_dict() if "lora_" not in k} == keys  # base names unchanged
    torch.testing.assert_close(run(model), before)  # B = 0 at init
    assert len(lora_parameters(model)) == 56


def test_save_load_activate_deactivate(tmp_path):
    model = tiny_bagel()
    base = run(model)
    attach_lora(model, rank=4, alpha=8.0)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.normal_(0, 0.1)
    tuned = run(model)
    assert not torch.allclose(tuned, base)
    meta = AdapterMeta(base_model_hash="abc", rank=4, alpha=8.0, steps=7, data_hash="d1", extra={"character": "X"})
    path = save_adapter(tmp_path / "a.safetensors", lora_state_dict(model), meta)
    assert read_meta(path) == meta

    server = tiny_bagel()
    attach_lora(server, rank=None)  # serving: wrapped once, no factors
    torch.testing.assert_close(run(server), base)
    adapter = load_adapter(path, base_model_hash="abc")
    activate(server, adapter)
    assert active_adapter(server) == adapter.id
    torch.testing.assert_close(run(server), tuned)
    deactivate(server)
    torch.testing.assert_close(run(server), base)
    with using_adapter(server, adapter):
        torch.testing.assert_close(run(server), tuned)
    assert active_adapter(server) is None
    with pytest.raises(AdapterError, match="trained on base"):
        load_adapter(path, base_model_hash="other")


def test_gen_only_targets_and_bad_files(tmp_path):
    model = tiny_bagel()
    names = attach_lora(model, rank=2, targets=GEN_TARGETS)
    assert names and all("moe_gen" in n for n in names)
    assert isinstance(model.language_model.model.layers[0].self_attn.q_proj_moe_gen, LoRALinear)
    assert not isinstance(model.language_model.model.layers[0].self_attn.q_proj, LoRALinear)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(AdapterError):
        read_meta(bad)
