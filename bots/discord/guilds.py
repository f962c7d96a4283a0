"""Per-guild and per-channel settings: where characters may speak, where they listen to every message.

Stored in ``Chat`` rows: the guild's row (``platform_chat_id = "guild:<id>"``) keeps ``settings["channels"]``, the
channels where characters may speak (empty: everywhere); a channel's row keeps ``settings["listen"]`` (a character
answers every message there, not only mentions and replies) and ``nsfw_allowed``, which follows Discord's
age-restricted flag of the channel (a thread follows its parent). A thread also follows its parent channel's
character (``/character use``) until one is picked in the thread itself. Reading is cheap and done per message.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import discord

from bots.discord.routing import PLATFORM
from core.db import repositories as repo
from core.db.models import Character

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from core.db.models import Chat, User

__all__ = [
    "Place",
    "addressed",
    "allow_channel",
    "guild_key",
    "home_channel",
    "is_age_restricted",
    "place_of",
    "set_listen",
]


def guild_key(guild_id: int) -> str:
    """The ``Chat.platform_chat_id`` of a guild's settings row."""
    return f"guild:{guild_id}"


def home_channel(channel: discord.abc.Messageable) -> discord.abc.Messageable:
    """The channel whose settings apply: a thread's parent, else the channel itself."""
    if isinstance(channel, discord.Thread) and channel.parent is not None:
        return channel.parent
    return channel


def is_age_restricted(channel: discord.abc.Messageable) -> bool:
    """Whether Discord marks the channel (or a thread's parent) age-restricted."""
    home = home_channel(channel)
    return bool(getattr(home, "is_nsfw", lambda: False)())


@dataclass(frozen=True, slots=True)
class Place:
    """What the settings say about one channel: may characters speak, do they listen to all, NSFW allowed.

    ``character_id`` is the parent channel's character for a thread that has none of its own (else None: the chat
    service picks as usual).
    """

    allowed: bool
    listen: bool
    nsfw: bool
    character_id: int | None = None


def place_of(session: Session, channel: discord.abc.Messageable) -> Place:
    """The settings of ``channel`` (DMs: allowed, listening, never NSFW); records its age-restricted flag."""
    guild = getattr(channel, "guild", None)
    if guild is None:
        return Place(allowed=True, listen=True, nsfw=False)
    home = home_channel(channel)
    guild_row = repo.get_or_create_chat(session, PLATFORM, guild_key(guild.id), is_group=True)
    channels = [int(c) for c in (guild_row.settings or {}).get("channels", [])]
    row = repo.get_or_create_chat(session, PLATFORM, str(channel.id), is_group=True)  # type: ignore[attr-defined]
    nsfw = is_age_restricted(channel)
    if row.nsfw_allowed != nsfw:
        row.nsfw_allowed = nsfw
    parent = None
    if home is not channel:  # a thread: its parent channel's settings and character count too
        parent = repo.get_or_create_chat(session, PLATFORM, str(home.id), is_group=True)  # type: ignore[attr-defined]
    listen = bool((row.settings or {}).get("listen") or (parent and (parent.settings or {}).get("listen")))
    inherited = parent.active_character_id if parent is not None and row.active_character_id is None else None
    allowed = not channels or home.id in channels  # type: ignore[attr-defined]
    return Place(allowed=allowed, listen=listen, nsfw=nsfw, character_id=inherited)


def addressed(
    session: Session, user: User, chat: Chat, character_id: int | None, default_name: str
) -> Character | None:
    """Who answers: the character a message addresses (``character_id``, when published), else the chat's choice."""
    character = session.get(Character, character_id) if character_id is not None else None
    if character is not None and character.status == "published":
        return character
    return repo.resolve_character(session, user, chat, default_name)


def _update(row: Chat, **changes: object) -> None:
    row.settings = {**(row.settings or {}), **changes}  # a new dict, so the JSON column is seen as changed


def allow_channel(session: Session, guild_id: int, channel_id: int, allowed: bool) -> list[int]:
    """Add or remove a channel from the guild's speaking list; returns the list (empty: everywhere)."""
    row = repo.get_or_create_chat(session, PLATFORM, guild_key(guild_id), is_group=True)
    channels = [int(c) for c in (row.settings or {}).get("channels", [])]
    if allowed and channel_id not in channels:
        channels.append(channel_id)
    if not allowed and channel_id in channels:
        channels.remove(channel_id)
    _update(row, channels=[str(c) for c in channels])
    return channels


def set_listen(session: Session, channel_id: int, listen: bool, character_id: int | None = None) -> None:
    """Make a character answer every message in a channel (or stop); ``character_id`` picks who speaks there."""
    row = repo.get_or_create_chat(session, PLATFORM, str(channel_id), is_group=True)
    _update(row, listen=listen)
    if character_id is not None:
        row.active_character_id = character_id
