#!/usr/bin/env python3
"""The publisher's write alone, with and without copying its batches to three routes (route_inline.lua).

`pipenv run python -m bench.route_write_alone [--events N] [--runs R]`: on one Redis, this process writes N events in
batches of BATCH_SIZE (`--batch-size`) through the publisher's writer (ingest.BatchWriter), first with no routes' plan (as with no route
declared), then with the copier's plan for bench_routes.ROUTES, the copier standing at the end of the stream, so that
each write copies its batch itself; the two take turns, R runs each, on an emptied Redis each time. Printed: Redis's
time an event in the write script (INFO commandstats) and in all commands, medians, and the ratio. It fails if a write
that should copy did not, or if the routes do not hold the slices' entries.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import orjson
import redis.asyncio as aioredis

from bench.bench_routes import ROUTES
from bench.common import redis_server, write_events
from wikipulse.core.settings import Settings
from wikipulse.core.summary import summary_of
from wikipulse.ingest.route_reader import ReadPlan
from wikipulse.ingest.routes import RouteCopier, add_route
from wikipulse.ingest.writer import BatchWriter, IngestBatch
from wikipulse.store import keys
from wikipulse.store.lease import Lease


async def once(url: str, lines: list[bytes], copy: bool, size: int) -> dict[str, float]:
    client = aioredis.Redis.from_url(url)
    settings = Settings.from_args(environ={}, redis_url=url)
    copier = RouteCopier(settings, client, keys.Layout(settings.stream))
    try:
        await client.flushall()
        lease = Lease(client, keys.UNSHARDED_PUBLISHER.lease, settings.lease_ttl)
        writer = BatchWriter(settings, client, lease, routes=(lambda: copier.plan) if copy else ReadPlan)
        assert await lease.try_acquire() is None and await copier.lease.try_acquire() is None
        events = [orjson.loads(x) for x in lines]
        batches = [
            IngestBatch(frames=lines[i : i + size], folds=[summary_of(e) for e in events[i : i + size]],
                        ids=[e["meta"]["id"] for e in events[i : i + size]])
            for i in range(0, len(lines), size)
        ]  # fmt: skip
        await writer.write(batches[0], time.time())  # the stream exists before the routes: they hold what comes after
        for name, where in ROUTES.items():
            await add_route(client, settings, name, where, from_stream=False)
        await copier.refresh()  # the group made at the routes' start: the end of the stream
        await client.config_resetstat()
        for batch in batches[1:]:
            written = await writer.write(batch, time.time())
            if copy and written.routed is None:
                raise RuntimeError("a write did not copy its batch to the routes: the measure would be of something else")
        n = len(lines) - len(batches[0].frames)
        stats = await client.info("commandstats")
        routed = sum([await client.xlen(keys.Route(name).stream) for name in ROUTES])
        if copy and routed == 0:
            raise RuntimeError("the routes hold nothing")
        return {"write_us": stats["cmdstat_evalsha"]["usec"] / n, "all_us": sum(v["usec"] for v in stats.values()) / n, "routed": routed}
    finally:
        await copier._forget()
        await client.aclose()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=60_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=Settings.from_args(environ={}).batch_size, help="events a write")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "events.ndjson"
        write_events(path, args.events + 500)
        lines = [line for line in path.read_bytes().splitlines() if b'"canary"' not in line]
        runs: dict[bool, list[dict[str, float]]] = {False: [], True: []}
        with redis_server() as server:
            for r in range(args.runs):
                for copy in (False, True) if r % 2 == 0 else (True, False):
                    runs[copy].append(asyncio.run(once(server.url, lines, copy, args.batch_size)))
                    got = runs[copy][-1]
                    print(f"run {r + 1}, {'copying' if copy else 'plain'}: write {got['write_us']:.2f} µs/event, all {got['all_us']:.2f}")
    med = {copy: {k: statistics.median(x[k] for x in v) for k in ("write_us", "all_us")} for copy, v in runs.items()}
    copied = runs[True][-1]["routed"]
    print(f"\nthe publisher's write, {len(lines):,} events in writes of {args.batch_size}, {copied:,.0f} copied to three routes;",
          f"medians of {args.runs}")  # fmt: skip
    print("| write | Redis µs an event, write script | ratio | all commands | ratio |\n|---|---|---|---|---|")
    for copy, name in ((False, "no routes' plan"), (True, "copying to three routes")):
        m = med[copy]
        print(f"| {name} | {m['write_us']:.2f} | {m['write_us'] / med[False]['write_us']:.2f}× | {m['all_us']:.2f} | "
              f"{m['all_us'] / med[False]['all_us']:.2f}× |")  # fmt: skip


if __name__ == "__main__":
    main()
