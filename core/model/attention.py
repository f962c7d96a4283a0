"""One attention switch: flash-attn on CUDA when it is installed, PyTorch SDPA otherwise.

Layout is batched ``[B, H, L, D]``. Causal attention with fewer queries than keys is aligned bottom-right
(query i sees keys ``j <= Lk - Lq + i``), as flash-attn >= 2.1 does; image blocks and denoising queries are
non-causal. Rows of different context lengths are left-padded, so ``key_mask`` only ever hides keys.
Decoding's few-query path is a dozen small kernels per layer; :func:`compiled_attend` fuses it (GPU use).

Non-causal attention takes the query heads as the projections write them (``[B, L, H, D]`` memory, seen as
``[B, H, L, D]``) with SDPA's own GQA: cuDNN and flash read each K/V head for its group of query heads without
repeating it, and write the output in the query's layout, so it reaches ``o_proj`` with no copy. (Folding the group
into the query length, as before, needed head-major queries: a copy in and a copy out around every call.)
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

try:  # decided once, at import (karpathy/nanochat flash_attention.py)
    from flash_attn import flash_attn_func as _flash_attn_func
except ImportError:  # CPU machines and GPUs without the package
    _flash_attn_func = None

__all__ = ["HAS_FLASH_ATTN", "attend", "compiled_attend"]

HAS_FLASH_ATTN = _flash_attn_func is not None


def _flash(q: Tensor, k: Tensor, v: Tensor, causal: bool) -> Tensor:
    out = _flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal)
    return out.transpose(1, 2)


def _full(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None) -> Tensor:
    mask = None if key_mask is None else key_mask[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


def _causal(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None) -> Tensor:
    Lq, Lk = q.shape[2], k.shape[2]
    if Lq == Lk and key_mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    # bottom-right alignment: query i is the (Lk - Lq + i)-th key
    i = torch.arange(Lq, device=q.device)[:, None]
    j = torch.arange(Lk, device=q.device)[None, :]
    mask = (j <= i + (Lk - Lq))[None, None]
    if key_mask is not None:
        mask = mask & key_mask[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


def _scores(q: Tensor, k: Tensor) -> Tensor:
    """``q k^T`` in float32 (``[B, Hk, Lq, Lk]``). On a GPU with half-precision inputs the product runs on tensor
    cores with a float32 output, as flash-attn computes scores; casting the cache to float32 first cost more than
    the rest of a decoding step's attention."""
    if q.is_cuda and q.dtype != torch.float32:
        B, Hk, Lq, D = q.shape
        kt = k.transpose(-1, -2).reshape(B * Hk, D, -1)
        return torch.bmm(q.reshape(B * Hk, Lq, D), kt, out_dtype=torch.float32).view(B, Hk, Lq, -1)
    return q.float() @ k.float().transpose(-1, -2)


def _math(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None) -> Tensor:
    # Decoding: a handful of queries against a long cache is two batched GEMVs; fused kernels parallelise over
    # query blocks and would leave most of the GPU idle here. Scores and the softmax are float32; the weights meet
    # V in V's dtype with float32 accumulation, as in flash-attn.
    B, H, L, D = q.shape
    Hk = k.shape[1]
    scores = _scores(q.reshape(B, Hk, (H // Hk) * L, D), k) * D**-0.5  # [B, Hk, G*L, Lk]
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    return (scores.softmax(dim=-1).to(v.dtype) @ v).reshape(B, H, L, D)


def attend(
    q: Tensor, k: Tensor, v: Tensor, *, causal: bool, key_mask: Tensor | None = None,
    few_queries: Callable[[Tensor, Tensor, Tensor, Tensor | None], Tensor] = _math,
) -> Tensor:
    """Scaled dot-product attention with GQA; ``key_mask`` ``[B, Lk]`` is True for keys a row may see."""
    # q: [B, H, Lq, D]; k, v: [B, Hk, Lk, D]
    if _flash_attn_func is not None and q.is_cuda and key_mask is None and q.dtype != torch.float32:
        return _flash(q, k, v, causal)
    if causal and q.shape[2] > 1:
        return _causal(q, k, v, key_mask)
    if q.shape[2] == 1:
        return few_queries(q, k, v, key_mask)
    return _full(q, k, v, key_mask)


def compiled_attend() -> Callable[..., Tensor]:
    """:func:`attend` with the decoding path's casts, scale, mask and softmax fused by ``torch.compile``."""
    return functools.partial(attend, few_queries=torch.compile(_math, dynamic=True))
