"""Admin commands (UNICHAR_ADMIN_IDS): the character submission queue, review, approval and rejection.

Authorisation is ``core.submissions``'s (``Settings.is_admin``); a non-admin gets its refusal, and every action is
audited there.
"""

from __future__ import annotations

from sqlalchemy.orm import Session
from telegram import Update

from bots.telegram.context import BotContext, in_session
from bots.telegram.incoming import PLATFORM
from core.submissions import Actor, Inspection, QueueItem, SubmissionError
from core.wording import counted

__all__ = ["approve", "queue", "reject", "review"]


def _actor(update: Update) -> Actor:
    user = update.effective_user
    assert user is not None
    return Actor(PLATFORM, str(user.id), user.full_name)


def _arguments(update: Update) -> list[str]:
    message = update.effective_message
    return ((message.text or "") if message else "").split(maxsplit=2)[1:]


async def _reply(update: Update, text: str) -> None:
    message = update.effective_message
    assert message is not None
    await message.reply_text(text)


def _line(item: QueueItem) -> str:
    progress = f", training {item.percent:.0f}%" if item.total_steps and item.step else ""
    reason = f" ({item.reason})" if item.reason else ""
    pictures = counted(item.images, "picture")
    return f"#{item.id} {item.name} [{item.state}{progress}] by {item.submitter}, {pictures}{reason}"


def _submission_id(update: Update) -> int | None:
    arguments = _arguments(update)
    return int(arguments[0].lstrip("#")) if arguments and arguments[0].lstrip("#").isdigit() else None


async def queue(update: Update, context: BotContext) -> None:
    """Lists the submissions waiting for a decision or a worker."""
    services, actor = context.services, _actor(update)
    try:
        items = await in_session(services, lambda s: services.submissions.queue(s, actor))
    except SubmissionError as error:
        await _reply(update, f"⚠️ {error}")
        return
    lines = [_line(item) for item in items] or ["The queue is empty."]
    await _reply(update, "Submissions:\n" + "\n".join(lines) + "\n\n/review ID, /approve ID, /reject ID REASON")


async def review(update: Update, context: BotContext) -> None:
    """Shows a submission's pictures (one contact sheet) and persona: /review ID."""
    services, actor, submission_id = context.services, _actor(update), _submission_id(update)
    message = update.effective_message
    assert message is not None
    if submission_id is None:
        await _reply(update, "Usage: /review ID (the number from /queue).")
        return
    try:
        seen: Inspection = await in_session(services, lambda s: services.submissions.inspect(s, actor, submission_id))
    except SubmissionError as error:
        await _reply(update, f"⚠️ {error}")
        return
    text = (
        f"{_line(seen.item)}\n\nDescription: {seen.description}\n\nGreeting: {seen.greeting}\n\n"
        f"Real person: {'yes' if seen.real_person else 'no'}; attested: {seen.consent_text or 'not yet'}"
    )
    if seen.contact_sheet_png:
        await message.reply_photo(seen.contact_sheet_png, caption=f"#{seen.item.id} {seen.item.name}")
    await _reply(update, text[:4000])


async def approve(update: Update, context: BotContext) -> None:
    """Approves a submission and queues its training: /approve ID."""
    services, actor, submission_id = context.services, _actor(update), _submission_id(update)
    if submission_id is None:
        await _reply(update, "Usage: /approve ID (the number from /queue).")
        return

    def work(session: Session) -> int:
        return services.submissions.approve(session, actor, submission_id)

    try:
        job_id = await in_session(services, work)
    except SubmissionError as error:
        await _reply(update, f"⚠️ {error}")
        return
    await _reply(update, f"Approved #{submission_id}: training job {job_id} is queued.")


async def reject(update: Update, context: BotContext) -> None:
    """Refuses a submission with a reason the submitter sees: /reject ID REASON."""
    services, actor, submission_id = context.services, _actor(update), _submission_id(update)
    arguments = _arguments(update)
    if submission_id is None or len(arguments) < 2:
        await _reply(update, "Usage: /reject ID REASON (the submitter sees the reason).")
        return
    reason = arguments[1]
    try:
        await in_session(services, lambda s: services.submissions.reject(s, actor, submission_id, reason))
    except SubmissionError as error:
        await _reply(update, f"⚠️ {error}")
        return
    await _reply(update, f"Rejected #{submission_id}; the submitter is told why.")
