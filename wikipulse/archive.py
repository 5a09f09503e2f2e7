"""The archive: every event in ClickHouse, for questions beyond Redis's retention.

One client library, clickhouse-connect, for both engines: with no CLICKHOUSE_URL, the embedded engine
(chDB, `chdb://` DSN) in `archive_dir`; with one, a ClickHouse server. Only one process may open an
embedded directory at a time, so the archiver (which holds it) also answers read-only queries on a
loopback HTTP endpoint (archiver.py), and `sql`/`history` go there while it runs (query.py).

The table keeps each event's raw JSON and derives the typed columns from it inside ClickHouse (DEFAULT
expressions, in C++): the archiver sends two strings an event, no Python parsing or datetime objects.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import clickhouse_connect
import orjson
from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import ClickHouseError

from wikipulse.settings import OperatorError, Settings, SettingsError, parse_duration

TABLE = "events"

# The recentchange fields the table keeps, as one named tuple: `JSONExtract(raw, <this type>)` parses an event once.
EVENT = (
    "Tuple(meta Tuple(id String, dt String, domain String), wiki String, type String, namespace Int32, title String, user String, "
    "bot Bool, minor Bool, length Tuple(old Nullable(Int64), new Nullable(Int64)), revision Tuple(old Nullable(Int64), "
    "new Nullable(Int64)), comment String, log_type String, log_action String, server_name String, id Nullable(Int64), "
    "timestamp Nullable(Int64))"
)
_E = f"JSONExtract(raw, '{EVENT}')"
LATEST_TIME = 7_258_118_400  # 2200-01-01: a `timestamp` outside 1970..2200 is not believed (meta.dt is used)

# Typed columns of the recentchange schema (mediawiki/recentchange 1.0.0), each derived from `raw`. Every default
# names the same `JSONExtract` call, and ClickHouse computes an identical expression once per block: one JSON
# parse an event (a JSONExtract per column parsed it twenty times: 23.5 -> 12.8 us an event, BENCHMARKS.md).
# Event time is the edit's own `timestamp`, else `meta.dt` (as the counts are bucketed). ReplacingMergeTree
# keyed on the event: a backstop for a retried batch whose boundaries changed (archiver.py); FINAL reads it exactly.
COLUMNS = f"""
    stream_id String,
    raw String CODEC(ZSTD(1)),
    meta_id String DEFAULT {_E}.meta.id,
    event_key String DEFAULT if(meta_id != '', meta_id, stream_id),
    meta_dt DateTime64(3, 'UTC') DEFAULT parseDateTime64BestEffortOrZero({_E}.meta.dt, 3, 'UTC'),
    event_time DateTime64(3, 'UTC') DEFAULT if(
        {_E}.timestamp BETWEEN 0 AND {LATEST_TIME}, toDateTime64(assumeNotNull({_E}.timestamp), 3, 'UTC'), meta_dt),
    domain LowCardinality(String) DEFAULT {_E}.meta.domain,
    wiki LowCardinality(String) DEFAULT {_E}.wiki,
    type LowCardinality(String) DEFAULT {_E}.type,
    namespace Int32 DEFAULT {_E}.namespace,
    title String DEFAULT {_E}.title,
    user String DEFAULT {_E}.user,
    bot Bool DEFAULT {_E}.bot,
    minor Bool DEFAULT {_E}.minor,
    length_old Nullable(Int64) DEFAULT {_E}.length.old,
    length_new Nullable(Int64) DEFAULT {_E}.length.new,
    revision_old Nullable(Int64) DEFAULT {_E}.revision.old,
    revision_new Nullable(Int64) DEFAULT {_E}.revision.new,
    comment String DEFAULT {_E}.comment,
    log_type LowCardinality(String) DEFAULT {_E}.log_type,
    log_action LowCardinality(String) DEFAULT {_E}.log_action,
    server_name LowCardinality(String) DEFAULT {_E}.server_name,
    rc_id Nullable(Int64) DEFAULT {_E}.id
"""

# Partitioned by month, ordered for the common questions (one domain over time). The dedup window: a retried
# insert with the same token (archiver.batch_token) within the last 10,000 inserts adds nothing.
CREATE = f"""
CREATE TABLE IF NOT EXISTS {TABLE} ({COLUMNS})
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(event_time)
ORDER BY (domain, event_time, event_key)
SETTINGS non_replicated_deduplication_window = 10000
"""

# No merging of equal keys within an inserted block (a batch never holds an event twice): 13.3 -> 9.4 us an event;
# the token's deduplication and the ReplacingMergeTree's background merges and FINAL are unaffected. One thread:
# on 2 cores the insert shares the machine with Redis and the next read (BENCHMARKS.md, the archive).
INSERT_SETTINGS = {"optimize_on_insert": 0, "max_threads": 1, "max_insert_threads": 1}

READ_ONLY = re.compile(r"^\s*(SELECT|WITH|SHOW|DESCRIBE|DESC|EXPLAIN)\b", re.IGNORECASE)


class ArchiveUnavailable(Exception):
    """ClickHouse cannot be reached (a server down, an embedded directory held by another process)."""


def check_read_only(sql: str) -> str:
    """The statement if it only reads (one SELECT, WITH, SHOW, DESCRIBE or EXPLAIN), else SettingsError.
    Queries also run with readonly=1, so ClickHouse itself refuses writes as well."""
    statement = sql.strip().rstrip(";").strip()
    if not READ_ONLY.match(statement):
        raise SettingsError(f"only SELECT, WITH, SHOW, DESCRIBE and EXPLAIN are allowed, not {statement[:40]!r}")
    if ";" in statement:
        raise SettingsError("one statement at a time")
    return statement


def batch_token(ids: Sequence[bytes | str]) -> str:
    """The insert's deduplication token: a digest of the batch's stream ids, so the same batch retried is the same insert."""
    digest = hashlib.sha256(b"\n".join(i if isinstance(i, bytes) else i.encode() for i in ids)).hexdigest()
    return f"wp-{len(ids)}-{digest[:32]}"


def ttl_clause(retention: str) -> str | None:
    """`TTL ...` for ARCHIVE_RETENTION ('400d', '2y' is not a duration: days), or None to keep everything."""
    if not retention.strip():
        return None
    seconds = parse_duration(retention)
    if seconds < 86400:
        raise SettingsError(f"archive_retention must be at least a day, not {retention!r}")
    return f"toDateTime(event_time) + INTERVAL {seconds // 86400} DAY"


def dsn(settings: Settings) -> str:
    """clickhouse-connect's DSN: the server's URL, or the embedded engine's directory."""
    if settings.clickhouse_url:
        return settings.clickhouse_url
    return f"chdb://{Path(settings.archive_dir).resolve()}"


def connect(settings: Settings) -> Client:
    """A client for the configured engine; ArchiveUnavailable if it cannot be opened now."""
    if not settings.clickhouse_url:
        Path(settings.archive_dir).mkdir(parents=True, exist_ok=True)
    try:
        return clickhouse_connect.get_client(dsn=dsn(settings))
    except (ClickHouseError, OSError) as exc:
        held = "Cannot lock file" in str(exc)
        why = f"the embedded archive in {settings.archive_dir} is open in another process (the archiver?)" if held else str(exc)[:300]
        raise ArchiveUnavailable(why) from exc


class Archive:
    """The events table through one client. Blocking calls: callers on an event loop run them in a thread
    (clickhouse-connect's async client does not support chDB)."""

    def __init__(self, client: Client) -> None:
        self.client = client

    def ensure_schema(self, retention: str = "") -> None:
        """The table, with ARCHIVE_RETENTION as its TTL (changed, set or removed to match the setting)."""
        self.client.command(CREATE)
        ttl = ttl_clause(retention)
        engine = str(self.client.command(f"SELECT engine_full FROM system.tables WHERE database = currentDatabase() AND name = '{TABLE}'"))
        if ttl:
            self.client.command(f"ALTER TABLE {TABLE} MODIFY TTL {ttl}")
        elif " TTL " in engine:
            self.client.command(f"ALTER TABLE {TABLE} REMOVE TTL")

    def insert(self, ids: Sequence[bytes], raws: Sequence[bytes], token: str) -> None:
        """Rows of (stream id, raw JSON) as one insert; the same token again inserts nothing."""
        rows = [[i, r] for i, r in zip(ids, raws, strict=True)]
        try:
            self.client.insert(
                TABLE, rows, column_names=["stream_id", "raw"], settings=INSERT_SETTINGS | {"insert_deduplication_token": token}
            )
        except (ClickHouseError, OSError) as exc:
            raise ArchiveUnavailable(str(exc)[:300]) from exc

    def query(self, sql: str) -> tuple[list[str], list[tuple[Any, ...]]]:
        """(column names, rows) of a read-only statement."""
        statement = check_read_only(sql)
        try:
            result = self.client.query(statement, settings={"readonly": 1})
            rows = [tuple(row) for row in result.result_rows]
        except ClickHouseError as exc:
            raise OperatorError(f"ClickHouse: {str(exc).strip()[:500]}") from exc
        except (ValueError, OverflowError) as exc:  # a value Python cannot hold (a date before year 1)
            raise OperatorError(f"a value in the result cannot be converted: {exc}; select it with toString()") from exc
        return list(result.column_names), rows

    def close(self) -> None:
        self.client.close()


def json_lines(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> bytes:
    """One JSON object per row, keyed by column name (dates as ISO 8601)."""
    return b"".join(orjson.dumps(dict(zip(columns, row, strict=True)), default=str, option=orjson.OPT_NAIVE_UTC) + b"\n" for row in rows)


def daily_counts_sql(domain: str, since: int, until: int) -> str:
    """Events a day for one domain (`_all` for every domain), from the archive, each event once (FINAL)."""
    where = "" if domain == "_all" else f"domain = '{domain}' AND "  # validated: a host name has no quote
    return (
        f"SELECT toDate(event_time) AS day, count() AS events, countIf(bot) AS bots, countIf(type = 'new') AS new_pages "
        f"FROM {TABLE} FINAL WHERE {where}event_time >= toDateTime64({since}, 3, 'UTC') AND event_time < toDateTime64({until}, 3, 'UTC') "
        f"GROUP BY day ORDER BY day"
    )
