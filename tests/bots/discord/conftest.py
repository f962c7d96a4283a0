"""Fixtures of the Discord tests: the real job path, the loopback fake and a running bot.

The bot is the real ``UniBot`` logged in to :class:`FakeDiscord` (REST base and gateway URL pointed at loopback).
Jobs go through the session's real Celery worker (``live`` in tests/conftest.py) with a model behind the
``CharacterModel`` interface: the ``EchoModel`` double, or the tiny random model.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import discord
import pytest
import yarl
from PIL import Image
from redis.asyncio import Redis as AsyncRedis
from sqlalchemy.orm import Session, sessionmaker

from bots.discord.app import services
from bots.discord.bot import UniBot
from core.config import Settings
from core.db.models import Character
from core.jobs import JobKind
from tests.bots.discord.fake_discord import FakeDiscord
from tests.conftest import STREAM_DB, redis_db

ADMIN_ID = 940000000000000001
USER_ID = 940000000000000002
OTHER_ID = 940000000000000003


@dataclass
class Stack:
    """What a Discord test runs on: the bot's settings and stores, and the running worker's dispatch."""

    settings: Settings
    sessions: sessionmaker[Session]
    stream_url: str  # the Redis database the worker publishes job events to
    dispatch: Callable[[int, JobKind], None]
    live: Any  # tests.conftest.Live: the worker's context and model double


@pytest.fixture
def stack(live: Any, redis_url: str) -> Stack:
    """The session's Celery worker with an EchoModel, two characters, and bot settings on the same stores."""
    settings = live.settings.model_copy(
        update={
            "admin_ids": [f"discord:{ADMIN_ID}"],
            "max_upload_bytes": 64 * 1024,
            "image_width": 64,
            "image_height": 64,
            "image_steps": 3,
        }
    )
    with live.sessionmaker.begin() as session:
        session.add(Character(name="Alice", description="A cheerful sailor.", greeting="Ahoy!"))
        session.add(Character(name="Vex", description="An adults-only character.", nsfw=True))
    return Stack(settings, live.sessionmaker, redis_db(redis_url, STREAM_DB), live.dispatch, live)


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
async def running_bot(stack: Stack, fake: FakeDiscord | None = None) -> AsyncIterator[tuple[FakeDiscord, UniBot]]:
    """The real bot, connected to a fake Discord (a new one unless given), until the block ends."""
    own = fake is None
    if fake is None:
        fake = FakeDiscord()
        await fake.start()
    aredis = AsyncRedis.from_url(stack.stream_url)
    bot = UniBot(
        services(stack.settings, stack.sessions, stack.live.ctx.installation, aredis, stack.dispatch),
        notify_interval_s=0.2,
    )
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


@pytest.fixture
def tiny_stack(stack: Stack, tiny_model_dir: Any) -> Iterator[Stack]:
    """The stack with the tiny random model in the worker, drawing small images so that CPU keeps up."""
    from core.model.runtime import UniCharacterRuntime

    ctx = stack.live.ctx
    before = ctx.settings
    ctx.settings = before.model_copy(update={"image_width": 64, "image_height": 64, "image_steps": 3})
    stack.live.use_model(UniCharacterRuntime.load(tiny_model_dir, device="cpu", dtype="float32"))
    try:
        yield stack
    finally:
        ctx.settings = before
