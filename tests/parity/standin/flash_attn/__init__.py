"""A stand-in for the ``flash_attn`` package, used only to run the official BAGEL code on CPU for parity tests.

The official modules import ``flash_attn_varlen_func`` at module level (MODEL.md 11.9). This gives the same
semantics on PyTorch SDPA: packed ``[tokens, heads, dim]`` inputs split by ``cu_seqlens``, GQA, and causal masks
aligned bottom-right when a segment has fewer queries than keys (as flash-attn >= 2.1). Like flash-attn it
accumulates in float32 and returns the input dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["flash_attn_varlen_func"]


def flash_attn_varlen_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    **_: object,
) -> torch.Tensor:
    """Attention per segment; ``q`` ``[Tq, Hq, D]``, ``k``/``v`` ``[Tk, Hk, D]`` with ``Hq % Hk == 0``."""
    out = torch.empty_like(q)
    group = q.shape[1] // k.shape[1]
    bq, bk = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for qs, qe, ks, ke in zip(bq[:-1], bq[1:], bk[:-1], bk[1:]):
        qi = q[qs:qe].float().transpose(0, 1)  # [Hq, Lq, D]
        ki = k[ks:ke].float().transpose(0, 1).repeat_interleave(group, dim=0)
        vi = v[ks:ke].float().transpose(0, 1).repeat_interleave(group, dim=0)
        mask = None
        if causal:
            lq, lk = qe - qs, ke - ks
            rows = torch.arange(lq)[:, None]
            mask = torch.arange(lk)[None, :] <= rows + (lk - lq)
        res = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, scale=softmax_scale)
        out[qs:qe] = res.transpose(0, 1).to(q.dtype)
    return out
