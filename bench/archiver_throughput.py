#!/usr/bin/env python3
"""The archiver's throughput alone, wall and CPU: `python -m bench.archiver_throughput [--events N]`.

It imports only what the release before has too, so the same file runs against a baseline tree, alternated with
this one on a shared machine: `cd /tmp/base && PYTHONPATH=. python /path/to/bench/archiver_throughput.py`. The CPU
time (this process: loading the stream, then the archiver with its chDB threads; redis-server apart) moves less
with the machine's load than the wall time does.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import tempfile
import time
from pathlib import Path

import orjson
import redis.asyncio as aioredis

from bench.common import redis_server
from wikipulse.archive.archiver import Archiver
from wikipulse.core.settings import Settings
from wikipulse.core.summary import summary_of
from wikipulse.devtools.simulate import Simulator
from wikipulse.store import keys


async def archive_stream(settings: Settings, lines: list[bytes]) -> float:
    """Events/s of the archiver over `lines` loaded into the stream first."""
    async with aioredis.Redis.from_url(settings.redis_url) as client:
        pipe = client.pipeline(transaction=False)
        for line in lines:
            pipe.xadd(settings.stream, {keys.DATA_FIELD: line, keys.FOLD_FIELD: summary_of(orjson.loads(line))})
        await pipe.execute()
        archiver = Archiver(settings, client)
        await archiver.open_archive()
        await archiver.ensure_group()
        started = time.perf_counter()
        task = asyncio.create_task(archiver.consume())
        while int(await client.hget(keys.ARCHIVER_STATS, "archived") or 0) < len(lines):
            await asyncio.sleep(0.01)
        elapsed = time.perf_counter() - started
        task.cancel()
        archiver.close()
    return len(lines) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=200_000)
    args = parser.parse_args()
    sim = Simulator(seed=5, start=time.time() - args.events / 35, canary_every=0)
    lines = [orjson.dumps(sim.event(i)) for i in range(args.events)]
    with tempfile.TemporaryDirectory() as tmp, redis_server() as server:
        settings = Settings.from_args(environ={}, redis_url=server.url, archive_dir=str(Path(tmp) / "clickhouse"), archive_from_stream=True)
        before = resource.getrusage(resource.RUSAGE_SELF)
        rate = asyncio.run(archive_stream(settings, lines))
        after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    print(f"{rate:,.0f} events/s, {cpu / len(lines) * 1e6:.1f} µs CPU an event")


if __name__ == "__main__":
    main()
