"""The whole job path with real services: ChatService -> SQL + Redis broker -> Celery worker -> stream -> SQL."""

from __future__ import annotations

import asyncio
import datetime as dt
import threading
import time
from collections import Counter
from collections.abc import Iterator

import pytest
from celery.signals import task_postrun
from redis import Redis
from redis.asyncio import Redis as AsyncRedis
from sqlalchemy import select

from core.chat import JobQueued
from core.db.models import Job, Message
from core.jobs import (
    Attachment,
    Done,
    Failed,
    ImageReady,
    JobKind,
    JobState,
    Progress,
    TextDelta,
)
from core.model.api import ImageSegment
from core.streams import follow, follow_sync
from tests.conftest import STREAM_DB, redis_db
from tests.doubles import EchoModel
from tests.factories import add_character, image_bytes, incoming
from workers.sweeper import sweep_once
from workers.tasks import run_job

pytestmark = pytest.mark.integration


def events_of(live, job_id: int) -> list:
    """Every event of the job until Done/Failed (a minute without events fails the test)."""
    return [event for _id, event in follow_sync(live.ctx.redis, live.ctx.installation, job_id, idle_timeout_s=60)]


def stored(live, job_id: int) -> tuple[Job, list[Message]]:
    """The job row and the character replies in its conversation."""
    with live.sessionmaker() as session:
        job = session.get(Job, job_id)
        replies = session.scalars(
            select(Message).where(Message.conversation_id == job.conversation_id, Message.role == "character")
        ).all()
    return job, list(replies)


@pytest.fixture
def deliveries() -> Iterator[Counter]:
    """How many deliveries of each job id the worker has finished handling."""
    seen: Counter = Counter()

    def count(sender=None, args=None, **_kwargs) -> None:
        if sender is not None and sender.name == run_job.name:
            seen[int(args[0])] += 1

    task_postrun.connect(count, weak=False)
    yield seen
    task_postrun.disconnect(count)


def wait_for(predicate, what: str, limit_s: float = 60) -> None:
    """Poll until ``predicate()``; fails after ``limit_s`` (a guard against hanging, not a timing assertion)."""
    deadline = time.monotonic() + limit_s
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting for {what}")
        time.sleep(0.02)


def test_a_chat_message_is_answered_streamed_and_stored(live):
    add_character(live.sessionmaker, "Furina")
    outcome = live.service.handle(incoming("Hello there, Furina"))
    assert isinstance(outcome, JobQueued)
    events = events_of(live, outcome.job_id)
    text = "".join(e.text for e in events if isinstance(e, TextDelta))
    assert text == "echo: Hello there, Furina"
    # the double streams 3 pieces at once: pieces within DELTA_INTERVAL_S share an entry (tests/workers test it)
    assert 1 <= sum(isinstance(e, TextDelta) for e in events) <= 3
    assert isinstance(events[-1], Done)
    job, replies = stored(live, outcome.job_id)
    assert (job.state, job.attempts, job.reply_message_id) == (JobState.DONE, 1, events[-1].message_id)
    assert [r.text for r in replies] == [text]


def test_the_async_follower_reads_the_same_stream(live, redis_url):
    add_character(live.sessionmaker)
    outcome = live.service.handle(incoming("async please"))

    async def read() -> list:
        client = AsyncRedis.from_url(redis_db(redis_url, STREAM_DB))
        try:
            events = follow(client, live.ctx.installation, outcome.job_id, idle_timeout_s=60)
            return [event async for _id, event in events]
        finally:
            await client.aclose()

    events = asyncio.run(read())
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == "echo: async please"


def test_an_image_job_reports_progress_and_stores_the_picture(live):
    add_character(live.sessionmaker, "Furina")
    outcome = live.service.handle(incoming("/imagine Furina on a stage"))
    assert outcome.kind is JobKind.IMAGE
    events = events_of(live, outcome.job_id)
    progress = [e for e in events if isinstance(e, Progress) and e.stage == "image"]
    width, height, steps = live.settings.image_shape
    assert [e.step for e in progress] == list(range(steps + 1)) and progress[-1].total == steps
    [ready] = [e for e in events if isinstance(e, ImageReady)]
    assert (ready.width, ready.height) == (width, height)
    assert live.ctx.store.read(ready.key).startswith(b"\x89PNG")
    job, [reply] = stored(live, outcome.job_id)
    assert reply.image_keys == [ready.key] and job.result["seed"] == ready.seed
    [(kind, contexts)] = live.model.calls
    assert kind == "image" and "Furina on a stage" in contexts.cond[-1].text


def test_an_image_with_a_question_reaches_the_model_as_an_image(live):
    add_character(live.sessionmaker)
    picture = Attachment("cat.webp", "image/webp", image_bytes("WEBP"))
    outcome = live.service.handle(incoming("what do you see?", attachments=(picture,)))
    events = events_of(live, outcome.job_id)
    assert "I see 1 image" in "".join(e.text for e in events if isinstance(e, TextDelta))
    context = next(payload for kind, payload in live.model.calls if kind == "text")  # the reply's call
    [segment] = [s for s in context if isinstance(s, ImageSegment)]
    assert segment.image.size == (32, 24) and segment.vit


def test_history_is_part_of_the_next_prompt(live):
    add_character(live.sessionmaker, "Furina", greeting="Welcome to Fontaine!")
    live.service.handle(incoming("/use Furina"))
    first = live.service.handle(incoming("my name is Ada"))
    events_of(live, first.job_id)
    second = live.service.handle(incoming("what is my name?"))
    events_of(live, second.job_id)
    prompt = live.model.calls[-1][1][-1].text
    assert "Opening: Welcome to Fontaine!" in prompt
    assert "User u1: my name is Ada" in prompt and "Furina: echo: my name is Ada" in prompt
    assert prompt.index("Conversation History") < prompt.index("User Input: what is my name?")


def test_a_job_delivered_twice_produces_one_reply(live, deliveries):
    add_character(live.sessionmaker)
    gate = threading.Event()
    live.use_model(EchoModel(block=gate))
    outcome = live.service.handle(incoming("only once"))  # delivery 1
    wait_for(live.model.started.is_set, "the first delivery to start")
    run_job.apply_async((outcome.job_id,), queue="chat")  # delivery 2 while the first runs
    wait_for(lambda: deliveries[outcome.job_id] == 1, "the duplicate to be handled")
    gate.set()
    events = events_of(live, outcome.job_id)
    wait_for(lambda: deliveries[outcome.job_id] == 2, "the first delivery to finish")
    run_job.apply_async((outcome.job_id,), queue="chat")  # delivery 3 after it is done
    wait_for(lambda: deliveries[outcome.job_id] == 3, "the late duplicate to be handled")
    job, replies = stored(live, outcome.job_id)
    assert len(replies) == 1 and job.attempts == 1 and job.state is JobState.DONE
    assert sum(isinstance(e, Done) for e in events) == 1 and len(live.model.calls) == 1


def test_a_failing_model_fails_the_job_with_a_clear_error(live):
    add_character(live.sessionmaker)
    live.use_model(EchoModel(fail=True))
    outcome = live.service.handle(incoming("break please"))
    events = events_of(live, outcome.job_id)
    assert isinstance(events[-1], Failed) and "went wrong" in events[-1].error
    job, replies = stored(live, outcome.job_id)
    assert job.state is JobState.FAILED and "failed on purpose" in job.error and replies == []


def test_redis_flushed_while_queued_the_sweeper_resends(live, redis_url, deliveries):
    add_character(live.sessionmaker)
    broker = live.ctx.settings.redis_url
    lost: list[int] = []
    live.service.dispatch = lambda job_id, kind: (lost.append(job_id), run_job.apply_async((job_id,), queue="train"))
    outcome = live.service.handle(incoming("are you there?"))  # sits in a queue no worker here reads
    Redis.from_url(broker).flushdb()  # Redis loses every task
    with live.sessionmaker.begin() as session:
        job = session.get(Job, outcome.job_id)
        assert job.state is JobState.QUEUED
        past = job.queued_at
    later = past + dt.timedelta(seconds=live.settings.sweep_after_s + 1)
    assert sweep_once(live.sessionmaker, live.settings, live.dispatch, now=later) == [outcome.job_id]
    assert sweep_once(live.sessionmaker, live.settings, live.dispatch, now=later) == []  # once per period
    events = events_of(live, outcome.job_id)
    assert isinstance(events[-1], Done)
    job, replies = stored(live, outcome.job_id)
    assert job.state is JobState.DONE and len(replies) == 1 and lost == [outcome.job_id]


def test_the_tiny_model_answers_through_the_worker(live, tiny_model_dir):
    runtime = pytest.importorskip("core.model.runtime").UniCharacterRuntime.load(tiny_model_dir, device="cpu")
    add_character(live.sessionmaker)
    live.use_model(runtime)
    settings = live.ctx.settings
    live.ctx.settings = settings.model_copy(update={"max_reply_tokens": 16})
    try:
        outcome = live.service.handle(incoming("hello tiny model"))
        events = events_of(live, outcome.job_id)
    finally:
        live.ctx.settings = settings
    assert isinstance(events[-1], Done), events[-1]
    job, [reply] = stored(live, outcome.job_id)
    assert job.state is JobState.DONE and reply.id == events[-1].message_id
    assert reply.text == "".join(e.text for e in events if isinstance(e, TextDelta)).strip()
