"""What an operator's Prometheus and orchestrator see, from a real dashboard process (`./dash_app.py`) against real
redis-servers: `/metrics` during a real pipeline run (publisher from a local EventStreams server, subscriber,
archiver) matches what was sent exactly; `/healthz` and `/readyz` through a Redis outage; the example alerting rules
name only what `/metrics` exposes; and `up` without a network says so once."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import orjson
import pytest
import redis
import redis.asyncio as aioredis
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests import helpers
from tests.conftest import ServeFn
from tests.helpers import calibrated_lines, run_publisher_until, stop, wait_for
from wikipulse.core.settings import Settings
from wikipulse.dashboard import operations
from wikipulse.dashboard.operations import readiness, registry_for
from wikipulse.dashboard.push import NoticeHub
from wikipulse.devtools.eventstreams import ReplaySource, ServerOptions
from wikipulse.devtools.redis_server import RedisServer, free_port
from wikipulse.fold.subscriber import Subscriber
from wikipulse.ingest.publisher import Publisher
from wikipulse.store import keys

ROOT = Path(__file__).resolve().parents[1]
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def start_dashboard(redis_url: str, port: int, log: Path) -> subprocess.Popen[bytes]:
    """`./dash_app.py` on `port`, once it answers /healthz (Redis need not answer)."""
    process: subprocess.Popen[bytes] = helpers.start_dashboard(redis_url, port, log, ready="/healthz", wait=60)
    return process


def stop_dashboard(process: subprocess.Popen[bytes], log: Path) -> None:
    process.terminate()
    assert process.wait(10) == 0
    output = log.read_text(errors="replace")
    assert "Traceback" not in output, output[-2000:]


def get(url: str) -> tuple[int, str, str]:
    """(status, content type, body) of a GET, whatever the status."""
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.headers["Content-Type"], resp.read().decode()
    except urllib.error.HTTPError as failure:
        with failure:
            return failure.code, failure.headers["Content-Type"], failure.read().decode()


def parse(text: str) -> Samples:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for family in text_string_to_metric_families(text) for s in family.samples}


def scrape(base: str) -> Samples:
    status, content_type, body = get(base + "/metrics")
    assert status == 200 and content_type.startswith("text/plain"), (status, content_type)
    return parse(body)


def exposed_names(text: str) -> dict[str, set[str]]:
    """Every name a PromQL expression may use -> the label names it carries: each sample's name, and a counter's
    `_total` name even before it has a sample (a family with no labels set yet)."""
    names: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        names.setdefault(family.name + ("_total" if family.type == "counter" else ""), set())
        for s in family.samples:
            names.setdefault(s.name, set()).update(s.labels)
    return names


@pytest.fixture(scope="module")
def ops_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("ops-redis")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def ops_dash(ops_redis: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("ops-dash") / "dash.log"
    port = free_port()
    process = start_dashboard(ops_redis.url, port, log)
    yield f"http://127.0.0.1:{port}"
    stop_dashboard(process, log)


# The feed of the pipeline test: 3,000 real-schema events (one a canary), 10 of them sent twice (a resume can
# re-deliver events), and 10 malformed frames of four kinds.
MALFORMED = {b"not json": "not_json", b"[1, 2]": "not_object", b'{"no": "meta"}': "missing_meta",
             b'{"meta": {"domain": "not a domain!"}}': "bad_domain"}  # fmt: skip
MALFORMED_SENT = [*[b"not json"] * 4, *[b"[1, 2]"] * 2, *[b'{"no": "meta"}'] * 2, *[b'{"meta": {"domain": "not a domain!"}}'] * 2]


def pipeline_feed() -> list[bytes]:
    events = list(calibrated_lines()[:3000])
    lines: list[bytes] = []
    for i, line in enumerate(events):
        lines.append(line)
        if i % 300 == 299:
            lines.append(events[i - 7])  # sent again
            lines.append(MALFORMED_SENT[i // 300])
    return lines


async def test_one_scrape_sees_the_whole_pipeline_exactly(ops_redis: RedisServer, ops_dash: str, eventstreams: ServeFn,
                                                          tmp_path: Path) -> None:  # fmt: skip
    pytest.importorskip("chdb")
    from wikipulse.archive.archiver import Archiver

    lines = pipeline_feed()
    events = [orjson.loads(line) for line in calibrated_lines()[:3000]]
    canaries = sum(e["meta"]["domain"] == "canary" for e in events)
    assert canaries == 1
    sent = len(events) - canaries  # what the stream, the fold and the archive must each hold once
    server, url = await eventstreams(ReplaySource(lines), ServerOptions(rate=1500))
    settings = Settings.from_args(
        environ={}, redis_url=ops_redis.url, stream_url=url, idle_timeout=5.0, backoff_cap=0.2, stats_interval=3600.0,
        consumer="ops-consumer", archive_dir=str(tmp_path / "clickhouse"), archive_port=free_port(), archive_from_stream=True,
    )  # fmt: skip
    scrapes: list[Samples] = []
    async with aioredis.Redis.from_url(ops_redis.url) as client, aiohttp.ClientSession() as session:
        await client.flushall()
        subscriber, archiver, publisher = Subscriber(settings, client), Archiver(settings, client), Publisher(settings, client, session)
        await subscriber.ensure_group()
        await archiver.ensure_group()
        tasks = [asyncio.create_task(role) for role in (subscriber.run_stream(), archiver.run(), publisher.run())]

        async def everything_through() -> bool:
            for task in tasks:
                if task.done():
                    task.result()
            scrapes.append(await asyncio.to_thread(scrape, ops_dash))
            m = scrapes[-1]
            return (m[("wikipulse_published_events_total", ())], m[("wikipulse_folded_events_total", ())],
                    m[("wikipulse_archived_events_total", ())]) == (sent, sent, sent)  # fmt: skip

        try:
            await wait_for(everything_through, 120, "every event published, folded and archived")
        finally:
            for task in reversed(tasks):
                await stop(task)
            await publisher.close()
            await asyncio.get_running_loop().run_in_executor(None, archiver.close)
    m = scrapes[-1]
    assert m[("wikipulse_redis_up", ())] == 1
    assert m[("wikipulse_duplicate_events_total", ())] == 10
    assert m[("wikipulse_canary_events_total", (("stage", "publisher"),))] == canaries
    rejected = Counter(MALFORMED[frame] for frame in MALFORMED_SENT)
    assert {labels: v for (name, labels), v in m.items() if name == "wikipulse_rejected_events_total"} == {
        (("reason", reason), ("stage", "publisher")): n for reason, n in rejected.items()
    }
    assert m[("wikipulse_stream_length", (("stream", "wiki:events"),))] == sent
    for group in ("wikipulse", "archiver"):
        assert m[("wikipulse_group_lag", (("group", group), ("stream", "wiki:events")))] == 0
        assert m[("wikipulse_group_pending", (("group", group), ("stream", "wiki:events")))] == 0
    assert not [k for k in m if k[0] == "wikipulse_trimmed_unread_events_total"]
    # The feed ends after its last event (the publisher then connects again and again, to no new event); no drops, so
    # that the duplicates are exactly those sent: a drop re-delivers what was read but not yet written, counted too.
    assert 1 <= m[("wikipulse_reconnects_total", ())] <= server.connections
    now = time.time()
    for role in ("publisher", "subscriber", "archiver"):
        assert m[("wikipulse_role_up", (("role", role),))] == 1
        assert now - 60 < m[("wikipulse_role_last_seen_timestamp_seconds", (("role", role),))] <= now
    assert now - 60 < m[("wikipulse_last_publish_timestamp_seconds", ())] <= now
    assert m[("wikipulse_ingest_lag_seconds", ())] > 0  # the events' meta.dt is in the past
    assert m[("wikipulse_push_pages", ())] == 0
    # Scraped while it ran: every counter only ever grew.
    for name in ("wikipulse_published_events_total", "wikipulse_folded_events_total", "wikipulse_archived_events_total"):
        values = [s.get((name, ()), 0) for s in scrapes]
        assert values == sorted(values), name
    # Stopped, the roles' leases are released: the next scrape says they are down.
    m = await asyncio.to_thread(scrape, ops_dash)
    assert [m[("wikipulse_role_up", (("role", role),))] for role in ("publisher", "subscriber", "archiver")] == [0, 0, 0]


def test_the_example_alerting_rules_name_only_what_metrics_exposes(ops_dash: str) -> None:
    status, _, text = get(ops_dash + "/metrics")
    assert status == 200
    exposed = exposed_names(text)
    rules = yaml.safe_load((ROOT / "docs" / "prometheus-alerts.yml").read_text())
    alerts = {}
    for group in rules["groups"]:
        for rule in group["rules"]:
            assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule
            assert rule["labels"]["severity"] in ("warning", "critical") and rule["annotations"]["summary"], rule["alert"]
            alerts[rule["alert"]] = rule["expr"]
            names = re.findall(r"\bwikipulse_[a-z_]+\b", rule["expr"])
            assert names, rule["alert"]
            assert set(names) <= set(exposed), (rule["alert"], set(names) - set(exposed))
            for name, matchers in re.findall(r"\b(wikipulse_[a-z_]+)\s*\{([^}]*)\}", rule["expr"]):
                assert set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers)) <= exposed[name] | {"job", "instance"}, rule["alert"]
    # What the issue asks the example to cover: lag growing, trimmed unread, a role not seen, the feed silent.
    assert {"WikipulseGroupLagGrowing", "WikipulseTrimmedUnread", "WikipulseRoleDown", "WikipulseRoleNotSeen",
            "WikipulseFeedSilent"} <= set(alerts)  # fmt: skip


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (Debian: apt-get install prometheus)")
def test_promtool_accepts_the_rules_and_the_scrape(ops_dash: str) -> None:
    """Beyond the pure check above, where Prometheus's own tool is at hand: the rules parse as PromQL, and the scrape
    passes its lint of the naming conventions (units, _total, no high-cardinality labels it can see)."""
    rules = subprocess.run(["promtool", "check", "rules", str(ROOT / "docs" / "prometheus-alerts.yml")], capture_output=True, text=True)
    assert rules.returncode == 0, rules.stdout + rules.stderr
    lint = subprocess.run(["promtool", "check", "metrics"], input=get(ops_dash + "/metrics")[2], capture_output=True, text=True)
    assert lint.returncode == 0 and not lint.stdout.strip() and not lint.stderr.strip(), lint.stdout + lint.stderr


def test_healthz_and_readyz_through_a_redis_outage(tmp_path: Path) -> None:
    redis_server = RedisServer(tmp_path / "redis")  # not started yet: the dashboard comes up first
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "dash.log"
    process = start_dashboard(redis_server.url, port, log)
    try:
        assert get(base + "/healthz") == (200, "text/plain; charset=utf-8", "ok\n")
        status, content_type, body = get(base + "/readyz")
        assert (status, content_type) == (503, "text/plain; charset=utf-8") and "Redis unreachable" in body, body
        assert scrape(base)[("wikipulse_redis_up", ())] == 0
        redis_server.start()
        assert ready_within(base, 10)
        assert scrape(base)[("wikipulse_redis_up", ())] == 1
        redis_server.stop()  # the outage
        status, _, body = get(base + "/readyz")
        assert status == 503 and "Redis unreachable" in body
        assert get(base + "/healthz")[0] == 200
        m = scrape(base)
        assert m[("wikipulse_redis_up", ())] == 0 and ("wikipulse_published_events_total", ()) not in m
        redis_server.start()  # back, on the same port
        assert ready_within(base, 10)
        for path in ("/healthz", "/readyz", "/metrics"):  # never the page's HTML (the catch-all)
            status, content_type, body = get(base + path)
            assert status == 200 and content_type.startswith("text/plain") and "<html" not in body.lower(), path
        assert "<html" in get(base + "/")[2].lower()  # the page itself is still there
    finally:
        stop_dashboard(process, log)
        redis_server.stop()


def ready_within(base: str, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while get(base + "/readyz")[0] != 200:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def test_not_ready_while_open_pages_have_no_notice_subscription(ops_redis: RedisServer) -> None:
    client = redis.Redis.from_url(ops_redis.url)
    hub = NoticeHub(ops_redis.url)
    assert readiness(client, hub) is None  # no page open: Redis answering is enough
    hub.pages = 1  # a page is open, and the hub's subscription is not running
    assert readiness(client, hub) == "the notice subscription is not held (resubscribing)"
    client.close()


def test_the_scrape_of_a_sharded_deployment_sums_its_shards(ops_redis: RedisServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two shards on one Redis (SHARDS=2; a cluster's layout): each shard's counters, stream, group and leases."""
    client = redis.Redis.from_url(ops_redis.url)
    client.flushall()
    layout = keys.Layout("wiki:events", shards=2)
    s0, s1 = layout.all_shards
    settings = Settings.from_args(environ={}, redis_url=ops_redis.url, shards=2)
    stats = {"published": 10, "rejected:not_json": 2, "trimmed_unread:wikipulse": 3, "trimmed_unread:archiver": 1, "updated_at": 1000.5}
    client.hset(layout.publisher.stats, mapping=stats)
    client.hset(s0.stats, mapping={"folded": 4, "rejected:bad_domain": 1, "updated_at": 990})
    client.hset(s1.stats, mapping={"folded": 6, "rejected:bad_domain": 2, "updated_at": 995})
    client.hset(s0.router_stats, mapping={"routed": 4, "trimmed_unread:wikipulse": 5})
    for shard in (s0, s1):
        for i in range(3):
            client.xadd(shard.stream, {"data": f"{i}"})
        client.xgroup_create(shard.stream, "wikipulse", id="0")
        client.set(shard.router_lease, "token")
    client.xreadgroup("wikipulse", "c0", {s0.stream: ">"}, count=1)  # shard 0: one delivered, unacknowledged
    for entry_id, _ in client.xreadgroup("wikipulse", "c1", {s1.stream: ">"})[0][1]:  # shard 1: all read and acknowledged
        client.xack(s1.stream, "wikipulse", entry_id)
    client.set(s0.consumer_lease("wikipulse", "c0"), "token")
    client.set(layout.publisher.lease, "token")
    registry = registry_for(client, layout, settings, NoticeHub(ops_redis.url))
    from prometheus_client import generate_latest

    m = parse(generate_latest(registry).decode())
    assert m[("wikipulse_published_events_total", ())] == 10 and m[("wikipulse_folded_events_total", ())] == 10
    assert m[("wikipulse_rejected_events_total", (("reason", "not_json"), ("stage", "publisher")))] == 2
    assert m[("wikipulse_rejected_events_total", (("reason", "bad_domain"), ("stage", "subscriber")))] == 3
    assert m[("wikipulse_trimmed_unread_events_total", (("group", "wikipulse"),))] == 8  # the ingest stream's and a shard's
    assert m[("wikipulse_trimmed_unread_events_total", (("group", "archiver"),))] == 1
    assert m[("wikipulse_stream_length", (("stream", s0.stream),))] == 3
    assert m[("wikipulse_stream_length", (("stream", "wiki:events"),))] == 0
    assert m[("wikipulse_group_lag", (("group", "wikipulse"), ("stream", s0.stream)))] == 2
    assert m[("wikipulse_group_pending", (("group", "wikipulse"), ("stream", s0.stream)))] == 1
    assert m[("wikipulse_group_lag", (("group", "wikipulse"), ("stream", s1.stream)))] == 0
    assert m[("wikipulse_role_last_seen_timestamp_seconds", (("role", "subscriber"),))] == 995
    assert m[("wikipulse_role_last_seen_timestamp_seconds", (("role", "publisher"),))] == 1000.5
    up = {role: m[("wikipulse_role_up", (("role", role),))] for role in ("publisher", "subscriber", "archiver", "router")}
    assert up == {"publisher": 1, "subscriber": 0, "archiver": 0, "router": 1}  # shard 1's consumer holds no lease
    client.set(s1.consumer_lease("wikipulse", "c1"), "token")
    assert parse(generate_latest(registry).decode())[("wikipulse_role_up", (("role", "subscriber"),))] == 1
    assert "process_resident_memory_bytes" in generate_latest(registry).decode()
    # Redis 6.2 has no lag of its own: past LAG_COUNT_MAX entries it is not counted, and only the lag in seconds is shown.
    monkeypatch.setattr(operations, "LAG_COUNT_MAX", 1)
    m = parse(generate_latest(registry).decode())
    assert ("wikipulse_group_lag", (("group", "wikipulse"), ("stream", s0.stream))) not in m
    assert 0 <= m[("wikipulse_group_lag_seconds", (("group", "wikipulse"), ("stream", s0.stream)))] < 60
    assert m[("wikipulse_group_lag_seconds", (("group", "wikipulse"), ("stream", s1.stream)))] == 0
    client.close()


async def test_an_unreachable_feed_is_said_once_with_the_way_to_run_offline(
    settings: Settings, redis_client: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """`up` with no network: the live feed cannot be reached. Here a closed port on 127.0.0.1 stands in for it."""
    s = dataclasses.replace(settings, stream_url=f"http://127.0.0.1:{free_port()}/v2/stream/recentchange", backoff_cap=0.02)
    caplog.set_level(logging.DEBUG, "wikipulse")

    async def retried(client: aioredis.Redis) -> bool:
        return int(await client.hget(keys.PUBLISHER_STATS, "reconnects") or 0) >= 8

    await run_publisher_until(s, retried, timeout=30)
    said = [r.getMessage() for r in caplog.records if r.name.startswith("wikipulse.ingest.") and r.levelno >= logging.WARNING]
    assert len(said) == 1, said
    assert "cannot be reached" in said[0] and "python -m wikipulse up --simulate" in said[0] and s.stream_url in said[0]
    assert sum("still unreachable" in r.getMessage() for r in caplog.records) >= 7  # the retries: at debug level only


def test_the_scrape_on_a_redis_cluster_reads_every_master(tmp_path: Path) -> None:
    """Three masters, three shards, each shard's keys on its own master: one scrape reads them all (Redis 7 there,
    so the groups' lag is Redis's own)."""
    import redis.cluster

    from wikipulse.devtools.redis_server import LocalCluster

    with LocalCluster(tmp_path / "cluster", masters=3) as cluster:
        client = redis.cluster.RedisCluster.from_url(cluster.url)
        layout = keys.Layout("wiki:events", shards=3, cluster=True)
        settings = Settings.from_args(environ={}, redis_url=cluster.url, shards=3)
        client.hset(layout.publisher.stats, mapping={"published": 6})
        for i, shard in enumerate(layout.all_shards):
            client.xadd(shard.stream, {"data": "a"})
            client.xadd(shard.stream, {"data": "b"})
            client.xgroup_create(shard.stream, "wikipulse", id="0")
            client.xreadgroup("wikipulse", f"c{i}", {shard.stream: ">"}, count=1)
            client.set(shard.consumer_lease("wikipulse", f"c{i}"), "token")
            client.set(shard.router_lease, "token")
            client.hset(shard.stats, mapping={"folded": i + 1})
        from prometheus_client import generate_latest

        m = parse(generate_latest(registry_for(client, layout, settings, NoticeHub(cluster.url))).decode())
        client.close()
    assert m[("wikipulse_published_events_total", ())] == 6 and m[("wikipulse_folded_events_total", ())] == 1 + 2 + 3
    for shard in layout.all_shards:
        assert m[("wikipulse_stream_length", (("stream", shard.stream),))] == 2
        assert m[("wikipulse_group_lag", (("group", "wikipulse"), ("stream", shard.stream)))] == 1
        assert m[("wikipulse_group_pending", (("group", "wikipulse"), ("stream", shard.stream)))] == 1
    assert m[("wikipulse_role_up", (("role", "subscriber"),))] == 1 and m[("wikipulse_role_up", (("role", "router"),))] == 1


@pytest.mark.browser
def test_push_pages_counts_the_open_pages_of_this_process(ops_dash: str) -> None:
    """Two real pages in headless Chromium: the scrape says 2 while they are pushed to, 0 once they are closed."""
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    if not os.path.exists(chromium):
        pytest.skip("no chromium installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu", "--no-first-run"])
        contexts = [browser.new_context() for _ in range(2)]
        for context in contexts:
            context.new_page().goto(ops_dash + "/")
        deadline = time.monotonic() + 30
        while scrape(ops_dash)[("wikipulse_push_pages", ())] != 2:  # each page's websocket callback has started
            assert time.monotonic() < deadline, "the pages were never pushed to"
            time.sleep(0.2)
        assert get(ops_dash + "/readyz")[0] == 200  # the notice subscription is held
        for context in contexts:
            context.close()
        browser.close()
    deadline = time.monotonic() + 30
    while scrape(ops_dash)[("wikipulse_push_pages", ())] != 0:
        assert time.monotonic() < deadline, "closed pages still counted"
        time.sleep(0.2)
