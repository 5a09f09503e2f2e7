#!/usr/bin/env python3
"""The History view's queries (issue 22) on a year of the archive, p95 over repeated runs.

`pipenv run python -m bench.bench_history [--events N] [--runs N]`

N events (default 30 million) spread over 365 days are generated inside ClickHouse (INSERT … SELECT from numbers())
into the archive's own table (archive/table.py's schema) in a temporary directory, with the live feed's mix: 47% commons,
13% wikidata, 12% enwiki, the rest over ~300 wikis; 49% categorize, 41% edit, 8% log, 2% new; 32% bots; page titles
and user names drawn from heavy-tailed distributions (a few very busy pages, about a million distinct ones). The
typed columns are written directly (the queries read only event_time, domain, type, bot, namespace, title, user).
Then each query the page sends for a selection (history_queries.py: the total, the graph, top pages, top editors),
through Archive.query as the archiver's endpoint runs it, for: the issue's two wikis over the year, one month of
them, and every wiki over the year; once on the parts as inserted and once after they are merged. Side by side:
the same without FINAL, and top pages grouped by the strings instead of their hash.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from wikipulse.archive.table import DATA_TABLE, Archive, connect
from wikipulse.core.settings import Settings
from wikipulse.dashboard.history_queries import HistorySelection, graph_sql, top_editors_sql, top_pages_sql, total_sql

YEAR = 365 * 86400
START = 1_764_547_200  # 2025-12-01 00:00 UTC


def generate(archive: Archive, n: int) -> float:
    """n events over the year from START, in time order (as an archive fills); seconds it took."""
    tail = "concat('w', toString(cityHash64(number, 3) % 300), '.wikipedia.org')"
    domain = (
        "multiIf(r < 47, 'commons.wikimedia.org', r < 60, 'www.wikidata.org', r < 72, 'en.wikipedia.org', r < 76, 'de.wikipedia.org', "
        f"r < 79, 'fr.wikipedia.org', r < 81, 'es.wikipedia.org', r < 83, 'ja.wikipedia.org', r < 85, 'ru.wikipedia.org', {tail})"
    )
    kind = "multiIf(s < 49, 'categorize', s < 90, 'edit', s < 98, 'log', 'new')"
    namespace = "toInt32(multiIf(s < 49, 14, u < 70, 0, u < 80, 1, u < 88, 2, u < 93, 4, u < 97, 6, 118))"
    # 2^(20·x) for x uniform in [0, 1): a heavy head and a long tail, about a million distinct titles, 65,000 users.
    title = "concat('Page ', toString(toUInt32(pow(2, (cityHash64(number, 5) % 1000000) / 50000.0))))"
    user = "concat('User ', toString(toUInt32(pow(2, (cityHash64(number, 6) % 1000000) / 62500.0))))"
    started = time.perf_counter()
    archive.client.command(
        f"INSERT INTO {DATA_TABLE} (stream_id, raw, event_time, domain, type, bot, namespace, title, user) "
        f"SELECT concat(toString(number), '-0'), '', toDateTime64({START} + intDiv(number * {YEAR}, {n}), 3, 'UTC'), {domain}, {kind}, "
        f"cityHash64(number, 7) % 100 < 32, {namespace}, {title}, {user} "
        f"FROM (SELECT number, cityHash64(number, 1) % 100 AS r, cityHash64(number, 2) % 100 AS s, cityHash64(number, 4) % 100 AS u "
        f"FROM numbers({n}))",
        settings={"max_insert_threads": 2},
    )
    return time.perf_counter() - started


def p95(archive: Archive, sql: str, runs: int) -> tuple[float, float]:
    """(p95, median) in ms of `runs` runs, after one to warm the caches."""
    archive.query(sql)
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        archive.query(sql)
        times.append((time.perf_counter() - started) * 1000)
    return statistics.quantiles(times, n=20, method="inclusive")[18], statistics.median(times)


def selections() -> dict[str, HistorySelection]:
    two = ("en.wikipedia.org", "de.wikipedia.org")
    return {
        "en + de, the year": HistorySelection(two, START, START + YEAR),
        "en + de, one month": HistorySelection(two, START + 180 * 86400, START + 210 * 86400),
        "every wiki, the year": HistorySelection((), START, START + YEAR),
    }


def measure(archive: Archive, runs: int, state: str) -> None:
    print(f"\n{state}: p95 (median) over {runs} runs, ms")
    print("| selection | total | graph | top pages | top editors | total without FINAL | top pages by strings |")
    print("|---|---|---|---|---|---|---|")
    for name, sel in selections().items():
        strings = top_pages_sql(sel).replace("any(domain) AS site, any(title) AS page", "domain AS site, title AS page")
        strings = strings.replace("GROUP BY cityHash64(domain, title)", "GROUP BY site, page")
        cells = []
        plain = total_sql(sel).replace(" FINAL", "")
        for sql in (total_sql(sel), graph_sql(sel), top_pages_sql(sel), top_editors_sql(sel), plain, strings):
            high, mid = p95(archive, sql, runs)
            cells.append(f"{high:,.0f} ({mid:,.0f})")
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=30_000_000)
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-history-") as tmp:  # the generated archive goes with it
        settings = Settings.from_args(environ={}, archive_dir=str(Path(tmp) / "clickhouse"))
        archive = Archive(connect(settings))
        try:
            archive.ensure_schema()
            loaded = generate(archive, args.events)
            parts = f"SELECT count(), sum(rows), sum(bytes_on_disk) FROM system.parts WHERE table = '{DATA_TABLE}' AND active"
            count, rows, size = archive.client.query(parts).result_rows[0]
            print(f"{rows:,} events over 365 days generated in {loaded:.0f} s: {count} parts, {size / 1e6:,.0f} MB")
            measure(archive, args.runs, f"as inserted ({count} parts)")
            started = time.perf_counter()
            archive.client.command(f"OPTIMIZE TABLE {DATA_TABLE} FINAL")
            count = archive.client.query(parts).result_rows[0][0]
            measure(archive, args.runs, f"merged ({count} parts, OPTIMIZE FINAL took {time.perf_counter() - started:.0f} s)")
        finally:
            archive.close()


if __name__ == "__main__":
    main()
