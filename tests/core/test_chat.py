"""ChatService without a broker: commands, refusals that store nothing, one transaction per message."""

from __future__ import annotations

import pytest
from PIL import Image
from sqlalchemy import select

from core.chat import Answer, ChatService, JobQueued, Refusal
from core.db.models import Chat, Conversation, Job, Message, User
from core.jobs import Attachment, JobKind, JobState
from core.media import FileStore
from tests.conftest import count_rows
from tests.factories import add_character, image_bytes, incoming

TABLES = (User, Chat, Conversation, Message, Job)


class Recorder:
    """A dispatch that records what would have been sent."""

    def __init__(self, fail: bool = False) -> None:
        self.sent: list[tuple[int, JobKind]] = []
        self.fail = fail

    def __call__(self, job_id: int, kind: JobKind) -> None:
        if self.fail:
            raise ConnectionError("broker down")
        self.sent.append((job_id, kind))


@pytest.fixture
def dispatch() -> Recorder:
    return Recorder()


@pytest.fixture
def service(any_sessionmaker, settings, dispatch) -> ChatService:
    add_character(any_sessionmaker, "Furina")
    add_character(any_sessionmaker, "Hermione", greeting="Hi, I'm Hermione.")
    return ChatService(any_sessionmaker, settings, dispatch)


def test_message_stores_turn_and_job_then_dispatches(service, dispatch, any_sessionmaker):
    outcome = service.handle(incoming("Hello there"))
    assert isinstance(outcome, JobQueued)
    assert (outcome.kind, outcome.position, outcome.character) == (JobKind.CHAT, 1, "Furina")
    assert dispatch.sent == [(outcome.job_id, JobKind.CHAT)]
    with any_sessionmaker() as session:
        job = session.get(Job, outcome.job_id)
        message = session.get(Message, job.request_message_id)
        assert job.state is JobState.QUEUED and job.attempts == 0
        assert (message.role, message.text) == ("user", "Hello there")
        assert job.conversation_id == message.conversation_id


def test_same_identity_reuses_rows(service, any_sessionmaker):
    first = service.handle(incoming("one"))
    second = service.handle(incoming("two"))
    assert count_rows(any_sessionmaker, User, Chat, Conversation) == {"users": 1, "chats": 1, "conversations": 1}
    assert second.position == 2 and first.position == 1
    service.handle(incoming("three", user="u2"))
    assert count_rows(any_sessionmaker, User)["users"] == 2


BAD_INPUT = [
    ("", (), "empty"),
    ("   \n ", (), "empty"),
    ("x" * 100_000, (), "100,000 characters"),
    ("/use Nobody", (), "no character called 'Nobody'"),
    ("/frobnicate now", (), "unknown command /frobnicate"),
    ("/", (), "unknown command"),
    ("look", (Attachment("data.bin", "application/octet-stream", bytes(range(256)) * 40),), "not an image"),
    ("look", (Attachment("x.png", "image/png", image_bytes()[:60]),), "can't use x.png"),
    ("/imagine", (), "tell me what to draw"),
    ("/use", (), "whom do you want"),
]


@pytest.mark.parametrize(("text", "attachments", "reason"), BAD_INPUT)
def test_bad_input_is_refused_and_nothing_is_stored(service, dispatch, any_sessionmaker, text, attachments, reason):
    before = count_rows(any_sessionmaker, *TABLES)
    outcome = service.handle(incoming(text, attachments=attachments))
    assert isinstance(outcome, Refusal)
    assert reason.lower() in outcome.reason.lower()
    assert count_rows(any_sessionmaker, *TABLES) == before
    assert dispatch.sent == []


def test_unknown_command_lists_the_commands(service):
    outcome = service.handle(incoming("/dance"))
    assert isinstance(outcome, Refusal)
    for name in ("/characters", "/use", "/imagine", "/reset", "/status", "/help"):
        assert name in outcome.reason


def test_no_character_at_all_is_refused_without_rows(sessionmaker, settings, dispatch):
    service = ChatService(sessionmaker, settings, dispatch)
    outcome = service.handle(incoming("hello"))
    assert isinstance(outcome, Refusal) and "no character" in outcome.reason.lower()
    assert count_rows(sessionmaker, *TABLES) == dict.fromkeys(
        ("users", "chats", "conversations", "messages", "jobs"), 0
    )


def test_image_with_text_is_stored_cleaned_and_referenced(service, any_sessionmaker, settings):
    exif = Image.Exif()
    exif[0x010E] = "GPS and a secret"
    exif_jpeg = image_bytes("JPEG", exif=exif.tobytes())
    outcome = service.handle(incoming("what is this?", attachments=(Attachment("p.jpg", "image/jpeg", exif_jpeg),)))
    assert isinstance(outcome, JobQueued)
    with any_sessionmaker() as session:
        message = session.get(Message, session.get(Job, outcome.job_id).request_message_id)
    [key] = message.image_keys
    store = FileStore(settings.files_dir)
    assert key.endswith(".jpg") and store.exists(key)
    assert b"GPS and a secret" not in store.read(key)


def test_commands_answer_without_jobs(service, any_sessionmaker, dispatch):
    listing = service.handle(incoming("/characters"))
    assert isinstance(listing, Answer) and listing.choices == ("Furina", "Hermione")
    assert "* Furina" in listing.text
    switched = service.handle(incoming("/use  hermione "))
    assert isinstance(switched, Answer) and "Hermione" in switched.text and "Hi, I'm Hermione." in switched.text
    assert "* Hermione" in service.handle(incoming("/characters")).text
    assert isinstance(service.handle(incoming("/help@SomeBot")), Answer)
    assert count_rows(any_sessionmaker, Job)["jobs"] == 0 and dispatch.sent == []
    queued = service.handle(incoming("hi"))
    assert queued.character == "Hermione"


def test_reset_closes_the_conversation(service, any_sessionmaker):
    first = service.handle(incoming("remember this"))
    reset = service.handle(incoming("/reset"))
    assert isinstance(reset, Answer) and "starts over" in reset.text
    second = service.handle(incoming("new start"))
    with any_sessionmaker() as session:
        jobs = [session.get(Job, first.job_id), session.get(Job, second.job_id)]
        conversations = session.scalars(select(Conversation).order_by(Conversation.id)).all()
    assert jobs[0].conversation_id != jobs[1].conversation_id
    assert [c.active for c in conversations] == [False, True]


def test_group_use_sets_the_chat_character(service, any_sessionmaker):
    service.handle(incoming("/use Hermione", user="a", chat="g", is_group=True))
    assert service.handle(incoming("hi all", user="b", chat="g", is_group=True)).character == "Hermione"
    assert service.handle(incoming("hi", user="b", chat="dm-b")).character == "Furina"


def test_imagine_queues_an_image_job_on_its_queue(service, dispatch, any_sessionmaker):
    chat = service.handle(incoming("hello"))
    image = service.handle(incoming("/imagine a harbour at dusk"))
    assert isinstance(image, JobQueued) and image.kind is JobKind.IMAGE
    assert image.position == 1  # chat and image jobs queue separately
    assert dispatch.sent == [(chat.job_id, JobKind.CHAT), (image.job_id, JobKind.IMAGE)]
    with any_sessionmaker() as session:
        params = session.get(Job, image.job_id).params
    assert params["prompt"] == "a harbour at dusk" and params["seed"] > 0  # with its chat and sampler settings


def test_status_shows_positions_and_open_jobs_are_capped(service, settings):
    for text in ("a", "b", "c"):
        assert isinstance(service.handle(incoming(text)), JobQueued)
    assert isinstance(service.handle(incoming("one too many")), Refusal)
    status = service.handle(incoming("/status"))
    assert "1st in the queue" in status.text and "3rd in the queue" in status.text
    assert "no requests" in service.handle(incoming("/status", user="other")).text


def test_dispatch_failure_keeps_the_job_for_the_sweeper(any_sessionmaker, settings):
    add_character(any_sessionmaker)
    service = ChatService(any_sessionmaker, settings, Recorder(fail=True))
    outcome = service.handle(incoming("hello"))
    assert isinstance(outcome, JobQueued)
    with any_sessionmaker() as session:
        assert session.get(Job, outcome.job_id).state is JobState.QUEUED


def test_cancel_only_by_owner(service, any_sessionmaker):
    outcome = service.handle(incoming("hello"))
    assert isinstance(service.cancel("console", "intruder", outcome.job_id), Refusal)
    assert service.cancel("console", "u1", outcome.job_id).text == "Cancelled."
    with any_sessionmaker() as session:
        assert session.get(Job, outcome.job_id).state is JobState.CANCELLED
    assert "already finished" in service.cancel("console", "u1", outcome.job_id).text


def test_memory_commands_are_shared_by_every_frontend(service, any_sessionmaker):
    assert "I will remember: I love tea" in service.handle(incoming("/remember I love tea")).text
    assert "1. I love tea" in service.handle(incoming("/memory")).text
    assert "Your persona is now: a sailor" in service.handle(incoming("/persona a sailor")).text
    assert "Forgotten: I love tea" in service.handle(incoming("/forget 1")).text
    assert "/forget me confirm" in service.handle(incoming("/forget me")).text
    assert "deleted" in service.handle(incoming("/forget me confirm")).text
    assert count_rows(any_sessionmaker, User)["users"] == 0


def test_summary_jobs_do_not_count_against_the_user(service, any_sessionmaker):
    first = service.handle(incoming("a"))
    with any_sessionmaker.begin() as session:
        job = session.get(Job, first.job_id)
        for _ in range(5):
            session.add(Job(kind=JobKind.SUMMARY, user_id=job.user_id, conversation_id=job.conversation_id))
    assert isinstance(service.handle(incoming("b")), JobQueued)
    assert "summary" not in service.handle(incoming("/status")).text
