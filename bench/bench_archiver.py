#!/usr/bin/env python3
"""The archive (ClickHouse, embedded chDB), side by side in one run.

`pipenv run python -m bench.bench_archiver [--events N] [--year-events N]`

1. Throughput: N simulated events in a real Redis stream (as the publisher writes them), archived by the
   archiver (read, insert, XACK, batch by batch) against a baseline that inserts one event at a time; and
   ClickHouse's insert alone, batches of 20,000, into this release's table and the release before's
   (bench/archive_baseline.py), alternated.
2. Bytes per event on disk after the parts are merged, the release before's table against this one, with each
   step between them (and some not taken) measured on the same events.
3. A year-scale question: events a day for one domain over 30 million events spread over a year (the live
   feed's domain mix), with FINAL (each event once), as `history` asks it, on both tables; median of 5.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import orjson

from bench import archive_baseline
from bench.archiver_throughput import archive_stream
from bench.common import redis_server
from wikipulse.archive.table import (
    _E,
    ALIASES,
    CREATE,
    DATA_TABLE,
    EVENT_TIME,
    INSERT_SETTINGS,
    TABLE,
    Archive,
    batch_token,
    connect,
    daily_counts_sql,
)
from wikipulse.core.settings import Settings
from wikipulse.devtools.simulate import Simulator


def one_at_a_time(archive: Archive, lines: list[bytes]) -> float:
    started = time.perf_counter()
    for i, line in enumerate(lines):
        archive.insert([f"{i}-1".encode()], [line], batch_token([f"{i}-1"]))
    return len(lines) / (time.perf_counter() - started)


def bytes_per_event(archive: Archive, table: str) -> float:
    archive.client.command(f"OPTIMIZE TABLE {table} FINAL")
    parts = f"SELECT sum(bytes_on_disk), sum(rows) FROM system.parts WHERE table = '{table}' AND active"
    size, rows = archive.client.query(parts).result_rows[0]
    return float(size / rows)


def insert_rates(archive: Archive, lines: list[bytes], rounds: int = 3) -> tuple[float, float]:
    """Events/s of ClickHouse's insert alone (batches of 20,000, the archiver's settings), into this release's table
    and the release before's, alternated batch by batch so both see the same machine."""
    archive.client.command(archive_baseline.create("rate_before"))
    archive.client.command(CREATE.replace(f"IF NOT EXISTS {DATA_TABLE} (", "IF NOT EXISTS rate_now (", 1))
    spent = {"rate_now": 0.0, "rate_before": 0.0}
    for r in range(rounds):
        for k in range(0, len(lines), 20_000):
            ids = [f"{r}{k + j}-0".encode() for j in range(len(lines[k : k + 20_000]))]
            rows = [[i, line] for i, line in zip(ids, lines[k : k + 20_000], strict=True)]
            for table, settings in (("rate_now", INSERT_SETTINGS), ("rate_before", archive_baseline.INSERT_SETTINGS)):
                started = time.perf_counter()
                archive.client.insert(table, rows, column_names=["stream_id", "raw"], settings=settings)
                spent[table] += time.perf_counter() - started
    n = rounds * len(lines)
    return n / spent["rate_now"], n / spent["rate_before"]


# The steps from the release before's table to this one, each on top of the last (the last is archive.CREATE), and
# steps measured but not taken. Each is (name, columns, ORDER BY).
_KEPT_LZ4 = f"""
    event_time DateTime64(3, 'UTC') DEFAULT {EVENT_TIME}, domain LowCardinality(String) DEFAULT {_E}.meta.domain,
    type LowCardinality(String) DEFAULT {_E}.type, bot Bool DEFAULT {_E}.bot, namespace Int32 DEFAULT {_E}.namespace,
    title String DEFAULT {_E}.title, user String DEFAULT {_E}.user"""
_KEPT_ZSTD = f"""
    event_time DateTime64(3, 'UTC') DEFAULT {EVENT_TIME} CODEC(Delta, ZSTD(1)), domain LowCardinality(String) DEFAULT {_E}.meta.domain,
    type LowCardinality(String) DEFAULT {_E}.type, bot Bool DEFAULT {_E}.bot CODEC(ZSTD(1)),
    namespace Int32 DEFAULT {_E}.namespace CODEC(ZSTD(1)), title String DEFAULT {_E}.title CODEC(ZSTD(1)),
    user String DEFAULT {_E}.user CODEC(ZSTD(1))"""
_KEY64 = "event_key UInt64 MATERIALIZED sipHash64(if(meta_id != '', meta_id, stream_id))"
_BASE_NO_META_ID = archive_baseline.COLUMNS.replace(f"meta_id String DEFAULT {_E}.meta.id", f"meta_id String ALIAS {_E}.meta.id")
_ORDER = "(domain, event_time, event_key)"
_NOW = f"stream_id String CODEC(ZSTD(1)), raw String CODEC(ZSTD(1)), {_KEPT_ZSTD}, {_KEY64}, {ALIASES}"
STEPS = [
    ("meta_id not stored (an ALIAS of raw): it was stored twice, as meta_id and event_key", _BASE_NO_META_ID, _ORDER),
    (
        "event_key a 64-bit digest (UInt64) instead of the 36-character text",
        _BASE_NO_META_ID.replace("event_key String DEFAULT if(meta_id != '', meta_id, stream_id)", _KEY64),
        _ORDER,
    ),
    (
        "only event_time, domain, type, bot, namespace, title, user stored beside raw; the other fields ALIAS",
        f"stream_id String, raw String CODEC(ZSTD(1)), {_KEPT_LZ4}, {_KEY64}, {ALIASES}",
        _ORDER,
    ),
    (
        "ZSTD(1) for the stored typed columns (LZ4 by default), event_time Delta",
        f"stream_id String, raw String CODEC(ZSTD(1)), {_KEPT_ZSTD}, {_KEY64}, {ALIASES}",
        _ORDER,
    ),
    (
        "stream_id ZSTD(1): this release's table",
        f"stream_id String CODEC(ZSTD(1)), raw String CODEC(ZSTD(1)), {_KEPT_ZSTD}, {_KEY64}, {ALIASES}",
        _ORDER,
    ),
]
NOT_TAKEN = [
    ("raw ZSTD(3) (not taken)", _NOW.replace("raw String CODEC(ZSTD(1))", "raw String CODEC(ZSTD(3))"), _ORDER),
    (
        "raw ZSTD(9) (not taken: the insert's CPU)",
        _NOW.replace("raw String CODEC(ZSTD(1))", "raw String CODEC(ZSTD(9))"),
        _ORDER,
    ),
    (
        "ORDER BY (domain, hour, type, event_time, key) (not taken: history's order)",
        _NOW,
        "(domain, toStartOfHour(event_time), type, event_time, event_key)",
    ),
]


def storage_steps(archive: Archive, source: str) -> list[tuple[str, float]]:
    """Bytes an event of each step's table, loaded with the rows of `source` in 10 inserts and merged."""
    out = []
    for name, columns, order in STEPS + NOT_TAKEN:
        archive.client.command("DROP TABLE IF EXISTS step")
        archive.client.command(
            f"CREATE TABLE step ({columns}) ENGINE = ReplacingMergeTree PARTITION BY toYYYYMM(event_time) ORDER BY {order}"
        )
        for k in range(10):
            archive.client.command(
                f"INSERT INTO step (stream_id, raw) SELECT stream_id, raw FROM {source} WHERE cityHash64(stream_id) % 10 = {k}",
                settings=INSERT_SETTINGS,
            )
        out.append((name, bytes_per_event(archive, "step")))
    archive.client.command("DROP TABLE step")
    return out


def year_of_events(archive: Archive, table: str, n: int, start: int) -> None:
    """n events over 365 days, the typed columns written directly (the query reads only those), with the feed's
    domain mix: 47% commons, 13% wikidata, 12% enwiki, the rest over a long tail."""
    archive.client.command(f"TRUNCATE TABLE {table}")
    tail = [f"{lang}.wikipedia.org" for lang in ("de", "fr", "es", "ja", "ru", "it", "zh", "pt", "pl", "nl")]
    slots = ["commons.wikimedia.org"] * 47 + ["www.wikidata.org"] * 13 + ["en.wikipedia.org"] * 12 + tail * 2 + ["other.wikipedia.org"] * 8
    spread = 365 * 86400 / n
    archive.client.command(
        f"INSERT INTO {table} (stream_id, raw, event_time, domain, type, bot) "
        f"SELECT toString(number), '', "
        f"toDateTime64({start} + number * {spread}, 3, 'UTC'), {slots}[1 + (cityHash64(number) % {len(slots)})], "
        f"['categorize', 'edit', 'log', 'new'][1 + (cityHash64(number, 1) % 4)], cityHash64(number, 2) % 100 < 32 "
        f"FROM numbers({n})",
        settings={"max_insert_threads": 2},
    )
    archive.client.command(f"OPTIMIZE TABLE {table} FINAL")


def timed_query(archive: Archive, sql: str, runs: int = 5) -> tuple[float, int]:
    times, rows = [], 0
    for _ in range(runs):
        started = time.perf_counter()
        rows = len(archive.query(sql)[1])
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times), rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--baseline-events", type=int, default=2_000)
    parser.add_argument("--year-events", type=int, default=30_000_000)
    args = parser.parse_args()
    sim = Simulator(seed=5, start=time.time() - args.events / 35, canary_every=0)
    lines = [orjson.dumps(sim.event(i)) for i in range(args.events)]
    with tempfile.TemporaryDirectory() as tmp, redis_server() as server:
        settings = Settings.from_args(environ={}, redis_url=server.url, archive_dir=str(Path(tmp) / "clickhouse"), archive_from_stream=True)
        rate = asyncio.run(archive_stream(settings, lines))
        archive = Archive(connect(settings))
        per_event = bytes_per_event(archive, DATA_TABLE)
        archive.client.command(archive_baseline.create("before"))
        archive.client.command(f"INSERT INTO before (stream_id, raw) SELECT stream_id, raw FROM {DATA_TABLE}", settings=INSERT_SETTINGS)
        before = bytes_per_event(archive, "before")
        steps = storage_steps(archive, DATA_TABLE)
        now_rate, before_rate = insert_rates(archive, lines)
        for table in (DATA_TABLE, "before", "rate_now", "rate_before"):
            archive.client.command(f"TRUNCATE TABLE {table}")
        base = one_at_a_time(archive, lines[: args.baseline_events])
        start = int(time.time()) - 365 * 86400
        started = time.perf_counter()
        for table in (DATA_TABLE, "before"):
            year_of_events(archive, table, args.year_events, start)
        loaded = time.perf_counter() - started
        query = daily_counts_sql("en.wikipedia.org", start, start + 366 * 86400)
        final_ms, days = timed_query(archive, query)
        plain_ms, _ = timed_query(archive, query.replace(" FINAL", ""))
        before_ms, before_days = timed_query(archive, query.replace(f"FROM {TABLE} ", "FROM before "))
        total = archive.query(f"SELECT count() FROM {TABLE}")[1][0][0]
        archive.close()
    print(f"\narchive throughput: {args.events:,} simulated events from a Redis stream into the embedded ClickHouse engine")
    print("| variant | result | vs baseline |")
    print("|---|---|---|")
    print(f"| baseline: one insert per event (on {args.baseline_events:,} of the events) | {base:,.0f} events/s | 1.0× |")
    print(f"| archiver: batches of up to 20,000, raw JSON in, typed columns derived by ClickHouse, XACK after the insert "
          f"| {rate:,.0f} events/s | {rate / base:.0f}× |")  # fmt: skip
    print("\nClickHouse's insert alone, batches of 20,000, 3 rounds alternated")
    print("| table | events/s | vs the release before |")
    print("|---|---|---|")
    print(f"| the release before's (bench/archive_baseline.py) | {before_rate:,.0f} | 1.00× |")
    print(f"| this release's | {now_rate:,.0f} | {now_rate / before_rate:.2f}× |")
    print(f"\non disk, {args.events:,} events, parts merged (bytes an event)")
    print("| table | bytes/event | vs the release before |")
    print("|---|---|---|")
    print(f"| the release before's: raw ZSTD(1) + 22 typed columns | {before:.1f} | 1.00× |")
    for name, size in steps:
        print(f"| + {name} | {size:.1f} | {size / before:.2f}× |")
    print(f"| this release's table as the archiver wrote it | {per_event:.1f} | {per_event / before:.2f}× |")
    print(f"\nyear-scale query: events a day for en.wikipedia.org over {total:,} events in 365 days ({loaded:.0f} s to load both)")
    print("| query | median | rows |")
    print("|---|---|---|")
    print(f"| the release before's table, FINAL | {before_ms:.0f} ms | {before_days} |")
    print(f"| `history` through `events` (Merge), FINAL: each event once | {final_ms:.0f} ms | {days} |")
    print(f"| the same without FINAL | {plain_ms:.0f} ms | {days} |")


if __name__ == "__main__":
    main()
