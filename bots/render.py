"""Platform-neutral rendering shared by every frontend: splitting, pacing of edits, progress text, mention safety.

Notable:

- Lengths are measured by a function the platform picks: Telegram counts UTF-16 code units (4096 per message),
  Discord counts characters (2000). Cuts fall on a paragraph, line or word boundary when one exists in the back
  half of the window, never inside a surrogate pair, and outside markdown code when possible; a fenced block that
  must be cut is closed and reopened so that both halves still render as code.
- :class:`EditPacer` turns a stream of "the message should now read X" into edits no faster than one per interval;
  the latest text wins, a platform's "retry after N seconds" pushes the next edit back, and ``flush`` sends the
  final text.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable
from typing import Final

from core.jobs import Progress

__all__ = [
    "DISCORD_LIMIT",
    "TELEGRAM_LIMIT",
    "EditPacer",
    "LengthFn",
    "RetryLater",
    "defuse_mentions",
    "format_eta",
    "stopping",
    "progress_text",
    "split_text",
    "strip_control",
    "take_chunk",
    "utf16_len",
]

log = logging.getLogger(__name__)

LengthFn = Callable[[str], int]

TELEGRAM_LIMIT: Final = 4096  # UTF-16 code units of one text message
DISCORD_LIMIT: Final = 2000  # characters of one message's content

_FENCE: Final = re.compile(r"^[ \t]*(```|~~~)([^\n]{0,16})$", re.MULTILINE)
_INLINE: Final = re.compile(r"`[^`\n]+`")


_CONTROL: Final = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def strip_control(text: str) -> str:
    """``text`` without control characters (NUL and friends) that platforms refuse or show as boxes."""
    return _CONTROL.sub("", text)


def utf16_len(text: str) -> int:
    """Length in UTF-16 code units, the unit of Telegram's limits and entity offsets."""
    return len(text.encode("utf-16-le")) // 2


def _fit(text: str, limit: int, length: LengthFn) -> int:
    """The longest prefix (in code points) whose length is within ``limit``; code points never split pairs."""
    if length(text) <= limit:
        return len(text)
    lo, hi = 0, len(text)
    while lo < hi:  # binary search: length() is monotone in the prefix
        mid = (lo + hi + 1) // 2
        if length(text[:mid]) <= limit:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _code_regions(text: str) -> tuple[list[tuple[int, int, str]], list[tuple[int, int]]]:
    """Fenced blocks as (start, end, opening line) and inline code spans as (start, end), by code-point index."""
    fences: list[tuple[int, int, str]] = []
    opened: re.Match[str] | None = None
    for match in _FENCE.finditer(text):
        if opened is None:
            opened = match
        elif match.group(1) == opened.group(1) and not match.group(2).strip():
            fences.append((opened.start(), match.end(), opened.group(0).strip()))
            opened = None
    if opened is not None:  # unclosed: runs to the end of the text
        fences.append((opened.start(), len(text), opened.group(0).strip()))
    inline = [
        (m.start(), m.end())
        for m in _INLINE.finditer(text)
        if not any(start <= m.start() < end for start, end, _ in fences)
    ]
    return fences, inline


def _inside(pos: int, regions: list[tuple[int, int]]) -> bool:
    return any(start < pos < end for start, end in regions)


def _best_cut(text: str, end: int, avoid: list[tuple[int, int]]) -> int | None:
    """A cut before ``end``: the last paragraph, line or word boundary in the window's back half outside ``avoid``."""
    floor = end // 2
    for separator in ("\n\n", "\n", " "):
        pos = text.rfind(separator, floor, end)
        while pos > floor:
            if not _inside(pos, avoid):
                return pos
            pos = text.rfind(separator, floor, pos)
    return None


def take_chunk(text: str, limit: int, length: LengthFn = len) -> tuple[str, str, int]:
    """The first chunk of ``text`` within ``limit``, the prefix to put before the rest, and the code points used.

    Streaming callers keep only (offset, carry): the next chunk starts at ``carry + text[used:]``.
    """
    if limit < 64:  # room for a fence to close and reopen, with progress on every chunk
        raise ValueError("limit must leave room for a fenced block's closing and opening lines")
    lead = len(text) - len(text.lstrip())
    rest = text[lead:]
    end = _fit(rest, limit, length)
    if not rest[end:].strip():
        return rest.rstrip(), "", len(text)
    fences, inline = _code_regions(rest)
    fences = [fence for fence in fences if fence[0] < end]
    if fences:  # a block may have to be closed in this chunk: keep room for the closing fence
        end = _fit(rest, limit - length("\n```"), length)
    spans = [(start, stop) for start, stop, _ in fences]
    cut = _best_cut(rest, end, spans + inline)
    if cut is None:
        cut = _best_cut(rest, end, inline) or end
    opening = next((line for start, stop, line in fences if start < cut < stop), None)
    if opening is None:
        return rest[:cut].rstrip(), "", lead + cut
    # Close the block here and reopen it in the next chunk, so that both halves render as code.
    skip = len(rest[cut:]) - len(rest[cut:].lstrip("\n"))
    return rest[:cut].rstrip() + "\n" + opening[:3], opening + "\n", lead + cut + skip


def split_text(text: str, limit: int, length: LengthFn = len) -> list[str]:
    """``text`` as chunks each within ``limit`` by ``length``, cut at natural boundaries; empty text gives []."""
    chunks: list[str] = []
    rest = text
    while rest.strip():
        chunk, carry, used = take_chunk(rest, limit, length)
        chunks.append(chunk)
        rest = carry + rest[used:]
    return [chunk for chunk in chunks if chunk]


class RetryLater(Exception):
    """A platform asked us to wait ``retry_after`` seconds before the next call (HTTP 429 or flood wait)."""

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"retry after {retry_after:g} s")
        self.retry_after = retry_after


def stopping() -> bool:
    """Whether the running task was asked to stop (a cancellation some await turned into another exception)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


class EditPacer:
    """Coalesces edits of one message: at most one per ``interval`` seconds, the latest text wins."""

    __slots__ = ("_clock", "_edit", "_error", "_interval", "_next_at", "_pending", "_sent", "_sleep", "_task")

    def __init__(
        self,
        edit: Callable[[str], Awaitable[None]],
        interval: float,
        *,
        sent: str = "",
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._edit = edit
        self._interval = interval
        self._clock = clock
        self._sleep = sleep
        self._pending = sent
        self._sent = sent
        self._next_at = clock() + interval  # the message was just created with ``sent``
        self._task: asyncio.Task[None] | None = None
        self._error: BaseException | None = None

    @property
    def sent(self) -> str:
        """The text the message shows now."""
        return self._sent

    def update(self, text: str) -> None:
        """Ask for the message to read ``text``; returns at once, the edit happens when the pace allows."""
        self._raise_pending_error()
        self._pending = text
        if text != self._sent and (self._task is None or self._task.done()):
            self._task = asyncio.create_task(self._run())

    async def flush(self) -> None:
        """Send the latest text now-or-when-allowed and wait until the message shows it."""
        if self._task is not None:
            await self._task
        self._raise_pending_error()
        if self._pending != self._sent:
            await self._run()
            self._raise_pending_error()

    async def cancel(self) -> None:
        """Stop without sending what is pending (the message is being replaced)."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                if stopping():
                    raise  # the caller itself is being cancelled: not the edit task's cancellation to swallow

    def _raise_pending_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    async def _run(self) -> None:
        try:
            while self._pending != self._sent:
                wait = self._next_at - self._clock()
                if wait > 0:
                    await self._sleep(wait)
                text = self._pending
                try:
                    await self._edit(text)
                except RetryLater as exc:
                    log.info("edit paced back by %.1f s", exc.retry_after)
                    self._next_at = self._clock() + max(exc.retry_after, self._interval)
                    continue
                self._sent = text
                self._next_at = self._clock() + self._interval
        except Exception as exc:  # noqa: BLE001 - surfaced to the caller on its next update() or flush()
            self._error = exc


def format_eta(seconds: float) -> str:
    """A short human duration: 'a few seconds', '40 s', '3 min', '1 h 5 min'."""
    if seconds < 5:
        return "a few seconds"
    if seconds < 90:
        return f"{round(seconds)} s"
    minutes = round(seconds / 60)
    if minutes < 60:
        return f"{minutes} min"
    return f"{minutes // 60} h {minutes % 60} min"


def progress_text(progress: Progress, *, what: str = "your picture") -> str:
    """A one-line status for a job: its queue position, or its percent done and time left."""
    if progress.stage == "queued":
        if progress.position is not None and progress.position > 1:
            ahead = progress.position - 1
            line = f"⏳ In the queue: {ahead} {'job' if ahead == 1 else 'jobs'} ahead of {what}"
        else:
            line = f"⏳ {what.capitalize()} is next in the queue"
    elif progress.total > 0:
        percent = min(100, max(0, round(100 * progress.step / progress.total)))
        filled = percent // 10
        verb = "Drawing" if progress.stage == "image" else "Working on"
        line = f"🎨 {verb} {what}: {'▰' * filled}{'▱' * (10 - filled)} {percent}%"
    else:
        line = f"🎨 Working on {what}…"
    if progress.eta_s is not None and progress.eta_s > 0:
        line += f" (about {format_eta(progress.eta_s)} left)"
    return line


_MENTION: Final = re.compile(r"@(?=(everyone|here)\b)|<(?=[@#][!&]?\d+>)")


def defuse_mentions(text: str) -> str:
    """``text`` with mass mentions and raw user/role/channel mentions broken by a zero-width space."""
    return _MENTION.sub(lambda m: m.group(0) + "\u200b", text)
