"""Celery tasks, kept thin: a task carries a job id and hands the job to its runner.

Job ids are only unique within one database: a dispatcher sends, and a worker takes, only the messages under its
database's broker prefix (``workers.celery_app.use_installation``).

The attempt cap lives in the job row (``workers.lifecycle.claim``), so it holds across broker restarts and
sweeper re-sends. Failures the user should hear about become a Failed event and a failed row; nothing is retried
by Celery itself (a redelivery after a worker died is the broker's doing, and is counted).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Final

from celery import Celery

from core.chat import Dispatch
from core.jobs import QUEUE_OF_KIND, Failed, JobKind
from workers.celery_app import app, use_installation
from workers.context import WorkerContext, get_context
from workers.inference import FollowUp, run_chat, run_image, run_summary
from workers.lifecycle import Cancelled, Claim, JobError, Superseded, TimedOut, claim, emit, fail
from workers.training_runner import run_train

__all__ = ["RUNNERS", "run_job", "dispatcher", "execute"]

logger = logging.getLogger(__name__)

RUNNERS: Final[dict[JobKind, Callable[[WorkerContext, Claim], list[FollowUp]]]] = {
    JobKind.CHAT: run_chat,
    JobKind.IMAGE: run_image,
    JobKind.SUMMARY: run_summary,
    JobKind.TRAIN: run_train,
}


def dispatcher(installation: str, celery: Celery = app) -> Dispatch:
    """``core.chat.Dispatch`` for the database named ``installation``: each job to its kind's queue, under the
    database's prefix (this binds ``celery`` to it). Send a job only once its row is committed."""
    use_installation(celery, installation)

    def dispatch(job_id: int, kind: JobKind) -> None:
        celery.send_task(run_job.name, (job_id,), queue=QUEUE_OF_KIND[kind])

    return dispatch


def execute(ctx: WorkerContext, job_id: int, redelivered: bool = False) -> None:
    """Run one delivery of a job: claim, run, complete or fail; duplicates and finished jobs do nothing.

    Jobs the runner queued (a rolling summary after a reply) are sent with ``ctx.dispatch`` after its commit.
    """
    work = claim(ctx, job_id, redelivered)
    if work is None:
        return
    runner = RUNNERS.get(work.kind)
    try:
        if runner is None:
            raise LookupError(f"no runner for {work.kind.value} jobs in this worker")
        follow_ups = runner(ctx, work)
    except Superseded:
        logger.info("job %s attempt %s was overtaken; its result is dropped", job_id, work.attempt)
        return
    except Cancelled:
        logger.info("job %s was cancelled", job_id)
        emit(ctx, job_id, Failed("Cancelled."))
        return
    except (JobError, TimedOut) as error:
        message = str(error) if isinstance(error, JobError) else "Sorry, this took too long and was stopped."
        fail(ctx, work, f"{type(error).__name__}: {error}", message)
        return
    except Exception as error:
        logger.exception("job %s attempt %s failed", job_id, work.attempt)
        fail(ctx, work, f"{type(error).__name__}: {error}", "Sorry, something went wrong. Please try again.")
        return
    for follow_id, kind in follow_ups:
        try:
            ctx.dispatch(follow_id, kind)
        except Exception:  # the row is queued: the sweeper sends it later
            logger.warning("dispatching follow-up job %s failed", follow_id, exc_info=True)


@app.task(name="unichar.run_job", bind=True, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def run_job(self, job_id: int) -> None:  # type: ignore[no-untyped-def]
    """Run the job ``job_id``; a redelivery (its first worker died) may take over a running job."""
    redelivered = bool((self.request.delivery_info or {}).get("redelivered"))
    execute(get_context(), int(job_id), redelivered)
