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


def _command(name: str, *options: dict[str, Any], sub: str | None = None) -> dict[str, Any]:
    """The data of a slash-command interaction."""
    opts = list(options)
    if sub is not None:
        opts = [{"name": sub, "type": 1, "options": opts}]
    return {"id": "1", "name": name, "type": 1, "options": opts}


def _opt(name: str, value: Any, kind: int = 3) -> dict[str, Any]:
    return {"name": name, "type": kind, "value": value}


async def _imagine(fake: FakeDiscord, bot: Any, prompt: str = "a boat at dusk") -> Posted:
    """Run /imagine as USER and return the posted image message once delivered."""
    event = fake.interaction_event(user=USER, data=_command("imagine", _opt("prompt", prompt)))
    await fake.dispatch("INTERACTION_CREATE", event)
    image = await fake.wait_until(lambda: next((m for m in fake.in_channel(CHANNEL_ID) if m.files), None))
    await bot.deliveries.wait_all()
    assert fake.callbacks[event["token"]]["type"] == 5  # deferred first
    return image


def test_imagine_delivers_an_image_with_buttons_only_the_requester_can_press(settings, sessions, worker) -> None:
    async def body() -> None:
        async with running_bot(settings, sessions, worker) as (fake, bot):
            image = await _imagine(fake, bot)
            assert image.via == "webhook" and image.username == "Alice"
            data = next(iter(image.files.values()))
            assert data.startswith(b"\x89PNG")
            buttons = [c["custom_id"] for row in image.payload["components"] for c in row["components"]]
            assert [b.split(":")[2] for b in buttons] == ["regen", "accept", "delete"]
            assert all(b.endswith(f":{USER_ID}") for b in buttons)
            # the status message (queue position / progress) is gone once the image is there
            assert [m for m in fake.in_channel(CHANNEL_ID) if not m.files] == []

            accept = buttons[1]
            press = fake.interaction_event(
                user=OTHER, kind=3, data={"custom_id": accept, "component_type": 2}, message=image
            )
            await fake.dispatch("INTERACTION_CREATE", press)
            refusal = await fake.wait_until(lambda: fake.callbacks.get(press["token"]))
            assert refusal["type"] == 4 and refusal["data"]["flags"] & 64  # private
            assert "Only the person" in refusal["data"]["content"]
            assert image.payload["components"]  # untouched

            press = fake.interaction_event(
                user=USER, kind=3, data={"custom_id": accept, "component_type": 2}, message=image
            )
            await fake.dispatch("INTERACTION_CREATE", press)
            answer = await fake.wait_until(lambda: fake.callbacks.get(press["token"]))
            assert answer["type"] == 7 and image.payload["components"] == []
        with sessions() as session:
            job = session.scalars(select(Job).where(Job.kind == "image")).one()
            assert job.delivery["accepted_by"] == str(USER_ID) and job.delivered_at is not None

    run(body())
