"""A random character adapter for the tiny model: rank 2 on every LoRA target, written as the trainer writes one."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from core.model import lora
from core.model.runtime import UniCharacterRuntime


def write_random_adapter(runtime: UniCharacterRuntime, tiny_dir: Path, path: Path, seed: int) -> str:
    """Random factors (big enough to change replies) for ``runtime``'s model, saved at ``path``; returns the path."""
    gen = torch.Generator().manual_seed(seed)
    patterns = [re.compile(t) for t in lora.ALL_TARGETS]
    tensors = {}
    for name, module in runtime.model.named_modules():
        if isinstance(module, torch.nn.Linear) and any(p.fullmatch(name) for p in patterns):
            tensors[f"{name}.lora_A"] = torch.randn(2, module.in_features, generator=gen)
            tensors[f"{name}.lora_B"] = torch.randn(module.out_features, 2, generator=gen)
    meta = lora.AdapterMeta(base_model_hash=lora.base_model_hash(tiny_dir), rank=2, alpha=8.0)
    return str(lora.save_adapter(path, tensors, meta))
