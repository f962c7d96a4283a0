"""Start-up of the Discord bot: the resources it needs, owned by one ``async with`` block, and ``main``.

``main(settings)`` is what ``unichar run`` and ``unichar bot discord`` call when ``UNICHAR_DISCORD_TOKEN`` is
set. Slash commands are not uploaded here: that is ``unichar discord sync`` (bots/discord/cli.py), run once
after a change, never on every start.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Final

from bots.discord.bot import Services, UniBot
from core import streams
from core.chat import ChatService, Dispatch
from core.db.installation import installation_token
from core.db.session import make_engine, make_sessionmaker
from core.jobs import JobKind
from core.media import FileStore
from core.submissions import Submissions

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from core.config import Settings

__all__ = ["FOLLOW_IDLE_S", "main", "serve"]

log = logging.getLogger(__name__)

FOLLOW_IDLE_S: Final = 5.0  # a quiet stream makes the delivery read the job row (queue position, stored reply)


def services(settings: Settings, sessions, installation: str, redis: Redis, dispatch: Dispatch) -> Services:  # type: ignore[no-untyped-def]
    """The bot's collaborators, built from the settings; ``installation`` is the database's token."""
    store = FileStore(settings.files_dir)
    return Services(
        settings=settings,
        sessions=sessions,
        chat=ChatService(sessions, settings, dispatch, store),
        submissions=Submissions(settings, store, dispatch=lambda job_id: dispatch(job_id, JobKind.TRAIN)),
        files=store,
        follow=streams.follower(redis, installation, FOLLOW_IDLE_S),
    )


async def serve(settings: Settings) -> None:
    """Run the bot until it is closed; every resource is released on the way out."""
    from redis.asyncio import Redis

    from workers.tasks import dispatcher

    assert settings.discord_token is not None
    engine = make_engine(settings.sql_url)
    sessions = make_sessionmaker(engine)
    redis = Redis.from_url(settings.redis_url)
    try:
        installation = installation_token(sessions)
        async with UniBot(services(settings, sessions, installation, redis, dispatcher(installation))) as bot:
            await bot.start(settings.discord_token.get_secret_value())
    finally:
        await redis.aclose()
        engine.dispose()


def main(settings: Settings) -> int:
    """Run the Discord bot in the foreground; returns the exit code."""
    token = settings.discord_token.get_secret_value() if settings.discord_token is not None else ""
    if not token:
        log.error("UNICHAR_DISCORD_TOKEN is not set; the Discord bot cannot start")
        return 2
    try:
        asyncio.run(serve(settings))
    except KeyboardInterrupt:
        pass
    return 0
