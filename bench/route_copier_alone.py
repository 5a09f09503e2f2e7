#!/usr/bin/env python3
"""The routes' copier alone, on a stream loaded beforehand: what it costs its process and Redis an event, without the
publisher and the subscriber competing for the cores (bench_routes.py runs the whole pipeline).

`python bench/route_copier_alone.py TREE [--events N] [--runs R]` (from any checkout: TREE is the checkout whose copier
runs, e.g. this one and main's, one after the other): an empty Redis is loaded with N events as the publisher writes
them (`data` and `fold`), bench_routes.ROUTES are declared with --from-stream, and TREE's RouteCopier runs in this
process until its group has taken every entry. Printed: the wall time, this process's CPU an event, Redis's CPU an
event, and Redis's time an event in each command (INFO commandstats).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson
import redis
import redis.asyncio as aioredis


def _redis_cpu(client: redis.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


async def once(url: str, lines: list[bytes]) -> dict[str, Any]:
    from bench.bench_routes import ROUTES, copier_done
    from wikipulse.core.settings import Settings
    from wikipulse.core.summary import summary_of
    from wikipulse.ingest.routes import RouteCopier, add_route
    from wikipulse.store import keys

    settings = Settings.from_args(environ={}, redis_url=url)
    client = aioredis.Redis.from_url(url)
    sync = redis.Redis.from_url(url)
    try:
        await client.flushall()
        pipe = client.pipeline(transaction=False)
        for line in lines:
            pipe.xadd(settings.stream, {"data": line, "fold": summary_of(orjson.loads(line))})
        await pipe.execute()
        for name, where in ROUTES.items():
            await add_route(client, settings, name, where, from_stream=True)
        sync.config_resetstat()
        redis_cpu, cpu, wall = _redis_cpu(sync), time.process_time(), time.perf_counter()
        copier = RouteCopier(settings, client, keys.Layout(settings.stream))
        task = asyncio.create_task(copier.run())
        while not copier_done(sync, len(lines)):
            await asyncio.sleep(0.002)
        wall, cpu, redis_cpu = time.perf_counter() - wall, time.process_time() - cpu, _redis_cpu(sync) - redis_cpu
        task.cancel()
        await asyncio.wait([task])
        n = len(lines)
        stats = {name.removeprefix("cmdstat_"): float(v["usec"]) / n for name, v in sync.info("commandstats").items()}
        routed = sum(sync.xlen(keys.Route(name).stream) for name in ROUTES)
        return {"wall": wall, "process_us": cpu / n * 1e6, "redis_us": redis_cpu / n * 1e6, "routed": routed, "commands": stats}
    finally:
        await client.aclose()
        sync.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("tree", type=Path, help="the checkout whose copier runs")
    parser.add_argument("--events", type=int, default=60_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    sys.path.insert(0, str(args.tree.resolve()))  # that tree's wikipulse (and its bench.bench_routes.ROUTES)
    for name in [m for m in sys.modules if m == "bench" or m.startswith(("bench.", "wikipulse"))]:
        del sys.modules[name]
    from bench.common import redis_server, write_events

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "events.ndjson"
        write_events(path, args.events)
        lines = path.read_bytes().splitlines()
        runs = []
        with redis_server() as server:
            for _ in range(args.runs):
                load = Path("/proc/loadavg").read_text().split()[0]
                runs.append(asyncio.run(once(server.url, lines)))
                r = runs[-1]
                print(f"load {load}: wall {r['wall']:.2f} s, process {r['process_us']:.1f} µs/event, Redis {r['redis_us']:.1f} µs/event")
    print(f"\n{args.tree}: the copier alone, {args.events:,} events, {runs[-1]['routed']:,} copied; medians of {args.runs}")
    print(f"process CPU {statistics.median(r['process_us'] for r in runs):.1f} µs/event, "
          f"Redis CPU {statistics.median(r['redis_us'] for r in runs):.1f} µs/event")  # fmt: skip
    names = sorted(runs[0]["commands"], key=lambda k: -float(runs[0]["commands"][k]))
    for name in names[:8]:
        print(f"  {name:<12} {statistics.median(float(r['commands'].get(name, 0)) for r in runs):6.2f} µs/event")


if __name__ == "__main__":
    main()
