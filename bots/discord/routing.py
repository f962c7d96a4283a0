"""Which Discord messages a character answers, and the platform-neutral message they become.

A character answers a message that mentions the bot, replies to the bot or to a character's webhook message, comes
in a DM, or arrives in a channel or thread where an admin made a character listen. Bots and webhooks (the
characters themselves included) are never answered, so two bots cannot talk each other into a loop.

A reply to a character's message is addressed to that character (``speaker``): it answers that message, whoever
the channel's character is, and the channel's choice stays as it was.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Final

import discord

from core.jobs import IncomingMessage

if TYPE_CHECKING:
    from collections.abc import Sequence

    from core.jobs import Attachment

__all__ = ["PLATFORM", "clean_text", "incoming", "is_addressed", "replied_to", "speaker"]

PLATFORM: Final = "discord"


def replied_to(message: discord.Message) -> discord.Message | None:
    """The message this one replies to, when Discord sent it along."""
    reference = message.reference
    resolved = reference.resolved if reference is not None else None
    return resolved if isinstance(resolved, discord.Message) else None


def is_addressed(message: discord.Message, me_id: int, hook_id: int | None, *, listening: bool) -> bool:
    """Whether a character should answer ``message``; ``hook_id`` is the bot's webhook in that channel, if any."""
    if message.author.bot or message.webhook_id is not None or message.author.id == me_id:
        return False
    if message.guild is None or listening or me_id in message.raw_mentions:
        return True
    parent = replied_to(message)
    if parent is None:
        return False
    return parent.author.id == me_id or (hook_id is not None and parent.webhook_id == hook_id)


def speaker(parent: discord.Message, me_id: int, hook_id: int | None) -> str | None:
    """The name of the character who wrote ``parent``: a message of the bot's webhook (its username), or the bot's
    own message with the character in the embed author (where webhooks are missing); None for anything else."""
    if hook_id is not None and parent.webhook_id == hook_id:
        return parent.author.name
    if parent.author.id == me_id and parent.embeds and parent.embeds[0].author.name:
        return parent.embeds[0].author.name
    return None


_MENTION: Final = re.compile(r"<(@!?|@&|#)(\d+)>")


def clean_text(message: discord.Message, me_id: int) -> str:
    """The words of ``message`` without the bot's own mention; other mentions become readable names."""
    guild = message.guild

    def readable(match: re.Match[str]) -> str:
        kind, ident = match[1], int(match[2])
        if kind.startswith("@") and kind != "@&":
            if ident == me_id:
                return ""
            user = discord.utils.get(message.mentions, id=ident)
            return f"@{user.display_name}" if user else "@someone"
        if kind == "@&":
            role = guild.get_role(ident) if guild else None
            return f"@{role.name}" if role else "@role"
        channel = guild.get_channel_or_thread(ident) if guild else None
        return f"#{channel.name}" if channel else "#channel"

    text = _MENTION.sub(readable, message.content)
    return re.sub(r"@(everyone|here)\b", "@\u200b\\1", text).strip()


def incoming(
    message: discord.Message, text: str, images: Sequence[Attachment], character_id: int | None = None
) -> IncomingMessage:
    """The neutral message the chat service stores; the chat is the channel or thread, ``character_id`` whom it
    addresses when that is not the chat's own choice (a reply to a character, a thread following its channel)."""
    reference = message.reference
    return IncomingMessage(
        platform=PLATFORM,
        user_id=str(message.author.id),
        chat_id=str(message.channel.id),
        message_id=str(message.id),
        text=text,
        attachments=tuple(images),
        display_name=message.author.display_name,
        is_group=message.guild is not None,
        reply_to_message_id=str(reference.message_id) if reference and reference.message_id else None,
        character_id=character_id,
    )
