"""Strict, copy-free loading of the official BAGEL folder and of UniCharacter checkpoints.

Notable:
- The network is built on the meta device; each tensor is read memory-mapped from its safetensors file and moved
  straight to the target device and dtype, then assigned (``load_state_dict(assign=True)``). There is never a full
  float32 copy of the model in RAM.
- Strict: a missing, unexpected or mis-shaped tensor raises :class:`CheckpointError` naming it. The official
  loader is just as strict (MODEL.md 11.2); a silent miss of ``llm2vae`` would give grey images (10.11).
- Sources, in MODEL.md 8.4 / 10.12 terms: ``ema.safetensors`` of the base folder; an SFT ``model.safetensors``
  (same names); a GRPO file holding only the decoder without the ``language_model.`` prefix, completed with the
  ViT, connector and heads of ``vit_checkpoint`` (an SFT file) or, without one, of the base folder.
"""

from __future__ import annotations

import logging
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from core.model.bagel import Bagel
from core.model.config import BagelConfig
from core.model.vae import AutoEncoder

__all__ = [
    "CheckpointError",
    "TensorSource",
    "check_model_dir",
    "expected_shapes",
    "load_bagel",
    "load_vae",
    "plan_sources",
]

logger = logging.getLogger(__name__)

LLM_PREFIX = "language_model."
# What a GRPO file lacks and is taken from the companion checkpoint (UniCharacter inference_grpo.py).
VIT_SIDE = ("vit_model.", "connector.", "vit_pos_embed.")
GEN_HEADS = ("time_embedder.", "vae2llm.", "llm2vae.", "latent_pos_embed.")


class CheckpointError(ValueError):
    """A checkpoint file does not match the network it is loaded into."""


@dataclass(frozen=True, slots=True)
class TensorSource:
    """Where one model tensor comes from: a file and the key inside it."""

    path: Path
    key: str


def _open(path: Path, stack: ExitStack) -> Any:
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} does not exist")
    try:
        return stack.enter_context(safe_open(str(path), framework="pt"))
    except Exception as exc:  # safetensors raises its own error type for truncated or non-safetensors files
        raise CheckpointError(f"{path} is not a readable safetensors file: {exc}") from exc


def _keys(path: Path) -> list[str]:
    with ExitStack() as stack:
        return list(_open(path, stack).keys())


def expected_shapes(cfg: BagelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name and shape of the network for ``cfg``, computed on the meta device (nothing allocated)."""
    with torch.device("meta"):
        model = Bagel(cfg)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def _is_llm_only(keys: list[str]) -> bool:
    """A GRPO save: decoder keys without the ``language_model.`` prefix (MODEL.md 10.12)."""
    return any(k.startswith(("model.", "lm_head.")) for k in keys) and not any(k.startswith(LLM_PREFIX) for k in keys)


def plan_sources(
    model_dir: Path, checkpoint: Path | None = None, vit_checkpoint: Path | None = None
) -> dict[str, TensorSource]:
    """Map every model tensor name to the file and key it is read from."""
    base = model_dir / "ema.safetensors"
    if checkpoint is None:
        if vit_checkpoint is not None:
            raise CheckpointError("vit_checkpoint is only used together with a GRPO checkpoint")
        return {k: TensorSource(base, k) for k in _keys(base)}
    keys = _keys(checkpoint)
    if not _is_llm_only(keys):
        if vit_checkpoint is not None:
            raise CheckpointError(f"{checkpoint} is a full checkpoint; vit_checkpoint applies to LLM-only files")
        return {k: TensorSource(checkpoint, k) for k in keys}
    sources = {
        (LLM_PREFIX + k if k.startswith(("model.", "lm_head.")) else k): TensorSource(checkpoint, k) for k in keys
    }
    companion = vit_checkpoint or base
    for key in _keys(companion):
        if key.startswith(VIT_SIDE) or (key.startswith(GEN_HEADS) and key not in sources):
            sources[key] = TensorSource(companion, key)
    logger.info("merged LLM-only checkpoint %s with ViT, connector and heads of %s", checkpoint, companion)
    return sources


def _check(sources: dict[str, TensorSource], shapes: dict[str, tuple[int, ...]], files: dict[Path, Any]) -> None:
    missing = sorted(set(shapes) - set(sources))
    unexpected = sorted(set(sources) - set(shapes))
    problems = [f"missing tensor {n}" for n in missing[:10]] + [f"unexpected tensor {n}" for n in unexpected[:10]]
    for name in sorted(set(shapes) & set(sources)):
        src = sources[name]
        found = tuple(files[src.path].get_slice(src.key).get_shape())
        if found != shapes[name]:
            problems.append(f"tensor {name} in {src.path.name} has shape {found}, expected {shapes[name]}")
    if problems:
        more = len(missing) + len(unexpected) - min(len(missing), 10) - min(len(unexpected), 10)
        raise CheckpointError("; ".join(problems) + (f"; and {more} more" if more > 0 else ""))


def load_bagel(
    cfg: BagelConfig, model_dir: Path, *, device: torch.device, dtype: torch.dtype,
    checkpoint: Path | None = None, vit_checkpoint: Path | None = None,
) -> Bagel:
    """Build :class:`Bagel` on the meta device and fill it strictly from the checkpoint files."""
    sources = plan_sources(model_dir, checkpoint, vit_checkpoint)
    with torch.device("meta"):
        model = Bagel(cfg)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    with ExitStack() as stack:
        files = {path: _open(path, stack) for path in {s.path for s in sources.values()}}
        _check(sources, shapes, files)
        state = {}
        for name, src in sources.items():
            try:
                tensor = files[src.path].get_tensor(src.key)  # memory-mapped, in the file's dtype
            except Exception as exc:
                raise CheckpointError(f"cannot read tensor {src.key} from {src.path}: {exc}") from exc
            state[name] = tensor.to(device=device, dtype=dtype)
        model.load_state_dict(state, strict=True, assign=True)
    model.requires_grad_(False)
    return model.eval()


def load_vae(path: Path, *, device: torch.device, dtype: torch.dtype = torch.float32) -> AutoEncoder:
    """The FLUX autoencoder from ``ae.safetensors`` (original BFL names; sizes read off the shapes)."""
    with ExitStack() as stack:
        f = _open(path, stack)
        try:
            state = {k: f.get_tensor(k).to(dtype=dtype) for k in f.keys()}  # noqa: SIM118 (not a dict)
            vae = AutoEncoder.from_state_dict(state, device=device)
        except ValueError as exc:
            raise CheckpointError(f"{path}: {exc}") from exc
    vae.requires_grad_(False)
    return vae.eval()


def check_model_dir(model_dir: Path, cfg: BagelConfig, checkpoint: Path | None = None,
                    vit_checkpoint: Path | None = None) -> list[str]:
    """Problems that would stop loading, as readable lines; empty when the folder is complete."""
    try:
        sources = plan_sources(model_dir, checkpoint, vit_checkpoint)
        shapes = expected_shapes(cfg)
        with ExitStack() as stack:
            files = {path: _open(path, stack) for path in {s.path for s in sources.values()}}
            _check(sources, shapes, files)
    except CheckpointError as exc:
        return [str(exc)]
    return []
