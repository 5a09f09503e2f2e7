#!/usr/bin/env python3
"""Publisher throughput, side by side in one run: wikipulse's batched publisher vs the seed's per-event awaits.

`pipenv run python -m bench.bench_publisher [--events N]`: both read the same local EventStreams
server (its own process, full speed) and write PUBLISH + XADD for every event into a real Redis.
The baseline is the seed's loop: aiohttp-sse-client, then one awaited PUBLISH (and here XADD) per event.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import aiohttp
import redis.asyncio as aioredis
from aiohttp_sse_client import client as sse_client

from bench.common import redis_server, replay_server, report, write_events
from wikipulse.core.settings import Settings
from wikipulse.ingest.publisher import Publisher


async def naive(url: str, redis_url: str, n: int) -> float:
    async with aioredis.Redis.from_url(redis_url) as client:
        await client.flushall()
        started = time.perf_counter()
        seen = 0
        async with sse_client.EventSource(url, timeout=aiohttp.ClientTimeout(total=None)) as source:
            async for event in source:
                await client.publish("wiki", event.data)
                await client.xadd("wiki:events", {"data": event.data})
                seen += 1
                if seen >= n:
                    break
        return n / (time.perf_counter() - started)


async def ours(url: str, redis_url: str, n: int) -> float:
    settings = Settings.from_args(environ={}, redis_url=redis_url, stream_url=url, stats_interval=3600.0)
    async with aioredis.Redis.from_url(redis_url) as client, aiohttp.ClientSession() as session:
        await client.flushall()
        publisher = Publisher(settings, client, session)
        started = time.perf_counter()
        task = asyncio.create_task(publisher.run())
        while int(await client.xlen("wiki:events")) < n:
            await asyncio.sleep(0.01)
        elapsed = time.perf_counter() - started
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return n / elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=50_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "events.ndjson"
        write_events(path, args.events)
        with redis_server() as server, replay_server(path) as url:
            base = asyncio.run(naive(url, server.url, args.events))
            mine = asyncio.run(ours(url, server.url, args.events))
    report(f"publisher: {args.events:,} events, local SSE -> PUBLISH + XADD", [
        ("seed-style: aiohttp-sse-client, one awaited PUBLISH + XADD per event", base, "events/s"),
        ("wikipulse publisher: own SSE decoder, one Lua script call per batch, reading on while it runs", mine, "events/s"),
    ])  # fmt: skip


if __name__ == "__main__":
    main()
