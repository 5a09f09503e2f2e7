"""Configuration: one frozen object per process, from flag, then environment, then default.

Built in each entry point's `main()`, never at import time. Each field names its
flag and environment variable; `add_arguments` shows both and the default in `--help`.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from wikipulse import __version__
from wikipulse.core.errors import SettingsError

LIVE_STREAM_URL = "https://stream.wikimedia.org/v2/stream/recentchange"
MAX_SHARDS = 1024  # a shard is a slot of 16,384, and a consumer task


def _opt(env: str, help: str, default: Any, **kw: Any) -> Any:
    return field(default=default, metadata={"env": env, "help": help, **kw})


def parse_duration(text: str) -> int:
    """'90' or '90s', '5m', '6h', '7d' -> seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    text = text.strip().lower()
    try:
        if text and text[-1] in units:
            return int(text[:-1]) * units[text[-1]]
        return int(text)
    except ValueError:
        raise SettingsError(f"not a duration: {text!r} (use e.g. 90s, 5m, 6h, 7d)") from None


# The archive's TTL is DateTime64 arithmetic (event_time + N days), which cannot wrap; past about a thousand
# years a retention means "forever", which is the empty setting (archive.ttl_clause).
MAX_ARCHIVE_RETENTION_DAYS = 365_000


def archive_retention_days(text: str) -> int | None:
    """ARCHIVE_RETENTION ('400d', '36500d') in whole days, None for empty (keep everything); SettingsError outside
    1 day .. MAX_ARCHIVE_RETENTION_DAYS."""
    if not text.strip():
        return None
    seconds = parse_duration(text)
    if seconds < 86400:
        raise SettingsError(f"archive_retention must be at least a day, not {text!r}")
    if seconds // 86400 > MAX_ARCHIVE_RETENTION_DAYS:
        raise SettingsError(
            f"archive_retention must be at most {MAX_ARCHIVE_RETENTION_DAYS}d (about 1,000 years), not {text!r}: "
            "leave it empty to keep everything"
        )
    return seconds // 86400


def parse_retention(text: str) -> dict[str, int]:
    """'10s=6h,1m=7d,1h=400d' -> {'10s': 21600, ...}; an empty string keeps the defaults."""
    from wikipulse.store.keys import RESOLUTION_BY_NAME

    out: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        if not sep or name not in RESOLUTION_BY_NAME:
            raise SettingsError(f"bad retention {part!r}: use NAME=DURATION with NAME in {sorted(RESOLUTION_BY_NAME)}")
        out[name] = parse_duration(value)
    return out


@dataclass(frozen=True)
class Settings:
    redis_url: str = _opt("REDIS_URL", "Redis server URL (redis://, rediss://, with :password@)", "redis://127.0.0.1:6379/0")
    stream_url: str = _opt("WIKI_STREAM_URL", "EventStreams recentchange URL", LIVE_STREAM_URL, flag="--url")
    channel: str = _opt("PUBSUB_CHANNEL", "Redis pub/sub channel for raw events", "wiki")
    stream: str = _opt("REDIS_STREAM", "Redis stream for raw events (durable)", "wiki:events")
    stream_maxlen: int = _opt("STREAM_MAXLEN", "the stream's hard cap, read by every group or not (what one loses is counted)", 1_000_000)
    user_agent: str = _opt(
        "WIKI_USER_AGENT",
        "User-Agent sent to EventStreams (Wikimedia asks for a contact)",
        f"wikipulse/{__version__} (https://github.com/wikipulse/wikipulse; wikipulse@example.org) aiohttp",
    )
    since: str = _opt("WIKI_SINCE", "cold-start backfill: ISO date or ms epoch (ignored when a position is stored)", "")
    reset_position: bool = _opt("WIKI_RESET_POSITION", "forget the stored position and start from --since or now", False)
    idle_timeout: float = _opt("WIKI_IDLE_TIMEOUT", "seconds without data before reconnecting", 60.0)
    backoff_cap: float = _opt("WIKI_BACKOFF_CAP", "longest wait between reconnects, seconds", 30.0)
    batch_size: int = _opt("BATCH_SIZE", "events written to Redis in one round trip, at most", 500)
    batch_delay: float = _opt("BATCH_DELAY", "seconds a partial batch waits before it is written", 0.005)
    max_event_bytes: int = _opt("MAX_EVENT_BYTES", "frames larger than this are rejected", 1 << 20)
    dedup_window: int = _opt("DEDUP_WINDOW", "recent meta.id values remembered for deduplication", 50_000)
    cluster: str = _opt(
        "REDIS_CLUSTER", "whether REDIS_URL is a Redis Cluster node: auto (ask the server), on, off", "auto", choices=("auto", "on", "off")
    )
    shards: int = _opt("SHARDS", "shards the work is split into (on a cluster: as many as masters); fixed per deployment, see README", 1)
    shard: str = _opt("SUBSCRIBER_SHARDS", "the shards this subscriber folds, e.g. 0,2 (default: all)", "")
    source: str = _opt(
        "SUBSCRIBER_SOURCE", "where the subscriber reads: stream (exactly-once) or pubsub", "stream", choices=("stream", "pubsub")
    )
    group: str = _opt("CONSUMER_GROUP", "consumer group on the stream", "wikipulse")
    consumer: str = _opt("CONSUMER_NAME", "consumer name in the group (default: the host name, stable across restarts)", "")
    claim_idle: float = _opt("CLAIM_IDLE", "seconds before another consumer's pending entries are claimed", 60.0)
    max_domains: int = _opt("MAX_DOMAINS", "domains that get series of their own; any more are folded as _other", 10_000)
    retention: str = _opt("RETENTION", "retention per resolution, e.g. 10s=6h,1m=7d,1h=400d", "")
    stats_interval: float = _opt("STATS_INTERVAL", "seconds between logged counter summaries", 30.0)
    lease_ttl: float = _opt("LEASE_TTL", "seconds a stopped process holds its publisher or consumer-name lease at most", 10.0)
    allow_eviction: bool = _opt(
        "REDIS_ALLOW_EVICTION", "run even on a Redis whose maxmemory-policy evicts keys (it can silently drop the stream and counts)", False
    )
    clickhouse_url: str = _opt(
        "CLICKHOUSE_URL", "ClickHouse server for the archive (http://user:password@host:8123); empty: the embedded engine", ""
    )
    archive_dir: str = _opt("ARCHIVE_DIR", "where the embedded ClickHouse engine keeps the archive", ".wikipulse/clickhouse")
    archive_group: str = _opt("ARCHIVE_GROUP", "the archiver's consumer group on the stream", "archiver")
    archive_retention: str = _opt("ARCHIVE_RETENTION", "how long the archive keeps events, e.g. 400d (empty: forever)", "")
    # Each insert is a part ClickHouse merges later: bigger batches, less merging (5,000 -> 20,000: 49k -> 55k
    # events/s on 2 cores, BENCHMARKS.md); two batches in flight are ~45 MB of JSON at most.
    archive_batch: int = _opt("ARCHIVE_BATCH", "events one archive insert takes at most", 20_000)
    archive_port: int = _opt("ARCHIVE_PORT", "port on 127.0.0.1 where the archiver answers read-only queries", 8124)
    archive_from_stream: bool = _opt(
        "ARCHIVE_FROM_STREAM",
        "when the archiver's group is new, archive what the stream still holds (else from now on)",
        False,
        flag="--from-stream",
    )
    host: str = _opt("DASH_HOST", "address the dashboard binds", "127.0.0.1")
    port: int = _opt("DASH_PORT", "port the dashboard listens on", 8050)
    log_level: str = _opt("LOG_LEVEL", "logging level", "INFO")
    alert_webhook: str = _opt("ALERT_WEBHOOK", "URL each spike alert is POSTed to as JSON, by the subscriber (empty: none)", "")
    # The stream is a buffer (trimming.py): what every consumer group acknowledged is trimmed down to this window.
    stream_keep: int = _opt("STREAM_KEEP", "entries kept for late listeners once every consumer group acknowledged them (~5 min)", 10_000)
    stream_consumers: str = _opt(
        "STREAM_CONSUMERS", "consumers the deployment runs (subscriber, archiver): their groups come with the stream", "subscriber,archiver"
    )
    stream_grace: float = _opt("STREAM_GRACE", "seconds of the stream a declared group holds until a consumer first reads it", 600.0)

    def consumer_roles(self) -> tuple[str, ...]:
        """settings.stream_consumers as a tuple of roles (trimming.ROLES)."""
        roles = tuple(dict.fromkeys(r.strip() for r in self.stream_consumers.split(",") if r.strip()))
        unknown = [r for r in roles if r not in ("subscriber", "archiver")]
        if unknown:
            raise SettingsError(f"stream_consumers: unknown {unknown[0]!r} (a list of subscriber, archiver; empty: none)")
        return roles
    max_pages: int = _opt("DASH_MAX_PAGES", "pages one dashboard process pushes to at most (more poll every 2 s)", 2000)
    max_pages_per_address: int = _opt("DASH_MAX_PAGES_PER_ADDRESS", "pushed pages (and websockets) from one client address at most", 100)
    push_backlog: int = _opt("DASH_PUSH_BACKLOG", "bytes a websocket may leave unsent before it is dropped (a client not reading)", 1 << 20)

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

    def retention_seconds(self) -> dict[str, int]:
        from wikipulse.store.keys import RESOLUTIONS

        configured = parse_retention(self.retention)
        return {r.name: configured.get(r.name, r.default_retention) for r in RESOLUTIONS}

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser, names: Iterable[str]) -> None:
        by_name = {f.name: f for f in fields(cls)}
        for name in names:
            f = by_name[name]
            flag = f.metadata.get("flag", "--" + name.replace("_", "-"))
            text = f"{f.metadata['help']} [env {f.metadata['env']}, default {f.default!r}]"
            if f.type in ("bool", bool):
                parser.add_argument(flag, dest=name, action="store_true", default=None, help=text)
            else:
                parser.add_argument(flag, dest=name, default=None, help=text, choices=f.metadata.get("choices"))

    @classmethod
    def from_args(cls, args: argparse.Namespace | None = None, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Flag, then environment, then default; values are converted to each field's type."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw: Any = overrides.get(f.name, getattr(args, f.name, None) if args is not None else None)
            if raw is None:
                raw = environ.get(f.metadata["env"])
            if raw is None:
                continue
            values[f.name] = _convert(f.name, raw, f.default if f.default is not MISSING else None)
        settings = cls(**values)
        settings.validate()
        return settings

    def to_env(self) -> dict[str, str]:
        """Every setting as its environment variable, to hand to child processes."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.metadata["env"]] = ("1" if value else "0") if isinstance(value, bool) else str(value)
        return out

    def validate(self) -> None:
        choices = {f.name: f.metadata.get("choices") for f in fields(self)}
        for name, allowed in choices.items():
            if allowed and getattr(self, name) not in allowed:
                raise SettingsError(f"{name} must be one of {allowed}, not {getattr(self, name)!r}")
        at_least = {
            "batch_size": 1, "max_domains": 1, "stream_maxlen": 1, "dedup_window": 1, "max_event_bytes": 1, "port": 1,
            "archive_port": 1, "archive_batch": 1, "shards": 1,
            "idle_timeout": 0.1, "backoff_cap": 0.01, "claim_idle": 0.01, "stats_interval": 0.01, "lease_ttl": 0.1, "batch_delay": 0,
        }  # fmt: skip
        for name, least in at_least.items():
            if getattr(self, name) < least:
                raise SettingsError(f"{name} must be at least {least}, not {getattr(self, name)}")
        for name in ("port", "archive_port"):
            if getattr(self, name) > 65535:
                raise SettingsError(f"{name} must be at most 65535, not {getattr(self, name)}")
        for name in ("stream", "group", "channel", "archive_group"):
            if not getattr(self, name).strip():
                raise SettingsError(f"{name} must not be empty")
        if self.shards > MAX_SHARDS:
            raise SettingsError(f"shards must be at most {MAX_SHARDS}, not {self.shards}")
        self.shard_indexes()
        self.consumer_roles()
        if self.stream_keep < 1 or self.stream_grace < 0:
            raise SettingsError(f"stream_keep must be at least 1 and stream_grace at least 0, not {self.stream_keep}, {self.stream_grace}")
        check_redis_url(self.redis_url)
        check_webhook_url(self.alert_webhook)
        check_clickhouse_url(self.clickhouse_url)
        self.retention_seconds()
        archive_retention_days(self.archive_retention)
        self._validate_dashboard()

    def _validate_dashboard(self) -> None:
        for name, least in {"max_pages": 1, "max_pages_per_address": 1, "push_backlog": 1 << 14}.items():
            if getattr(self, name) < least:
                raise SettingsError(f"{name} must be at least {least}, not {getattr(self, name)}")


def _convert(name: str, raw: Any, default: Any) -> Any:
    if isinstance(default, bool):
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off", ""):
            return False
        raise SettingsError(f"{name}: not a boolean: {raw!r}")
    if isinstance(default, (int, float)):
        try:
            return type(default)(raw)
        except ValueError:
            raise SettingsError(f"{name}: not a number: {raw!r}") from None
    return str(raw)


def check_redis_url(url: str) -> None:
    """A clear error for a Redis URL that redis-py would reject with a traceback (or misread)."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise SettingsError(f"not a Redis URL: {redact_url_loosely(url)} ({exc})") from None
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise SettingsError(f"not a Redis URL: {redact_url_loosely(url)} (use redis://host:port/db, rediss:// for TLS, or unix://path)")
    if parts.scheme != "unix" and not parts.hostname:
        raise SettingsError(f"not a Redis URL: {redact_url_loosely(url)} (no host)")
    db = parts.path.strip("/")
    if parts.scheme != "unix" and db and not db.isdigit():
        raise SettingsError(f"not a Redis URL: {redact_url_loosely(url)} (the path must be a database number)")
    del port


def check_http_url(name: str, url: str, what: str = "an http(s) URL with a host", hint: str = "", path_depth: int | None = None) -> None:
    """Empty, or an http(s) URL with a host (and at most `path_depth` path segments); SettingsError naming `name`."""
    from urllib.parse import urlsplit

    if not url:
        return
    why = f"not {what}: {redact_url_loosely(url)}"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (it raises ValueError for a port that is not a number)
    except ValueError as exc:
        raise SettingsError(f"{name}: {why} ({exc}){hint}") from None
    too_deep = path_depth is not None and len(parts.path.strip("/").split("/")) > max(path_depth, 1)
    if parts.scheme not in ("http", "https") or not parts.hostname or too_deep:
        raise SettingsError(f"{name}: {why}{hint}")


def check_webhook_url(url: str) -> None:
    """Empty (no webhook), or an http(s) URL with a host."""
    check_http_url("alert_webhook", url)


def check_clickhouse_url(url: str) -> None:
    """Empty (the embedded engine), or http(s)://[user:password@]host[:port][/database]: clickhouse-connect reads
    anything else (`notaurl`) as localhost:8123, silently."""
    hint = " (use http://user:password@host:8123/database, or leave it empty for the embedded engine)"
    check_http_url("clickhouse_url", url, "a ClickHouse URL", hint, path_depth=1)


def redact_url_loosely(url: str) -> str:
    """For a URL that may not even parse: everything between '://' and the last '@' is hidden."""
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        rest = "***@" + rest.rpartition("@")[2]
    return f"{scheme}{sep}{rest}"


def redact_url(url: str) -> str:
    """The URL with any password replaced, for logs."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rpartition("@")[2]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))
