"""The History view's SQL builders, validation and shaping with plain values; then the SQL against the real embedded
engine (chDB) with events whose answers are computed here, a re-delivered event among them."""

from __future__ import annotations

import dataclasses
import random
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

from wikipulse.core.settings import Settings
from wikipulse.dashboard.history_queries import (
    MAX_BUCKETS,
    MONTH,
    HistoryError,
    HistorySelection,
    bucket_for,
    bucket_starts,
    clean_selection,
    default_last_day,
    extent_of,
    graph_figure,
    graph_sql,
    search_from_selection,
    selection_from_search,
    top_editors_sql,
    top_pages_sql,
    total_sql,
    where,
)

TODAY = date(2026, 12, 1)
NOV_1, DEC_1 = 1_793_491_200, 1_796_083_200  # 2026-11-01 and 2026-12-01, 00:00 UTC


def test_the_url_of_the_issue_is_read_and_written_back_the_same() -> None:
    search = "?domains=en.wikipedia.org%2Cde.wikipedia.org&since=2026-11-01&until=2026-11-30&by=type"
    sel = selection_from_search(search, TODAY)
    assert sel == HistorySelection(("en.wikipedia.org", "de.wikipedia.org"), NOV_1, DEC_1, "type")  # until is the last day, included
    assert search_from_selection(sel) == search
    assert selection_from_search("?domains=en.wikipedia.org,de.wikipedia.org&since=2026-11-01&until=2026-11-30", TODAY) == sel


def test_defaults_the_last_30_days_the_archive_holds() -> None:
    assert selection_from_search("", date(2026, 11, 30)) == HistorySelection((), NOV_1, DEC_1, "type")
    assert selection_from_search("?since=2026-11-01", TODAY).until == DEC_1  # 30 days from since
    assert selection_from_search("?until=2026-11-30&by=bot", TODAY) == HistorySelection((), NOV_1, DEC_1, "bot")
    assert selection_from_search("?since=2026-11-05&until=2026-11-05", TODAY).until - NOV_1 == 5 * 86400  # one day
    extent = extent_of([{"first_ms": NOV_1 * 1000, "last_ms": (DEC_1 - 1) * 1000, "rows": 5}])
    assert (extent.first, extent.last) == (date(2026, 11, 1), date(2026, 11, 30))
    assert default_last_day(extent, TODAY) == date(2026, 11, 30)
    assert default_last_day(extent_of([{"first_ms": None, "last_ms": None, "rows": 0}]), TODAY) == TODAY
    future = extent_of([{"first_ms": 0, "last_ms": 4_102_444_800_000, "rows": 1}])  # a hostile 2100 timestamp
    assert default_last_day(future, TODAY) == TODAY


@pytest.mark.parametrize(
    ("search", "message"),
    [
        ("?since=2026-13-01", "since: '2026-13-01' is not a date (no such day)"),
        ("?since=2026-02-30", "no such day"),
        ("?since=２０２６-11-01", "is not a date (YYYY-MM-DD"),  # fullwidth digits
        ("?since=²⁰²⁶-11-01", "is not a date (YYYY-MM-DD"),  # superscripts: str.isdigit() says yes
        ("?until=2026-11-0²", "until: '2026-11-0²' is not a date"),
        ("?since=yesterday", "not a date"),
        ("?since=1700000000", "not a date"),
        ("?since=0001-01-01", "outside what the archive can hold (1970-01-01 to 2199-12-31)"),
        ("?until=9999-12-31", "outside what the archive can hold"),
        ("?since=1969-12-31&until=2026-01-01", "outside"),
        ("?since=2026-11-02&until=2026-11-01", "since (2026-11-02) is after until (2026-11-01)"),
        ("?by=user", "by: 'user' is not one of type, bot, namespace"),
        ("?by=²", "by: '²' is not one of"),
        ("?by=type'--", "not one of"),
        ("?domains=en.wikipedia.org'--", "not a wiki's host name: \"en.wikipedia.org'--\""),
        ("?domains=en.wikipedia.org%27)%20OR%201%3D1%20--", "not a wiki's host name"),
        ("?domains=" + ",".join(f"w{i}.wikipedia.org" for i in range(11)), "at most 10 wikis at once, not 11"),
        ("?domains=EN.wikipedia.org", "not a wiki's host name"),
        ("?domains=" + "a" * 5000, "the address is too long"),
    ],
)
def test_every_crafted_value_gets_a_clear_message(search: str, message: str) -> None:
    with pytest.raises(HistoryError) as refused:
        selection_from_search(search, TODAY)
    assert message in str(refused.value)


@pytest.mark.parametrize("value", [[], ["x"], {"a": 1}, 5, 2.5, True, "x" * 10_000, "2026-11-01T00:00"])
def test_any_json_from_the_browser_is_refused_or_read_never_a_crash(value: Any) -> None:
    for at in range(4):
        args = [value if i == at else None for i in range(4)]
        try:
            sel = clean_selection(args[0], args[1], args[2], args[3], TODAY)
        except HistoryError:
            continue
        assert isinstance(sel, HistorySelection)


def test_the_resolution_follows_the_range_length() -> None:
    day = 86400
    assert [bucket_for(0, n * day).name for n in (1, 31, 32, 744, 745, 5208, 5209, 80000)] == [
        "hour", "hour", "day", "day", "week", "week", "month", "month"]  # fmt: skip
    nov = HistorySelection((), NOV_1, DEC_1)
    assert len(bucket_starts(nov)) == 720 and bucket_starts(nov)[0] == NOV_1
    weeks = bucket_starts(dataclasses.replace(nov, until=NOV_1 + 800 * 86400))
    assert all(datetime.fromtimestamp(w, UTC).weekday() == 0 for w in weeks) and len(weeks) == 116  # weeks start on Monday
    assert weeks[0] <= NOV_1 < weeks[1]
    years = HistorySelection((), 0, 4_102_444_800)  # 1970..2100: months, keyed YYYYMM
    assert years.bucket is MONTH and bucket_starts(years)[:2] == [197001, 197002] and bucket_starts(years)[-1] == 209912
    for since, until in ((NOV_1, DEC_1), (0, 4_102_444_800), (NOV_1, NOV_1 + 800 * 86400), (NOV_1, NOV_1 + 3000 * 86400)):
        assert len(bucket_starts(HistorySelection((), since, until))) <= MAX_BUCKETS + 1 or bucket_for(since, until) is MONTH


def test_sql_is_built_from_validated_values_only() -> None:
    sel = HistorySelection(("en.wikipedia.org", "de.wikipedia.org"), NOV_1, DEC_1, "bot")
    assert where(sel) == (
        "domain IN ('en.wikipedia.org', 'de.wikipedia.org') AND event_time >= toDateTime64(1793491200, 3, 'UTC') "
        "AND event_time < toDateTime64(1796083200, 3, 'UTC')"
    )
    for sql in (total_sql(sel), graph_sql(sel), top_pages_sql(sel), top_editors_sql(sel)):
        assert " FINAL WHERE " in sql and sql.startswith("SELECT") and ";" not in sql
    assert "domain IN" not in where(HistorySelection((), NOV_1, DEC_1))  # every wiki
    with pytest.raises(HistoryError):  # a selection made without clean_selection still cannot quote a quote
        where(HistorySelection(("x' OR 1=1 --",), NOV_1, DEC_1))


def test_the_graph_fills_empty_buckets_and_labels_the_split() -> None:
    sel = HistorySelection(("en.wikipedia.org",), NOV_1, NOV_1 + 3 * 86400, "namespace")
    rows = [{"bucket": NOV_1, "part": 0, "events": 5}, {"bucket": NOV_1 + 7200, "part": 0, "events": 2},
            {"bucket": NOV_1 + 3600, "part": -1, "events": 1}, {"bucket": DEC_1 * 2, "part": 0, "events": 99}]  # fmt: skip
    figure = graph_figure(rows, sel)
    traces = {t["name"]: t for t in figure["data"]}
    assert list(traces) == ["articles", "other namespaces"]
    assert traces["articles"]["y"][:3] == [5, 0, 2] and sum(traces["articles"]["y"]) == 7  # the stray row is dropped
    assert len(traces["articles"]["x"]) == 72 and traces["articles"]["x"][0] == "2026-11-01T00:00:00"
    assert figure["layout"]["barmode"] == "stack" and figure["layout"]["yaxis"]["title"]["text"] == "events per hour"


# ---- against the real embedded engine -------------------------------------------------------------------------

TITLES = ["Main Page", "<img src=x onerror=alert(1)>", "Zürich", "Ünïcödé 'quoted' \"title\"", "Talk:Foo", "A"]
USERS = ["Ann", "Bob", "ExampleBot", "<b>bold</b>", "Zoë"]


def crafted_events(n: int, seed: int) -> list[dict[str, Any]]:
    """Events over October and November 2026 with a known mix; a hostile type among them."""
    rng = random.Random(seed)
    events = []
    for i in range(n):
        kind = rng.choices(["edit", "new", "log", "categorize", "<script>x</script>"], [50, 10, 10, 25, 2])[0]
        events.append({
            "meta": {"domain": rng.choices(["en.wikipedia.org", "de.wikipedia.org", "fr.wikipedia.org", "commons.wikimedia.org"],
                                           [40, 25, 15, 20])[0], "id": f"ev-{seed}-{i}", "dt": "2026-11-01T00:00:00Z"},
            "timestamp": NOV_1 - 20 * 86400 + rng.randrange(50 * 86400), "type": kind, "bot": rng.random() < 0.3,
            "namespace": rng.choice([0, 0, 0, 1, 14, 118]), "title": rng.choices(TITLES, [30, 20, 10, 5, 3, 1])[0],
            "user": rng.choices(USERS, [20, 10, 8, 4, 2])[0],
        })  # fmt: skip
    return events


def expected_rows(events: list[dict[str, Any]], sel: HistorySelection) -> list[dict[str, Any]]:
    """The selection's events, each once (by meta.id), as the archive must count them."""
    unique = {e["meta"]["id"]: e for e in events}
    return [
        e for e in unique.values() if (not sel.domains or e["meta"]["domain"] in sel.domains) and sel.since <= e["timestamp"] < sel.until
    ]


def expected_top(events: list[dict[str, Any]], field: str) -> list[tuple[str, str, int]]:
    counts = Counter((e["meta"]["domain"], e[field]) for e in events if e["type"] in ("edit", "new") and e[field])
    return sorted(((d, v, n) for (d, v), n in counts.items()), key=lambda r: (-r[2], r[0].encode(), r[1].encode()))[:20]


@pytest.fixture
def archive(tmp_path: Path) -> Iterator[Any]:
    pytest.importorskip("chdb")
    from wikipulse.archive.table import Archive, batch_token, connect

    s = Settings.from_args(environ={}, archive_dir=str(tmp_path / "clickhouse"))
    opened = Archive(connect(s))
    opened.ensure_schema()
    events = crafted_events(3000, 7)
    lines = [orjson.dumps(e) for e in events]
    again = lines[::25]  # re-delivered events (the same meta.id), inserted again in another batch: two rows, one event
    for start, chunk in ((0, lines[:1500]), (1500, lines[1500:]), (3000, again)):
        ids = [f"{start + i}-0".encode() for i in range(len(chunk))]
        opened.insert(ids, chunk, batch_token(ids))
    yield opened, events
    opened.close()


def ask(archive: Any, sql: str) -> list[dict[str, Any]]:
    columns, rows = archive.query(sql)
    return [dict(zip(columns, row, strict=True)) for row in rows]


@pytest.mark.parametrize("domains", [("en.wikipedia.org", "de.wikipedia.org"), ()])
def test_the_queries_answer_exactly_what_the_events_say(archive: Any, domains: tuple[str, ...]) -> None:
    opened, events = archive
    assert ask(opened, "SELECT count() AS n FROM events")[0]["n"] == 3000 + 120  # the copies are rows of their own
    for by in ("type", "bot", "namespace"):
        sel = HistorySelection(domains, NOV_1, DEC_1, by)
        picked = expected_rows(events, sel)
        assert ask(opened, total_sql(sel)) == [{"events": len(picked)}]
        figure = graph_figure(ask(opened, graph_sql(sel)), sel)
        shown = {t["name"]: sum(t["y"]) for t in figure["data"]}
        if by == "type":
            kinds = Counter(e["type"] if e["type"] in ("edit", "new", "log", "categorize") else "other" for e in picked)
            assert shown == dict(kinds) and "other" in shown
        elif by == "bot":
            assert shown == dict(Counter("bot" if e["bot"] else "human" for e in picked))
        else:
            names = {0: "articles", 1: "talk", 14: "category"}
            assert shown == dict(Counter(names.get(e["namespace"], "other namespaces") for e in picked))
    pages = [(r["site"], r["page"], r["edits"]) for r in ask(opened, top_pages_sql(sel))]
    assert pages == expected_top(picked, "title")
    editors = [(r["site"], r["editor"], r["edits"]) for r in ask(opened, top_editors_sql(sel))]
    assert editors == expected_top(picked, "user")


# ---- the page's callbacks as plain functions (history_page.load and show), with a plain function for the archive -----


def test_the_page_says_plainly_when_no_archive_runs_and_refuses_a_bad_address() -> None:
    from wikipulse.archive.reader import ArchiveNotRunning
    from wikipulse.dashboard.history_page import load, show

    def nothing(sql: str) -> list[dict[str, Any]]:
        raise ArchiveNotRunning("no archiver answers on 127.0.0.1:8124 (ARCHIVE_PORT) and no CLICKHOUSE_URL is set")

    domains, _, since, until, by, ready, note, refused = load(nothing, "?domains=en.wikipedia.org&by=%C2%B2", TODAY)
    assert note.startswith("No archive is running") and refused.startswith("Refused the address: by: '²' is not one of")
    assert (domains, since, until, by, ready) == ([], "2026-11-02", "2026-12-01", "type", True)  # the default selection
    total, figure, pages, editors, message, _ = show(nothing, HistorySelection((), NOV_1, DEC_1))
    assert total == "–" and figure["data"] == pages == editors == [] and message.startswith("No archive is running")

    def timeout(sql: str) -> list[dict[str, Any]]:
        raise TimeoutError("timed out")

    assert show(timeout, HistorySelection((), NOV_1, DEC_1))[4] == "The archive did not answer: timed out"


def test_hostile_rows_from_the_archive_become_text_and_quoted_links() -> None:
    from wikipulse.dashboard.history_page import editor_rows, page_rows

    rows = page_rows([{"site": "en.wikipedia.org", "page": "<script>x</script> & é", "edits": 3, "created": 1, "by_bots": 0},
                      {"site": "evil.example/x?", "page": "T", "edits": 1, "created": 0, "by_bots": 0}])  # fmt: skip
    link = rows[1].children[0].children
    assert link.children == "<script>x</script> & é" and link.rel == "noopener noreferrer"
    assert link.href == "https://en.wikipedia.org/w/index.php?title=%3Cscript%3Ex%3C%2Fscript%3E_%26_%C3%A9&action=history"
    assert rows[2].children[0].children == "T"  # a wiki that is no host name gets no link at all
    editor = editor_rows([{"site": "de.wikipedia.org", "editor": "Zoë Bot/x", "edits": 2, "created": 0, "bot": True}])[1]
    assert editor.children[0].children.href == "https://de.wikipedia.org/wiki/Special:Contributions/Zo%C3%AB_Bot%2Fx"
