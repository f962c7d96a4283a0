"""A worker serving chat and image keeps a thread for replies however many pictures are waiting."""

from __future__ import annotations

import threading

import pytest

from core.chat import JobQueued
from core.db.models import Job
from core.jobs import Done, ImageReady, JobKind, JobState
from core.streams import follow_sync
from tests.doubles import EchoModel
from tests.factories import add_character, incoming
from tests.integration.test_job_path import events_of, wait_for

pytestmark = pytest.mark.integration

THREADS = 4  # the session worker's thread pool (tests/conftest.py)


class SlowPictures(EchoModel):
    """Replies at once; every picture waits for ``release``."""

    def __init__(self, release: threading.Event) -> None:
        super().__init__()
        self.release = release

    def generate_image(self, contexts, params, on_progress=None, adapter=None):  # type: ignore[no-untyped-def]
        with self._lock:
            self.calls.append(("image started", None))
        self.release.wait(timeout=120)
        return super().generate_image(contexts, params, on_progress, adapter)


def test_a_reply_is_answered_while_pictures_fill_the_other_threads(live):
    release = threading.Event()
    live.use_model(SlowPictures(release))
    add_character(live.sessionmaker, "Furina")
    try:
        pictures = [live.service.handle(incoming(f"/imagine Furina, take {n}", user=f"p{n}", chat=f"p{n}"))
                    for n in range(THREADS + 1)]
        assert all(isinstance(p, JobQueued) and p.kind is JobKind.IMAGE for p in pictures)
        started = lambda: sum(kind == "image started" for kind, _ in live.model.calls)  # noqa: E731
        wait_for(lambda: started() >= THREADS - 1, "the pictures to fill all threads but one")

        reply = live.service.handle(incoming("are you there?", user="talker", chat="talker"))
        stream = follow_sync(live.ctx.redis, live.ctx.installation, reply.job_id, idle_timeout_s=20)
        events = [event for _id, event in stream]
        assert isinstance(events[-1], Done)  # answered while every picture still waits

        assert started() == THREADS - 1  # the last thread was never given to a picture
        with live.sessionmaker() as session:
            states = [session.get_one(Job, p.job_id).state for p in pictures]
        assert states.count(JobState.RUNNING) == THREADS - 1 and states.count(JobState.QUEUED) == 2
    finally:
        release.set()
    for picture in pictures:  # and the pictures all come, the waiting ones as threads free up
        assert any(isinstance(event, ImageReady) for event in events_of(live, picture.job_id))
