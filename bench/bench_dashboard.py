"""Dashboard refresh time, side by side in one run: one pipelined round trip vs one round trip per series.

`pipenv run python -m bench.bench_dashboard`: 10 domains x 360 buckets (10 s resolution, 1 h window)
with the by-type breakdown, against a real Redis holding that data. Times the whole refresh callback
body: the Redis reads and building every output (figure, header, lists, ticker).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import redis

from bench.common import redis_server
from wikipulse import keys
from wikipulse.dashboard import read_snapshot, render
from wikipulse.fold import fold
from wikipulse.series import bucket_range, fields_for
from wikipulse.settings import Settings
from wikipulse.view import Selection, Snapshot

DOMAINS = tuple(f"d{i}.wikipedia.org" for i in range(10))
RUNS = 40


def seed(client: redis.Redis, now: int, retention: dict[str, int]) -> None:
    events: list[dict[str, Any]] = []
    for t in range(now - 3600, now, 2):
        for i, domain in enumerate(DOMAINS):
            kind = keys.EVENT_TYPES[(t + i) % 4]
            events.append({"meta": {"domain": domain}, "timestamp": t, "type": kind, "bot": t % 3 == 0})
    inc = fold(events, now, retention)
    pipe = client.pipeline(transaction=False)
    for (key, fld), n in inc.counts.items():
        pipe.hincrby(key, fld, n)
    pipe.execute()


def naive_snapshot(client: redis.Redis, sel: Selection, now: float) -> Snapshot:
    """The same reads, one round trip each (no pipeline)."""
    snap = read_snapshot(client, "wiki:events", Selection((), sel.resolution, sel.window, sel.breakdown), now)
    buckets = bucket_range(sel.res, int(now) - sel.seconds + sel.res.step, int(now))
    for domain in sel.domains:
        per_dim: dict[str, list[int | None]] = {d: [] for d in sel.dims}
        for key, flds in fields_for(sel.res, domain, buckets, sel.dims).items():
            for i, v in enumerate(client.hmget(key, flds)):
                per_dim[sel.dims[i % len(sel.dims)]].append(None if v is None else int(v))
        snap.series[domain] = per_dim
    return snap


def median_ms(fn: Any) -> float:
    times = []
    for _ in range(RUNS):
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def main() -> None:
    with redis_server() as server:
        client = redis.Redis.from_url(server.url)
        now = int(time.time())
        seed(client, now, Settings.from_args(environ={}).retention_seconds())
        sel = Selection(DOMAINS, "10s", "1h", "type")
        base = median_ms(lambda: render(naive_snapshot(client, sel, time.time()), sel))
        mine = median_ms(lambda: render(read_snapshot(client, "wiki:events", sel), sel))
        client.close()
    print("\ndashboard refresh: 10 domains x 360 buckets x 5 event types, median of", RUNS)
    print("| variant | median | vs baseline |")
    print("|---|---|---|")
    print(f"| one round trip per series (no pipeline) | {base:.1f} ms | 1.0× |")
    print(f"| wikipulse: one pipelined round trip | {mine:.1f} ms | {base / mine:.1f}× faster |")


if __name__ == "__main__":
    main()
