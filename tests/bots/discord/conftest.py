"""Fixtures of the Discord tests: stores, the worker path, the loopback fake and a running bot.

The bot is the real ``UniBot`` logged in to :class:`FakeDiscord` (REST base and gateway URL pointed at loopback).
Jobs run through the worker's own code (``workers.tasks.execute``: claim, model, events, stored reply) on a
thread, with the ``EchoModel`` double behind the ``CharacterModel`` interface.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import discord
import pytest
import redis
import yarl
from PIL import Image
from redis.asyncio import Redis as AsyncRedis
from sqlalchemy.orm import Session, sessionmaker

from bots.discord.app import services
from bots.discord.bot import UniBot
from core.config import Settings
from core.db.models import Base, Character
from core.db.session import make_engine, make_sessionmaker
from core.jobs import JobKind
from tests.bots.discord.fake_discord import FakeDiscord
from tests.doubles import EchoModel

REDIS_URL = "redis://127.0.0.1:6379/14"  # this suite's own database; flushed per test
ADMIN_ID = 940000000000000001
USER_ID = 940000000000000002
OTHER_ID = 940000000000000003


def _redis_up() -> bool:
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=0.5)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


@pytest.fixture
def redis_url() -> Iterator[str]:
    """A clean Redis database; the test is skipped when no Redis answers on loopback."""
    if not _redis_up():
        pytest.skip("Redis is not running on 127.0.0.1:6379")
    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    yield REDIS_URL
    client.flushdb()
    client.close()


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(
        _env_file=None,  # type: ignore[call-arg]
        data_dir=tmp_path,
        redis_url=REDIS_URL,
        admin_ids=[f"discord:{ADMIN_ID}"],
        image_width=64,
        image_height=64,
        image_steps=3,
        max_upload_bytes=64 * 1024,
        discord_token="fake-token",  # type: ignore[arg-type]
    )


@pytest.fixture
def sessions(settings: Settings) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(settings.sql_url)
    Base.metadata.create_all(engine)
    maker = make_sessionmaker(engine)
    with maker.begin() as session:
        session.add(Character(name="Alice", description="A cheerful sailor.", greeting="Ahoy!"))
        session.add(Character(name="Vex", description="An adults-only character.", nsfw=True))
    yield maker
    engine.dispose()


@dataclass
class Worker:
    """Runs dispatched jobs through the worker's code on threads."""

    model: EchoModel
    dispatch: Callable[[int, JobKind], None]
    threads: list[threading.Thread]

    def join(self) -> None:
        for thread in self.threads:
            thread.join(timeout=60)


@pytest.fixture
def worker(settings: Settings, sessions: sessionmaker[Session], redis_url: str) -> Iterator[Worker]:
    from workers.context import WorkerContext
    from workers.shared_model import SharedModel
    from workers.tasks import execute
    from core.media import FileStore

    model = EchoModel()
    ctx = WorkerContext(settings, sessions, redis.Redis.from_url(redis_url), FileStore(settings.files_dir),
                        SharedModel(lambda: model))
    threads: list[threading.Thread] = []

    def dispatch(job_id: int, kind: JobKind) -> None:
        thread = threading.Thread(target=execute, args=(ctx, job_id), daemon=True)
        threads.append(thread)
        thread.start()

    yield Worker(model, dispatch, threads)
    for thread in threads:
        thread.join(timeout=60)
    ctx.redis.close()


@contextlib.contextmanager
def pointed_at(fake: FakeDiscord) -> Iterator[None]:
    """discord.py's REST base and gateway URL on the fake for the block's duration."""
    old_base, old_gateway = discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY
    discord.http.Route.BASE = fake.api_base
    discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(fake.gateway_url)
    try:
        yield
    finally:
        discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = old_base, old_gateway


@contextlib.asynccontextmanager
async def running_bot(
    settings: Settings, sessions: sessionmaker[Session], worker: Worker, fake: FakeDiscord | None = None
) -> AsyncIterator[tuple[FakeDiscord, UniBot]]:
    """The real bot, connected to a fake Discord (a new one unless given), until the block ends."""
    own = fake is None
    if fake is None:
        fake = FakeDiscord()
        await fake.start()
    aredis = AsyncRedis.from_url(settings.redis_url)
    bot = UniBot(services(settings, sessions, aredis, worker.dispatch), notify_interval_s=0.2)
    with pointed_at(fake):
        runner = asyncio.create_task(bot.start("fake-token"))
        try:
            await asyncio.wait_for(bot.wait_until_ready(), 30)
            yield fake, bot
            assert bot.deliveries is not None
            await asyncio.wait_for(bot.deliveries.wait_all(), 60)
        finally:
            await bot.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(runner, 10)
            await aredis.aclose()
            if own:
                await fake.close()


def png(size: tuple[int, int] = (32, 32), colour: tuple[int, int, int] = (200, 40, 40), seed: int = 0) -> bytes:
    """A small real PNG; ``seed`` varies its pattern so that images are not near-duplicates."""
    image = Image.new("RGB", size, colour)
    for x in range(size[0]):
        for y in range(size[1]):
            if ((x * (seed + 3)) ^ (y * (seed * 7 + 1))) % (seed + 2) == 0:
                image.putpixel((x, y), ((x * 37 + seed * 50) % 256, (y * 91 + seed * 13) % 256, (seed * 29) % 256))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def run(coro: Any) -> Any:
    """Run one async test body."""
    return asyncio.run(coro)
