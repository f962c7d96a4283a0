"""The Discord frontend: a ``discord.Client`` that turns messages and interactions into chat-service calls.

Notable:

- Dependencies come in through the constructor (SQL sessions, the chat and submission services, the file store,
  the event-stream follower); ``setup_hook`` registers the slash commands and the persistent image buttons, and
  starts the background work: unfinished deliveries resume, submission notifications go out by DM.
- Intents are minimal: guilds, guild and DM messages, and message content (to read what mentions the bot).
- A reply is rendered by :mod:`bots.delivery` through :class:`~bots.discord.renderer.DiscordRenderer`; the job
  row records what was posted, so a restart never posts a reply twice.
- Every SQL call runs in a worker thread (``asyncio.to_thread``); the event loop only talks to Discord.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import discord
from discord import app_commands

from bots.delivery import Deliveries, Follow, Target
from bots.discord import commands, guilds
from bots.discord.buttons import ImageButton
from bots.discord.intake import read_images
from bots.discord.renderer import DiscordRenderer, persona_of_job
from bots.discord.routing import (
    PLATFORM,
    clean_text,
    incoming,
    is_addressed,
    replied_to,
    speaker,
)
from bots.discord.voice import NO_PINGS, Persona, Posted, Speaker, WebhookPool
from bots.render import DISCORD_LIMIT, split_text
from core.chat import Answer, JobQueued
from core.db import repositories as repo
from core.db.models import Job, User
from core.jobs import IncomingMessage
from core.submissions import mark_delivered, pending_notifications

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

    from core.chat import ChatOutcome, ChatService
    from core.config import Settings
    from core.media import FileStore
    from core.submissions import Submissions

__all__ = ["Services", "UniBot", "intents"]

log = logging.getLogger(__name__)

NOTIFY_INTERVAL_S: Final = 15.0
NOT_HERE: Final = "Characters don't speak in this channel; an admin can allow it with /settings allow."


def intents() -> discord.Intents:
    """Only what the bot reads: guilds (channels, permissions), messages in guilds and DMs, and their content."""
    wanted = discord.Intents.none()
    wanted.guilds = True
    wanted.guild_messages = True
    wanted.dm_messages = True
    wanted.message_content = True
    return wanted


@dataclass(frozen=True, slots=True)
class Services:
    """What the bot needs from the rest of the system."""

    settings: Settings
    sessions: sessionmaker[Session]
    chat: ChatService
    submissions: Submissions
    files: FileStore
    follow: Follow  # (job id, last entry id) -> the job's events; TimeoutError when quiet


class UniBot(discord.Client):
    """Characters on Discord; ``commands`` holds the slash commands, ``buttons`` the image buttons."""

    def __init__(self, services: Services, *, notify_interval_s: float = NOTIFY_INTERVAL_S, **options: Any) -> None:
        options.setdefault("max_ratelimit_timeout", 30.0)  # longer waits surface as RateLimited, paced by delivery
        super().__init__(intents=intents(), allowed_mentions=NO_PINGS, **options)
        self.services = services
        self.settings = services.settings
        self.sessions = services.sessions
        self.tree = app_commands.CommandTree(self)
        self.tree.on_error = self._on_command_error  # type: ignore[method-assign]
        self._notify_interval = notify_interval_s
        self._background: set[asyncio.Task[None]] = set()
        self.pool: WebhookPool | None = None
        self.deliveries: Deliveries | None = None

    # --- start-up ---------------------------------------------------------------------------------------

    async def setup_hook(self) -> None:
        assert self.user is not None, "setup_hook runs after login"
        commands.add_commands(self.tree)
        self.add_dynamic_items(ImageButton)
        self.pool = WebhookPool(self.user.id)
        self.deliveries = Deliveries(
            self.sessions,
            self.services.follow,
            self.services.files,
            self._renderer,
            PLATFORM,
            horizon_s=self.settings.event_ttl_s,
        )
        self._spawn(self._after_ready())

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _after_ready(self) -> None:
        await self.wait_until_ready()
        assert self.deliveries is not None
        try:
            await self.deliveries.resume()
        except Exception:
            log.exception("resuming unfinished deliveries failed")
        while not self.is_closed():
            try:
                await self.deliver_notifications()
            except Exception:
                log.exception("delivering notifications failed; retrying later")
            await asyncio.sleep(self._notify_interval)

    async def close(self) -> None:
        for task in list(self._background):
            task.cancel()
        await super().close()

    def _renderer(self, target: Target) -> DiscordRenderer:
        assert self.pool is not None
        base = self.settings.public_files_url
        return DiscordRenderer(self, self.pool, target, lambda job_id: persona_of_job(self.sessions, job_id, base))

    # --- messages ---------------------------------------------------------------------------------------

    async def on_message(self, message: discord.Message) -> None:
        """A message a character should answer becomes a stored turn and a reply job."""
        assert self.user is not None and self.pool is not None
        if message.author.bot or message.webhook_id is not None:
            return
        place = await asyncio.to_thread(self._place, message.channel)
        parent = replied_to(message)
        hook = await self.pool.find(message.channel) if parent is not None and parent.webhook_id else None
        if not is_addressed(message, self.user.id, hook.id if hook else None, listening=place.listen):
            return
        if not place.allowed:
            if self.user.id in message.raw_mentions:
                await self._reply(message, NOT_HERE)
            return
        name = speaker(parent, self.user.id, hook.id if hook else None) if parent is not None else None
        character_id = (await asyncio.to_thread(self._character_id, name) if name else None) or place.character_id
        gate = (message.channel, message.author.id, place.nsfw, character_id)
        if refusal := await asyncio.to_thread(self.gate, *gate):
            await self._reply(message, refusal)
            return
        intake = await read_images(message.attachments, self.settings)
        if intake.refused:
            await self._reply(message, intake.notice)
        text = clean_text(message, self.user.id)
        if intake.refused and not text and not intake.images:
            return  # nothing usable left: the notice said why
        try:
            async with message.channel.typing():
                turn = incoming(message, text, intake.images, character_id)
                outcome = await asyncio.to_thread(self.services.chat.handle, turn)
        except discord.HTTPException as exc:  # "typing…" refused: the channel went away or access was lost
            log.info("cannot answer in channel %s: %s", message.channel.id, exc.status)
            return
        await self._answer_message(message, outcome)

    def _place(self, channel: discord.abc.Messageable) -> guilds.Place:
        with self.sessions.begin() as session:
            return guilds.place_of(session, channel)

    def _character_id(self, name: str) -> int | None:
        """The published character called ``name`` (who wrote a message someone replies to)."""
        with self.sessions() as session:
            found = repo.character_by_name(session, name)
            return found.id if found is not None else None

    def gate(
        self, channel: discord.abc.Messageable, user_id: int, nsfw_channel: bool, character_id: int | None = None
    ) -> str | None:
        """Why the character that would answer here (``character_id`` when addressed) may not, or None.

        Adults-only characters speak only in age-restricted channels.
        """
        with self.sessions.begin() as session:
            user = repo.get_or_create_user(session, PLATFORM, str(user_id))
            is_group = getattr(channel, "guild", None) is not None
            chat = repo.get_or_create_chat(session, PLATFORM, str(channel.id), is_group)  # type: ignore[attr-defined]
            character = guilds.addressed(session, user, chat, character_id, self.settings.default_character)
            if character is not None and character.nsfw and not nsfw_channel:
                return (
                    f"{character.name} is an adults-only character and only speaks in age-restricted channels; "
                    "pick another one with /character use."
                )
        return None

    async def _answer_message(self, message: discord.Message, outcome: ChatOutcome) -> None:
        if isinstance(outcome, JobQueued):
            self.deliver(outcome, str(message.channel.id), str(message.id), message.author.id)
        elif isinstance(outcome, Answer):
            await self._reply(message, outcome.text)
        else:
            await self._reply(message, f"⚠️ {outcome.reason}")

    def deliver(self, queued: JobQueued, channel_id: str, reply_to: str | None, user_id: int) -> None:
        """Render a queued job's events in the channel, in the background."""
        assert self.deliveries is not None
        self.deliveries.start(Target(queued.job_id, queued.kind, channel_id, reply_to, str(user_id)))

    async def _reply(self, message: discord.Message, text: str) -> None:
        """The bot's own short answer (not a character's), split to Discord's limit; a lost channel is skipped."""
        try:
            for chunk in split_text(text, DISCORD_LIMIT):
                await message.reply(chunk, allowed_mentions=NO_PINGS, mention_author=False)
        except (discord.Forbidden, discord.NotFound) as exc:
            log.info("cannot reply in channel %s: %s", message.channel.id, exc.status)

    # --- interactions -----------------------------------------------------------------------------------

    def incoming_of(
        self, interaction: discord.Interaction[Any], text: str, character_id: int | None = None
    ) -> IncomingMessage:
        """A slash command as the neutral message the chat service understands."""
        return IncomingMessage(
            platform=PLATFORM,
            user_id=str(interaction.user.id),
            chat_id=str(interaction.channel_id),
            message_id=f"i{interaction.id}",
            text=text,
            display_name=interaction.user.display_name,
            is_group=interaction.guild_id is not None,
            character_id=character_id,
        )

    async def ask(self, interaction: discord.Interaction[Any], text: str) -> ChatOutcome:
        """Run a chat-service command for the user of an interaction (in a thread, with its channel's character)."""
        inherited = await self.inherited(interaction)
        return await asyncio.to_thread(self.services.chat.handle, self.incoming_of(interaction, text, inherited))

    async def inherited(self, interaction: discord.Interaction[Any]) -> int | None:
        """The parent channel's character, in a thread that has none of its own; else None."""
        if not isinstance(interaction.channel, discord.Thread):
            return None
        return (await asyncio.to_thread(self._place, interaction.channel)).character_id

    async def interaction_gate(self, interaction: discord.Interaction[Any]) -> str | None:
        """Why a character may not speak where this interaction happened, or None."""
        channel = interaction.channel
        if channel is None:
            return None
        place = await asyncio.to_thread(self._place, channel)  # type: ignore[arg-type]
        if not place.allowed:
            return NOT_HERE
        gate = (channel, interaction.user.id, place.nsfw, place.character_id)
        return await asyncio.to_thread(self.gate, *gate)  # type: ignore[arg-type]

    async def _on_command_error(
        self, interaction: discord.Interaction[Any], error: app_commands.AppCommandError
    ) -> None:
        """Log first, then tell the user something went wrong (once, whatever was answered before)."""
        log.error("command %s failed", interaction.command and interaction.command.name, exc_info=error)
        text = "⚠️ Something went wrong on my side; please try again."
        if isinstance(error, app_commands.CheckFailure):
            text = f"⚠️ {error}"
        try:
            if interaction.response.is_done():
                await interaction.followup.send(text, ephemeral=True)
            else:
                await interaction.response.send_message(text, ephemeral=True)
        except discord.HTTPException:
            log.info("could not tell the user about the error")

    # --- image buttons (bots.discord.buttons.ImageActions) ----------------------------------------------

    async def regenerate_image(self, interaction: discord.Interaction[Any], job_id: int | None) -> None:
        """Draw a new variation of a picture (same scene and settings, a new seed), below the first.

        ``job_id`` None (the /regenerate command without a number): the user's last picture in this channel.
        """
        await interaction.response.defer(ephemeral=True, thinking=True)
        outcome = await self.ask(interaction, f"/regenerate {job_id or ''}".rstrip())
        if isinstance(outcome, JobQueued):
            self.deliver(outcome, str(interaction.channel_id), None, interaction.user.id)
            await interaction.followup.send("🔁 Drawing another one…", ephemeral=True)
        else:
            await interaction.followup.send(commands.outcome_text(outcome), ephemeral=True)

    def _mark_accepted(self, job_id: int, user_id: int) -> None:
        with self.sessions.begin() as session:
            job = session.get(Job, job_id)
            if job is not None:
                job.delivery = {**(job.delivery or {}), "accepted_by": str(user_id)}

    async def accept_image(self, interaction: discord.Interaction[Any], job_id: int) -> None:
        """Keep the picture: the buttons go away, the choice is recorded with the job."""
        await asyncio.to_thread(self._mark_accepted, job_id, interaction.user.id)
        await interaction.response.edit_message(view=None)

    async def delete_image(self, interaction: discord.Interaction[Any], job_id: int) -> None:
        """Remove the picture: its whole message, or only the picture and its buttons where a reply's words share it."""
        await interaction.response.defer()
        message = interaction.message
        if message is None or interaction.channel is None:
            return
        assert self.pool is not None
        posted = Posted(message.id, message.channel.id, message.webhook_id is not None)
        embed = message.embeds[0] if message.embeds and not posted.via_webhook else None
        persona = Persona(embed.author.name or "", embed.author.icon_url) if embed else Persona(message.author.name)
        words = (embed.description if embed else message.content) or ""
        speaker = Speaker(interaction.channel, persona, self.pool)  # type: ignore[arg-type]
        try:
            if not words:
                await speaker.delete(posted)
            elif not await speaker.edit(posted, words, attachments=[], view=None):
                await interaction.followup.send("⚠️ I can't change that message any more.", ephemeral=True)
        except discord.HTTPException as exc:
            await interaction.followup.send(f"⚠️ I could not delete it ({exc.status}).", ephemeral=True)

    # --- notifications ----------------------------------------------------------------------------------

    async def deliver_notifications(self) -> int:
        """DM every pending submission notification once; returns how many were handled."""
        notes = await asyncio.to_thread(self._pending_notes)
        for note_id, user_id, text in notes:
            try:
                channel = await self.create_dm(discord.Object(int(user_id)))  # type: ignore[arg-type]
                for chunk in split_text(text, DISCORD_LIMIT):
                    await channel.send(chunk, allowed_mentions=NO_PINGS)
            except (discord.Forbidden, discord.NotFound) as exc:  # DMs closed or user gone: skip, never retry forever
                log.info("notification %s not delivered: %s", note_id, exc.status)
            await asyncio.to_thread(self._mark_note, note_id)
        return len(notes)

    def _pending_notes(self) -> list[tuple[int, str, str]]:
        with self.sessions() as session:
            out = []
            for note in pending_notifications(session, PLATFORM):
                user = session.get(User, note.user_id)
                if user is not None:
                    out.append((note.id, user.platform_user_id, note.text))
            return out

    def _mark_note(self, note_id: int) -> None:
        with self.sessions.begin() as session:
            mark_delivered(session, note_id)
