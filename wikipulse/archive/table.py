"""The archive: every event in ClickHouse, for questions beyond Redis's retention.

One client library, clickhouse-connect, for both engines: with no CLICKHOUSE_URL, the embedded engine
(chDB, `chdb://` DSN) in `archive_dir`; with one, a ClickHouse server. Only one process may open an
embedded directory at a time, so the archiver (which holds it) also answers read-only queries on a
loopback HTTP endpoint (archiver.py), and `sql`/`history` go there while it runs (archive/reader.py).

The table keeps each event's raw JSON and derives the typed columns from it inside ClickHouse (DEFAULT
expressions, in C++): the archiver sends two strings an event, no Python parsing or datetime objects.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import clickhouse_connect
import orjson
from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import ClickHouseError

from wikipulse.core.errors import OperatorError, SettingsError
from wikipulse.core.settings import ArchiveSettings, archive_retention_days

logger = logging.getLogger(__name__)

# Readers (`sql`, `history`, the /history page) query TABLE: a Merge over the data tables, this release's and, on
# an archive the release before wrote, its table renamed (kept as written, readable, not rewritten; README).
TABLE = "events"
DATA_TABLE = "events_v2"  # where the archiver inserts
LEGACY_TABLE = "events_v1"  # the release before's `events`, renamed on this release's first start

# The recentchange fields the table keeps, as one named tuple: `JSONExtract(raw, <this type>)` parses an event once.
EVENT = (
    "Tuple(meta Tuple(id String, dt String, domain String), wiki String, type String, namespace Int32, title String, user String, "
    "bot Bool, minor Bool, length Tuple(old Nullable(Int64), new Nullable(Int64)), revision Tuple(old Nullable(Int64), "
    "new Nullable(Int64)), comment String, log_type String, log_action String, server_name String, id Nullable(Int64), "
    "timestamp Nullable(Int64))"
)
_E = f"JSONExtract(raw, '{EVENT}')"
LATEST_TIME = 7_258_118_400  # 2200-01-01: a `timestamp` outside 1970..2200 is not believed (meta.dt is used)
_META_DT = f"parseDateTime64BestEffortOrZero({_E}.meta.dt, 3, 'UTC')"

# Typed columns of the recentchange schema (mediawiki/recentchange 1.0.0), each derived from `raw`. Every
# expression names the same `JSONExtract` call, and ClickHouse computes an identical expression once per block:
# one JSON parse an event (a JSONExtract per column parsed it twenty times: 23.5 -> 12.8 us an event, BENCHMARKS.md).
# Event time is the edit's own `timestamp`, else `meta.dt` (as the counts are bucketed).
#
# Stored: the raw event (byte for byte) and the columns the history questions filter and group by; every other
# field is an ALIAS, computed from `raw` when read. Every stored column ZSTD(1) (LZ4 by default; ZSTD(3) made `raw`
# bigger here): 216.6 -> 117.8 bytes an event (BENCHMARKS.md, each step measured). ReplacingMergeTree keyed on the
# event, by a 64-bit digest of its meta.id (else its stream id) instead of the 36-character text stored twice: a
# backstop for a retried batch whose boundaries changed (archiver.py); FINAL reads it exactly. Two events collide
# only with the same domain, millisecond and digest.
EVENT_TIME = f"if({_E}.timestamp BETWEEN 0 AND {LATEST_TIME}, toDateTime64(assumeNotNull({_E}.timestamp), 3, 'UTC'), meta_dt)"
ALIASES = f"""
    meta_id String ALIAS {_E}.meta.id,
    meta_dt DateTime64(3, 'UTC') ALIAS {_META_DT},
    wiki LowCardinality(String) ALIAS {_E}.wiki,
    minor Bool ALIAS {_E}.minor,
    length_old Nullable(Int64) ALIAS {_E}.length.old,
    length_new Nullable(Int64) ALIAS {_E}.length.new,
    revision_old Nullable(Int64) ALIAS {_E}.revision.old,
    revision_new Nullable(Int64) ALIAS {_E}.revision.new,
    comment String ALIAS {_E}.comment,
    log_type LowCardinality(String) ALIAS {_E}.log_type,
    log_action LowCardinality(String) ALIAS {_E}.log_action,
    server_name LowCardinality(String) ALIAS {_E}.server_name,
    rc_id Nullable(Int64) ALIAS {_E}.id"""
COLUMNS = f"""
    stream_id String CODEC(ZSTD(1)),
    raw String CODEC(ZSTD(1)),
    event_time DateTime64(3, 'UTC') DEFAULT {EVENT_TIME} CODEC(Delta, ZSTD(1)),
    domain LowCardinality(String) DEFAULT {_E}.meta.domain,
    type LowCardinality(String) DEFAULT {_E}.type,
    bot Bool DEFAULT {_E}.bot CODEC(ZSTD(1)),
    namespace Int32 DEFAULT {_E}.namespace CODEC(ZSTD(1)),
    title String DEFAULT {_E}.title CODEC(ZSTD(1)),
    user String DEFAULT {_E}.user CODEC(ZSTD(1)),
    event_key UInt64 MATERIALIZED sipHash64(if(meta_id != '', meta_id, stream_id)),{ALIASES}
"""

# Partitioned by month, ordered for the common questions (one domain over time). An event's month outside
# 2001..2100 (Wikipedia's first year to a century ahead: odd timestamps) counts as the nearest end's, so one batch
# makes at most 1,200 partitions whatever its times (INSERT_SETTINGS). The dedup window: a retried insert with the
# same token (archiver.batch_token) within the last 10,000 inserts adds nothing.
CREATE = f"""
CREATE TABLE IF NOT EXISTS {DATA_TABLE} ({COLUMNS})
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(greatest(least(event_time, toDateTime64('2100-12-31 23:59:59', 3, 'UTC')), toDateTime64('2001-01-01', 3, 'UTC')))
ORDER BY (domain, event_time, event_key)
SETTINGS non_replicated_deduplication_window = 10000
"""

# What readers see: every column of the recentchange schema, by name, from whichever table holds the event.
READ_COLUMNS = """
    stream_id String, raw String, meta_id String, meta_dt DateTime64(3, 'UTC'), event_time DateTime64(3, 'UTC'),
    domain LowCardinality(String), wiki LowCardinality(String), type LowCardinality(String), namespace Int32, title String,
    user String, bot Bool, minor Bool, length_old Nullable(Int64), length_new Nullable(Int64), revision_old Nullable(Int64),
    revision_new Nullable(Int64), comment String, log_type LowCardinality(String), log_action LowCardinality(String),
    server_name LowCardinality(String), rc_id Nullable(Int64)
"""
CREATE_READ = f"CREATE TABLE IF NOT EXISTS {TABLE} ({READ_COLUMNS}) ENGINE = Merge(currentDatabase(), '^events_v[0-9]+$')"

# No merging of equal keys within an inserted block (a batch never holds an event twice): 13.3 -> 9.4 us an event;
# the token's deduplication and the ReplacingMergeTree's background merges and FINAL are unaffected. One thread:
# on 2 cores the insert shares the machine with Redis and the next read (BENCHMARKS.md, the archive). No cap on
# the partitions one insert makes (ClickHouse refuses more than 100 by default, and the archiver would retry that
# batch forever): the partition key bounds them (CREATE).
# A retried batch's part in the rollups' touch view is deduplicated on its own (archive/rollups.py): written if it was
# lost, dropped if it landed.
INSERT_SETTINGS = {
    "optimize_on_insert": 0,
    "max_threads": 1,
    "max_insert_threads": 1,
    "max_partitions_per_insert_block": 0,
    "deduplicate_blocks_in_dependent_materialized_views": 1,
}

# Every read-only query's limits, for `sql`, `history`, the archiver's endpoint and the /history page alike: a
# person's query must neither hold the archiver's memory nor run for ever. `readonly=1` last, so the limits are
# set before it and the statement itself cannot change them (ClickHouse: "Cannot modify ... in readonly mode").
QUERY_LIMITS: dict[str, int | str] = {
    "max_execution_time": 30,  # seconds
    "max_memory_usage": 1 << 30,  # bytes, the query's own memory in ClickHouse
    "max_result_rows": 100_000,
    "max_result_bytes": 32 << 20,  # the result before it becomes Python rows (~5x this) and JSON
    "result_overflow_mode": "throw",
    "readonly": 1,
}
# ClickHouse's error names for a query stopped at one of the limits.
LIMIT_ERRORS = {
    "TIMEOUT_EXCEEDED": "max_execution_time",
    "MEMORY_LIMIT_EXCEEDED": "max_memory_usage",
    "TOO_MANY_ROWS_OR_BYTES": "max_result_rows/max_result_bytes",
}

READ_ONLY = re.compile(r"^\s*(SELECT|WITH|SHOW|DESCRIBE|DESC|EXPLAIN)\b", re.IGNORECASE)


def query_settings(limits: dict[str, int | str] | None = None) -> dict[str, int | str]:
    """The settings a read-only query runs with: QUERY_LIMITS, any of them overridden, readonly last."""
    merged = {**QUERY_LIMITS, **(limits or {})}
    return {k: v for k, v in merged.items() if k != "readonly"} | {"readonly": 1}


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
    """The TTL expression for ARCHIVE_RETENTION ('400d', '36500d'), or None to keep everything. DateTime64
    arithmetic: `toDateTime(event_time) + INTERVAL N DAY` passed 2106 and wrapped around, so a century deleted every
    event; this cannot wrap within the range settings.archive_retention_days admits. Written as ClickHouse prints it
    in `engine_full`, so an unchanged TTL is recognised and not materialised again."""
    days = archive_retention_days(retention)
    return None if days is None else f"event_time + toIntervalDay({days})"


def stream_id_key(stream_id: bytes | str) -> tuple[int, int]:
    """A Redis stream id ('1764582000000-3') as a comparable (ms, seq)."""
    text = stream_id.decode() if isinstance(stream_id, bytes) else stream_id
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


class QueryRefused(OperatorError):
    """A query stopped at one of QUERY_LIMITS; `limit` names it."""

    def __init__(self, message: str, limit: str) -> None:
        super().__init__(message)
        self.limit = limit


def one_line(exc: BaseException, limit: int = 500) -> str:
    return " ".join(str(exc).split())[:limit]


def dsn(settings: ArchiveSettings) -> str:
    """clickhouse-connect's DSN: the server's URL, or the embedded engine's directory."""
    if settings.clickhouse_url:
        return settings.clickhouse_url
    return f"chdb://{Path(settings.archive_dir).resolve()}"


def connect(settings: ArchiveSettings) -> Client:
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
    """The events tables through one client. Blocking calls: callers on an event loop run them in a thread
    (clickhouse-connect's async client does not support chDB). `limits` override QUERY_LIMITS for `query`."""

    def __init__(self, client: Client, limits: dict[str, int | str] | None = None) -> None:
        self.client = client
        self.settings = query_settings(limits)
        # The highest stream id the release before's table holds: a batch pending across the upgrade whose insert had
        # landed there goes there again with its token, so ClickHouse drops it (tokens are per table).
        self.legacy_until: tuple[int, int] | None = None

    def _tables(self) -> dict[str, tuple[str, str, str]]:
        where = f"database = currentDatabase() AND name LIKE '{TABLE}%'"
        rows = self.client.query(f"SELECT name, engine, engine_full, comment FROM system.tables WHERE {where}").result_rows
        return {str(name): (str(engine), str(full), str(comment)) for name, engine, full, comment in rows}

    def ensure_schema(self, retention: str = "") -> None:
        """The tables, with ARCHIVE_RETENTION as their TTL (changed, set or removed to match the setting). An archive
        the release before wrote (`events` a MergeTree) keeps its rows: that table becomes LEGACY_TABLE, read with
        the new one through the Merge table `events`."""
        ttl = ttl_clause(retention)
        try:
            tables = self._tables()
            if TABLE in tables and tables[TABLE][0] != "Merge":
                if LEGACY_TABLE in tables:
                    raise ArchiveUnavailable(f"both {TABLE} and {LEGACY_TABLE} are tables: move one away")
                self.client.command(f"RENAME TABLE {TABLE} TO {LEGACY_TABLE}")
                logger.info("the archive of the release before is now %s, read through %s beside %s", LEGACY_TABLE, TABLE, DATA_TABLE)
            self.client.command(CREATE)
            self.client.command(CREATE_READ)
            tables = self._tables()
            if LEGACY_TABLE in tables:
                self.legacy_until = self._legacy_until(tables[LEGACY_TABLE][2])
            for table in (DATA_TABLE, LEGACY_TABLE):
                if table in tables:
                    self._set_ttl(table, tables[table][1], ttl)
        except ClickHouseError as exc:
            raise ArchiveUnavailable(one_line(exc, 300)) from exc

    def _legacy_until(self, comment: str) -> tuple[int, int]:
        prefix = "wikipulse: stream ids up to "
        if not comment.startswith(prefix):  # the first start on this archive: found once, kept in the table's comment
            key = "(toUInt64OrZero(splitByChar('-', stream_id)[1]), toUInt64OrZero(splitByChar('-', stream_id)[2]))"
            top = self.client.query(f"SELECT max({key}) FROM {LEGACY_TABLE}").result_rows[0][0]
            comment = f"{prefix}{top[0]}-{top[1]}"
            self.client.command(f"ALTER TABLE {LEGACY_TABLE} MODIFY COMMENT '{comment}'")
        return stream_id_key(comment[len(prefix) :])

    def _set_ttl(self, table: str, engine_full: str, ttl: str | None) -> None:
        if ttl and f" TTL {ttl} " not in f"{engine_full} ":
            self.client.command(f"ALTER TABLE {table} MODIFY TTL {ttl}")
        elif not ttl and " TTL " in engine_full:
            self.client.command(f"ALTER TABLE {table} REMOVE TTL")

    def insert(self, ids: Sequence[bytes], raws: Sequence[bytes], token: str) -> None:
        """Rows of (stream id, raw JSON) as one insert; the same token again inserts nothing."""
        rows = [[i, r] for i, r in zip(ids, raws, strict=True)]
        table = LEGACY_TABLE if self.legacy_until and ids and stream_id_key(ids[0]) <= self.legacy_until else DATA_TABLE
        try:
            self.client.insert(
                table, rows, column_names=["stream_id", "raw"], settings=INSERT_SETTINGS | {"insert_deduplication_token": token}
            )
        except (ClickHouseError, OSError) as exc:
            raise ArchiveUnavailable(str(exc)[:300]) from exc

    def query(self, sql: str) -> tuple[list[str], list[tuple[Any, ...]]]:
        """(column names, rows) of a read-only statement, within the limits (QueryRefused past one)."""
        statement = check_read_only(sql)
        try:
            result = self.client.query(statement, settings=self.settings)
            rows = [tuple(row) for row in result.result_rows]
        except ClickHouseError as exc:
            refused = next((limit for name, limit in LIMIT_ERRORS.items() if f"({name})" in str(exc)), None)
            if refused:
                why = f"refused at the query limit {refused} ({limits_text(self.settings)}): {one_line(exc, 300)}"
                raise QueryRefused(why, refused) from exc
            raise OperatorError(f"ClickHouse: {one_line(exc)}") from exc
        except (ValueError, OverflowError) as exc:  # a value Python cannot hold (a date before year 1)
            raise OperatorError(f"a value in the result cannot be converted: {exc}; select it with toString()") from exc
        return list(result.column_names), rows

    def query_json(self, sql: str) -> bytes:
        """The statement's rows as JSON lines (converted in the caller's thread, not the event loop's)."""
        return json_lines(*self.query(sql))

    def close(self) -> None:
        self.client.close()


def limits_text(settings: dict[str, int | str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in settings.items() if k.startswith("max_"))


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
