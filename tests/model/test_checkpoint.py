"""Official tensor names and shapes (MODEL.md 2.2), strict loading, UniCharacter SFT and GRPO checkpoints (8.4)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from core.model.checkpoint import (
    CheckpointError,
    check_model_dir,
    expected_shapes,
    load_bagel,
    plan_sources,
)
from core.model.config import from_checkpoint_dir, full_size_config

CPU = torch.device("cpu")


def _official_names_and_shapes() -> dict[str, tuple[int, ...]]:
    """MODEL.md 2.2, written out independently of the model code."""
    D, F, V, KV = 3584, 18944, 152064, 512
    s: dict[str, tuple[int, ...]] = {
        "language_model.model.embed_tokens.weight": (V, D),
        "language_model.model.norm.weight": (D,),
        "language_model.model.norm_moe_gen.weight": (D,),
        "language_model.lm_head.weight": (V, D),
        "vit_model.vision_model.embeddings.patch_embedding.weight": (1152, 588),
        "vit_model.vision_model.embeddings.patch_embedding.bias": (1152,),
        "vit_model.vision_model.embeddings.position_embedding.weight": (4900, 1152),
        "vit_model.vision_model.post_layernorm.weight": (1152,),
        "vit_model.vision_model.post_layernorm.bias": (1152,),
        "connector.fc1.weight": (D, 1152), "connector.fc1.bias": (D,),
        "connector.fc2.weight": (D, D), "connector.fc2.bias": (D,),
        "vit_pos_embed.pos_embed": (4900, D), "latent_pos_embed.pos_embed": (4096, D),
        "time_embedder.mlp.0.weight": (D, 256), "time_embedder.mlp.0.bias": (D,),
        "time_embedder.mlp.2.weight": (D, D), "time_embedder.mlp.2.bias": (D,),
        "vae2llm.weight": (D, 64), "vae2llm.bias": (D,), "llm2vae.weight": (64, D), "llm2vae.bias": (64,),
    }
    for i in range(28):
        p = f"language_model.model.layers.{i}."
        for g in ("", "_moe_gen"):
            s |= {
                f"{p}self_attn.q_proj{g}.weight": (D, D), f"{p}self_attn.q_proj{g}.bias": (D,),
                f"{p}self_attn.k_proj{g}.weight": (KV, D), f"{p}self_attn.k_proj{g}.bias": (KV,),
                f"{p}self_attn.v_proj{g}.weight": (KV, D), f"{p}self_attn.v_proj{g}.bias": (KV,),
                f"{p}self_attn.o_proj{g}.weight": (D, D),
                f"{p}self_attn.q_norm{g}.weight": (128,), f"{p}self_attn.k_norm{g}.weight": (128,),
                f"{p}mlp{g}.gate_proj.weight": (F, D), f"{p}mlp{g}.up_proj.weight": (F, D),
                f"{p}mlp{g}.down_proj.weight": (D, F),
                f"{p}input_layernorm{g}.weight": (D,), f"{p}post_attention_layernorm{g}.weight": (D,),
            }
    for j in range(26):
        p = f"vit_model.vision_model.encoder.layers.{j}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            s |= {f"{p}self_attn.{proj}.weight": (1152, 1152), f"{p}self_attn.{proj}.bias": (1152,)}
        for n in ("layer_norm1", "layer_norm2"):
            s |= {f"{p}{n}.weight": (1152,), f"{p}{n}.bias": (1152,)}
        s |= {f"{p}mlp.fc1.weight": (4304, 1152), f"{p}mlp.fc1.bias": (4304,),
              f"{p}mlp.fc2.weight": (1152, 4304), f"{p}mlp.fc2.bias": (1152,)}
    return s


def test_full_size_names_and_shapes_match_the_official_list() -> None:
    got = expected_shapes(full_size_config())  # built on the meta device: nothing allocated
    want = _official_names_and_shapes()
    assert sorted(set(want) - set(got)) == [] and sorted(set(got) - set(want)) == []
    assert {k: v for k, v in got.items() if want[k] != v} == {}
    assert round(sum(torch.Size(v).numel() for v in got.values()) / 1e9, 2) == 14.61  # MODEL.md 1.4


def test_config_fixups_from_the_published_files(tiny_dir: Path) -> None:
    vit_json = json.loads((tiny_dir / "vit_config.json").read_text())
    cfg = from_checkpoint_dir(tiny_dir)
    assert cfg.vit.num_hidden_layers == vit_json["num_hidden_layers"] - 1
    assert (cfg.max_latent_size, cfg.latent_patch_size, cfg.vit_max_num_patch_per_side) == (64, 2, 70)
    assert cfg.llm.qk_norm and not cfg.llm.tie_word_embeddings and cfg.latent_channels == 16


def _copy(tiny_dir: Path, dst: Path) -> Path:
    shutil.copytree(tiny_dir, dst)
    return dst


def _load(d: Path, **kw: object):
    return load_bagel(from_checkpoint_dir(d), d, device=CPU, dtype=torch.float32, **kw)


def test_loads_every_tensor_from_the_file(tiny_dir: Path) -> None:
    model = _load(tiny_dir)
    saved = load_file(str(tiny_dir / "ema.safetensors"))
    state = model.state_dict()
    assert set(state) == set(saved)
    assert all(torch.equal(state[k], saved[k].float()) for k in saved)
    assert not any(t.is_meta for t in state.values())


@pytest.mark.parametrize(
    ("edit", "named"),
    [
        (lambda s: s.pop("llm2vae.weight"), "missing tensor llm2vae.weight"),
        (lambda s: s.__setitem__("extra.weight", torch.zeros(2)), "unexpected tensor extra.weight"),
        (lambda s: s.__setitem__("vae2llm.bias", torch.zeros(3)), "tensor vae2llm.bias"),
    ],
)
def test_refuses_a_mismatched_file_naming_the_tensor(tiny_dir: Path, tmp_path: Path, edit, named: str) -> None:
    d = _copy(tiny_dir, tmp_path / "m")
    state = load_file(str(d / "ema.safetensors"))
    edit(state)
    save_file(state, str(d / "ema.safetensors"))
    with pytest.raises(CheckpointError, match=named):
        _load(d)
    assert named in check_model_dir(d, from_checkpoint_dir(d))[0]


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_refuses_a_truncated_or_foreign_file(tiny_dir: Path, tmp_path: Path, damage: str) -> None:
    d = _copy(tiny_dir, tmp_path / "m")
    path = d / "ema.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"not a safetensors file at all")
    with pytest.raises(CheckpointError, match="ema.safetensors"):
        _load(d)


def test_missing_files_are_named(tiny_dir: Path, tmp_path: Path) -> None:
    d = _copy(tiny_dir, tmp_path / "m")
    (d / "ema.safetensors").unlink()
    with pytest.raises(CheckpointError, match="ema.safetensors"):
        _load(d)
    (d / "llm_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="llm_config.json"):
        from_checkpoint_dir(d)


def test_sft_checkpoint_replaces_the_base_weights(tiny_dir: Path, tmp_path: Path) -> None:
    state = {k: v + 1 for k, v in load_file(str(tiny_dir / "ema.safetensors")).items()}
    save_file(state, str(tmp_path / "model.safetensors"))
    model = _load(tiny_dir, checkpoint=tmp_path / "model.safetensors")
    assert torch.equal(model.llm2vae.weight, state["llm2vae.weight"].float())


def test_grpo_llm_only_checkpoint_is_merged_with_vit_and_heads(tiny_dir: Path, tmp_path: Path) -> None:
    base = load_file(str(tiny_dir / "ema.safetensors"))
    sft = {k: v * 2 for k, v in base.items()}
    save_file(sft, str(tmp_path / "sft.safetensors"))
    # GRPO saves language_model only, without its prefix (MODEL.md 10.12)
    grpo = {k.removeprefix("language_model."): v - 1 for k, v in base.items() if k.startswith("language_model.")}
    grpo["vae2llm.bias"] = base["vae2llm.bias"] + 5  # a head the GRPO file does carry wins over the companion's
    save_file(grpo, str(tmp_path / "grpo.safetensors"))
    sources = plan_sources(tiny_dir, tmp_path / "grpo.safetensors", tmp_path / "sft.safetensors")
    assert sources["language_model.lm_head.weight"].key == "lm_head.weight"
    model = _load(tiny_dir, checkpoint=tmp_path / "grpo.safetensors", vit_checkpoint=tmp_path / "sft.safetensors")
    state = model.state_dict()
    layer = "language_model.model.layers.0.mlp_moe_gen.up_proj.weight"
    assert torch.equal(state[layer], grpo[layer.removeprefix("language_model.")].float())
    assert torch.equal(state["vae2llm.bias"], grpo["vae2llm.bias"].float())
    for name in ("vit_model.vision_model.post_layernorm.weight", "connector.fc1.weight", "llm2vae.weight",
                 "vit_pos_embed.pos_embed", "time_embedder.mlp.0.weight"):
        assert torch.equal(state[name], sft[name].float()), name
    # without a companion file the base folder supplies the ViT side and heads
    model = _load(tiny_dir, checkpoint=tmp_path / "grpo.safetensors")
    assert torch.equal(model.connector.fc1.weight, base["connector.fc1.weight"].float())


def test_loads_in_the_requested_dtype(tiny_dir: Path) -> None:
    model = load_bagel(from_checkpoint_dir(tiny_dir), tiny_dir, device=CPU, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with safe_open(str(tiny_dir / "ema.safetensors"), "pt") as f:
        assert f.get_tensor("llm2vae.weight").dtype == torch.bfloat16
