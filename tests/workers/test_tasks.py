"""Job messages live under their database's broker prefix: installations sharing a Redis database, or a database
made again, never take each other's jobs (job ids restart at 1 in every database)."""

from __future__ import annotations

from pathlib import Path

import pytest
from redis import Redis
from sqlalchemy import select

from core.db.models import Job
from core.jobs import JobKind, JobState
from tests.conftest import BROKER_DB, SCRATCH_DB, make_settings, redis_db
from tests.factories import add_character, incoming
from tests.integration.test_job_path import wait_for
from workers.celery_app import broker_prefix, create_app, use_installation
from workers.tasks import dispatcher

OLD = "0ld0ld0ld0ld0ld0"


def test_each_database_sends_under_its_own_prefix(redis_url: str, tmp_path: Path) -> None:
    url = redis_db(redis_url, SCRATCH_DB)
    broker = Redis.from_url(url)
    broker.flushdb()
    try:
        for token in ("aaaaaaaaaaaaaaaa", "bbbbbbbbbbbbbbbb"):
            dispatcher(token, create_app(make_settings(tmp_path / token, redis_url=url)))(1, JobKind.CHAT)
        for token in ("aaaaaaaaaaaaaaaa", "bbbbbbbbbbbbbbbb"):
            assert broker.llen(f"{broker_prefix(token)}chat") == 1
        assert broker.llen("chat") == 0
    finally:
        broker.flushdb()


def test_an_app_serves_one_database(tmp_path: Path) -> None:
    app = create_app(make_settings(tmp_path))
    use_installation(app, OLD)
    use_installation(app, OLD)  # the same one again: nothing changes
    with pytest.raises(RuntimeError, match="already sends under"):
        use_installation(app, "aaaaaaaaaaaaaaaa")


def _state(live, job_id: int) -> JobState:
    with live.sessionmaker() as session:
        return session.scalars(select(Job.state).where(Job.id == job_id)).one()


@pytest.mark.integration
def test_a_worker_leaves_another_databases_message_alone(live, redis_url: str, tmp_path: Path) -> None:
    """Another installation's message for the same job id, sent first, stays in its own queue."""
    add_character(live.sessionmaker)
    url = redis_db(redis_url, BROKER_DB)  # the running worker's broker
    own = live.service.dispatch
    live.service.dispatch = lambda *_job: None  # the job row only
    job_id = live.service.handle(incoming("hello")).job_id
    dispatcher(OLD, create_app(make_settings(tmp_path, redis_url=url)))(job_id, JobKind.CHAT)
    own(job_id, JobKind.CHAT)
    wait_for(lambda: _state(live, job_id) is JobState.DONE, "the job's own message to run it")
    broker = Redis.from_url(url)
    assert broker.llen(f"{broker_prefix(OLD)}chat") == 1
    broker.delete(f"{broker_prefix(OLD)}chat")
