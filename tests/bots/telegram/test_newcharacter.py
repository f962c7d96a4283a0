"""End to end: /newcharacter with the 10 pictures of a RoleScape character, then the admins' review."""

from __future__ import annotations

import pytest
from sqlalchemy import select
from sqlalchemy.orm import selectinload

from core.db.models import CharacterSubmission, Notification
from core.submissions import State
from tests.bots.telegram.conftest import (
    ADMIN,
    ANN,
    BOB,
    character_pictures,
    fake_api,
    png,
    run,
    running_bot,
)
from tests.bots.telegram.fake_bot_api import FakeBotApi
from tests.conftest import Live

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

DESCRIPTION = "A cheerful cat-eared girl who plays mahjong, says nyaa, and cheers her friends on."


def texts(fake: FakeBotApi, chat_id: int) -> list[str]:
    return [m.text for m in fake.bot_messages(chat_id)]


async def said(fake: FakeBotApi, chat_id: int, part: str) -> str:
    """Wait for a bot message in ``chat_id`` that contains ``part``."""
    return await fake.wait_for(lambda: next((t for t in texts(fake, chat_id) if part in t), None))


def submission(live: Live) -> CharacterSubmission | None:
    with live.sessionmaker() as session:
        query = select(CharacterSubmission).options(selectinload(CharacterSubmission.images))
        return session.scalars(query.order_by(CharacterSubmission.id.desc())).first()


def undelivered(live: Live) -> list[Notification]:
    with live.sessionmaker() as session:
        return list(session.scalars(select(Notification).where(Notification.delivered_at.is_(None))))


async def fill_texts(fake: FakeBotApi, name: str = "Ichihime II") -> None:
    await fake.send(ANN, ANN, "/newcharacter")
    await said(fake, ANN, "What is their name?")
    await fake.send(ANN, ANN, name)
    await said(fake, ANN, "Describe")
    await fake.send(ANN, ANN, DESCRIPTION)
    await said(fake, ANN, "greet")
    await fake.send(ANN, ANN, "Nyaa~ want to play a round?")
    await said(fake, ANN, "different pictures")


def test_newcharacter_album_consent_submit_and_admin_approval(tg: Live) -> None:
    pictures = character_pictures()

    async def body() -> None:
        async with fake_api() as fake, running_bot(tg, fake):
            await fill_texts(fake)
            for picture in pictures:
                await fake.send(ANN, ANN, photo=picture, media_group_id="album-ichihime")
            await said(fake, ANN, "10 of 10")
            question = await fake.wait_for(lambda: next((m for m in fake.bot_messages(ANN) if m.buttons), None))
            assert "consent" in question.text.lower() or "right to use" in question.text
            await fake.press(ANN, ANN, question.message_id, "nc:attest:fictional")
            await said(fake, ANN, "Submitted")
            draft = submission(tg)
            assert draft is not None and draft.state == State.PENDING and len(draft.images) == 10
            await said(fake, ANN, "waiting for review")  # the notification, delivered once
            await said(fake, ADMIN, "to review")  # the admins hear of it

            await fake.send(BOB, BOB, f"/approve {draft.id}")
            await said(fake, BOB, "Only an admin")
            await fake.send(ADMIN, ADMIN, "/queue")
            await said(fake, ADMIN, "Ichihime II")
            await fake.send(ADMIN, ADMIN, f"/review {draft.id}")
            await fake.wait_for(lambda: any(m.photo for m in fake.bot_messages(ADMIN)))
            await fake.send(ADMIN, ADMIN, f"/approve {draft.id}")
            await said(fake, ADMIN, "training job")
            await said(fake, ANN, "was approved")
            assert submission(tg).state == State.APPROVED
            await fake.wait_for(lambda: not undelivered(tg))
            assert len([t for t in texts(fake, ANN) if "was approved" in t]) == 1

    run(body)


def test_photos_one_by_one_with_a_running_count_and_refusals(tg: Live) -> None:
    async def body() -> None:
        async with fake_api() as fake, running_bot(tg, fake):
            await fill_texts(fake, "Counter")
            for seed in range(9):
                await fake.send(ANN, ANN, photo=png((96, 96), seed))
                await said(fake, ANN, f"{seed + 1} of 10")
            assert submission(tg).step == "images"  # 9 are not enough
            await fake.send(ANN, ANN, photo=png((96, 96), 3))  # the same picture again
            await said(fake, ANN, "near-duplicate")
            await fake.send(ANN, ANN, document=("face.jpg", "image/jpeg", b"this is not a picture at all"))
            await said(fake, ANN, "not a")  # refused by its content, whatever its name and type claim
            await fake.send(ANN, ANN, "here is some text")
            await said(fake, ANN, "not what this step needs")
            await fake.send(ANN, ANN, sticker=True)
            await fake.wait_for(lambda: len([t for t in texts(fake, ANN) if "not what this step needs" in t]) == 2)
            assert len(submission(tg).images) == 9
            await fake.send(ANN, ANN, photo=png((96, 96), 42))
            await said(fake, ANN, "10 of 10")
            await fake.wait_for(lambda: any(m.buttons for m in fake.bot_messages(ANN)))
            await fake.send(ANN, ANN, photo=png((96, 96), 43))  # an 11th
            await said(fake, ANN, "already has 10 images")
            assert len(submission(tg).images) == 10

    run(body)


def test_cancel_at_any_step_deletes_the_draft(tg: Live) -> None:
    async def body() -> None:
        async with fake_api() as fake, running_bot(tg, fake):
            await fake.send(ANN, ANN, "/newcharacter")
            await said(fake, ANN, "What is their name?")
            await fake.send(ANN, ANN, "Shortlived")
            await said(fake, ANN, "Describe")
            await fake.send(ANN, ANN, "/cancel")
            await said(fake, ANN, "Cancelled")
            assert submission(tg).state == State.CANCELLED
            await fake.send(ANN, ANN, "hello again")  # plain chat once more
            await said(fake, ANN, "echo: hello again")

    run(body)


def test_the_dialog_survives_a_bot_restart(tg: Live) -> None:
    async def body() -> None:
        async with fake_api() as fake:
            async with running_bot(tg, fake):
                await fake.send(ANN, ANN, "/newcharacter")
                await said(fake, ANN, "What is their name?")
                await fake.send(ANN, ANN, "Phoenix")
                await said(fake, ANN, "Describe")
            async with running_bot(tg, fake):  # a new process: the step comes from SQL
                await fake.send(ANN, ANN, DESCRIPTION)
                await said(fake, ANN, "greet")
                assert submission(tg).description == DESCRIPTION

    run(body)


def test_reject_tells_the_submitter_why(tg: Live) -> None:
    async def body() -> None:
        async with fake_api() as fake, running_bot(tg, fake):
            await fill_texts(fake, "Rejectee")
            for seed in range(10):
                await fake.send(ANN, ANN, photo=png((96, 96), seed + 100), media_group_id="g2")
            question = await fake.wait_for(lambda: next((m for m in fake.bot_messages(ANN) if m.buttons), None))
            await fake.press(ANN, ANN, question.message_id, "nc:attest:real")
            await said(fake, ANN, "Submitted")
            draft = submission(tg)
            assert draft.real_person is True and draft.consent_attested is True
            await fake.send(ADMIN, ADMIN, f"/reject {draft.id}")
            await said(fake, ADMIN, "Usage: /reject")
            await fake.send(ADMIN, ADMIN, f"/reject {draft.id} the pictures show several different people")
            await said(fake, ADMIN, "Rejected")
            await said(fake, ANN, "several different people")
            assert submission(tg).state == State.REJECTED

    run(body)
