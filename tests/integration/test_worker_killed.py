"""A worker killed mid-job (SIGKILL): the broker hands the job out again and it completes exactly once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis import Redis
from sqlalchemy import select

from core.db.models import Job, Message
from core.jobs import Done, JobState, Progress, TextDelta
from core.streams import follow_sync
from tests.conftest import SCRATCH_DB, STREAM_DB, make_settings, redis_db
from tests.factories import add_character, incoming
from tests.integration.test_job_path import wait_for
from workers.celery_app import create_app
from workers.tasks import dispatcher

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def spawn(live, redis_url: str, tmp_path: Path) -> Iterator:
    """Starts worker processes on a broker database of their own; kills leftovers at the end."""
    broker = redis_db(redis_url, SCRATCH_DB)
    Redis.from_url(broker).flushdb()
    started: list[subprocess.Popen] = []

    def start(mode: str) -> subprocess.Popen:
        args = [live.settings.sql_url, broker, redis_db(redis_url, STREAM_DB), str(tmp_path), mode]
        log = open(tmp_path / f"worker-{mode}-{len(started)}.log", "wb")  # noqa: SIM115 - closed with the process
        process = subprocess.Popen(
            [sys.executable, "-m", "tests.integration.worker_proc", *args], cwd=ROOT, stdout=log, stderr=log
        )
        started.append(process)
        return process

    yield start
    for process in started:  # nothing of theirs is left to finish: stop them at once
        process.kill()
        process.wait(timeout=30)
    Redis.from_url(broker).flushdb()


def test_killed_worker_job_is_redelivered_and_completed_once(live, spawn, redis_url, tmp_path):
    add_character(live.sessionmaker)
    sender = create_app(make_settings(tmp_path / "sender", redis_url=redis_db(redis_url, SCRATCH_DB)))
    live.service.dispatch = dispatcher(live.ctx.installation, sender)
    outcome = live.service.handle(incoming("survive this"))

    first = spawn("block")

    def attempts() -> int:
        with live.sessionmaker() as session:
            return session.get(Job, outcome.job_id).attempts

    wait_for(lambda: attempts() == 1, "the first worker to start the job", limit_s=120)
    os.kill(first.pid, signal.SIGKILL)
    first.wait(timeout=30)

    spawn("echo")
    stream = follow_sync(live.ctx.redis, live.ctx.installation, outcome.job_id, idle_timeout_s=120)
    events = [event for _id, event in stream]
    assert isinstance(events[-1], Done)
    assert any(isinstance(e, Progress) and e.stage == "retry" for e in events)
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == "echo: survive this"
    with live.sessionmaker() as session:
        job = session.get(Job, outcome.job_id)
        replies = session.scalars(select(Message).where(Message.role == "character")).all()
    assert (job.state, job.attempts) == (JobState.DONE, 2)
    assert [r.id for r in replies] == [job.reply_message_id]
