"""Statements run on the driver return what SQLAlchemy returns, on SQLite and PostgreSQL, in the caller's
transaction."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.orm import Session, sessionmaker

from core.db.models import Character, Job
from core.db.prepared import Prepared
from core.jobs import TERMINAL_STATES, JobKind, JobState

JOBS = Job.__table__.c
NEW_JOB = Prepared(insert(Job.__table__).returning(JOBS.id))
BY_IDS = (
    select(JOBS.id, JOBS.kind, JOBS.state, JOBS.params, JOBS.attempts, JOBS.created_at, JOBS.progress)
    .where(JOBS.id.in_(bindparam("ids", expanding=True)))
    .order_by(JOBS.id)
)
START_OPEN = (  # a literal list next to bound values
    update(Job.__table__)
    .where(JOBS.id == bindparam("job_id"), JOBS.state.not_in(list(TERMINAL_STATES)))
    .values(state=JobState.RUNNING, attempts=JOBS.attempts + 1, started_at=bindparam("now"))
)


def _new_job(session: Session, kind: JobKind = JobKind.CHAT, **values: object) -> int:
    return int(NEW_JOB.scalar(session, {"kind": kind, **values}))


def test_rows_are_what_sqlalchemy_returns(any_sessionmaker: sessionmaker[Session]) -> None:
    prepared = Prepared(BY_IDS)
    with any_sessionmaker.begin() as session:
        ids = [_new_job(session, JobKind.CHAT, params={"seed": 7, "tags": ["a"]}), _new_job(session, JobKind.IMAGE)]
        ids.append(_new_job(session, JobKind.SUMMARY, state=JobState.DONE, progress=1.0))
        for chosen in (ids, ids[:1], [ids[2], 10**9]):  # one compiled form per list length
            expected = session.execute(BY_IDS, {"ids": chosen}).all()
            got = prepared.all(session, {"ids": chosen})
            assert [tuple(row) for row in got] == [tuple(row) for row in expected]
    first = got[0]
    assert first.state is JobState.DONE and first.kind is JobKind.SUMMARY and first.progress == 1.0
    assert isinstance(first.created_at, dt.datetime)


def test_inserts_fill_python_defaults_and_return_the_id(any_sessionmaker: sessionmaker[Session]) -> None:
    with any_sessionmaker.begin() as session:
        job_id = _new_job(session)
    with any_sessionmaker() as session:
        job = session.get_one(Job, job_id)
        assert (job.state, job.attempts, job.params, job.result, job.progress) == (JobState.QUEUED, 0, {}, {}, 0.0)
        assert job.created_at is not None and job.queued_at is not None


def test_updates_count_rows_with_literal_lists(any_sessionmaker: sessionmaker[Session]) -> None:
    start = Prepared(START_OPEN)
    now = dt.datetime.now(dt.timezone.utc)
    with any_sessionmaker.begin() as session:
        open_id, done_id = _new_job(session), _new_job(session, state=JobState.DONE)
        assert start.rowcount(session, {"job_id": open_id, "now": now}) == 1
        assert start.rowcount(session, {"job_id": done_id, "now": now}) == 0
    with any_sessionmaker() as session:
        assert session.get_one(Job, open_id).state is JobState.RUNNING
        assert session.get_one(Job, open_id).attempts == 1
        assert session.get_one(Job, done_id).state is JobState.DONE


def test_runs_in_the_callers_transaction(any_sessionmaker: sessionmaker[Session]) -> None:
    with any_sessionmaker() as session:
        session.begin()
        job_id = _new_job(session)
        assert Prepared(BY_IDS).first(session, {"ids": [job_id]}) is not None
        session.rollback()
    with any_sessionmaker() as session:
        assert session.get(Job, job_id) is None


def test_pending_orm_changes_are_flushed_first(any_sessionmaker: sessionmaker[Session]) -> None:
    names = Prepared(select(Character.__table__.c.name).where(Character.__table__.c.name == bindparam("name")))
    with any_sessionmaker.begin() as session:
        session.add(Character(name="Pending", description="Not flushed yet."))
        assert names.scalar(session, {"name": "Pending"}) == "Pending"
        assert names.first(session, {"name": "Nobody"}) is None


def test_constants_are_written_into_the_sql_and_the_callers_values_stay_bound(
    any_sessionmaker: sessionmaker[Session],
) -> None:
    """A plan the server caches for the statement must know its constants (``state = 'queued'``), not guess them."""
    quoted = Prepared(
        select(JOBS.id)
        .where(JOBS.id == bindparam("job_id"), JOBS.error == "it's; DROP TABLE jobs", JOBS.state == JobState.FAILED)
        .limit(1)
    )
    with any_sessionmaker.begin() as session:
        job_id = _new_job(session, state=JobState.FAILED, error="it's; DROP TABLE jobs")
        other = _new_job(session, state=JobState.FAILED, error="its")
        assert quoted.scalar(session, {"job_id": job_id}) == job_id
        assert quoted.scalar(session, {"job_id": other}) is None
        dialect = session.get_bind().dialect
    form = quoted._shape(dialect, {"job_id": job_id}).form({"job_id": job_id})
    assert "'it''s; DROP TABLE jobs'" in form.sql and "'failed'" in form.sql and "LIMIT 1" in form.sql
    values = form.values({"job_id": job_id})
    bound = list(values.values() if isinstance(values, dict) else values)
    assert job_id in bound and "failed" not in bound and "it's; DROP TABLE jobs" not in bound
