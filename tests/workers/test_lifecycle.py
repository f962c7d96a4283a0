"""One delivery at a time through ``workers.tasks.execute``: claims, duplicates, the attempt cap, cancel, timeout."""

from __future__ import annotations

import dataclasses
import datetime as dt

import pytest
from sqlalchemy import func, select, update

from core.db.models import Job, Memory, Message
from core.jobs import Done, Failed, JobKind, JobState, Progress, TextDelta, decode_event, stream_key
from core.streams import follow_sync
from tests.doubles import EchoModel
from tests.factories import incoming
from workers import lifecycle
from workers.shared_model import SharedModel
from workers.tasks import execute


@pytest.fixture
def worker_sessionmaker(any_sessionmaker):
    """Both databases: the claim and the reads run without BEGIN/COMMIT on PostgreSQL, in transactions on SQLite."""
    return any_sessionmaker


def queue(service, text: str = "hello") -> int:
    return service.handle(incoming(text)).job_id


def job_row(ctx, job_id: int) -> Job:
    with ctx.sessionmaker() as session:
        return session.get(Job, job_id)


def replies(ctx) -> int:
    with ctx.sessionmaker() as session:
        return session.scalar(select(func.count()).select_from(Message).where(Message.role == "character"))


def events(ctx, job_id: int) -> list:
    return [e for _id, e in follow_sync(ctx.redis, ctx.installation, job_id, idle_timeout_s=5)]


def set_job(ctx, job_id: int, **values) -> None:
    with ctx.sessionmaker.begin() as session:
        session.execute(update(Job).where(Job.id == job_id).values(**values))


def test_text_pieces_close_together_share_a_stream_entry(ctx):
    now = [0.0]
    deltas = lifecycle.Deltas(ctx, 77, clock=lambda: now[0])
    deltas.add("a")  # the first piece goes out at once: the reply starts as soon as the model's does
    deltas.add("b")  # within the interval: gathered, nothing more sent yet
    sent = [decode_event(fields) for _id, fields in ctx.redis.xrange(stream_key(ctx.installation, 77))]
    assert sent == [TextDelta("a")]
    now[0] = lifecycle.DELTA_INTERVAL_S
    deltas.add("c")  # the interval passed: everything gathered goes out as one entry
    now[0] += lifecycle.DELTA_INTERVAL_S / 2
    deltas.add("d")
    sent = [decode_event(fields) for _id, fields in ctx.redis.xrange(stream_key(ctx.installation, 77))]
    assert sent == [TextDelta("a"), TextDelta("bc")]
    assert deltas.rest() == [TextDelta("d")] and deltas.rest() == []  # the rest goes out with Done


def test_one_delivery_runs_the_job(ctx, service):
    job_id = queue(service)
    execute(ctx, job_id)
    job = job_row(ctx, job_id)
    assert (job.state, job.attempts, replies(ctx)) == (JobState.DONE, 1, 1)
    assert job.started_at is not None and job.finished_at is not None


def test_a_done_job_delivered_again_does_nothing(ctx, service, model):
    job_id = queue(service)
    execute(ctx, job_id)
    execute(ctx, job_id, redelivered=True)
    assert (job_row(ctx, job_id).attempts, replies(ctx), len(model.calls)) == (1, 1, 1)
    assert ctx.redis.xlen(stream_key(ctx.installation, job_id)) == len(events(ctx, job_id))


def test_a_running_job_is_left_alone_unless_redelivered(ctx, service, model):
    job_id = queue(service)
    set_job(ctx, job_id, state=JobState.RUNNING, attempts=1, started_at=lifecycle.utcnow())
    execute(ctx, job_id)  # a duplicate message while another worker runs it
    assert job_row(ctx, job_id).attempts == 1 and model.calls == []
    execute(ctx, job_id, redelivered=True)  # the broker re-sent it: its worker died
    job = job_row(ctx, job_id)
    assert (job.state, job.attempts, replies(ctx)) == (JobState.DONE, 2, 1)
    assert any(isinstance(e, Progress) and e.stage == "retry" for e in events(ctx, job_id))


def test_a_running_job_past_its_timeout_is_taken_over(ctx, service):
    job_id = queue(service)
    long_ago = lifecycle.utcnow() - dt.timedelta(seconds=ctx.settings.job_timeout_s + 5)
    set_job(ctx, job_id, state=JobState.RUNNING, attempts=1, started_at=long_ago)
    execute(ctx, job_id)
    assert job_row(ctx, job_id).state is JobState.DONE


def test_the_attempt_cap_fails_the_job(ctx, service, model):
    job_id = queue(service)
    set_job(ctx, job_id, state=JobState.RUNNING, attempts=ctx.settings.max_attempts, started_at=lifecycle.utcnow())
    execute(ctx, job_id, redelivered=True)
    job = job_row(ctx, job_id)
    assert job.state is JobState.FAILED and "gave up" in job.error and model.calls == []
    [event] = events(ctx, job_id)
    assert isinstance(event, Failed) and "failed several times" in event.error


def test_a_cancelled_job_is_skipped(ctx, service, model):
    job_id = queue(service)
    service.cancel("console", "u1", job_id)
    execute(ctx, job_id)
    assert model.calls == [] and job_row(ctx, job_id).state is JobState.CANCELLED
    assert [type(e) for e in events(ctx, job_id)] == [Failed]


def test_cancel_while_running_stops_at_the_next_step(ctx, service):
    job_id = queue(service, "a long answer " * 10)

    class Cancelling(EchoModel):
        def generate_text(self, context, params, on_text=None, adapter=None):
            service.cancel("console", "u1", job_id)
            return super().generate_text(context, params, on_text, adapter)

    ctx.model = SharedModel(Cancelling)
    execute(ctx, job_id)
    assert job_row(ctx, job_id).state is JobState.CANCELLED and replies(ctx) == 0
    assert isinstance(events(ctx, job_id)[-1], Failed)


def test_an_overtaken_attempt_writes_nothing(ctx, service):
    job_id = queue(service)
    claim = lifecycle.claim(ctx, job_id)
    set_job(ctx, job_id, attempts=2)  # a redelivery took the job over meanwhile
    with pytest.raises(lifecycle.Superseded):
        lifecycle.complete(ctx, claim, "late reply")
    assert replies(ctx) == 0 and job_row(ctx, job_id).state is JobState.RUNNING


def test_a_job_past_its_time_limit_fails(ctx, service, monkeypatch):
    job_id = queue(service)
    ctx.settings = ctx.settings.model_copy(update={"job_timeout_s": 10})
    claim = lifecycle.claim

    def claimed_a_minute_ago(*args, **kwargs):
        work = claim(*args, **kwargs)
        return dataclasses.replace(work, started=work.started - 60)

    monkeypatch.setattr("workers.tasks.claim", claimed_a_minute_ago)
    execute(ctx, job_id)
    job = job_row(ctx, job_id)
    assert job.state is JobState.FAILED and "ran past" in job.error
    assert "too long" in events(ctx, job_id)[-1].error


def test_events_stream_the_reply_then_done(ctx, service):
    job_id = queue(service, "stream me")
    execute(ctx, job_id)
    stream = events(ctx, job_id)
    assert not any(isinstance(e, Progress) for e in stream)  # nothing was ahead: no queue line to replace
    assert "".join(e.text for e in stream if isinstance(e, TextDelta)) == "echo: stream me"
    assert isinstance(stream[-1], Done) and stream[-1].message_id == job_row(ctx, job_id).reply_message_id
    assert 0 < ctx.redis.ttl(stream_key(ctx.installation, job_id)) <= ctx.settings.event_ttl_s


def test_a_reply_that_waited_behind_others_says_when_it_starts(ctx, service):
    first, second = queue(service, "one"), queue(service, "two")
    assert job_row(ctx, second).params == {"queued_behind": 1} and job_row(ctx, first).params == {}
    execute(ctx, first)
    execute(ctx, second)
    stream = events(ctx, second)
    assert isinstance(stream[0], Progress) and stream[0].stage == "text"  # the frontend's queue line turns to work
    assert isinstance(stream[1], TextDelta) and isinstance(stream[-1], Done)


def test_a_reply_queues_the_rolling_summary_which_is_stored(ctx, service, sent):
    ctx.settings = ctx.settings.model_copy(update={"history_messages": 2, "summary_every": 2})
    service.settings = ctx.settings
    for text in ("one", "two", "three"):
        execute(ctx, queue(service, text))
    # the chat jobs in ``sent`` are the service's; the worker's follow-ups are the rest
    [(summary_id, kind)] = [(job_id, kind) for job_id, kind in sent if kind is not JobKind.CHAT]
    assert kind is JobKind.SUMMARY
    execute(ctx, summary_id)
    with ctx.sessionmaker() as session:
        [summary] = session.scalars(select(Memory).where(Memory.kind == "summary")).all()
        assert session.get(Job, summary_id).state is JobState.DONE and summary.text.startswith("echo:")
    assert replies(ctx) == 3  # a summary is not a reply
