"""The Telegram bot: one Application built in one place, every handler registered in ``build_application``.

Start-up (``post_init``) registers the command list, reloads who is in the middle of /newcharacter, resumes every
delivery a previous run left unfinished, and starts the notification poller (submission decisions, admin alerts).
Calls to Telegram go through python-telegram-bot's ``AIORateLimiter`` (flood limits per chat and overall; a 429's
retry_after is honoured); a local Bot API server is used when ``UNICHAR_TELEGRAM_API_URL`` is set.

Entry point: :func:`main` (``unichar run`` / ``unichar bot telegram`` call it when the token is set).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from typing import TYPE_CHECKING, Any, Final

from sqlalchemy import select
from telegram import Bot, BotCommand, Message, Update
from telegram.error import Forbidden, RetryAfter, TelegramError
from telegram.ext import (
    AIORateLimiter,
    Application,
    CallbackQueryHandler,
    ChatMemberHandler,
    CommandHandler,
    ContextTypes,
    MessageHandler,
    filters,
)

from bots.delivery import Deliveries, Target
from bots.telegram import admin, handlers, newcharacter
from bots.telegram.context import BotContext, Services, in_session
from bots.telegram.incoming import PLATFORM, picture_of
from bots.telegram.renderer import TelegramRenderer, retry_seconds
from core import streams
from core.chat import COMMANDS, ChatService, Dispatch
from core.config import Settings, get_settings
from core.db.installation import installation_token
from core.db.models import User
from core.jobs import JobKind
from core.media import FileStore
from core.submissions import Submissions, mark_delivered, pending_notifications

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from sqlalchemy.orm import Session, sessionmaker

__all__ = ["build_application", "main"]

log = logging.getLogger(__name__)

MESSAGES: Final = filters.UpdateType.MESSAGE  # new messages only: edits are handled (ignored) on their own


def _renderer_for(
    application: Application[Any, Any, Any, Any, Any, Any], settings: Settings, target: Target
) -> TelegramRenderer:
    group = target.chat_id.startswith("-")  # Telegram's group and channel ids are negative
    interval = settings.telegram_group_edit_interval_s if group else settings.telegram_edit_interval_s
    return TelegramRenderer(application.bot, target, edit_interval=interval)


def build_application(
    settings: Settings,
    *,
    sessions: sessionmaker[Session],
    installation: str,
    dispatch: Dispatch,
    redis: Redis,
    store: FileStore | None = None,
) -> Application[Any, BotContext, Any, Any, Any, Any]:
    """The configured Application with every handler; ``run_polling`` (or a test) drives it.

    ``installation`` is the database's token (``core.db.installation``), which names its job streams.
    """
    if settings.telegram_token is None or not settings.telegram_token.get_secret_value():
        raise ValueError("UNICHAR_TELEGRAM_TOKEN is not set")
    builder = (
        Application.builder()
        .token(settings.telegram_token.get_secret_value())
        .rate_limiter(AIORateLimiter(max_retries=3))
        .context_types(ContextTypes(context=BotContext))
        .post_init(_post_init)
        .post_stop(_post_stop)
    )
    if settings.telegram_api_url:
        api = settings.telegram_api_url.rstrip("/")
        builder = builder.base_url(f"{api}/bot").base_file_url(f"{api}/file/bot")
    application = builder.build()

    store = store or FileStore(settings.files_dir)
    deliveries = Deliveries(
        sessions,
        streams.follower(redis, installation, settings.telegram_poll_s),
        store,
        functools.partial(_renderer_for, application, settings),
        PLATFORM,
        horizon_s=settings.event_ttl_s,
    )
    services = Services(
        settings=settings,
        sessions=sessions,
        store=store,
        chat=ChatService(sessions, settings, dispatch, store),
        submissions=Submissions(settings, store, dispatch=lambda job_id: dispatch(job_id, JobKind.TRAIN)),
        deliveries=deliveries,
    )
    application.bot_data["services"] = services

    application.add_handler(newcharacter.conversation(services))  # first: its steps take the user's answers
    for name, callback in (
        ("start", handlers.start),
        ("characters", handlers.characters),
        ("use", handlers.use),
        ("imagine", handlers.imagine),
        ("regenerate", handlers.regenerate),
        ("status", handlers.status),
        ("help", handlers.help_command),
        ("reset", handlers.reset),
        ("memory", handlers.memory_command),
        ("remember", handlers.remember),
        ("forget", handlers.forget),
        ("persona", handlers.persona),
        ("cancel", newcharacter.cancel),
        ("queue", admin.queue),
        ("review", admin.review),
        ("approve", admin.approve),
        ("reject", admin.reject),
    ):
        application.add_handler(CommandHandler(name, callback, filters=MESSAGES))
    application.add_handler(CallbackQueryHandler(handlers.pick_character, pattern=r"^use:\d+$"))
    application.add_handler(CallbackQueryHandler(handlers.confirm_reset, pattern=r"^reset:(yes|no):\d+$"))
    application.add_handler(CallbackQueryHandler(handlers.image_button, pattern=r"^img:(again|keep):\d+$"))
    application.add_handler(CallbackQueryHandler(handlers.memory_button, pattern=r"^mem:all:\d+$"))
    application.add_handler(CallbackQueryHandler(_stale_button))
    application.add_handler(MessageHandler(filters.UpdateType.EDITED, handlers.edited_message))
    # Chat and pictures run as tasks (block=False): one user's download or SQL wait never holds up the others.
    application.add_handler(
        MessageHandler(MESSAGES & filters.TEXT & ~filters.COMMAND, handlers.chat_message, block=False)
    )
    application.add_handler(
        MessageHandler(MESSAGES & (filters.PHOTO | _IMAGE_FILE), handlers.picture_message, block=False)
    )
    application.add_handler(MessageHandler(MESSAGES & filters.ChatType.PRIVATE & filters.COMMAND, handlers.unknown_command))
    application.add_handler(MessageHandler(MESSAGES & ~filters.StatusUpdate.ALL, handlers.unsupported_message))
    application.add_handler(ChatMemberHandler(handlers.chat_member, ChatMemberHandler.MY_CHAT_MEMBER))
    application.add_error_handler(_on_error)
    return application


class _ImageFile(filters.MessageFilter):
    """A file that claims to be a picture (by type or name); its content is checked after download."""

    def filter(self, message: Message) -> bool:
        return message.document is not None and picture_of(message) is not None


_IMAGE_FILE: Final = _ImageFile(name="image_file")


async def _stale_button(update: Update, context: BotContext) -> None:
    """Answers a press on a button this bot no longer knows (so the client stops its spinner)."""
    if update.callback_query is not None:
        await update.callback_query.answer("This button has expired.")


# --- start-up and shutdown ---------------------------------------------------------------------------------


async def _post_init(application: Application[Any, BotContext, Any, Any, Any, Any]) -> None:
    services: Services = application.bot_data["services"]
    commands = {**COMMANDS, **handlers.EXTRA_COMMANDS}
    await application.bot.set_my_commands([BotCommand(name, text[:256]) for name, text in commands.items()])
    services.drafting |= await in_session(services, newcharacter.load_drafting)
    await services.deliveries.resume()
    application.bot_data["notifier"] = asyncio.create_task(_notify_forever(application), name="telegram-notifier")


async def _post_stop(application: Application[Any, BotContext, Any, Any, Any, Any]) -> None:
    notifier = application.bot_data.pop("notifier", None)
    if notifier is not None:
        notifier.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await notifier
    await application.bot_data["services"].deliveries.stop()


async def _notify_forever(application: Application[Any, BotContext, Any, Any, Any, Any]) -> None:
    """Deliver pending notifications (submission decisions, admin alerts) every few seconds."""
    services: Services = application.bot_data["services"]
    while True:
        try:
            await deliver_notifications(application.bot, services)
        except Exception:
            log.exception("delivering notifications failed; trying again later")
        await asyncio.sleep(services.settings.telegram_poll_s)


async def deliver_notifications(bot: Bot, services: Services) -> int:
    """Post each pending notification once; a user who blocked the bot is marked and skipped. Returns posts."""

    def pending(session: Session) -> list[tuple[int, str, str]]:
        return [(n.id, n.platform_chat_id, n.text) for n in pending_notifications(session, PLATFORM)]

    posted = 0
    for note_id, chat_id, text in await in_session(services, pending):
        try:
            await bot.send_message(chat_id, text)
            posted += 1
        except RetryAfter as error:
            await asyncio.sleep(retry_seconds(error))
            return posted  # the rest next round
        except Forbidden:
            await in_session(services, functools.partial(_mark_blocked, chat_id))
        except TelegramError as error:
            log.warning("notification %s to chat %s failed: %s", note_id, chat_id, error)
            continue
        await in_session(services, lambda session, note_id=note_id: mark_delivered(session, note_id))
    return posted


def _mark_blocked(user_id: str, session: Session) -> None:
    user = session.scalars(select(User).filter_by(platform=PLATFORM, platform_user_id=user_id)).first()
    if user is not None:
        user.blocked_bot = True


async def _on_error(update: object, context: BotContext) -> None:
    """Logs the failure first; then marks a user who blocked the bot, or tells the user something went wrong."""
    log.error("handling an update failed", exc_info=context.error)
    if not isinstance(update, Update) or update.effective_user is None:
        return
    if isinstance(context.error, Forbidden):
        await in_session(context.services, functools.partial(_mark_blocked, str(update.effective_user.id)))
        return
    if update.callback_query is not None:
        with contextlib.suppress(TelegramError):
            await update.callback_query.answer("Sorry, something went wrong. Please try again.")
    elif update.effective_message is not None:
        with contextlib.suppress(TelegramError):
            await update.effective_message.reply_text("⚠️ Sorry, something went wrong. Please try again.")


def main(settings: Settings | None = None) -> int:
    """Run the Telegram bot until interrupted; returns the process exit status."""
    import redis.asyncio

    from core.db.session import make_engine, make_sessionmaker
    from workers.celery_app import app as celery
    from workers.celery_app import configure
    from workers.tasks import dispatcher

    settings = settings or get_settings()
    if settings.telegram_token is None or not settings.telegram_token.get_secret_value():
        log.error("UNICHAR_TELEGRAM_TOKEN is not set; the Telegram bot cannot start")
        return 2
    configure(celery, settings)  # jobs go to this settings' broker, not only the environment's
    logging.getLogger("httpx").setLevel(logging.WARNING)  # its request lines carry the bot token
    sessions = make_sessionmaker(make_engine(settings.sql_url))
    installation = installation_token(sessions)
    application = build_application(
        settings,
        sessions=sessions,
        installation=installation,
        dispatch=dispatcher(installation),
        redis=redis.asyncio.Redis.from_url(settings.redis_url),
    )
    application.run_polling(allowed_updates=Update.ALL_TYPES)
    return 0
