"""Queue position of a job, answerable at any moment from the job rows alone (the broker is not asked)."""

from __future__ import annotations

from sqlalchemy import bindparam, func, select
from sqlalchemy.orm import Session

from core.db.models import Job
from core.jobs import QUEUE_OF_KIND, JobState

__all__ = ["position", "kinds_of_queue"]


def kinds_of_queue(queue: str) -> list[str]:
    """The job kinds (by value) that share the Celery queue ``queue``."""
    return [kind.value for kind, name in QUEUE_OF_KIND.items() if name == queue]


_AHEAD = (
    select(func.count())
    .select_from(Job)
    .where(
        Job.state == JobState.QUEUED,
        Job.kind.in_(bindparam("kinds", expanding=True)),
        Job.id < bindparam("job_id"),
    )
)


def position(session: Session, job_id: int) -> int | None:
    """1-based place of a queued job among queued jobs of its queue (oldest first); None when not queued."""
    job = session.get(Job, job_id)
    if job is None or job.state is not JobState.QUEUED:
        return None
    ahead = session.scalar(_AHEAD, {"kinds": kinds_of_queue(QUEUE_OF_KIND[job.kind]), "job_id": job.id})
    return int(ahead or 0) + 1
