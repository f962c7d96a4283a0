"""Model configuration, rebuilt from an official BAGEL folder.

The published ``llm_config.json`` is plain Qwen2.5-7B-Instruct and ``vit_config.json`` plain SigLIP; the official
loaders patch both in code (MODEL.md 1.2, 1.3, 2.1, 10.6). :func:`from_checkpoint_dir` is the one place where
those fix-ups happen.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from safetensors import safe_open

from core.model.vit import SiglipVisionConfig

__all__ = ["BagelConfig", "LLMConfig", "from_checkpoint_dir", "full_size_config"]


@dataclass(frozen=True)
class LLMConfig:
    """Qwen2 Mixture-of-Transformers decoder sizes."""

    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 32768
    qk_norm: bool = True
    tie_word_embeddings: bool = False
    layer_module: str = "Qwen2MoTDecoderLayer"

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads or self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("hidden_size, num_attention_heads and num_key_value_heads do not divide evenly")
        if self.layer_module != "Qwen2MoTDecoderLayer" or not self.qk_norm or self.tie_word_embeddings:
            raise ValueError("only the released MoT layout (qk_norm, untied embeddings) is supported")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass(frozen=True)
class BagelConfig:
    """The whole network: decoder, ViT and the BAGEL heads (inference values, MODEL.md 2.1)."""

    llm: LLMConfig = field(default_factory=LLMConfig)
    vit: SiglipVisionConfig = field(default_factory=SiglipVisionConfig)
    latent_patch_size: int = 2
    max_latent_size: int = 64
    vit_max_num_patch_per_side: int = 70
    latent_channels: int = 16
    vae_downsample: int = 8
    connector_act: str = "gelu_pytorch_tanh"
    timestep_shift: float = 1.0

    @property
    def patch_latent_dim(self) -> int:
        return self.latent_patch_size**2 * self.latent_channels

    @property
    def latent_downsample(self) -> int:
        return self.vae_downsample * self.latent_patch_size


def _pick(cls: type, raw: dict[str, Any]) -> dict[str, Any]:
    """Keep the keys ``cls`` knows; the official files carry many more (dtype, ids, transformers version)."""
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in raw.items() if k in names}


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path.name} is missing in {path.parent}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc


def _vae_latent_channels(path: Path) -> int:
    """FLUX's z_channels, read off the autoencoder's header (the file has no config, MODEL.md 11.3)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path.name} is missing in {path.parent}")
    try:
        with safe_open(str(path), framework="pt") as f:
            shape = f.get_slice("encoder.conv_out.weight").get_shape()
    except Exception as exc:  # safetensors raises its own error types for bad headers and absent keys
        raise ValueError(f"{path} is not a FLUX autoencoder file: {exc}") from exc
    return shape[0] // 2  # the encoder outputs mean and logvar


def from_checkpoint_dir(directory: str | Path) -> BagelConfig:
    """Read ``llm_config.json`` and ``vit_config.json`` and apply every fix-up the official loaders apply."""
    directory = Path(directory)
    llm_raw = _read_json(directory / "llm_config.json")
    vit_raw = _read_json(directory / "vit_config.json")
    # Official fix-ups (app.py, inference.ipynb, inference_grpo.py): the files predate BAGEL's extra fields.
    llm_raw |= {"qk_norm": True, "tie_word_embeddings": False, "layer_module": "Qwen2MoTDecoderLayer"}
    # rope=False (learned absolute positions) is the only ViT variant built here; 26 of the 27 layers are used.
    vit_raw = vit_raw | {"num_hidden_layers": int(vit_raw["num_hidden_layers"]) - 1}
    return BagelConfig(
        llm=LLMConfig(**_pick(LLMConfig, llm_raw)),
        vit=SiglipVisionConfig.from_dict(vit_raw),
        latent_channels=_vae_latent_channels(directory / "ae.safetensors"),
        latent_patch_size=2,
        max_latent_size=64,
        vit_max_num_patch_per_side=70,
    )


def full_size_config() -> BagelConfig:
    """The released BAGEL-7B-MoT sizes, for shape checks and benchmarks without files."""
    return BagelConfig()
