"""Splitting, pacing, progress and mention safety of bots.render."""

from __future__ import annotations

import asyncio

import pytest

from bots.render import (
    EditPacer,
    RetryLater,
    defuse_mentions,
    format_eta,
    progress_text,
    split_text,
    strip_control,
    take_chunk,
    utf16_len,
)
from core.jobs import Progress


def test_utf16_len_counts_astral_characters_twice() -> None:
    assert utf16_len("abc") == 3
    assert utf16_len("😀") == 2
    assert utf16_len("é") == 1


def test_short_text_is_one_chunk_and_empty_text_none() -> None:
    assert split_text("  hello  ", 4096) == ["hello"]
    assert split_text("   ", 4096) == []


@pytest.mark.parametrize("limit", [64, 100, 4096])
def test_chunks_fit_and_keep_every_word(limit: int) -> None:
    text = " ".join(f"word{i}😀" for i in range(3000))
    chunks = split_text(text, limit, utf16_len)
    assert all(utf16_len(chunk) <= limit for chunk in chunks)
    assert " ".join(chunks).split() == text.split()


def test_prefers_paragraph_then_line_then_word() -> None:
    para = "a" * 60 + "\n\n" + "b " * 10 + "\n" + "c" * 30
    assert split_text(para, 100)[0] == "a" * 60
    line = "a" * 60 + "\n" + "b " * 30
    assert split_text(line, 100)[0] == "a" * 60
    words = "abc " * 40
    assert split_text(words, 100)[0].endswith("abc")


def test_never_splits_a_surrogate_pair() -> None:
    text = "🎉" * 100  # no boundaries at all: a hard cut
    chunks = split_text(text, 65, utf16_len)
    assert "".join(chunks) == text
    assert all(utf16_len(chunk) <= 65 for chunk in chunks)
    for chunk in chunks:
        chunk.encode("utf-16-le")  # strict: a lone surrogate would raise


def test_hard_cut_without_any_boundary() -> None:
    assert split_text("x" * 250, 100) == ["x" * 100, "x" * 100, "x" * 50]


def test_avoids_cutting_inline_code() -> None:
    text = "see " + "w " * 30 + "`some code span here` tail " * 3
    for chunk in split_text(text, 80):
        assert chunk.count("`") % 2 == 0


def test_fenced_block_is_closed_and_reopened() -> None:
    body = "\n".join(f"print({i})" for i in range(40))
    text = f"Intro.\n```python\n{body}\n```\nOutro."
    chunks = split_text(text, 120)
    assert len(chunks) > 2
    for chunk in chunks:
        assert len(chunk) <= 120
        assert chunk.count("```") % 2 == 0, chunk
    assert chunks[1].startswith("```python\n")
    lines = [line for chunk in chunks for line in chunk.splitlines() if line.startswith("print(")]
    assert lines == body.splitlines()


def test_limit_too_small_is_refused() -> None:
    with pytest.raises(ValueError):
        split_text("hello", 63)


class FakeClock:
    """A clock that moves only when the pacer sleeps."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


def test_pacer_coalesces_and_latest_text_wins() -> None:
    clock = FakeClock()
    edits: list[tuple[float, str]] = []

    async def edit(text: str) -> None:
        edits.append((clock.now, text))

    async def main() -> None:
        pacer = EditPacer(edit, 1.5, sent="a", clock=clock, sleep=clock.sleep)
        for text in ("ab", "abc", "abcd"):
            pacer.update(text)
        await pacer.flush()
        pacer.update("abcde")
        pacer.update("abcdef")
        await pacer.flush()
        assert pacer.sent == "abcdef"

    asyncio.run(main())
    assert [text for _, text in edits] == ["abcd", "abcdef"]
    times = [at for at, _ in edits]
    assert times[0] >= 1.5 and times[1] - times[0] >= 1.5


def test_pacer_skips_unchanged_text() -> None:
    clock = FakeClock()
    edits: list[str] = []

    async def edit(text: str) -> None:
        edits.append(text)

    async def main() -> None:
        pacer = EditPacer(edit, 1.0, sent="same", clock=clock, sleep=clock.sleep)
        pacer.update("same")
        await pacer.flush()

    asyncio.run(main())
    assert edits == []


def test_pacer_honours_retry_after() -> None:
    clock = FakeClock()
    edits: list[tuple[float, str]] = []
    refusals = [7.0]

    async def edit(text: str) -> None:
        if refusals:
            raise RetryLater(refusals.pop())
        edits.append((clock.now, text))

    async def main() -> None:
        pacer = EditPacer(edit, 1.0, clock=clock, sleep=clock.sleep)
        pacer.update("hello")
        await pacer.flush()

    asyncio.run(main())
    assert edits and edits[0][1] == "hello"
    assert edits[0][0] >= 8.0  # the first try at 1.0 s, then 7 s later


def test_pacer_reports_edit_errors_to_the_caller() -> None:
    clock = FakeClock()

    async def edit(text: str) -> None:
        raise RuntimeError("boom")

    async def main() -> None:
        pacer = EditPacer(edit, 1.0, clock=clock, sleep=clock.sleep)
        pacer.update("x")
        with pytest.raises(RuntimeError):
            await pacer.flush()

    asyncio.run(main())


def test_progress_text() -> None:
    assert "2 jobs ahead" in progress_text(Progress(stage="queued", position=3))
    assert "next" in progress_text(Progress(stage="queued", position=1))
    line = progress_text(Progress(stage="image", step=5, total=10, eta_s=30))
    assert "50%" in line and "30 s" in line
    assert "…" in progress_text(Progress(stage="image"))


def test_format_eta() -> None:
    assert format_eta(2) == "a few seconds"
    assert format_eta(40) == "40 s"
    assert format_eta(600) == "10 min"
    assert format_eta(3900) == "1 h 5 min"


def test_defuse_mentions() -> None:
    text = defuse_mentions("hi @everyone @here <@123> <@!4> <@&5> <#6> @bob a@b.c")
    assert "@everyone" not in text and "@here" not in text
    assert "<@123>" not in text and "<@&5>" not in text and "<#6>" not in text
    assert "@bob" in text and "a@b.c" in text


def test_take_chunk_streams_like_split() -> None:
    body = "\n".join(f"line {i} " + "x" * (i % 7) for i in range(200))
    text = f"Intro.\n```\n{body}\n```\n" + "tail words " * 50
    chunks, carry, offset = [], "", 0
    while True:
        source = carry + text[offset:]
        chunk, next_carry, used = take_chunk(source, 100)
        chunks.append(chunk)
        if used == len(source):
            break
        offset += used - len(carry)
        carry = next_carry
    assert chunks == split_text(text, 100)


def test_strip_control_keeps_lines_and_tabs() -> None:
    assert strip_control("a\x00b\tc\nd\x1b[0m") == "ab\tc\nd[0m"
