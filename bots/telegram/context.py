"""What every handler reaches through its context: the services, built once in ``app.build_application``."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from telegram.ext import CallbackContext, ExtBot

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

    from bots.delivery import Deliveries
    from core.chat import ChatService
    from core.config import Settings
    from core.media import FileStore
    from core.submissions import Submissions

__all__ = ["BotContext", "Services", "in_session"]

T = TypeVar("T")


@dataclass(slots=True)
class Services:
    """The core services the bot adapts, plus the users with a /newcharacter draft open (read from SQL)."""

    settings: Settings
    sessions: sessionmaker[Session]
    store: FileStore
    chat: ChatService
    submissions: Submissions
    deliveries: Deliveries
    drafting: set[int] = field(default_factory=set)  # Telegram user ids with a draft in SQL


class BotContext(CallbackContext[ExtBot[None], dict[Any, Any], dict[Any, Any], dict[Any, Any]]):
    """The callback context with typed access to the services."""

    @property
    def services(self) -> Services:
        """The services this application was built with."""
        return self.bot_data["services"]  # type: ignore[no-any-return]


async def in_session(services: Services, work: Callable[[Session], T]) -> T:
    """Run ``work`` in one short transaction on a worker thread, so that the event loop never waits on SQL."""

    def run() -> T:
        with services.sessions.begin() as session:
            return work(session)

    return await asyncio.to_thread(run)
