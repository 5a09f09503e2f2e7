#!/usr/bin/env python3
"""The archive (ClickHouse, embedded chDB), side by side in one run.

`pipenv run python -m bench.bench_archiver [--events N] [--year-events N]`

1. Throughput: N simulated events in a real Redis stream (as the publisher writes them), archived by the
   archiver (read, insert, XACK, batch by batch) against a baseline that inserts one event at a time.
2. Bytes per event on disk (the raw JSON, ZSTD, plus the typed columns), after the parts are merged.
3. A year-scale question: events a day for one domain over 30 million events spread over a year (the live
   feed's domain mix), with FINAL (each event once), as `history` asks it; median of 5.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import orjson
import redis.asyncio as aioredis

from bench.common import redis_server
from wikipulse import keys
from wikipulse.archive import TABLE, Archive, batch_token, connect, daily_counts_sql
from wikipulse.archiver import Archiver
from wikipulse.fold import summary_of
from wikipulse.settings import Settings
from wikipulse.simulate import Simulator


async def archive_stream(settings: Settings, lines: list[bytes]) -> float:
    """Events/s of the archiver over `lines` loaded into the stream first."""
    async with aioredis.Redis.from_url(settings.redis_url) as client:
        pipe = client.pipeline(transaction=False)
        for line in lines:
            pipe.xadd(settings.stream, {keys.DATA_FIELD: line, keys.FOLD_FIELD: summary_of(orjson.loads(line))})
        await pipe.execute()
        archiver = Archiver(settings, client)
        await archiver.open_archive()
        await archiver.ensure_group()
        started = time.perf_counter()
        task = asyncio.create_task(archiver.consume())
        while int(await client.hget(keys.ARCHIVER_STATS, "archived") or 0) < len(lines):
            await asyncio.sleep(0.01)
        elapsed = time.perf_counter() - started
        task.cancel()
        archiver.close()
    return len(lines) / elapsed


def one_at_a_time(archive: Archive, lines: list[bytes]) -> float:
    started = time.perf_counter()
    for i, line in enumerate(lines):
        archive.insert([f"{i}-1".encode()], [line], batch_token([f"{i}-1"]))
    return len(lines) / (time.perf_counter() - started)


def bytes_per_event(archive: Archive) -> tuple[float, int]:
    archive.client.command(f"OPTIMIZE TABLE {TABLE} FINAL")
    parts = f"SELECT sum(bytes_on_disk), sum(rows) FROM system.parts WHERE table = '{TABLE}' AND active"
    size, rows = archive.client.query(parts).result_rows[0]
    return size / rows, rows


def year_of_events(archive: Archive, n: int, start: int) -> None:
    """n events over 365 days, the typed columns written directly (the query reads only those), with the feed's
    domain mix: 47% commons, 13% wikidata, 12% enwiki, the rest over a long tail."""
    archive.client.command(f"TRUNCATE TABLE {TABLE}")
    tail = [f"{lang}.wikipedia.org" for lang in ("de", "fr", "es", "ja", "ru", "it", "zh", "pt", "pl", "nl")]
    slots = ["commons.wikimedia.org"] * 47 + ["www.wikidata.org"] * 13 + ["en.wikipedia.org"] * 12 + tail * 2 + ["other.wikipedia.org"] * 8
    spread = 365 * 86400 / n
    archive.client.command(
        f"INSERT INTO {TABLE} (stream_id, raw, meta_id, event_key, event_time, domain, type, bot) "
        f"SELECT toString(number), '', toString(number), toString(number), "
        f"toDateTime64({start} + number * {spread}, 3, 'UTC'), {slots}[1 + (cityHash64(number) % {len(slots)})], "
        f"['categorize', 'edit', 'log', 'new'][1 + (cityHash64(number, 1) % 4)], cityHash64(number, 2) % 100 < 32 "
        f"FROM numbers({n})",
        settings={"max_insert_threads": 2},
    )
    archive.client.command(f"OPTIMIZE TABLE {TABLE} FINAL")


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
        per_event, rows = bytes_per_event(archive)
        archive.client.command(f"TRUNCATE TABLE {TABLE}")
        base = one_at_a_time(archive, lines[: args.baseline_events])
        start = int(time.time()) - 365 * 86400
        started = time.perf_counter()
        year_of_events(archive, args.year_events, start)
        loaded = time.perf_counter() - started
        final_ms, days = timed_query(archive, daily_counts_sql("en.wikipedia.org", start, start + 366 * 86400))
        plain_ms, _ = timed_query(archive, daily_counts_sql("en.wikipedia.org", start, start + 366 * 86400).replace(" FINAL", ""))
        total = archive.query(f"SELECT count() FROM {TABLE}")[1][0][0]
        archive.close()
    print(f"\narchive throughput: {args.events:,} simulated events from a Redis stream into the embedded ClickHouse engine")
    print("| variant | result | vs baseline |")
    print("|---|---|---|")
    print(f"| baseline: one insert per event (on {args.baseline_events:,} of the events) | {base:,.0f} events/s | 1.0× |")
    print(f"| archiver: batches of up to 20,000, raw JSON in, typed columns derived by ClickHouse, XACK after the insert "
          f"| {rate:,.0f} events/s | {rate / base:.0f}× |")  # fmt: skip
    print(f"\non disk: {per_event:.0f} bytes per event ({rows:,} events, parts merged; raw JSON with ZSTD(1) plus the typed columns)")
    print(f"\nyear-scale query: events a day for en.wikipedia.org over {total:,} events in 365 days ({loaded:.0f} s to load), median of 5")
    print("| query | median | rows |")
    print("|---|---|---|")
    print(f"| `history` (FINAL: each event once) | {final_ms:.0f} ms | {days} |")
    print(f"| the same without FINAL | {plain_ms:.0f} ms | {days} |")


if __name__ == "__main__":
    main()
