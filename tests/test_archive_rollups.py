"""The rollups (archive/rollups.py) and the History queries through them (dashboard/history_rollups.py), against the real
embedded engine (chDB): every answer equals the FINAL query's over the events, for random selections, with duplicate
rows, late events into a day already rolled up, a day at the retention edge, and archives of before the rollups; the
top lists equal a plain GROUP BY over the distinct events; and a real archiver makes the rollups as it runs."""

from __future__ import annotations

import asyncio
import dataclasses
import random
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

from tests.helpers import stop, wait_for
from tests.test_subscriber import load_stream
from wikipulse.archive import rollups as rollups_module
from wikipulse.archive.archiver import Archiver
from wikipulse.archive.rollups import STATE, TOUCH_VIEW, Rollups
from wikipulse.archive.table import Archive, QueryRefused, batch_token, connect
from wikipulse.core.settings import Settings
from wikipulse.dashboard import history_rollups as hr
from wikipulse.dashboard.history_queries import HistorySelection, graph_sql, top_editors_sql, top_pages_sql, total_sql

pytest.importorskip("chdb")

DAY = 86400
TODAY = int(time.time()) // DAY  # the events end today: the last days are unsettled, read from the events
DOMAINS = ["en.wikipedia.org", "de.wikipedia.org", "fr.wikipedia.org", "commons.wikimedia.org"]


def heavy_events(n: int, seed: int, first_day: int, days: int) -> list[dict[str, Any]]:
    """Events over `days` days from `first_day`: heavy-tailed pages and users (a few busy, many seen once), the
    feed's types, bots and namespaces, and a hostile type."""
    rng = random.Random(seed)
    events = []
    for i in range(n):
        t = first_day * DAY + rng.randrange(days * DAY)
        kind = rng.choices(["edit", "new", "log", "categorize", "<x>"], [45, 8, 10, 35, 2])[0]
        events.append({
            "meta": {"domain": rng.choices(DOMAINS, [40, 25, 10, 25])[0], "id": f"r{seed}-{i}", "dt": "2026-01-01T00:00:00Z"},
            "timestamp": t, "type": kind, "bot": rng.random() < 0.3, "namespace": rng.choice([0, 0, 0, 1, 2, 14, 118]),
            "title": f"Page {int(2 ** (rng.random() * 12))}", "user": f"User {int(2 ** (rng.random() * 9))}",
        })  # fmt: skip
    return events


def insert(archive: Archive, events: list[dict[str, Any]], first_id: int) -> None:
    lines = [orjson.dumps(e) for e in events]
    for k in range(0, len(lines), 5000):
        ids = [f"{first_id + k + i}-0".encode() for i in range(len(lines[k : k + 5000]))]
        archive.insert(ids, lines[k : k + 5000], batch_token(ids))


def asker(archive: Archive, log: list[str] | None = None) -> hr.Ask:
    def ask(sql: str) -> list[dict[str, Any]]:
        if log is not None:
            log.append(sql)
        columns, rows = archive.query(sql)
        return [dict(zip(columns, row, strict=True)) for row in rows]

    return ask


def assert_same_answers(archive: Archive, sel: HistorySelection) -> hr.Plan:
    """Each History query through the rollups equals the FINAL one over the events."""
    ask = asker(archive)
    covered = hr.plan(ask, sel)
    assert ask(hr.total_query(sel, covered)) == ask(total_sql(sel)), sel
    graph = [(int(r["bucket"]), r["part"], r["events"]) for r in ask(hr.graph_query(sel, covered))]
    assert graph == [(int(r["bucket"]), r["part"], r["events"]) for r in ask(graph_sql(sel))], sel
    assert hr.top_list(ask, hr.PAGES, sel, covered) == ask(top_pages_sql(sel)), sel
    assert hr.top_list(ask, hr.EDITORS, sel, covered) == ask(top_editors_sql(sel)), sel
    return covered


def random_selection(rng: random.Random, first_day: int, last_day: int) -> HistorySelection:
    since = rng.randrange(first_day - 2, last_day)
    until = rng.randrange(since + 1, last_day + 3)
    domains = tuple(rng.sample(DOMAINS, rng.choice([0, 1, 2, 3])))
    return HistorySelection(domains, since * DAY, until * DAY, rng.choice(["type", "bot", "namespace"]))


@pytest.fixture
def archive(tmp_path: Path) -> Iterator[Archive]:
    opened = Archive(connect(Settings.from_args(environ={}, archive_dir=str(tmp_path / "clickhouse"))))
    opened.ensure_schema()
    Rollups(opened.client).ensure()
    yield opened
    opened.close()


def test_rollups_answer_what_final_answers_with_copies_late_events_and_retries(archive: Archive) -> None:
    first = TODAY - 40
    events = heavy_events(20_000, 1, first, 41)
    insert(archive, events, 0)
    copies = events[::7]  # re-delivered: the same meta.id again in other batches (two rows, one event)
    insert(archive, copies, 100_000)
    insert(archive, copies[:5000], 100_000)  # a batch retried with its token: nothing
    rollups = Rollups(archive.client)
    built = rollups.build_all()
    assert built >= 38  # every settled day (today and maybe yesterday are not)
    rng = random.Random(5)
    used = 0
    for _ in range(12):
        covered = assert_same_answers(archive, random_selection(rng, first, TODAY))
        used += bool(covered.covered)
    assert used >= 8
    # The year's range every page asks for, every wiki: from the rollups, the recent edge from the events.
    sel = HistorySelection((), first * DAY, (TODAY + 1) * DAY)
    covered = assert_same_answers(archive, sel)
    assert covered.covered == ((first, TODAY - 1),) or covered.covered == ((first, TODAY),)
    assert covered.months  # a whole month among them: its top lists are the month's (rollups.recompute_month)
    for kind in (hr.PAGES, hr.EDITORS):
        log: list[str] = []
        hr.top_list(asker(archive, log), kind, sel, covered)
        assert len(log) == 2 and all("FROM rollup_" in sql for sql in log)  # decided by the bound at once, not by the FINAL fallback

    # Late events into days already rolled up: those days are read from the events until they are rolled up again.
    late = heavy_events(600, 2, first + 3, 2)
    again = [e for e in events if first + 3 <= e["timestamp"] // DAY < first + 5][:50]
    insert(archive, late + again, 200_000)  # copies among them, again
    sel = HistorySelection(("en.wikipedia.org", "de.wikipedia.org"), first * DAY, (first + 10) * DAY, "bot")
    covered = assert_same_answers(archive, sel)
    assert covered.covered == ((first, first + 3), (first + 5, first + 10)), covered
    assert rollups.build_all() >= 2
    assert assert_same_answers(archive, sel).covered == ((first, first + 10),)

    # Late events into a month whose lists are made: the month's lists are not used until made again from its days.
    year = HistorySelection((), first * DAY, (TODAY + 1) * DAY, "type")
    month = assert_same_answers(archive, year).months[0]
    insert(archive, heavy_events(300, 8, month + 5, 1) + events[-30:], 300_000)
    assert not assert_same_answers(archive, year).months
    rollups.build_all()
    assert assert_same_answers(archive, year).months == (month,)


def test_top_lists_equal_a_plain_group_by_over_the_distinct_events(archive: Archive) -> None:
    first = TODAY - 30
    events = heavy_events(30_000, 3, first, 25)
    insert(archive, events, 0)
    insert(archive, events[::5], 50_000)  # duplicates
    Rollups(archive.client).build_all()
    unique = {e["meta"]["id"]: e for e in events}.values()
    for domains in ((), ("en.wikipedia.org",), ("de.wikipedia.org", "commons.wikimedia.org")):
        sel = HistorySelection(domains, first * DAY, (first + 25) * DAY)
        picked = [e for e in unique if not domains or e["meta"]["domain"] in domains]
        ask = asker(archive)
        covered = hr.plan(ask, sel)
        assert covered.covered == ((first, first + 25),) and not covered.raw
        for kind, field in ((hr.PAGES, "title"), (hr.EDITORS, "user")):
            counts = Counter((e["meta"]["domain"], e[field]) for e in picked if e["type"] in ("edit", "new"))
            expected = sorted(((d, v, n) for (d, v), n in counts.items()), key=lambda r: (-r[2], r[0], r[1]))[:20]
            shown = [(r["site"], r[kind.name], r["edits"]) for r in hr.top_list(ask, kind, sel, covered)]
            assert shown == expected


def test_a_top_list_past_a_query_limit_is_the_one_query_over_the_events(archive: Archive, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by review: thousands of candidates made a totals query past ClickHouse's 256 KiB, and a deep ranked read
    past max_result_rows, and the page said "the archive refused the query". Past either, the list is FINAL's."""
    first = TODAY - 20
    insert(archive, heavy_events(4000, 9, first, 15), 0)
    Rollups(archive.client).build_all()
    sel = HistorySelection(("en.wikipedia.org",), first * DAY, (first + 15) * DAY)
    covered = hr.plan(asker(archive), sel)
    assert covered.covered
    monkeypatch.setattr(hr, "MAX_SQL", 100)  # every totals query is too long
    log: list[str] = []
    assert hr.top_list(asker(archive, log), hr.PAGES, sel, covered) == asker(archive)(top_pages_sql(sel))
    assert "FROM rollup_" in log[0] and "rollup_" not in log[-1] and len(log) == 2  # one ranked read, then FINAL
    monkeypatch.undo()

    def refusing(sql: str) -> list[dict[str, Any]]:
        if "rollup_" in sql:
            raise QueryRefused("the query's result passed its row limit (max_result_rows)", "max_result_rows")
        return asker(archive)(sql)

    assert hr.top_list(refusing, hr.EDITORS, sel, covered) == asker(archive)(top_editors_sql(sel))


def test_a_day_whose_rollup_keeps_failing_is_paced_by_what_it_cost(
    archive: Archive, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Found by review: after a failed recompute the next try came ROLLUP_IDLE later whatever the failure took, so a
    day failing after a long scan could hold the archiver's ClickHouse thread (its inserts) most of the time."""
    monkeypatch.setattr(rollups_module, "ROLLUP_IDLE", 0.0)
    monkeypatch.setattr(rollups_module, "ROLLUP_GAP", 0.0)
    insert(archive, heavy_events(2000, 11, TODAY - 5, 1), 0)
    pacer = rollups_module.Pacer()
    pacer.open(archive.client, "")
    archive.client.command(f"DROP TABLE {rollups_module.DAYS}")  # every recompute now fails, after reading the day
    pacer.step()
    assert "rollups:" in caplog.text  # said, and the day stays due
    assert pacer.at > time.monotonic()  # the next try waits three times what this one took


def test_a_crash_during_a_retention_change_does_it_again_at_the_next_start(archive: Archive) -> None:
    """A longer retention touches every day again (their rollups may have gone with the shorter one's TTL); the note
    of the retention in force is written last, so a start that fails before the touches does them at the next one."""
    insert(archive, heavy_events(500, 12, TODAY - 4, 2), 0)
    rollups = Rollups(archive.client)
    rollups.ensure("10d")

    def touched() -> int:
        return int(archive.client.query(f"SELECT count() FROM {rollups_module.TOUCHED}").result_rows[0][0])

    before = touched()
    archive.client.command("DROP TABLE events")  # the Merge table touch_all reads: the start fails there
    with pytest.raises(Exception, match="events"):
        rollups.ensure("20d")
    archive.ensure_schema()  # the next start
    rollups.ensure("20d")
    assert touched() > before  # the days were touched again


def test_a_day_at_the_retention_edge_is_read_from_the_events(archive: Archive) -> None:
    first = TODAY - 12
    insert(archive, heavy_events(6000, 4, first, 13), 0)
    rollups = Rollups(archive.client)
    rollups.build_all()
    rollups.ensure("10d")  # ARCHIVE_RETENTION=10d: the days from TODAY - 10 back can have lost events to the TTL
    sel = HistorySelection((), first * DAY, (TODAY + 1) * DAY)
    covered = assert_same_answers(archive, sel)
    assert covered.covered and covered.covered[0][0] == TODAY - 9, covered
    assert rollups.due() is None  # nothing at or past the edge is rolled up again
    ttl = archive.client.query(f"SELECT engine_full FROM system.tables WHERE name = '{STATE}'").result_rows[0][0]
    assert "toIntervalDay(11)" in ttl  # the rollups go with the last of their day's events
    rollups.ensure("")  # kept for ever again: every day is made again (the rollups' TTL took some the events still hold)
    assert not assert_same_answers(archive, sel).covered
    rollups.build_all()
    assert assert_same_answers(archive, sel).covered[0][0] == first


def test_archives_of_before_the_rollups_keep_working_and_are_rolled_up(tmp_path: Path) -> None:
    """The release before's `events` (renamed events_v1) and an events_v2 written before the rollups: answered from the
    events at first, rolled up on the archiver's next start."""
    from bench import archive_baseline

    settings = Settings.from_args(environ={}, archive_dir=str(tmp_path / "clickhouse"))
    first = TODAY - 20
    old, new = heavy_events(4000, 5, first, 10), heavy_events(4000, 6, first + 8, 10)
    client = connect(settings)
    client.command(archive_baseline.CREATE)
    ids = [f"{i}-0".encode() for i in range(len(old))]
    client.insert("events", [[i, orjson.dumps(e)] for i, e in zip(ids, old, strict=True)], column_names=["stream_id", "raw"])
    archive = Archive(client)
    try:
        archive.ensure_schema()  # this release without the rollups: events_v1 and events_v2
        insert(archive, new, 10_000)
        sel = HistorySelection(("en.wikipedia.org", "de.wikipedia.org"), first * DAY, (TODAY + 1) * DAY)
        assert not assert_same_answers(archive, sel).covered  # no rollups at all: every query is the FINAL one
        rollups = Rollups(archive.client)
        rollups.ensure()  # the next start: every day it holds is touched, then rolled up in turn
        assert archive.client.query(f"SELECT count() FROM system.tables WHERE name = '{TOUCH_VIEW}'").result_rows == [(1,)]
        assert not assert_same_answers(archive, sel).covered
        assert rollups.build_all() >= 18  # the days, and the months they complete
        assert assert_same_answers(archive, sel).covered == ((first, first + 18),)
    finally:
        archive.close()


async def test_the_archiver_rolls_up_the_days_as_it_archives(
    redis_client: aioredis.Redis, settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(rollups_module, "ROLLUP_GAP", 0.0)  # a day after another (the archiver's pace is 1 s at least)
    monkeypatch.setattr(rollups_module, "ROLLUP_IDLE", 0.2)
    s = dataclasses.replace(settings, archive_dir=str(tmp_path / "clickhouse"), archive_from_stream=True)
    first = TODAY - 8
    events = heavy_events(3000, 7, first, 9)
    await load_stream(redis_client, [orjson.dumps(e) for e in events + events[::10]])  # re-delivered copies among them
    archiver = Archiver(s, redis_client)
    archive = await archiver.open_archive()
    await archiver.ensure_group()
    task = asyncio.create_task(archiver.consume())

    async def rolled_up() -> bool:
        rows = await archiver.call(archive.query, f"SELECT uniqExact(day) FROM {STATE}")
        return int(rows[1][0][0]) >= 7

    try:
        await wait_for(rolled_up, 60, "the settled days rolled up", task)
    finally:
        await stop(task)
    sel = HistorySelection((), first * DAY, (TODAY + 1) * DAY, "namespace")
    covered = await archiver.call(assert_same_answers, archive, sel)
    assert covered.covered and covered.raw
    archiver.close()


def test_the_rollup_sql_quotes_only_host_names() -> None:
    """A selection made without clean_selection still cannot put a quote into the rollups' SQL."""
    from wikipulse.dashboard.history_queries import HistoryError

    hostile = HistorySelection(("x' OR 1=1 --",), (TODAY - 40) * DAY, TODAY * DAY)
    covered = hr.Plan(((TODAY - 40, TODAY - 1),), (((TODAY - 1) * DAY, TODAY * DAY),), (TODAY - 40,))
    src = hr.sources(hostile, covered)
    with pytest.raises(HistoryError):
        hr.total_query(hostile, covered)
    with pytest.raises(HistoryError):
        hr.graph_query(hostile, covered)
    with pytest.raises(HistoryError):
        hr.ranked_sql(hr.PAGES, hostile, src, 40)
    with pytest.raises(HistoryError):
        hr.totals_sql(hr.EDITORS, hostile, src, [1, 2])
    assert hr.candidates([], 40) == ([], 0)
