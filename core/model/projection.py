"""How a layer's linear products run at inference: fused over one storage, optionally in FP8, LoRA on top.

Notable:
- :class:`Projection` stores several linears that read the same input (Q/K/V; gate/up) in one tensor whose row
  slices ARE the checkpoint's Parameters: one matrix product instead of three or two, names and strict loading
  unchanged. A single linear (o, down) shares its weight as is.
- An active LoRA update is accumulated into the base product's output (gate/up's is written first and the base
  product accumulates into it), so adapters keep the fused (and FP8) path; a loaded adapter's A factors are
  stacked per projection, one ``A x`` product for all its members.
- :meth:`Projection.to_fp8` replaces the weight by an e4m3 copy with one scale per output channel; inputs are then
  quantised per token (row) and multiplied by ``torch._scaled_mm`` with row-wise scales. The generation expert runs
  this way on GPUs with FP8 tensor cores: a 1024x1024 image is ~90 passes of 4,096 latent tokens through it,
  matrix-bound work that FP8 runs at about twice the bf16 rate. Per-channel and per-token scales keep the error
  of a product near e4m3's rounding (about 2-3 % of an output's magnitude, not accumulated over the sum).
- A projection whose linears were re-assigned (a load with ``assign=True``) or that needs a gradient is not
  usable: the caller runs the plain modules, so training never goes through here.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "FP8", "Projection", "fast_fp8_kernels", "fp8_supported", "quantize_rows", "run_projection", "silu_mul_rows",
]

FP8 = torch.float8_e4m3fn
_FP8_MAX = torch.finfo(FP8).max
_TINY = 1e-12  # a zero row or channel gets this amax instead of dividing by zero


def fp8_supported(device: torch.device) -> bool:
    """FP8 tensor cores: NVIDIA compute capability 8.9 (Ada) and later."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def quantize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """``[M, K]`` -> e4m3 values and float32 scales ``[M, 1]`` with ``x ~ values * scales`` (one scale per row)."""
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=_TINY) / _FP8_MAX
    return (x.float() / scale).clamp(-_FP8_MAX, _FP8_MAX).to(FP8), scale


def silu_mul_rows(gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`quantize_rows` of the gated MLP's ``silu(gate) * up``: compiled, one pass that never writes the
    bf16 intermediate (the widest tensor of a layer) to memory."""
    return quantize_rows((F.silu(gate) * up).reshape(-1, gate.shape[-1]))


def fast_fp8_kernels() -> tuple[Callable[[Tensor], tuple[Tensor, Tensor]], Callable[..., tuple[Tensor, Tensor]]]:
    """:func:`quantize_rows` and :func:`silu_mul_rows` as Triton kernels on CUDA (core.model.fp8_triton), else
    compiled by ``torch.compile``."""
    if torch.cuda.is_available():
        try:
            from core.model import fp8_triton
        except ImportError:  # a CUDA build without Triton
            pass
        else:
            return fp8_triton.quantize_rows, fp8_triton.silu_mul_rows
    return torch.compile(quantize_rows, dynamic=True), torch.compile(silu_mul_rows, dynamic=True)


def _pointers(linears: list[nn.Module]) -> list[int]:
    return [m.weight.data_ptr() for m in linears] + [m.bias.data_ptr() for m in linears if m.bias is not None]


class Projection:
    """Several linears' weights (and biases) in one storage; each Linear's Parameters become slices of it."""

    def __init__(self, linears: list[nn.Linear]) -> None:
        if len(linears) == 1:  # nothing to fuse: share the weight as is
            self.weight, self.bias = linears[0].weight.data, linears[0].bias
        else:
            with torch.no_grad():
                self.weight = torch.cat([m.weight for m in linears])
                self.bias = None if linears[0].bias is None else torch.cat([m.bias for m in linears])
            offset = 0
            for m in linears:
                rows = slice(offset, offset + m.weight.shape[0])
                m.weight = nn.Parameter(self.weight[rows], requires_grad=m.weight.requires_grad)
                if self.bias is not None:
                    m.bias = nn.Parameter(self.bias[rows], requires_grad=m.bias.requires_grad)
                offset = rows.stop
        self.bounds = [0]
        for m in linears:
            self.bounds.append(self.bounds[-1] + m.weight.shape[0])
        self._pointers = _pointers(linears)
        self.fp8: tuple[Tensor, Tensor] | None = None  # e4m3 weight [N, K] and its scales [1, N], after to_fp8()
        self.quantize: Callable[[Tensor], tuple[Tensor, Tensor]] = quantize_rows  # compile_kernels() fuses it

    def usable(self, linears: list[nn.Module]) -> bool:
        """True while the modules still share this storage (no load re-assigned them) and need no gradient
        (the fused tensor is not a Parameter)."""
        if torch.is_grad_enabled() and any(m.weight.requires_grad for m in linears):
            return False
        return _pointers(linears) == self._pointers

    def takes_fp8(self, linears: list[nn.Module]) -> bool:
        """Whether inputs can come already quantised (:meth:`fp8_product`): FP8 on, usable, no LoRA update active
        (which needs the unquantised input)."""
        return self.fp8 is not None and self.usable(linears) and all(
            getattr(m, "lora_A", None) is None for m in linears
        )

    def to_fp8(self, linears: list[nn.Module]) -> None:
        """Replace the weight by an e4m3 copy with one float32 scale per output channel. The members' own weights
        are released (half the memory; inference only from now on: the plain modules can no longer run)."""
        with torch.no_grad():
            values, scales = quantize_rows(self.weight)
        self.fp8 = values, scales.view(1, -1)
        for m in linears:
            m.weight = nn.Parameter(values.new_empty(0, dtype=self.weight.dtype), requires_grad=False)
        self.weight = None
        self._pointers = _pointers(linears)

    def __call__(self, x: Tensor, linears: list[nn.Module]) -> Tensor:
        """All members' outputs side by side, each with its active LoRA update (``linears``: the current modules,
        LoRA wrappers included, in the order given at construction)."""
        x2d = x.reshape(-1, x.shape[-1])
        active = self._lora_members(linears)
        axs = self._low_rank_inputs(x2d, active)
        if self.fp8 is not None:
            out = self.fp8_product(*self.quantize(x2d), x.shape[:-1], x.dtype)
        elif active and axs is not None and self._update_first:
            return self._low_rank_then_base(x2d, active, axs).view(*x.shape[:-1], -1)
        else:
            out = F.linear(x, self.weight, self.bias)
        # added into each member's columns of an FP8 product's output, or of the base product's
        for (m, start, stop), ax in zip(active, axs or [None] * len(active), strict=True):
            m.add_low_rank_update_(x2d, out[..., start:stop].view(-1, stop - start), ax)
        return out

    @property
    def _update_first(self) -> bool:
        """Whether an active LoRA update is written before the base product, which then accumulates into it
        (:meth:`_low_rank_then_base`), rather than added after it: for outputs wider than the input and without a
        bias, i.e. gate/up. Adding gate/up's update afterwards reads and rewrites 620 MB a layer in a guided image
        step (0.56 ms on an H200, against 0.23 ms to write it first and +0.03 ms in the product that reads it). For
        down (output 5x narrower than the input) the accumulating product itself got 0.1 ms slower, more than
        the pass it saves; Q/K/V's bias would take a copy pass of its own."""
        return self.bias is None and self.weight is not None and self.weight.shape[0] > self.weight.shape[1]

    def _low_rank_then_base(
        self, x2d: Tensor, active: list[tuple[nn.Module, int, int]], axs: list[Tensor]
    ) -> Tensor:
        """Each member's scaled ``B A x`` (zero for a member the adapter leaves alone), then the base product
        accumulated into them in its epilogue, while it is compute-bound; ``[tokens, N]``."""
        out = x2d.new_empty(x2d.shape[0], self.weight.shape[0])
        for (m, start, stop), ax in zip(active, axs, strict=True):
            out[:, start:stop].addmm_(ax, m.lora_B.to(x2d.dtype).t(), beta=0, alpha=m.scaling)  # beta=0: not read
        updated = {start for _, start, _ in active}
        for start, stop in zip(self.bounds[:-1], self.bounds[1:], strict=True):
            if start not in updated:
                out[:, start:stop] = 0
        return out.addmm_(x2d, self.weight.t())

    def _low_rank_inputs(self, x2d: Tensor, active: list[tuple[nn.Module, int, int]]) -> list[Tensor] | None:
        """Each active member's ``A x`` ``[tokens, r]``: one product for all of them where :meth:`stack_lora`
        stacked their A factors. None where an update runs in another dtype (float32 factors on a lower-precision
        model): each member then makes its own."""
        if not all(m.accumulates_in(x2d.dtype, x2d) for m, _, _ in active):
            return None
        stacked = active[0][0].adapter.stacked.get(id(self)) if active and active[0][0].adapter else None
        if stacked is None:
            return [F.linear(x2d, m.lora_A.to(x2d.dtype)) for m, _, _ in active]
        return list(F.linear(x2d, stacked.to(x2d.dtype)).split([m.lora_A.shape[0] for m, _, _ in active], dim=1))

    def stack_lora(self, linears: list[nn.Module]) -> None:
        """Stack the A factors of the members' active adapter, kept with that adapter (a decode graph captured with
        it reads them), when two or more members have one: one ``A x`` product for all of them instead of one each.
        Call with no forward pass running."""
        active = self._lora_members(linears)
        adapter = active[0][0].adapter if active else None
        if len(active) > 1 and adapter is not None and all(m.adapter is adapter for m, _, _ in active):
            if id(self) not in adapter.stacked:
                adapter.stacked[id(self)] = torch.cat([m.lora_A for m, _, _ in active])

    def _lora_members(self, linears: list[nn.Module]) -> list[tuple[nn.Module, int, int]]:
        """The members with an active LoRA update, with their columns of the output."""
        return [(m, start, stop) for m, start, stop in zip(linears, self.bounds[:-1], self.bounds[1:], strict=True)
                if getattr(m, "lora_A", None) is not None]

    def fp8_product(self, values: Tensor, scales: Tensor, lead: torch.Size, dtype: torch.dtype) -> Tensor:
        """The product of row-quantised inputs ``values`` ``[M, K]`` (``scales`` ``[M, 1]``), shaped ``[*lead, N]``."""
        w, w_scales = self.fp8
        out = torch._scaled_mm(values, w.t(), scale_a=scales, scale_b=w_scales, bias=self.bias, out_dtype=dtype)
        return out.view(*lead, -1)


def run_projection(projection: Projection | None, linears: list[nn.Module], x: Tensor) -> Tensor:
    """The members' outputs side by side: through ``projection`` when it is usable, else the plain modules."""
    if projection is not None and projection.usable(linears):
        return projection(x, linears)
    outs = [m(x) for m in linears]
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
