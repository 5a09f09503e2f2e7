#!/usr/bin/env python3
"""What routes cost the pipeline, side by side in one run: the tree without routes, this tree with none, with three.

`pipenv run python -m bench.bench_routes --base DIR [--events N] [--rounds R]`: DIR is a checkout of the tree before
routes (`git worktree add /tmp/base 4f2c406`). Each run starts from an empty Redis: the local EventStreams server
(its own process, full speed) feeds publisher.py, and subscriber.py folds, both real processes of the tree measured;
with routes, the copier runs in the publisher's process, as deployed. The publisher's rate is N over the time between
the stream's first and last entry (their ids are Redis's clock); the fold's, N over the time from the first entry to
the moment the subscriber had folded all N. The variants take turns; reported are the medians, and the paired medians (each
round's ratio to the base tree's run of the same round: rounds swing together on a shared machine).

`--compare DIR` runs another checkout with routes (e.g. main) with three routes too; `--commands` prints Redis's time
an event in each command and script (INFO commandstats, reset at each run); `--profile DIR` runs the publisher under
cProfile (a profile a run: it costs the process about twice its CPU). The load average is printed at each run.
bench/route_copier_alone.py measures the copier alone, without the other processes competing for the cores.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import redis
import redis.asyncio as aioredis

from bench.common import redis_server, replay_server, write_events
from wikipulse.core.settings import Settings
from wikipulse.ingest.routes import add_route
from wikipulse.store import keys

ROOT = Path(__file__).resolve().parents[1]
ROUTES = {  # three slices of different sizes: a wiki's humans, the page creations and logs, the bots' articles
    "enwiki-humans": ["domain=en.wikipedia.org", "bot=false"],
    "creations": ["type=new,log"],
    "bot-articles": ["bot=true", "namespace=0"],
}


def _cpu(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def _redis_cpu(client: redis.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def copier_done(client: redis.Redis, n: int) -> bool:
    """Whether the copier's group has been delivered and has acknowledged all n entries."""
    if client.xlen("wiki:events") < n:
        return False
    group = {g["name"]: g for g in client.xinfo_groups("wiki:events")}.get(keys.ROUTES_GROUP.encode())
    last = client.xinfo_stream("wiki:events")["last-generated-id"]
    return group is not None and group["pending"] == 0 and group["last-delivered-id"] == last


def _commandstats(client: redis.Redis) -> dict[str, tuple[float, int]]:
    """{command or script: (usec Redis spent in it so far, calls)} (INFO commandstats)."""
    return {name.removeprefix("cmdstat_"): (float(v["usec"]), int(v["calls"])) for name, v in client.info("commandstats").items()}


def run_once(tree: Path, redis_url: str, feed: str, n: int, routes: bool, profile: Path | None = None) -> dict[str, float]:
    client = redis.Redis.from_url(redis_url)
    client.flushall()
    client.config_resetstat()
    if routes:
        settings = Settings.from_args(environ={}, redis_url=redis_url)

        async def declare() -> None:
            async with aioredis.Redis.from_url(redis_url) as c:
                for name, where in ROUTES.items():
                    await add_route(c, settings, name, where, from_stream=False)

        asyncio.run(declare())
    env = {**os.environ, "REDIS_URL": redis_url, "WIKI_STREAM_URL": feed, "LOG_LEVEL": "WARNING", "CONSUMER_NAME": "bench",
           "STATS_INTERVAL": "3600", "PYTHONPATH": str(tree)}  # fmt: skip
    # --profile: the publisher under cProfile (it dumps its profile at the clean stop); it costs the process ~2x
    run_publisher = ["-m", "cProfile", "-o", str(profile)] if profile else []
    commands = [[sys.executable, str(tree / "subscriber.py")], [sys.executable, *run_publisher, str(tree / "publisher.py")]]
    procs = [subprocess.Popen(c, cwd=tree, env=env, stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for c in commands]
    redis_cpu = _redis_cpu(client)
    try:
        folded_at = copied_at = 0.0
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            now = time.time()
            if not folded_at and int(client.hget(keys.SUBSCRIBER_STATS, "folded") or 0) >= n:
                folded_at = now
            if routes and not copied_at and copier_done(client, n):
                copied_at = now
            if folded_at and (copied_at or not routes):
                break
            time.sleep(0.005)
        else:
            raise RuntimeError("the pipeline did not finish in 300 s")
        cpu = [_cpu(p.pid) for p in procs]  # before the stop: what the run took, not the shutdown
        redis_cpu = _redis_cpu(client) - redis_cpu
        spent = _commandstats(client)
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(30)
    first, last = (
        int(e[0][0].split(b"-")[0]) / 1000 for e in (client.xrange("wiki:events", count=1), client.xrevrange("wiki:events", count=1))
    )
    out = {"publisher": n / (last - first), "fold": n / (folded_at - first)}
    # CPU time an event: what contention on a shared machine does not change much (the rates above it does)
    out.update(subscriber_us=cpu[0] / n * 1e6, publisher_us=cpu[1] / n * 1e6, redis_us=redis_cpu / n * 1e6)
    out.update({f"cmd:{name}": usec / n for name, (usec, _) in spent.items()})  # µs an event in each command
    # The copier's waits: its blocking XREADs (nothing else in the pipeline sends XREAD), and the publisher's writes
    out.update(waits=spent.get("xread", (0, 0))[1], writes=spent.get("evalsha", (0, 0))[1])
    if routes:
        out["copier"] = n / (copied_at - first)
        out["routed"] = sum(client.xlen(keys.Route(name).stream) for name in ROUTES)
    client.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base", type=Path, required=True, help="a checkout of the tree before routes")
    parser.add_argument("--compare", type=Path, help="another checkout with routes (e.g. main), run with three routes too")
    parser.add_argument("--events", type=int, default=60_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--commands", action="store_true", help="print Redis's time an event in each command (commandstats)")
    parser.add_argument("--profile", type=Path, help="a directory: run the publisher under cProfile, a profile a run")
    args = parser.parse_args()
    variants = [("before routes (base tree)", args.base.resolve(), False), ("routes, none declared", ROOT, False),
                ("routes, three declared", ROOT, True)]  # fmt: skip
    if args.compare:
        variants.insert(2, (f"{args.compare.name}, three declared", args.compare.resolve(), True))
    results: dict[str, list[dict[str, float]]] = {name: [] for name, _, _ in variants}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "events.ndjson"
        write_events(path, args.events)
        with redis_server() as server, replay_server(path) as feed:
            for r in range(args.rounds):
                order = variants if r % 2 == 0 else variants[::-1]
                for name, tree, routes in order:
                    load = Path("/proc/loadavg").read_text().split()[0]
                    profile = args.profile / f"r{r + 1}-v{variants.index((name, tree, routes))}.prof" if args.profile else None
                    results[name].append(run_once(tree, server.url, feed, args.events, routes, profile))
                    shown = {key: round(v, 1) for key, v in results[name][-1].items() if not key.startswith("cmd:")}
                    print(f"round {r + 1}: {name} (load {load}): {shown}", flush=True)
    print(f"\nroutes: {args.events:,} events, local SSE -> publisher.py (+ copier) -> subscriber.py, medians of {args.rounds}")
    print("| variant | publisher events/s | vs before | fold events/s | vs before | publisher CPU µs/event | vs before |"
          " subscriber CPU µs/event | Redis CPU µs/event | vs before | copier events/s |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|")

    def median(name: str, key: str) -> float:
        return statistics.median(x.get(key, 0.0) for x in results[name])

    b = variants[0][0]
    for name, _, routes in variants:
        copier = f"{median(name, 'copier'):,.0f}" if routes else "-"
        pub, fold, cpu, rcpu = (median(name, key) for key in ("publisher", "fold", "publisher_us", "redis_us"))
        print(f"| {name} | {pub:,.0f} | {pub / median(b, 'publisher'):.2f}× | {fold:,.0f} | {fold / median(b, 'fold'):.2f}× "
              f"| {cpu:.1f} | {cpu / median(b, 'publisher_us'):.2f}× | {median(name, 'subscriber_us'):.1f} "
              f"| {rcpu:.1f} | {rcpu / median(b, 'redis_us'):.2f}× | {copier} |")  # fmt: skip
    # Paired: each round's ratio to the base tree's run of the same round, then their median (rounds swing together).
    print("\npaired (median of the per-round ratios to the base run of the same round):")
    print("| variant | publisher rate | fold rate | publisher CPU an event | Redis CPU an event | publisher rate, min–max |")
    print("|---|---|---|---|---|---|")
    for name, _, _ in variants[1:]:
        ratios = {key: [x[key] / y[key] for x, y in zip(results[name], results[b], strict=True)]
                  for key in ("publisher", "fold", "publisher_us", "redis_us")}  # fmt: skip
        rates = ratios["publisher"]
        medians = " | ".join(f"{statistics.median(v):.3f}×" for v in ratios.values())
        print(f"| {name} | {medians} | {min(rates):.2f}–{max(rates):.2f} |")
    routed = results[variants[-1][0]][-1]["routed"]
    print(f"\nthe three routes hold {routed:,.0f} entries ({routed / args.events:.0%} of the events)")
    if args.commands:
        names = sorted({k for rs in results.values() for x in rs for k in x if k.startswith("cmd:")})
        names.sort(key=lambda k: -max(median(v, k) for v, _, _ in variants))
        print("\nRedis µs an event in each command (INFO commandstats, medians):")
        print("| command | " + " | ".join(v for v, _, _ in variants) + " |")
        print("|---|" + "---|" * len(variants))
        for k in names:
            if max(median(v, k) for v, _, _ in variants) >= 0.05:
                print(f"| {k[4:]} | " + " | ".join(f"{median(v, k):.2f}" for v, _, _ in variants) + " |")
        print("\nthe copier's waits (XREAD) and the publisher's writes (EVALSHA) a run, medians:")
        for name, _, routes in variants:
            if routes:
                print(f"  {name}: {median(name, 'waits'):.0f} waits, {median(name, 'writes'):.0f} writes")


if __name__ == "__main__":
    main()
