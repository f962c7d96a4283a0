"""The TRAIN job's runner: hand the claimed job to ``training.pipeline`` and complete it with the result.

Only train workers import the training stack (torch, the SFT loop), on their first train job. The worker owns the
Job row (claim, complete, fail); the pipeline owns the TrainingJob and the submission. The watch that stops
chat jobs stops training the same way: on cancel, on a takeover, or past ``settings.train_timeout_s``.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from workers.lifecycle import Claim, Watch, complete, emit

if TYPE_CHECKING:
    from workers.context import WorkerContext
    from workers.inference import FollowUp

__all__ = ["run_train"]


def run_train(ctx: WorkerContext, claim: Claim) -> list[FollowUp]:
    """Annotate, train and evaluate one character's adapter; the base model is the worker's shared one."""
    from training.pipeline import run_training  # heavy, and only train workers need it

    watch = Watch(ctx, claim, interval_s=5.0)
    result = run_training(
        claim.job_id,
        settings=ctx.settings,
        sessionmaker=ctx.sessionmaker,
        store=ctx.store,
        progress=functools.partial(emit, ctx, claim.job_id),  # onto the job's event stream
        load_model=ctx.model.get,
        check=watch.check,
    )
    complete(ctx, claim, None, result=result)
    return []
