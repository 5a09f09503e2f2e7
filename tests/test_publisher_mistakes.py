"""The publisher under operators' mistakes and a misbehaving feed, against a real Redis and real local feed servers:
routine reconnects stay fast, a trickling peer is dropped, a lost or rejected position is noticed, two publishers
never double an event, trimming says what a stopped consumer lost, a full Redis pauses the feed."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis
import redis.asyncio as aioredis
from aiohttp import web
from redis.exceptions import ResponseError

from tests.conftest import ServeFn
from tests.helpers import (
    assert_same,
    calibrated_lines,
    calibrated_source,
    non_canary_ids,
    serving,
    stop,
    stream_ids,
    wait_for,
    xlen_at_least,
)
from wikipulse.core.errors import OperatorError
from wikipulse.core.settings import Settings
from wikipulse.devtools.eventstreams import EventStreamsServer, ReplaySource, ServerOptions, SimulatedSource, frame
from wikipulse.devtools.redis_server import RedisServer, free_port
from wikipulse.devtools.simulate import Simulator
from wikipulse.fold.subscriber import Subscriber
from wikipulse.ingest.publisher import Publisher, run_publisher
from wikipulse.store import keys
from wikipulse.store.policy import check_redis
from wikipulse.store.retry import Backoff

EXPECTED = non_canary_ids(calibrated_lines())


def test_backoff_grows_over_failures_in_a_row_and_resets_after_progress() -> None:
    backoff = Backoff(cap=30)
    for _ in range(8):
        backoff.next_delay()
    assert backoff.failures == 8
    backoff.reset()
    assert max(Backoff(cap=30).next_delay() for _ in range(200)) <= 0.5  # the first wait after progress is short


async def test_routine_drops_do_not_slow_reconnects(redis_client: aioredis.Redis, settings: Settings, eventstreams: ServeFn) -> None:
    """A feed that closes every connection after 1,500 events (as the real one does every ~15 min): 20,000 events take
    seconds. With a backoff that never resets, the 13 routine reconnects would wait up to 30 s each."""
    sim = Simulator(seed=3, start=time.time() - 600, canary_every=0)
    server, url = await eventstreams(SimulatedSource(sim, 20_000), ServerOptions(drop_every=1500))
    s = dataclasses.replace(settings, stream_url=url, backoff_cap=30.0)
    async with aioredis.Redis.from_url(s.redis_url) as client, aiohttp.ClientSession() as session:
        publisher = Publisher(s, client, session)
        task = asyncio.create_task(publisher.run())
        try:
            await wait_for(lambda: xlen_at_least(20_000)(client), 25, "20,000 events over 14 connections", task)
        finally:
            await stop(task)
    assert server.connections >= 14


async def test_a_trickling_peer_is_dropped(redis_client: aioredis.Redis, settings: Settings) -> None:
    """A peer that sends a byte now and then but never a whole event counts as idle."""
    source = ReplaySource(calibrated_lines()[:50])
    feed = EventStreamsServer(source)
    trickles = 0

    async def handler(request: web.Request) -> web.StreamResponse:
        nonlocal trickles
        if trickles:
            return await feed.handle(request)
        trickles += 1
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b":ok\n\nevent: message\ndata: ")
        with contextlib.suppress(ConnectionError):
            for _ in range(600):  # a minute of one byte every 0.1 s, no event ever complete
                await resp.write(b" ")
                await asyncio.sleep(0.1)
        return resp

    async with serving(handler) as url:
        s = dataclasses.replace(settings, stream_url=url, idle_timeout=1.0)
        async with aioredis.Redis.from_url(s.redis_url) as client, aiohttp.ClientSession() as session:
            task = asyncio.create_task(Publisher(s, client, session).run())
            try:
                await wait_for(lambda: xlen_at_least(len(non_canary_ids(source.lines)))(client), 10, "the events after the trickle", task)
            finally:
                await stop(task)


async def test_redis_that_comes_back_empty_is_noticed_and_the_known_position_kept(
    tmp_path: Path, settings: Settings, eventstreams: ServeFn, caplog: pytest.LogCaptureFixture
) -> None:
    server, url = await eventstreams(calibrated_source(), ServerOptions(rate=3000))
    redis = RedisServer(tmp_path / "volatile", appendonly=False).start()  # no persistence: a restart loses everything
    s = dataclasses.replace(settings, stream_url=url, redis_url=redis.url)
    try:
        async with aioredis.Redis.from_url(redis.url) as client, aiohttp.ClientSession() as session:
            publisher = Publisher(s, client, session)
            task = asyncio.create_task(publisher.run())
            await wait_for(lambda: xlen_at_least(2000)(client), 30, "2,000 events", task)
            redis.stop()
            connections = server.connections
            redis.start()
            await wait_for(lambda: _has_stream_ending(client, EXPECTED[-1]), 30, "the last event after the restart", task)
            await stop(task)
            after = await stream_ids(client)
            stats = await client.hgetall(keys.PUBLISHER_STATS)
    finally:
        redis.stop()
    first = EXPECTED.index(after[0])
    assert first >= 2000, "the feed was read again from the start: the position was lost"
    assert_same(after, EXPECTED[first:])  # from where the process had got to, nothing skipped, nothing twice
    assert all(last is not None for last in server.last_event_ids[connections:])
    assert int(stats[b"position_lost"]) == 1
    assert any("lost the publisher's position" in r.message and r.levelno == logging.ERROR for r in caplog.records)


async def _has_stream_ending(client: aioredis.Redis, meta_id: str) -> bool:
    try:
        ids = await stream_ids(client)
    except (ConnectionError, OSError, aioredis.ConnectionError):
        return False
    return bool(ids) and ids[-1] == meta_id


async def test_a_position_the_feed_rejects_falls_back_to_since(
    redis_client: aioredis.Redis, settings: Settings, eventstreams: ServeFn, caplog: pytest.LogCaptureFixture
) -> None:
    lines = calibrated_lines()[:200]
    server, url = await eventstreams(ReplaySource(lines), None)
    await redis_client.set(keys.POSITION, "[{not json")  # e.g. a position from another feed, or one the feed no longer knows
    await run_until(dataclasses.replace(settings, stream_url=url), xlen_at_least(len(non_canary_ids(lines))))
    assert server.last_event_ids[:2] == ["[{not json", None]  # rejected once, then not asked again
    assert_same(await stream_ids(redis_client), non_canary_ids(lines))
    assert int(await redis_client.hget(keys.PUBLISHER_STATS, "position_rejected")) == 1
    assert any("rejected the stored position" in r.message for r in caplog.records)


async def test_a_second_publisher_stands_by_and_takes_over(
    redis_client: aioredis.Redis, settings: Settings, eventstreams: ServeFn, caplog: pytest.LogCaptureFixture
) -> None:
    server, url = await eventstreams(calibrated_source(), ServerOptions(rate=4000, overlap=50))
    s = dataclasses.replace(settings, stream_url=url, lease_ttl=1.0)
    async with aioredis.Redis.from_url(s.redis_url) as client, aiohttp.ClientSession() as session:
        first, second = Publisher(s, client, session), Publisher(s, client, session)
        one = asyncio.create_task(first.run())
        await first.connected.wait()
        two = asyncio.create_task(second.run())
        await wait_for(lambda: xlen_at_least(3000)(client), 30, "3,000 events", one)
        assert not second.connected.is_set() and server.connections == 1  # it stood by: no second feed connection
        assert any("standing by" in r.message for r in caplog.records)
        await stop(one)  # the first stops; the second takes over from the stored position
        await first.close()
        await wait_for(lambda: xlen_at_least(len(EXPECTED))(client), 30, "every event", two)
        await stop(two)
    assert_same(await stream_ids(redis_client), EXPECTED)


async def test_dedup_holds_across_processes_inside_the_write(
    redis_client: aioredis.Redis, settings: Settings, eventstreams: ServeFn
) -> None:
    """Another writer added some of the events after this publisher loaded its window: they are not added again."""
    lines = calibrated_lines()[:300]
    _, url = await eventstreams(ReplaySource(lines), None)
    ids = non_canary_ids(lines)
    async with aioredis.Redis.from_url(settings.redis_url) as client, aiohttp.ClientSession() as session:
        publisher = Publisher(dataclasses.replace(settings, stream_url=url), client, session)
        await publisher.load_state()
        await client.zadd(keys.SEEN, {meta_id: 1 for meta_id in ids[100:150]})  # written meanwhile by another process
        task = asyncio.create_task(publisher.run())
        await wait_for(lambda: xlen_at_least(len(ids) - 50)(client), 20, "the events", task)
        await asyncio.sleep(0.2)
        await stop(task)
    assert_same(await stream_ids(redis_client), ids[:100] + ids[150:])
    assert int(await redis_client.hget(keys.PUBLISHER_STATS, "duplicates")) == 50


async def test_trimming_counts_what_a_stopped_group_never_read(
    redis_client: aioredis.Redis, settings: Settings, eventstreams: ServeFn
) -> None:
    # A deployment without an archiver (else its group, made with the stream, would lose as much: trimming.py).
    s = dataclasses.replace(settings, stream_maxlen=1000, retention="10s=400d,1m=400d,1h=400d", stream_consumers="subscriber")
    await Subscriber(s, redis_client).ensure_group()  # the subscriber ran once, then stopped
    _, url = await eventstreams(calibrated_source(), None)
    await run_until(dataclasses.replace(s, stream_url=url), lambda c: _published(c, len(EXPECTED)))
    length = int(await redis_client.xlen("wiki:events"))
    assert 1000 <= length < 1500  # bounded, as configured
    status = await read_status_of(s)
    assert status["trimmed_unread"] == {"wikipulse": len(EXPECTED) - length}
    # What is left is folded: folded + trimmed unread = every event published, none silently gone.
    subscriber = Subscriber(s, redis_client)
    task = asyncio.create_task(subscriber.run_stream())
    await wait_for(lambda: _folded(redis_client, length), 20, "the rest folded", task)
    await stop(task)
    status = await read_status_of(s)
    assert status["folded"] + status["trimmed_unread"]["wikipulse"] == len(EXPECTED) == status["published"]


async def test_a_full_redis_pauses_the_feed_and_channel_and_stream_agree(
    redis_client: aioredis.Redis, settings: Settings, eventstreams: ServeFn, caplog: pytest.LogCaptureFixture
) -> None:
    _, url = await eventstreams(calibrated_source(), ServerOptions(rate=5000))
    s = dataclasses.replace(settings, stream_url=url)
    used = int((await redis_client.info("memory"))["used_memory"])
    await redis_client.config_set("maxmemory", used + 3_000_000)  # room for ~2,500 events
    await redis_client.config_set("maxmemory-policy", "noeviction")
    received: list[bytes] = []
    async with redis_client.pubsub() as pubsub:
        await pubsub.subscribe("wiki")
        listener = asyncio.create_task(_listen(pubsub, received))
        async with aioredis.Redis.from_url(s.redis_url) as client, aiohttp.ClientSession() as session:
            task = asyncio.create_task(Publisher(s, client, session).run())
            await wait_for(lambda: _said(caplog, "Redis is full"), 30, "the publisher to pause", task)
            await asyncio.sleep(1.0)
            assert not task.done()
            paused_at = int(await client.xlen("wiki:events"))
            assert paused_at < len(EXPECTED)
            await redis_client.config_set("maxmemory", 0)  # the operator frees memory
            await wait_for(lambda: xlen_at_least(len(EXPECTED))(client), 30, "every event after the pause", task)
            await asyncio.sleep(0.3)
            await stop(task)
        listener.cancel()
    assert_same(await stream_ids(redis_client), EXPECTED)
    entries = await redis_client.xrange("wiki:events")
    assert_same(received, [e[b"data"] for _, e in entries])  # the channel got exactly what the stream holds
    assert int(await redis_client.hget(keys.PUBLISHER_STATS, "paused_full")) >= 1


async def test_a_lease_renewal_refused_by_a_full_redis_is_waited_out(redis_client: aioredis.Redis, settings: Settings) -> None:
    """A full Redis refuses the lease's renewal as it refuses the writes (a deny-oom SET). Before, that killed the
    renewal task without a word: on a quiet feed the lease then lapsed under the running publisher."""
    lines = calibrated_lines()[:100]
    source = ReplaySource(lines)

    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b":ok\n\n" + b"".join(frame(i, source.data(i)) for i in range(len(source))))
        await asyncio.sleep(30)  # then quiet: only the renewals keep the lease
        return resp

    async with serving(handler) as url:
        s = dataclasses.replace(settings, stream_url=url, lease_ttl=0.3)
        async with aioredis.Redis.from_url(s.redis_url) as client, aiohttp.ClientSession() as session:
            publisher = Publisher(s, client, session)
            task = asyncio.create_task(publisher.run())
            try:
                await wait_for(lambda: xlen_at_least(len(non_canary_ids(lines)))(client), 10, "the events", task)
                await redis_client.config_set("maxmemory", 1)  # every write refused, the renewals' too
                await asyncio.sleep(0.5)  # renewals every 0.1 s
                await redis_client.config_set("maxmemory", 0)
                await asyncio.sleep(0.5)
                assert not task.done()
                assert await redis_client.get(keys.PUBLISHER_LEASE) == publisher.lease.token.encode()  # renewed again
            finally:
                await redis_client.config_set("maxmemory", 0)
                await stop(task)


async def test_an_evicting_redis_is_refused_unless_allowed(redis_client: aioredis.Redis, settings: Settings) -> None:
    await redis_client.config_set("maxmemory-policy", "allkeys-lru")
    try:
        with pytest.raises(OperatorError, match="allkeys-lru"):
            await check_redis(redis_client, settings)
        await check_redis(redis_client, dataclasses.replace(settings, allow_eviction=True))
    finally:
        await redis_client.config_set("maxmemory-policy", "noeviction")


async def test_a_role_that_fails_stops_the_others_in_its_process(
    redis_client: aioredis.Redis, settings: Settings, eventstreams: ServeFn
) -> None:
    """The routes' copier fails (another application's string where the route definitions live): the publisher
    beside it stops too, and the copier's error is what the process ends with. Before, `gather`
    raised the error and left the publisher running (feed read, lease renewed) while the process shut down."""
    _, url = await eventstreams(calibrated_source(), ServerOptions(rate=2000))
    task = asyncio.create_task(run_publisher(dataclasses.replace(settings, stream_url=url)))
    await wait_for(lambda: xlen_at_least(200)(redis_client), 20, "200 events", task)
    await redis_client.set(keys.ROUTES, "not a hash")  # the copier reads it within POLL_INTERVAL
    with pytest.raises(ResponseError, match="WRONGTYPE"):
        await asyncio.wait_for(task, 20)
    left = [t for t in asyncio.all_tasks() if t.get_coro().__qualname__.startswith(("Publisher.", "RouteCopier.", "log_stats"))]  # type: ignore[union-attr]
    assert not left, left


def test_the_process_of_a_failing_role_exits_with_the_cause_said_once(redis_server: RedisServer, tmp_path: Path) -> None:
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.set(keys.ROUTES, "not a hash")
    client.close()
    env = {**os.environ, "REDIS_URL": redis_server.url, "WIKI_STREAM_URL": f"http://127.0.0.1:{free_port()}/v2/stream/recentchange"}
    result = subprocess.run([sys.executable, "-m", "wikipulse", "publish"], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    said = [line for line in result.stderr.splitlines() if "WRONGTYPE" in line]
    assert len(said) == 1 and "publish: error:" in said[0], result.stderr


# ---- helpers ---------------------------------------------------------------------------------


async def run_until(settings: Settings, check: object, timeout: float = 30) -> None:
    async with aioredis.Redis.from_url(settings.redis_url) as client, aiohttp.ClientSession() as session:
        task = asyncio.create_task(Publisher(settings, client, session).run())
        try:
            await wait_for(lambda: check(client), timeout, "the publisher's condition", task)  # type: ignore[operator]
        finally:
            await stop(task)


async def _published(client: aioredis.Redis, n: int) -> bool:
    return int(await client.hget(keys.PUBLISHER_STATS, "published") or 0) >= n


async def _folded(client: aioredis.Redis, n: int) -> bool:
    return int(await client.hget(keys.SUBSCRIBER_STATS, "folded") or 0) >= n


async def read_status_of(settings: Settings) -> dict[str, Any]:
    from wikipulse.queries import stats

    return await stats(settings)


async def _listen(pubsub: object, into: list[bytes]) -> None:
    async for message in pubsub.listen():  # type: ignore[attr-defined]
        if message["type"] == "message":
            into.append(message["data"])


async def _said(caplog: pytest.LogCaptureFixture, text: str) -> bool:
    return any(text in r.getMessage() for r in caplog.records)
