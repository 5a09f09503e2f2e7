"""Parsing and checking setting values, and redacting URLs for logs: pure functions, no I/O."""

from __future__ import annotations

from wikipulse.core.errors import SettingsError


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
    from wikipulse.core.model import RESOLUTION_BY_NAME

    out: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        if not sep or name not in RESOLUTION_BY_NAME:
            raise SettingsError(f"bad retention {part!r}: use NAME=DURATION with NAME in {sorted(RESOLUTION_BY_NAME)}")
        out[name] = parse_duration(value)
    return out


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
