"""Per-job event streams in Redis: the worker appends, frontends follow from where they stopped.

Each job has one stream ``job:{id}`` (``core.jobs.stream_key``), capped in length and expiring
``settings.event_ttl_s`` after its last event, so that a frontend that restarts can resume from the last entry id
it rendered. Following ends after a ``Done`` or ``Failed`` event.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Final

from core.jobs import Done, Failed, JobEvent, decode_event, encode_event, stream_key

if TYPE_CHECKING:
    from redis import Redis
    from redis.asyncio import Redis as AsyncRedis

__all__ = ["MAX_EVENTS", "publish", "follow", "follow_sync", "is_final"]

MAX_EVENTS: Final = 10_000  # approximate cap; a reply streams a few hundred deltas
_BLOCK_MS: Final = 1_000


def is_final(event: JobEvent) -> bool:
    """Whether no event follows this one."""
    return isinstance(event, (Done, Failed))


def publish(redis: Redis, job_id: int, event: JobEvent, ttl_s: int = 3600) -> str:
    """Append ``event`` to the job's stream and push its expiry ``ttl_s`` ahead; returns the entry id."""
    key = stream_key(job_id)
    pipe = redis.pipeline(transaction=False)
    pipe.xadd(key, encode_event(event), maxlen=MAX_EVENTS, approximate=True)  # type: ignore[arg-type]
    pipe.expire(key, ttl_s)
    entry_id = pipe.execute()[0]
    return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)


class _Cursor:
    """Where a follower stands in one stream: the last entry id read and how long nothing came."""

    __slots__ = ("_idle_ms", "idle_timeout_s", "job_id", "last_id")

    def __init__(self, job_id: int, last_id: str, idle_timeout_s: float | None) -> None:
        self.job_id, self.last_id, self.idle_timeout_s, self._idle_ms = job_id, last_id, idle_timeout_s, 0

    def read_args(self) -> dict[str, object]:
        """Arguments of the next blocking XREAD."""
        return {"streams": {stream_key(self.job_id): self.last_id}, "block": _BLOCK_MS, "count": 100}

    def take(self, reply: object) -> list[tuple[str, JobEvent]]:
        """The (entry id, event) pairs of one XREAD reply; raises TimeoutError past the idle timeout."""
        out: list[tuple[str, JobEvent]] = []
        for _key, entries in reply or []:  # type: ignore[attr-defined]
            for entry_id, fields in entries:
                out.append((entry_id.decode() if isinstance(entry_id, bytes) else entry_id, decode_event(fields)))
        if out:
            self.last_id = out[-1][0]
        self._idle_ms = 0 if out else self._idle_ms + _BLOCK_MS
        if self.idle_timeout_s is not None and self._idle_ms >= self.idle_timeout_s * 1000:
            raise TimeoutError(f"no event for job {self.job_id} in {self.idle_timeout_s} s")
        return out


async def follow(
    redis: AsyncRedis, job_id: int, last_id: str = "0", idle_timeout_s: float | None = None
) -> AsyncIterator[tuple[str, JobEvent]]:
    """Yield the job's (entry id, event) pairs after ``last_id`` as they come, ending after Done/Failed.

    ``idle_timeout_s`` ends the iteration with TimeoutError when nothing arrives for that long.
    """
    cursor = _Cursor(job_id, last_id, idle_timeout_s)
    while True:
        for entry_id, event in cursor.take(await redis.xread(**cursor.read_args())):  # type: ignore[arg-type]
            yield entry_id, event
            if is_final(event):
                return


def follow_sync(
    redis: Redis, job_id: int, last_id: str = "0", idle_timeout_s: float | None = None
) -> Iterator[tuple[str, JobEvent]]:
    """The blocking twin of :func:`follow`, for threads and scripts."""
    cursor = _Cursor(job_id, last_id, idle_timeout_s)
    while True:
        for entry_id, event in cursor.take(redis.xread(**cursor.read_args())):  # type: ignore[arg-type]
            yield entry_id, event
            if is_final(event):
                return
