"""Re-send jobs the broker lost: queued too long, or running past their time limit with no live worker.

The job row is the truth; a Redis restart or flush loses tasks, never jobs. Each re-send moves ``queued_at``
forward with a conditional UPDATE, so several sweepers running at once send a job once per period. Re-sending a
job that is in fact still waiting only makes a duplicate delivery, which the worker ignores.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from typing import TYPE_CHECKING

from sqlalchemy import or_, select, update

from core.db.models import Job, utcnow
from core.jobs import JobKind, JobState

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

    from core.chat import Dispatch
    from core.config import Settings

__all__ = ["sweep_once", "run_sweeper"]

logger = logging.getLogger(__name__)


def sweep_once(
    sessionmaker: sessionmaker[Session], settings: Settings, dispatch: Dispatch, now: dt.datetime | None = None
) -> list[int]:
    """Re-send every lost job once; returns their ids."""
    now = now or utcnow()
    queued_before = now - dt.timedelta(seconds=settings.sweep_after_s)
    # a running job whose worker died without a redelivery: its message is gone, its timeout passed
    stale_chat = now - dt.timedelta(seconds=settings.job_timeout_s + settings.sweep_after_s)
    stale_train = now - dt.timedelta(seconds=settings.train_timeout_s + settings.sweep_after_s)
    lost = or_(
        (Job.state == JobState.QUEUED) & (Job.queued_at < queued_before),
        (Job.state == JobState.RUNNING)
        & (Job.queued_at < queued_before)
        & (Job.started_at < stale_chat)
        & (Job.kind != JobKind.TRAIN),
        (Job.state == JobState.RUNNING) & (Job.queued_at < queued_before) & (Job.started_at < stale_train),
    )
    sent: list[int] = []
    with sessionmaker() as session:
        candidates = session.execute(select(Job.id, Job.kind, Job.queued_at).where(lost).order_by(Job.id)).all()
    for job_id, kind, queued_at in candidates:
        with sessionmaker.begin() as session:
            won = session.execute(
                update(Job).where(Job.id == job_id, Job.queued_at == queued_at).values(queued_at=now)
            ).rowcount
        if not won:  # another sweeper took it
            continue
        try:
            dispatch(job_id, kind)
        except Exception:
            logger.warning("re-sending job %s failed; next sweep tries again", job_id, exc_info=True)
            continue
        sent.append(job_id)
    if sent:
        logger.info("re-sent %d lost jobs: %s", len(sent), sent)
    return sent


def run_sweeper(
    stop: threading.Event, sessionmaker: sessionmaker[Session], settings: Settings, dispatch: Dispatch
) -> None:
    """Sweep every ``settings.sweep_interval_s`` until ``stop`` is set (run it in a thread or a process)."""
    while not stop.is_set():
        try:
            sweep_once(sessionmaker, settings, dispatch)
        except Exception:  # a database hiccup must not end the loop
            logger.exception("sweep failed")
        stop.wait(settings.sweep_interval_s)
