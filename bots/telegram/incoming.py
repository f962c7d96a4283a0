"""From a Telegram update to the platform-neutral ``IncomingMessage``: who, where, what, and is it for us.

In a private chat every message is for the character. In a group only a mention of the bot, a reply to one of
its messages, or the configured trigger word is; the mention itself is cut from the text. Pictures are
downloaded here (the largest size of a photo, or an image sent as a file), after a size check that needs no
download; their content is validated by ``core.media`` in the chat service. An album arrives as one update per
picture: :class:`AlbumCollector` waits for the rest of it and hands the parts over together.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable, Sequence
from typing import Final

from telegram import Bot, Chat, Message, MessageEntity, Update

from core.jobs import Attachment, IncomingMessage

__all__ = ["PLATFORM", "AlbumCollector", "TooLarge", "addressed_text", "download", "incoming", "is_group", "picture_of"]

log = logging.getLogger(__name__)

PLATFORM: Final = "telegram"
_IMAGE_SUFFIXES: Final = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".heic")


class TooLarge(ValueError):
    """A file over the upload limit, refused before downloading it."""


def is_group(chat: Chat) -> bool:
    """Whether the chat has other people in it."""
    return chat.type in (Chat.GROUP, Chat.SUPERGROUP)


def incoming(update: Update, text: str, attachments: Sequence[Attachment] = ()) -> IncomingMessage:
    """The neutral form of a user's message (or button press) in this update."""
    user, chat, message = update.effective_user, update.effective_chat, update.effective_message
    assert user is not None and chat is not None and message is not None
    reply = message.reply_to_message
    return IncomingMessage(
        platform=PLATFORM,
        user_id=str(user.id),
        chat_id=str(chat.id),
        message_id=str(message.message_id),
        text=text,
        attachments=tuple(attachments),
        display_name=user.full_name,
        is_group=is_group(chat),
        reply_to_message_id=str(reply.message_id) if reply else None,
    )


def addressed_text(message: Message, bot: Bot, trigger_word: str) -> str | None:
    """The message's text (or caption) when it is meant for the character, the bot's mention removed; else None."""
    text = message.text or message.caption or ""
    if not is_group(message.chat):
        return text
    mention = f"@{bot.username}".lower()
    mentioned = any(
        value.lower() == mention
        for entity, value in message.parse_entities([MessageEntity.MENTION]).items()
    ) or any(
        value.lower() == mention
        for entity, value in message.parse_caption_entities([MessageEntity.MENTION]).items()
    )
    reply = message.reply_to_message
    replied = reply is not None and reply.from_user is not None and reply.from_user.id == bot.id
    triggered = bool(trigger_word) and re.search(rf"\b{re.escape(trigger_word)}\b", text, re.IGNORECASE) is not None
    if not (mentioned or replied or triggered):
        return None
    return re.sub(re.escape(mention), "", text, flags=re.IGNORECASE).strip()


def picture_of(message: Message) -> tuple[str, int | None, str, str] | None:
    """(file id, size, file name, content type) of the picture in a message: a photo or an image sent as a file."""
    if message.photo:
        largest = message.photo[-1]
        return largest.file_id, largest.file_size, "photo.jpg", "image/jpeg"
    document = message.document
    if document is not None:
        name = document.file_name or "file"
        mime = document.mime_type or ""
        if mime.startswith("image/") or name.lower().endswith(_IMAGE_SUFFIXES):
            return document.file_id, document.file_size, name, mime or "application/octet-stream"
    return None


async def download(bot: Bot, file_id: str, size: int | None, limit: int) -> bytes:
    """The file's bytes; raises TooLarge without downloading when Telegram says it is over ``limit``."""
    if size is not None and size > limit:
        raise TooLarge(f"That file is {size / 2**20:.1f} MB; the limit is {limit / 2**20:.0f} MB.")
    file = await bot.get_file(file_id)
    if file.file_size is not None and file.file_size > limit:
        raise TooLarge(f"That file is {file.file_size / 2**20:.1f} MB; the limit is {limit / 2**20:.0f} MB.")
    data = bytes(await file.download_as_bytearray())
    if len(data) > limit:
        raise TooLarge(f"That file is {len(data) / 2**20:.1f} MB; the limit is {limit / 2**20:.0f} MB.")
    return data


class AlbumCollector:
    """Gathers the updates of one album (same media_group_id) and hands them over once no more arrive."""

    def __init__(self, wait_s: float) -> None:
        self._wait = wait_s
        self._parts: dict[str, list[Update]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def add(self, group_id: str, update: Update, handle: Callable[[list[Update]], Awaitable[None]]) -> None:
        """Keep ``update``; the album's first part schedules ``handle`` with all parts after the wait."""
        parts = self._parts.setdefault(group_id, [])
        parts.append(update)
        if len(parts) == 1:
            task = asyncio.create_task(self._later(group_id, handle), name=f"album-{group_id}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _later(self, group_id: str, handle: Callable[[list[Update]], Awaitable[None]]) -> None:
        seen = -1
        while seen != len(self._parts[group_id]):  # wait until a full wait passes with no new part
            seen = len(self._parts[group_id])
            await asyncio.sleep(self._wait)
        parts = self._parts.pop(group_id)
        parts.sort(key=lambda part: part.effective_message.message_id if part.effective_message else 0)
        try:
            await handle(parts)
        except Exception:
            log.exception("handling album %s failed", group_id)
