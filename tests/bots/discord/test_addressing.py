"""Who answers in Discord (issue 6's gaps): a reply to a character's message, and a thread without its own choice.

A reply to a character's message is answered by that character, for that message only: the channel's character
(``/character use``) stays as it was. A thread follows its parent channel's character until one is picked in the
thread itself. Both run through the real bot, the loopback fake Discord and the worker path.
"""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import select

from core.db.models import Character, Chat, Conversation, Job
from tests.bots.discord.conftest import USER_ID, run, running_bot
from tests.bots.discord.fake_discord import (
    BARE_CHANNEL_ID,
    CHANNEL_ID,
    THREAD_ID,
    FakeDiscord,
    Posted,
    user_payload,
)
from tests.bots.discord.test_e2e import _command, _mention, _opt, _text_of, _wait_text

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

USER = user_payload(USER_ID, "sam")


def _speaker(posted: Posted) -> str:
    """Who a character's message shows: the webhook's username, or the embed author where webhooks are missing."""
    return posted.username if posted.via == "webhook" else posted.payload["embeds"][0]["author"]["name"]


def _characters_of_jobs(stack: Any) -> list[str]:
    """The character each chat job's conversation is with, oldest first."""
    with stack.sessions() as session:
        rows = session.execute(
            select(Character.name)
            .join(Conversation, Conversation.character_id == Character.id)
            .join(Job, Job.conversation_id == Conversation.id)
            .order_by(Job.id)
        )
        return list(rows.scalars())


def _active_character(stack: Any, channel_id: int) -> str | None:
    with stack.sessions() as session:
        chat = session.scalars(select(Chat).where(Chat.platform_chat_id == str(channel_id))).one()
        character = session.get(Character, chat.active_character_id) if chat.active_character_id else None
        return character.name if character else None


async def _use(fake: FakeDiscord, name: str, channel_id: int = CHANNEL_ID) -> str:
    data = _command("character", _opt("name", name), sub="use")
    event = fake.interaction_event(user=USER, channel_id=channel_id, data=data)
    await fake.dispatch("INTERACTION_CREATE", event)
    return (await fake.wait_until(lambda: fake.callbacks.get(event["token"])))["data"]["content"]


async def _say(fake: FakeDiscord, bot: Any, event: dict[str, Any], channel_id: int = CHANNEL_ID) -> Posted:
    """Send ``event`` and return the character's answer to it once delivered."""
    await fake.dispatch("MESSAGE_CREATE", event)
    answer = await _wait_text(fake, f"echo: {event['content'].split('> ', 1)[-1]}", channel=channel_id)
    await bot.deliveries.wait_all()
    return answer


@pytest.fixture
def bram(stack: Any) -> Any:
    """A third character, allowed everywhere (Vex is adults-only)."""
    with stack.sessions.begin() as session:
        session.add(Character(name="Bram", description="A gruff blacksmith."))
    return stack


def test_a_reply_to_a_characters_message_is_answered_by_that_character(bram: Any) -> None:
    async def body() -> None:
        async with running_bot(bram) as (fake, bot):
            first = await _say(fake, bot, _mention(fake, "first"))
            assert "Bram" in await _use(fake, "Bram")
            second = await _say(fake, bot, _mention(fake, "second"))
            to_alice = fake.message_event("only you, Alice", author=USER, reference=first)  # no mention needed
            answer = await _say(fake, bot, to_alice)
            third = await _say(fake, bot, _mention(fake, "third"))
            assert [_speaker(m) for m in (first, second, answer, third)] == ["Alice", "Bram", "Alice", "Bram"]
            assert _active_character(bram, CHANNEL_ID) == "Bram"  # the channel's choice stayed

            # where webhooks are missing the character is the embed's author, and a reply reaches it the same way
            bare = await _say(fake, bot, _mention(fake, "here?", channel_id=BARE_CHANNEL_ID), BARE_CHANNEL_ID)
            assert "Bram" in await _use(fake, "Bram", BARE_CHANNEL_ID)
            reply = fake.message_event("and you?", author=USER, channel_id=BARE_CHANNEL_ID, reference=bare)
            assert _speaker(await _say(fake, bot, reply, BARE_CHANNEL_ID)) == "Alice"
        assert _characters_of_jobs(bram) == ["Alice", "Bram", "Alice", "Bram", "Alice", "Alice"]

    run(body())


def test_a_thread_follows_its_channels_character_until_it_picks_its_own(bram: Any) -> None:
    async def body() -> None:
        async with running_bot(bram) as (fake, bot):
            await _use(fake, "Bram")
            in_thread = await _say(fake, bot, _mention(fake, "in the thread", channel_id=THREAD_ID), THREAD_ID)
            assert _speaker(in_thread) == "Bram"

            show = fake.interaction_event(user=USER, channel_id=THREAD_ID, data=_command("memory", sub="show"))
            await fake.dispatch("INTERACTION_CREATE", show)
            memory = (await fake.wait_until(lambda: fake.callbacks.get(show["token"])))["data"]["content"]
            assert memory.startswith("What Bram remembers of you") and "2 messages" in memory

            assert "Alice" in await _use(fake, "Alice", THREAD_ID)  # the thread's own choice now
            own = await _say(fake, bot, _mention(fake, "still here", channel_id=THREAD_ID), THREAD_ID)
            channel = await _say(fake, bot, _mention(fake, "and the channel"))
            assert (_speaker(own), _speaker(channel)) == ("Alice", "Bram")
            assert _active_character(bram, CHANNEL_ID) == "Bram" and _active_character(bram, THREAD_ID) == "Alice"
            assert _text_of(own).startswith("echo: ")

    run(body())
