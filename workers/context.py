"""What a worker process needs to run jobs: settings, SQL sessions, Redis, the file store and the model.

Built once per process from the environment on first use; tests and ``unichar run`` install their own.
ORM objects never cross threads: each task opens its own sessions from the shared sessionmaker.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

from redis import Redis

from core.chat import Dispatch
from core.config import Settings, get_settings
from core.db.installation import installation_token
from core.db.session import make_engine, make_sessionmaker
from core.media import FileStore
from workers.shared_model import SharedModel, load_runtime

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

__all__ = ["WorkerContext", "context_from_settings", "get_context", "install_context"]


@dataclass(slots=True)
class WorkerContext:
    """The worker's shared resources."""

    settings: Settings
    sessionmaker: sessionmaker[Session]
    redis: Redis
    store: FileStore
    model: SharedModel
    installation: str  # the database's token (core.db.installation), read when the context is built
    dispatch: Dispatch  # how follow-up jobs (a rolling summary, a scene picture) are sent


def context_from_settings(
    settings: Settings, model: SharedModel | None = None, dispatch: Dispatch | None = None
) -> WorkerContext:
    """Resources for ``settings``; the model defaults to the runtime the settings name, loaded on first use, and
    follow-up jobs go to the broker under the database's prefix (``workers.tasks.dispatcher``)."""
    from workers.tasks import dispatcher  # the tasks module reads the context itself

    sessions = make_sessionmaker(make_engine(settings.sql_url))
    installation = installation_token(sessions)
    return WorkerContext(
        settings=settings,
        sessionmaker=sessions,
        redis=Redis.from_url(settings.redis_url),
        store=FileStore(settings.files_dir),
        model=model or SharedModel(lambda: load_runtime(settings)),
        installation=installation,
        dispatch=dispatch or dispatcher(installation),
    )


_context: WorkerContext | None = None
_lock = threading.Lock()


def get_context() -> WorkerContext:
    """This process's context, built from the environment the first time."""
    global _context
    with _lock:
        if _context is None:
            _context = context_from_settings(get_settings())
        return _context


def install_context(context: WorkerContext | None) -> None:
    """Use ``context`` for the jobs this process runs (None: rebuild from the environment on next use)."""
    global _context
    with _lock:
        _context = context
