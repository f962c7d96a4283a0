"""The sweeper re-sends lost jobs once per period and leaves healthy ones alone."""

from __future__ import annotations

import datetime as dt
import threading

from sqlalchemy import update

from core.db.models import Job, utcnow
from core.jobs import JobKind, JobState
from tests.factories import incoming
from workers.sweeper import run_sweeper, sweep_once


def later(settings, seconds: int = 1) -> dt.datetime:
    return utcnow() + dt.timedelta(seconds=settings.sweep_after_s + seconds)


def test_only_jobs_queued_too_long_are_resent(ctx, service):
    job_id = service.handle(incoming("hello")).job_id
    resent: list = []
    assert sweep_once(ctx.sessionmaker, ctx.settings, lambda *a: resent.append(a)) == []  # still fresh
    assert sweep_once(ctx.sessionmaker, ctx.settings, lambda *a: resent.append(a), now=later(ctx.settings)) == [job_id]
    assert resent == [(job_id, JobKind.CHAT)]
    # queued_at moved forward: the next sweep in the same period sends nothing
    assert sweep_once(ctx.sessionmaker, ctx.settings, lambda *a: resent.append(a), now=later(ctx.settings)) == []


def test_done_and_running_jobs_are_not_resent(ctx, service):
    done = service.handle(incoming("a")).job_id
    running = service.handle(incoming("b")).job_id
    with ctx.sessionmaker.begin() as session:
        session.execute(update(Job).where(Job.id == done).values(state=JobState.DONE))
        session.execute(update(Job).where(Job.id == running).values(state=JobState.RUNNING, started_at=utcnow()))
    assert sweep_once(ctx.sessionmaker, ctx.settings, lambda *a: None, now=later(ctx.settings)) == []


def test_a_running_job_whose_worker_vanished_is_resent(ctx, service):
    job_id = service.handle(incoming("a")).job_id
    with ctx.sessionmaker.begin() as session:
        session.execute(update(Job).where(Job.id == job_id).values(state=JobState.RUNNING, started_at=utcnow()))
    beyond = later(ctx.settings, ctx.settings.job_timeout_s + 1)
    assert sweep_once(ctx.sessionmaker, ctx.settings, lambda *a: None, now=beyond) == [job_id]


def test_a_failing_resend_is_tried_again(ctx, service):
    job_id = service.handle(incoming("a")).job_id

    def broken(*_args):
        raise ConnectionError("broker down")

    assert sweep_once(ctx.sessionmaker, ctx.settings, broken, now=later(ctx.settings)) == []
    assert sweep_once(ctx.sessionmaker, ctx.settings, lambda *a: None, now=later(ctx.settings, 200)) == [job_id]


def test_the_loop_sweeps_until_stopped(ctx, service):
    job_id = service.handle(incoming("a")).job_id
    with ctx.sessionmaker.begin() as session:
        session.execute(update(Job).where(Job.id == job_id).values(queued_at=utcnow() - dt.timedelta(days=1)))
    stop, resent = threading.Event(), []

    def dispatch(sent_id, _kind):
        resent.append(sent_id)
        stop.set()

    thread = threading.Thread(target=run_sweeper, args=(stop, ctx.sessionmaker, ctx.settings, dispatch))
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive() and resent == [job_id]
