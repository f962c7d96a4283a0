"""/newcharacter: a private dialog that collects a character for the admins to review.

The dialog's states are ``core.submissions.Step`` values, and the draft (texts, pictures, the step) lives in SQL,
so the ConversationHandler only routes: after a restart, a user with an open draft is picked up where they were
by the entry point that matches users in ``Services.drafting`` (filled from SQL at start-up).

    /newcharacter -> name -> description -> greeting -> images (10, as an album or one by one)
                  -> consent (buttons) -> submitted            (/cancel at any step ends it)

Each picture is validated and checked for near-duplicates by ``core.submissions``; a refusal names the picture
and the reason, and what was already added stays.
"""

from __future__ import annotations

import warnings
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final

from sqlalchemy import select
from sqlalchemy.orm import Session
from telegram import InlineKeyboardButton, InlineKeyboardMarkup, Message, Update
from telegram.ext import (
    BaseHandler,
    CallbackQueryHandler,
    CommandHandler,
    ConversationHandler,
    MessageHandler,
    filters,
)
from telegram.warnings import PTBUserWarning

from bots.telegram.context import BotContext, Services, in_session
from bots.telegram.incoming import (
    PLATFORM,
    AlbumCollector,
    TooLarge,
    download,
    is_group,
    picture_of,
)
from core.db.models import CharacterSubmission, User
from core.submissions import (
    CONSENT_TEXT,
    Actor,
    State,
    Step,
    SubmissionError,
    Submissions,
)

__all__ = ["conversation", "load_drafting"]

END: Final = ConversationHandler.END


@dataclass(frozen=True, slots=True)
class Draft:
    """What the dialog needs of a draft, read inside its transaction."""

    id: int
    name: str
    step: str
    images: int


def _draft(submission: CharacterSubmission) -> Draft:
    return Draft(submission.id, submission.name, submission.step, len(submission.images))


def _actor(update: Update) -> Actor:
    user = update.effective_user
    assert user is not None
    return Actor(PLATFORM, str(user.id), user.full_name)


def load_drafting(session: Session) -> set[int]:
    """Telegram users with a draft being collected: their next message continues the dialog."""
    query = (
        select(User.platform_user_id)
        .join(CharacterSubmission, CharacterSubmission.user_id == User.id)
        .where(User.platform == PLATFORM, CharacterSubmission.state == State.COLLECTING)
    )
    return {int(user_id) for user_id in session.scalars(query)}


# --- prompts -----------------------------------------------------------------------------------------------


def _consent_buttons() -> InlineKeyboardMarkup:
    return InlineKeyboardMarkup(
        [[InlineKeyboardButton("✅ I attest: a fictional character", callback_data="nc:attest:fictional")],
         [InlineKeyboardButton("✅ I attest: a real person who consented", callback_data="nc:attest:real")]]
    )


def prompt(draft: Draft, services: Services) -> tuple[str, InlineKeyboardMarkup | None]:
    """The question for the draft's next step."""
    need = services.settings.submission_min_images
    who = draft.name or "your character"
    if draft.step == Step.NAME:
        return "Let's create a character! What is their name? (/cancel stops at any step)", None
    if draft.step == Step.DESCRIPTION:
        return f"Describe {who}: who they are, how they speak and behave (a few sentences).", None
    if draft.step == Step.GREETING:
        return f"What does {who} say to greet someone new?", None
    if draft.step == Step.IMAGES:
        text = (
            f"Now send {need} different pictures of {who}, as an album or one by one "
            f"({draft.images} of {need} so far). Photos or image files; near-duplicates are refused."
        )
        return text, None
    if draft.step == Step.CONSENT:
        return f"Last step, please confirm:\n\n{CONSENT_TEXT}", _consent_buttons()
    markup = InlineKeyboardMarkup([[InlineKeyboardButton("📨 Submit", callback_data="nc:submit")]])
    return f"{who} is ready to submit for review.", markup


async def _ask_next(message: Message, services: Services, draft: Draft) -> str:
    text, markup = prompt(draft, services)
    await message.reply_text(text, reply_markup=markup)
    return draft.step


# --- steps ---------------------------------------------------------------------------------------------------


async def begin(update: Update, context: BotContext) -> str | int:
    """Starts (or picks up) the user's character draft."""
    message, services = update.effective_message, context.services
    assert message is not None
    if is_group(message.chat):
        await message.reply_text("Let's create a character in a private chat: message me directly.")
        return END
    actor, chat_id = _actor(update), str(message.chat_id)
    draft = await in_session(services, lambda s: _draft(services.submissions.start(s, actor, chat_id)))
    services.drafting.add(int(actor.user_id))
    return await _ask_next(message, services, draft)


async def resume(update: Update, context: BotContext) -> str | int:
    """Continues a draft after a restart: the update is the answer to the draft's step."""
    services, actor = context.services, _actor(update)
    draft = await in_session(services, lambda s: _maybe(services.submissions.draft(s, actor)))
    if draft is None:
        services.drafting.discard(int(actor.user_id))
        return END
    if update.callback_query is not None:
        return await consent(update, context) if draft.step == Step.CONSENT else await submit(update, context)
    message = update.effective_message
    assert message is not None
    if draft.step == Step.IMAGES and picture_of(message) is not None:
        return await pictures(update, context)
    if draft.step in _TEXT_STEPS and message.text and not message.text.startswith("/"):
        return await _TEXT_STEPS[draft.step](update, context)
    return await _ask_next(message, services, draft)


def _maybe(submission: CharacterSubmission | None) -> Draft | None:
    return _draft(submission) if submission is not None else None


Setter = Callable[[Submissions, Session, Actor, str], CharacterSubmission]


async def _text_step(update: Update, context: BotContext, setter: Setter) -> str:
    message, services, actor = update.effective_message, context.services, _actor(update)
    assert message is not None and message.text is not None
    text = message.text
    try:
        draft = await in_session(services, lambda s: _draft(setter(services.submissions, s, actor, text)))
    except SubmissionError as error:
        await message.reply_text(f"⚠️ {error}")
        current = await in_session(services, lambda s: _maybe(services.submissions.draft(s, actor)))
        return current.step if current is not None else END  # type: ignore[return-value]
    return await _ask_next(message, services, draft)


async def name(update: Update, context: BotContext) -> str:
    """Takes the character's name."""
    return await _text_step(update, context, Submissions.set_name)


async def description(update: Update, context: BotContext) -> str:
    """Takes the character's persona."""
    return await _text_step(update, context, Submissions.set_description)


async def greeting(update: Update, context: BotContext) -> str:
    """Takes the character's greeting."""
    return await _text_step(update, context, Submissions.set_greeting)


_TEXT_STEPS: Final[dict[str, Callable[[Update, BotContext], Awaitable[str]]]] = {
    Step.NAME: name,
    Step.DESCRIPTION: description,
    Step.GREETING: greeting,
}


def _albums(context: BotContext) -> AlbumCollector:
    collector = context.bot_data.get("newcharacter_albums")
    if collector is None:
        collector = AlbumCollector(context.services.settings.telegram_album_wait_s)
        context.bot_data["newcharacter_albums"] = collector
    return collector


async def pictures(update: Update, context: BotContext) -> str:
    """Adds a picture (or a whole album) to the draft, with a running count."""
    message = update.effective_message
    assert message is not None
    if message.media_group_id is not None:
        _albums(context).add(message.media_group_id, update, lambda parts: _add_pictures(parts, context))
        return Step.IMAGES  # the album's summary (and the consent question, once complete) follows
    return await _add_pictures([update], context)


async def _add_pictures(parts: list[Update], context: BotContext) -> str:
    """Add each picture in its own transaction (a refusal keeps the others) and report the count."""
    services, actor = context.services, _actor(parts[0])
    messages = [part.effective_message for part in parts if part.effective_message is not None]
    notes: list[str] = []
    count: int | None = None
    for index, message in enumerate(messages, 1):
        label = f"Picture {index}" if len(messages) > 1 else "That picture"
        picture = picture_of(message)
        if picture is None:
            notes.append(f"{label} is not an image.")
            continue
        file_id, size, _name, _mime = picture
        try:
            data = await download(context.bot, file_id, size, services.settings.max_upload_bytes)
            count = await in_session(services, lambda s, data=data: services.submissions.add_image(s, actor, data))
        except (SubmissionError, TooLarge) as error:
            notes.append(f"{label}: {error}")
    draft = await in_session(services, lambda s: _maybe(services.submissions.draft(s, actor)))
    if draft is None:
        return END  # type: ignore[return-value]
    need = services.settings.submission_min_images
    lines = [f"⚠️ {note}" for note in notes]
    if count is not None:
        lines.append(f"Got it: {draft.images} of {need} pictures.")
    if draft.images < need:
        lines.append(f"Send {need - draft.images} more.")
    await messages[0].reply_text("\n".join(lines))
    if draft.step != Step.IMAGES:
        return await _ask_next(messages[0], services, draft)
    return draft.step


async def off_topic(update: Update, context: BotContext) -> str | int:
    """Asks the step's question again when the answer is of the wrong kind (a sticker for a name, text for a picture)."""
    message, services, actor = update.effective_message, context.services, _actor(update)
    assert message is not None
    draft = await in_session(services, lambda s: _maybe(services.submissions.draft(s, actor)))
    if draft is None:
        return END
    text, markup = prompt(draft, services)
    await message.reply_text(f"⚠️ That is not what this step needs.\n\n{text}", reply_markup=markup)
    return draft.step


async def consent(update: Update, context: BotContext) -> str | int:
    """Records the consent attestation from the button and submits the draft."""
    query, services, actor = update.callback_query, context.services, _actor(update)
    assert query is not None and query.data is not None
    real_person = query.data.endswith(":real")
    await query.answer()
    try:
        await in_session(
            services, lambda s: _draft(services.submissions.attest_consent(s, actor, real_person=real_person))
        )
    except SubmissionError as error:
        await query.edit_message_text(f"⚠️ {error}")
        return END
    return await submit(update, context)


async def submit(update: Update, context: BotContext) -> str | int:
    """Sends the finished draft to the admins' review queue."""
    query, services, actor = update.callback_query, context.services, _actor(update)
    assert query is not None
    if query.data == "nc:submit":
        await query.answer()
    try:
        draft = await in_session(services, lambda s: _draft(services.submissions.submit(s, actor)))
    except SubmissionError as error:
        current = await in_session(services, lambda s: _maybe(services.submissions.draft(s, actor)))
        await query.edit_message_text(f"⚠️ {error}")
        if current is None:
            return END
        assert query.message is not None and isinstance(query.message, Message)
        return await _ask_next(query.message, services, current)
    services.drafting.discard(int(actor.user_id))
    await query.edit_message_text(
        f"📨 Submitted: {draft.name} (#{draft.id}). An admin reviews it; I will tell you here what they decide."
    )
    return END


async def cancel(update: Update, context: BotContext) -> int:
    """Abandons the draft and deletes its pictures."""
    message, services, actor = update.effective_message, context.services, _actor(update)
    assert message is not None
    try:
        await in_session(services, lambda s: _draft(services.submissions.cancel(s, actor)))
    except SubmissionError:
        await message.reply_text("There is no character in progress to cancel.")
        return END
    services.drafting.discard(int(actor.user_id))
    await message.reply_text("Cancelled: the character and the pictures you sent are deleted.")
    return END


class _Drafting(filters.MessageFilter):
    """Private messages of users whose draft is open in SQL (the dialog survives restarts)."""

    def __init__(self, drafting: set[int]) -> None:
        super().__init__(name="drafting")
        self.drafting = drafting

    def filter(self, message: Message) -> bool:
        return message.from_user is not None and message.from_user.id in self.drafting


def conversation(services: Services) -> ConversationHandler[BotContext]:
    """The /newcharacter ConversationHandler; register it before the chat handlers."""
    private = filters.ChatType.PRIVATE
    text = filters.TEXT & ~filters.COMMAND
    picture = filters.PHOTO | filters.Document.ALL
    drafting = private & _Drafting(services.drafting) & ~filters.UpdateType.EDITED
    # Pictures stay welcome after the last step's question: an eleventh is refused with the reason.
    buttons: list[BaseHandler[Update, BotContext, object]] = [
        MessageHandler(private & picture, pictures),
        CallbackQueryHandler(consent, pattern=r"^nc:attest:"),
        CallbackQueryHandler(submit, pattern=r"^nc:submit$"),
    ]
    states: dict[object, list[BaseHandler[Update, BotContext, object]]] = {
        Step.NAME: [MessageHandler(private & text, name)],
        Step.DESCRIPTION: [MessageHandler(private & text, description)],
        Step.GREETING: [MessageHandler(private & text, greeting)],
        Step.IMAGES: buttons,
        Step.CONSENT: buttons,
        Step.CONFIRM: buttons,
    }
    with warnings.catch_warnings():
        # The consent and submit buttons belong to the user's dialog, not to one message: per_message stays off.
        warnings.filterwarnings("ignore", message="If 'per_message=False'", category=PTBUserWarning)
        return ConversationHandler(
            entry_points=[
                CommandHandler("newcharacter", begin),
                MessageHandler(drafting & ~filters.COMMAND, resume),
                CallbackQueryHandler(resume, pattern=r"^nc:"),
            ],
            states=states,
            fallbacks=[
                CommandHandler("cancel", cancel),
                CommandHandler("newcharacter", begin),
                MessageHandler(private & ~filters.COMMAND & ~filters.UpdateType.EDITED, off_topic),
            ],
            name="newcharacter",
        )
