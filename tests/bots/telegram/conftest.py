"""Fixtures of the Telegram end-to-end tests: the real Application against the loopback fake Bot API.

Jobs go through the real worker path: the run's Celery worker (``live`` fixture of tests/conftest.py) with the
``EchoModel`` double, or the tiny random model where a test asks for it. The bot shares the worker's SQL store,
file store and Redis, exactly as the processes of a deployment do.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from redis.asyncio import Redis as AsyncRedis
from sqlalchemy import select
from telegram import Update
from telegram.ext import Application

from bots.telegram.app import build_application
from core.config import Settings
from core.db.models import Character, Job
from tests.bots.telegram.fake_bot_api import TOKEN, FakeBotApi
from tests.conftest import Live, make_settings

ADMIN = 7001
ANN = 7002
BOB = 7003
GROUP = -100500

ROLESCAPE = Path(__file__).resolve().parents[4] / "shared" / "rolescape" / "train" / "Mahjong Soul-Ichihime"


def bot_settings(live: Live, fake: FakeBotApi, **overrides: Any) -> Settings:
    """The bot's settings: the worker's stores, the fake's URL, fast pacing so tests stay short."""
    worker = live.settings
    values: dict[str, Any] = {
        "database_url": worker.sql_url,
        "redis_url": worker.redis_url,
        "telegram_token": TOKEN,
        "telegram_api_url": fake.url,
        "admin_ids": [f"telegram:{ADMIN}"],
        "telegram_edit_interval_s": 0.05,
        "telegram_group_edit_interval_s": 0.05,
        "telegram_album_wait_s": 0.4,
        "telegram_poll_s": 0.3,
    }
    return make_settings(worker.data_dir, **(values | overrides))


def _stream_url(live: Live) -> str:
    kwargs = live.ctx.redis.connection_pool.connection_kwargs
    return f"redis://{kwargs.get('host', '127.0.0.1')}:{kwargs.get('port', 6379)}/{kwargs.get('db', 0)}"


@contextlib.asynccontextmanager
async def running_bot(live: Live, fake: FakeBotApi, **overrides: Any) -> AsyncIterator[Application[Any, Any, Any, Any, Any, Any]]:
    """The bot as ``run_polling`` runs it (initialize, post_init, polling, start), stopped in order at the end."""
    redis = AsyncRedis.from_url(_stream_url(live))
    application = build_application(
        bot_settings(live, fake, **overrides),
        sessions=live.sessionmaker,
        installation=live.ctx.installation,
        dispatch=live.dispatch,
        redis=redis,
        store=live.ctx.store,
    )
    try:
        async with application:
            assert application.post_init is not None and application.post_stop is not None
            await application.post_init(application)
            assert application.updater is not None
            await application.updater.start_polling(poll_interval=0.0, timeout=1, allowed_updates=Update.ALL_TYPES)
            await application.start()
            try:
                yield application
            finally:
                await application.updater.stop()
                await application.stop()
                await application.post_stop(application)
    finally:
        await redis.aclose()


@contextlib.asynccontextmanager
async def fake_api() -> AsyncIterator[FakeBotApi]:
    fake = FakeBotApi()
    await fake.start()
    try:
        yield fake
    finally:
        await fake.close()


@pytest.fixture
def tg(live: Live) -> Live:
    """The live job path with one published character, Ichihime."""
    with live.sessionmaker.begin() as session:
        session.add(Character(name="Ichihime", description="A cheerful cat-eared mahjong player.", greeting="Nyaa! Hi!"))
        session.add(Character(name="Pikachu", description="An electric mouse.", greeting="Pika!"))
    return live


def run(body: Callable[[], Any]) -> Any:
    """Run one async test body on a fresh loop."""
    return asyncio.run(body())


def png(size: tuple[int, int] = (64, 64), seed: int = 0) -> bytes:
    """A small real PNG; different seeds give pictures that are not near-duplicates."""
    coarse = np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)  # blocks: a distinct pHash
    out = io.BytesIO()
    Image.fromarray(coarse).resize(size, Image.Resampling.BICUBIC).save(out, format="PNG")
    return out.getvalue()


def character_pictures() -> list[bytes]:
    """Ichihime's 10 RoleScape reference images, or 10 generated pictures where the data set is absent."""
    files = sorted(ROLESCAPE.glob("[0-9].png")) if ROLESCAPE.is_dir() else []
    if len(files) == 10:
        return [path.read_bytes() for path in files]
    return [png((96, 96), seed) for seed in range(10)]


def jobs(live: Live) -> list[Job]:
    """Every job row, oldest first."""
    with live.sessionmaker() as session:
        return list(session.scalars(select(Job).order_by(Job.id)))
