"""The History view's queries through the archive's rollups (archive/rollups.py), exact as the FINAL ones they replace.

A Plan splits a selection's range in two: the days the rollups cover (each a settled day whose rollups are newer than
any insert into it, within retention) and the rest, read from the events with FINAL as history_queries' SQL does
(the recent hours, a day touched since, the retention edge, an archive not rolled up yet). The total and the graph
add the two parts. With no day covered, the SQL is history_queries' own.

The top lists are exact too, by Fagin's threshold: each covered day and month keeps its TOP_CAP most edited pages per
wiki and over every wiki, ranked (a month's lists made from its days', used while they are of its days' latest
versions). Candidates are the first M of every list in the selection (its months', the other covered days', of the
picked wikis or of every wiki) and the first M of the uncovered part; their totals are summed exactly (the per-page
rollups, ordered by page, and the events). A page that is no candidate has at most, in each list, the count of rank
M+1: the bound is their sum over the lists (the largest over the picked wikis) plus the uncovered part's at M+1.
When the list's last row has more edits than the bound, no other page can enter it or tie with it, and the list is
the one the plain GROUP BY over every event gives; else M grows, and past TOP_CAP the events are read with FINAL.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any

from wikipulse.archive import rollups
from wikipulse.core.errors import OperatorError
from wikipulse.dashboard.history_queries import (
    BY,
    DAY,
    TOP_SIZE,
    HistorySelection,
    _quote_domain,
    graph_sql,
    top_editors_sql,
    top_pages_sql,
    total_sql,
)

Ask = Callable[[str], list[dict[str, Any]]]
FIRST_M = 40  # candidates a list gives at first (x4 each time the bound is not passed)
EVENTS = rollups.TABLE
MAX_SQL = 240_000  # characters of a totals query (its candidates' keys, once a source): ClickHouse parses 256 KiB at most
Ranges = tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class Plan:
    """`covered`: [a, b) day numbers the day rollups answer; `raw`: [since, until) unix seconds the events answer;
    `months`: first days of the months whose lists answer the top lists for every day of theirs."""

    covered: Ranges
    raw: Ranges
    months: tuple[int, ...] = ()


def coverage_sql(sel: HistorySelection) -> str:
    first, end = sel.since // DAY, -(-sel.until // DAY)
    return (
        f"SELECT 'day' AS kind, day FROM ({rollups.coverage_sql(first, end)}) "
        f"UNION ALL SELECT 'month' AS kind, month AS day FROM ({rollups.months_sql(first, end)})"
    )


def _runs(days: list[int]) -> Ranges:
    runs: list[tuple[int, int]] = []
    for d in sorted(set(days)):
        if runs and runs[-1][1] == d:
            runs[-1] = (runs[-1][0], d + 1)
        else:
            runs.append((d, d + 1))
    return tuple(runs)


def _gaps(since: int, until: int, spans: Ranges) -> Ranges:
    """[since, until) in seconds, less the day spans."""
    out: list[tuple[int, int]] = []
    at = since
    for a, b in spans:
        if at < a * DAY:
            out.append((at, a * DAY))
        at = max(at, b * DAY)
    if at < until:
        out.append((at, until))
    return tuple(out)


def _month_end(first: int) -> int:
    d = date(1970, 1, 1) + timedelta(days=first)
    return (date(d.year + d.month // 12, d.month % 12 + 1, 1) - date(1970, 1, 1)).days


def plan_of(rows: list[dict[str, Any]], sel: HistorySelection) -> Plan:
    """The Plan from coverage_sql's rows; a covered day or month only if it lies whole inside the selection (UTC)."""
    inside = [(str(r["kind"]), int(r["day"])) for r in rows]
    covered = _runs([d for kind, d in inside if kind == "day" and sel.since <= d * DAY and (d + 1) * DAY <= sel.until])
    months = tuple(sorted(m for kind, m in inside if kind == "month" and sel.since <= m * DAY and _month_end(m) * DAY <= sel.until))
    return Plan(covered, _gaps(sel.since, sel.until, covered), months)


def plan(ask: Ask, sel: HistorySelection) -> Plan:
    """What the rollups cover of the selection; nothing if the archive has none (an archiver of the release before)."""
    try:
        return plan_of(ask(coverage_sql(sel)), sel)
    except OperatorError:
        return Plan((), ((sel.since, sel.until),))


def _in_days(spans: Ranges) -> str:
    runs: list[tuple[int, int]] = []
    for a, b in sorted(spans):  # adjacent spans as one (a year of months is one range)
        if runs and runs[-1][1] >= a:
            runs[-1] = (runs[-1][0], max(b, runs[-1][1]))
        else:
            runs.append((a, b))
    return "(" + " OR ".join(f"(day >= {rollups.day_literal(a)} AND day < {rollups.day_literal(b)})" for a, b in runs) + ")"


def _picked(sel: HistorySelection, column: str = "domain") -> str:
    return f"{column} IN ({', '.join(map(_quote_domain, sel.domains))}) AND " if sel.domains else ""


def _rollup_where(sel: HistorySelection | None, runs: Ranges, months: bool = False) -> str:
    latest = rollups.latest_months if months else rollups.latest
    return f"{_picked(sel) if sel else ''}{_in_days(runs)} AND (day, version) IN {latest(_in_days(runs))}"


def _raw_where(sel: HistorySelection, ranges: Ranges) -> str:
    spans = " OR ".join(
        f"(event_time >= toDateTime64({int(a)}, 3, 'UTC') AND event_time < toDateTime64({int(b)}, 3, 'UTC'))" for a, b in ranges
    )
    return f"{_picked(sel)}({spans})"


def total_query(sel: HistorySelection, p: Plan) -> str:
    if not p.covered:
        return total_sql(sel)
    parts = [f"SELECT sum(events) AS n FROM {rollups.DAYS} WHERE {_rollup_where(sel, p.covered)}"]
    if p.raw:
        parts.append(f"SELECT count() AS n FROM {EVENTS} FINAL WHERE {_raw_where(sel, p.raw)}")
    return f"SELECT toUInt64(sum(n)) AS events FROM ({' UNION ALL '.join(parts)})"


def graph_query(sel: HistorySelection, p: Plan) -> str:
    if not p.covered:
        return graph_sql(sel)
    bucket, part = sel.bucket, BY[sel.by]
    hourly = bucket.name == "hour"
    ms = "(toInt64(toInt32(day)) * 24 + hour) * 3600000" if hourly else "toInt64(toInt32(day)) * 86400000"
    parts = [
        f"SELECT toInt64({bucket.key_of(ms, 'toYYYYMM(day)')}) AS bucket, {part} AS part, sum(events) AS n "
        f"FROM {rollups.HOURS if hourly else rollups.DAYS} WHERE {_rollup_where(sel, p.covered)} GROUP BY bucket, part"
    ]
    if p.raw:
        parts.append(
            f"SELECT toInt64({bucket.key}) AS bucket, {part} AS part, count() AS n FROM {EVENTS} FINAL "
            f"WHERE {_raw_where(sel, p.raw)} GROUP BY bucket, part"
        )
    return f"SELECT bucket, part, toUInt64(sum(n)) AS events FROM ({' UNION ALL '.join(parts)}) GROUP BY bucket, part ORDER BY bucket, part"


@dataclass(frozen=True)
class TopKind:
    """Top pages or top editors: their rollup tables (per day, per month), the event's field, the answer's columns."""

    table: str
    top: str
    month_table: str
    month_top: str
    field: str
    name: str  # the answer's column for the page or editor
    bots: str  # the answer's bots column, from the rollup's `bots`
    raw_bots: str  # the same from the events

    def raw_sql(self, sel: HistorySelection, limit: int) -> str:
        return top_pages_sql(sel, limit) if self.field == "title" else top_editors_sql(sel, limit)


PAGES = TopKind(rollups.PAGES, rollups.PAGES_TOP, rollups.PAGES_M, rollups.PAGES_TOP_M, "title", "page", "sum(bots) AS by_bots",
                "countIf(bot)")  # fmt: skip
EDITORS = TopKind(rollups.EDITORS, rollups.EDITORS_TOP, rollups.EDITORS_M, rollups.EDITORS_TOP_M, "user", "editor",
                  "max(bots) AS bot", "toUInt32(max(bot))")  # fmt: skip


@dataclass(frozen=True)
class Sources:
    """Where a top list's counts are: month lists, day lists (the covered days outside them), the events (the rest)."""

    months: Ranges
    days: Ranges
    raw: Ranges


def sources(sel: HistorySelection, p: Plan) -> Sources:
    months = tuple((m, _month_end(m)) for m in p.months)
    in_months = {d for a, b in months for d in range(a, b)}
    days = _runs([d for a, b in p.covered for d in range(a, b) if d not in in_months])
    spans = tuple(sorted(months + days))
    return Sources(months, days, _gaps(sel.since, sel.until, spans))


def _edge(kind: TopKind, sel: HistorySelection, raw: Ranges) -> str:
    """The uncovered part's pages (editors) with their counts, from the events with FINAL."""
    return (
        f"SELECT any(domain) AS site, cityHash64(domain, {kind.field}) AS key, any({kind.field}) AS name, toUInt32(count()) AS edits, "
        f"toUInt32(countIf(type = 'new')) AS created, {kind.raw_bots} AS bots FROM {EVENTS} FINAL WHERE {_raw_where(sel, raw)} "
        f"AND type IN {rollups.PAGE_TYPES!r} AND {kind.field} != '' GROUP BY key"
    )


def ranked_sql(kind: TopKind, sel: HistorySelection, src: Sources, m: int) -> str:
    """Every list of the selection to its depth and one more (day_depth), and the uncovered part's (list '~'):
    (list, rank, depth, key, edits)."""
    lists = f"list IN ({', '.join(map(_quote_domain, sel.domains))})" if sel.domains else "list = ''"
    parts = [
        f"SELECT toString(list) AS list, rank, toUInt32({depth}) AS depth, key, edits FROM {table} "
        f"WHERE {lists} AND {_rollup_where(None, runs, months)} AND rank <= {depth + 1}"
        for table, runs, months, depth in ((kind.top, src.days, False, day_depth(src, m)), (kind.month_top, src.months, True, int(m)))
        if runs
    ]
    if src.raw:
        parts.append(
            f"SELECT '~' AS list, toUInt32(row_number() OVER (ORDER BY edits DESC, key)) AS rank, toUInt32({int(m)}) AS depth, key, edits "
            f"FROM (SELECT key, edits FROM ({_edge(kind, sel, src.raw)}) ORDER BY edits DESC, key LIMIT {int(m) + 1})"
        )
    return " UNION ALL ".join(parts)


def day_depth(src: Sources, m: int) -> int:
    """How deep the day lists are read beside month lists: a quarter (a day's 40th page is mostly noise, and the day
    lists of a partial month would give most candidates for little of the bound)."""
    return max(int(m) // 4, 5) if src.months else int(m)


def candidates(rows: list[dict[str, Any]], m: int) -> tuple[list[int], int]:
    """ranked_sql's rows -> (the candidates' keys, the bound no other page's total can pass: the module): a row within
    its list's depth is a candidate; the rows just past it add up to the bound."""
    keys = sorted({int(r["key"]) for r in rows if int(r["rank"]) <= int(r["depth"])})
    after: dict[str, int] = {}
    for r in rows:
        if int(r["rank"]) == int(r["depth"]) + 1:
            after[str(r["list"])] = after.get(str(r["list"]), 0) + int(r["edits"])
    edge = after.pop("~", 0)
    return keys, max(after.values(), default=0) + edge


def totals_sql(kind: TopKind, sel: HistorySelection, src: Sources, keys: list[int], limit: int = TOP_SIZE) -> str:
    """The candidates' exact totals (the per-page rollups, ordered by page key, and the events), the first `limit`."""
    picked = "(" + ", ".join(str(int(k)) for k in keys) + ")"
    rows = [
        f"SELECT domain AS site, key, name, edits, created, bots FROM {table} WHERE key IN {picked} AND {_rollup_where(sel, runs, months)}"
        for table, runs, months in ((kind.table, src.days, False), (kind.month_table, src.months, True))
        if runs
    ]
    if src.raw:
        rows.append(f"SELECT site, key, name, edits, created, bots FROM ({_edge(kind, sel, src.raw)}) WHERE key IN {picked}")
    return (
        f"SELECT any(site) AS site, any(name) AS {kind.name}, sum(edits) AS edits, sum(created) AS created, {kind.bots} "
        f"FROM ({' UNION ALL '.join(rows)}) GROUP BY key ORDER BY edits DESC, site, {kind.name} LIMIT {int(limit)}"
    )


def top_list(ask: Ask, kind: TopKind, sel: HistorySelection, p: Plan, limit: int = TOP_SIZE) -> list[dict[str, Any]]:
    """The exact top list: from the rollups when the bound decides it (module), else from the events with FINAL."""
    src = sources(sel, p)
    m = FIRST_M
    while (src.days or src.months) and m < rollups.TOP_CAP:
        try:
            keys, bound = candidates(ask(ranked_sql(kind, sel, src, m)), m)
            if not keys:
                return []  # no page in any list or in the uncovered part: nothing at all
            totals = totals_sql(kind, sel, src, keys, limit)
            if len(totals) > MAX_SQL:
                break
            rows = ask(totals)
        except OperatorError:  # a query limit (e.g. the ranked rows of many days, deep): the one query over the events
            break
        if (len(rows) < limit and bound == 0) or (len(rows) == limit and int(rows[-1]["edits"]) > bound):
            return rows
        m *= 4
    return ask(kind.raw_sql(sel, limit))
