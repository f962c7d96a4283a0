"""Attention over a packed training sequence: the official masking rules, run by flex_attention or SDPA.

Notable:
- A packed batch carries four per-token vectors (sample, block, kind, sequence index) rather than an ``[L, L]``
  mask: packing stays O(L) on the CPU and nothing quadratic crosses to the GPU. :func:`dense_mask` builds the
  mask on the device once per step, the same code for SDPA, flex (padded) and the tests.
- On CUDA, ``flex_attention`` (compiled once per padded length) skips the key blocks a query block cannot see
  (other samples, hidden noise) and takes GQA without repeating K/V; SDPA with a dense boolean mask computes every
  score and needs K/V repeated. The sequence is padded to a multiple of :data:`PAD_MULTIPLE` so a run compiles a
  handful of kernels, not one per step; each padding token sees only itself and no real token sees it.
- Elsewhere (CPU tests, CI) SDPA runs: flex_attention has no backward on the CPU.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

__all__ = ["CAUSAL", "FULL", "NOISE", "PAD_MULTIPLE", "PackedAttention", "dense_mask"]

CAUSAL, FULL, NOISE = 0, 1, 2  # block kinds
PAD_MULTIPLE = 1024


def dense_mask(tokens: Tensor, length: int | None = None) -> Tensor:
    """``[length, length]`` bool, True where a query (row) may attend a key (column).

    ``tokens`` ``[4, L]`` holds each token's sample, block, kind and index in the unpermuted sequence. Text is
    causal, image blocks are bidirectional inside, every block sees the earlier blocks of its own sample, and
    noised targets are invisible to every later block. Rows and columns past ``L`` are padding tokens that see
    only themselves.
    """
    pad = (length or tokens.shape[1]) - tokens.shape[1]
    if pad:
        own = -1 - torch.arange(pad, device=tokens.device)  # a sample and a block of its own per padding token
        tokens = torch.cat([tokens, torch.stack([own, own, torch.full_like(own, FULL), torch.zeros_like(own)])], 1)
    (sample_q, block_q, kind_q, index_q), (sample_k, block_k, kind_k, index_k) = tokens[:, :, None], tokens[:, None]
    earlier = (block_k < block_q) & (kind_k != NOISE)
    inside = (block_k == block_q) & ((kind_q != CAUSAL) | (index_k <= index_q))
    return (sample_q == sample_k) & (earlier | inside)


@functools.cache
def _compiled_flex() -> Callable[..., Tensor]:
    return torch.compile(flex_attention, dynamic=False)  # one kernel per padded length (PAD_MULTIPLE)


class PackedAttention:
    """One step's attention function ``(q [1, H, L, D], k, v [1, Hk, L, D]) -> [1, H, L, D]``.

    ``backend``: ``flex``, ``sdpa``, or ``auto`` (flex on CUDA, else SDPA). The mask is built once per step and
    shared by every layer (and by the recomputation of checkpointed layers). Flex on the CPU runs unfused and
    forward-only (parity tests).
    """

    def __init__(self, tokens: Tensor, backend: str = "auto") -> None:
        if backend == "auto":
            backend = "flex" if tokens.is_cuda else "sdpa"
        if backend not in ("flex", "sdpa"):
            raise ValueError(f"unknown attention backend {backend!r}")
        self.backend, self.length = backend, tokens.shape[1]
        if backend == "sdpa":
            self.dense = dense_mask(tokens)
            return
        self.padded = -(-self.length // PAD_MULTIPLE) * PAD_MULTIPLE
        dense = dense_mask(tokens, self.padded)
        self.block_mask = create_block_mask(
            lambda b, h, q, kv: dense[q, kv], None, None, self.padded, self.padded, device=dense.device
        )
        self.flex = _compiled_flex() if tokens.is_cuda else flex_attention

    def __call__(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        if self.backend == "sdpa":
            # K/V repeated to all heads: SDPA's memory-efficient kernel takes an arbitrary mask but not GQA
            groups = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=self.dense[None, None])
        pad = (0, 0, 0, self.padded - self.length)
        out = self.flex(*(F.pad(t, pad) for t in (q, k, v)), block_mask=self.block_mask, enable_gqa=True)
        return out[:, :, : self.length]
