"""Configuration: one frozen object per process, from flag, then environment, then default.

Each setting is declared once, in the part of the configuration it belongs to (its flag, environment variable,
default, help and checks: options.opt). Each role's settings class is the union of the parts it uses, and its
command's flags are derived from that class (cli.py), so a command accepts exactly the flags its role reads, and
a role reads only the fields of its class (mypy holds it to that). `Settings`, every role at once, is what `up`
takes. Built in each entry point's `main()`, never at import time.
"""

from __future__ import annotations

from dataclasses import dataclass

from wikipulse import __version__
from wikipulse.core.checks import (
    MAX_ARCHIVE_RETENTION_DAYS,
    archive_retention_days,
    check_clickhouse_url,
    check_http_url,
    check_redis_url,
    check_webhook_url,
    parse_duration,
    parse_retention,
    redact_url,
    redact_url_loosely,
)
from wikipulse.core.errors import SettingsError
from wikipulse.core.options import Options, opt

__all__ = [
    "LIVE_STREAM_URL",
    "MAX_ARCHIVE_RETENTION_DAYS",
    "MAX_SHARDS",
    "READ_BATCH_FACTOR",
    "ArchiveSettings",
    "ArchiverSettings",
    "CountsSettings",
    "DashboardSettings",
    "LogSettings",
    "PublisherSettings",
    "RedisSettings",
    "ServiceSettings",
    "Settings",
    "ShardsSettings",
    "StatsSettings",
    "StreamGroupsSettings",
    "SubscriberSettings",
    "archive_retention_days",
    "check_clickhouse_url",
    "check_http_url",
    "check_redis_url",
    "check_webhook_url",
    "parse_duration",
    "parse_retention",
    "redact_url",
    "redact_url_loosely",
]  # fmt: skip

LIVE_STREAM_URL = "https://stream.wikimedia.org/v2/stream/recentchange"
MAX_SHARDS = 1024  # a shard is a slot of 16,384, and a consumer task
# A stream read (the subscriber's, the router's, the routes copier's) takes this many times BATCH_SIZE: a read is
# one cheap reply, and a bigger batch folds and routes in fewer round trips than the writes, which BATCH_SIZE bounds.
READ_BATCH_FACTOR = 10


# ---- the parts: each a concern, each field declared here once ----


@dataclass(frozen=True)
class LogSettings(Options):
    log_level: str = opt("LOG_LEVEL", "logging level", "INFO")


@dataclass(frozen=True)
class RedisSettings(LogSettings):
    """Where the deployment lives in Redis: every command that talks to Redis has these."""

    redis_url: str = opt(
        "REDIS_URL", "Redis server URL (redis://, rediss://, with :password@)", "redis://127.0.0.1:6379/0", check=check_redis_url
    )
    cluster: str = opt(
        "REDIS_CLUSTER", "whether REDIS_URL is a Redis Cluster node: auto (ask the server), on, off", "auto", choices=("auto", "on", "off")
    )
    shards: int = opt(
        "SHARDS", "shards the work is split into (on a cluster: as many as masters); fixed per deployment, see README", 1,
        least=1, most=MAX_SHARDS,
    )  # fmt: skip
    stream: str = opt("REDIS_STREAM", "Redis stream for raw events (durable)", "wiki:events", nonempty=True)


@dataclass(frozen=True)
class ServiceSettings(RedisSettings):
    """A long-running role on Redis (publisher, subscriber, archiver): retries, leases, the eviction check, stats."""

    backoff_cap: float = opt("WIKI_BACKOFF_CAP", "longest wait between reconnects, seconds", 30.0, least=0.01)
    lease_ttl: float = opt("LEASE_TTL", "seconds a stopped process holds its publisher or consumer-name lease at most", 10.0, least=0.1)
    allow_eviction: bool = opt(
        "REDIS_ALLOW_EVICTION", "run even on a Redis whose maxmemory-policy evicts keys (it can silently drop the stream and counts)", False
    )
    stats_interval: float = opt("STATS_INTERVAL", "seconds between logged counter summaries", 30.0, least=0.01)
    max_event_bytes: int = opt("MAX_EVENT_BYTES", "frames larger than this are rejected", 1 << 20, least=1)


@dataclass(frozen=True)
class FoldGroup(Options):
    group: str = opt("CONSUMER_GROUP", "consumer group on the stream", "wikipulse", nonempty=True)


@dataclass(frozen=True)
class ArchiveGroup(Options):
    archive_group: str = opt("ARCHIVE_GROUP", "the archiver's consumer group on the stream", "archiver", nonempty=True)


CONSUMER_ROLES = ("subscriber", "archiver")  # the consumers a deployment can run on the stream, each with its group


@dataclass(frozen=True)
class StreamGroupsSettings(RedisSettings, FoldGroup, ArchiveGroup):
    """The consumer groups that come with the stream (trimming.declared_groups)."""

    stream_consumers: str = opt(
        "STREAM_CONSUMERS", "consumers the deployment runs (subscriber, archiver): their groups come with the stream",
        "subscriber,archiver", method="consumer_roles",
    )  # fmt: skip

    def consumer_roles(self) -> tuple[str, ...]:
        """settings.stream_consumers as a tuple of CONSUMER_ROLES."""
        roles = tuple(dict.fromkeys(r.strip() for r in self.stream_consumers.split(",") if r.strip()))
        unknown = [r for r in roles if r not in CONSUMER_ROLES]
        if unknown:
            raise SettingsError(f"stream_consumers: unknown {unknown[0]!r} (a list of subscriber, archiver; empty: none)")
        return roles


@dataclass(frozen=True)
class Channel(Options):
    channel: str = opt("PUBSUB_CHANNEL", "Redis pub/sub channel for raw events", "wiki", nonempty=True)


@dataclass(frozen=True)
class Batching(Options):
    batch_size: int = opt(
        "BATCH_SIZE", f"events written to Redis in one round trip, at most (a stream read takes {READ_BATCH_FACTOR}x)", 500, least=1
    )
    batch_delay: float = opt("BATCH_DELAY", "seconds a partial batch waits before it is written", 0.005, least=0)

    @property
    def read_batch_size(self) -> int:
        """Entries one stream read takes at most: READ_BATCH_FACTOR x batch_size (why: READ_BATCH_FACTOR)."""
        return self.batch_size * READ_BATCH_FACTOR


@dataclass(frozen=True)
class Retention(Options):
    retention: str = opt("RETENTION", "retention per resolution, e.g. 10s=6h,1m=7d,1h=400d", "", check=parse_retention)

    def retention_seconds(self) -> dict[str, int]:
        from wikipulse.core.model import RESOLUTIONS

        configured = parse_retention(self.retention)
        return {r.name: configured.get(r.name, r.default_retention) for r in RESOLUTIONS}


@dataclass(frozen=True)
class ArchiveSettings(LogSettings):
    """Where the archive is: every command that reads or writes it has these."""

    clickhouse_url: str = opt(
        "CLICKHOUSE_URL", "ClickHouse server for the archive (http://user:password@host:8123); empty: the embedded engine", "",
        check=check_clickhouse_url,
    )  # fmt: skip
    archive_dir: str = opt("ARCHIVE_DIR", "where the embedded ClickHouse engine keeps the archive", ".wikipulse/clickhouse")
    archive_port: int = opt("ARCHIVE_PORT", "port on 127.0.0.1 where the archiver answers read-only queries", 8124, least=1, most=65535)


# ---- the roles: each the union of the parts it uses ----


@dataclass(frozen=True)
class PublisherSettings(ServiceSettings, StreamGroupsSettings, Channel, Batching):
    """`publish`: the feed, the stream and channel it writes (and their groups), the router and the routes copier."""

    stream_url: str = opt("WIKI_STREAM_URL", "EventStreams recentchange URL", LIVE_STREAM_URL, flag="--url")
    stream_maxlen: int = opt(
        "STREAM_MAXLEN", "the stream's hard cap, read by every group or not (what one loses is counted)", 1_000_000, least=1
    )
    user_agent: str = opt(
        "WIKI_USER_AGENT",
        "User-Agent sent to EventStreams (Wikimedia asks for a contact)",
        f"wikipulse/{__version__} (https://github.com/wikipulse/wikipulse; wikipulse@example.org) aiohttp",
    )
    since: str = opt("WIKI_SINCE", "cold-start backfill: ISO date or ms epoch (ignored when a position is stored)", "")
    reset_position: bool = opt("WIKI_RESET_POSITION", "forget the stored position and start from --since or now", False)
    idle_timeout: float = opt("WIKI_IDLE_TIMEOUT", "seconds without data before reconnecting", 60.0, least=0.1)
    dedup_window: int = opt("DEDUP_WINDOW", "recent meta.id values remembered for deduplication", 50_000, least=1)
    # The stream is a buffer (trimming.py): what every consumer group acknowledged is trimmed down to this window.
    stream_keep: int = opt(
        "STREAM_KEEP", "entries kept for late listeners once every consumer group acknowledged them (~5 min)", 10_000, least=1
    )
    stream_grace: float = opt(
        "STREAM_GRACE", "seconds of the stream a declared group holds until a consumer first reads it", 600.0, least=0
    )


@dataclass(frozen=True)
class SubscriberSettings(ServiceSettings, StreamGroupsSettings, Channel, Batching, Retention):
    """`subscribe`: the fold of the stream (or the channel) into the series, trending and spikes."""

    shard: str = opt("SUBSCRIBER_SHARDS", "the shards this subscriber folds, e.g. 0,2 (default: all)", "", method="shard_indexes")
    source: str = opt(
        "SUBSCRIBER_SOURCE", "where the subscriber reads: stream (exactly-once) or pubsub", "stream", choices=("stream", "pubsub")
    )
    consumer: str = opt("CONSUMER_NAME", "consumer name in the group (default: the host name, stable across restarts)", "")
    claim_idle: float = opt("CLAIM_IDLE", "seconds before another consumer's pending entries are claimed", 60.0, least=0.01)
    max_domains: int = opt("MAX_DOMAINS", "domains that get series of their own; any more are folded as _other", 10_000, least=1)
    alert_webhook: str = opt(
        "ALERT_WEBHOOK", "URL each spike alert is POSTed to as JSON, by the subscriber (empty: none)", "", check=check_webhook_url
    )

    def shard_indexes(self) -> list[int]:
        """The shards this subscriber folds: settings.shard ('0,2'), or every shard."""
        if not self.shard.strip():
            return list(range(self.shards))
        try:
            picked = sorted({int(part) for part in self.shard.split(",") if part.strip()})
        except ValueError:
            raise SettingsError(f"shard: not a list of shard numbers: {self.shard!r} (e.g. 0,2)") from None
        if not picked or picked[0] < 0 or picked[-1] >= self.shards:
            raise SettingsError(f"shard: {self.shard!r} is not within 0..{self.shards - 1} (SHARDS={self.shards})")
        return picked


@dataclass(frozen=True)
class ArchiverSettings(ServiceSettings, StreamGroupsSettings, ArchiveSettings):
    """`archive`: the stream into ClickHouse, and the read-only query endpoint."""

    archive_retention: str = opt(
        "ARCHIVE_RETENTION", "how long the archive keeps events, e.g. 400d (empty: forever)", "", check=archive_retention_days
    )
    # Each insert is a part ClickHouse merges later: bigger batches, less merging (5,000 -> 20,000: 49k -> 55k
    # events/s on 2 cores, BENCHMARKS.md); two batches in flight are ~45 MB of JSON at most.
    archive_batch: int = opt("ARCHIVE_BATCH", "events one archive insert takes at most", 20_000, least=1)
    archive_from_stream: bool = opt(
        "ARCHIVE_FROM_STREAM",
        "when the archiver's group is new, archive what the stream still holds (else from now on)",
        False,
        flag="--from-stream",
    )


@dataclass(frozen=True)
class DashboardSettings(RedisSettings, ArchiveSettings, FoldGroup, ArchiveGroup):
    """`dash`: the page, its pushes, /metrics (the groups' state) and /history (the archive)."""

    host: str = opt("DASH_HOST", "address the dashboard binds", "127.0.0.1")
    port: int = opt("DASH_PORT", "port the dashboard listens on", 8050, least=1, most=65535)
    max_pages: int = opt("DASH_MAX_PAGES", "pages one dashboard process pushes to at most (more poll every 2 s)", 2000, least=1)
    max_pages_per_address: int = opt(
        "DASH_MAX_PAGES_PER_ADDRESS", "pushed pages (and websockets) from one client address at most", 100, least=1
    )
    push_backlog: int = opt(
        "DASH_PUSH_BACKLOG", "bytes a websocket may leave unsent before it is dropped (a client not reading)", 1 << 20, least=1 << 14
    )


@dataclass(frozen=True)
class CountsSettings(RedisSettings, Retention):
    """`counts`: the series, bounded by their retention."""


@dataclass(frozen=True)
class StatsSettings(RedisSettings, FoldGroup):
    """`stats`: the pipeline's counters and the fold group's state."""


@dataclass(frozen=True)
class ShardsSettings(RedisSettings, FoldGroup):
    """`shards`: the recorded shard count; --set drops the fold group and its keys."""


@dataclass(frozen=True)
class Settings(PublisherSettings, SubscriberSettings, ArchiverSettings, DashboardSettings, CountsSettings, StatsSettings, ShardsSettings):
    """Every role's settings at once: what `up` takes (and hands its children as environment variables), and
    what a test builds once for several roles."""
