"""Job event streams: publish with expiry, follow (async and sync) from any entry, end after Done/Failed."""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio import Redis as AsyncRedis

from core.jobs import Done, Failed, ImageReady, Progress, TextDelta, stream_key
from core.streams import follow, follow_sync, publish
from tests.conftest import STREAM_DB, redis_db

pytestmark = pytest.mark.integration

NS = "a1b2c3d4e5f60718"  # a database's installation token
EVENTS = [Progress("text"), TextDelta("Hel"), TextDelta("lo"), ImageReady("k" * 64 + ".png", 64, 48, 7), Done(5)]


def test_publish_appends_and_expires(redis_client):
    ids = [publish(redis_client, NS, 1, event, ttl_s=120) for event in EVENTS]
    assert ids == sorted(ids) and redis_client.xlen(stream_key(NS, 1)) == len(EVENTS)
    assert 0 < redis_client.ttl(stream_key(NS, 1)) <= 120


def test_follow_sync_reads_all_and_resumes(redis_client):
    for event in EVENTS:
        publish(redis_client, NS, 2, event)
    entries = list(follow_sync(redis_client, NS, 2))
    assert [event for _id, event in entries] == EVENTS
    resumed = list(follow_sync(redis_client, NS, 2, last_id=entries[2][0]))
    assert [event for _id, event in resumed] == EVENTS[3:]


def test_follow_ends_after_failed_even_with_later_entries(redis_client):
    for event in (TextDelta("a"), Failed("boom"), TextDelta("ignored")):
        publish(redis_client, NS, 3, event)
    assert [event for _id, event in follow_sync(redis_client, NS, 3)] == [TextDelta("a"), Failed("boom")]


def test_follow_async_waits_for_new_events(redis_client, redis_url):
    async def scenario() -> list:
        client = AsyncRedis.from_url(redis_db(redis_url, STREAM_DB))
        try:
            reader = asyncio.ensure_future(_collect(client))
            await asyncio.sleep(0.05)  # the follower is already blocked on XREAD
            for event in EVENTS:
                publish(redis_client, NS, 4, event)
            return await asyncio.wait_for(reader, timeout=30)
        finally:
            await client.aclose()

    async def _collect(client: AsyncRedis) -> list:
        return [event async for _id, event in follow(client, NS, 4)]

    assert asyncio.run(scenario()) == EVENTS


def test_an_idle_stream_times_out(redis_client):
    publish(redis_client, NS, 5, Progress("queued", position=3))
    with pytest.raises(TimeoutError):
        list(follow_sync(redis_client, NS, 5, idle_timeout_s=1))


def test_a_database_follows_only_its_own_jobs_streams(redis_client):
    """A database created again numbers its jobs from 1: the old one's stream of job 1 is not its job 1's."""
    publish(redis_client, "0ld0ld0ld0ld0ld0", 6, TextDelta("an old reply"))
    publish(redis_client, "0ld0ld0ld0ld0ld0", 6, Done(1))
    with pytest.raises(TimeoutError):
        list(follow_sync(redis_client, NS, 6, idle_timeout_s=1))
    publish(redis_client, NS, 6, Done(2))
    assert [event for _id, event in follow_sync(redis_client, NS, 6)] == [Done(2)]
