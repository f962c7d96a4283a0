"""A job's life in the worker: claim it, watch it while the model runs, then complete or fail it exactly once.

Delivery is at-least-once, effects are exactly-once. ``claim`` moves the row to running with one conditional
UPDATE that also counts the attempt, so two deliveries racing for a queued job produce one winner. A running job
is taken over only by a redelivery (its worker died: Redis re-sent the unacknowledged message) or once it has run
past its timeout. ``complete`` writes the reply and marks the job done in one transaction guarded by the attempt
number, so an attempt that was overtaken writes nothing.

Statements run on the jobs table through SQLAlchemy Core, built once (the ORM's bulk UPDATE path costs several
times the statement). Events of one moment go to the job's stream in one round trip; text deltas are gathered
for at most ``DELTA_INTERVAL_S`` (``Deltas``) and whatever is left goes out with Done.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy import bindparam, select, update

from core.db import repositories as repo
from core.db.models import Job, utcnow
from core.db.prepared import Prepared
from core.db.session import reading, single_statements
from core.jobs import TERMINAL_STATES, Done, Failed, JobEvent, JobKind, JobState, Progress, TextDelta
from core.streams import publish_all

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from sqlalchemy import Connection
    from sqlalchemy.orm import Session

    from workers.context import WorkerContext

__all__ = [
    "Claim",
    "JobError",
    "Stop",
    "Superseded",
    "Cancelled",
    "TimedOut",
    "Watch",
    "Deltas",
    "DELTA_INTERVAL_S",
    "claim",
    "complete",
    "fail",
    "emit",
]

logger = logging.getLogger(__name__)


class JobError(Exception):
    """A failure the user should hear about as is: ``str(error)`` is the message shown."""


class Stop(Exception):
    """Raised from a model callback to stop the work; the subclass says why."""


class Superseded(Stop):
    """Another attempt owns the job now; this one must write nothing."""


class Cancelled(Stop):
    """The user cancelled the job."""


class TimedOut(Stop):
    """The job ran past its time limit."""


@dataclass(frozen=True, slots=True)
class Claim:
    """A job this worker thread now runs, as plain data (no ORM object crosses threads)."""

    job_id: int
    kind: JobKind
    attempt: int
    user_id: int | None
    conversation_id: int | None
    request_message_id: int | None
    params: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)


# Statements built once (building one costs about as much as running it); the callers bind the values.
_JOBS = Job.__table__.c
_OWNED = (_JOBS.id == bindparam("job_id"), _JOBS.state == JobState.RUNNING, _JOBS.attempts == bindparam("attempt"))
_CLAIM = (
    update(Job.__table__)
    .where(_JOBS.id == bindparam("job_id"), _JOBS.state == bindparam("was"), _JOBS.attempts == bindparam("had"))
    .values(state=JobState.RUNNING, attempts=bindparam("attempt"), started_at=bindparam("now"), error=None)
)
_GIVE_UP = (
    update(Job.__table__)
    .where(_JOBS.id == bindparam("job_id"))
    .values(state=JobState.FAILED, error=bindparam("error"), finished_at=bindparam("now"))
)
_COMPLETE = Prepared(
    update(Job.__table__)
    .where(*_OWNED)
    .values(
        state=JobState.DONE,
        reply_message_id=bindparam("reply_id"),
        result=bindparam("result"),
        progress=1.0,
        finished_at=bindparam("now"),
    )
)
_FAIL = (
    update(Job.__table__)
    .where(*_OWNED)
    .values(state=JobState.FAILED, error=bindparam("error"), finished_at=bindparam("now"))
)
_STATE = select(_JOBS.state, _JOBS.attempts).where(_JOBS.id == bindparam("job_id"))
_CLAIMABLE = select(  # the columns a claim reads
    _JOBS.kind, _JOBS.state, _JOBS.attempts, _JOBS.started_at, _JOBS.user_id, _JOBS.conversation_id,
    _JOBS.request_message_id, _JOBS.params,
).where(_JOBS.id == bindparam("job_id"))
_CLAIM_QUEUED = Prepared(  # the usual case in one statement: a queued job becomes running, its attempt counted
    update(Job.__table__)
    .where(_JOBS.id == bindparam("job_id"), _JOBS.state == JobState.QUEUED)
    .values(state=JobState.RUNNING, attempts=_JOBS.attempts + 1, started_at=bindparam("now"), error=None)
    .returning(_JOBS.kind, _JOBS.attempts, _JOBS.user_id, _JOBS.conversation_id, _JOBS.request_message_id, _JOBS.params)
)
DELTA_INTERVAL_S = 0.05  # text deltas are gathered this long at most: one stream entry, not one per token


def timeout_s(ctx: WorkerContext, kind: JobKind) -> int:
    """The time limit of a job of ``kind``."""
    return ctx.settings.train_timeout_s if kind is JobKind.TRAIN else ctx.settings.job_timeout_s


def _aware(moment: dt.datetime | None) -> dt.datetime | None:
    """SQLite hands back naive datetimes; every stored time is UTC."""
    return moment.replace(tzinfo=dt.timezone.utc) if moment is not None and moment.tzinfo is None else moment


def emit(ctx: WorkerContext, job_id: int, *events: JobEvent) -> None:
    """Publish ``events`` on the job's stream, in one round trip."""
    publish_all(ctx.redis, ctx.installation, job_id, events, ctx.settings.event_ttl_s)


def claim(ctx: WorkerContext, job_id: int, redelivered: bool = False) -> Claim | None:
    """Start an attempt at the job, or None when there is nothing to do (missing, finished, or running elsewhere)."""
    now = utcnow()
    with single_statements(ctx.sessionmaker) as connection:  # each statement is atomic: one conditional UPDATE
        claimed = _CLAIM_QUEUED.first(connection, {"job_id": job_id, "now": now})
        if claimed is not None:
            attempt, job = claimed.attempts, claimed
        else:
            job, attempt = _claim_other(ctx, connection, job_id, redelivered, now)
            if job is None:
                return None
        result = Claim(
            job_id, job.kind, attempt, job.user_id, job.conversation_id, job.request_message_id, dict(job.params)
        )
        exhausted = attempt > ctx.settings.max_attempts
        if exhausted:
            connection.execute(
                _GIVE_UP, {"job_id": job_id, "error": f"gave up after {attempt - 1} attempts", "now": now}
            )
    if exhausted:
        logger.warning("job %s: gave up after %s attempts", job_id, attempt - 1)
        emit(ctx, job_id, Failed("Sorry, this request failed several times and was given up. Please try again."))
        return None
    if attempt > 1:  # an earlier attempt may have streamed part of a reply: frontends start over
        emit(ctx, job_id, Progress(stage="retry", step=attempt))
    return result


def _claim_other(
    ctx: WorkerContext, connection: Connection, job_id: int, redelivered: bool, now: dt.datetime
) -> tuple[Any, int]:
    """A job that was not queued: (its row, the new attempt) when this delivery takes it over, else (None, 0)."""
    job = connection.execute(_CLAIMABLE, {"job_id": job_id}).one_or_none()
    if job is None or job.state in TERMINAL_STATES:
        logger.info("job %s: nothing to do (%s)", job_id, job.state.value if job else "missing")
        cancelled = job is not None and job.state is JobState.CANCELLED
        if cancelled and job.started_at is None:  # cancelled while queued: close its stream for followers
            emit(ctx, job_id, Failed("Cancelled."))
        return None, 0
    started = _aware(job.started_at)
    stale = started is not None and now - started > dt.timedelta(seconds=timeout_s(ctx, job.kind))
    if job.state is JobState.RUNNING and not (redelivered or stale):
        logger.info("job %s: already running (attempt %s); duplicate delivery ignored", job_id, job.attempts)
        return None, 0
    attempt = job.attempts + 1
    won = connection.execute(
        _CLAIM, {"job_id": job_id, "was": job.state, "had": job.attempts, "attempt": attempt, "now": now}
    ).rowcount
    if won != 1:
        logger.info("job %s: claimed by another delivery", job_id)
        return None, 0
    return job, attempt


class Watch:
    """Called from model callbacks: raises Stop when the job was cancelled, taken over, or ran out of time."""

    __slots__ = ("ctx", "claim", "deadline", "_next_check", "interval_s")

    def __init__(self, ctx: WorkerContext, claim: Claim, interval_s: float = 0.5) -> None:
        self.ctx, self.claim, self.interval_s = ctx, claim, interval_s
        self.deadline = claim.started + timeout_s(ctx, claim.kind)
        self._next_check = claim.started + interval_s  # claimed just now: the row needs no look yet

    def check(self) -> None:
        """Look at the job row at most every ``interval_s``; raise Stop when the work should end."""
        now = time.monotonic()
        if now > self.deadline:
            raise TimedOut(f"job {self.claim.job_id} ran past {timeout_s(self.ctx, self.claim.kind)} s")
        if now < self._next_check:
            return
        self._next_check = now + self.interval_s
        with reading(self.ctx.sessionmaker) as session:
            row = session.execute(_STATE, {"job_id": self.claim.job_id}).one_or_none()
        if row is None or row.state is JobState.CANCELLED:
            raise Cancelled(f"job {self.claim.job_id} was cancelled")
        if row.state is not JobState.RUNNING or row.attempts != self.claim.attempt:
            raise Superseded(f"job {self.claim.job_id} attempt {self.claim.attempt} was overtaken")


class Deltas:
    """A reply's text pieces on their way to the stream: sent at once when ``DELTA_INTERVAL_S`` has passed since
    the last send, else gathered; ``rest`` hands what is left to go out with Done.

    A model streams a token every few milliseconds; an entry (and a frontend's read) per token costs more than the
    token. The first piece always goes out at once: the user sees the reply start as soon as the model does.
    """

    __slots__ = ("_next_send", "_pending", "clock", "ctx", "job_id")

    def __init__(self, ctx: WorkerContext, job_id: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.ctx, self.job_id, self.clock = ctx, job_id, clock
        self._pending: list[str] = []
        self._next_send = float("-inf")

    def add(self, piece: str) -> None:
        """Queue ``piece``; send everything queued when the interval has passed."""
        self._pending.append(piece)
        now = self.clock()
        if now >= self._next_send:
            emit(self.ctx, self.job_id, *self.rest())
            self._next_send = now + DELTA_INTERVAL_S

    def rest(self) -> list[JobEvent]:
        """What was not sent yet, as at most one delta; the queue is emptied."""
        text, self._pending = "".join(self._pending), []
        return [TextDelta(text)] if text else []


def complete(
    ctx: WorkerContext,
    claim: Claim,
    text: str | None,
    image_keys: Sequence[str] = (),
    result: dict[str, Any] | None = None,
    before_done: Sequence[JobEvent] = (),
    write: Callable[[Session, int | None], None] | None = None,
) -> int | None:
    """Store the reply and mark the job done in one transaction, then publish ``before_done`` and Done together.

    ``text=None`` stores no reply message; ``write(session, reply message id)`` adds the job's other effects to
    the same transaction.
    Returns the reply message id; raises Cancelled or Superseded (writing nothing) when this attempt no longer
    owns the job.
    """
    with ctx.sessionmaker.begin() as session:
        message_id = None
        if claim.conversation_id is not None and text is not None:  # None: the conversation is gone
            message_id = repo.insert_message(session, claim.conversation_id, "character", text, image_keys)
        owned = {"job_id": claim.job_id, "attempt": claim.attempt}
        values = {"reply_id": message_id, "result": dict(result or {}), "now": utcnow()}
        done = _COMPLETE.rowcount(session, {**owned, **values})
        if done != 1:
            state = session.scalar(select(_JOBS.state).where(_JOBS.id == claim.job_id))
            if state is None or state is JobState.CANCELLED:
                raise Cancelled(f"job {claim.job_id} was cancelled before it completed")
            raise Superseded(f"job {claim.job_id} attempt {claim.attempt} lost its claim before completing")
        if write is not None:  # after the claim held: nothing is written for a job that is gone
            write(session, message_id)
    emit(ctx, claim.job_id, *before_done, Done(message_id))
    return message_id


def fail(ctx: WorkerContext, claim: Claim, error: str, user_message: str) -> bool:
    """Mark the attempt's job failed with ``error`` and tell the user; False when the attempt lost its claim."""
    with ctx.sessionmaker.begin() as session:
        failed = session.execute(
            _FAIL, {"job_id": claim.job_id, "attempt": claim.attempt, "error": error[:2000], "now": utcnow()}
        ).rowcount
    if failed:
        emit(ctx, claim.job_id, Failed(user_message))
    return bool(failed)
