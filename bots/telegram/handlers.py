"""What users do with the bot: talk, switch characters, ask for pictures, reset, look at and prune memory.

Each command is one small coroutine; the shared commands (/characters, /use, /imagine, /regenerate, /reset, /status)
go through ``core.chat.ChatService`` so that every frontend answers alike, and a queued job is handed to
``bots.delivery``. Buttons carry the id of the user who may press them (or find it in the job row), so that in a
group nobody else can regenerate, accept or reset for you; every button press is answered.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Callable
from typing import Final

from sqlalchemy import select
from sqlalchemy.orm import Session
from telegram import CallbackQuery, InlineKeyboardButton, InlineKeyboardMarkup, Update

from bots.delivery import Target
from bots.telegram.context import BotContext, Services, in_session
from bots.telegram.incoming import (
    PLATFORM,
    AlbumCollector,
    TooLarge,
    addressed_text,
    download,
    incoming,
    is_group,
    picture_of,
)
from core import memory
from core.chat import COMMANDS, Answer, ChatOutcome, JobQueued, Refusal
from core.db import repositories as repo
from core.db.models import Character, Conversation, Job, User
from core.jobs import Attachment, IncomingMessage, Progress

__all__ = [
    "EXTRA_COMMANDS",
    "ask",
    "characters",
    "chat_member",
    "chat_message",
    "confirm_reset",
    "edited_message",
    "forget",
    "help_command",
    "help_text",
    "image_button",
    "imagine",
    "memory_button",
    "memory_command",
    "persona",
    "pick_character",
    "picture_message",
    "regenerate",
    "remember",
    "reset",
    "start",
    "status",
    "unknown_command",
    "unsupported_message",
    "use",
]

log = logging.getLogger(__name__)

EXTRA_COMMANDS: Final[dict[str, str]] = {
    "start": "meet the characters",
    "memory": "what the character remembers of you",
    "remember": "TEXT: a fact the character keeps",
    "forget": "N | all | me: forget facts, or everything of you",
    "persona": "TEXT: who you are, for every character",
    "newcharacter": "create a character from 10 pictures",
    "cancel": "stop creating a character",
}
ADMIN_COMMANDS: Final[dict[str, str]] = {
    "queue": "character submissions waiting",
    "review": "ID: a submission's pictures and persona",
    "approve": "ID: approve a submission and queue its training",
    "reject": "ID REASON: refuse a submission",
}


def help_text(is_admin: bool) -> str:
    """Every command, one line each; admins also see theirs (a test keeps this equal to the registered commands)."""
    lines = [f"/{name} {text}" for name, text in {**COMMANDS, **EXTRA_COMMANDS}.items()]
    text = "Talk to me in plain words, or send a picture and ask about it.\n\n" + "\n".join(lines)
    if is_admin:
        text += "\n\nAdmin:\n" + "\n".join(f"/{name} {text}" for name, text in ADMIN_COMMANDS.items())
    return text


# --- the shared path: a message -> the chat service -> an answer or a delivered job ----------------------


async def ask(update: Update, context: BotContext, message: IncomingMessage) -> ChatOutcome:
    """Hand a message to the chat service and show its outcome."""
    services = context.services
    outcome = await asyncio.to_thread(services.chat.handle, message)
    if isinstance(outcome, JobQueued):
        target = Target(outcome.job_id, outcome.kind, message.chat_id, message.message_id, message.user_id)
        initial = Progress(stage="queued", position=outcome.position)
        services.deliveries.start(target, initial=initial)
    elif isinstance(outcome, Answer):
        markup = await _character_buttons(services, outcome.choices) if outcome.choices else None
        await _say(update, outcome.text, markup)
    elif isinstance(outcome, Refusal):
        await _say(update, f"⚠️ {outcome.reason}")
    return outcome


def _outcome_text(outcome: ChatOutcome) -> str:
    """A command's answer or refusal as one line of text (for editing a button's message)."""
    if isinstance(outcome, Answer):
        return outcome.text
    if isinstance(outcome, Refusal):
        return f"⚠️ {outcome.reason}"
    return "Queued."


async def _say(update: Update, text: str, markup: InlineKeyboardMarkup | None = None) -> None:
    """Answer in the chat of the update (a reply to its message when there is one)."""
    message = update.effective_message
    assert message is not None
    await message.reply_text(text, reply_markup=markup, do_quote=message.chat.type != "private")


async def _character_buttons(services: Services, names: tuple[str, ...]) -> InlineKeyboardMarkup:
    """One button per character (its id in the data, since names may not fit Telegram's 64 bytes)."""

    def ids(session: Session) -> list[tuple[int, str]]:
        rows = session.execute(select(Character.id, Character.name).where(Character.name.in_(names))).all()
        order = {name: i for i, name in enumerate(names)}
        return sorted(((row.id, row.name) for row in rows), key=lambda row: order[row[1]])

    rows = await in_session(services, ids)
    return InlineKeyboardMarkup([[InlineKeyboardButton(name, callback_data=f"use:{cid}")] for cid, name in rows])


async def _command(update: Update, context: BotContext) -> None:
    """Pass the command as typed to the chat service."""
    message = update.effective_message
    assert message is not None
    await ask(update, context, incoming(update, message.text or ""))


# --- commands ------------------------------------------------------------------------------------------------


async def start(update: Update, context: BotContext) -> None:
    """Greets the user and offers the characters as buttons."""
    user = update.effective_user
    assert user is not None
    outcome = await asyncio.to_thread(context.services.chat.handle, incoming(update, "/characters"))
    greeting = (
        f"Hi {user.first_name}! I bring characters to life: talk to them, send them pictures, ask them for one "
        "with /imagine. /help lists everything."
    )
    if isinstance(outcome, Answer) and outcome.choices:
        markup = await _character_buttons(context.services, outcome.choices)
        await _say(update, greeting + "\n\nWho do you want to talk to?", markup)
    else:
        await _say(update, greeting + "\n\nNo characters are available yet; /newcharacter creates one.")


async def characters(update: Update, context: BotContext) -> None:
    """Lists the characters, with a button for each."""
    await _command(update, context)


async def use(update: Update, context: BotContext) -> None:
    """Switches to another character: /use NAME."""
    await _command(update, context)


async def imagine(update: Update, context: BotContext) -> None:
    """Asks the character for a picture: /imagine PROMPT."""
    await _command(update, context)


async def regenerate(update: Update, context: BotContext) -> None:
    """Draws the user's last picture here again with a new seed (/regenerate N: picture N)."""
    await _command(update, context)


async def status(update: Update, context: BotContext) -> None:
    """Shows the user's requests and their places in the queue."""
    await _command(update, context)


async def help_command(update: Update, context: BotContext) -> None:
    """Lists every command."""
    user = update.effective_user
    assert user is not None
    await _say(update, help_text(context.services.settings.is_admin(PLATFORM, str(user.id))))


async def reset(update: Update, context: BotContext) -> None:
    """Asks for a confirmation before starting the conversation over."""
    user = update.effective_user
    assert user is not None
    buttons = InlineKeyboardMarkup(
        [[InlineKeyboardButton("Yes, start over", callback_data=f"reset:yes:{user.id}"),
          InlineKeyboardButton("No, keep it", callback_data=f"reset:no:{user.id}")]]
    )
    await _say(update, "Start this conversation over? The character forgets what was said here.", buttons)


# --- memory ----------------------------------------------------------------------------------------------------


def _conversation(services: Services, message: IncomingMessage, session: Session) -> Conversation | None:
    """The user's open conversation in this chat with the current character (None when there is no character)."""
    user = repo.get_or_create_user(session, PLATFORM, message.user_id, message.display_name)
    chat = repo.get_or_create_chat(session, PLATFORM, message.chat_id, message.is_group)
    character = repo.resolve_character(session, user, chat, services.settings.default_character)
    if character is None:
        return None
    return repo.active_conversation(session, user.id, character.id, chat.id)


async def _with_conversation(
    update: Update, context: BotContext, work: Callable[[Session, Conversation], str]
) -> str:
    services, message = context.services, incoming(update, "")

    def run(session: Session) -> str:
        conversation = _conversation(services, message, session)
        if conversation is None:
            return "No character is available yet: an admin has to add one first."
        return work(session, conversation)

    return await in_session(services, run)


def _argument(update: Update) -> str:
    message = update.effective_message
    text = (message.text or "") if message else ""
    return text.split(maxsplit=1)[1] if len(text.split(maxsplit=1)) > 1 else ""


async def memory_command(update: Update, context: BotContext) -> None:
    """Shows what the character remembers of the user, with a button to forget the facts."""
    user = update.effective_user
    assert user is not None
    text = await _with_conversation(update, context, memory.describe_memory)
    markup = InlineKeyboardMarkup([[InlineKeyboardButton("🧹 Forget all facts", callback_data=f"mem:all:{user.id}")]])
    await _say(update, text, markup)


async def remember(update: Update, context: BotContext) -> None:
    """Pins a fact the character keeps: /remember TEXT."""
    argument = _argument(update)
    await _say(update, await _with_conversation(update, context, lambda s, c: memory.remember(s, c, argument)))


async def forget(update: Update, context: BotContext) -> None:
    """Forgets facts (/forget N, /forget all) or everything of the user (/forget me)."""
    argument, store = _argument(update), context.services.store
    await _say(update, await _with_conversation(update, context, lambda s, c: memory.forget(s, c, argument, store)))


async def persona(update: Update, context: BotContext) -> None:
    """Shows or sets who the user is for every character: /persona TEXT."""
    argument, message = _argument(update), incoming(update, "")

    def run(session: Session) -> str:
        user = repo.get_or_create_user(session, PLATFORM, message.user_id, message.display_name)
        return memory.persona(session, user, argument)

    await _say(update, await in_session(context.services, run))


# --- messages ------------------------------------------------------------------------------------------------


async def chat_message(update: Update, context: BotContext) -> None:
    """Answers a text message meant for the character."""
    message = update.effective_message
    assert message is not None
    text = addressed_text(message, context.bot, context.services.settings.telegram_trigger_word)
    if text is None:
        return
    async with _in_order(update, context):
        await ask(update, context, incoming(update, text))


def _in_order(update: Update, context: BotContext) -> asyncio.Lock:
    """The chat's lock: messages run as concurrent tasks, yet one chat's are answered in the order sent.

    Taken before the handler's first await; asyncio's locks are FIFO, so tasks queue in update order.
    """
    locks: weakref.WeakValueDictionary[int, asyncio.Lock] = context.bot_data.setdefault(
        "chat_locks", weakref.WeakValueDictionary()
    )
    chat_id = update.effective_chat.id if update.effective_chat else 0
    lock = locks.get(chat_id)
    if lock is None:
        lock = locks[chat_id] = asyncio.Lock()
    return lock


def _albums(context: BotContext) -> AlbumCollector:
    collector = context.bot_data.get("albums")
    if collector is None:
        collector = context.bot_data["albums"] = AlbumCollector(context.services.settings.telegram_album_wait_s)
    return collector


async def picture_message(update: Update, context: BotContext) -> None:
    """Lets the character look at a picture (or an album) and answer its caption."""
    message = update.effective_message
    assert message is not None
    if message.media_group_id is not None:
        _albums(context).add(message.media_group_id, update, lambda parts: _pictures(parts, context))
        return
    async with _in_order(update, context):
        await _pictures([update], context)


async def _pictures(parts: list[Update], context: BotContext) -> None:
    """Download the pictures of one message or album and ask about them; refusals name the file."""
    first = parts[0]
    messages = [part.effective_message for part in parts if part.effective_message is not None]
    trigger = context.services.settings.telegram_trigger_word
    captions = [addressed_text(m, context.bot, trigger) for m in messages]
    if is_group(messages[0].chat) and all(caption is None for caption in captions):
        return  # an album in a group that nobody addressed to the character
    limit = context.services.settings.max_upload_bytes
    attachments = []
    for message in messages:
        picture = picture_of(message)
        if picture is None:
            continue
        file_id, size, name, mime = picture
        try:
            attachments.append(Attachment(name, mime, await download(context.bot, file_id, size, limit)))
        except TooLarge as error:
            await _say(first, f"⚠️ {error}")
            return
    text = next((caption for caption in captions if caption), "")
    await ask(first, context, incoming(first, text, attachments))


async def unsupported_message(update: Update, context: BotContext) -> None:
    """Explains which kinds of message the character understands (stickers, voice, files are not among them)."""
    message = update.effective_message
    assert message is not None
    if addressed_text(message, context.bot, context.services.settings.telegram_trigger_word) is None:
        return
    if message.sticker is not None:
        reason = "I can't read stickers"
    elif message.voice is not None or message.audio is not None or message.video_note is not None:
        reason = "I can't listen to voice or audio messages yet"
    elif message.video is not None or message.animation is not None:
        reason = "I can't watch videos"
    elif message.document is not None:
        reason = f"I can't open {message.document.file_name or 'that file'}: it is not a picture"
    else:
        reason = "I can't use that kind of message"
    await _say(update, f"⚠️ {reason}. Send me text, or a photo with a question about it.")


async def unknown_command(update: Update, context: BotContext) -> None:
    """Says which commands exist when a private message starts with one that does not."""
    user = update.effective_user
    assert user is not None
    is_admin = context.services.settings.is_admin(PLATFORM, str(user.id))
    await _say(update, "⚠️ I don't know that command.\n\n" + help_text(is_admin))


async def edited_message(update: Update, context: BotContext) -> None:
    """Ignores edits: the reply to the original stands, and editing must not post a second one."""
    log.debug("ignoring an edited message in chat %s", update.effective_chat.id if update.effective_chat else "?")


# --- buttons -------------------------------------------------------------------------------------------------


async def pick_character(update: Update, context: BotContext) -> None:
    """Switches to the character whose button was pressed."""
    query = update.callback_query
    assert query is not None and query.data is not None
    character_id = int(query.data.split(":")[1])

    def name_of(session: Session) -> str | None:
        character = session.get(Character, character_id)
        return character.name if character is not None and character.status == "published" else None

    name = await in_session(context.services, name_of)
    if name is None:
        await query.answer("That character is no longer available.", show_alert=True)
        return
    await query.answer()
    outcome = await asyncio.to_thread(context.services.chat.handle, incoming(update, f"/use {name}"))
    await query.edit_message_text(_outcome_text(outcome))


async def _refuse_stranger(query: CallbackQuery, owner: str | None, why: str) -> bool:
    """Buttons belong to one user: anyone else gets ``why`` as an alert (True), the owner passes (False)."""
    if str(query.from_user.id) == owner:
        return False
    await query.answer(why, show_alert=True)
    return True


async def confirm_reset(update: Update, context: BotContext) -> None:
    """Starts over (or not) when the user who asked for /reset presses a button."""
    query = update.callback_query
    assert query is not None and query.data is not None
    _, choice, owner = query.data.split(":")
    if await _refuse_stranger(query, owner, "Only the person who asked can answer this."):
        return
    await query.answer()
    if choice != "yes":
        await query.edit_message_text("Nothing changed; carry on.")
        return
    outcome = await asyncio.to_thread(context.services.chat.handle, incoming(update, "/reset"))
    await query.edit_message_text(_outcome_text(outcome))


def _requester(session: Session, job_id: int) -> str | None:
    """The Telegram id of a job's requester."""
    job = session.get(Job, job_id)
    user = session.get(User, job.user_id) if job is not None and job.user_id is not None else None
    return user.platform_user_id if user else None


async def image_button(update: Update, context: BotContext) -> None:
    """Regenerates or accepts a picture; only its requester may."""
    query = update.callback_query
    assert query is not None and query.data is not None
    _, choice, raw_id = query.data.split(":")
    job_id = int(raw_id)
    owner = await in_session(context.services, lambda session: _requester(session, job_id))
    if await _refuse_stranger(query, owner, "Only the person who asked for this picture can do that."):
        return
    if choice == "keep":
        await in_session(context.services, lambda session: _accept(session, job_id, query.from_user.id))
        await query.answer("Kept ✅")
        await query.edit_message_reply_markup(None)
        return
    await query.answer("Drawing another one…")
    await ask(update, context, incoming(update, f"/regenerate {job_id}"))  # same scene and settings, a new seed


def _accept(session: Session, job_id: int, user_id: int) -> None:
    job = session.get(Job, job_id)
    if job is not None:
        job.delivery = {**(job.delivery or {}), "accepted_by": str(user_id)}


async def memory_button(update: Update, context: BotContext) -> None:
    """Forgets the facts when the user whose memory it is presses the button."""
    query = update.callback_query
    assert query is not None and query.data is not None
    _, what, owner = query.data.split(":")
    if await _refuse_stranger(query, owner, "Only the person whose memory this is can do that."):
        return
    await query.answer()
    store = context.services.store
    text = await _with_conversation(update, context, lambda s, c: memory.forget(s, c, what, store))
    await query.edit_message_text(text)


async def chat_member(update: Update, context: BotContext) -> None:
    """Notes when a user blocks or unblocks the bot, so that nothing is sent to someone who blocked it."""
    change = update.my_chat_member
    if change is None or change.chat.type != "private":
        return
    blocked = change.new_chat_member.status in ("kicked", "left")
    user_id = str(change.from_user.id)

    def mark(session: Session) -> None:
        user = session.scalars(select(User).filter_by(platform=PLATFORM, platform_user_id=user_id)).first()
        if user is not None:
            user.blocked_bot = blocked

    await in_session(context.services, mark)
    log.info("telegram user %s %s the bot", user_id, "blocked" if blocked else "unblocked")
