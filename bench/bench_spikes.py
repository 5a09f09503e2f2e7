#!/usr/bin/env python3
"""Spike alerts: false alerts over a day of the usual mix, and how soon an injected spike is alerted, live.

`pipenv run python -m bench.bench_spikes [--hours H] [--domain D]`

1. False alerts: H hours (default 24) of simulated events at the live rate (35/s, the feed's domain mix) are
   counted per domain and minute, and every minute is judged by the watch's own rule (spikes.judge), as the
   subscriber would judge it. Side by side: the same day with one injected spike (D at 20x for two minutes),
   which must give exactly one alert.
2. Detection delay, on the real pipeline: 15 minutes of history are loaded into a real Redis's stream, then
   `subscriber.py` and `publisher.py` run as processes against `python -m wikipulse simulate --rate 35 --spike
   D@60` (D at 20x its rate from 60 s after the feed's first event). The delay is the wall time from the
   spike's start to the alert's PUBLISH on keys.ALERTS_CHANNEL.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import orjson
import redis

from wikipulse.core.summary import summary_of
from wikipulse.devtools.eventstreams import PATH
from wikipulse.devtools.redis_server import RedisServer, free_port
from wikipulse.devtools.simulate import SimulatedSpike, Simulator
from wikipulse.fold.spikes import judge
from wikipulse.store import keys

ROOT = Path(__file__).resolve().parents[1]


def minute_counts(sim: Simulator, n: int) -> dict[int, Counter[str]]:
    counts: dict[int, Counter[str]] = {}
    for i in range(n):
        e = sim.event(i)
        if e["meta"]["domain"] != "canary":
            counts.setdefault(e["timestamp"] // 60 * 60, Counter())[e["meta"]["domain"]] += 1
    return counts


def false_alerts(hours: float, domain: str) -> None:
    n = int(hours * 3600 * 35)
    rows = []
    for name, spike in (("the usual mix", None), (f"with a spike on {domain}", SimulatedSpike(domain, 12 * 3600 + 17))):
        started = time.perf_counter()
        sim = Simulator(seed=31, start=0, canary_every=0, spike=spike)
        counts = minute_counts(sim, sim.index_at(hours * 3600))
        minutes = sorted(counts)
        alerts = [a for m in minutes[1:] for a in judge(counts, m)]
        judged = sum(len(counts[m]) for m in minutes)
        rows.append((name, len(minutes), judged, alerts))
        print(f"{name}: {len(minutes)} minutes, {judged:,} domain-minutes judged, {len(alerts)} alerts "
              f"({time.perf_counter() - started:.0f} s)", flush=True)  # fmt: skip
    print(f"\n{hours:g} h of simulated events at 35/s ({n:,}), every closed minute judged")
    print("| feed | minutes | domain-minutes judged | alerts |")
    print("|---|---|---|---|")
    for name, n_minutes, judged, found in rows:
        said = ", ".join(f"{a.domain} at {a.minute - 12 * 3600:+d} s ({a.rate}/min vs {a.baseline:.0f})" for a in found)
        print(f"| {name} | {n_minutes:,} | {judged:,} | {len(found)}{': ' + said if said else ''} |")


def detection_delay(domain: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        server = RedisServer(workdir / "redis", appendonly=False).start()
        processes: list[subprocess.Popen[bytes]] = []
        try:
            client = redis.Redis.from_url(server.url)
            now = time.time()
            history = Simulator(seed=41, start=now - 900, canary_every=0)
            pipe = client.pipeline(transaction=False)
            for i in range(history.index_at(now - 3)):
                e = history.event(i)
                pipe.xadd("wiki:events", {keys.DATA_FIELD: orjson.dumps(e), keys.FOLD_FIELD: summary_of(e)})
            pipe.execute()
            alerts = client.pubsub()
            alerts.subscribe(keys.ALERTS_CHANNEL)
            port = free_port()
            env = {**os.environ, "REDIS_URL": server.url, "WIKI_STREAM_URL": f"http://127.0.0.1:{port}{PATH}", "LOG_LEVEL": "WARNING"}
            feed = [
                sys.executable,
                "-m",
                "wikipulse",
                "simulate",
                "--rate",
                "35",
                "--port",
                str(port),
                "--seed",
                "42",
                "--spike",
                f"{domain}@60",
            ]
            started = time.time()
            processes.append(subprocess.Popen(feed, env=env, cwd=ROOT, stdin=subprocess.DEVNULL))
            spike_at = started - 3 + 60  # the feed starts 3 s back (cli.make_simulator); the spike 60 s after its first event
            for name in ("subscriber", "publisher"):
                processes.append(subprocess.Popen([sys.executable, str(ROOT / f"{name}.py")], env=env, cwd=ROOT, stdin=subprocess.DEVNULL))
            received = []
            while time.time() < spike_at + 240:
                message = alerts.get_message(ignore_subscribe_messages=True, timeout=1.0)
                if message:
                    received.append((time.time(), orjson.loads(message["data"])))
                    print(f"alert after {received[-1][0] - spike_at:.1f} s: {received[-1][1]}", flush=True)
            print(f"\ndetection delay on the real pipeline ({domain} at 20x for 2 min, from 60 s after the feed's start)")
            print("| alerts | for the spiked wiki | first alert after the spike began |")
            print("|---|---|---|")
            mine = [(t, a) for t, a in received if a["domain"] == domain]
            delay = f"{mine[0][0] - spike_at:.1f} s" if mine else "none"
            print(f"| {len(received)} | {len(mine)} | {delay} |")
        finally:
            for p in processes:
                p.terminate()
            for p in processes:
                p.wait(10)
            server.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hours", type=float, default=24.0)
    parser.add_argument("--domain", default="en.wikipedia.org")
    parser.add_argument("--skip-live", action="store_true", help="only the false-alert count")
    args = parser.parse_args()
    false_alerts(args.hours, args.domain)
    if not args.skip_live:
        detection_delay(args.domain)


if __name__ == "__main__":
    main()
