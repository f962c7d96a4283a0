"""A worker context on the test's SQLite file (or, where a module overrides ``worker_sessionmaker``, each database)
and Redis stream database, without a broker."""

from __future__ import annotations

import pytest

from core.chat import ChatService
from core.db.installation import installation_token
from core.media import FileStore
from tests.doubles import EchoModel
from tests.factories import add_character
from workers.context import WorkerContext
from workers.shared_model import SharedModel


@pytest.fixture
def model() -> EchoModel:
    return EchoModel()


@pytest.fixture
def worker_sessionmaker(sessionmaker):
    """The SQL store the worker context uses."""
    return sessionmaker


@pytest.fixture
def ctx(settings, worker_sessionmaker, redis_client, model, sent) -> WorkerContext:
    """What a worker process would hold, on this test's stores; follow-up jobs are recorded in ``sent``."""
    add_character(worker_sessionmaker, "Furina")
    store, shared = FileStore(settings.files_dir), SharedModel(lambda: model)
    installation = installation_token(worker_sessionmaker)
    return WorkerContext(
        settings, worker_sessionmaker, redis_client, store, shared, installation, lambda *job: sent.append(job)
    )


@pytest.fixture
def sent() -> list:
    """What was dispatched, as (job id, kind)."""
    return []


@pytest.fixture
def service(ctx, sent) -> ChatService:
    """The chat service on the same stores, recording dispatches instead of sending them."""
    return ChatService(ctx.sessionmaker, ctx.settings, lambda job_id, kind: sent.append((job_id, kind)), ctx.store)
