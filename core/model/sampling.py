"""Next-token choice: greedy, temperature, top-p; randomness from a per-request ``torch.Generator``.

Everything stays on the device: no ``.item()`` here (the decode loop makes its one marked read per step).
Sampling uses the exponential-race trick (argmax of ``p / Exp(1)``), which equals multinomial sampling without
its host synchronisation (gpt-fast ``multinomial_sample_one_no_sync``).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["mask_padding_rows", "sample_next"]


def mask_padding_rows(logits: Tensor, vocab_used: int) -> Tensor:
    """Hide embedding rows past the tokenizer's size: they are padding, never real tokens (MODEL.md 11.6)."""
    if logits.shape[-1] > vocab_used:
        logits[..., vocab_used:] = float("-inf")
    return logits


def _top_p_filter(probs: Tensor, top_p: float) -> Tensor:
    """Zero all but the smallest set of tokens whose probability mass reaches ``top_p``."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of strictly more likely tokens
    sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)
    return torch.zeros_like(probs).scatter_(-1, order, sorted_probs)


def sample_next(
    logits: Tensor, *, temperature: float, top_p: float = 1.0, generator: torch.Generator | None = None
) -> Tensor:
    """One token id per row of ``logits`` ``[B, V]`` (float32); ``temperature <= 0`` is greedy."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        probs = _top_p_filter(probs, top_p)
    race = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return (probs / race).argmax(dim=-1)
