#!/usr/bin/env python3
"""Subscriber throughput, side by side in one run: wikipulse's batched, atomic fold vs the seed's fold.

`pipenv run python -m bench.bench_subscriber [--events N]`: the same N events are loaded into the
stream of a real Redis; each variant folds all of them from it. The baseline is the seed's shape:
one pipeline of HINCRBYs (every resolution and dimension) executed per event.
Also: pub/sub mode (events PUBLISHed by a second process) and Redis memory after the fold.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import orjson
import redis.asyncio as aioredis

from bench.common import redis_server, report, write_events
from wikipulse.core.events import Accepted, validate
from wikipulse.core.settings import Settings
from wikipulse.core.summary import summary_of
from wikipulse.devtools.reference import fold
from wikipulse.fold.subscriber import Subscriber, tune_gc
from wikipulse.store import keys

# Publishes the file's events at a steady rate (argv[3] events/s), in slices every 10 ms.
PUBLISH_SCRIPT = """
import sys, time, redis
client = redis.Redis.from_url(sys.argv[1])
lines = open(sys.argv[2], "rb").read().splitlines()
rate = float(sys.argv[3])
started, sent = time.perf_counter(), 0
while sent < len(lines):
    due = min(len(lines), int((time.perf_counter() - started) * rate))
    if due > sent:
        pipe = client.pipeline(transaction=False)
        for line in lines[sent:due]:
            pipe.publish("wiki", line)
        pipe.execute()
        sent = due
    time.sleep(0.01)
"""
PUBSUB_RATES = (10_000, 25_000)  # events/s offered to the pub/sub subscriber


async def load(client: aioredis.Redis, lines: list[bytes]) -> None:
    """The stream as the publisher writes it: each entry's raw JSON and its fold summary."""
    await client.flushall()
    for i in range(0, len(lines), 5000):
        pipe = client.pipeline(transaction=False)
        for line in lines[i : i + 5000]:
            pipe.xadd("wiki:events", {keys.DATA_FIELD: line, keys.FOLD_FIELD: summary_of(orjson.loads(line))})
        await pipe.execute()


async def seed_style(redis_url: str, lines: list[bytes], retention: dict[str, int]) -> float:
    async with aioredis.Redis.from_url(redis_url) as client:
        await load(client, lines)
        started = time.perf_counter()
        last = "0"
        done = 0
        while done < len(lines):
            reply = await client.xread({"wiki:events": last}, count=1000)
            for entry_id, fields in reply[0][1]:
                verdict = validate(fields[b"data"])
                if isinstance(verdict, Accepted):
                    inc = fold([verdict.event], time.time(), retention)
                    pipe = client.pipeline(transaction=False)
                    for (key, field), n in inc.counts.items():
                        pipe.hincrby(key, field, n)
                    await pipe.execute()
                last = entry_id
                done += 1
        return len(lines) / (time.perf_counter() - started)


async def ours(settings: Settings, lines: list[bytes], pubsub_file: Path | None = None, rate: float = 0) -> tuple[float, int]:
    """Stream mode: events/s folded from a preloaded stream. Pub/sub mode: the share of the events
    published at `rate` that were folded (pub/sub is at-most-once: what it cannot keep up with is lost)."""
    async with aioredis.Redis.from_url(settings.redis_url) as client:
        if pubsub_file is None:
            await load(client, lines)
        else:
            await client.flushall()
        tune_gc()  # as run_subscriber does
        subscriber = Subscriber(settings, client)
        task = asyncio.create_task(subscriber.run_stream() if pubsub_file is None else subscriber.run_pubsub())
        publisher = None
        if pubsub_file is not None:
            while dict(await client.pubsub_numsub("wiki")).get(b"wiki", 0) == 0:
                await asyncio.sleep(0.01)
            publisher = await asyncio.create_subprocess_exec(
                sys.executable, "-c", PUBLISH_SCRIPT, settings.redis_url, str(pubsub_file), str(rate)
            )
        started = time.perf_counter()
        while int(await client.hget(keys.SUBSCRIBER_STATS, "folded") or 0) < len(lines):
            await asyncio.sleep(0.005)
            if publisher is not None and publisher.returncode is not None and time.perf_counter() - started > len(lines) / rate + 10:
                break  # what is not folded 10 s after the last PUBLISH was lost
        folded = int(await client.hget(keys.SUBSCRIBER_STATS, "folded") or 0)
        result = folded / (time.perf_counter() - started) if publisher is None else folded / len(lines)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        if publisher is not None:
            await publisher.wait()
        memory = int((await client.info("memory"))["used_memory"])
        return result, memory


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=200_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "events.ndjson"
        write_events(path, args.events)
        lines = path.read_bytes().splitlines()
        with redis_server() as server:
            settings = Settings.from_args(environ={}, redis_url=server.url, consumer="bench", stats_interval=3600.0)
            retention = settings.retention_seconds()
            base = asyncio.run(seed_style(server.url, lines[: args.events // 10], retention))
            stream_rate, memory = asyncio.run(ours(settings, lines))
            pubsub_lines = lines[:100_000]
            pubsub_file = Path(tmp) / "pubsub.ndjson"
            pubsub_file.write_bytes(b"\n".join(pubsub_lines) + b"\n")
            pubsub = Settings.from_args(environ={}, redis_url=server.url, source="pubsub", stats_interval=3600.0)
            kept = {rate: asyncio.run(ours(pubsub, pubsub_lines, pubsub_file, rate))[0] for rate in PUBSUB_RATES}
    report(f"subscriber: {args.events:,} events (baseline on a tenth of them)", [
        ("seed-style: one pipeline of HINCRBYs per event", base, "events/s"),
        ("wikipulse, stream mode (exactly-once: one Lua script per batch)", stream_rate, "events/s"),
    ])  # fmt: skip
    print(f"\nRedis used_memory after the stream fold: {memory / 1e6:.1f} MB (stream included)")
    print(f"\npub/sub mode, {len(pubsub_lines):,} events PUBLISHed at a steady rate by another process:")
    print("| offered | folded |")
    print("|---|---|")
    for rate, share in kept.items():
        print(f"| {rate:,} events/s | {share:.1%} |")


if __name__ == "__main__":
    main()
