"""End to end: bad input gets a clear answer or a safe skip, and nothing stored breaks."""

from __future__ import annotations

import io

import pytest
from PIL import Image
from sqlalchemy import select

from core.db.models import Job, Message, User
from tests.bots.telegram.conftest import ANN, BOB, fake_api, jobs, png, run, running_bot
from tests.bots.telegram.fake_bot_api import FakeBotApi
from tests.conftest import Live, count_rows

pytestmark = [pytest.mark.e2e, pytest.mark.integration]


def texts(fake: FakeBotApi, chat_id: int) -> list[str]:
    return [m.text for m in fake.bot_messages(chat_id)]


async def answered(fake: FakeBotApi, chat_id: int, count: int) -> list[str]:
    """Wait until the bot has posted ``count`` messages in the chat; returns their texts."""
    await fake.wait_for(lambda: len(fake.bot_messages(chat_id)) >= count)
    return texts(fake, chat_id)


def bomb() -> bytes:
    """A small PNG that decodes to 64 megapixels."""
    out = io.BytesIO()
    Image.new("1", (8000, 8000)).save(out, format="PNG")
    return out.getvalue()


def test_refused_pictures_store_nothing(tg: Live) -> None:
    truncated = png((256, 256), 5)[:400]

    async def body() -> None:
        async with fake_api() as fake, running_bot(tg, fake, max_upload_bytes=2 * 1024 * 1024):
            await fake.send(ANN, ANN, document=("cat.jpg", "image/jpeg", b"MZ\x90\x00 not a picture"), caption="look")
            await fake.send(ANN, ANN, photo=png(), caption="too big?", claimed_size=30 * 1024 * 1024)
            await fake.send(ANN, ANN, document=("broken.png", "image/png", truncated))
            await fake.send(ANN, ANN, document=("bomb.png", "image/png", bomb()))
            replies = await answered(fake, ANN, 4)
            assert "cat.jpg" in replies[0] and replies[0].startswith("⚠️")
            assert "limit" in replies[1]
            assert "broken.png" in replies[2]
            assert "bomb.png" in replies[3]
            assert len(fake.called("getFile")) == 3  # the oversized photo was never downloaded
            assert count_rows(tg.sessionmaker, Job, Message) == {"jobs": 0, "messages": 0}

    run(body)


def test_stickers_voice_and_other_files_get_a_clear_answer(tg: Live) -> None:
    async def body() -> None:
        async with fake_api() as fake, running_bot(tg, fake):
            await fake.send(ANN, ANN, sticker=True)
            await fake.send(ANN, ANN, voice=True)
            await fake.send(ANN, ANN, document=("report.pdf", "application/pdf", b"%PDF-1.4"))
            replies = await answered(fake, ANN, 3)
            assert "stickers" in replies[0]
            assert "voice" in replies[1]
            assert "report.pdf" in replies[2]
            assert jobs(tg) == []

    run(body)


def test_an_edited_message_does_not_get_a_second_reply(tg: Live) -> None:
    async def body() -> None:
        async with fake_api() as fake, running_bot(tg, fake):
            first = await fake.send(ANN, ANN, "first words")
            await fake.wait_for(lambda: jobs(tg) and jobs(tg)[0].delivered_at is not None)
            await fake.edit(ANN, ANN, first, "edited words")
            await fake.send(ANN, ANN, "/status")  # processed after the edit: proves the edit was seen
            await fake.wait_for(lambda: any("requests" in t for t in texts(fake, ANN)))
            assert len(jobs(tg)) == 1
            assert texts(fake, ANN)[0] == "echo: first words"

    run(body)


def test_unknown_commands_and_overlong_messages_are_explained(tg: Live) -> None:
    async def body() -> None:
        async with fake_api() as fake, running_bot(tg, fake, max_message_chars=50):
            await fake.send(ANN, ANN, "/dance")
            await fake.send(ANN, ANN, "x" * 60)
            await fake.send(ANN, ANN, "/use Nobody")
            replies = await answered(fake, ANN, 3)
            assert "don't know that command" in replies[0]
            assert "limit is 50" in replies[1]
            assert "Nobody" in replies[2]
            assert jobs(tg) == []

    run(body)


def blocked(live: Live, user_id: int) -> bool:
    with live.sessionmaker() as session:
        user = session.scalars(select(User).filter_by(platform_user_id=str(user_id))).first()
        return bool(user and user.blocked_bot)


def test_a_user_who_blocked_the_bot_is_marked_and_skipped(tg: Live) -> None:
    async def body() -> None:
        async with fake_api() as fake, running_bot(tg, fake):
            fake.blocked.add(BOB)  # blocked between asking and the answer
            await fake.send(BOB, BOB, "are you still there?")
            await fake.wait_for(lambda: jobs(tg) and jobs(tg)[0].delivered_at is not None)
            job = jobs(tg)[0]
            assert job.delivery["skipped"] == "recipient gone"
            assert blocked(tg, BOB)
            assert fake.bot_messages(BOB) == []

            await fake.send(ANN, ANN, "hi")  # Ann has never blocked it
            await fake.wait_for(lambda: len(jobs(tg)) == 2 and jobs(tg)[1].delivered_at is not None)
            await fake.block(ANN)
            await fake.wait_for(lambda: blocked(tg, ANN))

    run(body)
