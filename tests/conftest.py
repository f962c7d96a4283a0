"""Shared fixtures: settings on a tmp folder, SQL sessions (SQLite, PostgreSQL), Redis, one Celery worker, tiny model.

Services are private to one test run so that parallel runs never collide: PostgreSQL databases are created with a
unique name and dropped at the end; Redis is a ``redis-server`` this run starts on a free port (or, without the
binary, the server at ``UNICHAR_TEST_REDIS_URL``). Tests that need a service skip cleanly when it is absent.
The Celery worker is ONE for the whole run (``celery.contrib.testing.start_worker``, thread pool), started on first
use; tests reach it through the ``live`` fixture, which empties its stores and gives it a fresh model double.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from redis import Redis
from sqlalchemy import Engine, func, select, text
from sqlalchemy.orm import Session
from sqlalchemy.orm import sessionmaker as SessionMaker

from core.config import Settings
from core.db.models import Base, Installation
from core.db.session import make_engine, make_sessionmaker

PG_ADMIN = os.environ.get("UNICHAR_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS_FALLBACK = os.environ.get("UNICHAR_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
BROKER_DB, STREAM_DB, SCRATCH_DB = 0, 1, 2  # db numbers on the run's Redis


def make_settings(data_dir: Path, **overrides: Any) -> Settings:
    """Settings for a test: everything under ``data_dir``, no .env file, ``overrides`` on top."""
    values: dict[str, Any] = {"data_dir": data_dir, "console_image_dir": data_dir / "images", "database_url": ""}
    return Settings(_env_file=None, **(values | overrides))  # type: ignore[call-arg]


def reset_tables(engine: Engine) -> None:
    """Empty every table but the database's name (ids restart on PostgreSQL), as workers keep the name they read."""
    tables = [t for t in Base.metadata.sorted_tables if t is not Installation.__table__]
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            names = ", ".join(f'"{t.name}"' for t in tables)
            conn.execute(text(f"TRUNCATE {names} RESTART IDENTITY CASCADE"))
        else:
            for table in reversed(tables):
                conn.execute(table.delete())


def count_rows(session_factory: SessionMaker[Session], *models: type) -> dict[str, int]:
    """Row counts of ``models`` by table name: how tests prove nothing was half-stored."""
    with session_factory() as session:
        return {m.__tablename__: session.scalar(select(func.count()).select_from(m)) or 0 for m in models}


# --- settings and SQLite -------------------------------------------------------------------------------------


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Settings on a tmp data dir with an SQLite file there."""
    return make_settings(tmp_path)


@pytest.fixture
def sessionmaker(settings: Settings) -> Iterator[SessionMaker[Session]]:
    """Sessions on the test's SQLite file, schema created from the models."""
    engine = make_engine(settings.sql_url)
    Base.metadata.create_all(engine)
    yield make_sessionmaker(engine)
    engine.dispose()


# --- PostgreSQL ------------------------------------------------------------------------------------------------


class PgDatabases:
    """Creates uniquely named PostgreSQL databases and drops them all at the end of the run."""

    def __init__(self, admin_url: str) -> None:
        self.admin_url, self.created = admin_url, []  # type: ignore[var-annotated]
        self.engine = make_engine(admin_url).execution_options(isolation_level="AUTOCOMMIT")

    def create(self) -> str:
        """A fresh empty database; returns its URL."""
        name = f"unichar_t{os.getpid()}_{secrets.token_hex(4)}"
        with self.engine.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        self.created.append(name)
        return self.admin_url.rsplit("/", 1)[0] + "/" + name

    def drop_all(self) -> None:
        with self.engine.connect() as conn:
            for name in self.created:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        self.engine.dispose()


@pytest.fixture(scope="session")
def pg_databases() -> Iterator[PgDatabases]:
    """The run's PostgreSQL database factory; skips when PostgreSQL is not reachable."""
    databases = PgDatabases(PG_ADMIN)
    try:
        with databases.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as error:  # noqa: BLE001 - any failure means: no PostgreSQL here
        databases.engine.dispose()
        pytest.skip(f"PostgreSQL not reachable at {PG_ADMIN}: {type(error).__name__}")
    yield databases
    databases.drop_all()


@pytest.fixture(scope="session")
def pg_url(pg_databases: PgDatabases) -> str:
    """URL of a fresh PostgreSQL database for this run (empty: no tables)."""
    return pg_databases.create()


@pytest.fixture(scope="session")
def _pg_engine(pg_databases: PgDatabases) -> Iterator[Engine]:
    engine = make_engine(pg_databases.create())
    Base.metadata.create_all(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def pg_sessionmaker(_pg_engine: Engine) -> SessionMaker[Session]:
    """Sessions on the run's PostgreSQL database with the models' schema, emptied before each test."""
    reset_tables(_pg_engine)
    return make_sessionmaker(_pg_engine)


@pytest.fixture(params=["sqlite", "postgresql"])
def any_sessionmaker(request: pytest.FixtureRequest) -> SessionMaker[Session]:
    """The test runs once on SQLite and once on PostgreSQL."""
    name = "sessionmaker" if request.param == "sqlite" else "pg_sessionmaker"
    return request.getfixturevalue(name)


# --- Redis -----------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _answers(url: str) -> bool:
    try:
        return bool(Redis.from_url(url, socket_connect_timeout=1).ping())
    except Exception:  # noqa: BLE001
        return False


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Base URL (db 0) of a Redis private to this run; skips when there is none."""
    binary = shutil.which("redis-server")
    if binary is None:
        if not _answers(REDIS_FALLBACK):
            pytest.skip("no redis-server binary and no Redis at " + REDIS_FALLBACK)
        yield REDIS_FALLBACK.rsplit("/", 1)[0] + "/0"
        return
    port, folder = _free_port(), tmp_path_factory.mktemp("redis")
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", folder]
    process = subprocess.Popen([str(a) for a in args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    for _ in range(100):
        if _answers(url):
            break
        time.sleep(0.05)
    else:
        process.kill()
        pytest.skip("redis-server did not start")
    yield url
    process.terminate()
    process.wait(timeout=10)


def redis_db(url: str, db: int) -> str:
    """``url`` pointing at database number ``db``."""
    return url.rsplit("/", 1)[0] + f"/{db}"


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[Redis]:
    """A client on the run's stream database, flushed before and after the test."""
    client = Redis.from_url(redis_db(redis_url, STREAM_DB))
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


# --- the Celery worker -----------------------------------------------------------------------------------------


@dataclass
class Live:
    """The whole job path of one test: the chat service, the running worker's context and its model double."""

    ctx: Any  # workers.context.WorkerContext
    service: Any  # core.chat.ChatService
    model: Any  # tests.doubles.EchoModel
    dispatch: Callable[..., None]

    @property
    def settings(self) -> Settings:
        return self.ctx.settings

    @property
    def sessionmaker(self) -> SessionMaker[Session]:
        return self.ctx.sessionmaker

    def use_model(self, model: Any) -> None:
        """Make the worker run ``model`` from now on."""
        from workers.shared_model import SharedModel

        self.model = model
        self.ctx.model = SharedModel(lambda: model)


@pytest.fixture(scope="session")
def worker_context(tmp_path_factory: pytest.TempPathFactory, redis_url: str, request: pytest.FixtureRequest) -> Any:
    """The session worker's resources: PostgreSQL when reachable (else SQLite), the run's Redis, a tmp file store."""
    from core.db.installation import installation_token
    from core.media import FileStore
    from tests.doubles import EchoModel
    from workers.context import WorkerContext
    from workers.shared_model import SharedModel
    from workers.tasks import dispatcher

    try:
        db_url = request.getfixturevalue("pg_databases").create()
    except pytest.skip.Exception:
        db_url = ""
    data_dir = tmp_path_factory.mktemp("worker")
    settings = make_settings(data_dir, database_url=db_url, redis_url=redis_db(redis_url, BROKER_DB))
    engine = make_engine(settings.sql_url)
    Base.metadata.create_all(engine)
    model = EchoModel()
    sessions = make_sessionmaker(engine)
    return WorkerContext(
        settings=settings,
        sessionmaker=sessions,
        redis=Redis.from_url(redis_db(redis_url, STREAM_DB)),
        store=FileStore(settings.files_dir),
        model=SharedModel(lambda: model),
        installation=(installation := installation_token(sessions)),
        dispatch=dispatcher(installation),  # binds the run's Celery app to this database
    )


@pytest.fixture(scope="session")
def celery_worker(worker_context: Any) -> Iterator[Any]:
    """ONE real Celery worker (thread pool) for the whole run, consuming chat and image; pinged before use."""
    import celery.contrib.testing.tasks  # noqa: F401 - registers the ping task start_worker uses
    from celery.contrib.testing.worker import start_worker

    from workers.celery_app import app, configure
    from workers.context import install_context

    configure(app, worker_context.settings, result_backend="cache+memory://", task_ignore_result=False)
    install_context(worker_context)
    options = {"pool": "threads", "concurrency": 4, "loglevel": "WARNING", "queues": ["chat", "image"]}
    with start_worker(app, perform_ping_check=True, shutdown_timeout=30, **options) as worker:
        yield worker
    install_context(None)


@pytest.fixture
def live(celery_worker: Any, worker_context: Any, redis_client: Redis) -> Live:
    """The job path with a running worker: empty SQL tables and streams, a fresh EchoModel."""
    from core.chat import ChatService
    from tests.doubles import EchoModel

    reset_tables(worker_context.sessionmaker.kw["bind"])
    for path in list(worker_context.store.root.glob("*")):
        shutil.rmtree(path, ignore_errors=True)
    dispatch = worker_context.dispatch
    service = ChatService(worker_context.sessionmaker, worker_context.settings, dispatch, worker_context.store)
    harness = Live(worker_context, service, EchoModel(), dispatch)
    harness.use_model(harness.model)
    return harness


# --- the tiny model --------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random model in the official layout, written once per run."""
    try:
        from core.model.tiny import write_tiny_model
    except ImportError as error:
        pytest.skip(f"core.model.tiny is not available yet: {error}")
    return write_tiny_model(tmp_path_factory.mktemp("tiny-model"))
