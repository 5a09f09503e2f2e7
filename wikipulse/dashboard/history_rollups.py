"""The History view's queries through the archive's rollups (archive/rollups.py), exact as the FINAL ones they replace.

A Plan splits a selection's range in two: the days the rollups cover (each a settled day whose rollups are newer than
any insert into it, within retention) and the rest, read from the events with FINAL as history_queries' SQL does
(the recent hours, a day touched since, the retention edge, an archive not rolled up yet). The total and the graph
add the two parts. With no day covered, the SQL is history_queries' own.

The top lists are exact too, by Fagin's threshold: each covered day keeps its TOP_CAP most edited pages per wiki and
over every wiki, ranked. Candidates are the first M of every day's list in the selection (the wiki's lists, or the
every-wiki list) and the first M of the uncovered part; their totals are summed exactly (the per-page rollup, ordered
by page, and the events). A page that is no candidate has at most, on each day, the count of rank M+1 of its list:
the bound is their sum over the days (the largest over the picked wikis) plus the uncovered part's count at M+1.
When the list's last row has more edits than the bound, no other page can enter it or tie with it, and the list is
the one the plain GROUP BY over every event gives; else M grows, and past TOP_CAP the events are read with FINAL.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from wikipulse.archive import rollups
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
FIRST_M = 40  # candidates a day's list gives at first (x4 each time the bound is not passed)
EVENTS = rollups.TABLE


@dataclass(frozen=True)
class Plan:
    """[a, b) day numbers the rollups answer; [since, until) unix-second ranges the events answer."""

    covered: tuple[tuple[int, int], ...]
    raw: tuple[tuple[int, int], ...]


def coverage_sql(sel: HistorySelection) -> str:
    return rollups.coverage_sql(sel.since // DAY, -(-sel.until // DAY))


def plan_of(rows: list[dict[str, Any]], sel: HistorySelection) -> Plan:
    """The Plan from coverage_sql's rows; a covered day only if it lies whole inside the selection (days are UTC)."""
    days = sorted({int(r["day"]) for r in rows if sel.since <= int(r["day"]) * DAY and (int(r["day"]) + 1) * DAY <= sel.until})
    covered: list[tuple[int, int]] = []
    for d in days:
        if covered and covered[-1][1] == d:
            covered[-1] = (covered[-1][0], d + 1)
        else:
            covered.append((d, d + 1))
    raw: list[tuple[int, int]] = []
    at = sel.since
    for a, b in covered:
        if at < a * DAY:
            raw.append((at, a * DAY))
        at = b * DAY
    if at < sel.until:
        raw.append((at, sel.until))
    return Plan(tuple(covered), tuple(raw))


def plan(ask: Ask, sel: HistorySelection) -> Plan:
    """What the rollups cover of the selection; nothing if the archive has none (an archiver of the release before)."""
    from wikipulse.core.errors import OperatorError

    try:
        return plan_of(ask(coverage_sql(sel)), sel)
    except OperatorError:
        return Plan((), ((sel.since, sel.until),))


def _days(p: Plan) -> str:
    return "(" + " OR ".join(f"(day >= {rollups.day_literal(a)} AND day < {rollups.day_literal(b)})" for a, b in p.covered) + ")"


def _rollup_where(sel: HistorySelection, p: Plan, column: str = "domain") -> str:
    picked = f"{column} IN ({', '.join(map(_quote_domain, sel.domains))}) AND " if sel.domains else ""
    return f"{picked}{_days(p)} AND (day, version) IN {rollups.latest(_days(p))}"


def _raw_where(sel: HistorySelection, p: Plan) -> str:
    picked = f"domain IN ({', '.join(map(_quote_domain, sel.domains))}) AND " if sel.domains else ""
    ranges = " OR ".join(
        f"(event_time >= toDateTime64({int(a)}, 3, 'UTC') AND event_time < toDateTime64({int(b)}, 3, 'UTC'))" for a, b in p.raw
    )
    return f"{picked}({ranges})"


def total_query(sel: HistorySelection, p: Plan) -> str:
    if not p.covered:
        return total_sql(sel)
    parts = [f"SELECT sum(events) AS n FROM {rollups.DAYS} WHERE {_rollup_where(sel, p)}"]
    if p.raw:
        parts.append(f"SELECT count() AS n FROM {EVENTS} FINAL WHERE {_raw_where(sel, p)}")
    return f"SELECT toUInt64(sum(n)) AS events FROM ({' UNION ALL '.join(parts)})"


def graph_query(sel: HistorySelection, p: Plan) -> str:
    if not p.covered:
        return graph_sql(sel)
    bucket, part = sel.bucket, BY[sel.by]
    hourly = bucket.name == "hour"
    ms = "(toInt64(toInt32(day)) * 24 + hour) * 3600000" if hourly else "toInt64(toInt32(day)) * 86400000"
    parts = [
        f"SELECT toInt64({bucket.key_of(ms, 'toYYYYMM(day)')}) AS bucket, {part} AS part, sum(events) AS n "
        f"FROM {rollups.HOURS if hourly else rollups.DAYS} WHERE {_rollup_where(sel, p)} GROUP BY bucket, part"
    ]
    if p.raw:
        parts.append(
            f"SELECT toInt64({bucket.key}) AS bucket, {part} AS part, count() AS n FROM {EVENTS} FINAL "
            f"WHERE {_raw_where(sel, p)} GROUP BY bucket, part"
        )
    return f"SELECT bucket, part, toUInt64(sum(n)) AS events FROM ({' UNION ALL '.join(parts)}) GROUP BY bucket, part ORDER BY bucket, part"


@dataclass(frozen=True)
class TopKind:
    """Top pages or top editors: their rollup tables, the event's field, and how the columns are named."""

    table: str
    top: str
    field: str
    name: str  # the answer's column for the page or editor
    bots: str  # the answer's bots column, from the rollup's `bots`
    raw_bots: str  # the same from the events

    def raw_sql(self, sel: HistorySelection, limit: int) -> str:
        return top_pages_sql(sel, limit) if self.field == "title" else top_editors_sql(sel, limit)


PAGES = TopKind(rollups.PAGES, rollups.PAGES_TOP, "title", "page", "sum(bots) AS by_bots", "countIf(bot)")
EDITORS = TopKind(rollups.EDITORS, rollups.EDITORS_TOP, "user", "editor", "max(bots) AS bot", "toUInt32(max(bot))")


def top_sql(kind: TopKind, sel: HistorySelection, p: Plan, m: int, limit: int = TOP_SIZE) -> str:
    """The list over the candidates of depth m, each row with the bound no other page's total can pass (module)."""
    lists = f"list IN ({', '.join(map(_quote_domain, sel.domains))})" if sel.domains else "list = ''"
    top_where = f"{lists} AND {_days(p)} AND (day, version) IN {rollups.latest(_days(p))}"
    edge = (
        (
            f"SELECT any(domain) AS site, cityHash64(domain, {kind.field}) AS key, any({kind.field}) AS name, toUInt32(count()) AS edits, "
            f"toUInt32(countIf(type = 'new')) AS created, {kind.raw_bots} AS bots FROM {EVENTS} FINAL WHERE {_raw_where(sel, p)} "
            f"AND type IN {rollups.PAGE_TYPES!r} AND {kind.field} != '' GROUP BY key"
        )
        if p.raw
        else ""
    )
    candidates = f"SELECT domain, key FROM {kind.top} WHERE {top_where} AND rank <= {int(m)}"
    if edge:
        candidates += f" UNION ALL SELECT site, key FROM (SELECT site, key FROM ({edge}) ORDER BY edits DESC, key LIMIT {int(m)})"
    rows = [
        f"SELECT domain AS site, key, name, edits, created, bots FROM {kind.table} WHERE {_rollup_where(sel, p)} AND (domain, key) IN cand"
    ]
    bound = f"(SELECT max(s) FROM (SELECT list, sum(edits) AS s FROM {kind.top} WHERE {top_where} AND rank = {int(m) + 1} GROUP BY list))"
    if edge:
        rows.append(f"SELECT site, key, name, edits, created, bots FROM ({edge}) WHERE (site, key) IN cand")
        bound += f" + (SELECT sum(edits) FROM (SELECT edits FROM ({edge}) ORDER BY edits DESC LIMIT 1 OFFSET {int(m)}))"
    return (
        f"WITH cand AS ({candidates}) SELECT any(site) AS site, any(name) AS {kind.name}, sum(edits) AS edits, sum(created) AS created, "
        f"{kind.bots}, toUInt64({bound}) AS bound FROM ({' UNION ALL '.join(rows)}) "
        f"GROUP BY key ORDER BY edits DESC, site, {kind.name} LIMIT {int(limit)}"
    )


def top_list(ask: Ask, kind: TopKind, sel: HistorySelection, p: Plan, limit: int = TOP_SIZE) -> list[dict[str, Any]]:
    """The exact top list: from the rollups when the bound decides it (module), else from the events with FINAL."""
    m = FIRST_M
    while p.covered and m < rollups.TOP_CAP:
        rows = ask(top_sql(kind, sel, p, m, limit))
        if not rows:
            return []  # no page in any list or in the uncovered part: nothing at all
        bound = int(rows[0]["bound"])
        if (len(rows) < limit and bound == 0) or (len(rows) == limit and int(rows[-1]["edits"]) > bound):
            return [{k: v for k, v in row.items() if k != "bound"} for row in rows]
        m *= 4
    return ask(kind.raw_sql(sel, limit))
