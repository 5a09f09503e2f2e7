#!/usr/bin/env python3
"""Redis memory of the time series (and the trending keys): 3 million events over 24 h across ~900 domains.

`pipenv run python -m bench.bench_memory [--events N]`: simulated events (the live feed's domain, type
and bot mix, 907 domains) stamped over the last 24 hours are folded through the subscriber's own
write path (fold + the atomic apply script) into a real Redis, in batches as the subscriber makes them.
Reports `used_memory` above an empty server, side by side with the same fold into wide windows (one
hash per domain per hour of 10 s buckets, per day of minutes, per 30 days of hours): those hashes
outgrow Redis's compact listpack encoding, which is what the narrow windows of keys.py avoid.
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

import redis.asyncio as aioredis

from bench.common import redis_server
from wikipulse import keys
from wikipulse.fold import fold
from wikipulse.series import SeriesWriter
from wikipulse.settings import Settings
from wikipulse.simulate import Simulator
from wikipulse.trending import TrendIncrements

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


@contextlib.contextmanager
def wide_windows() -> Iterator[None]:
    wide = {"10s": 3600, "1m": 86_400, "1h": 30 * 86_400}
    resolutions = tuple(dataclasses.replace(r, window=wide[r.name]) for r in keys.RESOLUTIONS)
    with mock.patch.object(keys, "RESOLUTIONS", resolutions):
        yield


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=3_000_000)
    args = parser.parse_args()
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
