"""A static KV cache, preallocated once per request and written in place (gpt-fast style).

The official ``NaiveCache`` reallocates and scatters the whole cache for every decoded token (STYLE.md); here each
forward writes its keys and values into a slice and reads a slice back. Rows are CFG branches (or parallel
samples); a row whose context is shorter is *left*-padded so that every row's next block starts at the same
position and a denoising query is written with one contiguous slice for all rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["CacheSpan", "KVCache"]


@dataclass(frozen=True, slots=True)
class CacheSpan:
    """Where one forward writes and reads: rows ``rows``, new K/V at ``write``, keys read from ``start`` to ``end``.

    ``write`` is an int for prefill, or a 1-element device tensor for decoding with static shapes (then ``end``
    is the capacity and ``key_mask`` hides the unwritten tail). ``key_mask`` ``[rows, end - start]`` is True
    for keys a row may see; None means all. ``row_starts`` gives each row's own first key instead (left-padded CFG
    rows): attention then runs per row on its slice, with no mask, so the fused kernels apply.
    """

    rows: slice
    start: int
    write: int | Tensor
    end: int
    key_mask: Tensor | None = None
    row_starts: tuple[int, ...] | None = None


class KVCache:
    """Keys (post-RoPE) and values of every layer: ``[layers, rows, kv_heads, capacity, head_dim]``."""

    def __init__(
        self, layers: int, rows: int, kv_heads: int, capacity: int, head_dim: int,
        dtype: torch.dtype, device: torch.device | str,
    ) -> None:
        shape = (layers, rows, kv_heads, capacity, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    @property
    def rows(self) -> int:
        return self.k.shape[1]

    def update(self, layer: int, span: CacheSpan, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write ``k, v`` ``[rows, kv_heads, L, head_dim]`` and return the keys and values to attend to."""
        kc, vc = self.k[layer, span.rows], self.v[layer, span.rows]
        if isinstance(span.write, Tensor):
            kc.index_copy_(2, span.write, k)
            vc.index_copy_(2, span.write, v)
        else:
            kc[:, :, span.write : span.write + k.shape[2]] = k
            vc[:, :, span.write : span.write + v.shape[2]] = v
        return kc[:, :, span.start : span.end], vc[:, :, span.start : span.end]

    def fan_out(self, src: int, src_start: int, dst: int, dst_start: int, length: int) -> None:
        """Copy ``length`` positions of row ``src`` into row ``dst``: one prefill shared by several CFG branches."""
        self.k[:, dst, :, dst_start : dst_start + length] = self.k[:, src, :, src_start : src_start + length]
        self.v[:, dst, :, dst_start : dst_start + length] = self.v[:, src, :, src_start : src_start + length]
