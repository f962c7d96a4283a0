"""The slash commands: one small coroutine each, described by its docstring and ``@app_commands.describe``.

Chat commands go through the shared chat service (the same answers as Telegram and the console); /newcharacter
and the admin review go through ``core.submissions``. Commands that start model work answer within Discord's
three seconds by deferring, then edit the answer. ``add_commands`` puts them all on a tree: the bot's, and the
one ``unichar discord sync`` uploads; /help lists them from the same tuples, so it names exactly what is registered.
"""

from __future__ import annotations

import asyncio
import io
from typing import TYPE_CHECKING, Any, Final

import discord
from discord import app_commands

from bots.discord import guilds
from bots.discord.intake import read_images
from bots.discord.routing import PLATFORM
from bots.discord.voice import NO_PINGS
from bots.render import DISCORD_LIMIT, split_text
from core import memory
from core.chat import Answer, JobQueued, Refusal
from core.db import repositories as repo
from core.db.models import Conversation, User
from core.media import TRAINING_FORMATS
from core.submissions import Actor, SubmissionError
from core.wording import counted

if TYPE_CHECKING:
    from collections.abc import Callable

    from sqlalchemy.orm import Session

    from bots.discord.bot import UniBot
    from core.chat import ChatOutcome

__all__ = ["COMMANDS", "add_commands", "help_text", "outcome_text"]

Interaction = discord.Interaction  # the client is a UniBot; annotated loosely so discord.py can inspect signatures
IMAGE_SLOTS: Final = 10
EMBED_LIMIT: Final = 4096


def _bot(interaction: Interaction[Any]) -> UniBot:
    return interaction.client  # type: ignore[return-value]


def outcome_text(outcome: ChatOutcome) -> str:
    """A chat-service outcome as the text to show."""
    if isinstance(outcome, Answer):
        return outcome.text
    if isinstance(outcome, Refusal):
        return f"⚠️ {outcome.reason}"
    return f"Queued for {outcome.character}."


async def _say(interaction: Interaction[Any], text: str, *, ephemeral: bool = True) -> None:
    """Answer (or follow up), split to Discord's limit, pinging nobody."""
    chunks = split_text(text, DISCORD_LIMIT) or ["…"]
    for chunk in chunks:
        if interaction.response.is_done():
            await interaction.followup.send(chunk, ephemeral=ephemeral, allowed_mentions=NO_PINGS)
        else:
            await interaction.response.send_message(chunk, ephemeral=ephemeral, allowed_mentions=NO_PINGS)


def _actor(interaction: Interaction[Any]) -> Actor:
    return Actor(PLATFORM, str(interaction.user.id), interaction.user.display_name)


def _is_admin(interaction: Interaction[Any]) -> bool:
    return _bot(interaction).settings.is_admin(PLATFORM, str(interaction.user.id))


def _admin_only() -> Any:
    """A check: the configured bot admins only."""

    def predicate(interaction: Interaction[Any]) -> bool:
        if not _is_admin(interaction):
            raise app_commands.CheckFailure("Only a bot admin can do that.")
        return True

    return app_commands.check(predicate)


def _guild_manager() -> Any:
    """A check: bot admins, or members who may manage the server."""

    def predicate(interaction: Interaction[Any]) -> bool:
        if interaction.guild is None:
            raise app_commands.CheckFailure("Server settings are set inside a server.")
        if _is_admin(interaction) or interaction.permissions.manage_guild:  # as Discord resolved them
            return True
        raise app_commands.CheckFailure("Only a bot admin or someone who can manage this server can do that.")

    return app_commands.check(predicate)


# --- characters ---------------------------------------------------------------------------------------------


def _names(bot: UniBot, current: str) -> list[str]:
    with bot.sessions() as session:
        names = [c.name for c in repo.published_characters(session)]
    lowered = current.lower()
    return [name for name in names if lowered in name.lower()][:25]


async def character_autocomplete(interaction: Interaction[Any], current: str) -> list[app_commands.Choice[str]]:
    """Published characters whose name contains what was typed."""
    names = await asyncio.to_thread(_names, _bot(interaction), current)
    return [app_commands.Choice(name=name, value=name) for name in names]


character = app_commands.Group(name="character", description="Characters you can talk to")


@character.command(name="list")
async def character_list(interaction: Interaction[Any]) -> None:
    """See every character you can talk to."""
    await _say(interaction, outcome_text(await _bot(interaction).ask(interaction, "/characters")))


@character.command(name="use")
@app_commands.describe(name="The character to talk to here")
@app_commands.autocomplete(name=character_autocomplete)
async def character_use(interaction: Interaction[Any], name: str) -> None:
    """Talk to another character (in a server channel: for everyone in it)."""
    bot = _bot(interaction)
    channel = interaction.channel
    age_restricted = channel is not None and guilds.is_age_restricted(channel)  # type: ignore[arg-type]
    if interaction.guild_id is not None and not age_restricted and await asyncio.to_thread(_nsfw, bot, name):
        await _say(interaction, "⚠️ That character is adults-only and speaks only in age-restricted channels.")
        return
    outcome = await bot.ask(interaction, f"/use {name}")
    await _say(interaction, outcome_text(outcome), ephemeral=interaction.guild_id is None)


def _info(bot: UniBot, name: str) -> discord.Embed | None:
    with bot.sessions() as session:
        found = repo.character_by_name(session, name)
        if found is None:
            return None
        embed = discord.Embed(title=found.name, description=(found.description or "")[:EMBED_LIMIT] or None)
        if found.greeting:
            embed.add_field(name="Greeting", value=found.greeting[:1024], inline=False)
        embed.add_field(name="Pictures", value=found.image_policy.replace("_", " "))
        embed.add_field(name="Adults only", value="yes" if found.nsfw else "no")
        embed.add_field(name="Reference images", value=str(len(found.reference_images)))
        base = bot.settings.public_files_url
        if base and found.avatar_key:
            embed.set_thumbnail(url=f"{base.rstrip('/')}/{found.avatar_key}")
        return embed


@character.command(name="info")
@app_commands.describe(name="The character to describe")
@app_commands.autocomplete(name=character_autocomplete)
async def character_info(interaction: Interaction[Any], name: str) -> None:
    """Read a character's persona and greeting."""
    embed = await asyncio.to_thread(_info, _bot(interaction), name)
    if embed is None:
        await _say(interaction, f"⚠️ There is no character called {name!r}; /character list shows them all.")
        return
    await interaction.response.send_message(embed=embed, ephemeral=True, allowed_mentions=NO_PINGS)


# --- chat -----------------------------------------------------------------------------------------------------


@app_commands.command(name="imagine")
@app_commands.describe(prompt="What the character should draw")
async def imagine(interaction: Interaction[Any], prompt: app_commands.Range[str, 1, 1500]) -> None:
    """Ask the character for a picture; it arrives here with Regenerate, Accept and Delete buttons."""
    bot = _bot(interaction)
    await interaction.response.defer(thinking=True)  # Discord wants an answer within three seconds
    if refusal := await bot.interaction_gate(interaction):
        await interaction.edit_original_response(content=f"⚠️ {refusal}")
        return
    outcome = await bot.ask(interaction, f"/imagine {prompt}")
    if not isinstance(outcome, JobQueued):
        await interaction.edit_original_response(content=outcome_text(outcome), allowed_mentions=NO_PINGS)
        return
    where = f" ({outcome.position} in the queue)" if outcome.position and outcome.position > 1 else ""
    text = f"🎨 {outcome.character} is drawing: {discord.utils.escape_markdown(prompt)}{where}"
    await interaction.edit_original_response(content=text[:DISCORD_LIMIT], allowed_mentions=NO_PINGS)
    bot.deliver(outcome, str(interaction.channel_id), None, interaction.user.id)


@app_commands.command(name="regenerate")
async def regenerate(interaction: Interaction[Any]) -> None:
    """Draw your last picture here again, the same scene with a new seed (or press a picture's Regenerate)."""
    bot = _bot(interaction)
    if refusal := await bot.interaction_gate(interaction):
        await _say(interaction, f"⚠️ {refusal}")
        return
    await bot.regenerate_image(interaction, None)


@app_commands.command(name="reset")
async def reset(interaction: Interaction[Any]) -> None:
    """Start your conversation with the character over."""
    await _say(interaction, outcome_text(await _bot(interaction).ask(interaction, "/reset")))


def _submission_lines(bot: UniBot, who: Actor) -> list[str]:
    with bot.sessions() as session:
        return [f"#{s.id} {s.name or '(unnamed)'}: {s.state}" for s in bot.services.submissions.mine(session, who)[:10]]


@app_commands.command(name="status")
async def status(interaction: Interaction[Any]) -> None:
    """See your requests in the queue and your character submissions."""
    bot = _bot(interaction)
    text = outcome_text(await bot.ask(interaction, "/status"))
    lines = await asyncio.to_thread(_submission_lines, bot, _actor(interaction))
    if lines:
        text += "\n\nYour characters:\n" + "\n".join(lines)
    await _say(interaction, text)


# --- /memory -------------------------------------------------------------------------------------------------


async def _in_conversation(interaction: Interaction[Any], action: Callable[[Session, Conversation], str]) -> str:
    """Run a core.memory command on the user's conversation with the character of this channel (or thread)."""
    bot = _bot(interaction)
    inherited = await bot.inherited(interaction)

    def run() -> str:
        with bot.sessions.begin() as session:
            user = repo.get_or_create_user(session, PLATFORM, str(interaction.user.id), interaction.user.display_name)
            is_group = interaction.guild_id is not None
            chat = repo.get_or_create_chat(session, PLATFORM, str(interaction.channel_id), is_group)
            found = guilds.addressed(session, user, chat, inherited, bot.settings.default_character)
            if found is None:
                return "⚠️ No character is available yet: an admin has to add one first."
            return action(session, repo.active_conversation(session, user.id, found.id, chat.id))

    return await asyncio.to_thread(run)


memory_group = app_commands.Group(name="memory", description="What the character remembers of you")


@memory_group.command(name="show")
async def memory_show(interaction: Interaction[Any]) -> None:
    """See what the character remembers of you here, numbered for forgetting."""
    await _say(interaction, await _in_conversation(interaction, memory.describe_memory))


@memory_group.command(name="remember")
@app_commands.describe(fact="Something the character should always know about you")
async def memory_remember(interaction: Interaction[Any], fact: app_commands.Range[str, 1, 500]) -> None:
    """Pin a fact the character keeps about you."""
    await _say(interaction, await _in_conversation(interaction, lambda s, c: memory.remember(s, c, fact)))


@memory_group.command(name="forget")
@app_commands.describe(what="A fact's number from /memory show, 'all', 'me', or 'me confirm' (deletes all of you)")
async def memory_forget(interaction: Interaction[Any], what: app_commands.Range[str, 1, 20]) -> None:
    """Forget one fact, every fact, or everything of you."""
    store = _bot(interaction).services.files
    await _say(interaction, await _in_conversation(interaction, lambda s, c: memory.forget(s, c, what, store)))


@memory_group.command(name="persona")
@app_commands.describe(text="Who you are, for every character; 'clear' removes it; empty shows it")
async def memory_persona(interaction: Interaction[Any], text: app_commands.Range[str, 0, 1000] = "") -> None:
    """Tell the characters who you are."""

    def action(session: Session, conversation: Conversation) -> str:
        user = session.get(User, conversation.user_id)
        assert user is not None
        return memory.persona(session, user, text)

    await _say(interaction, await _in_conversation(interaction, action))


# --- /newcharacter ------------------------------------------------------------------------------------------


def _submit(bot: UniBot, who: Actor, texts: tuple[str, str, str], images: list[bytes], real_person: bool) -> str:
    """The whole /newcharacter dialog in one transaction: every check passes, or nothing is kept."""
    service = bot.services.submissions
    name, description, greeting = texts
    with bot.sessions.begin() as session:
        draft = service.draft(session, who)
        if draft is not None:  # an earlier, unfinished attempt: this command replaces it
            service.cancel(session, who)
        service.start(session, who)
        service.set_name(session, who, name)
        service.set_description(session, who, description)
        service.set_greeting(session, who, greeting)
        for number, data in enumerate(images, start=1):
            try:
                service.add_image(session, who, data)
            except SubmissionError as exc:
                raise SubmissionError(f"Image {number}: {exc}") from None
        service.attest_consent(session, who, real_person=real_person)
        submitted = service.submit(session, who)
        return f"✅ {submitted.name!r} is submitted (#{submitted.id}). An admin will review it; I'll tell you by DM."


@app_commands.command(name="newcharacter")
@app_commands.describe(
    name="The character's name",
    description="Who they are, how they speak and behave",
    greeting="The first thing they say in a new conversation",
    consent="I have the right to use these images; a real person shown has consented",
    real_person="The images show a real person",
    **{f"image{n}": f"Reference image {n} of {IMAGE_SLOTS}" for n in range(1, IMAGE_SLOTS + 1)},
)
async def newcharacter(
    interaction: Interaction[Any],
    name: app_commands.Range[str, 2, 64],
    description: app_commands.Range[str, 20, 4000],
    greeting: app_commands.Range[str, 1, 2000],
    consent: bool,
    image1: discord.Attachment,
    image2: discord.Attachment | None = None,
    image3: discord.Attachment | None = None,
    image4: discord.Attachment | None = None,
    image5: discord.Attachment | None = None,
    image6: discord.Attachment | None = None,
    image7: discord.Attachment | None = None,
    image8: discord.Attachment | None = None,
    image9: discord.Attachment | None = None,
    image10: discord.Attachment | None = None,
    real_person: bool = False,
) -> None:
    """Create a character from a name, a persona, a greeting and 10 pictures; an admin reviews it."""
    bot = _bot(interaction)
    if not consent:
        await _say(interaction, "⚠️ A character can only be submitted with your consent attestation (consent: True).")
        return
    await interaction.response.defer(ephemeral=True, thinking=True)
    given = [a for a in (image1, image2, image3, image4, image5, image6, image7, image8, image9, image10) if a]
    intake = await read_images(given, bot.settings, TRAINING_FORMATS)
    if intake.refused:
        await interaction.followup.send(f"Nothing was submitted:\n{intake.notice}", ephemeral=True)
        return
    try:
        text = await asyncio.to_thread(
            _submit,
            bot,
            _actor(interaction),
            (name, description, greeting),
            [i.data for i in intake.images],
            real_person,
        )
    except SubmissionError as exc:
        text = f"⚠️ Nothing was submitted: {exc}"
    await interaction.followup.send(text, ephemeral=True, allowed_mentions=NO_PINGS)


# --- admin ----------------------------------------------------------------------------------------------------


def _queue_text(bot: UniBot, who: Actor) -> str:
    with bot.sessions() as session:
        items = bot.services.submissions.queue(session, who)
    if not items:
        return "The review queue is empty."
    lines = []
    for item in items:
        line = f"#{item.id} {item.name!r} by {item.submitter}: {item.state}, {counted(item.images, 'image')}"
        if item.total_steps:
            line += f", training {item.percent:.0f}%"
        lines.append(line + (f" ({item.reason})" if item.reason else ""))
    return "Submissions:\n" + "\n".join(lines)


@app_commands.command(name="queue")
@_admin_only()
async def queue(interaction: Interaction[Any]) -> None:
    """(Admins) See character submissions waiting for review or training."""
    await _say(interaction, await asyncio.to_thread(_queue_text, _bot(interaction), _actor(interaction)))


def _inspect(bot: UniBot, who: Actor, submission_id: int) -> tuple[str, bytes]:
    with bot.sessions() as session:
        seen = bot.services.submissions.inspect(session, who, submission_id)
    text = (
        f"#{seen.item.id} {seen.item.name!r} by {seen.item.submitter} ({seen.item.state})\n"
        f"Real person: {'yes' if seen.real_person else 'no'}\n\n{seen.description}\n\nGreeting: {seen.greeting}"
    )
    return text, seen.contact_sheet_png


def _decide(bot: UniBot, who: Actor, submission_id: int, reason: str | None) -> str:
    service = bot.services.submissions
    with bot.sessions.begin() as session:
        if reason is None:
            job_id = service.approve(session, who, submission_id)
            return f"✅ Submission #{submission_id} approved; training job #{job_id} is queued."
        service.reject(session, who, submission_id, reason)
        return f"Submission #{submission_id} rejected; the submitter will be told why."


async def pending_autocomplete(interaction: Interaction[Any], current: str) -> list[app_commands.Choice[int]]:
    """Pending submissions, for admins."""
    bot = _bot(interaction)
    if not _is_admin(interaction):
        return []

    def pending() -> list[tuple[int, str]]:
        with bot.sessions() as session:
            return [(i.id, i.name) for i in bot.services.submissions.list_pending(session, _actor(interaction))]

    items = await asyncio.to_thread(pending)
    return [app_commands.Choice(name=f"#{i} {n}"[:100], value=i) for i, n in items if current in f"{i} {n}"][:25]


@app_commands.command(name="approve")
@app_commands.describe(submission="The submission to approve", look="Show it to me first instead of approving")
@app_commands.autocomplete(submission=pending_autocomplete)
@_admin_only()
async def approve(interaction: Interaction[Any], submission: int, look: bool = False) -> None:
    """(Admins) Approve a character submission and queue its training."""
    bot = _bot(interaction)
    await interaction.response.defer(ephemeral=True, thinking=True)
    try:
        if look:
            text, sheet = await asyncio.to_thread(_inspect, bot, _actor(interaction), submission)
            files = [discord.File(io.BytesIO(sheet), filename=f"submission-{submission}.png")] if sheet else []
            await interaction.followup.send(
                text[:DISCORD_LIMIT], files=files, ephemeral=True, allowed_mentions=NO_PINGS
            )
            return
        text = await asyncio.to_thread(_decide, bot, _actor(interaction), submission, None)
    except SubmissionError as exc:
        text = f"⚠️ {exc}"
    await interaction.followup.send(text, ephemeral=True, allowed_mentions=NO_PINGS)


@app_commands.command(name="reject")
@app_commands.describe(submission="The submission to reject", reason="Why; the submitter sees this")
@app_commands.autocomplete(submission=pending_autocomplete)
@_admin_only()
async def reject(interaction: Interaction[Any], submission: int, reason: app_commands.Range[str, 3, 1000]) -> None:
    """(Admins) Reject a character submission with a reason."""
    try:
        text = await asyncio.to_thread(_decide, _bot(interaction), _actor(interaction), submission, reason)
    except SubmissionError as exc:
        text = f"⚠️ {exc}"
    await _say(interaction, text)


server_settings = app_commands.Group(
    name="settings",
    description="Where characters speak in this server",
    guild_only=True,
    default_permissions=discord.Permissions(manage_guild=True),
)


def _in_session(bot: UniBot, action: Any) -> Any:
    with bot.sessions.begin() as session:
        return action(session)


def _channel_list(channels: list[int]) -> str:
    return ", ".join(f"<#{c}>" for c in channels) if channels else "every channel"


async def _set_allowed(interaction: Interaction[Any], channel: discord.TextChannel, allowed: bool) -> None:
    """Put a channel on or off the guild's speaking list and say where characters may speak now."""
    assert interaction.guild_id is not None
    channels = await asyncio.to_thread(
        _in_session, _bot(interaction), lambda s: guilds.allow_channel(s, interaction.guild_id, channel.id, allowed)
    )
    await _say(interaction, f"Characters may speak in: {_channel_list(channels)}.")


@server_settings.command(name="allow")
@app_commands.describe(channel="A channel where characters may speak")
@_guild_manager()
async def settings_allow(interaction: Interaction[Any], channel: discord.TextChannel) -> None:
    """Let characters speak in a channel (once any is allowed, only allowed ones)."""
    await _set_allowed(interaction, channel, True)


@server_settings.command(name="disallow")
@app_commands.describe(channel="A channel to take off the list")
@_guild_manager()
async def settings_disallow(interaction: Interaction[Any], channel: discord.TextChannel) -> None:
    """Take a channel off the list where characters may speak."""
    await _set_allowed(interaction, channel, False)


def _listen(session: Any, channel_id: int, name: str | None) -> str:
    if name is None:
        guilds.set_listen(session, channel_id, False)
        return f"Characters in <#{channel_id}> now answer only mentions and replies."
    found = repo.character_by_name(session, name)
    if found is None:
        raise SubmissionError(f"There is no character called {name!r}.")
    guilds.set_listen(session, channel_id, True, found.id)
    return f"{found.name} now answers every message in <#{channel_id}>."


@server_settings.command(name="listen")
@app_commands.describe(channel="The channel", character="Who answers every message there")
@app_commands.autocomplete(character=character_autocomplete)
@_guild_manager()
async def settings_listen(interaction: Interaction[Any], channel: discord.TextChannel, character: str) -> None:
    """Make a character answer every message in a channel, not only mentions."""
    if not channel.is_nsfw() and await asyncio.to_thread(_nsfw, _bot(interaction), character):
        await _say(interaction, "⚠️ An adults-only character can only listen in an age-restricted channel.")
        return
    try:
        text = await asyncio.to_thread(_in_session, _bot(interaction), lambda s: _listen(s, channel.id, character))
    except SubmissionError as exc:
        text = f"⚠️ {exc}"
    await _say(interaction, text)


def _nsfw(bot: UniBot, name: str) -> bool:
    with bot.sessions() as session:
        found = repo.character_by_name(session, name)
        return bool(found and found.nsfw)


@server_settings.command(name="quiet")
@app_commands.describe(channel="The channel")
@_guild_manager()
async def settings_quiet(interaction: Interaction[Any], channel: discord.TextChannel) -> None:
    """Characters in a channel answer only mentions and replies again."""
    text = await asyncio.to_thread(_in_session, _bot(interaction), lambda s: _listen(s, channel.id, None))
    await _say(interaction, text)


@server_settings.command(name="show")
@_guild_manager()
async def settings_show(interaction: Interaction[Any]) -> None:
    """See where characters may speak in this server."""
    guild = interaction.guild
    assert guild is not None

    def read(session: Any) -> str:
        allowed = [c for c in guild.text_channels if guilds.place_of(session, c).allowed]
        listening = [c for c in guild.text_channels if guilds.place_of(session, c).listen]
        every = len(allowed) == len(guild.text_channels)
        return (
            f"Characters may speak in: {'every channel' if every else _channel_list([c.id for c in allowed])}.\n"
            f"They answer every message in: {_channel_list([c.id for c in listening]) if listening else 'no channel'}.\n"
            "Adults-only characters speak only in age-restricted channels."
        )

    await _say(interaction, await asyncio.to_thread(_in_session, _bot(interaction), read))


# --- /help --------------------------------------------------------------------------------------------------

TALKING: Final = (
    "Talk to a character by mentioning me, by replying to a character's message, in a DM, or in a channel where "
    "a character listens. Replying to a character's message talks to that character, for that message only; "
    "/character use picks who answers here for everyone. A thread follows its channel's character until someone "
    "picks one in the thread."
)


@app_commands.command(name="help")
async def help_command(interaction: Interaction[Any]) -> None:
    """See every command and how to talk to the characters."""
    manager = interaction.guild is not None and (_is_admin(interaction) or interaction.permissions.manage_guild)
    await _say(interaction, help_text(admin=_is_admin(interaction), manager=manager))


USER_COMMANDS: Final = (character, imagine, regenerate, reset, memory_group, status, newcharacter, help_command)
ADMIN_COMMANDS: Final = (queue, approve, reject)
MANAGER_COMMANDS: Final = (server_settings,)
COMMANDS: Final = USER_COMMANDS + ADMIN_COMMANDS + MANAGER_COMMANDS


def _lines(commands: tuple[app_commands.Command[Any, Any, Any] | app_commands.Group, ...]) -> list[str]:
    """One line per command a user can type (a group's subcommands, not the group)."""
    leaves = [c for top in commands for c in ([top] if isinstance(top, app_commands.Command) else top.walk_commands())]
    return [f"/{c.qualified_name} — {c.description}" for c in leaves if isinstance(c, app_commands.Command)]


def help_text(*, admin: bool, manager: bool) -> str:
    """How to talk, then every command with its description; admins and server managers also see theirs."""
    text = f"{TALKING}\n\n" + "\n".join(_lines(USER_COMMANDS))
    if admin:
        text += "\n\nBot admins:\n" + "\n".join(_lines(ADMIN_COMMANDS))
    if manager:
        text += "\n\nServer managers:\n" + "\n".join(_lines(MANAGER_COMMANDS))
    return text


def add_commands(tree: app_commands.CommandTree[Any]) -> None:
    """Put every slash command on ``tree``."""
    for command in COMMANDS:
        tree.add_command(command)
