"""The Telegram side of ``bots.delivery.Renderer``: plain-text messages, edits, photos and chat actions.

Telegram errors become the delivery's exceptions here and nowhere else: a flood wait is ``RetryLater``, a user who
blocked the bot (or a group that removed it) is ``RecipientGone``, a deleted message is ``MessageGone``, and
"message is not modified" is no error at all. Text goes out without a parse mode, so that whatever the model
writes is shown as written and can never be refused as malformed markup.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import logging
import warnings
from collections.abc import Iterator
from typing import Final

from PIL import Image
from telegram import Bot, InlineKeyboardButton, InlineKeyboardMarkup, ReplyParameters
from telegram.constants import ChatAction
from telegram.error import BadRequest, ChatMigrated, Forbidden, RetryAfter
from telegram.warnings import PTBDeprecationWarning

from bots.delivery import Action, MessageGone, RecipientGone, Target
from bots.render import TELEGRAM_LIMIT, RetryLater, utf16_len
from core.jobs import JobKind

__all__ = ["PHOTO_MAX_BYTES", "TelegramRenderer", "fit_photo", "image_buttons", "retry_seconds", "telegram_errors"]

log = logging.getLogger(__name__)

PHOTO_MAX_BYTES: Final = 10 * 1024 * 1024  # sendPhoto's limit; larger pictures are recompressed
PHOTO_MAX_SIDES: Final = 10_000  # sendPhoto: width + height at most this
_GONE: Final = ("chat not found", "bot was kicked", "user is deactivated", "have no rights to send")
_MISSING: Final = ("message to edit not found", "message to delete not found", "message can't be")


def retry_seconds(error: RetryAfter) -> float:
    """A flood wait's length in seconds, whichever type this PTB version reports it in."""
    with warnings.catch_warnings():  # PTB 22 warns that the int form is going away; both forms are handled here
        warnings.simplefilter("ignore", PTBDeprecationWarning)
        value = error.retry_after
    return value.total_seconds() if isinstance(value, dt.timedelta) else float(value)


@contextlib.contextmanager
def telegram_errors() -> Iterator[None]:
    """Translate Telegram's refusals into the delivery's exceptions; "not modified" is success."""
    try:
        yield
    except RetryAfter as exc:
        raise RetryLater(retry_seconds(exc)) from exc
    except Forbidden as exc:
        raise RecipientGone(exc.message) from exc
    except ChatMigrated as exc:  # a group became a supergroup: the old id is gone for good
        raise RecipientGone(exc.message) from exc
    except BadRequest as exc:
        text = exc.message.lower()
        if "message is not modified" in text:
            return
        if any(part in text for part in _GONE):
            raise RecipientGone(exc.message) from exc
        if any(part in text for part in _MISSING):
            raise MessageGone(exc.message) from exc
        raise


def fit_photo(data: bytes, max_bytes: int = PHOTO_MAX_BYTES) -> bytes:
    """``data`` as a picture sendPhoto takes: JPEG-recompressed (and shrunk if needed) when too big."""
    with Image.open(io.BytesIO(data)) as image:
        too_wide = image.width + image.height > PHOTO_MAX_SIDES
        if len(data) <= max_bytes and not too_wide:
            return data
        picture = image.convert("RGB")
    if too_wide:
        scale = PHOTO_MAX_SIDES / (picture.width + picture.height)
        picture = picture.resize((max(1, int(picture.width * scale)), max(1, int(picture.height * scale))))
    while True:
        for quality in (92, 85, 75):
            out = io.BytesIO()
            picture.save(out, "JPEG", quality=quality, optimize=True)
            if out.tell() <= max_bytes:
                return out.getvalue()
        picture = picture.resize((max(1, picture.width * 3 // 4), max(1, picture.height * 3 // 4)))


def image_buttons(job_id: int) -> InlineKeyboardMarkup:
    """Regenerate and Accept under a picture from /imagine (only the requester may press them)."""
    return InlineKeyboardMarkup(
        [[InlineKeyboardButton("🔁 Regenerate", callback_data=f"img:again:{job_id}"),
          InlineKeyboardButton("✅ Accept", callback_data=f"img:keep:{job_id}")]]
    )


class TelegramRenderer:
    """Shows one job in one Telegram chat."""

    limit = TELEGRAM_LIMIT
    caption_limit = 1024  # a reply this short becomes its scene picture's caption
    action_interval = 4.5  # Telegram shows a chat action for 5 s

    def __init__(self, bot: Bot, target: Target, *, edit_interval: float) -> None:
        self.bot = bot
        self.target = target
        self.edit_interval = edit_interval

    def length(self, text: str) -> int:
        """Telegram counts UTF-16 code units."""
        return utf16_len(text)

    def _reply(self) -> ReplyParameters | None:
        if self.target.reply_to is None:
            return None
        return ReplyParameters(message_id=int(self.target.reply_to), allow_sending_without_reply=True)

    async def chat_action(self, action: Action) -> None:
        """typing… or sending a photo…"""
        kind = ChatAction.UPLOAD_PHOTO if action == "upload_photo" else ChatAction.TYPING
        with telegram_errors():
            await self.bot.send_chat_action(self.target.chat_id, kind)

    async def send_text(self, text: str) -> str:
        """A new message replying to the user's."""
        with telegram_errors():
            message = await self.bot.send_message(self.target.chat_id, text, reply_parameters=self._reply())
        return str(message.message_id)

    async def edit_text(self, message_id: str, text: str) -> None:
        """The message now reads ``text``."""
        with telegram_errors():
            await self.bot.edit_message_text(text, chat_id=self.target.chat_id, message_id=int(message_id))

    async def send_image(self, data: bytes, caption: str) -> str:
        """The picture as a photo, with Regenerate/Accept under an /imagine result."""
        markup = image_buttons(self.target.job_id) if self.target.kind is JobKind.IMAGE else None
        with telegram_errors():
            message = await self.bot.send_photo(
                self.target.chat_id, fit_photo(data), caption=caption or None,
                reply_parameters=self._reply(), reply_markup=markup,
            )
        return str(message.message_id)

    async def delete(self, message_id: str) -> None:
        """Remove a status line."""
        with telegram_errors():
            await self.bot.delete_message(self.target.chat_id, int(message_id))
