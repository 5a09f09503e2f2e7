#!/usr/bin/env python3
"""What a Prometheus scrape of `/metrics` costs, on one Redis (the embedded one: 6.2, which has no group lag).

`pipenv run python -m bench.bench_metrics [--entries N] [--scrapes N]`

A stream of N real-schema entries with two groups, each case side by side in one run: both groups at the stream's
end; one group N entries behind (its lag counted in Redis, up to operations.LAG_COUNT_MAX). Per scrape: the wall
time of the read (two pipelined round trips) and of the whole exposition, and the Redis time of the lag count
(INFO commandstats: Redis serves nothing else meanwhile).
"""

from __future__ import annotations

import argparse
import statistics
import time

import orjson
import redis
from prometheus_client import generate_latest

from bench.common import redis_server
from wikipulse.core.settings import Settings
from wikipulse.core.summary import summary_of
from wikipulse.dashboard.operations import read_scrape, registry_for
from wikipulse.dashboard.push import NoticeHub
from wikipulse.devtools.simulate import Simulator
from wikipulse.store import keys


def measure(client: redis.Redis, settings: Settings, scrapes: int) -> tuple[float, float, float]:
    """(read ms, exposition ms, Redis µs of the lag count) per scrape, medians / means."""
    layout = keys.Layout(settings.stream)
    registry = registry_for(client, layout, settings, NoticeHub(settings.redis_url))
    client.config_resetstat()
    reads, expositions = [], []
    for _ in range(scrapes):
        t = time.perf_counter()
        read_scrape(client, layout, settings, time.time())
        reads.append(time.perf_counter() - t)
        t = time.perf_counter()
        generate_latest(registry)
        expositions.append(time.perf_counter() - t)
    evals = client.info("commandstats").get("cmdstat_eval", {"usec": 0})
    return statistics.median(reads) * 1000, statistics.median(expositions) * 1000, evals["usec"] / (2 * scrapes)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--entries", type=int, default=30_000)
    parser.add_argument("--scrapes", type=int, default=50)
    args = parser.parse_args()
    with redis_server() as server:
        client = redis.Redis.from_url(server.url)
        print("redis", client.info("server")["redis_version"])
        sim = Simulator(seed=1, start=time.time() - args.entries / 35)
        pipe = client.pipeline(transaction=False)
        for i in range(args.entries):
            event = sim.event(i)
            pipe.xadd("wiki:events", {"data": orjson.dumps(event), "fold": summary_of(event)})
        pipe.execute()
        client.xgroup_create("wiki:events", "wikipulse", id="$")
        client.xgroup_create("wiki:events", "archiver", id="$")
        settings = Settings.from_args(environ={}, redis_url=server.url)
        rows = [("groups at the end", *measure(client, settings, args.scrapes))]
        client.xgroup_setid("wiki:events", "wikipulse", "0")
        rows.append((f"one group {args.entries:,} behind", *measure(client, settings, args.scrapes)))
        print(f"{'case':28} {'read ms':>8} {'whole scrape ms':>16} {'Redis µs counting':>18}")
        for name, read, whole, counting in rows:
            print(f"{name:28} {read:8.2f} {whole:16.2f} {counting:18.0f}")


if __name__ == "__main__":
    main()
