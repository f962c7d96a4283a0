"""Per-character LoRA adapters, applied from outside the network (like gpt-fast's ``replace_linear_int4``).

Notable:
- :func:`attach_lora` swaps the targeted ``nn.Linear`` modules for :class:`LoRALinear`, which *shares* the base
  weight and bias Parameters (no copy; ``state_dict`` names of the base are unchanged) and adds ``lora_A`` /
  ``lora_B``. The layers never know: ``y = x W^T + b + (alpha / r) * (x A^T) B^T``.
- Targets are the attention and MLP projections of BOTH experts (``q/k/v/o_proj`` and their ``*_moe_gen`` twins,
  ``mlp.*`` and ``mlp_moe_gen.*``); Character-GRPO later passes :data:`GEN_TARGETS` (generation expert only).
- Serving: wrap once with ``attach_lora(model, rank=None)`` (no LoRA weights, plain linear cost), then
  :func:`activate` points every wrapped module at one loaded :class:`Adapter`'s tensors (by reference: switching
  adapters costs no copy) and :func:`deactivate` returns to the base model. The runtime keeps an LRU of
  :class:`Adapter` objects keyed by file path and compares :func:`read_meta` versions to pick up a new file.
  One forward pass runs with one active adapter; the caller keeps requests of different adapters apart
  (core.model.scheduling.AdapterGate).
- Files are safetensors (``<module>.lora_A`` / ``<module>.lora_B``) with string metadata: format, base model
  hash, rank, alpha, steps, data hash and targets; :func:`load_adapter` refuses a file made for another base.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

__all__ = [
    "ALL_TARGETS",
    "FORMAT",
    "GEN_TARGETS",
    "Adapter",
    "AdapterError",
    "AdapterMeta",
    "LoRALinear",
    "activate",
    "active_adapter",
    "attach_lora",
    "base_model_hash",
    "deactivate",
    "load_adapter",
    "lora_modules",
    "lora_parameters",
    "lora_state_dict",
    "read_meta",
    "save_adapter",
    "targeted_linears",
    "using_adapter",
]

FORMAT = "unichar-lora/1"
# module-name patterns (full match against the qualified name) of the layers LoRA wraps
_LAYER = r"(?:.*\.)?language_model\.model\.layers\.\d+\."  # decoder layers only, never the ViT's
ALL_TARGETS: tuple[str, ...] = (
    _LAYER + r"self_attn\.[qkvo]_proj(_moe_gen)?",
    _LAYER + r"mlp(_moe_gen)?\.(gate|up|down)_proj",
)
GEN_TARGETS: tuple[str, ...] = (
    _LAYER + r"self_attn\.[qkvo]_proj_moe_gen",
    _LAYER + r"mlp_moe_gen\.(gate|up|down)_proj",
)


class AdapterError(ValueError):
    """An adapter file is malformed or does not fit the model it is applied to."""


class LoRALinear(nn.Linear):
    """A linear layer plus an optional low-rank update; the base weight is the wrapped layer's own Parameter."""

    def __init__(self, base: nn.Linear) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias  # shared, not copied
        self.lora_A: Tensor | None = None  # [r, in]
        self.lora_B: Tensor | None = None  # [out, r]
        self.scaling = 0.0
        self.adapter_id: str | None = None
        self.adapter: Adapter | None = None  # the loaded adapter the factors belong to (None: none, or training)
        # dtype of the low-rank products; None: the input's (fp32 master factors are cast per forward, as autocast
        # does: bf16 tensor-core products instead of fp32 ones on a bf16 base). float32 keeps the whole path in fp32.
        self.compute_dtype: torch.dtype | None = None

    def init_trainable(self, rank: int, alpha: float, dtype: torch.dtype, generator: torch.Generator | None) -> None:
        """Fresh trainable factors: A Kaiming-uniform, B zero, so training starts at the base model exactly."""
        a = torch.empty(rank, self.in_features, device=self.weight.device, dtype=dtype)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
        self.lora_A = nn.Parameter(a)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=self.weight.device, dtype=dtype))
        self.scaling, self.adapter_id = alpha / rank, "training"

    def set_factors(self, a: Tensor | None, b: Tensor | None, scaling: float, adapter: Adapter | None) -> None:
        """Point at ``adapter``'s factors for this layer (frozen, by reference) or at none."""
        self._parameters.pop("lora_A", None)
        self._parameters.pop("lora_B", None)
        self.lora_A, self.lora_B, self.scaling, self.adapter = a, b, scaling, adapter
        self.adapter_id = adapter.id if adapter is not None else None

    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(x, self.weight, self.bias)
        if self.lora_A is None:
            return y
        dtype = self.compute_dtype or x.dtype
        if dtype != y.dtype:
            return y + self.low_rank_update(x, y.dtype)
        # the scaled update accumulates into y inside the second product: no extra passes over the output
        h = F.linear(x, self.lora_A.to(dtype)).flatten(0, -2)
        return torch.addmm(y.flatten(0, -2), h, self.lora_B.to(dtype).t(), alpha=self.scaling).view(y.shape)

    def low_rank_update(self, x: Tensor, dtype: torch.dtype) -> Tensor:
        """``scaling * B A x`` in ``dtype``."""
        compute = self.compute_dtype or x.dtype
        h = F.linear(F.linear(x.to(compute), self.lora_A.to(compute)), self.lora_B.to(compute))
        return (h * self.scaling).to(dtype)

    def accumulates_in(self, dtype: torch.dtype, x: Tensor) -> bool:
        """Whether :meth:`add_low_rank_update_` can add into a ``dtype`` output directly (no float32 detour)."""
        return (self.compute_dtype or x.dtype) == dtype

    def add_low_rank_update_(self, x: Tensor, out: Tensor, ax: Tensor | None = None) -> None:
        """``out += scaling * B A x`` in place, ``out`` being this layer's columns of a fused or FP8 product
        (core.model.projection). The second product accumulates into ``out`` (a strided view is fine), so a decoded
        token spends at most two kernels per layer on the update, not four. ``ax``: ``A x`` as ``[tokens, r]``, where
        the caller made it together with other layers'."""
        if not self.accumulates_in(out.dtype, x):
            out += self.low_rank_update(x, out.dtype)
            return
        if ax is None:
            ax = F.linear(x, self.lora_A.to(x.dtype)).flatten(0, -2)
        out.view(-1, out.shape[-1]).addmm_(ax, self.lora_B.to(x.dtype).t(), alpha=self.scaling)  # view: never a copy

    def extra_repr(self) -> str:
        rank = 0 if self.lora_A is None else self.lora_A.shape[0]
        return f"{super().extra_repr()}, rank={rank}, adapter={self.adapter_id}"


@dataclass(frozen=True, slots=True)
class AdapterMeta:
    """What an adapter file says about itself; ``version`` lets a server notice a replaced file."""

    base_model_hash: str
    rank: int
    alpha: float
    steps: int = 0
    data_hash: str = ""
    targets: tuple[str, ...] = ALL_TARGETS
    extra: dict[str, str] = field(default_factory=dict)

    def to_strings(self) -> dict[str, str]:
        return {
            "format": FORMAT,
            "base_model_hash": self.base_model_hash,
            "rank": str(self.rank),
            "alpha": repr(float(self.alpha)),
            "steps": str(self.steps),
            "data_hash": self.data_hash,
            "targets": json.dumps(list(self.targets)),
            **{f"x_{k}": v for k, v in self.extra.items()},
        }

    @classmethod
    def from_strings(cls, raw: dict[str, str] | None, where: str) -> AdapterMeta:
        if not raw or raw.get("format") != FORMAT:
            raise AdapterError(f"{where} is not a {FORMAT} adapter file")
        try:
            return cls(
                base_model_hash=raw["base_model_hash"],
                rank=int(raw["rank"]),
                alpha=float(raw["alpha"]),
                steps=int(raw.get("steps", "0")),
                data_hash=raw.get("data_hash", ""),
                targets=tuple(json.loads(raw.get("targets", "[]"))) or ALL_TARGETS,
                extra={k[2:]: v for k, v in raw.items() if k.startswith("x_")},
            )
        except (KeyError, ValueError) as exc:
            raise AdapterError(f"{where} has malformed adapter metadata: {exc}") from exc


@dataclass(frozen=True, slots=True)
class Adapter:
    """A loaded adapter: per module name its ``(A [r, in], B [out, r])`` factors, on the model's device."""

    id: str
    meta: AdapterMeta
    factors: dict[str, tuple[Tensor, Tensor]] = field(repr=False)
    # the A factors of a fused projection's layers stacked, by projection (core.model.projection.Projection.stack_lora),
    # kept here because a decode graph captured with this adapter reads them for as long as it lives
    stacked: dict[int, Tensor] = field(default_factory=dict, repr=False, compare=False)

    @property
    def scaling(self) -> float:
        return self.meta.alpha / self.meta.rank


def targeted_linears(model: nn.Module, targets: Iterable[str] = ALL_TARGETS) -> Iterator[tuple[str, nn.Linear]]:
    """The linears of ``model`` (wrapped or not) whose qualified names match ``targets``, with their names."""
    patterns = [re.compile(t) for t in targets]
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and any(p.fullmatch(name) for p in patterns):
            yield name, module


def attach_lora(
    model: nn.Module,
    rank: int | None,
    alpha: float = 1.0,
    targets: Iterable[str] = ALL_TARGETS,
    *,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> list[str]:
    """Wrap the targeted linears in place; with ``rank`` they get fresh trainable factors, else none (serving)."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    names = []
    for name, module in list(targeted_linears(model, targets)):
        wrapped = module if isinstance(module, LoRALinear) else LoRALinear(module)
        if rank is not None:
            wrapped.init_trainable(rank, alpha, dtype, generator if wrapped.weight.device.type == "cpu" else None)
        if wrapped is not module:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, wrapped)
        names.append(name)
    if not names:
        raise AdapterError("no layer of the model matches the LoRA targets")
    return names


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """The wrapped layers by qualified name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable LoRA factors (for the optimizer)."""
    return [p for m in lora_modules(model).values() for p in (m.lora_A, m.lora_B) if isinstance(p, nn.Parameter)]


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The active factors as ``<module>.lora_A`` / ``.lora_B`` tensors (detached, contiguous, on CPU)."""
    out = {}
    for name, module in lora_modules(model).items():
        if module.lora_A is not None:
            out[f"{name}.lora_A"] = module.lora_A.detach().contiguous().cpu()
            out[f"{name}.lora_B"] = module.lora_B.detach().contiguous().cpu()
    return out


def save_adapter(path: Path | str, tensors: dict[str, Tensor], meta: AdapterMeta) -> Path:
    """Write an adapter file atomically (tmp file then rename) with its metadata."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta.to_strings())
    tmp.replace(path)
    return path


def read_meta(path: Path | str) -> AdapterMeta:
    """The metadata of an adapter file, without reading its tensors."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return AdapterMeta.from_strings(f.metadata(), str(path))
    except Exception as exc:  # safetensors raises its own error types for a bad header
        if isinstance(exc, AdapterError):
            raise
        raise AdapterError(f"cannot read adapter {path}: {exc}") from exc


def load_adapter(
    path: Path | str,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    base_model_hash: str | None = None,
) -> Adapter:
    """Read an adapter to ``device``/``dtype``; refuses a file made for another base model when a hash is given."""
    meta = read_meta(path)
    if base_model_hash is not None and meta.base_model_hash != base_model_hash:
        raise AdapterError(f"{path} was trained on base {meta.base_model_hash[:12]}, not {base_model_hash[:12]}")
    factors: dict[str, tuple[Tensor, Tensor]] = {}
    with safe_open(str(path), framework="pt", device=str(device)) as f:
        names = {k.rsplit(".", 1)[0] for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)
        for name in sorted(names):
            try:
                a, b = f.get_tensor(f"{name}.lora_A"), f.get_tensor(f"{name}.lora_B")
            except Exception as exc:
                raise AdapterError(f"{path}: {name} lacks lora_A or lora_B") from exc
            if a.shape[0] != meta.rank or b.shape[1] != meta.rank:
                raise AdapterError(f"{path}: {name} has rank {a.shape[0]}, metadata says {meta.rank}")
            factors[name] = (a.to(dtype) if dtype else a, b.to(dtype) if dtype else b)
    stat = Path(path).stat()
    return Adapter(id=f"{Path(path).name}@{stat.st_mtime_ns}", meta=meta, factors=factors)


def activate(model: nn.Module, adapter: Adapter) -> None:
    """Make ``adapter`` the active one on an already-wrapped model; every wrapped layer it lacks runs as base."""
    modules = lora_modules(model)
    unknown = sorted(set(adapter.factors) - set(modules))
    if unknown:
        raise AdapterError(f"adapter {adapter.id} targets layers the model has not wrapped: {unknown[:3]}")
    for name, module in modules.items():
        a, b = adapter.factors.get(name, (None, None))
        if a is not None and (a.shape[1], b.shape[0]) != (module.in_features, module.out_features):
            raise AdapterError(f"adapter {adapter.id}: {name} has shape {tuple(b.shape)}x{tuple(a.shape)}")
        module.set_factors(a, b, adapter.scaling, adapter if a is not None else None)


def deactivate(model: nn.Module) -> None:
    """Back to the base model (the wrapped layers stay, with no low-rank update)."""
    for module in lora_modules(model).values():
        module.set_factors(None, None, 0.0, None)


def active_adapter(model: nn.Module) -> str | None:
    """The id of the adapter in use, or None."""
    ids = {m.adapter_id for m in lora_modules(model).values()} - {None}
    return next(iter(ids)) if ids else None


@contextmanager
def using_adapter(model: nn.Module, adapter: Adapter | None) -> Iterator[None]:
    """Run a block with ``adapter`` active (None: the base model), restoring the base afterwards."""
    if adapter is not None:
        activate(model, adapter)
    try:
        yield
    finally:
        if adapter is not None:
            deactivate(model)


def base_model_hash(model_dir: Path | str) -> str:
    """A stable id of a base model folder: its configs and each weight file's safetensors header and size.

    Hashing 29 GB of weights would take minutes; headers hold names, shapes, dtypes and offsets, which change with
    any re-export, and the size completes it.
    """
    root = Path(model_dir)
    digest = hashlib.sha256()
    for path in sorted(root.iterdir()):
        if path.suffix == ".json":
            digest.update(path.name.encode() + path.read_bytes())
        elif path.suffix == ".safetensors":
            with path.open("rb") as f:
                size = int.from_bytes(f.read(8), "little")
                digest.update(path.name.encode() + f.read(min(size, 100_000_000)))
            digest.update(str(path.stat().st_size).encode())
    return digest.hexdigest()
