"""Pipelined decoding and incremental detokenising give exactly what one-by-one stepping and full decoding give."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Sequence

import pytest
import torch
from torch import Tensor

from core.model.api import Segment, TextParams, TextSegment
from core.model.decode import TextStream
from core.model.runtime import UniCharacterRuntime
from core.model.sampling import mask_padding_rows, sample_next
from core.model.tokenizer import BagelTokenizer

CONTEXT = [TextSegment("Tell me about the sea, héllo 日本語 🙂")]
PARAMS = [TextParams(max_new_tokens=24, temperature=0.0, seed=0)] + [
    TextParams(max_new_tokens=24, temperature=t, top_p=p, seed=s)
    for s, (t, p) in enumerate([(1.0, 1.0), (1.3, 0.9), (0.7, 1.0), (2.0, 0.8)], start=1)
]


def _prepare(rt: UniCharacterRuntime, context: Sequence[Segment], params: TextParams) -> Callable[[Tensor], Tensor]:
    """Prefill ``context`` and start the decoder as ``generate_text`` does; the request's sampler."""
    gen = rt._generator(params.seed)
    blocks = rt._blocks(context, gen, {})
    length = sum(b.length for b in blocks)
    rope = rt._prefill(blocks, rt._decoder.reserve(length + 1 + params.max_new_tokens), row=0, offset=0)
    rt._decoder.start(length, rt.tokenizer.special.bos, rope)
    return lambda logits: sample_next(mask_padding_rows(logits, rt.tokenizer.size), temperature=params.temperature,
                                      top_p=params.top_p, generator=gen)


def _stepwise(
    rt: UniCharacterRuntime, context: Sequence[Segment], params: TextParams, stop: int | None
) -> tuple[list[int], str, list[str]]:
    """The reference: read each token before launching the next step, decode all ids every step."""
    sample = _prepare(rt, context, params)
    ids: list[int] = []
    streamed, pieces = "", []
    for _ in range(params.max_new_tokens):
        nxt = sample(rt._decoder.step())
        if int(nxt) == stop:
            break
        ids.append(int(nxt))
        rt._decoder.advance(nxt)
        text = rt.tokenizer.decode(ids)
        if not text.endswith("\ufffd") and text.startswith(streamed) and text != streamed:
            pieces.append(text[len(streamed):])
            streamed = text
    final = rt.tokenizer.decode(ids)
    assert final.startswith(streamed)
    if final != streamed:
        pieces.append(final[len(streamed):])
    return ids, final, pieces


def _pipelined(rt: UniCharacterRuntime, params: TextParams, stop: int | None) -> list[int]:
    return list(rt._decoder.tokens(_prepare(rt, CONTEXT, params), params.max_new_tokens, stop=stop))


@pytest.mark.parametrize("params", PARAMS)
def test_pipelined_tokens_equal_stepwise_with_and_without_a_stop(runtime: UniCharacterRuntime,
                                                                 params: TextParams) -> None:
    with torch.inference_mode():
        full, _, _ = _stepwise(runtime, CONTEXT, params, stop=None)
        assert _pipelined(runtime, params, stop=None) == full
        for at in (0, 5, len(full) - 1):  # the stop as the first, a middle and the last token
            expected, _, _ = _stepwise(runtime, CONTEXT, params, stop=full[at])
            assert expected == full[: full.index(full[at])]
            assert _pipelined(runtime, params, stop=full[at]) == expected


class _StopAt:
    """The tiny tokenizer with another stop id; prompts still encode with the real one's special tokens."""

    def __init__(self, tokenizer: BagelTokenizer, eos: int) -> None:
        self._tokenizer = tokenizer
        self.special = dataclasses.replace(tokenizer.special, eos=eos)

    def __getattr__(self, name: str) -> object:
        return getattr(self._tokenizer, name)


@pytest.mark.parametrize("params", PARAMS)
@pytest.mark.parametrize("stop_at", [None, 0, 7])
def test_reply_and_streamed_pieces_equal_stepwise(runtime: UniCharacterRuntime, monkeypatch: pytest.MonkeyPatch,
                                                  params: TextParams, stop_at: int | None) -> None:
    with torch.inference_mode():
        full, _, _ = _stepwise(runtime, CONTEXT, params, stop=None)
    if stop_at is not None:
        monkeypatch.setattr(runtime, "tokenizer", _StopAt(runtime.tokenizer, full[stop_at]))
    with torch.inference_mode():
        ids, text, pieces = _stepwise(runtime, CONTEXT, params, stop=runtime.tokenizer.special.eos)
    stop = runtime.tokenizer.special.eos  # without stop_at, the real <|im_end|> (seed 1 samples it)
    assert ids == (full[: full.index(stop)] if stop in full else full)
    got: list[str] = []
    assert runtime.generate_text(CONTEXT, params, on_text=got.append) == text
    assert got == pieces
    assert "".join(got) == text
    assert runtime.generate_text(CONTEXT, params) == text


def _stream_reference(decode: Callable[[list[int]], str], ids: list[int]) -> list[str]:
    """Pieces as decoding all ids at every token yields them (what ``TextStream`` must reproduce)."""
    streamed, pieces = "", []
    for n in range(1, len(ids) + 1):
        text = decode(ids[:n])
        if not text.endswith("\ufffd") and text.startswith(streamed) and text != streamed:
            pieces.append(text[len(streamed):])
            streamed = text
    if decode(ids) != streamed:
        pieces.append(decode(ids)[len(streamed):])
    return pieces


def _stream(decode: Callable[[list[int]], str], ids: list[int]) -> tuple[list[str], str]:
    stream = TextStream(decode)
    pieces = [p for p in map(stream.push, ids) if p]
    rest = stream.flush()
    return pieces + ([rest] if rest else []), stream.text


def test_text_stream_splits_multibyte_characters_exactly(runtime: UniCharacterRuntime) -> None:
    tok = runtime.tokenizer
    ids = tok.encode("héllo 日本語 🙂 ok, ça va? ") + [tok.special.bos] + tok.encode("€") + tok.encode("😀")[:2]
    assert any(tok.decode([i]).endswith("\ufffd") for i in ids)  # characters do span tokens here
    pieces, text = _stream(tok.decode, ids)
    assert pieces == _stream_reference(tok.decode, ids)
    assert text == "".join(pieces) == tok.decode(ids)
    assert text.endswith("\ufffd")  # the cut emoji comes out at the end, as full decoding shows it


@pytest.mark.parametrize("seed", range(6))
def test_text_stream_equals_full_decoding_on_random_ids(runtime: UniCharacterRuntime, seed: int) -> None:
    tok = runtime.tokenizer
    rng = random.Random(seed)
    ids = [rng.randrange(tok.size) for _ in range(300)]  # random bytes, merges and special tokens alike
    pieces, text = _stream(tok.decode, ids)
    assert pieces == _stream_reference(tok.decode, ids)
    assert text == tok.decode(ids)
