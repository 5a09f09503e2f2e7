"""Rollups: what the History view asks, pre-aggregated per settled day FROM the events with FINAL, so each event once.

The events table is a ReplacingMergeTree: a retried batch or a re-delivered event can leave two rows of one event
until a merge, and FINAL reads it exactly (table.py). A materialized view counting inserted rows would count both
copies, so the rollups are not fed by inserts: each day is computed from `events FINAL` as a whole, and recomputed
whenever an insert touches it. Readers (dashboard/history_queries.py) read the rollups for the days they cover and
the events (FINAL) for the rest of a range: the recent unsettled hours, a day touched since it was computed, a day at
the retention edge, anything an archive has not rolled up yet. Every answer is the one FINAL gives (tested).

Tables (all in the archive's database, none matching the `events` Merge table's pattern):
  rollup_touched   (day, at): a materialized view on events_v2 writes each inserted block's days, at = the insert's
                   time (µs); so the archiver's retries and kill -9 cannot lose one, its inserts run with
                   deduplicate_blocks_in_dependent_materialized_views (a retried insert whose view part was lost
                   writes it, one that landed whole writes nothing).
  rollup_state     (day, version): a day's rollups complete as of `version` (ClickHouse's clock, µs, taken before
                   the day was read). A day is covered iff its latest version is newer than its latest touch, it
                   is settled, and no event of it has reached the retention TTL.
  rollup_days      day x domain x type x bot x namespace: events        (the total, graphs by day/week/month)
  rollup_hours     the same per hour                                     (graphs by hour: ranges up to 31 days)
  rollup_pages     page x day: domain, edits, created, by bots            (ordered by page key: exact totals of a few)
  rollup_pages_top day x list x rank: the day's TOP_CAP most edited pages of each wiki (list = domain) and of every
                   wiki (list = ''), for the exact top lists' candidates and bound (history_rollups.top_list)
  rollup_editors, rollup_editors_top   the same for editors (bot: max)
  rollup_month_state, rollup_*_m       the lists per month, made from the month's days' rollups once none is due;
                   `sig` digests the day versions they are of: used only while it equals the days' latest
Rows carry their version and readers take each day's latest: a recompute writes rows, then the state row, so a
crash between leaves rows nobody reads. Plain MergeTrees: nothing merges away a version a reader may still use.

A day is computed by the archiver in its ClickHouse thread, between two inserts (Pacer.step), never
concurrently with one: every insert before the recompute is in what it reads and has touched before `version`,
every insert after it touches after. That is what makes "touched after its version" exact. Its cost is bounded to a
quarter of that thread's time (BENCHMARKS.md).
"""

from __future__ import annotations

import logging
import time

from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import ClickHouseError

from wikipulse.archive.table import DATA_TABLE, TABLE, ArchiveUnavailable, one_line

__all__ = ["TABLE"]  # what the rollups are computed from, for their readers
from wikipulse.core import model
from wikipulse.core.settings import archive_retention_days

logger = logging.getLogger(__name__)

TOUCHED, TOUCH_VIEW, STATE = "rollup_touched", "rollup_touch_view", "rollup_state"
DAYS, HOURS = "rollup_days", "rollup_hours"
PAGES, PAGES_TOP, EDITORS, EDITORS_TOP = "rollup_pages", "rollup_pages_top", "rollup_editors", "rollup_editors_top"
MONTH_STATE = "rollup_month_state"
PAGES_M, PAGES_TOP_M, EDITORS_M, EDITORS_TOP_M = "rollup_pages_m", "rollup_pages_top_m", "rollup_editors_m", "rollup_editors_top_m"
SCRATCH = "rollup_scratch"  # a Memory table: one day's (month's) pages or editors while its ranks are made
TABLES = (TOUCHED, STATE, DAYS, HOURS, PAGES, PAGES_TOP, EDITORS, EDITORS_TOP)
MONTH_TABLES = (MONTH_STATE, PAGES_M, PAGES_TOP_M, EDITORS_M, EDITORS_TOP_M)  # `day`: the month's first
# (day table, day top, month table, month top, the event's field, its bots column, how a day's bots add up)
LISTS = (
    (PAGES, PAGES_TOP, PAGES_M, PAGES_TOP_M, "title", "countIf(bot)", "sum(bots)"),
    (EDITORS, EDITORS_TOP, EDITORS_M, EDITORS_TOP_M, "user", "toUInt32(max(bot))", "max(bots)"),
)
# Made in the archiver's ClickHouse thread between inserts, at most a quarter of its time: after a day that took t
# seconds, the next waits 3t (at least ROLLUP_GAP); with nothing due, the next look is ROLLUP_IDLE later.
ROLLUP_GAP, ROLLUP_IDLE = 1.0, 5.0
SETTLE = 3600  # seconds after its end a day is first rolled up (late events after that recompute it)
TOP_CAP = 1000  # ranks kept per (day, list): a top list needs its candidates' ranks and one more
PAGE_TYPES = ("edit", "new")  # what counts as editing a page (as the live lists count it: pages.PAGE_TYPES)
# Types outside the feed's known ones are one 'other' (a hostile type is never a row of its own).
TYPE = f"if(type IN ({', '.join(repr(t) for t in model.EVENT_TYPES if t != 'other')}), type, 'other')"
NOW_US = "toUnixTimestamp64Micro(now64(6, 'UTC'))"
TODAY = "toInt32(toDate32(now('UTC')))"
RETENTION_NOTE = "wikipulse: retention "
# ARCHIVE_RETENTION in days, 0 for none, as readers find it (the state table's comment, set by the archiver).
RETENTION = (
    f"(SELECT toInt32OrZero(extract(comment, 'retention ([0-9]+)')) FROM system.tables "
    f"WHERE database = currentDatabase() AND name = '{STATE}')"
)


def counts_columns(hourly: bool) -> str:
    hour = "hour UInt8, " if hourly else ""
    return (
        f"day Date32, {hour}domain LowCardinality(String), type LowCardinality(String), bot Bool, namespace Int32, "
        "events UInt64, version UInt64"
    )


def _create(name: str, columns: str, order: str) -> str:
    # Granules of 1,024 rows (8,192 by default): a top list reads a few hundred pages' rows by key, each a granule.
    return (
        f"CREATE TABLE IF NOT EXISTS {name} ({columns}) ENGINE = MergeTree PARTITION BY toYear(day) ORDER BY ({order}) "
        f"SETTINGS index_granularity = 1024"
    )


COUNTS = "edits UInt32, created UInt32, bots UInt32"
LIST_COLUMNS = f"domain LowCardinality(String), key UInt64, day Date32, name String, {COUNTS}, version UInt64"
TOP_COLUMNS = (
    "day Date32, list LowCardinality(String), rank UInt32, domain LowCardinality(String), key UInt64, edits UInt32, version UInt64"
)
CREATE = (
    f"CREATE TABLE IF NOT EXISTS {TOUCHED} (day Date32, at UInt64) ENGINE = ReplacingMergeTree(at) ORDER BY day "
    f"SETTINGS non_replicated_deduplication_window = 10000",
    f"CREATE TABLE IF NOT EXISTS {STATE} (day Date32, version UInt64) ENGINE = ReplacingMergeTree(version) ORDER BY day",
    _create(DAYS, counts_columns(False), "day, domain, type, bot, namespace"),
    _create(HOURS, counts_columns(True), "day, hour, domain, type, bot, namespace"),
    _create(PAGES, LIST_COLUMNS, "key, day"),
    _create(EDITORS, LIST_COLUMNS, "key, day"),
    _create(PAGES_TOP, TOP_COLUMNS, "day, list, rank"),
    _create(EDITORS_TOP, TOP_COLUMNS, "day, list, rank"),
    f"CREATE TABLE IF NOT EXISTS {MONTH_STATE} (day Date32, version UInt64, sig UInt64) ENGINE = ReplacingMergeTree(version) ORDER BY day",
    _create(PAGES_M, LIST_COLUMNS, "key, day"),
    _create(EDITORS_M, LIST_COLUMNS, "key, day"),
    _create(PAGES_TOP_M, TOP_COLUMNS, "day, list, rank"),
    _create(EDITORS_TOP_M, TOP_COLUMNS, "day, list, rank"),
    f"CREATE TABLE IF NOT EXISTS {SCRATCH} (domain String, key UInt64, name String, {COUNTS}) ENGINE = Memory",
)
VIEW = (
    f"CREATE MATERIALIZED VIEW IF NOT EXISTS {TOUCH_VIEW} TO {TOUCHED} AS "
    f"SELECT DISTINCT toDate32(event_time) AS day, {NOW_US} AS at FROM {DATA_TABLE}"
)


def day_literal(day: int) -> str:
    """A day (days since 1970-01-01) as a Date32 literal."""
    return f"toDate32('1970-01-01') + {int(day)}"


def latest(where: str) -> str:
    """(day, version) of each day's latest rollup, for `IN`."""
    return f"(SELECT day, max(version) FROM {STATE} WHERE {where} GROUP BY day)"


def coverage_sql(first_day: int, end_day: int) -> str:
    """The days of [first_day, end_day) the rollups cover, as day numbers (see the module)."""
    days = f"day >= {day_literal(first_day)} AND day < {day_literal(end_day)}"
    return (
        f"SELECT toInt32(s.day) AS day FROM (SELECT day, max(version) AS v FROM {STATE} WHERE {days} GROUP BY day) AS s "
        f"LEFT JOIN (SELECT day, max(at) AS t FROM {TOUCHED} WHERE {days} GROUP BY day) AS t ON s.day = t.day "
        f"WHERE t.t < s.v AND ({RETENTION} = 0 OR toInt32(s.day) + {RETENTION} > {TODAY}) ORDER BY day"
    )


def _latest_days(where: str) -> str:
    return f"(SELECT day, max(version) AS v FROM {STATE} WHERE {where} GROUP BY day)"


def _stale_months() -> str:
    """Months with a day touched since its rollups (or never rolled up, or not settled)."""
    return (
        f"(SELECT DISTINCT toDate32(toStartOfMonth(t.day)) FROM (SELECT day, max(at) AS at FROM {TOUCHED} GROUP BY day) AS t "
        f"LEFT JOIN {_latest_days('1')} AS s ON t.day = s.day WHERE t.at >= s.v)"
    )


def _month_sigs(where: str) -> str:
    """Each month's signature: its days' latest versions (a month's lists are of exactly those)."""
    return f"(SELECT toDate32(toStartOfMonth(day)) AS m, sum(cityHash64(day, v)) AS sig FROM {_latest_days(where)} GROUP BY m)"


def _months_usable(where: str) -> str:
    return (
        f"SELECT toInt32(d.m) AS month FROM {_month_sigs(where)} AS d "
        f"JOIN (SELECT day AS m, argMax(sig, version) AS sig FROM {MONTH_STATE} GROUP BY day) AS ms ON d.m = ms.m "
        f"WHERE d.sig = ms.sig AND d.m NOT IN {_stale_months()} AND ({RETENTION} = 0 OR toInt32(d.m) + {RETENTION} > {TODAY})"
    )


def months_sql(first_day: int, end_day: int) -> str:
    """The months whose lists answer for every day of theirs, as their first day's number (see Rollups.recompute_month)."""
    return f"{_months_usable(f'day >= {day_literal(first_day)} AND day < {day_literal(end_day)}')} ORDER BY month"


def latest_months(where: str) -> str:
    """(month, version) of each month's latest lists, for `IN`."""
    return f"(SELECT day, max(version) FROM {MONTH_STATE} WHERE {where} GROUP BY day)"


def _list_sql(field: str, bots: str, day: int) -> str:
    start = f"toDateTime64({int(day) * 86400}, 3, 'UTC')"
    return (
        f"INSERT INTO {SCRATCH} SELECT any(domain), cityHash64(domain, {field}), any({field}), count(), countIf(type = 'new'), {bots} "
        f"FROM {TABLE} FINAL WHERE event_time >= {start} AND event_time < {start} + toIntervalDay(1) "
        f"AND type IN {PAGE_TYPES!r} AND {field} != '' GROUP BY 2"
    )


class Rollups:
    """The rollup tables through the archiver's client (its ClickHouse thread: see the module)."""

    def __init__(self, client: Client) -> None:
        self.client = client

    def ensure(self, retention: str = "") -> None:
        """The tables and the touch view; ARCHIVE_RETENTION as their TTL. An archive without them (the release before's
        events_v1, an events_v2 of before the rollups) gets every day it holds touched once, so each is built in turn;
        until then its days are read from the events."""
        for statement in CREATE:
            self.client.command(statement)
        views = self.client.query(f"SELECT count() FROM system.tables WHERE database = currentDatabase() AND name = '{TOUCH_VIEW}'")
        if not views.result_rows[0][0]:  # first start with rollups: touch what is there, then follow the inserts
            self.touch_all()
            self.client.command(VIEW)
        self._set_retention(archive_retention_days(retention))

    def touch_all(self) -> None:
        """Every day the events hold, touched: each is rolled up (again) in turn."""
        self.client.command(f"INSERT INTO {TOUCHED} SELECT DISTINCT toDate32(event_time), {NOW_US} FROM {TABLE}")

    def _set_retention(self, days: int | None) -> None:
        note = f"{RETENTION_NOTE}{days if days is not None else 'none'}"
        comment = self.client.query(f"SELECT comment FROM system.tables WHERE database = currentDatabase() AND name = '{STATE}'")
        before = str(comment.result_rows[0][0])
        if before == note:
            return
        kept = before.removeprefix(RETENTION_NOTE)
        for table in TABLES + MONTH_TABLES:  # a day's rollups go once its last event can have gone (event_time + N days)
            if days is None:
                engine = self.client.query(f"SELECT engine_full FROM system.tables WHERE database = currentDatabase() AND name = '{table}'")
                if " TTL " in engine.result_rows[0][0]:
                    self.client.command(f"ALTER TABLE {table} REMOVE TTL")
            else:
                after = days + (32 if table in MONTH_TABLES else 1)  # a month's lists: once its last day can have gone
                self.client.command(f"ALTER TABLE {table} MODIFY TTL toDateTime64(day, 0, 'UTC') + toIntervalDay({after})")
        if kept.isdigit() and (days is None or days > int(kept)):
            self.touch_all()  # a longer retention: the days whose rollups the shorter one took are made again
        # Last: a crash before it leaves the old note, so the next start does all of the above again (it is idempotent).
        self.client.command(f"ALTER TABLE {STATE} MODIFY COMMENT '{note}'")

    def due(self) -> int | None:
        """The latest settled day touched since its rollups were made (or never made), within retention; None if none."""
        rows = self.client.query(
            f"SELECT toInt32(t.day) FROM (SELECT day, max(at) AS at FROM {TOUCHED} GROUP BY day) AS t "
            f"LEFT JOIN (SELECT day, max(version) AS v FROM {STATE} GROUP BY day) AS s ON t.day = s.day "
            f"WHERE t.at >= s.v AND t.day < toDate32(now('UTC') - toIntervalSecond({SETTLE})) "
            f"AND ({RETENTION} = 0 OR toInt32(t.day) + {RETENTION} > {TODAY}) ORDER BY t.day DESC LIMIT 1"
        ).result_rows
        return int(rows[0][0]) if rows else None

    def step(self) -> bool:
        """Roll up the next due day, if any; whether there was one."""
        day = self.due()
        if day is not None:
            self.recompute(day)
            return True
        rows = self.client.query(
            f"SELECT toInt32(d.m) FROM {_month_sigs('1')} AS d LEFT JOIN (SELECT day AS m, argMax(sig, version) AS sig FROM {MONTH_STATE} "
            f"GROUP BY day) AS ms ON d.m = ms.m WHERE d.sig != ms.sig AND d.m NOT IN {_stale_months()} "
            f"AND ({RETENTION} = 0 OR toInt32(d.m) + {RETENTION} > {TODAY}) ORDER BY d.m DESC LIMIT 1"
        ).result_rows
        if rows:
            self.recompute_month(int(rows[0][0]))
        return bool(rows)

    def build_all(self) -> int:
        """Every due day now (tests, benchmarks); how many."""
        n = 0
        while self.step():
            n += 1
        return n

    def recompute(self, day: int) -> None:
        """One day's rollups from the events with FINAL, then its state row (see the module for why this is exact)."""
        version = int(self.client.query(f"SELECT {NOW_US}").result_rows[0][0])
        start = f"toDateTime64({int(day) * 86400}, 3, 'UTC')"
        rows = f"FROM {TABLE} FINAL WHERE event_time >= {start} AND event_time < {start} + toIntervalDay(1)"
        grouped = f"domain, {TYPE}, bot, namespace"
        self.client.command(
            f"INSERT INTO {DAYS} (day, domain, type, bot, namespace, events, version) "
            f"SELECT toDate32(event_time), {grouped}, count(), {version} {rows} GROUP BY 1, 2, 3, 4, 5"
        )
        self.client.command(
            f"INSERT INTO {HOURS} (day, hour, domain, type, bot, namespace, events, version) "
            f"SELECT toDate32(event_time), toHour(event_time), {grouped}, count(), {version} {rows} GROUP BY 1, 2, 3, 4, 5, 6"
        )
        for table, top, _, _, field, bots, _ in LISTS:
            self.client.command(f"TRUNCATE TABLE {SCRATCH}")
            self.client.command(_list_sql(field, bots, day))
            self._lists(table, top, day, version)
        self.client.command(f"TRUNCATE TABLE {SCRATCH}")
        self.client.command(f"INSERT INTO {STATE} (day, version) SELECT {day_literal(day)}, {version}")

    def recompute_month(self, month: int) -> None:
        """A month's lists, from its days' latest rollups (not the events: a month of FINAL is a month of reading), once
        no day of it is due; its signature says which day versions they are of, so a day made again makes it stale."""
        version = int(self.client.query(f"SELECT {NOW_US}").result_rows[0][0])
        days = f"toDate32(toStartOfMonth(day)) = {day_literal(month)}"
        sig = self.client.query(f"SELECT sum(sig) FROM {_month_sigs(days)}").result_rows[0][0]
        for table, _, month_table, month_top, _, _, bots in LISTS:
            self.client.command(f"TRUNCATE TABLE {SCRATCH}")
            self.client.command(
                f"INSERT INTO {SCRATCH} SELECT any(domain), key, any(name), sum(edits), sum(created), {bots} FROM {table} "
                f"WHERE {days} AND (day, version) IN {latest(days)} GROUP BY key"
            )
            self._lists(month_table, month_top, month, version)
        self.client.command(f"TRUNCATE TABLE {SCRATCH}")
        self.client.command(f"INSERT INTO {MONTH_STATE} (day, version, sig) SELECT {day_literal(month)}, {version}, {int(sig)}")

    def _lists(self, table: str, top: str, day: int, version: int) -> None:
        """The scratch table's pages (editors) as `day`'s rows of `table`, and its ranked lists in `top`."""
        self.client.command(
            f"INSERT INTO {table} (domain, key, day, name, edits, created, bots, version) "
            f"SELECT domain, key, {day_literal(day)}, name, edits, created, bots, {version} FROM {SCRATCH}"
        )
        ranked = (  # each wiki's list, and every wiki's
            f"SELECT domain AS list, row_number() OVER (PARTITION BY domain ORDER BY edits DESC, key) AS rank, domain, key, edits "
            f"FROM {SCRATCH} UNION ALL "
            f"SELECT '' AS list, row_number() OVER (ORDER BY edits DESC, key) AS rank, domain, key, edits FROM {SCRATCH}"
        )
        self.client.command(
            f"INSERT INTO {top} (day, list, rank, domain, key, edits, version) "
            f"SELECT {day_literal(day)}, list, rank, domain, key, edits, {version} FROM ({ranked}) WHERE rank <= {TOP_CAP}"
        )


class Pacer:
    """The archiver's rollups (`rollups` once the archive is open), a due day at a time, paced (ROLLUP_GAP)."""

    def __init__(self) -> None:
        self.rollups: Rollups | None = None
        self.at = 0.0  # time.monotonic() of the next step

    def open(self, client: Client, retention: str) -> None:
        """The rollup tables made (Rollups.ensure) on the archiver's client; ArchiveUnavailable if ClickHouse refuses."""
        rollups = Rollups(client)
        try:
            rollups.ensure(retention)
        except ClickHouseError as exc:
            raise ArchiveUnavailable(one_line(exc, 300)) from exc
        self.rollups = rollups

    def step(self) -> None:
        """A due day, if it is time, in the ClickHouse thread: never beside an insert (the module: why that makes the
        rollups exact). A failure is logged; the day stays due and is read from the events meanwhile."""
        if self.rollups is None or time.monotonic() < self.at:
            return
        started = time.monotonic()
        try:
            worked = self.rollups.step()
        except (ClickHouseError, OSError) as exc:
            logger.warning("rollups: %s (the day stays due; the History view reads it from the events)", one_line(exc, 300))
            worked = False
        spent = time.monotonic() - started
        # A failed day costs what it took too (it is tried again): the inserts keep three quarters of the thread.
        self.at = time.monotonic() + max(ROLLUP_GAP if worked else ROLLUP_IDLE, 3 * spent)
