"""Per-job event streams in Redis: the worker appends, frontends follow from where they stopped.

Each job has one stream ``job:{namespace}:{id}`` (``core.jobs.stream_key``), capped in length and expiring
``settings.event_ttl_s`` after its last event, so that a frontend that restarts can resume from the last entry id
it rendered. Following ends after a ``Done`` or ``Failed`` event. The namespace is the database's installation
token (``core.db.installation``): job ids start again at 1 in a database made again, and its frontends must not
replay the streams of the old one's jobs while those expire.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Final, TypeAlias

from redis.exceptions import NoScriptError

from core.jobs import Done, Failed, JobEvent, decode_event, encode_event, stream_key

if TYPE_CHECKING:
    from redis import Redis
    from redis.asyncio import Redis as AsyncRedis

__all__ = [
    "MAX_EVENTS",
    "Follow",
    "publish",
    "publish_all",
    "run_script",
    "follow",
    "follow_sync",
    "follower",
    "is_final",
]

MAX_EVENTS: Final = 10_000  # approximate cap; a reply streams a few hundred deltas
_BLOCK_MS: Final = 1_000


def is_final(event: JobEvent) -> bool:
    """Whether no event follows this one."""
    return isinstance(event, (Done, Failed))


def publish(redis: Redis, namespace: str, job_id: int, event: JobEvent, ttl_s: int = 3600) -> str:
    """Append ``event`` to the job's stream and push its expiry ``ttl_s`` ahead; returns the entry id."""
    return publish_all(redis, namespace, job_id, [event], ttl_s)


# XADD each event, then push the expiry ahead: one command, atomic, so a blocked XREAD wakes once for them all
# (after each command of a pipeline it would wake and read them one by one)
_APPEND: Final = """
local id
for i = 3, #ARGV do id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'e', ARGV[i]) end
redis.call('EXPIRE', KEYS[1], ARGV[2])
return id
"""
_DIGESTS: dict[str, str] = {}  # Lua source -> SHA1, computed once


def run_script(redis: Redis, source: str, keys: Sequence[str], args: Sequence[object]) -> Any:
    """Run the Lua ``source`` by its digest (one command), loading it first on a server that lacks it."""
    digest = _DIGESTS.get(source) or _DIGESTS.setdefault(source, hashlib.sha1(source.encode()).hexdigest())
    try:
        return redis.evalsha(digest, len(keys), *keys, *args)  # type: ignore[arg-type]
    except NoScriptError:  # a new or restarted server
        redis.script_load(source)
        return redis.evalsha(digest, len(keys), *keys, *args)  # type: ignore[arg-type]


def publish_all(redis: Redis, namespace: str, job_id: int, events: Sequence[JobEvent], ttl_s: int = 3600) -> str:
    """Append ``events`` in order in one round trip and push the expiry ahead; returns the last entry id."""
    args = (MAX_EVENTS, ttl_s, *(encode_event(event)["e"] for event in events))
    entry_id = run_script(redis, _APPEND, [stream_key(namespace, job_id)], args)
    return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)


class _Cursor:
    """Where a follower stands in one stream: the last entry id read and how long nothing came."""

    __slots__ = ("_idle_ms", "idle_timeout_s", "job_id", "key", "last_id")

    def __init__(self, namespace: str, job_id: int, last_id: str, idle_timeout_s: float | None) -> None:
        self.key, self.job_id, self.last_id = stream_key(namespace, job_id), job_id, last_id
        self.idle_timeout_s, self._idle_ms = idle_timeout_s, 0

    def read_args(self) -> dict[str, object]:
        """Arguments of the next blocking XREAD."""
        return {"streams": {self.key: self.last_id}, "block": _BLOCK_MS, "count": 100}

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
    redis: AsyncRedis, namespace: str, job_id: int, last_id: str = "0", idle_timeout_s: float | None = None
) -> AsyncIterator[tuple[str, JobEvent]]:
    """Yield the job's (entry id, event) pairs after ``last_id`` as they come, ending after Done/Failed.

    ``idle_timeout_s`` ends the iteration with TimeoutError when nothing arrives for that long.
    """
    cursor = _Cursor(namespace, job_id, last_id, idle_timeout_s)
    while True:
        for entry_id, event in cursor.take(await redis.xread(**cursor.read_args())):  # type: ignore[arg-type]
            yield entry_id, event
            if is_final(event):
                return


def follow_sync(
    redis: Redis, namespace: str, job_id: int, last_id: str = "0", idle_timeout_s: float | None = None
) -> Iterator[tuple[str, JobEvent]]:
    """The blocking twin of :func:`follow`, for threads and scripts."""
    cursor = _Cursor(namespace, job_id, last_id, idle_timeout_s)
    while True:
        for entry_id, event in cursor.take(redis.xread(**cursor.read_args())):  # type: ignore[arg-type]
            yield entry_id, event
            if is_final(event):
                return


Follow: TypeAlias = Callable[[int, str], AsyncIterator[tuple[str, JobEvent]]]
"""A bot's way to read a job's events: (job id, last entry id rendered) -> the events after it."""


def follower(redis: AsyncRedis, namespace: str, idle_timeout_s: float) -> Follow:
    """:func:`follow` bound to one database's streams, ending with TimeoutError after ``idle_timeout_s`` of quiet."""

    def follow_job(job_id: int, last_id: str) -> AsyncIterator[tuple[str, JobEvent]]:
        return follow(redis, namespace, job_id, last_id, idle_timeout_s=idle_timeout_s)

    return follow_job
