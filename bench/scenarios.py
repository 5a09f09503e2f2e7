#!/usr/bin/env python3
"""Fault scenarios, end to end: the real processes, a real Redis (AOF on), the local EventStreams server.

`pipenv run python -m bench.scenarios [NAME ...] [--events N] [--soak-minutes M] [--out DIR]`

Each scenario writes seeded simulated events to a file, serves them with `python -m wikipulse replay`
(with its fault options), runs `publisher.py` and `subscriber.py` as separate processes, injects its
faults while the events flow, waits for the pipeline to settle, and then compares what Redis holds with
an independent reference fold of the events that were sent (wikipulse/devtools/reference.py, the time
series and the trending and new-pages keys): nothing lost, nothing counted twice. The soak samples
Redis memory and every process's RSS each 10 s, with short retentions and a short stream so that the steady state is reached within the run.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import psutil
import redis
import redis.cluster
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

from bench.common import write_events
from wikipulse.devtools.eventstreams import PATH
from wikipulse.devtools.redis_server import LocalCluster, RedisServer, free_port
from wikipulse.devtools.reference import as_reference, reference_fold, reference_trending, stored_trending
from wikipulse.store import keys
from wikipulse.store.status import decode_hash
from wikipulse.store.trimming import trimmed_unread

ROOT = Path(__file__).resolve().parents[1]
SETTLE_TIMEOUT = 120.0  # seconds without progress before a scenario gives up


@dataclass
class Scenario:
    name: str
    events: int
    rate: float = 0.0  # events/s from the feed; 0 = as fast as the publisher reads
    drop_every: int = 0
    overlap: int = 0
    malformed_every: int = 0
    kill_publisher: int = 0  # SIGKILL and restart, spread evenly over the run
    kill_subscriber: int = 0
    restart_redis: bool = False
    soak_seconds: float = 0.0
    env: dict[str, str] = field(default_factory=dict)
    publishers: int = 1  # more than one: an operator's mistake; the others stand by (their lease)
    subscribers: int = 1
    subscriber_late: bool = False  # started only once every event is published (a stopped consumer)
    full_seconds: float = 0.0  # Redis is full (maxmemory reached) this long, from 30% of the run
    masters: int = 0  # > 0: a real Redis Cluster of that many masters instead of one Redis
    shards: int = 1
    subscriber_shards: tuple[str, ...] = ()  # one subscriber process per item, folding those shards (SUBSCRIBER_SHARDS)

    @property
    def layout(self) -> keys.Layout:
        return keys.Layout("wiki:events", self.shards, self.masters > 0)


def scenarios(events: int, soak_minutes: float) -> dict[str, Scenario]:
    short = {"RETENTION": "10s=2m,1m=5m,1h=1h", "STREAM_MAXLEN": "50000"}  # steady state within ~20 min
    soak = Scenario("soak", int(soak_minutes * 60 * 1000), rate=1000, soak_seconds=soak_minutes * 60, env=short)
    return {
        s.name: s
        for s in (
            Scenario("burst", events),
            Scenario("drops", events // 4, drop_every=1000, overlap=100),
            Scenario("kills", events // 4, rate=4000, kill_publisher=3, kill_subscriber=5),
            Scenario("redis-restart", events // 4, rate=4000, restart_redis=True),
            Scenario("malformed", events // 4, malformed_every=100),
            *operator_mistakes(events // 4),
            *cluster_scenarios(events // 4),
            soak,
        )
    }


def operator_mistakes(events: int) -> tuple[Scenario, ...]:
    """The mistakes real operators make (issue: hold under them), each with nothing lost silently and nothing doubled."""
    return (
        # Started twice on one Redis and feed; the first is killed mid-run, the second takes over from its position.
        Scenario("second-publisher", events, rate=4000, publishers=2, kill_publisher=1, env={"LEASE_TTL": "2"}),
        # Two subscribers on one host with the default consumer name (the host name), one of them killed twice.
        Scenario("name-clash", events, rate=4000, subscribers=2, kill_subscriber=2, env={"CONSUMER_NAME": "", "LEASE_TTL": "2"}),
        # The subscriber is stopped while the publisher writes past STREAM_MAXLEN: the trimmed entries are counted.
        Scenario("trimmed-unread", events, subscriber_late=True, env={"STREAM_MAXLEN": str(events // 5)}),
        # Redis reaches maxmemory (noeviction) for 5 s mid-run, then the operator frees memory.
        Scenario("redis-full", events, rate=4000, full_seconds=5.0),
    )


def cluster_scenarios(events: int) -> tuple[Scenario, ...]:
    """On a real 3-master Redis Cluster with 3 shards, one subscriber process per shard (issue: scale out)."""
    c: dict[str, Any] = {"masters": 3, "shards": 3, "subscriber_shards": ("0", "1", "2")}
    return (
        Scenario("cluster-burst", events * 2, **c),
        Scenario("cluster-drops", events, drop_every=1000, overlap=100, **c),
        # The publisher (and its router) killed 3 times, the shard consumers 5 times in turn.
        Scenario("cluster-kills", events, rate=1000, kill_publisher=3, kill_subscriber=5, **c),
        # The master holding the ingest stream and the publisher's keys is restarted (AOF on) mid-run.
        Scenario("cluster-master-restart", events, rate=1000, restart_redis=True, **c),
    )


@dataclass
class Result:
    name: str
    sent: int
    in_stream: int = 0
    counted: int = 0
    lost: int = 0
    duplicated: int = 0
    exact: bool = False
    trending_exact: bool = False  # the trending and new-pages keys equal their reference
    rejected: int = 0
    faults: int = 0  # injected
    trimmed_unread: int = 0  # entries trimmed before the subscriber read them: counted, not silent
    seconds: float = 0.0
    samples: list[dict[str, float]] = field(default_factory=list)


class Pipeline:
    """The feed, the publisher and the subscriber as processes, against one Redis."""

    def __init__(self, scenario: Scenario, events_file: Path, workdir: Path) -> None:
        self.scenario, self.workdir = scenario, workdir
        self.redis: RedisServer | LocalCluster = (
            LocalCluster(workdir / "cluster", scenario.masters) if scenario.masters else RedisServer(workdir / "redis", appendonly=True)
        )
        self.feed_port = free_port()
        self.events_file = events_file
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.logs: list[Any] = []

    @property
    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "REDIS_URL": self.redis.url,
            "WIKI_STREAM_URL": f"http://127.0.0.1:{self.feed_port}{PATH}",
            "WIKI_BACKOFF_CAP": "1",
            "CONSUMER_NAME": "scenario",
            "CLAIM_IDLE": "5",
            "LOG_LEVEL": "WARNING",
            "SHARDS": str(self.scenario.shards),
            # No archiver runs here, so its group is not declared; a small window, so every scenario trims what the
            # groups acknowledged (trimming.py) while it injects its faults.
            "STREAM_CONSUMERS": "subscriber",
            "STREAM_KEEP": "1000",
            **self.scenario.env,
        }

    def command(self, name: str) -> list[str]:
        s = self.scenario
        if name == "feed" and s.soak_seconds:
            # Simulated on the fly and stamped at the serving rate, so event time keeps pace with the
            # clock for the whole soak (the same seed and count each run; no file of millions of events).
            return [sys.executable, "-m", "wikipulse", "simulate", "--rate", str(s.rate), "--count", str(s.events),
                    "--seed", "11", "--start", str(time.time() + 1), "--port", str(self.feed_port)]  # fmt: skip
        if name == "feed":
            return [sys.executable, "-m", "wikipulse", "replay", str(self.events_file), "--port", str(self.feed_port),
                    "--rate", str(s.rate), "--drop-every", str(s.drop_every), "--overlap", str(s.overlap),
                    "--malformed-every", str(s.malformed_every)]  # fmt: skip
        return [sys.executable, str(ROOT / f"{name.partition('-')[0]}.py")]  # publisher-2 runs publisher.py

    def start(self, name: str) -> None:
        log = (self.workdir / f"{name}.log").open("ab")
        self.logs.append(log)
        cmd = self.command(name)
        env = {**self.env, **self.extra_env.get(name, {})}
        self.processes[name] = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=log, stdin=subprocess.DEVNULL)

    @property
    def subscriber_names(self) -> list[str]:
        n = len(self.scenario.subscriber_shards) or self.scenario.subscribers
        return ["subscriber" if i == 1 else f"subscriber-{i}" for i in range(1, n + 1)]

    @property
    def extra_env(self) -> dict[str, dict[str, str]]:
        shards = self.scenario.subscriber_shards
        return {name: {"SUBSCRIBER_SHARDS": picked} for name, picked in zip(self.subscriber_names, shards, strict=False)}

    def start_subscribers(self) -> None:
        for name in self.subscriber_names:
            self.start(name)

    def client(self) -> Any:
        """A blocking client of the Redis or the cluster."""
        if isinstance(self.redis, LocalCluster):
            return redis.cluster.RedisCluster.from_url(self.redis.url, socket_timeout=5)
        return redis.Redis.from_url(self.redis.url, socket_timeout=5)

    def kill(self, name: str) -> None:
        """SIGKILL, as a crash would, then start it again."""
        self.processes[name].send_signal(signal.SIGKILL)
        self.processes[name].wait()
        self.start(name)

    def fill_redis(self, seconds: float) -> None:
        """Redis at maxmemory (noeviction) for `seconds`, then the operator frees memory."""
        client = redis.Redis.from_url(self.redis.url)
        client.config_set("maxmemory", int(client.info("memory")["used_memory"]) + 200_000)
        time.sleep(seconds)
        client.config_set("maxmemory", 0)
        client.close()

    def restart_redis(self) -> None:
        if isinstance(self.redis, LocalCluster):
            # The master that holds the ingest stream (and the publisher's keys): the one whose loss hurts most.
            slot = key_slot(self.scenario.layout.stream.encode())
            self.redis.restart(slot * len(self.redis.nodes) // REDIS_CLUSTER_HASH_SLOTS, down=2)
            return
        self.redis.stop()  # SIGTERM: Redis writes its AOF and exits; the pipeline sees it go away
        time.sleep(2)
        self.redis.start()

    def rss(self) -> dict[str, float]:
        out = {}
        for name, p in self.processes.items():
            with contextlib.suppress(psutil.Error):
                out[f"{name}_rss_mb"] = psutil.Process(p.pid).memory_info().rss / 1e6
        if isinstance(self.redis, RedisServer) and self.redis.process is not None:
            with contextlib.suppress(psutil.Error):
                out["redis_rss_mb"] = psutil.Process(self.redis.process.pid).memory_info().rss / 1e6
        return out

    @contextlib.contextmanager
    def running(self) -> Iterator[Pipeline]:
        self.redis.start()
        s = self.scenario
        try:
            self.start("feed")
            if s.subscriber_late:  # the subscriber ran once (its group exists), then stopped
                with redis.Redis.from_url(self.redis.url) as client:
                    client.xgroup_create("wiki:events", "wikipulse", id="0", mkstream=True)
            for n in range(1, s.publishers + 1):
                self.start("publisher" if n == 1 else f"publisher-{n}")
            if not s.subscriber_late:
                self.start_subscribers()
            yield self
        finally:
            for p in self.processes.values():
                p.send_signal(signal.SIGTERM)
            for p in self.processes.values():
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()  # reaped: a Popen collected while its process runs is a ResourceWarning (an error in the tests)
            for log in self.logs:
                log.close()
            self.redis.stop()


def stat(client: redis.Redis, key: str, name: str) -> int:
    with contextlib.suppress(redis.RedisError):
        return int(client.hget(key, name) or 0)
    return -1  # Redis is restarting


def folded(client: redis.Redis, layout: keys.Layout) -> int:
    """Folded by every shard, plus what the subscribers' group lost to trimming (counted apart)."""
    counts = [stat(client, shard.stats, "folded") for shard in layout.all_shards]
    return -1 if -1 in counts else sum(counts) + trimmed(client, layout)


def run(scenario: Scenario, out: Path) -> Result:
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        events_file = workdir / "events.ndjson"
        sent: list[dict[str, Any]] = []
        if scenario.soak_seconds:  # simulated by the feed itself; one canary per 126,000 events is dropped
            result = Result(scenario.name, scenario.events - scenario.events // 126_000)
        else:
            write_events(events_file, scenario.events, seed=11, start=time.time() - scenario.events / 35)
            events = [orjson.loads(line) for line in events_file.read_bytes().splitlines()]
            sent = [e for e in events if e["meta"]["domain"] != "canary"]
            result = Result(scenario.name, len(sent))
        pipeline = Pipeline(scenario, events_file, workdir)
        started = time.monotonic()
        with pipeline.running():
            drive(pipeline, scenario, result, result.sent)
            result.seconds = time.monotonic() - started
            (compare_soak if scenario.soak_seconds else compare)(pipeline.client(), sent, result, scenario.layout)
        for name in ("publisher", *pipeline.subscriber_names, "feed"):
            log = (workdir / f"{name}.log").read_text(errors="replace")
            (out / f"{scenario.name}-{name}.log").write_text(log[-20_000:])
    return result


def drive(pipeline: Pipeline, scenario: Scenario, result: Result, expected: int) -> None:
    """Inject the faults at evenly spread points of the run, then wait until everything is folded."""
    client = pipeline.client()
    layout = scenario.layout
    subscribers = pipeline.subscriber_names
    faults = [(i / (scenario.kill_publisher + 1), "publisher") for i in range(1, scenario.kill_publisher + 1)]
    faults += [
        (i / (scenario.kill_subscriber + 1) + 0.03, subscribers[i % len(subscribers)]) for i in range(1, scenario.kill_subscriber + 1)
    ]
    faults += [(0.5, "redis")] if scenario.restart_redis else []
    faults += [(0.3, "full")] if scenario.full_seconds else []
    faults += [(1.0, "late subscriber")] if scenario.subscriber_late else []
    faults.sort()
    progress, last_change, next_sample = (-1, -1), time.monotonic(), 0.0
    started = time.monotonic()
    while True:
        published = stat(client, layout.publisher.stats, "published")
        now_folded = folded(client, layout)
        while faults and published >= faults[0][0] * expected:
            _, what = faults.pop(0)
            result.faults += 1
            print(f"  {scenario.name}: {what} fault at {published:,} published", flush=True)
            if what == "redis":
                pipeline.restart_redis()
                client = pipeline.client()
            elif what == "full":
                pipeline.fill_redis(scenario.full_seconds)
            elif what == "late subscriber":
                time.sleep(1)  # the last batches land
                pipeline.start_subscribers()
            else:
                pipeline.kill(what)
        if scenario.soak_seconds and time.monotonic() >= next_sample:
            next_sample = time.monotonic() + 10
            sample = {"t": round(time.monotonic() - started, 1), "published": published, "folded": now_folded}
            with contextlib.suppress(redis.RedisError):
                sample["redis_used_mb"] = int(client.info("memory")["used_memory"]) / 1e6
            result.samples.append({**sample, **pipeline.rss()})
        if (published, now_folded) != progress:
            progress, last_change = (published, now_folded), time.monotonic()
        done = now_folded >= expected and not faults and time.monotonic() - started >= scenario.soak_seconds
        if done or time.monotonic() - last_change > SETTLE_TIMEOUT:
            time.sleep(1)  # anything still in flight (a duplicate would show up now)
            return
        time.sleep(0.2)


def trimmed(client: redis.Redis, layout: keys.Layout) -> int:
    """Entries trimmed before the subscribers' group read them; sharded, also those trimmed before they were routed."""
    with contextlib.suppress(redis.RedisError):
        if not layout.sharded:
            return sum(trimmed_unread(decode_hash(client.hgetall(layout.publisher.stats))).values())
        ingest = trimmed_unread(decode_hash(client.hgetall(layout.publisher.stats))).get(layout.router_group, 0)
        return ingest + sum(trimmed_unread(decode_hash(client.hgetall(s.router_stats))).get("wikipulse", 0) for s in layout.all_shards)
    return 0


def compare(client: redis.Redis, sent: list[dict[str, Any]], result: Result, layout: keys.Layout) -> None:
    ids = Counter(orjson.loads(fields[b"data"])["meta"]["id"] for _, fields in client.xrange("wiki:events"))
    assert not ids or max(ids.values()) == 1, "an event is in the stream twice"
    result.trimmed_unread = trimmed(client, layout)
    # What the publisher added: the stream holds only what some group has not acknowledged yet, and a window.
    result.in_stream = int(client.hget(layout.publisher.stats, "published") or 0)
    series = list(client.scan_iter(match=f"{keys.PREFIX}:ts:*", count=1000))
    stored = {(key, fld): n for key in series for fld, n in client.hgetall(key).items()}
    got = as_reference(stored)
    misplaced = [key for key in series if not in_its_shard(key.decode(), layout)]
    assert not misplaced, f"series outside their domain's shard: {misplaced[:5]}"
    # The stream is first in, first out: what was trimmed unread are the oldest events; the rest must be exact.
    expected = reference_fold(sent[result.trimmed_unread :], time.time())
    # Event-level figures from the all-domain totals at 1 min (kept by every scenario's retention).
    minute = {k for k in expected if k[0] == keys.ALL_DOMAINS and k[1] == "1m" and k[3] == ""}
    result.counted = sum(got[k] for k in minute)
    result.lost = sum(max(0, expected[k] - got[k]) for k in minute)  # lost silently: the trimmed ones are counted
    result.duplicated = sum(max(0, got[k] - expected[k]) for k in minute)
    result.exact = got == expected
    expected_pages = reference_trending(sent[result.trimmed_unread :], layout)
    result.trending_exact = bool(expected_pages) and stored_trending(client) == expected_pages
    result.rejected = sum(int(v) for k, v in client.hgetall(layout.publisher.stats).items() if k.startswith(b"rejected:"))


def in_its_shard(key: str, layout: keys.Layout) -> bool:
    """Whether a series key lives where readers look for it: its domain's shard (any shard for _all and _other)."""
    if not layout.sharded:
        return True
    _, _, tag, domain, *_ = key.split(":")
    tags = {s.tag for s in layout.shards_holding(domain)}
    return tag.strip("{}") in tags


def compare_soak(client: redis.Redis, _sent: list[dict[str, Any]], result: Result, layout: keys.Layout) -> None:
    """With short retentions the old buckets are gone by design: compare the subscriber's count instead."""
    folded = sum(int(client.hget(shard.stats, "folded") or 0) for shard in layout.all_shards)
    result.in_stream = int(client.hget(layout.publisher.stats, "published") or 0)
    result.counted = folded
    result.lost, result.duplicated = max(0, result.sent - folded), max(0, folded - result.sent)
    result.exact = folded == result.sent == result.in_stream


def write_samples(result: Result, out: Path) -> Path:
    path = out / f"{result.name}-memory.csv"
    names = sorted({k for s in result.samples for k in s})
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=names)
        writer.writeheader()
        writer.writerows(result.samples)
    return path


def plot_samples(result: Result, out: Path) -> Path | None:
    """The soak's memory curves as a PNG, drawn by plotly.js in headless Chromium (no extra dependency)."""
    import plotly
    from playwright.sync_api import sync_playwright

    chromium = "/usr/bin/chromium"
    if not Path(chromium).exists():
        return None
    minutes = [s["t"] / 60 for s in result.samples]
    series = sorted({k for s in result.samples for k in s if k.endswith("_mb")})
    traces = [{"x": minutes, "y": [s.get(name) for s in result.samples], "name": name, "mode": "lines"} for name in series]
    layout = {"title": {"text": f"soak: {result.sent:,} events at 1,000/s"}, "xaxis": {"title": {"text": "minutes"}},
              "yaxis": {"title": {"text": "MB"}, "rangemode": "tozero"}, "width": 900, "height": 420}  # fmt: skip
    script = (Path(plotly.__file__).parent / "package_data" / "plotly.min.js").read_text()
    figure = f"Plotly.newPlot('g', {orjson.dumps(traces).decode()}, {orjson.dumps(layout).decode()})"
    html = f"<div id=g></div><script>{script}</script><script>{figure}</script>"
    path = out / f"{result.name}-memory.png"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        page = browser.new_page(viewport={"width": 920, "height": 440})
        page.set_content(html)
        page.wait_for_selector("#g .main-svg")
        page.locator("#g").screenshot(path=str(path))
        browser.close()
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="scenarios to run (default: all but soak)")
    parser.add_argument("--events", type=int, default=200_000, help="events of the burst; the others get a quarter")
    parser.add_argument("--soak-minutes", type=float, default=30.0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    table = scenarios(args.events, args.soak_minutes)
    names = args.names or [n for n in table if n != "soak"]
    results = []
    for name in names:
        print(f"running {name} ({table[name].events:,} events)", flush=True)
        results.append(run(table[name], args.out))
    print("\n| scenario | events sent | added to the stream | counted | trimmed unread (reported) | lost silently | duplicated "
          "| exact at every key | rejected frames | seconds |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        exact = "yes" if r.exact and (r.trending_exact or r.samples) else "NO"
        numbers = [f"{n:,}" for n in (r.sent, r.in_stream, r.counted, r.trimmed_unread, r.lost, r.duplicated)]
        cells = [r.name, *numbers, exact, f"{r.rejected:,}", f"{r.seconds:.0f}"]
        print("| " + " | ".join(cells) + " |")
        if r.samples:
            print(f"soak samples: {write_samples(r, args.out)}, plot: {plot_samples(r, args.out)}")
    sys.exit(0 if all(r.exact and (r.trending_exact or r.samples) for r in results) else 1)


if __name__ == "__main__":
    main()
