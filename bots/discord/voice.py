"""Characters speak with their own name and avatar: one bot-owned webhook per channel (PluralKit's pattern).

Notable:

- A channel's webhook is found (one the bot created earlier) or created once, and cached; threads use their parent
  channel's webhook with ``thread=``. A channel already holding Discord's 15 webhooks, a missing Manage Webhooks
  permission, or a DM falls back to the bot's own message with the character in the embed author.
- Every message goes out with ``allowed_mentions`` that ping nobody: generated text can never reach @everyone,
  a role or a user, whatever it contains.
- A webhook deleted behind our back (404 Unknown Webhook) is forgotten and re-created once.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import discord

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = ["NO_PINGS", "WEBHOOK_CAP", "Persona", "Posted", "Speaker", "WebhookPool"]

log = logging.getLogger(__name__)

NO_PINGS: Final = discord.AllowedMentions.none()
WEBHOOK_CAP: Final = 15  # Discord's limit of webhooks per channel
WEBHOOK_NAME: Final = "UniChar characters"
_MAX_WEBHOOKS_CODE: Final = 30007
_UNKNOWN_WEBHOOK_CODE: Final = 10015


@dataclass(frozen=True, slots=True)
class Persona:
    """Who speaks: a character's display name and, when the deployment serves one, its avatar URL."""

    name: str
    avatar_url: str | None = None


@dataclass(frozen=True, slots=True)
class Posted:
    """A message a :class:`Speaker` sent: its id and whether it went through the webhook."""

    message_id: int
    channel_id: int
    via_webhook: bool


def _hook_channel(channel: discord.abc.Messageable) -> discord.TextChannel | discord.ForumChannel | None:
    """The channel that owns webhooks for ``channel`` (a thread's parent), or None where webhooks do not exist."""
    parent = channel.parent if isinstance(channel, discord.Thread) else channel
    return parent if isinstance(parent, (discord.TextChannel, discord.ForumChannel)) else None


class WebhookPool:
    """The bot's webhook in each channel, found or created once and then cached."""

    __slots__ = ("_bot_id", "_hooks", "_locks")

    def __init__(self, bot_id: int) -> None:
        self._bot_id = bot_id
        self._hooks: dict[int, discord.Webhook | None] = {}
        self._locks: dict[int, asyncio.Lock] = {}

    async def get(self, channel: discord.abc.Messageable) -> discord.Webhook | None:
        """The webhook to speak through in ``channel``, or None when the bot must speak as itself."""
        return await self._lookup(channel, create=True)

    async def find(self, channel: discord.abc.Messageable) -> discord.Webhook | None:
        """The bot's webhook in ``channel`` if it already has one; never creates one."""
        return await self._lookup(channel, create=False)

    async def _lookup(self, channel: discord.abc.Messageable, *, create: bool) -> discord.Webhook | None:
        parent = _hook_channel(channel)
        if parent is None or not parent.permissions_for(parent.guild.me).manage_webhooks:
            return None
        lock = self._locks.setdefault(parent.id, asyncio.Lock())
        async with lock:  # two replies arriving together must not create two webhooks
            hook = self._hooks.get(parent.id)
            if hook is None and (create or parent.id not in self._hooks):
                hook = self._hooks[parent.id] = await self._find_or_create(parent, create=create)
            return hook

    def forget(self, channel: discord.abc.Messageable) -> None:
        """Drop the cached webhook of ``channel`` (deleted on Discord's side, or permissions changed)."""
        parent = _hook_channel(channel)
        if parent is not None:
            self._hooks.pop(parent.id, None)

    async def _find_or_create(
        self, parent: discord.TextChannel | discord.ForumChannel, *, create: bool
    ) -> discord.Webhook | None:
        try:
            hooks = await parent.webhooks()
            mine = [h for h in hooks if h.user is not None and h.user.id == self._bot_id and h.token]
            if mine or not create:
                return mine[0] if mine else None
            if len(hooks) >= WEBHOOK_CAP:
                log.info("channel %s already has %s webhooks; speaking as the bot there", parent.id, len(hooks))
                return None
            return await parent.create_webhook(name=WEBHOOK_NAME, reason="Characters speak with their own name")
        except discord.Forbidden:
            log.info("no Manage Webhooks in channel %s; speaking as the bot there", parent.id)
        except discord.HTTPException as exc:
            if exc.code != _MAX_WEBHOOKS_CODE:
                raise
            log.info("channel %s hit the webhook cap; speaking as the bot there", parent.id)
        return None


def _embed(persona: Persona, text: str) -> discord.Embed:
    """The fallback look: the bot's message with the character as the embed's author."""
    embed = discord.Embed(description=text or None)
    embed.set_author(name=persona.name, icon_url=persona.avatar_url)
    return embed


class Speaker:
    """Sends and edits one character's messages in one channel, through the webhook when there is one."""

    __slots__ = ("_channel", "_hook", "_persona", "_pool", "_resolved")

    def __init__(self, channel: discord.abc.Messageable, persona: Persona, pool: WebhookPool) -> None:
        self._channel = channel
        self._persona = persona
        self._pool = pool
        self._hook: discord.Webhook | None = None
        self._resolved = False

    @property
    def persona(self) -> Persona:
        return self._persona

    @property
    def channel(self) -> discord.abc.Messageable:
        return self._channel

    @property
    def _thread(self) -> discord.abc.Snowflake | discord.utils._MissingSentinel:
        return self._channel if isinstance(self._channel, discord.Thread) else discord.utils.MISSING

    async def _webhook(self) -> discord.Webhook | None:
        if not self._resolved:
            self._hook = await self._pool.get(self._channel)
            self._resolved = True
        return self._hook

    async def send(
        self,
        text: str,
        *,
        files: Sequence[discord.File] = (),
        view: discord.ui.View | None = None,
        retry_hook: bool = True,
    ) -> Posted:
        """Post a new message as the character; a webhook deleted behind our back is replaced once."""
        hook = await self._webhook()
        extra: dict[str, object] = {"view": view} if view is not None else {}
        if hook is not None:
            try:
                message = await hook.send(
                    text or discord.utils.MISSING,  # type: ignore[arg-type]
                    username=self._persona.name[:80],
                    avatar_url=self._persona.avatar_url or discord.utils.MISSING,
                    files=list(files),
                    allowed_mentions=NO_PINGS,
                    thread=self._thread,
                    wait=True,
                    **extra,  # type: ignore[arg-type]
                )
                return Posted(message.id, self._channel.id, True)  # type: ignore[attr-defined]
            except discord.NotFound as exc:
                if exc.code != _UNKNOWN_WEBHOOK_CODE or not retry_hook:
                    raise
                log.info("webhook of channel %s was deleted; creating another", self._channel.id)  # type: ignore[attr-defined]
                self._pool.forget(self._channel)
                self._resolved = False
                for file in files:
                    file.reset()
                return await self.send(text, files=files, view=view, retry_hook=False)
        message = await self._channel.send(
            embed=_embed(self._persona, text),
            files=list(files),
            allowed_mentions=NO_PINGS,
            **extra,  # type: ignore[arg-type]
        )
        return Posted(message.id, message.channel.id, False)

    async def edit(self, posted: Posted, text: str, **changes: Any) -> bool:
        """Make a message read ``text``; False when it can no longer be edited (its webhook is out of reach).

        ``changes`` go to Discord's edit as they are: ``attachments`` (files to put on the message, ``[]`` to take
        them off) and ``view`` (the buttons, None to remove them).
        """
        if posted.via_webhook:
            hook = await self._webhook()
            if hook is None:  # permission to manage webhooks was taken away since: the message stays as it is
                log.info("cannot edit webhook message %s any more", posted.message_id)
                return False
            try:
                await hook.edit_message(
                    posted.message_id,
                    content=text or None,
                    allowed_mentions=NO_PINGS,
                    thread=self._thread,
                    **changes,
                )
            except discord.NotFound as exc:
                if exc.code != _UNKNOWN_WEBHOOK_CODE:
                    raise
                log.info("webhook of channel %s was deleted; its messages stay as they are", posted.channel_id)
                self._pool.forget(self._channel)
                self._resolved = False
                return False
            return True
        partial = self._channel.get_partial_message(posted.message_id)  # type: ignore[attr-defined]
        await partial.edit(embed=_embed(self._persona, text), allowed_mentions=NO_PINGS, **changes)
        return True

    async def delete(self, posted: Posted) -> None:
        """Remove a message the character sent; one already gone is fine."""
        try:
            if posted.via_webhook and (hook := await self._webhook()) is not None:
                await hook.delete_message(posted.message_id, thread=self._thread)
            else:
                await self._channel.get_partial_message(posted.message_id).delete()  # type: ignore[attr-defined]
        except discord.NotFound:
            pass
