"""Celery tasks, kept thin: a task carries a job id and hands the job to its runner.

Job ids are only unique within one database, so every job message is headed with the database's installation
token (``core.db.installation``) and a worker runs only its own database's messages: a message left in Redis by a
database made again, or sent by another installation sharing the Redis database, is dropped with a warning.

The attempt cap lives in the job row (``workers.lifecycle.claim``), so it holds across broker restarts and
sweeper re-sends. Failures the user should hear about become a Failed event and a failed row; nothing is retried
by Celery itself (a redelivery after a worker died is the broker's doing, and is counted).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Final

from core.chat import Dispatch
from core.jobs import QUEUE_OF_KIND, Failed, JobKind
from workers.celery_app import app
from workers.context import WorkerContext, get_context
from workers.inference import FollowUp, run_chat, run_image, run_summary
from workers.lifecycle import Cancelled, Claim, JobError, Superseded, TimedOut, claim, emit, fail
from workers.training_runner import run_train

__all__ = ["INSTALLATION_HEADER", "RUNNERS", "run_job", "dispatcher", "execute"]

logger = logging.getLogger(__name__)

INSTALLATION_HEADER: Final = "unichar_installation"

RUNNERS: Final[dict[JobKind, Callable[[WorkerContext, Claim], list[FollowUp]]]] = {
    JobKind.CHAT: run_chat,
    JobKind.IMAGE: run_image,
    JobKind.SUMMARY: run_summary,
    JobKind.TRAIN: run_train,
}


def dispatcher(installation: str) -> Dispatch:
    """``core.chat.Dispatch`` for the database named ``installation``: each job to its kind's queue, headed with
    the token. Call it after the job row is committed."""
    headers = {INSTALLATION_HEADER: installation}

    def dispatch(job_id: int, kind: JobKind) -> None:
        run_job.apply_async((job_id,), queue=QUEUE_OF_KIND[kind], headers=headers)

    return dispatch


def execute(ctx: WorkerContext, job_id: int, redelivered: bool = False, send: Dispatch | None = None) -> None:
    """Run one delivery of a job: claim, run, complete or fail; duplicates and finished jobs do nothing.

    Jobs the runner queued (a rolling summary after a reply) are sent with ``send`` (default: to this worker's
    broker, headed with its database's token) after its commit.
    """
    send = send or dispatcher(ctx.installation)
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
            send(follow_id, kind)
        except Exception:  # the row is queued: the sweeper sends it later
            logger.warning("dispatching follow-up job %s failed", follow_id, exc_info=True)


@app.task(name="unichar.run_job", bind=True, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def run_job(self, job_id: int) -> None:  # type: ignore[no-untyped-def]
    """Run the job ``job_id``; a redelivery (its first worker died) may take over a running job."""
    ctx = get_context()
    sender = (self.request.headers or {}).get(INSTALLATION_HEADER)
    if sender != ctx.installation:
        logger.warning(
            "job message %s is for database %s, not this worker's %s (a database made again, or another installation"
            " on this Redis database): not run",
            job_id,
            sender,
            ctx.installation,
        )
        return
    redelivered = bool((self.request.delivery_info or {}).get("redelivered"))
    execute(ctx, int(job_id), redelivered)
