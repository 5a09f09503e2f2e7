"""The archive's table as the release before this one wrote it (fb9a1d2), for benchmarks to compare against, and
for the migration test (an archive it wrote must keep working). Do not change: it is a record."""

from __future__ import annotations

TABLE = "events"

EVENT = (
    "Tuple(meta Tuple(id String, dt String, domain String), wiki String, type String, namespace Int32, title String, user String, "
    "bot Bool, minor Bool, length Tuple(old Nullable(Int64), new Nullable(Int64)), revision Tuple(old Nullable(Int64), "
    "new Nullable(Int64)), comment String, log_type String, log_action String, server_name String, id Nullable(Int64), "
    "timestamp Nullable(Int64))"
)
_E = f"JSONExtract(raw, '{EVENT}')"
LATEST_TIME = 7_258_118_400

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

CREATE = f"""
CREATE TABLE IF NOT EXISTS {TABLE} ({COLUMNS})
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(event_time)
ORDER BY (domain, event_time, event_key)
SETTINGS non_replicated_deduplication_window = 10000
"""

INSERT_SETTINGS = {"optimize_on_insert": 0, "max_threads": 1, "max_insert_threads": 1}


def ttl_clause(days: int) -> str:
    """The release before's TTL: DateTime (UInt32) arithmetic, which wraps past 2106."""
    return f"toDateTime(event_time) + INTERVAL {days} DAY"


def create(table: str = TABLE) -> str:
    """The old CREATE under another name (a benchmark's side-by-side table)."""
    return CREATE.replace(f"IF NOT EXISTS {TABLE} (", f"IF NOT EXISTS {table} (", 1)
