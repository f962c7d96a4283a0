"""A random character adapter for the tiny model: rank 2 on every LoRA target, written as the trainer writes one."""

from __future__ import annotations

from pathlib import Path

from core.model import lora
from core.model.runtime import UniCharacterRuntime
from core.model.tiny import random_lora_factors


def write_random_adapter(runtime: UniCharacterRuntime, tiny_dir: Path, path: Path, seed: int) -> str:
    """Random factors (big enough to change replies) for ``runtime``'s model, saved at ``path``; returns the path."""
    meta = lora.AdapterMeta(base_model_hash=lora.base_model_hash(tiny_dir), rank=2, alpha=8.0)
    return str(lora.save_adapter(path, random_lora_factors(runtime.model, 2, seed=seed), meta))
