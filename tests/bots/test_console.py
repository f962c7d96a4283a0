"""``unichar chat`` end to end: lines in, through ChatService -> Redis -> the Celery worker -> SQL, replies out."""

from __future__ import annotations

import io
import threading
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from sqlalchemy import select

from bots.console import ConsoleFrontend, run_console
from core.chat import ChatService, JobQueued
from core.db.installation import installation_token
from core.db.models import Character, Job, Message
from core.db.repositories import insert_job
from core.jobs import Done, ImageReady, JobKind, JobState, Progress, TextDelta
from core.media import FileStore
from core.streams import publish
from tests.conftest import STREAM_DB, count_rows, redis_db
from tests.doubles import EchoModel

pytestmark = pytest.mark.integration


@pytest.fixture
def console(live: Any, tmp_path: Path) -> ConsoleFrontend:
    """A console frontend on the live path, writing to a string, with one character to talk to."""
    with live.sessionmaker.begin() as session:
        session.add(Character(name="Alice", description="A cheerful sailor.", greeting="Ahoy!"))
        session.add(Character(name="Bob", description="A grumpy cook."))
    return ConsoleFrontend(
        service=live.service,
        redis=live.ctx.redis,
        installation=live.ctx.installation,
        store=live.ctx.store,
        image_dir=tmp_path / "images",
        out=io.StringIO(),
        idle_timeout_s=60,
    )


def _output(console: ConsoleFrontend) -> str:
    return console.out.getvalue()  # type: ignore[attr-defined]


def test_a_conversation_streams_replies_and_stores_them(console: ConsoleFrontend, live: Any) -> None:
    script = "/characters\n/use Alice\nhello there\n\n/help\n/quit\nnever read\n"
    assert console.run(io.StringIO(script)) == 0
    out = _output(console)
    assert "* Alice" in out and "- Bob" in out  # the default character is marked as current
    assert "You are now talking with Alice." in out and "Ahoy!" in out
    assert "Alice: echo: hello there\n" in out
    assert "/imagine" in out  # the help text
    assert "never read" not in out
    with live.sessionmaker() as session:
        turns = session.execute(select(Message.role, Message.text).order_by(Message.id)).all()
        job = session.scalars(select(Job)).one()
    assert [tuple(t) for t in turns] == [
        ("character", "Ahoy!"),
        ("user", "hello there"),
        ("character", "echo: hello there"),
    ]
    assert job.state is JobState.DONE and job.kind is JobKind.CHAT


def test_imagine_shows_progress_and_saves_the_image(console: ConsoleFrontend, live: Any, tmp_path: Path) -> None:
    live.use_model(EchoModel())
    outcome = console.send("/imagine a red boat at dusk")
    assert isinstance(outcome, JobQueued) and outcome.kind is JobKind.IMAGE
    out = _output(console)
    assert "[image 50%, about " in out  # percent and an ETA while it runs
    assert "[image 100%]" in out
    saved = [line.split(": ", 1)[1].rstrip("]") for line in out.splitlines() if line.startswith("[image saved: ")]
    assert len(saved) == 1
    path = Path(saved[0])
    assert path.parent == (tmp_path / "images").resolve()
    with Image.open(path) as image:
        image.verify()


def test_reset_starts_over(console: ConsoleFrontend) -> None:
    console.run(io.StringIO("/use Alice\nfirst\n/reset\n"))
    assert "Your conversation with Alice starts over." in _output(console)


def test_bad_input_gets_a_clear_answer_and_stores_nothing(console: ConsoleFrontend, live: Any) -> None:
    console.run(io.StringIO("/use Nobody\n/bogus\n/imagine\n" + "x" * 100_000 + "\n"))
    out = _output(console)
    assert "! There is no character called 'Nobody'." in out
    assert "! Unknown command /bogus." in out
    assert "! Tell me what to draw" in out
    assert "! Your message is 100,000 characters long" in out
    assert count_rows(live.sessionmaker, Message, Job) == {"messages": 0, "jobs": 0}


def test_a_failing_model_is_reported(console: ConsoleFrontend, live: Any) -> None:
    live.use_model(EchoModel(fail=True))
    console.run(io.StringIO("/use Bob\nhi\n"))
    assert "! Sorry, something went wrong. Please try again." in _output(console)
    with live.sessionmaker() as session:
        assert session.scalars(select(Job.state)).one() is JobState.FAILED


def test_queue_position_is_shown(console: ConsoleFrontend) -> None:
    """Events of a job still waiting: the console says how many are ahead, then renders the reply."""
    job_id = 987_654
    for event in (Progress(stage="queued", position=3), Progress(stage="queued", position=1), TextDelta("hi"), Done(1)):
        publish(console.redis, console.installation, job_id, event)
    console.follow(JobQueued(job_id, JobKind.CHAT, position=4, character="Alice"))
    out = _output(console)
    assert out.index("[3 ahead of you in the queue]") < out.index("[2 ahead") < out.index("[next in the queue]") < (
        out.index("hi")
    )


def test_a_quiet_job_shows_its_place_in_the_queue(settings, sessionmaker, redis_client, tmp_path: Path) -> None:
    """No worker has taken the job yet (one still loading its model, say): the console says where it waits, from
    the job rows, once, then renders the reply when it comes."""
    with sessionmaker.begin() as session:
        waiting = insert_job(session, JobKind.CHAT, None)  # a row only: never dispatched
    store = FileStore(settings.files_dir)
    installation = installation_token(sessionmaker)
    console = ConsoleFrontend(
        service=ChatService(sessionmaker, settings, lambda *job: None, store), redis=redis_client,
        installation=installation, store=store, image_dir=tmp_path / "images", out=io.StringIO(), quiet_s=0.2,
    )
    reply = threading.Timer(1.0, lambda: [
        publish(redis_client, installation, waiting, event) for event in (TextDelta("at last"), Done(1))
    ])
    reply.start()
    console.follow(JobQueued(waiting, JobKind.CHAT, position=1, character="Alice"))
    reply.join()
    assert _output(console) == "Alice: \n[next in the queue]\nat last\n"


def test_the_time_left_reads_as_the_bots_say_it(console: ConsoleFrontend) -> None:
    job_id = 987_657
    events = (
        Progress(stage="image", step=1, total=10, eta_s=600),
        Progress(stage="image", step=9, total=10, eta_s=2),
        Done(message_id=None),
    )
    for event in events:
        publish(console.redis, console.installation, job_id, event)
    console.follow(JobQueued(job_id, JobKind.IMAGE, position=1, character="Alice"))
    out = _output(console)
    assert "[image 10%, about 10 min left]" in out and "[image 90%, about a few seconds left]" in out


def test_a_retried_reply_is_marked_as_starting_over(console: ConsoleFrontend) -> None:
    job_id = 987_655
    for event in (TextDelta("half a rep"), Progress(stage="retry", step=2), TextDelta("whole reply"), Done(1)):
        publish(console.redis, console.installation, job_id, event)
    console.follow(JobQueued(job_id, JobKind.CHAT, position=1, character="Alice"))
    assert _output(console) == "Alice: half a rep\n[a worker stopped mid-reply; it starts over]\nwhole reply\n"


def test_a_database_made_again_does_not_replay_the_old_ones_streams(console: ConsoleFrontend) -> None:
    """Job ids restart at 1 in a new database while the old one's streams live on in Redis for an hour."""
    old = "0ld0ld0ld0ld0ld0"
    assert console.installation != old
    for job_id in (1, 2, 3):
        publish(console.redis, old, job_id, TextDelta("an old reply"))
        publish(console.redis, old, job_id, ImageReady(key="f" * 64 + ".png", width=32, height=32, seed=1))
        publish(console.redis, old, job_id, Done(message_id=job_id))
    console.run(io.StringIO("/use Alice\nhello again\n"))
    out = _output(console)
    assert "Alice: echo: hello again\n" in out
    assert "old reply" not in out and "image saved" not in out


def test_a_picture_gone_from_the_store_is_reported(console: ConsoleFrontend, tmp_path: Path) -> None:
    job_id = 987_656
    gone = ImageReady(key="e" * 64 + ".png", width=32, height=32, seed=1)
    for event in (Progress(stage="image", step=2, total=2), gone, Done(message_id=None)):
        publish(console.redis, console.installation, job_id, event)
    console.follow(JobQueued(job_id, JobKind.IMAGE, position=1, character="Alice"))
    assert f"! The picture of request #{job_id} is no longer stored." in _output(console)
    assert not list((tmp_path / "images").glob("*"))  # no empty file left where the picture would be


def test_end_of_input_ends_the_loop(console: ConsoleFrontend) -> None:
    assert console.run(io.StringIO("")) == 0


def test_run_console_connects_from_settings(live: Any, redis_url: str, tmp_path: Path) -> None:
    """The ``unichar chat`` entry point: its own engine, Redis client and dispatch, from the settings alone."""
    with live.sessionmaker.begin() as session:
        session.add(Character(name="Alice"))
    # the worker publishes events on the run's stream database; the broker is the app's (configured by the fixture)
    settings = live.settings.model_copy(update={"redis_url": redis_db(redis_url, STREAM_DB)})
    out = io.StringIO()
    assert run_console(settings, user="tester", lines=io.StringIO("ahoy\n"), out=out) == 0
    assert "Talking as console:tester" in out.getvalue()
    assert "Alice: echo: ahoy\n" in out.getvalue()
