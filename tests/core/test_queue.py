"""Queue positions: per Celery queue, oldest first, answerable at any moment."""

from __future__ import annotations

from sqlalchemy import update

from core.db import repositories as repo
from core.db.models import Job
from core.jobs import JobKind, JobState
from core.queue import position


def make_jobs(factory, *kinds: JobKind) -> list[int]:
    with factory.begin() as session:
        return [repo.create_job(session, kind, None).id for kind in kinds]


def test_positions_follow_the_queue(any_sessionmaker):
    chat1, image1, chat2, summary, chat3 = make_jobs(
        any_sessionmaker, JobKind.CHAT, JobKind.IMAGE, JobKind.CHAT, JobKind.SUMMARY, JobKind.CHAT
    )
    with any_sessionmaker() as session:
        assert [position(session, j) for j in (chat1, chat2, chat3)] == [1, 2, 3]
        assert [position(session, j) for j in (image1, summary)] == [1, 2]  # summaries share the image queue
    with any_sessionmaker.begin() as session:
        session.execute(update(Job).where(Job.id == chat1).values(state=JobState.RUNNING))
        session.execute(update(Job).where(Job.id == chat2).values(state=JobState.DONE))
    with any_sessionmaker() as session:
        assert position(session, chat1) is None and position(session, chat2) is None
        assert position(session, chat3) == 1
        assert position(session, 10_000) is None
