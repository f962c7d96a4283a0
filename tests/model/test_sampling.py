"""Next-token sampling: greedy, top-p, padding rows, per-request generators."""

from __future__ import annotations

import torch

from core.model.sampling import mask_padding_rows, sample_next


def test_greedy_is_argmax() -> None:
    logits = torch.tensor([[0.1, 3.0, 2.9, -1.0], [5.0, 0.0, 0.0, 0.0]])
    assert sample_next(logits, temperature=0.0).tolist() == [1, 0]


def test_top_p_keeps_only_the_nucleus() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    gen = torch.Generator().manual_seed(0)
    drawn = {int(sample_next(logits, temperature=1.0, top_p=0.7, generator=gen)) for _ in range(300)}
    assert drawn == {0, 1}  # 0.5 + 0.3 reaches 0.7; the tail is never drawn
    gen = torch.Generator().manual_seed(0)
    assert {int(sample_next(logits, temperature=1.0, top_p=0.01, generator=gen)) for _ in range(50)} == {0}


def test_sampling_follows_the_distribution_and_the_generator() -> None:
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]]))
    gen = torch.Generator().manual_seed(5)
    draws = torch.stack([sample_next(logits, temperature=1.0, generator=gen) for _ in range(4000)])
    freq = torch.bincount(draws.flatten(), minlength=3).float() / 4000
    assert torch.allclose(freq, torch.tensor([0.7, 0.2, 0.1]), atol=0.03)
    a = [int(sample_next(logits, temperature=1.0, generator=torch.Generator().manual_seed(9))) for _ in range(5)]
    b = [int(sample_next(logits, temperature=1.0, generator=torch.Generator().manual_seed(9))) for _ in range(5)]
    assert a == b


def test_padding_rows_are_never_chosen() -> None:
    logits = torch.zeros(1, 10)
    logits[0, 8] = 100.0  # an embedding row past the tokenizer's 6 tokens (MODEL.md 11.6)
    masked = mask_padding_rows(logits, 6)
    assert int(sample_next(masked, temperature=0.0)) < 6
    assert int(sample_next(masked, temperature=1.0, generator=torch.Generator().manual_seed(0))) < 6
