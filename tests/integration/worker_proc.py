"""A real Celery worker in its own process, for tests that kill one (never imported by the test run itself).

Usage: python -m tests.integration.worker_proc DB_URL BROKER_URL STREAM_URL DATA_DIR block|echo
``block`` runs a model that never finishes (the test kills the worker); ``echo`` answers normally. The visibility
timeout is a few seconds, so a message whose worker died is handed out again quickly.
"""

from __future__ import annotations

import logging
import sys
import threading
from pathlib import Path

from redis import Redis

from core.db.installation import installation_token
from core.db.session import make_engine, make_sessionmaker
from core.media import FileStore
from tests.conftest import make_settings
from tests.doubles import EchoModel
from workers.celery_app import app, configure, worker_argv
from workers.context import WorkerContext, install_context
from workers.shared_model import SharedModel
from workers.tasks import dispatcher

VISIBILITY = {"visibility_timeout": 3, "unacked_restore_interval": 1, "unacked_restore_throttle": 1}


def main(db_url: str, broker_url: str, stream_url: str, data_dir: str, mode: str) -> None:
    """Run the worker until killed."""
    logging.basicConfig(level=logging.INFO, format=f"[{mode} %(process)d] %(name)s: %(message)s")
    settings = make_settings(Path(data_dir), database_url=db_url, redis_url=broker_url, worker_threads=1)
    model = EchoModel(block=threading.Event()) if mode == "block" else EchoModel()
    sessions = make_sessionmaker(make_engine(db_url))
    installation = installation_token(sessions)
    configure(app, settings, broker_transport_options=VISIBILITY)
    install_context(
        WorkerContext(
            settings=settings,
            sessionmaker=sessions,
            redis=Redis.from_url(stream_url),
            store=FileStore(settings.files_dir),
            model=SharedModel(lambda: model),
            installation=installation,
            dispatch=dispatcher(installation),  # binds the app to the database, under its broker prefix
        )
    )
    app.worker_main([*worker_argv(settings, ["chat"], hostname=f"{mode}@%h"), "--loglevel", "INFO"])


if __name__ == "__main__":
    main(*sys.argv[1:])
