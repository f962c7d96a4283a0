"""bots.delivery: a job's events rendered through a renderer, recorded in SQL, never posted twice."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from PIL import Image
from sqlalchemy.orm import Session, sessionmaker

from bots.delivery import Deliveries, MessageGone, RecipientGone, Target
from bots.render import RetryLater, utf16_len
from core.db.models import Character, Chat, Conversation, Job, Message, User
from core.jobs import (
    Done,
    Failed,
    ImageReady,
    JobEvent,
    JobKind,
    JobState,
    Progress,
    TextDelta,
)
from core.media import FileStore


class Streams:
    """In-memory job event streams with the contract of core.streams.follow (TimeoutError when idle)."""

    def __init__(self) -> None:
        self.events: dict[int, list[JobEvent]] = {}
        self.changed = asyncio.Event()

    def publish(self, job_id: int, *events: JobEvent) -> None:
        self.events.setdefault(job_id, []).extend(events)
        self.changed.set()

    async def follow(self, job_id: int, last_id: str = "0") -> AsyncIterator[tuple[str, JobEvent]]:
        index = int(last_id)
        while True:
            events = self.events.get(job_id, [])
            if index >= len(events):
                self.changed.clear()
                try:
                    await asyncio.wait_for(self.changed.wait(), 0.05)
                except TimeoutError:
                    raise TimeoutError(f"job {job_id} is quiet") from None
                continue
            event = events[index]
            index += 1
            yield str(index), event
            if isinstance(event, (Done, Failed)):
                return


class Crash(Exception):
    """The bot process dies (raised by the renderer after a number of calls)."""


class Chatroom:
    """What the users of one chat see: the messages and photos, across bot restarts."""

    def __init__(self) -> None:
        self.messages: dict[str, str] = {}
        self.photos: list[str] = []
        self.captions: list[str] = []
        self.deleted: list[str] = []
        self.actions: list[str] = []
        self.sends = 0


class FakeRenderer:
    """A Renderer over a Chatroom, with a small limit and scripted failures."""

    limit = 100
    edit_interval = 0.0
    action_interval = 0.01

    def __init__(self, room: Chatroom, *, crash_after_sends: int | None = None, refuse: Exception | None = None) -> None:
        self.room = room
        self.crash_after_sends = crash_after_sends
        self.refuse = refuse
        self.retry_once = False

    def length(self, text: str) -> int:
        return utf16_len(text)

    async def chat_action(self, action: str) -> None:
        self.room.actions.append(action)

    def _gate(self) -> None:
        if self.refuse is not None:
            raise self.refuse
        if self.retry_once:
            self.retry_once = False
            raise RetryLater(0.01)
        if self.crash_after_sends is not None and self.room.sends >= self.crash_after_sends:
            raise Crash()

    async def send_text(self, text: str) -> str:
        self._gate()
        assert self.length(text) <= self.limit
        self.room.sends += 1
        message_id = str(len(self.room.messages) + len(self.room.photos) + 1)
        self.room.messages[message_id] = text
        return message_id

    async def edit_text(self, message_id: str, text: str) -> None:
        if message_id in self.room.deleted:
            raise MessageGone(message_id)
        assert self.length(text) <= self.limit
        self.room.messages[message_id] = text

    async def send_image(self, data: bytes, caption: str) -> str:
        self._gate()
        self.room.sends += 1
        Image.open(io.BytesIO(data)).verify()
        message_id = f"photo{len(self.room.photos) + 1}"
        self.room.photos.append(message_id)
        self.room.captions.append(caption)
        return message_id

    async def delete(self, message_id: str) -> None:
        self.room.deleted.append(message_id)
        self.room.messages.pop(message_id, None)


async def until(predicate: Callable[[], Any]) -> Any:
    """Yield to the delivery until ``predicate()`` is truthy (bounded, so a bug fails instead of hanging)."""
    for _ in range(20_000):
        if result := predicate():
            return result
        await asyncio.sleep(0.001)
    raise AssertionError("the delivery never got there")


def make_job(sessions: sessionmaker[Session], kind: JobKind = JobKind.CHAT, state: JobState = JobState.RUNNING) -> Target:
    """A user, chat, conversation, request message and job row, as the chat service writes them."""
    with sessions.begin() as session:
        user = User(platform="test", platform_user_id="42", display_name="Ann")
        character = Character(name=f"Ichihime{kind.value}{state.value}")
        chat = Chat(platform="test", platform_chat_id=f"chat-{kind.value}-{state.value}")
        session.add_all([user, character, chat])
        session.flush()
        conversation = Conversation(user_id=user.id, character_id=character.id, chat_id=chat.id)
        session.add(conversation)
        session.flush()
        request = Message(conversation_id=conversation.id, chat_id=chat.id, role="user", text="hi", platform_message_id="7")
        session.add(request)
        session.flush()
        job = Job(kind=kind, state=state, user_id=user.id, conversation_id=conversation.id, request_message_id=request.id)
        session.add(job)
        session.flush()
        return Target(job.id, kind, chat.platform_chat_id, "7", "42")


def service(sessions: sessionmaker[Session], files: FileStore, streams: Streams, renderer: FakeRenderer) -> Deliveries:
    return Deliveries(sessions, streams.follow, files, lambda _target: renderer, "test")


def job_row(sessions: sessionmaker[Session], job_id: int) -> Job:
    with sessions() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job


def png(files: FileStore) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), "red").save(buffer, "PNG")
    return files.put(buffer.getvalue(), ".png")


def test_streamed_reply_is_one_edited_message(sessions, files) -> None:
    streams, room = Streams(), Chatroom()
    target = make_job(sessions)

    async def main() -> None:
        deliveries = service(sessions, files, streams, FakeRenderer(room))
        task = deliveries.start(target)
        for word in ("Hello", " there", ", traveller."):
            streams.publish(target.job_id, TextDelta(word))
            await asyncio.sleep(0)
        streams.publish(target.job_id, Done(message_id=1))
        await task

    asyncio.run(main())
    assert list(room.messages.values()) == ["Hello there, traveller."]
    assert "typing" in room.actions
    job = job_row(sessions, target.job_id)
    assert job.delivered_at is not None
    assert job.delivery["messages"] == list(room.messages)


def test_long_reply_opens_new_messages_within_the_limit(sessions, files) -> None:
    streams, room = Streams(), Chatroom()
    target = make_job(sessions)
    words = [f"word{i}🎉 " for i in range(120)]

    async def main() -> None:
        task = service(sessions, files, streams, FakeRenderer(room)).start(target)
        for word in words:
            streams.publish(target.job_id, TextDelta(word))
            await asyncio.sleep(0)
        streams.publish(target.job_id, Done(message_id=1))
        await task

    asyncio.run(main())
    texts = list(room.messages.values())
    assert len(texts) > 5
    assert all(utf16_len(text) <= 100 for text in texts)
    assert " ".join(texts).split() == "".join(words).split()


def test_image_job_shows_queue_progress_then_the_photo(sessions, files) -> None:
    streams, room = Streams(), Chatroom()
    target = make_job(sessions, JobKind.IMAGE, JobState.QUEUED)
    key = png(files)
    seen: list[str] = []

    async def main() -> None:
        task = service(sessions, files, streams, FakeRenderer(room)).start(target)
        streams.publish(target.job_id, Progress(stage="queued", position=3))
        seen.extend(await until(lambda: [t for t in room.messages.values() if "2 jobs ahead" in t]))
        streams.publish(target.job_id, Progress(stage="image", step=5, total=10, eta_s=4))
        seen.extend(await until(lambda: [t for t in room.messages.values() if "50%" in t]))
        streams.publish(target.job_id, ImageReady(key=key, width=32, height=32, seed=1), Done(message_id=None))
        await task

    asyncio.run(main())
    assert any("2 jobs ahead" in line for line in seen)
    assert any("50%" in line for line in seen)
    assert room.photos == ["photo1"]
    assert room.messages == {}  # the status line is removed once the picture is there
    assert "upload_photo" in room.actions
    assert job_row(sessions, target.job_id).delivery["images"] == [key]


def test_failure_is_shown_after_the_partial_reply(sessions, files) -> None:
    streams, room = Streams(), Chatroom()
    target = make_job(sessions)

    async def main() -> None:
        task = service(sessions, files, streams, FakeRenderer(room)).start(target)
        streams.publish(target.job_id, TextDelta("I was saying"), Failed("The model stopped: out of memory."))
        await task

    asyncio.run(main())
    assert list(room.messages.values()) == ["I was saying", "⚠️ The model stopped: out of memory."]
    assert job_row(sessions, target.job_id).delivered_at is not None


def test_restart_resumes_without_posting_twice(sessions, files) -> None:
    streams, room = Streams(), Chatroom()
    target = make_job(sessions)
    words = [f"w{i} " for i in range(80)]  # about four messages of 100 units

    async def first_life() -> None:
        deliveries = service(sessions, files, streams, FakeRenderer(room, crash_after_sends=2))
        task = deliveries.start(target)
        for word in words:
            streams.publish(target.job_id, TextDelta(word))
            await asyncio.sleep(0)
        await task  # the crash is logged; the delivery stays unfinished in SQL

    async def second_life() -> list[int]:
        streams.publish(target.job_id, Done(message_id=1))
        deliveries = service(sessions, files, streams, FakeRenderer(room))
        resumed = await deliveries.resume()
        await deliveries.wait_all()
        return resumed

    asyncio.run(first_life())
    sent_before = room.sends
    assert sent_before == 2 and job_row(sessions, target.job_id).delivered_at is None
    assert asyncio.run(second_life()) == [target.job_id]
    texts = list(room.messages.values())
    assert " ".join(texts).split() == "".join(words).split()  # nothing lost, nothing repeated
    assert job_row(sessions, target.job_id).delivered_at is not None

    # A third start finds nothing to do: the reply is delivered.
    async def third_life() -> list[int]:
        return await service(sessions, files, streams, FakeRenderer(room)).resume()

    sends = room.sends
    assert asyncio.run(third_life()) == []
    assert room.sends == sends


def test_delivered_job_is_never_posted_again(sessions, files) -> None:
    streams, room = Streams(), Chatroom()
    target = make_job(sessions)
    streams.publish(target.job_id, TextDelta("once"), Done(message_id=1))

    async def main() -> None:
        deliveries = service(sessions, files, streams, FakeRenderer(room))
        await deliveries.start(target)
        await deliveries.start(target)

    asyncio.run(main())
    assert list(room.messages.values()) == ["once"]


def test_blocked_user_is_marked_and_skipped(sessions, files) -> None:
    streams, room = Streams(), Chatroom()
    target = make_job(sessions)
    streams.publish(target.job_id, TextDelta("hello"), Done(message_id=1))

    async def main() -> None:
        await service(sessions, files, streams, FakeRenderer(room, refuse=RecipientGone("blocked"))).start(target)

    asyncio.run(main())
    job = job_row(sessions, target.job_id)
    assert job.delivered_at is not None and job.delivery["skipped"] == "recipient gone"
    with sessions() as session:
        assert session.get(User, job.user_id).blocked_bot is True


def test_expired_stream_is_delivered_from_the_stored_reply(sessions, files) -> None:
    streams, room = Streams(), Chatroom()
    target = make_job(sessions, state=JobState.DONE)
    with sessions.begin() as session:
        job = session.get(Job, target.job_id)
        reply = Message(conversation_id=job.conversation_id, chat_id=1, role="character", text="Stored reply.")
        session.add(reply)
        session.flush()
        job.reply_message_id = reply.id

    async def main() -> None:
        await service(sessions, files, streams, FakeRenderer(room)).start(target)

    asyncio.run(main())
    assert list(room.messages.values()) == ["Stored reply."]


def test_retry_after_on_send_is_honoured(sessions, files) -> None:
    streams, room = Streams(), Chatroom()
    target = make_job(sessions)
    renderer = FakeRenderer(room)
    renderer.retry_once = True
    streams.publish(target.job_id, TextDelta("patience"), Done(message_id=1))

    async def main() -> None:
        await service(sessions, files, streams, renderer).start(target)

    asyncio.run(main())
    assert list(room.messages.values()) == ["patience"]


def test_queued_chat_reply_shows_its_place_then_the_text(sessions, files) -> None:
    streams, room = Streams(), Chatroom()
    target = make_job(sessions, state=JobState.QUEUED)
    seen: list[str] = []

    async def main() -> None:
        task = service(sessions, files, streams, FakeRenderer(room)).start(target)
        streams.publish(target.job_id, Progress(stage="queued", position=4))
        seen.extend(await until(lambda: [t for t in room.messages.values() if "3 jobs ahead" in t]))
        streams.publish(target.job_id, TextDelta("Finally!"), Done(message_id=1))
        await task

    asyncio.run(main())
    assert any("3 jobs ahead" in line for line in seen)
    assert list(room.messages.values()) == ["Finally!"]  # the placeholder became the reply


def test_a_deleted_message_does_not_stop_the_reply(sessions, files) -> None:
    streams, room = Streams(), Chatroom()
    target = make_job(sessions)

    async def main() -> None:
        task = service(sessions, files, streams, FakeRenderer(room)).start(target)
        streams.publish(target.job_id, TextDelta("first part"))
        await until(lambda: room.messages)
        room.deleted.append(next(iter(room.messages)))  # the user deletes the bot's message
        room.messages.clear()
        streams.publish(target.job_id, TextDelta(", second part"))
        streams.publish(target.job_id, TextDelta(", third part"), Done(message_id=1))
        await task

    asyncio.run(main())
    assert list(room.messages.values()) == ["first part, second part, third part"]


class CaptioningRenderer(FakeRenderer):
    """A platform whose pictures carry captions of up to 40 units."""

    caption_limit = 40


@pytest.mark.parametrize("words", ["Here I am at the beach!", "A much longer reply, " * 5])
def test_a_short_reply_becomes_the_caption_of_its_picture(sessions, files, words: str) -> None:
    streams, room = Streams(), Chatroom()
    target = make_job(sessions)
    key = png(files)
    streams.publish(target.job_id, TextDelta(words), ImageReady(key=key, width=32, height=32, seed=3), Done(1))

    async def main() -> None:
        await service(sessions, files, streams, CaptioningRenderer(room)).start(target)

    asyncio.run(main())
    assert len(room.photos) == 1
    if len(words) <= 40:
        assert room.captions == [words.strip()] and room.messages == {}
    else:
        assert room.captions == [""] and " ".join(room.messages.values()).split() == words.split()
    assert job_row(sessions, target.job_id).delivered_at is not None


def test_a_restarted_attempt_replaces_the_partial_reply(sessions, files) -> None:
    """A worker died mid-reply: the new attempt's text overwrites what was shown, extra messages go."""
    streams, room = Streams(), Chatroom()
    target = make_job(sessions)

    async def main() -> None:
        task = service(sessions, files, streams, FakeRenderer(room)).start(target)
        streams.publish(target.job_id, *(TextDelta(f"lost{i} " * 8) for i in range(4)))
        await until(lambda: len(room.messages) >= 2)
        streams.publish(target.job_id, Progress(stage="retry", step=2), TextDelta("Hello again."), Done(message_id=1))
        await task

    asyncio.run(main())
    assert list(room.messages.values()) == ["Hello again."]
    assert room.deleted and job_row(sessions, target.job_id).delivery["messages"] == list(room.messages)
