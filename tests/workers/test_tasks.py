"""A worker runs only its own database's job messages: the token ``workers.tasks.dispatcher`` heads them with."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
from sqlalchemy import select

from core.db.models import Job
from core.jobs import JobState
from tests.factories import incoming
from workers.context import WorkerContext, install_context
from workers.tasks import INSTALLATION_HEADER, run_job


@pytest.fixture
def installed(ctx: WorkerContext) -> Iterator[WorkerContext]:
    """``ctx`` as this process's worker context, for the task itself."""
    install_context(ctx)
    yield ctx
    install_context(None)


def _state(ctx: WorkerContext, job_id: int) -> JobState:
    with ctx.sessionmaker() as session:
        return session.scalars(select(Job.state).where(Job.id == job_id)).one()


def test_a_job_message_runs_only_for_its_own_database(installed, service, caplog) -> None:
    """Job ids start again at 1 in a database made again: the old one's message for job 1 is not this job 1's."""
    job_id = service.handle(incoming("hello")).job_id
    with caplog.at_level(logging.WARNING, logger="workers.tasks"):
        for headers in ({INSTALLATION_HEADER: "0ld0ld0ld0ld0ld0"}, {}):  # another database's; an unheaded one
            run_job.apply((job_id,), headers=headers)
            assert _state(installed, job_id) is JobState.QUEUED
    assert caplog.text.count("not this worker's") == 2
    run_job.apply((job_id,), headers={INSTALLATION_HEADER: installed.installation})
    assert _state(installed, job_id) is JobState.DONE
