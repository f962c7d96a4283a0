"""End to end: the real bot against the loopback fake Discord, jobs through the worker's code path."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import select

from core.db.models import CharacterSubmission, Job
from tests.bots.discord.conftest import ADMIN_ID, OTHER_ID, USER_ID, png, run, running_bot
from tests.bots.discord.fake_discord import (
    BARE_CHANNEL_ID,
    BOT_ID,
    CHANNEL_ID,
    NSFW_CHANNEL_ID,
    FakeDiscord,
    Posted,
    user_payload,
)

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

USER = user_payload(USER_ID, "sam")
OTHER = user_payload(OTHER_ID, "kim")
ADMIN = user_payload(ADMIN_ID, "ada")
BOT = user_payload(BOT_ID, "UniChar", bot=True)


def _final_reply(fake: FakeDiscord, channel: int = CHANNEL_ID, via: str = "webhook") -> Any:
    return fake.in_channel(channel, via=via)


def _text_of(posted: Posted) -> str:
    if posted.content:
        return posted.content
    embeds = posted.payload.get("embeds") or []
    return embeds[0].get("description") or "" if embeds else ""


async def _wait_text(fake: FakeDiscord, startswith: str, channel: int = CHANNEL_ID, via: str | None = None) -> Posted:
    def found() -> Posted | None:
        return next((m for m in fake.in_channel(channel, via=via) if _text_of(m).startswith(startswith)), None)

    return await fake.wait_until(found)


def test_mention_gets_a_streamed_webhook_reply(settings, sessions, worker) -> None:
    async def body() -> None:
        async with running_bot(settings, sessions, worker) as (fake, bot):
            event = fake.message_event(f"<@{BOT_ID}> hello there @everyone", author=USER, mentions=[BOT])
            await fake.dispatch("MESSAGE_CREATE", event)
            reply = await _wait_text(fake, "echo:", via="webhook")
            await bot.deliveries.wait_all()
            assert reply.username == "Alice"
            assert "hello there" in reply.content
            assert reply.payload["allowed_mentions"] == {"parse": []}  # generated text pings nobody
            assert len(fake.calls("POST", r"/channels/\d+/webhooks")) == 1
            assert CHANNEL_ID in fake.typing
            # a second message reuses the channel's webhook
            await fake.dispatch("MESSAGE_CREATE", fake.message_event(f"<@{BOT_ID}> again", author=USER, mentions=[BOT]))
            await fake.wait_until(lambda: len(fake.in_channel(CHANNEL_ID, via="webhook")) >= 2)
            await bot.deliveries.wait_all()
            assert len(fake.calls("POST", r"/channels/\d+/webhooks")) == 1
        with sessions() as session:
            jobs = session.scalars(select(Job)).all()
            assert jobs and all(job.delivered_at is not None for job in jobs)

    run(body())
