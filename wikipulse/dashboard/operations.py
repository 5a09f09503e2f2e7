"""What an operator's Prometheus and orchestrator see: `/metrics`, `/healthz` and `/readyz` on the dashboard process.

`/metrics` is the Prometheus text format (prometheus-client), built on each scrape from what Redis holds, as
redis_exporter does for streams: the publisher's, subscribers' (every shard's), router's and archiver's counters, the
streams' lengths, every consumer group's lag and pending entries (XINFO GROUPS), what trimming took unread, and which
roles hold their leases. So one scrape of one dashboard sees the whole pipeline, on one Redis or a cluster, whichever
process wrote it. Two pipelined round trips a scrape (the second asks whether the consumers found hold their leases,
and how old the oldest entry is that a group behind has not been delivered); 0.1-0.3 ms on one Redis. Names follow
the Prometheus conventions: the `wikipulse_` prefix, base units, `_total` counters, and labels of bounded values only
(stage, reason, group, stream, role, outcome): never a title, a user or a domain.

`/healthz` answers 200 while the process serves HTTP at all; `/readyz` 503 until it can serve the page: Redis answers,
and while pages are open, the notice subscription (push.NoticeHub) is held. Neither is ever the page's HTML: the routes
are added before Dash's catch-all (added at startup).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import dash
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from redis.exceptions import RedisClusterException, ResponseError

from wikipulse.core.settings import DashboardSettings
from wikipulse.dashboard.push import NoticeHub
from wikipulse.ingest.routes import route_counters
from wikipulse.store import keys
from wikipulse.store.connect import SyncClient
from wikipulse.store.retry import REDIS_ERRORS
from wikipulse.store.scripts import lua
from wikipulse.store.status import decode_hash
from wikipulse.store.trimming import trimmed_unread

METRICS_PATH = "/metrics"
HEALTH_PATH = "/healthz"
READY_PATH = "/readyz"
SCRAPE_ERRORS = (*REDIS_ERRORS, RedisClusterException)


# On Redis 6.2 (the embedded default) XINFO GROUPS has no `lag`: a group behind the stream's end has its entries
# counted, in Redis, up to LAG_COUNT_MAX, beyond which the lag is left out and wikipulse_group_lag_seconds tells how
# far behind it is. Redis serves nothing else while it counts, and XRANGE hands Lua each entry's ~1 KB: in chunks of
# 100, 1,000 entries cost it 2.7-4.6 ms, 10,000 cost 83 ms (chunks of 1,000: 8.9 and 172 ms; the garbage grows
# faster than the count; bench/bench_metrics.py). Redis 7 counts itself, for nothing.
LAG_COUNT_MAX = 1000
LAG_SCRIPT = lua(__package__, "lag")  # counts a group's lag, up to a bound: lag.lua


@dataclass
class Group:
    """One consumer group on one stream, as a scrape found it."""

    stream: str
    name: str
    pending: int
    delivered: str  # the last entry delivered to it
    lag: int | None  # entries not yet delivered to it; None: unknown
    lag_seconds: float = 0.0  # how long the oldest entry not yet delivered to it has waited


@dataclass
class Scrape:
    """What one scrape read from Redis, decoded. Hashes are decode_hash()'s."""

    publisher: dict[str, Any]
    archiver: dict[str, Any]
    subscribers: list[dict[str, Any]]  # one per shard
    routers: list[dict[str, Any]]  # one per shard (sharded only)
    webhook: dict[str, Any]
    streams: dict[str, int]  # stream -> entries
    groups: list[Group]
    roles_up: dict[str, bool] = field(default_factory=dict)  # role -> its lease(s) held now
    routes: dict[str, dict[str, Any]] = field(default_factory=dict)  # routes.route_counters


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _hash(reply: Any) -> dict[str, Any]:
    return decode_hash(reply) if isinstance(reply, dict) else {}


def _rows(reply: Any) -> list[dict[str, Any]]:
    """An XINFO reply, or [] for a stream or group that does not exist (yet)."""
    return reply if isinstance(reply, list) else []


def _ms(entry_id: str) -> int:
    """The milliseconds part of a stream id (its time, for the ids XADD makes)."""
    head = entry_id.partition("-")[0]
    return int(head) if head.isdigit() else 0


def _groups(stream: str, info: Any, rows: Any) -> list[Group]:
    """The groups of one stream from its XINFO STREAM and XINFO GROUPS replies (either an error: none yet)."""
    info = info if isinstance(info, dict) else {}
    last = _text(info.get("last-generated-id") or "0-0")
    groups = []
    for row in _rows(rows):
        delivered = _text(row.get("last-delivered-id") or "0-0")
        lag = row.get("lag") if isinstance(row.get("lag"), int) else (0 if delivered == last else None)
        groups.append(Group(stream, _text(row["name"]), int(row.get("pending") or 0), delivered, lag))
    return groups


def read_scrape(client: SyncClient, layout: keys.Layout, settings: DashboardSettings, now: float) -> Scrape:
    """Everything a scrape shows, in two pipelined round trips (on a cluster, one per master each, at once)."""
    shards = layout.all_shards
    streams = [layout.stream, *(shard.stream for shard in shards)] if layout.sharded else [layout.stream]
    pipe = client.pipeline(transaction=False)
    for key in (layout.publisher.stats, layout.archiver_stats, keys.ALERT_WEBHOOK_STATE):
        pipe.hgetall(key)
    pipe.exists(layout.publisher.lease)
    pipe.exists(layout.archiver_lease(settings.archive_group))
    for stream in streams:
        pipe.xinfo_stream(stream)
        pipe.xinfo_groups(stream)
    for shard in shards:
        pipe.hgetall(shard.stats)
        pipe.xinfo_consumers(shard.stream, settings.group)
        if layout.sharded:
            pipe.hgetall(shard.router_stats)
            pipe.exists(shard.router_lease)
    replies = pipe.execute(raise_on_error=False)
    for reply in replies:  # a missing stream or group is a ResponseError in its place; anything else is Redis trouble
        if isinstance(reply, Exception) and not isinstance(reply, ResponseError):
            raise reply
    publisher, archiver, webhook, publisher_lease, archiver_lease = replies[:5]
    at = 5 + 2 * len(streams)
    stream_replies = replies[5:at]
    lengths = {
        stream: int(info["length"]) if isinstance(info, dict) else 0 for stream, info in zip(streams, stream_replies[::2], strict=True)
    }
    groups = [g for i, stream in enumerate(streams) for g in _groups(stream, stream_replies[2 * i], stream_replies[2 * i + 1])]
    per_shard = 4 if layout.sharded else 2
    subscribers, routers, consumers, routers_up = [], [], [], []
    for i, shard in enumerate(shards):
        part = replies[at + per_shard * i : at + per_shard * (i + 1)]
        subscribers.append(_hash(part[0]))
        consumers.append([shard.consumer_lease(settings.group, _text(row["name"])) for row in _rows(part[1])])
        if layout.sharded:
            routers.append(_hash(part[2]))
            routers_up.append(part[3] == 1)
    shards_served = _second_round(client, consumers, [g for g in groups if g.lag != 0], now)
    roles_up = {"publisher": publisher_lease == 1, "subscriber": all(shards_served), "archiver": archiver_lease == 1}
    if layout.sharded:
        roles_up["router"] = all(routers_up)
    scrape = Scrape(_hash(publisher), _hash(archiver), subscribers, routers, _hash(webhook), lengths, groups, roles_up)
    scrape.routes = route_counters(client)  # one more round trip; two while routes are declared
    if scrape.routes:
        scrape.roles_up["routes"] = client.exists(keys.ROUTES_LEASE) == 1  # the copier (in the publisher's process)
    return scrape


def _second_round(client: SyncClient, consumers: list[list[str]], behind: list[Group], now: float) -> list[bool]:
    """Whether each shard has a consumer whose name's lease is held (lease.py: a lapsed lease means its process stopped
    renewing it); and how far behind are the groups not at their stream's end (filled in)."""
    leases = [lease for names in consumers for lease in names]
    if not leases and not behind:
        return [False for _ in consumers]
    pipe = client.pipeline(transaction=False)
    for lease in leases:
        pipe.exists(lease)
    for group in behind:
        pipe.xrange(group.stream, f"({group.delivered}", "+", count=1)  # the oldest entry not yet delivered to it
    replies = pipe.execute()
    held = iter(replies[: len(leases)])
    for group, oldest in zip(behind, replies[len(leases) :], strict=True):
        group.lag_seconds = max(0.0, now - _ms(_text(oldest[0][0])) / 1000) if oldest else 0.0
        if group.lag is None:  # Redis 6.2: counted here (a script: on a cluster, pipelines take no scripts)
            counted = int(client.eval(LAG_SCRIPT, 1, group.stream, group.delivered, LAG_COUNT_MAX + 1))
            group.lag = counted if counted <= LAG_COUNT_MAX else None
    return [any([next(held) == 1 for _ in names]) for names in consumers]


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _sum(hashes: Iterable[dict[str, Any]], name: str) -> float:
    return sum(_number(h.get(name)) or 0.0 for h in hashes)


def _by_reason(stage: str, stats: Iterable[dict[str, Any]], family: CounterMetricFamily) -> None:
    totals: dict[str, float] = {}
    for h in stats:
        for name, value in h.items():
            if name.startswith("rejected:") and _number(value) is not None:
                reason = name.partition(":")[2]
                totals[reason] = totals.get(reason, 0.0) + (_number(value) or 0.0)
    for reason, n in sorted(totals.items()):
        family.add_metric([stage, reason], n)


def families(scrape: Scrape, now: float) -> Iterator[Metric]:
    """The metric families of one scrape (pure)."""
    pub, arc, subs = scrape.publisher, scrape.archiver, scrape.subscribers

    def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
        return CounterMetricFamily(f"wikipulse_{name}", doc, value=value)

    yield GaugeMetricFamily("wikipulse_redis_up", "1 if this scrape could read Redis", value=1)
    yield counter("published_events_total", "events the publisher added to the stream", _sum([pub], "published"))
    yield counter("duplicate_events_total", "events the publisher dropped as already published (meta.id)", _sum([pub], "duplicates"))
    yield counter("reconnects_total", "times the publisher connected to the feed again", _sum([pub], "reconnects"))
    yield counter("folded_events_total", "events the subscribers folded into the time series", _sum(subs, "folded"))
    yield counter("late_events_total", "events folded too old for some resolution's retention", _sum(subs, "late"))
    yield counter("overflow_events_total", "events of domains past MAX_DOMAINS, folded as _other", _sum(subs, "overflow"))
    yield counter("archived_events_total", "events the archiver inserted into ClickHouse and acknowledged", _sum([arc], "archived"))
    yield counter("archive_inserts_total", "inserts into ClickHouse", _sum([arc], "inserts"))
    canaries = CounterMetricFamily("wikipulse_canary_events_total", "canary events dropped, by stage", labels=["stage"])
    rejected = CounterMetricFamily("wikipulse_rejected_events_total", "malformed events counted and skipped", labels=["stage", "reason"])
    for stage, stats in (("publisher", [pub]), ("subscriber", subs), ("archiver", [arc])):
        canaries.add_metric([stage], _sum(stats, "canaries"))
        _by_reason(stage, stats, rejected)
    yield canaries
    yield rejected
    trimmed = CounterMetricFamily(
        "wikipulse_trimmed_unread_events_total", "stream entries trimmed (STREAM_MAXLEN) before the group read them", labels=["group"]
    )
    lost: dict[str, float] = {}
    for counts in (pub, *scrape.routers):
        for name, n in trimmed_unread(counts).items():
            lost[name] = lost.get(name, 0.0) + n
    for name, total in sorted(lost.items()):
        trimmed.add_metric([name], total)
    yield trimmed
    webhook = CounterMetricFamily("wikipulse_alert_webhook_posts_total", "spike alerts posted to ALERT_WEBHOOK", labels=["outcome"])
    for outcome in ("delivered", "failed"):
        webhook.add_metric([outcome], _sum([scrape.webhook], outcome))
    yield webhook

    length = GaugeMetricFamily("wikipulse_stream_length", "entries in the stream", labels=["stream"])
    for stream, n in scrape.streams.items():
        length.add_metric([stream], n)
    yield length
    lag = GaugeMetricFamily("wikipulse_group_lag", "entries in the stream not yet delivered to the group", labels=["stream", "group"])
    pending = GaugeMetricFamily(
        "wikipulse_group_pending", "entries delivered to the group, not yet acknowledged", labels=["stream", "group"]
    )
    lag_seconds = GaugeMetricFamily(
        "wikipulse_group_lag_seconds", "how long the oldest entry not yet delivered to the group has waited", labels=["stream", "group"]
    )
    for group in scrape.groups:
        labels = [group.stream, group.name]
        pending.add_metric(labels, group.pending)
        lag_seconds.add_metric(labels, group.lag_seconds)
        if group.lag is not None:  # unknown: past LAG_COUNT_MAX on Redis 6.2, or Redis 7 cannot tell (an XDEL)
            lag.add_metric(labels, group.lag)
    yield lag
    yield lag_seconds
    yield pending
    ingest = _number(pub.get("lag_seconds"))
    yield GaugeMetricFamily(
        "wikipulse_ingest_lag_seconds", "age of the newest published event (meta.dt) when it was written", value=ingest or 0.0
    )
    last_publish = _number(pub.get("last_publish_at"))
    yield GaugeMetricFamily(
        "wikipulse_last_publish_timestamp_seconds", "when the publisher last added events (unix time)", value=last_publish or 0.0
    )
    seen = GaugeMetricFamily(
        "wikipulse_role_last_seen_timestamp_seconds", "when the role last wrote its updated_at (unix time)", labels=["role"]
    )
    for role, stats in (("publisher", [pub]), ("subscriber", subs), ("archiver", [arc])):
        at = max((_number(h.get("updated_at")) or 0.0 for h in stats), default=0.0)
        seen.add_metric([role], at)
    yield seen
    up = GaugeMetricFamily("wikipulse_role_up", "1 while the role holds its lease (subscriber: on every shard)", labels=["role"])
    for role, held in scrape.roles_up.items():
        up.add_metric([role], 1 if held else 0)
    yield up
    yield from route_families(scrape.routes)
    yield GaugeMetricFamily("wikipulse_scrape_timestamp_seconds", "when this scrape read Redis (unix time)", value=now)


def route_families(routes: dict[str, dict[str, Any]]) -> Iterator[Metric]:
    """Per route (a bounded label: at most keys.MAX_ROUTES): what the copier added, refused as copied before, holds, lost."""
    copied = CounterMetricFamily("wikipulse_route_copied_events_total", "entries the copier added to the route's stream", labels=["route"])
    dups = CounterMetricFamily(
        "wikipulse_route_duplicate_events_total", "entries the route's stream refused as copied before (a restart)", labels=["route"]
    )
    length = GaugeMetricFamily("wikipulse_route_stream_length", "entries in the route's stream", labels=["route"])
    lost = CounterMetricFamily(
        "wikipulse_route_trimmed_unread_events_total",
        "route entries trimmed (STREAM_MAXLEN) before the group read them",
        labels=["route", "group"],
    )
    for name, counts in sorted(routes.items()):
        copied.add_metric([name], counts["copied"])
        dups.add_metric([name], counts["duplicates"])
        length.add_metric([name], counts["length"])
        for group, n in sorted(counts["trimmed_unread"].items()):
            lost.add_metric([name, group], n)
    yield from (copied, dups, length, lost)


class PipelineCollector(Collector):
    """Reads Redis on every scrape (prometheus-client calls collect()); Redis unreachable is `wikipulse_redis_up 0`."""

    def __init__(self, client: SyncClient, layout: keys.Layout, settings: DashboardSettings, hub: NoticeHub) -> None:
        self.client, self.layout, self.settings, self.hub = client, layout, settings, hub

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("wikipulse_push_pages", "pages this dashboard process pushes updates to", value=self.hub.pages)
        try:
            now = time.time()
            scrape = read_scrape(self.client, self.layout, self.settings, now)
        except SCRAPE_ERRORS:
            yield GaugeMetricFamily("wikipulse_redis_up", "1 if this scrape could read Redis", value=0)
            return
        yield from families(scrape, now)


def readiness(client: SyncClient, hub: NoticeHub) -> str | None:
    """None when the page can be served; else why not."""
    try:
        client.ping()
    except SCRAPE_ERRORS as exc:
        return f"Redis unreachable: {type(exc).__name__}: {exc}"
    if hub.pages and not (hub.subscribed and hub.redis_up):
        return "the notice subscription is not held (resubscribing)"
    return None


def registry_for(client: SyncClient, layout: keys.Layout, settings: DashboardSettings, hub: NoticeHub) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)  # no Redis read at registration: only on a scrape
    registry.register(PipelineCollector(client, layout, settings, hub))
    ProcessCollector(registry=registry)  # the dashboard process's own memory, CPU, open files
    return registry


def register_operations(app: dash.Dash, client: SyncClient, layout: keys.Layout, settings: DashboardSettings, hub: NoticeHub) -> None:
    """Add the three routes to the FastAPI backend, ahead of Dash's catch-all. Plain functions: FastAPI runs them in
    its thread pool, so a scrape's blocking Redis reads never hold up the event loop (push, websockets)."""
    from fastapi.responses import PlainTextResponse, Response

    registry = registry_for(client, layout, settings, hub)

    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    def healthz() -> PlainTextResponse:
        return PlainTextResponse("ok\n")

    def readyz() -> PlainTextResponse:
        problem = readiness(client, hub)
        return PlainTextResponse("ready\n" if problem is None else f"not ready: {problem}\n", status_code=200 if problem is None else 503)

    for path, endpoint in ((METRICS_PATH, metrics), (HEALTH_PATH, healthz), (READY_PATH, readyz)):
        app.server.add_api_route(path, endpoint, methods=["GET"], include_in_schema=False)
