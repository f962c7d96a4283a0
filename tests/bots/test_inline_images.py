"""A reply's scene picture follows the reply into the same place (issue 8), for every platform's renderer."""

from __future__ import annotations

import asyncio
import io

import pytest
from PIL import Image

from bots.delivery import Deliveries, MessageGone, Target
from core.db.models import Job, Message
from core.jobs import (
    Done,
    Failed,
    ImageFollows,
    ImageReady,
    ImageRefused,
    JobKind,
    JobState,
    Progress,
    TextDelta,
)
from tests.bots.test_delivery import (
    Chatroom,
    FakeRenderer,
    Streams,
    job_row,
    make_job,
    png,
    until,
)


class CaptioningRenderer(FakeRenderer):
    """A platform whose pictures carry captions of up to 40 units; it remembers which job each renderer serves."""

    caption_limit = 40

    def __init__(self, room: Chatroom, target: Target, served: list[Target]) -> None:
        super().__init__(room)
        served.append(target)


def picture_job(sessions, chat: Target) -> int:
    """The IMAGE job a reply queued for its scene picture."""
    with sessions.begin() as session:
        parent = session.get(Job, chat.job_id)
        job = Job(kind=JobKind.IMAGE, state=JobState.RUNNING, user_id=parent.user_id,
                  conversation_id=parent.conversation_id, request_message_id=parent.request_message_id,
                  params={"scene": True, "seed": 5})
        session.add(job)
        session.flush()
        return job.id


def deliver(sessions, files, streams: Streams, room: Chatroom, target: Target) -> list[Target]:
    served: list[Target] = []
    deliveries = Deliveries(sessions, streams.follow, files, lambda t: CaptioningRenderer(room, t, served), "test")

    async def main() -> None:
        await deliveries.start(target)

    asyncio.run(main())
    return served


@pytest.mark.parametrize("words", ["Here I am at the beach!", "A much longer reply, " * 5])
def test_the_picture_follows_the_reply_captioned_when_short(sessions, files, words: str) -> None:
    streams, room, target = Streams(), Chatroom(), make_job(sessions)
    picture = picture_job(sessions, target)
    key = png(files)
    streams.publish(target.job_id, TextDelta(words), ImageFollows(picture), Done(1))
    streams.publish(picture, Progress(stage="image", step=1, total=2), ImageReady(key, 32, 32, 5), Done(None))
    served = deliver(sessions, files, streams, room, target)
    assert len(room.photos) == 1
    if len(words) <= 40:
        assert room.captions == [words.strip()] and room.messages == {}
    else:
        assert room.captions == [""] and " ".join(room.messages.values()).split() == words.split()
    assert [t.job_id for t in served if t.kind is JobKind.IMAGE] == [picture]  # its buttons act on the picture job
    assert job_row(sessions, target.job_id).delivered_at is not None
    assert job_row(sessions, picture).delivered_at is not None
    assert job_row(sessions, picture).delivery["parent"] == target.job_id


def test_a_refused_picture_is_a_line_after_the_reply(sessions, files) -> None:
    streams, room, target = Streams(), Chatroom(), make_job(sessions)
    streams.publish(target.job_id, TextDelta("Sure!"), ImageRefused("You have used your 2 pictures today."), Done(1))
    deliver(sessions, files, streams, room, target)
    assert list(room.messages.values()) == ["Sure!", "🖼️ You have used your 2 pictures today."]
    assert room.photos == []


def test_a_failed_picture_leaves_the_reply_as_it_is(sessions, files) -> None:
    streams, room, target = Streams(), Chatroom(), make_job(sessions)
    picture = picture_job(sessions, target)
    streams.publish(target.job_id, TextDelta("Look at this!"), ImageFollows(picture), Done(1))
    streams.publish(picture, Progress(stage="image", step=1, total=4), Failed("Sorry, something went wrong."))
    deliver(sessions, files, streams, room, target)
    texts = list(room.messages.values())
    assert texts[0] == "Look at this!" and texts[-1].startswith("⚠️ The picture could not be made")
    assert room.photos == [] and job_row(sessions, target.job_id).delivered_at is not None


def test_a_restarted_bot_never_delivers_the_picture_on_its_own(sessions, files) -> None:
    streams, room, target = Streams(), Chatroom(), make_job(sessions)
    picture = picture_job(sessions, target)
    streams.publish(target.job_id, TextDelta("Wait for it"), ImageFollows(picture), Done(1))
    served: list[Target] = []
    deliveries = Deliveries(sessions, streams.follow, files, lambda t: CaptioningRenderer(room, t, served), "test")

    async def first_life() -> None:
        deliveries.start(target)
        await asyncio.sleep(0.3)  # the reply is shown; the picture is still rendering
        await deliveries.stop()

    asyncio.run(first_life())
    assert job_row(sessions, picture).delivery == {"parent": target.job_id}
    streams.publish(picture, ImageReady(png(files), 32, 32, 5), Done(None))

    async def second_life() -> list[int]:
        resumed = await deliveries.resume()
        await deliveries.wait_all()
        return resumed

    assert asyncio.run(second_life()) == [target.job_id]  # the reply's delivery, which shows the picture
    assert len(room.photos) == 1 and room.captions == ["Wait for it"]


class AttachingRenderer(FakeRenderer):
    """A platform that puts a picture on a message it already posted, as Discord does with its webhook messages."""

    def __init__(self, room: Chatroom, target: Target, served: list[Target]) -> None:
        super().__init__(room)
        self.target = target
        served.append(target)

    async def edit_text(self, message_id: str, text: str) -> None:
        await super().edit_text(message_id, text)
        self.room.history.append((message_id, text))  # type: ignore[attr-defined]

    async def attach_image(self, message_id: str, data: bytes, text: str) -> str:
        if message_id in self.room.deleted:
            raise MessageGone(message_id)
        Image.open(io.BytesIO(data)).verify()
        self.room.messages[message_id] = text
        self.room.pictures[message_id] = self.target.job_id  # type: ignore[attr-defined]  # its buttons' job
        return message_id


class Room(Chatroom):
    """A chat room that also keeps every edit and which message carries which job's picture."""

    def __init__(self) -> None:
        super().__init__()
        self.history: list[tuple[str, str]] = []
        self.pictures: dict[str, int] = {}


def attach_deliver(sessions, files, streams: Streams, room: Room, target: Target, *, between=None) -> list[Target]:
    """Deliver with the attaching renderer; ``between`` runs once the picture's progress is shown."""
    served: list[Target] = []
    deliveries = Deliveries(sessions, streams.follow, files, lambda t: AttachingRenderer(room, t, served), "test")

    async def main() -> None:
        task = deliveries.start(target)
        if between is not None:
            await until(lambda: any("🎨" in text for _id, text in room.history))
            between()
        await task

    asyncio.run(main())
    return served


def with_reply_row(sessions, target: Target, words: str) -> int:
    """The character's reply row, as the worker writes it with the job's result."""
    with sessions.begin() as session:
        job = session.get(Job, target.job_id)
        chat_id = session.get(Message, job.request_message_id).chat_id
        reply = Message(conversation_id=job.conversation_id, chat_id=chat_id, role="character", text=words)
        session.add(reply)
        session.flush()
        job.reply_message_id = reply.id
        return reply.id


@pytest.mark.parametrize("words", ["Here I am at the beach!", "A much longer reply that fills messages. " * 6])
def test_an_attaching_platform_puts_the_picture_on_the_replys_last_message(sessions, files, words: str) -> None:
    streams, room, target = Streams(), Room(), make_job(sessions)
    picture = picture_job(sessions, target)
    reply_id = with_reply_row(sessions, target, words)
    streams.publish(target.job_id, TextDelta(words), ImageFollows(picture), Done(reply_id))
    key = png(files)
    streams.publish(picture, Progress(stage="image", step=1, total=2))

    served = attach_deliver(
        sessions, files, streams, room, target,
        between=lambda: streams.publish(picture, ImageReady(key, 32, 32, 5), Done(None)),
    )
    last = list(room.messages)[-1]
    assert room.photos == [] and room.deleted == []  # no message of its own, nothing removed
    assert room.pictures == {last: picture}  # on the reply's last message, with the picture job's buttons
    assert " ".join(room.messages.values()).split() == words.split()  # the progress line is gone again
    assert (last, f"{room.messages[last]}\n\n🎨 Drawing your picture: ▰▰▰▰▰▱▱▱▱▱ 50%") in room.history
    assert [t.job_id for t in served if t.kind is JobKind.IMAGE] == [picture]
    job = job_row(sessions, target.job_id)
    assert job.delivery["photos"] == [last] and job.delivery["messages"] == list(room.messages)
    assert job_row(sessions, picture).delivery == {"parent": target.job_id, "photos": [last]}
    with sessions() as session:
        assert session.get(Message, reply_id).platform_reply_ids == list(room.messages)


def test_a_deleted_reply_gets_its_picture_on_a_new_message_with_its_words(sessions, files) -> None:
    streams, room, target = Streams(), Room(), make_job(sessions)
    picture = picture_job(sessions, target)
    streams.publish(target.job_id, TextDelta("Look at the sea!"), ImageFollows(picture), Done(1))
    streams.publish(picture, Progress(stage="image", step=1, total=4))
    key = png(files)

    def someone_deletes_the_reply() -> None:
        room.deleted.append(next(iter(room.messages)))
        streams.publish(picture, ImageReady(key, 32, 32, 5), Done(None))

    attach_deliver(sessions, files, streams, room, target, between=someone_deletes_the_reply)
    assert room.photos == ["photo1"] and room.captions == ["Look at the sea!"] and room.pictures == {}
    job = job_row(sessions, target.job_id)
    assert job.delivery["messages"] == ["photo1"] == job.delivery["photos"] and job.delivered_at is not None


def test_a_failed_picture_turns_the_progress_under_the_reply_into_the_error(sessions, files) -> None:
    streams, room, target = Streams(), Room(), make_job(sessions)
    picture = picture_job(sessions, target)
    streams.publish(target.job_id, TextDelta("Look at this!"), ImageFollows(picture), Done(1))
    streams.publish(picture, Progress(stage="image", step=1, total=4))
    attach_deliver(
        sessions, files, streams, room, target,
        between=lambda: streams.publish(picture, Failed("Sorry, something went wrong.")),
    )
    assert list(room.messages.values()) == [
        "Look at this!\n\n⚠️ The picture could not be made: Sorry, something went wrong."
    ]
    assert room.photos == [] and room.pictures == {} and job_row(sessions, target.job_id).delivered_at is not None


def test_an_image_jobs_status_line_becomes_its_picture(sessions, files) -> None:
    streams, room = Streams(), Room()
    target = make_job(sessions, JobKind.IMAGE)
    key = png(files)
    streams.publish(target.job_id, Progress(stage="queued", position=2), Progress(stage="image", step=1, total=2))
    attach_deliver(
        sessions, files, streams, room, target,
        between=lambda: streams.publish(target.job_id, ImageReady(key, 32, 32, 5), Done(None)),
    )
    [status] = room.messages
    assert room.messages == {status: ""} and room.pictures == {status: target.job_id}
    assert room.photos == [] and room.deleted == []
    job = job_row(sessions, target.job_id)
    assert job.delivery["photos"] == [status] and "status" not in job.delivery and job.delivered_at is not None
