#!/usr/bin/env python3
"""Redis memory of the time series (and the trending keys): 3 million events over 24 h across ~900 domains.

`pipenv run python -m bench.bench_memory [--events N]`: simulated events (the live feed's domain, type
and bot mix, 907 domains) stamped over the last 24 hours are folded through the subscriber's own
write path (fold + the atomic apply script) into a real Redis, in batches as the subscriber makes them.
Reports `used_memory` above an empty server, side by side with the same fold into wide windows (one
hash per domain per hour of 10 s buckets, per day of minutes, per 30 days of hours): those hashes
outgrow Redis's compact listpack encoding, which is what the narrow windows of keys.py avoid.

`pipenv run python -m bench.bench_memory --pipeline [--events N]`: a day of the live feed through the default
pipeline, the stream included. The same events, as whole JSON frames, go through the publisher's write script
(ingest.BatchWriter: stream, channel, dedup window, trimming), the subscriber's read, fold and apply (the real
Subscriber) and the archiver's group (read and acknowledged as the archiver does after an insert; ClickHouse holds
no Redis memory), in lock-step: each batch is folded and acknowledged before the next is written, as consumers keep
up with the live feed's ~35 events/s. A day is written at a high rate (its event times spread over the last 24 h).
Side by side in one run: today's trimming (at STREAM_MAXLEN only: STREAM_KEEP set to STREAM_MAXLEN, so the
acknowledged trim never runs and the hard cap runs as before) and the default (trimming.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any
from unittest import mock

import orjson
import redis.asyncio as aioredis

from bench.common import redis_server
from wikipulse.core import model
from wikipulse.core.settings import Settings
from wikipulse.core.summary import summary_of
from wikipulse.devtools.reference import fold
from wikipulse.devtools.simulate import Simulator
from wikipulse.fold.series import SeriesWriter
from wikipulse.fold.subscriber import Subscriber
from wikipulse.fold.trending import TrendIncrements
from wikipulse.ingest.writer import BatchWriter, IngestBatch
from wikipulse.store import keys
from wikipulse.store.lease import Lease

BATCH = 5000


FOLDED = ("timestamp", "type", "bot", "namespace", "title", "user", "length", "revision")


def slim(event: dict[str, Any]) -> dict[str, Any]:
    """What the fold reads of an event (keeps the generator's memory small)."""
    return {"meta": {"domain": event["meta"]["domain"]}, **{k: event[k] for k in FOLDED if k in event}}


async def fold_all(url: str, n: int, now: float, trending: bool = True) -> tuple[int, int, Counter[str]]:
    retention = Settings.from_args(environ={}).retention_seconds()
    sim = Simulator(seed=7, start=now - 86_400, rate=n / 86_400, canary_every=0)
    async with aioredis.Redis.from_url(url) as client:
        await client.flushall()
        empty = int((await client.info("memory"))["used_memory"])
        writer = SeriesWriter(client, "wiki:events", "wikipulse", "bench")
        domains: set[str] = set()
        for start in range(0, n, BATCH):
            events = [slim(sim.event(i)) for i in range(start, min(start + BATCH, n))]
            domains.update(e["meta"]["domain"] for e in events)
            inc = fold(events, now, retention)
            if not trending:
                inc.pages = TrendIncrements()
            await writer.apply(inc, [], {"folded": inc.folded})
        await writer.close()
        used = int((await client.info("memory"))["used_memory"])
        by_resolution: Counter[str] = Counter()
        async for key in client.scan_iter(match=f"{keys.PREFIX}:ts:*", count=1000):
            by_resolution[key.decode().rsplit(":", 2)[-2]] += 1
        print(f"{n:,} events over 24 h, {len(domains)} domains, keys by resolution: {dict(by_resolution)}")
        return used - empty, len(domains), by_resolution


class Deployment:
    """One Redis and the pipeline's writers on it: the publisher's write script, the subscriber, the archiver's group."""

    def __init__(self, client: aioredis.Redis, settings: Settings) -> None:
        self.client, self.settings = client, settings
        self.lease = Lease(client, keys.PUBLISHER_LEASE, settings.lease_ttl)
        self.writer = BatchWriter(settings, client, self.lease)
        self.subscriber = Subscriber(settings, client)
        self.empty = 0
        self.write_seconds = 0.0  # in the publisher's write script call: the hot path the trims run in

    async def start(self) -> None:
        await self.client.flushall()
        self.empty = int((await self.client.info("memory"))["used_memory"])
        await self.subscriber.ensure_group()
        await self.subscriber.take_name()

    async def take(self, batch: IngestBatch) -> None:
        """Publish a batch, then fold it and acknowledge it in the archiver's group, as consumers that keep up do."""
        s = self.settings
        assert await self.lease.try_acquire() is None
        started = time.perf_counter()
        await self.writer.write(batch, time.time())
        self.write_seconds += time.perf_counter() - started
        entries, claims = await self.subscriber.read(">", None)
        await self.subscriber.fold_entries(entries, claims)
        reply = await self.client.xreadgroup(s.archive_group, "archiver", {s.stream: ">"}, count=s.archive_batch)
        if reply:
            await self.client.xack(s.stream, s.archive_group, *[i for i, _ in reply[0][1]])

    async def figures(self) -> dict[str, float]:
        await self.subscriber.give_up_name()
        await self.subscriber.close()
        c, s = self.client, self.settings
        return {
            "used": int((await c.info("memory"))["used_memory"]) - self.empty,
            "xlen": int(await c.xlen(s.stream)),
            "stream_bytes": int(await c.memory_usage(s.stream, samples=0) or 0),
            "seen_bytes": int(await c.memory_usage(keys.SEEN, samples=0) or 0),
            "folded": int(await c.hget(keys.SUBSCRIBER_STATS, "folded") or 0),
            "write_us": round(self.write_seconds * 1e6 / max(1, int(await c.hget(keys.PUBLISHER_STATS, "published") or 0)), 2),
        }


async def pipeline_day(urls: list[str], n: int, now: float) -> list[dict[str, float]]:
    """The same n events through today's trimming (urls[0]) and the default (urls[1]), batch by batch."""
    deployments = []
    for url, today in zip(urls, (True, False), strict=True):
        settings = Settings.from_args(environ={}, redis_url=url, consumer="bench", stats_interval=3600.0)
        if today:
            settings = dataclasses.replace(settings, stream_keep=settings.stream_maxlen)
        deployments.append(Deployment(aioredis.Redis.from_url(url), settings))
    sim = Simulator(seed=7, start=now - 86_400, rate=n / 86_400, canary_every=0)
    try:
        for d in deployments:
            await d.start()
        for start in range(0, n, BATCH):
            events = [sim.event(i) for i in range(start, min(start + BATCH, n))]
            frames, folds, ids = [orjson.dumps(e) for e in events], [summary_of(e) for e in events], [e["meta"]["id"] for e in events]
            for d in deployments:
                await d.take(IngestBatch(frames=frames, folds=folds, ids=ids))
            if start % 500_000 == 0:
                print(f"  {start:,} events", flush=True)
        return [await d.figures() for d in deployments]
    finally:
        for d in deployments:
            await d.client.aclose()


def compare_pipelines(events: int) -> None:
    names = (
        "today: trimmed at STREAM_MAXLEN (1,000,000) only",
        "acknowledged trimming: STREAM_KEEP 10,000, STREAM_MAXLEN the hard cap (the default)",
    )
    started = time.perf_counter()
    with redis_server() as today, redis_server() as default:
        rows = asyncio.run(pipeline_day([today.url, default.url], events, time.time()))
    print(f"\n{events:,} events (a day of the live feed) through the default pipeline, Redis used_memory after it "
          f"({time.perf_counter() - started:.0f} s for both)")  # fmt: skip
    print("| trimming | used_memory | of which the stream | stream entries | the dedup window | folded | write µs/event | vs today |")
    print("|---|---|---|---|---|---|---|---|")
    for name, f in zip(names, rows, strict=True):
        cells = [f"{f['used'] / 1e6:.1f} MB", f"{f['stream_bytes'] / 1e6:.1f} MB", f"{f['xlen']:,}", f"{f['seen_bytes'] / 1e6:.1f} MB",
                 f"{f['folded']:,}", f"{f['write_us']:.2f}", f"{f['used'] / rows[0]['used']:.2f}×"]  # fmt: skip
        print(f"| {name} | " + " | ".join(cells) + " |")


@contextlib.contextmanager
def wide_windows() -> Iterator[None]:
    wide = {"10s": 3600, "1m": 86_400, "1h": 30 * 86_400}
    resolutions = tuple(dataclasses.replace(r, window=wide[r.name]) for r in model.RESOLUTIONS)
    with mock.patch.object(keys, "RESOLUTIONS", resolutions):
        yield


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=3_000_000)
    parser.add_argument("--pipeline", action="store_true", help="the whole pipeline, stream included: today's trimming vs the default")
    args = parser.parse_args()
    if args.pipeline:
        compare_pipelines(args.events)
        return
    rows = []
    for name, layout, trending in (
        ("wide windows: 1 h / 1 day / 30 days per hash, no trending", wide_windows, False),
        ("wikipulse: 2 min / 15 min / 12 h per hash, no trending", contextlib.nullcontext, False),
        ("wikipulse, with trending pages and new pages (the default)", contextlib.nullcontext, True),
    ):
        started = time.perf_counter()
        with redis_server() as server, layout():
            used, domains, _ = asyncio.run(fold_all(server.url, args.events, time.time(), trending))
        rows.append((name, used))
        print(f"{name}: {used / 1e6:.1f} MB above an empty server ({domains} domains; {time.perf_counter() - started:.0f} s)")
    print(f"\n{args.events:,} events over 24 h of event time, Redis used_memory after the fold")
    print("| layout | used_memory | vs baseline |")
    print("|---|---|---|")
    for name, used in rows:
        print(f"| {name} | {used / 1e6:.1f} MB | {used / rows[0][1]:.2f}× |")


if __name__ == "__main__":
    main()
