#!/usr/bin/env python3
"""Fold throughput and Redis CPU per event: one Redis with one subscriber vs a 3-master Redis Cluster with 1, 2 and 3
subscriber processes (3 shards), side by side in one run.

`pipenv run python -m bench.bench_cluster [--events N]`: the same N simulated events are loaded into the ingest
stream as the publisher writes it; on the cluster the router (router.py) copies them to the shard streams first
(its rate is reported too). Then `subscriber.py` processes fold them; the clock runs from the first folded batch to
the last (process start-up excluded). Every server is Debian's redis-server 7, AOF off. Redis CPU is the servers'
used_cpu_user + used_cpu_sys over the fold, per event, per master.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
import redis
import redis.cluster

from bench.common import report, write_events
from wikipulse.core.settings import Settings
from wikipulse.core.summary import summary_of
from wikipulse.devtools.redis_server import LocalCluster, RedisServer, cluster_binary
from wikipulse.ingest.router import Router
from wikipulse.store import keys
from wikipulse.store.connect import open_client

ROOT = Path(__file__).resolve().parents[1]


def load(client: Any, lines: Sequence[bytes], stream: str) -> None:
    for i in range(0, len(lines), 5000):
        pipe = client.pipeline(transaction=False)
        for line in lines[i : i + 5000]:
            pipe.xadd(stream, {keys.DATA_FIELD: line, keys.FOLD_FIELD: summary_of(orjson.loads(line))})
        pipe.execute()


def cpu(client: redis.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


async def route_all(settings: Settings, n: int) -> float:
    """Route the whole ingest stream; events/s."""
    client, layout = await open_client(settings)
    async with client:
        router = Router(settings, client, layout)
        started = time.perf_counter()
        task = asyncio.create_task(router.run())
        while router.totals["routed"] < n:
            await asyncio.sleep(0.01)
        elapsed = time.perf_counter() - started
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return n / elapsed


def fold(
    url: str, nodes: Sequence[redis.Redis], counter: Any, layout: keys.Layout, n: int, assignment: Sequence[str]
) -> tuple[float, list[float]]:
    """Run one subscriber process per item of `assignment` (its SUBSCRIBER_SHARDS); (events/s, CPU µs/event per node)."""
    env = {**os.environ, "REDIS_URL": url, "SHARDS": str(layout.shards), "LOG_LEVEL": "WARNING", "STATS_INTERVAL": "3600"}
    processes = [
        subprocess.Popen([sys.executable, str(ROOT / "subscriber.py")], env={**env, "SUBSCRIBER_SHARDS": shards}, cwd=ROOT)
        for shards in assignment
    ]

    def folded() -> int:
        return sum(int(counter.hget(shard.stats, "folded") or 0) for shard in layout.all_shards)

    try:
        while folded() == 0:
            time.sleep(0.002)
        started, cpu_before = time.perf_counter(), [cpu(node) for node in nodes]
        while folded() < n:
            time.sleep(0.005)
        elapsed = time.perf_counter() - started
        cpu_used = [(cpu(node) - before) * 1e6 / n for node, before in zip(nodes, cpu_before, strict=True)]
        return n / elapsed, cpu_used
    finally:
        for p in processes:
            p.terminate()
            p.wait()


def shard_shares(layout: keys.Layout, lines: Sequence[bytes]) -> list[float]:
    counts = [0] * layout.shards
    for line in lines:
        counts[layout.shard_of(orjson.loads(line)["meta"]["domain"]).index] += 1
    return [c / len(lines) for c in counts]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=300_000)
    args = parser.parse_args()
    n = args.events
    rows: list[tuple[str, float, str]] = []
    cpu_rows: list[tuple[str, list[float]]] = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "events.ndjson"
        write_events(path, n)
        lines = path.read_bytes().splitlines()
        single = RedisServer(Path(tmp) / "single", appendonly=False, binary=cluster_binary()).start()
        try:
            client = redis.Redis(port=single.port)
            load(client, lines, "wiki:events")
            rate, used = fold(single.url, [client], client, keys.Layout("wiki:events"), n, [""])
            rows.append(("one Redis, 1 subscriber", rate, "events/s"))
            cpu_rows.append(("one Redis, 1 subscriber", used))
            client.close()
        finally:
            single.stop()

        layout = keys.Layout("wiki:events", 3, cluster=True)
        shares = shard_shares(layout, lines)
        biggest = max(range(3), key=lambda i: shares[i])
        rest = ",".join(str(i) for i in range(3) if i != biggest)
        assignments = {1: ["0,1,2"], 2: [str(biggest), rest], 3: ["0", "1", "2"]}
        route_rates: list[float] = []
        route_cpu: list[list[float]] = []
        for consumers, assignment in assignments.items():
            with LocalCluster(Path(tmp) / f"cluster{consumers}", masters=3, appendonly=False) as cluster:
                settings = Settings.from_args(environ={}, redis_url=cluster.url, shards=3, stats_interval=3600.0)
                counter = redis.cluster.RedisCluster.from_url(cluster.url)
                load(counter, lines, "wiki:events")
                nodes = [redis.Redis(port=node.port) for node in cluster.nodes]
                before = [cpu(node) for node in nodes]
                route_rates.append(asyncio.run(route_all(settings, n)))
                route_cpu.append([(cpu(node) - b) * 1e6 / n for node, b in zip(nodes, before, strict=True)])
                rate, used = fold(cluster.url, nodes, counter, layout, n, assignment)
                name = f"3-master cluster, {consumers} subscriber process{'es' if consumers > 1 else ''} ({' | '.join(assignment)})"
                rows.append((name, rate, "events/s"))
                cpu_rows.append((name, used))
                for node in nodes:
                    node.close()
                counter.close()
    report(f"fold throughput: {n:,} events, 3 shards on the cluster", rows)
    print(f"\nshare of the events per shard: {', '.join(f'shard {i} {s:.0%}' for i, s in enumerate(shares))}")
    print(f"router (in the publisher's process): {', '.join(f'{r:,.0f}' for r in route_rates)} events/s")
    print(f"Redis CPU per event routed (µs, per master): {' ; '.join(' / '.join(f'{u:.2f}' for u in used) for used in route_cpu)}")
    print("\nRedis CPU per event folded (µs, used_cpu_user + used_cpu_sys)")
    print("| variant | total | per master |")
    print("|---|---|---|")
    for name, used in cpu_rows:
        print(f"| {name} | {sum(used):.2f} | {' / '.join(f'{u:.2f}' for u in used)} |")


if __name__ == "__main__":
    main()
