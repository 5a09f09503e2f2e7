"""What the History view (`/history`) asks the archive, and how the answers are shaped: pure, plain values in and out.

Data shapes:
  HistorySelection  validated choices: wikis, [since, until) in unix seconds, the graph's split
  the URL           ?domains=en.wikipedia.org,de.wikipedia.org&since=2026-11-01&until=2026-11-30&by=type
                    (days in UTC; `until` is the last day shown, included)
  rows              what the archive answers: one dict per row, keyed by column name (reader.archive_query's JSON lines)

Every SQL text here is built from validated values only: domains are host names (no quote can occur in one, and
each is checked again where it is quoted), times are integers, the split and the bucket come from fixed tables.
The queries read only event_time, domain, type, bot, namespace, title and user, and each event once: the table is
a ReplacingMergeTree keyed on the event, and FINAL collapses a retried batch's copies (archive/table.py). The page
reads these through the rollups where they cover a range, with the same answers (history_rollups.py).
"""

from __future__ import annotations

import calendar
import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, urlencode

from wikipulse.archive.rollups import PAGE_TYPES
from wikipulse.archive.table import LATEST_TIME, TABLE
from wikipulse.core.events import is_valid_domain
from wikipulse.dashboard.view import MAX_DOMAINS, NAMESPACES, utc_iso

DAY = 86400
EARLIEST = date(1970, 1, 1)
LATEST = datetime.fromtimestamp(LATEST_TIME, UTC).date()  # an event time past it is not believed (archive/table.py)
DEFAULT_DAYS = 30  # the range shown when the URL names none: the last 30 days the archive holds
TOP_SIZE = 20  # rows of the top pages and top editors
MAX_SEARCH = 4096  # characters of a URL's query string read at all
TYPES = ("edit", "new", "log", "categorize")  # the feed's types; anything else is one "other" trace
NAMED_NAMESPACES = tuple(int(n) for n in NAMESPACES if n != "all")  # the rest is one "other namespaces" trace

# The graph's split: an SQL expression of the row (bounded values only: a hostile type is "other", never a trace
# name of its own) and how each value is labelled.
BY = {
    "type": f"if(type IN ({', '.join(repr(t) for t in TYPES)}), type, 'other')",
    "bot": "if(bot, 'bot', 'human')",
    "namespace": f"if(namespace IN ({', '.join(map(str, NAMED_NAMESPACES))}), namespace, -1)",
}
BY_LABELS = {"type": "type", "bot": "bot / human", "namespace": "namespace"}


class HistoryError(ValueError):
    """A value of the URL or the page's controls that cannot become part of a query; the message names it."""


@dataclass(frozen=True)
class Bucket:
    """The graph's resolution. Its key is an SQL expression of a row giving an integer per bucket: the bucket's start
    in unix seconds, or YYYYMM for months (no DateTime conversion, so no year-2106 wrap)."""

    name: str
    seconds: int  # its length (a month's is nominal: 31 days)
    offset: int = 0  # fixed-length buckets start `offset` seconds after the epoch's (weeks on Monday, 1969-12-29)

    def key_of(self, ms: str, month: str) -> str:
        """The key from the row's time: `ms` its unix milliseconds, `month` its YYYYMM (both SQL expressions)."""
        if self.name == "month":
            return month
        if not self.offset:
            return f"intDiv({ms}, {self.seconds * 1000}) * {self.seconds}"
        return f"intDiv({ms} - {self.offset * 1000}, {self.seconds * 1000}) * {self.seconds} + {self.offset}"

    @property
    def key(self) -> str:
        """The key of an event row."""
        return self.key_of("toUnixTimestamp64Milli(event_time)", "toYYYYMM(event_time)")


def _fixed(name: str, seconds: int, offset: int = 0) -> Bucket:
    return Bucket(name, seconds, offset)


MONTH = Bucket("month", 31 * DAY)
# The finest resolution with at most MAX_BUCKETS buckets over the range: hours up to a month, days up to two years,
# weeks up to fourteen, months beyond.
BUCKETS = (_fixed("hour", 3600), _fixed("day", DAY), _fixed("week", 7 * DAY, -3 * DAY), MONTH)
MAX_BUCKETS = 744


def bucket_for(since: int, until: int) -> Bucket:
    for bucket in BUCKETS:
        if (until - since) / bucket.seconds <= MAX_BUCKETS:
            return bucket
    return MONTH


@dataclass(frozen=True)
class HistorySelection:
    domains: tuple[str, ...]  # () is every wiki
    since: int  # unix seconds, a day's start, included
    until: int  # unix seconds, a day's start, excluded
    by: str = "type"

    @property
    def bucket(self) -> Bucket:
        return bucket_for(self.since, self.until)

    @property
    def first_day(self) -> str:
        return _day(self.since).isoformat()

    @property
    def last_day(self) -> str:
        return _day(self.until - DAY).isoformat()


def _day(t: int) -> date:
    return datetime.fromtimestamp(t, UTC).date()


def _start(d: date) -> int:
    return calendar.timegm(d.timetuple())


_DATE = re.compile(r"([0-9]{4})-([0-9]{2})-([0-9]{2})")  # ASCII digits only: "²" is a digit to str.isdigit


def parse_day(text: Any, name: str) -> date:
    """A day as YYYY-MM-DD within what the archive can hold, else HistoryError naming the parameter."""
    shown = repr(str(text)[:40])
    match = _DATE.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise HistoryError(f"{name}: {shown} is not a date (YYYY-MM-DD, in UTC)")
    try:
        day = date(int(match[1]), int(match[2]), int(match[3]))
    except ValueError:
        raise HistoryError(f"{name}: {shown} is not a date (no such day)") from None
    if not EARLIEST <= day < LATEST:
        raise HistoryError(f"{name}: {shown} is outside what the archive can hold ({EARLIEST} to {LATEST - timedelta(days=1)})")
    return day


def clean_domains(domains: Any) -> tuple[str, ...]:
    """The picked wikis (a list, or the URL's comma-separated text), each a host name; none is every wiki."""
    if domains is None:
        return ()
    if isinstance(domains, str):
        domains = [d.strip() for d in domains.split(",") if d.strip()]
    if not isinstance(domains, list):
        raise HistoryError("domains must be a list of wikis")
    if len(domains) > MAX_DOMAINS:
        raise HistoryError(f"at most {MAX_DOMAINS} wikis at once, not {len(domains)}")
    bad = [d for d in domains if not is_valid_domain(d)]
    if bad:
        raise HistoryError(f"not a wiki's host name: {str(bad[0])[:80]!r}")
    return tuple(dict.fromkeys(domains))


def clean_selection(domains: Any, since: Any, until: Any, by: Any, default_last: date) -> HistorySelection:
    """Validate what the browser or the URL sent (any JSON for any value). No since or until: the DEFAULT_DAYS up to
    `default_last` (the archive's last day), or the same length around the one given."""
    picked = clean_domains(domains)
    by = "type" if by in (None, "") else by
    if not isinstance(by, str) or by not in BY:
        raise HistoryError(f"by: {str(by)[:40]!r} is not one of {', '.join(BY)}")
    last = parse_day(until, "until") if until not in (None, "") else None
    first = parse_day(since, "since") if since not in (None, "") else None
    if last is None:
        last = min(first + timedelta(days=DEFAULT_DAYS - 1), LATEST - timedelta(days=1)) if first else default_last
    if first is None:
        first = max(last - timedelta(days=DEFAULT_DAYS - 1), EARLIEST)
    if first > last:
        raise HistoryError(f"since ({first}) is after until ({last})")
    return HistorySelection(picked, _start(first), _start(last) + DAY, by)


def selection_from_search(search: Any, default_last: date) -> HistorySelection:
    """The URL's query string -> a selection; HistoryError for a value that is refused."""
    text = search if isinstance(search, str) else ""
    if len(text) > MAX_SEARCH:
        raise HistoryError(f"the address is too long ({len(text):,} characters of query, at most {MAX_SEARCH:,})")
    query = {k: v[0] for k, v in parse_qs(text.lstrip("?"), keep_blank_values=True).items() if v}
    return clean_selection(query.get("domains"), query.get("since"), query.get("until"), query.get("by"), default_last)


def search_from_selection(sel: HistorySelection) -> str:
    return "?" + urlencode({"domains": ",".join(sel.domains), "since": sel.first_day, "until": sel.last_day, "by": sel.by})


# ---- SQL -------------------------------------------------------------------------------------------------


def _quote_domain(domain: str) -> str:
    if not is_valid_domain(domain):  # every caller validated it: this is the last line, not the check
        raise HistoryError(f"not a wiki's host name: {domain[:80]!r}")
    return f"'{domain}'"


def where(sel: HistorySelection) -> str:
    """The selection's rows: the primary key's (domain, event_time) prefix narrows the parts read."""
    picked = f"domain IN ({', '.join(map(_quote_domain, sel.domains))}) AND " if sel.domains else ""
    return f"{picked}event_time >= toDateTime64({int(sel.since)}, 3, 'UTC') AND event_time < toDateTime64({int(sel.until)}, 3, 'UTC')"


def total_sql(sel: HistorySelection) -> str:
    return f"SELECT count() AS events FROM {TABLE} FINAL WHERE {where(sel)}"


def graph_sql(sel: HistorySelection) -> str:
    return (
        f"SELECT {sel.bucket.key} AS bucket, {BY[sel.by]} AS part, count() AS events FROM {TABLE} FINAL WHERE {where(sel)} "
        f"GROUP BY bucket, part ORDER BY bucket, part"
    )


def top_pages_sql(sel: HistorySelection, limit: int = TOP_SIZE) -> str:
    # Grouped by a 64-bit hash of (domain, title), not the strings: a year holds millions of pages, and a hash table
    # of integers is smaller and cheaper to probe (two pages would merge only on a collision: ~4e9 pages for even odds).
    # The aliases name no column: ClickHouse would read an alias `title` in WHERE as the aggregate.
    return (
        f"SELECT any(domain) AS site, any(title) AS page, count() AS edits, countIf(type = 'new') AS created, "
        f"countIf(bot) AS by_bots FROM {TABLE} FINAL WHERE {where(sel)} AND type IN {PAGE_TYPES!r} AND title != '' "
        f"GROUP BY cityHash64(domain, title) ORDER BY edits DESC, site, page LIMIT {int(limit)}"
    )


def top_editors_sql(sel: HistorySelection, limit: int = TOP_SIZE) -> str:
    return (
        f"SELECT any(domain) AS site, any(user) AS editor, count() AS edits, countIf(type = 'new') AS created, "
        f"max(bot) AS bot FROM {TABLE} FINAL WHERE {where(sel)} AND type IN {PAGE_TYPES!r} AND user != '' "
        f"GROUP BY cityHash64(domain, user) ORDER BY edits DESC, site, editor LIMIT {int(limit)}"
    )


def extent_sql() -> str:
    """What the archive holds: its first and last event times and rows (the parts' min/max index answers it)."""
    return (
        f"SELECT toUnixTimestamp64Milli(min(event_time)) AS first_ms, toUnixTimestamp64Milli(max(event_time)) AS last_ms, "
        f"count() AS rows FROM {TABLE}"
    )


def domains_sql(limit: int = 300) -> str:
    """The picker's wikis, the busiest first (row counts, not FINAL: a label, not a figure)."""
    return f"SELECT domain, count() AS rows FROM {TABLE} GROUP BY domain ORDER BY rows DESC, domain LIMIT {int(limit)}"


# ---- answers -> what the page shows --------------------------------------------------------------------------


@dataclass(frozen=True)
class Extent:
    first: date | None
    last: date | None
    rows: int

    @property
    def text(self) -> str:
        if self.first is None or self.last is None or not self.rows:
            return "The archive holds no events yet."
        return f"The archive holds events from {self.first} to {self.last} ({self.rows:,} rows, re-delivered copies until merged)."


def extent_of(rows: list[dict[str, Any]]) -> Extent:
    row = rows[0] if rows else {}
    n = int(row.get("rows") or 0)
    if not n:
        return Extent(None, None, 0)
    return Extent(_day(int(row["first_ms"]) // 1000), _day(int(row["last_ms"]) // 1000), n)


def default_last_day(extent: Extent, today: date) -> date:
    """The last day a selection without `until` shows: the archive's last (if it is not in the future), else today."""
    last = extent.last if extent.last is not None and extent.last <= today else today
    return min(max(last, EARLIEST), LATEST - timedelta(days=1))


def bucket_starts(sel: HistorySelection) -> list[int]:
    """Every bucket's key over the range, in order: empty buckets are shown as zero, not left out."""
    bucket = sel.bucket
    if bucket is MONTH:
        first, last = _day(sel.since), _day(sel.until - 1)
        months = ((y, m) for y in range(first.year, last.year + 1) for m in range(1, 13))
        return [y * 100 + m for y, m in months if (first.year, first.month) <= (y, m) <= (last.year, last.month)]
    offset = 0 if bucket.name != "week" else -3 * DAY
    start = (sel.since - offset) // bucket.seconds * bucket.seconds + offset
    return list(range(start, sel.until, bucket.seconds))


def key_time(bucket: Bucket, key: int) -> int:
    """A bucket's start in unix seconds."""
    return _start(date(key // 100, key % 100, 1)) if bucket is MONTH else key


def part_label(by: str, part: Any) -> str:
    if by == "namespace":
        return NAMESPACES.get(str(part), "other namespaces")
    return str(part)


def graph_figure(rows: list[dict[str, Any]], sel: HistorySelection) -> dict[str, Any]:
    """Events per bucket, one stacked trace per part of the split (a plain figure dict, as view.make_figure)."""
    keys = bucket_starts(sel)
    at = {k: i for i, k in enumerate(keys)}
    counts: dict[str, list[int]] = {}
    for row in rows:
        i = at.get(int(row["bucket"]))
        if i is None:
            continue  # cannot happen for rows of the range; never an IndexError
        counts.setdefault(part_label(sel.by, row["part"]), [0] * len(keys))[i] += int(row["events"])
    x = [utc_iso(key_time(sel.bucket, k)) for k in keys]
    traces = [{"type": "bar", "x": x, "y": y, "name": name} for name, y in sorted(counts.items(), key=lambda kv: -sum(kv[1]))]
    where_ = ", ".join(sel.domains) if sel.domains else "every wiki"
    grid = {"gridcolor": "#ebf0f8", "zerolinecolor": "#ebf0f8", "linecolor": "#ebf0f8"}
    layout = {
        "barmode": "stack",
        "bargap": 0.1,
        "margin": {"l": 60, "r": 20, "t": 30, "b": 40},
        "yaxis": {"title": {"text": f"events per {sel.bucket.name}"}, "rangemode": "tozero", **grid},
        "xaxis": {"title": {"text": f"UTC · {where_}"}, "type": "date", **grid},
        "legend": {"orientation": "h", "y": -0.15},
        "plot_bgcolor": "white",
        "paper_bgcolor": "white",
        "height": 420,
    }
    return {"data": traces, "layout": layout}


def total_of(rows: list[dict[str, Any]]) -> int:
    return int(rows[0]["events"]) if rows else 0
