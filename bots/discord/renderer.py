"""Discord's side of :mod:`bots.delivery`: post, edit and delete a job's messages as the character.

Message ids handed to the delivery carry how they were sent (``w:<id>`` through the channel's webhook, ``b:<id>``
as the bot with the character in the embed author) so that a restarted bot edits them the same way. Discord's
errors become the delivery's: a rate limit beyond discord.py's own retries is ``RetryLater``, a deleted channel or
lost access is ``RecipientGone`` (the delivery is skipped and recorded), a deleted message is ``MessageGone``.
The channel and the speaking character are looked up once, lazily, so a renderer is cheap to build.

A picture goes onto a message that is already there (``attach_image``: the reply's last message, or the status
line of an /imagine) by editing it, so the words and their picture stay one message with the picture's buttons.
"""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Final, TypeVar

import discord

from bots.delivery import Action, MessageGone, RecipientGone, Target
from bots.discord.buttons import image_view
from bots.discord.voice import Persona, Posted, Speaker, WebhookPool
from bots.render import DISCORD_LIMIT, RetryLater
from core.db.models import Character, Conversation, Job
from core.jobs import JobKind

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

__all__ = ["DiscordRenderer", "channel_or_gone", "persona_of_job"]

log = logging.getLogger(__name__)

T = TypeVar("T")

EDIT_INTERVAL_S: Final = 1.0  # at most one edit per second per message
TYPING_INTERVAL_S: Final = 8.0  # Discord shows "typing…" for about 10 s
_GONE_CODES: Final = frozenset({10003, 50001, 50007, 50013})  # unknown channel, missing access/permissions, no DMs
_UNKNOWN_MESSAGE: Final = 10008


def persona_of_job(sessions: sessionmaker[Session], job_id: int, avatar_base: str) -> Persona:
    """The character that answers a job, as a webhook shows it."""
    with sessions() as session:
        job = session.get(Job, job_id)
        conversation = session.get(Conversation, job.conversation_id) if job and job.conversation_id else None
        character = session.get(Character, conversation.character_id) if conversation else None
        if character is None:
            return Persona("UniChar")
        avatar = f"{avatar_base.rstrip('/')}/{character.avatar_key}" if avatar_base and character.avatar_key else None
        return Persona(character.name, avatar)


async def channel_or_gone(client: discord.Client, channel_id: int) -> discord.abc.Messageable:
    """The channel, thread or DM with this id; RecipientGone when it no longer exists or is out of reach."""
    channel = client.get_channel(channel_id)
    if channel is None:
        try:
            channel = await client.fetch_channel(channel_id)
        except (discord.NotFound, discord.Forbidden) as exc:
            raise RecipientGone(f"channel {channel_id}: {exc.text or exc.status}") from exc
    if not isinstance(channel, discord.abc.Messageable):
        raise RecipientGone(f"channel {channel_id} cannot hold messages")
    return channel


async def _translated(call: Callable[[], Awaitable[T]]) -> T:
    """Run one Discord call, turning its errors into the delivery's."""
    try:
        return await call()
    except discord.RateLimited as exc:
        raise RetryLater(exc.retry_after) from exc
    except discord.NotFound as exc:
        if exc.code == _UNKNOWN_MESSAGE:
            raise MessageGone(str(exc)) from exc
        raise RecipientGone(str(exc)) from exc
    except discord.Forbidden as exc:
        if exc.code in _GONE_CODES:
            raise RecipientGone(str(exc)) from exc
        raise
    except discord.HTTPException as exc:
        if exc.status == 429:
            retry = float(exc.response.headers.get("Retry-After", 1.0)) if exc.response is not None else 1.0
            raise RetryLater(retry) from exc
        raise


def _encode(posted: Posted) -> str:
    return f"{'w' if posted.via_webhook else 'b'}:{posted.message_id}"


def _decode(message_id: str, channel_id: int) -> Posted:
    how, _, number = message_id.partition(":")
    return Posted(int(number), channel_id, how == "w")


class DiscordRenderer:
    """Renders one job in one Discord channel, speaking as the job's character."""

    limit = DISCORD_LIMIT
    edit_interval = EDIT_INTERVAL_S
    action_interval = TYPING_INTERVAL_S

    def __init__(
        self,
        client: discord.Client,
        pool: WebhookPool,
        target: Target,
        persona: Callable[[int], Persona],
    ) -> None:
        self._client = client
        self._pool = pool
        self._target = target
        self._persona = persona
        self._speaker: Speaker | None = None
        self._lock = asyncio.Lock()

    def length(self, text: str) -> int:
        return len(text)

    async def _voice(self) -> Speaker:
        async with self._lock:
            if self._speaker is None:
                channel = await channel_or_gone(self._client, int(self._target.chat_id))
                persona = await asyncio.to_thread(self._persona, self._target.job_id)
                self._speaker = Speaker(channel, persona, self._pool)
            return self._speaker

    async def chat_action(self, action: Action) -> None:
        speaker = await self._voice()

        async def typing() -> None:
            await speaker.channel.typing()  # one "typing…", shown for about ten seconds

        await _translated(typing)

    async def send_text(self, text: str) -> str:
        speaker = await self._voice()
        return _encode(await _translated(lambda: speaker.send(text)))

    async def edit_text(self, message_id: str, text: str) -> None:
        speaker = await self._voice()
        if not await _translated(lambda: speaker.edit(_decode(message_id, speaker.channel.id), text)):
            raise MessageGone(message_id)

    def _picture(self, data: bytes) -> tuple[discord.File, discord.ui.View | None]:
        """The picture as a file, and the buttons of the picture's job (for its requester)."""
        file = discord.File(io.BytesIO(data), filename=f"unichar-{self._target.job_id}.png")
        view = None
        if self._target.kind is JobKind.IMAGE and self._target.user_id:
            view = image_view(self._target.job_id, int(self._target.user_id))
        return file, view

    async def send_image(self, data: bytes, caption: str) -> str:
        speaker = await self._voice()
        file, view = self._picture(data)
        return _encode(await _translated(lambda: speaker.send(caption, files=[file], view=view)))

    async def attach_image(self, message_id: str, data: bytes, text: str) -> str:
        """Put the picture and its buttons on a posted message, which then reads ``text``; MessageGone if it can't."""
        speaker = await self._voice()
        file, view = self._picture(data)
        posted = _decode(message_id, speaker.channel.id)
        if not await _translated(lambda: speaker.edit(posted, text, attachments=[file], view=view)):
            raise MessageGone(message_id)
        return message_id

    async def delete(self, message_id: str) -> None:
        speaker = await self._voice()
        await _translated(lambda: speaker.delete(_decode(message_id, speaker.channel.id)))
