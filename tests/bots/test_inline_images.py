"""A reply's scene picture follows the reply into the same place (issue 8), for every platform's renderer."""

from __future__ import annotations

import asyncio

import pytest

from bots.delivery import Deliveries, Target
from core.db.models import Job
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
from tests.bots.test_delivery import (  # noqa: F401 - the fixtures
    Chatroom,
    FakeRenderer,
    Streams,
    files,
    job_row,
    make_job,
    png,
    sessions,
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
