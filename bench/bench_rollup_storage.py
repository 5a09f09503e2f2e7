#!/usr/bin/env python3
"""What the History view's rollups cost on disk, beside the events they are made from.

`pipenv run python -m bench.bench_rollup_storage [--events N]`: N simulated events (default 3,024,000: a day of the
live feed at 35 events/s, the calibrated simulator's mix of wikis, pages and editors) stamped over the day before
yesterday (a settled day), inserted as the archiver inserts them (batches of 20,000) into the embedded engine, then
rolled up (archive/rollups.py: the day and its month); every table merged (OPTIMIZE FINAL), then the bytes on disk
of each, per distinct event. A day of a month is the worst case for the month tables (they hold what the day does);
a month of days shares its pages and editors between them.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import orjson

from wikipulse.archive.rollups import Rollups
from wikipulse.archive.table import DATA_TABLE, Archive, batch_token, connect
from wikipulse.core.settings import Settings
from wikipulse.devtools.simulate import Simulator


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=3_024_000)
    n = parser.parse_args().events
    day = (int(time.time()) // 86400 - 2) * 86400
    sim = Simulator(seed=5, start=day, rate=n / 86400, canary_every=0)
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings.from_args(environ={}, archive_dir=str(Path(tmp) / "clickhouse"))
        archive = Archive(connect(settings))
        archive.ensure_schema()
        rollups = Rollups(archive.client)
        rollups.ensure()
        for k in range(0, n, 20_000):
            lines = [orjson.dumps(sim.event(i)) for i in range(k, min(n, k + 20_000))]
            ids = [f"{k + j}-0".encode() for j in range(len(lines))]
            archive.insert(ids, lines, batch_token(ids))
        started = time.perf_counter()
        built = rollups.build_all()
        spent = time.perf_counter() - started
        events = int(archive.client.query("SELECT count() FROM events FINAL").result_rows[0][0])
        tables = [DATA_TABLE, *(str(r[0]) for r in archive.client.query(
            "SELECT name FROM system.tables WHERE name LIKE 'rollup_%' AND engine LIKE '%MergeTree%'").result_rows)]  # fmt: skip
        for table in tables:
            archive.client.command(f"OPTIMIZE TABLE {table} FINAL")
        sizes = archive.client.query(
            "SELECT table, sum(bytes_on_disk), sum(rows) FROM system.parts WHERE active AND database = currentDatabase() "
            "GROUP BY table ORDER BY 2 DESC"
        ).result_rows
        archive.close()
    print(f"{events:,} events of one settled day, rolled up ({built} rollups, {spent:.1f} s), bytes on disk an event")
    print("| table | bytes/event | rows |")
    print("|---|---|---|")
    for table, size, rows in sizes:
        print(f"| {table} | {size / events:.2f} | {rows:,} |")
    stored = sum(size for table, size, _ in sizes if table == DATA_TABLE)
    rolled = sum(size for table, size, _ in sizes if str(table).startswith("rollup_"))
    print(f"| **the events** | **{stored / events:.1f}** | |")
    print(f"| **the rollups** | **{rolled / events:.1f}** | |")
    print(f"| **in all** | **{(stored + rolled) / events:.1f}** | |")


if __name__ == "__main__":
    main()
