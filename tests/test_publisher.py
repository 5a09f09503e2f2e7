"""The publisher against a real Redis and a real local EventStreams server."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from pathlib import Path

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis
from aiohttp import web

from tests.conftest import ServeFn
from tests.helpers import (
    assert_same,
    calibrated_lines,
    calibrated_source,
    non_canary_ids,
    run_publisher_until,
    serving,
    stream_ids,
    xlen_at_least,
)
from wikipulse.core.settings import Settings
from wikipulse.core.summary import summary_of
from wikipulse.devtools.eventstreams import MALFORMED_FRAMES, ReplaySource, ServerOptions, event_id, frame
from wikipulse.devtools.redis_server import RedisServer
from wikipulse.ingest.feed import parse_retry_after
from wikipulse.ingest.publisher import Publisher
from wikipulse.store import keys
from wikipulse.store.retry import backoff_delay

EXPECTED = non_canary_ids(calibrated_lines())


async def test_every_event_reaches_stream_and_channel_once(redis_client: aioredis.Redis, settings: Settings, eventstreams: ServeFn) -> None:
    _, url = await eventstreams(calibrated_source(), None)
    received: list[bytes] = []
    async with redis_client.pubsub() as pubsub:
        await pubsub.subscribe("wiki")

        async def listen() -> None:
            async for message in pubsub.listen():
                if message["type"] == "message":
                    received.append(message["data"])

        listener = asyncio.create_task(listen())
        await run_publisher_until(dataclasses.replace(settings, stream_url=url), xlen_at_least(len(EXPECTED)))
        await asyncio.sleep(0.3)
        listener.cancel()
    assert_same(await stream_ids(redis_client), EXPECTED)
    raw = [line for line in calibrated_lines() if b'"domain":"canary"' not in line]
    assert_same(received, raw)  # the raw JSON, unchanged, in order
    entries = await redis_client.xrange("wiki:events")
    assert_same([e[b"data"] for _, e in entries], raw)
    # beside each event, in step with it, its fold summary (what it means is tested in test_fold)
    assert_same([e[b"fold"].decode() for _, e in entries], [summary_of(orjson.loads(line)) for line in raw])
    stats = await redis_client.hgetall(keys.PUBLISHER_STATS)
    assert int(stats[b"published"]) == 9996 and int(stats[b"canaries"]) == 4
    assert (await redis_client.get(keys.POSITION)).decode() == event_id(9999).decode()


async def test_ten_drops_with_overlap_are_exactly_once(redis_client: aioredis.Redis, settings: Settings, eventstreams: ServeFn) -> None:
    server, url = await eventstreams(calibrated_source(), ServerOptions(drop_every=1000, overlap=37))
    pub = await run_publisher_until(dataclasses.replace(settings, stream_url=url), xlen_at_least(len(EXPECTED)))
    await asyncio.sleep(0.2)
    assert_same(await stream_ids(redis_client), EXPECTED)
    assert server.connections >= 11
    assert pub.totals["duplicates"] >= 9 * 36  # the overlaps were re-delivered and dropped
    # Every resume sent the position it had stored, verbatim.
    assert all(last is not None for last in server.last_event_ids[1:])


async def test_publisher_restart_mid_stream(redis_client: aioredis.Redis, settings: Settings, eventstreams: ServeFn) -> None:
    _, url = await eventstreams(calibrated_source(), ServerOptions(rate=4000, overlap=200))
    s = dataclasses.replace(settings, stream_url=url)
    await run_publisher_until(s, xlen_at_least(3000))
    assert await redis_client.xlen("wiki:events") < len(EXPECTED)
    second = await run_publisher_until(s, xlen_at_least(len(EXPECTED)))
    await asyncio.sleep(0.3)
    assert_same(await stream_ids(redis_client), EXPECTED)
    assert second.totals["duplicates"] >= 150  # the dedup window survived the restart


async def test_redis_restart_mid_stream(tmp_path: Path, settings: Settings, eventstreams: ServeFn) -> None:
    _, url = await eventstreams(calibrated_source(), ServerOptions(rate=3000, overlap=100))
    server = RedisServer(tmp_path / "redis").start()
    s = dataclasses.replace(settings, stream_url=url, redis_url=server.url)
    try:
        async with aioredis.Redis.from_url(server.url) as client, aiohttp.ClientSession() as session:
            publisher = Publisher(s, client, session)
            task = asyncio.create_task(publisher.run())
            while int(await client.xlen("wiki:events")) < 2000:
                await asyncio.sleep(0.02)
            server.stop()  # SIGTERM: Redis writes its AOF and exits, mid-stream
            await asyncio.sleep(1.0)
            server.start()
            deadline = time.monotonic() + 60
            while True:
                try:
                    if int(await client.xlen("wiki:events")) >= len(EXPECTED):
                        break
                except (ConnectionError, OSError, aioredis.ConnectionError):
                    pass
                assert time.monotonic() < deadline, "the publisher did not finish after the Redis restart"
                assert not task.done(), task
                await asyncio.sleep(0.05)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await asyncio.sleep(0.2)
            assert_same(await stream_ids(client), EXPECTED)
    finally:
        server.stop()


async def test_malformed_frames_are_counted_and_kept(redis_client: aioredis.Redis, settings: Settings, eventstreams: ServeFn) -> None:
    _, url = await eventstreams(calibrated_source(), ServerOptions(malformed_every=100))
    await run_publisher_until(dataclasses.replace(settings, stream_url=url), xlen_at_least(len(EXPECTED)))
    await asyncio.sleep(0.2)
    assert_same(await stream_ids(redis_client), EXPECTED)
    stats = {k.decode(): v.decode() for k, v in (await redis_client.hgetall(keys.PUBLISHER_STATS)).items()}
    rejected = {k: int(v) for k, v in stats.items() if k.startswith("rejected:")}
    assert sum(rejected.values()) == 100
    assert set(rejected) == {
        "rejected:not_json",
        "rejected:not_object",
        "rejected:missing_meta",
        "rejected:bad_domain",
        "rejected:invalid_utf8",
    }
    kept = await redis_client.lrange(keys.REJECTED, 0, -1)
    assert len(kept) == keys.REJECTED_KEEP
    assert {orjson.loads(k)["reason"] for k in kept} == {r.split(":")[1] for r in rejected}
    assert len(MALFORMED_FRAMES) == 5


async def test_throttled_429_honours_retry_after(redis_client: aioredis.Redis, settings: Settings) -> None:
    source = ReplaySource(calibrated_lines()[:50])
    arrivals: list[float] = []
    seen_agents: list[str] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        arrivals.append(time.monotonic())
        seen_agents.append(request.headers.get("User-Agent", ""))
        if len(arrivals) == 1:
            return web.Response(status=429, headers={"Retry-After": "1"})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b":ok\n\n" + b"".join(frame(i, source.data(i)) for i in range(len(source))))
        return resp

    async with serving(handler) as url:
        pub = await run_publisher_until(dataclasses.replace(settings, stream_url=url), xlen_at_least(50))
    assert arrivals[1] - arrivals[0] >= 1.0
    assert pub.totals["reconnects"] >= 1
    assert all(agent.startswith("wikipulse/") for agent in seen_agents)


async def test_idle_stall_forces_a_resume(redis_client: aioredis.Redis, settings: Settings) -> None:
    source = ReplaySource(calibrated_lines()[:20])
    last_ids: list[str | None] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        last_ids.append(request.headers.get("Last-Event-ID"))
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b":ok\n\n")
        if len(last_ids) == 1:
            await resp.write(b"".join(frame(i, source.data(i)) for i in range(10)))
            await asyncio.sleep(30)  # stalls: no data, no close
        else:
            await resp.write(b"".join(frame(i, source.data(i)) for i in range(10, 20)))
            await asyncio.sleep(30)
        return resp

    async with serving(handler) as url:
        await run_publisher_until(dataclasses.replace(settings, stream_url=url, idle_timeout=0.5), xlen_at_least(20), timeout=10)
    assert last_ids[:2] == [None, event_id(9).decode()]
    assert_same(await stream_ids(redis_client), non_canary_ids(calibrated_lines()[:20]))


async def test_crlf_and_multiline_data_from_the_wire(redis_client: aioredis.Redis, settings: Settings) -> None:
    event = orjson.loads(calibrated_lines()[0])
    pretty = orjson.dumps(event, option=orjson.OPT_INDENT_2)  # multi-line JSON, one data: line per line

    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        body = b":ok\r\n\r\nevent: message\r\nid: [1]\r\n" + b"".join(b"data: " + line + b"\r\n" for line in pretty.split(b"\n")) + b"\r\n"
        await resp.write(body)
        await asyncio.sleep(30)
        return resp

    async with serving(handler) as url:
        await run_publisher_until(dataclasses.replace(settings, stream_url=url), xlen_at_least(1), timeout=10)
    entries = await redis_client.xrange("wiki:events")
    assert orjson.loads(entries[0][1][b"data"]) == event


async def test_since_for_cold_start_then_position_wins(redis_client: aioredis.Redis, settings: Settings, eventstreams: ServeFn) -> None:
    lines = calibrated_lines()
    source = ReplaySource(lines)
    server, url = await eventstreams(source, ServerOptions(drop_every=2000))
    since_ms = source._sorted_times[5000]
    s = dataclasses.replace(settings, stream_url=url, since=str(since_ms))
    await run_publisher_until(s, xlen_at_least(1000))
    first = await stream_ids(redis_client)
    assert first[0] == non_canary_ids(lines[source.seek_time(since_ms) :])[0]  # the first event at `since` (canaries are dropped)
    # Restarted with --since again: the stored position wins, no gap and no repeat.
    await run_publisher_until(s, xlen_at_least(len(non_canary_ids(lines[source.seek_time(since_ms) :]))))
    await asyncio.sleep(0.2)
    assert_same(await stream_ids(redis_client), non_canary_ids(lines[source.seek_time(since_ms) :]))
    # --reset-position forgets it.
    before = server.connections

    async def reconnected(client: aioredis.Redis) -> bool:
        return server.connections > before

    await run_publisher_until(dataclasses.replace(s, reset_position=True, since=""), reconnected)
    assert server.last_event_ids[before] is None


def test_backoff_is_full_jitter_and_capped() -> None:
    import random

    rng = random.Random(1)
    delays = [backoff_delay(a, cap=30, rng=rng) for a in range(20) for _ in range(20)]
    assert max(delays) <= 30 and min(delays) >= 0
    assert max(backoff_delay(0, cap=30, rng=rng) for _ in range(100)) <= 0.5
    assert parse_retry_after("7") == 7 and parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") is None
