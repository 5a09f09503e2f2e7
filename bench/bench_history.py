#!/usr/bin/env python3
"""The History view's queries (issue 22) on a year of the archive, p95 over repeated runs: through the rollups
(archive/rollups.py, dashboard/history_rollups.py) and, side by side in the same run, the FINAL queries over the
events that 7114a4a sent (history_queries' SQL, unchanged).

`pipenv run python -m bench.bench_history [--events N] [--runs N] [--raw-runs N] [--merged]`

N events (default 30 million) spread over the 365 days up to the current hour are generated inside ClickHouse
(INSERT … SELECT from numbers()) into the archive's own table (archive/table.py's schema) in a temporary directory,
with the live feed's mix: 47% commons, 13% wikidata, 12% enwiki, the rest over ~300 wikis; 49% categorize, 41% edit,
8% log, 2% new; 32% bots; page titles and user names drawn from heavy-tailed distributions (a few very busy pages,
about a million distinct ones). The typed columns are written directly (the queries read only event_time, domain,
type, bot, namespace, title, user). The rollups are then built as the archiver builds them (every settled day; the
last day and the current hours stay unsettled: read from the events, as they would be). Then each query the page
sends for a selection (the total, the graph, top pages, top editors; each timed with the coverage query it needs)
for: the issue's two wikis over the year, one month of them, and every wiki over the year. Each answer is checked
against the FINAL query's first.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from wikipulse.archive.rollups import Rollups
from wikipulse.archive.table import DATA_TABLE, Archive, connect
from wikipulse.core.settings import Settings
from wikipulse.dashboard import history_rollups as hr
from wikipulse.dashboard.history_queries import HistorySelection, graph_sql, top_editors_sql, top_pages_sql, total_sql

YEAR = 365 * 86400
START = int(time.time()) // 3600 * 3600 - YEAR  # the year up to this hour: the recent edge is not rolled up


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


def timed(fn: Any, runs: int) -> tuple[float, float]:
    """(p95, median) in ms of `runs` calls, after one to warm the caches."""
    fn()
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1000)
    if len(times) == 1:
        return times[0], times[0]
    return statistics.quantiles(times, n=20, method="inclusive")[18], statistics.median(times)


def selections() -> dict[str, HistorySelection]:
    two = ("en.wikipedia.org", "de.wikipedia.org")
    first = START // 86400 * 86400 + 86400  # whole days, as the page asks: the year's first full day to today's end
    last = (START + YEAR) // 86400 * 86400 + 86400
    return {
        "en + de, the year": HistorySelection(two, first, last),
        "en + de, one month": HistorySelection(two, first + 180 * 86400, first + 210 * 86400),
        "every wiki, the year": HistorySelection((), first, last),
    }


def measure(archive: Archive, runs: int, raw_runs: int, state: str) -> None:
    def ask(sql: str) -> list[dict[str, Any]]:
        columns, rows = archive.query(sql)
        return [dict(zip(columns, row, strict=True)) for row in rows]

    print(f"\n{state}: p95 (median) in ms; rollups over {runs} runs, the FINAL queries (7114a4a's) over {raw_runs}")
    print("| selection | | total | graph | top pages | top editors |")
    print("|---|---|---|---|---|---|")
    for name, sel in selections().items():
        plan = hr.plan(ask, sel)
        ours = {
            "total": lambda sel=sel: ask(hr.total_query(sel, hr.plan(ask, sel))),
            "graph": lambda sel=sel: ask(hr.graph_query(sel, hr.plan(ask, sel))),
            "pages": lambda sel=sel: hr.top_list(ask, hr.PAGES, sel, hr.plan(ask, sel)),
            "editors": lambda sel=sel: hr.top_list(ask, hr.EDITORS, sel, hr.plan(ask, sel)),
        }
        raw = {
            "total": lambda sel=sel: ask(total_sql(sel)),
            "graph": lambda sel=sel: ask(graph_sql(sel)),
            "pages": lambda sel=sel: ask(top_pages_sql(sel)),
            "editors": lambda sel=sel: ask(top_editors_sql(sel)),
        }
        for what in ours:  # the same answers, first
            assert ours[what]() == raw[what](), (name, what)
        cells = [f"{high:,.0f} ({mid:,.0f})" for high, mid in (timed(fn, runs) for fn in ours.values())]
        covered = sum(b - a for a, b in plan.covered)
        print(f"| {name} | rollups ({covered} days covered) | " + " | ".join(cells) + " |", flush=True)
        cells = [f"{high:,.0f} ({mid:,.0f})" for high, mid in (timed(fn, raw_runs) for fn in raw.values())]
        print("| | FINAL over the events | " + " | ".join(cells) + " |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=30_000_000)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--raw-runs", type=int, default=3, help="runs of the FINAL queries (seconds each on a year)")
    parser.add_argument("--merged", action="store_true", help="measure again after OPTIMIZE TABLE … FINAL")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-history-") as tmp:  # the generated archive goes with it
        settings = Settings.from_args(environ={}, archive_dir=str(Path(tmp) / "clickhouse"))
        archive = Archive(connect(settings))
        try:
            archive.ensure_schema()
            rollups = Rollups(archive.client)
            rollups.ensure()
            loaded = generate(archive, args.events)
            parts = f"SELECT count(), sum(rows), sum(bytes_on_disk) FROM system.parts WHERE table = '{DATA_TABLE}' AND active"
            count, rows, size = archive.client.query(parts).result_rows[0]
            print(f"{rows:,} events over 365 days generated in {loaded:.0f} s: {count} parts, {size / 1e6:,.0f} MB")
            started = time.perf_counter()
            days = rollups.build_all()
            took = time.perf_counter() - started
            tables = "FROM system.parts WHERE table LIKE 'rollup_%' AND active GROUP BY table ORDER BY table"
            sizes = archive.client.query(f"SELECT table, sum(rows), sum(bytes_on_disk) {tables}").result_rows
            print(f"rollups of {days} days built in {took:.0f} s ({took / max(days, 1) * 1000:.0f} ms a day): "
                  + ", ".join(f"{t} {r:,} rows {b / 1e6:,.1f} MB" for t, r, b in sizes))  # fmt: skip
            measure(archive, args.runs, args.raw_runs, f"as inserted ({count} parts)")
            if args.merged:
                started = time.perf_counter()
                archive.client.command(f"OPTIMIZE TABLE {DATA_TABLE} FINAL")
                count = archive.client.query(parts).result_rows[0][0]
                measure(
                    archive, args.runs, args.raw_runs, f"merged ({count} parts, OPTIMIZE FINAL took {time.perf_counter() - started:.0f} s)"
                )
        finally:
            archive.close()


if __name__ == "__main__":
    main()
