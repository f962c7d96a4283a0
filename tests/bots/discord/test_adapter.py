"""Adapter logic on real discord.py objects built from payload dicts through discord.py's own state; no network."""

from __future__ import annotations

import argparse
import asyncio
from types import SimpleNamespace
from typing import Any

import discord
import pytest

from bots.delivery import MessageGone, RecipientGone
from bots.discord import guilds
from bots.discord.bot import intents
from bots.discord.buttons import ImageButton, image_view
from bots.discord.cli import add_subparsers
from bots.discord.intake import read_images
from bots.discord.renderer import DiscordRenderer, _translated
from bots.discord.routing import clean_text, incoming, is_addressed
from bots.discord.voice import NO_PINGS, WebhookPool
from bots.render import RetryLater
from tests.bots.discord.fake_discord import (
    BARE_CHANNEL_ID,
    BOT_ID,
    CHANNEL_ID,
    NSFW_CHANNEL_ID,
    FakeDiscord,
    user_payload,
)

USER = user_payload(940000000000000002, "sam")
BOT = user_payload(BOT_ID, "UniChar", bot=True)
HOOK_ID = 970000000000000001


@pytest.fixture
def fake() -> FakeDiscord:
    fake = FakeDiscord()
    fake.base = "http://127.0.0.1:9"  # never contacted: the payload builders only
    return fake


@pytest.fixture
def state(fake: FakeDiscord) -> Any:
    """A logged-in connection state holding the fake guild, as after READY and GUILD_CREATE."""
    client = discord.Client(intents=intents())
    state = client._connection
    state.user = discord.ClientUser(state=state, data=BOT)
    state._add_guild(discord.Guild(data=fake._guild(), state=state))
    return state


def message(state: Any, data: dict[str, Any]) -> discord.Message:
    channel = (
        state._get_guild(int(data["guild_id"])).get_channel(int(data["channel_id"])) if "guild_id" in data else None
    )
    if channel is None:
        channel = discord.DMChannel(
            me=state.user, state=state, data={"id": data["channel_id"], "type": 1, "recipients": [data["author"]]}
        )
    return discord.Message(state=state, channel=channel, data=data)


def _webhook_message(fake: FakeDiscord, hook_id: int) -> Any:
    data = fake.message_event("ahoy", author=user_payload(hook_id, "Alice", bot=True))
    data["webhook_id"] = str(hook_id)
    return SimpleNamespace(id=int(data["id"]), channel_id=CHANNEL_ID, payload=data)


def test_who_gets_an_answer(state: Any, fake: FakeDiscord) -> None:
    def addressed(data: dict[str, Any], *, listening: bool = False) -> bool:
        return is_addressed(message(state, data), BOT_ID, HOOK_ID, listening=listening)

    assert addressed(fake.message_event(f"<@{BOT_ID}> hi", author=USER, mentions=[BOT]))
    assert not addressed(fake.message_event("just people talking", author=USER))
    assert addressed(fake.message_event("just people talking", author=USER), listening=True)
    assert addressed(fake.message_event("in a DM", author=USER, guild=False, channel_id=960000000000000009))
    assert addressed(fake.message_event("reply", author=USER, reference=_webhook_message(fake, HOOK_ID)))
    assert not addressed(fake.message_event("reply", author=USER, reference=_webhook_message(fake, HOOK_ID + 1)))
    # bots and webhooks, the characters included, are never answered: no loops
    assert not addressed(
        fake.message_event(f"<@{BOT_ID}>", author=user_payload(5, "other-bot", bot=True), mentions=[BOT])
    )
    hooked = fake.message_event(f"<@{BOT_ID}>", author=USER, mentions=[BOT])
    hooked["webhook_id"] = str(HOOK_ID + 5)
    assert not addressed(hooked)


def test_text_loses_our_mention_and_keeps_others_readable(state: Any, fake: FakeDiscord) -> None:
    kim = user_payload(940000000000000003, "kim")
    data = fake.message_event(
        f"<@{BOT_ID}> tell <@{kim['id']}> about <#{NSFW_CHANNEL_ID}> @everyone", author=USER, mentions=[BOT, kim]
    )
    text = clean_text(message(state, data), BOT_ID)
    assert text == "tell @kim about #after-dark @\u200beveryone"
    neutral = incoming(message(state, data), text, ())
    assert (neutral.platform, neutral.user_id, neutral.chat_id, neutral.is_group) == (
        "discord",
        USER["id"],
        str(CHANNEL_ID),
        True,
    )


def test_allowed_mentions_ping_nobody_and_limits_match_discord() -> None:
    assert NO_PINGS.to_dict() == {"parse": []}
    assert (DiscordRenderer.limit, DiscordRenderer.edit_interval) == (2000, 1.0)
    wanted = intents()
    assert wanted.message_content and wanted.guild_messages and wanted.dm_messages and wanted.guilds
    assert not (wanted.members or wanted.presences or wanted.voice_states or wanted.guild_reactions)


def test_no_webhook_without_manage_webhooks_or_in_dms(state: Any) -> None:
    pool = WebhookPool(BOT_ID)
    guild = next(iter(state._guilds.values()))
    bare = guild.get_channel(BARE_CHANNEL_ID)
    dm = discord.DMChannel(me=state.user, state=state, data={"id": "5", "type": 1, "recipients": [USER]})
    # both answer without any HTTP call (the state has no session: a call would fail)
    assert asyncio.run(pool.get(bare)) is None
    assert asyncio.run(pool.get(dm)) is None
    assert guild.get_channel(CHANNEL_ID).permissions_for(guild.me).manage_webhooks


def test_attachments_are_refused_before_download_by_type_and_size(state: Any, settings: Any) -> None:
    def attachment(name: str, content_type: str, size: int) -> discord.Attachment:
        data = {
            "id": "1",
            "filename": name,
            "size": size,
            "url": "http://127.0.0.1:9/x",
            "proxy_url": "http://127.0.0.1:9/x",
            "content_type": content_type,
        }
        return discord.Attachment(data=data, state=state)

    intake = asyncio.run(
        read_images(
            [
                attachment("a.pdf", "application/pdf", 10),
                attachment("b.png", "image/png", settings.max_upload_bytes + 1),
            ],
            settings,
        )
    )
    assert intake.images == []
    assert "a.pdf is not an image" in intake.notice and "b.png is too large" in intake.notice


def test_image_buttons_are_persistent_and_rebuilt_from_their_id() -> None:
    view = image_view(42, 7)
    assert view.timeout is None and view.is_persistent()
    ids = [item.custom_id for item in view.children]  # type: ignore[attr-defined]
    assert ids == ["uc:img:regen:42:7", "uc:img:accept:42:7", "uc:img:delete:42:7"]
    match = ImageButton.__discord_ui_compiled_template__.fullmatch(ids[2])
    rebuilt = asyncio.run(ImageButton.from_custom_id(None, None, match))  # type: ignore[arg-type]
    assert (rebuilt.action, rebuilt.job_id, rebuilt.user_id) == ("delete", 42, 7)


def _error(cls: type[discord.HTTPException], status: int, code: int) -> discord.HTTPException:
    response = SimpleNamespace(status=status, reason="x", headers={"Retry-After": "2.5"})
    return cls(response, {"message": "x", "code": code})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (_error(discord.NotFound, 404, 10008), MessageGone),
        (_error(discord.NotFound, 404, 10003), RecipientGone),
        (_error(discord.Forbidden, 403, 50013), RecipientGone),
        (_error(discord.HTTPException, 429, 0), RetryLater),
        (discord.RateLimited(40.0), RetryLater),
    ],
)
def test_discord_errors_become_the_deliverys(error: Exception, expected: type[Exception]) -> None:
    async def fail() -> None:
        raise error

    with pytest.raises(expected):
        asyncio.run(_translated(fail))


def test_guild_settings_list_channels_and_threads_follow_their_parent(state: Any, sessionmaker: Any) -> None:
    guild = next(iter(state._guilds.values()))
    general, after_dark = guild.get_channel(CHANNEL_ID), guild.get_channel(NSFW_CHANNEL_ID)
    thread = discord.Thread(
        guild=guild,
        state=state,
        data={
            "id": "980000000000000001",
            "guild_id": str(guild.id),
            "parent_id": str(NSFW_CHANNEL_ID),
            "name": "t",
            "type": 11,
            "owner_id": USER["id"],
            "message_count": 0,
            "member_count": 1,
            "thread_metadata": {
                "archived": False,
                "auto_archive_duration": 60,
                "archive_timestamp": "2026-11-28T02:00:00+00:00",
                "locked": False,
            },
        },
    )
    with sessionmaker.begin() as session:
        assert guilds.place_of(session, general) == guilds.Place(allowed=True, listen=False, nsfw=False)
        guilds.allow_channel(session, guild.id, after_dark.id, True)
        guilds.set_listen(session, after_dark.id, True)
    with sessionmaker.begin() as session:
        assert not guilds.place_of(session, general).allowed
        assert guilds.place_of(session, after_dark) == guilds.Place(allowed=True, listen=True, nsfw=True)
        assert guilds.place_of(session, thread) == guilds.Place(allowed=True, listen=True, nsfw=True)
        assert guilds.allow_channel(session, guild.id, after_dark.id, False) == []
    with sessionmaker.begin() as session:
        assert guilds.place_of(session, general).allowed  # an empty list: everywhere again


def test_sync_is_a_sub_command_with_an_optional_guild() -> None:
    parser = argparse.ArgumentParser()
    add_subparsers(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["discord", "sync", "--guild", "123"])
    assert (args.action, args.guild) == ("sync", 123)
    assert parser.parse_args(["discord", "sync"]).guild is None
