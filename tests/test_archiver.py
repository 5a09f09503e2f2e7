"""The archiver against a real Redis and the real embedded ClickHouse engine (chDB): every event once, acknowledged
only after ClickHouse's receipt, through kill -9 and a Redis restart; retries add no row; bad entries are counted."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC
from pathlib import Path

import orjson
import pytest
import redis.asyncio as aioredis

from tests.helpers import calibrated_lines, non_canary_ids, stop, wait_for
from tests.test_subscriber import load_stream
from wikipulse.archive.archiver import Archiver
from wikipulse.archive.table import Archive, batch_token, connect
from wikipulse.core.settings import Settings
from wikipulse.devtools.redis_server import RedisServer, free_port
from wikipulse.devtools.simulate import Simulator
from wikipulse.store import keys
from wikipulse.store.streams import Entry

pytest.importorskip("chdb")


@pytest.fixture
def archive_settings(settings: Settings, tmp_path: Path) -> Settings:
    return dataclasses.replace(settings, archive_dir=str(tmp_path / "clickhouse"), archive_port=free_port(), archive_from_stream=True)


@pytest.fixture
def opened(archive_settings: Settings) -> Iterator[Archive]:
    archive = Archive(connect(archive_settings))
    archive.ensure_schema()
    yield archive
    archive.close()


async def cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    """`python -m wikipulse ARGS` as a user runs it, in a process of its own (so the embedded engine's lock applies)."""
    command = [sys.executable, "-m", "wikipulse", *args]
    return await asyncio.to_thread(subprocess.run, command, env=_env(settings), capture_output=True, text=True, timeout=120)


async def archived_ids(settings: Settings) -> list[str]:
    """meta.ids in the archive, one per row (a duplicate row shows twice)."""
    out = await cli(settings, "sql", "SELECT meta_id FROM events ORDER BY meta_id")
    assert out.returncode == 0, out.stderr
    return [orjson.loads(line)["meta_id"] for line in out.stdout.splitlines()]


def _env(settings: Settings, **extra: str) -> dict[str, str]:
    return {**os.environ, **settings.to_env(), "LOG_LEVEL": "WARNING", **extra}


async def test_a_batch_retried_after_its_insert_landed_adds_no_row(
    redis_client: aioredis.Redis, archive_settings: Settings, opened: Archive
) -> None:
    lines = calibrated_lines()[:8000]
    await load_stream(redis_client, lines[:1200], with_fold=True)
    s = archive_settings
    archiver = Archiver(s, redis_client)
    await archiver.ensure_group()
    # An archiver reads a partial batch A (the feed is slow), records its size, inserts it; reads and records the next
    # batch B while A is inserted (as consume does); and dies before A's XACK. Both are pending, A's rows are in.
    batch_a = await read(archiver, ">", s.archive_batch)
    assert len(batch_a) == 1200
    await redis_client.rpush(keys.archiver_batches(s.archive_group), len(batch_a))
    archiver.insert(opened, batch_a)
    await load_stream(redis_client, lines[1200:2000], with_fold=True)
    batch_b = await read(archiver, ">", s.archive_batch)
    await redis_client.rpush(keys.archiver_batches(s.archive_group), len(batch_b))
    await archiver.reader.close()
    await load_stream(redis_client, lines[2000:], with_fold=True)  # more arrives meanwhile
    # Its successor reads the pending entries again in the same batches (1,200 then 800, not 2,000 at once), so A is
    # inserted again with the same token: no new row.
    successor = Archiver(s, redis_client)
    successor.archive = opened
    task = asyncio.create_task(successor.consume())
    await wait_for(lambda: _acked_all(redis_client, s), 60, "every entry acknowledged", task)
    await stop(task)
    expected = len(non_canary_ids(lines))
    assert opened.query("SELECT count(), uniqExact(meta_id) FROM events")[1] == [(expected, expected)]  # without FINAL
    assert await redis_client.llen(keys.archiver_batches(s.archive_group)) == 0


async def test_a_trickle_is_inserted_about_once_a_second(redis_client: aioredis.Redis, archive_settings: Settings, opened: Archive) -> None:
    """At the live feed's pace every blocking read returns a few entries; an insert a read would make ClickHouse
    merge a part for each. The archiver waits for a second since its last insert instead."""
    archiver = Archiver(archive_settings, redis_client)
    archiver.archive = opened
    await archiver.ensure_group()
    task = asyncio.create_task(archiver.consume())
    lines = calibrated_lines()[:30]
    for line in lines:  # 10 events a second for 3 seconds
        await load_stream(redis_client, [line], with_fold=True)
        await asyncio.sleep(0.1)
    await wait_for(lambda: _acked_all(redis_client, archive_settings), 10, "every entry acknowledged", task)
    await stop(task)
    inserts = int(await redis_client.hget(keys.ARCHIVER_STATS, "inserts"))
    assert 2 <= inserts <= 5, inserts  # one a read would be about 30
    assert opened.query("SELECT count() FROM events")[1] == [(len(lines),)]


def test_the_backstop_when_a_batch_comes_back_with_other_boundaries(opened: Archive) -> None:
    """A claim can merge a pending batch with others: another token, so ClickHouse inserts it again. The table
    is keyed on the event (ReplacingMergeTree): FINAL reads each event once, and a merge removes the copies."""
    lines = [line for line in calibrated_lines()[:400] if b'"canary"' not in line]
    ids = [f"{i}-0".encode() for i in range(len(lines))]
    opened.insert(ids[:200], lines[:200], batch_token(ids[:200]))
    opened.insert(ids, lines, batch_token(ids))  # 0..400 again, after 0..200 landed: the first 200 twice
    assert opened.query("SELECT count() FROM events")[1] == [(len(lines) + 200,)]
    assert opened.query("SELECT count() FROM events FINAL")[1] == [(len(lines),)]


async def test_bad_entries_are_counted_and_skipped(redis_client: aioredis.Redis, archive_settings: Settings, opened: Archive) -> None:
    good = calibrated_lines()[:10]
    await load_stream(redis_client, [b"{oops", b"[]", *good, b'{"meta":{"domain":"x y"}}', b'{"meta":{"domain":"canary"}}'])
    await redis_client.xadd("wiki:events", {"other": "field"})  # no data at all
    await archive_all(archive_settings, redis_client, opened)
    stats = {k.decode(): int(v) for k, v in (await redis_client.hgetall(keys.ARCHIVER_STATS)).items() if k != b"updated_at"}
    assert stats == {
        "archived": 10,
        "inserts": 1,
        "rejected:not_json": 2,
        "rejected:not_object": 1,
        "rejected:bad_domain": 1,
        "canaries": 1,
    }
    assert opened.query("SELECT count() FROM events")[1] == [(10,)]


async def test_kill_9_three_times_mid_batch_and_a_redis_restart_archive_every_event_once(
    tmp_path: Path, archive_settings: Settings
) -> None:
    redis = RedisServer(tmp_path / "redis").start()  # AOF on
    s = dataclasses.replace(archive_settings, redis_url=redis.url, archive_batch=500, lease_ttl=1.0)
    sim = Simulator(seed=9, start=time.time() - 30_000 / 35, canary_every=0)
    lines = [orjson.dumps(sim.event(i)) for i in range(30_000)]  # 30,000 distinct events, 500 a batch
    expected = len(lines)
    rng = random.Random(5)
    process: subprocess.Popen[bytes] | None = None
    try:
        async with aioredis.Redis.from_url(redis.url) as client:
            await load_stream(client, lines, with_fold=True)
            process = _spawn(s)
            for kill in range(4):
                target = await _archived(client) + rng.randrange(500, 4000)
                await wait_for(lambda: _archived_at_least(client, target), 120, "progress")  # noqa: B023 (awaited at once)
                if kill == 2:  # Redis goes away and comes back (AOF) while the archiver works
                    redis.stop()
                    await asyncio.sleep(0.5)
                    redis.start()
                    continue
                process.send_signal(signal.SIGKILL)
                process.wait()
                process = _spawn(s)
            assert await _archived(client) < expected, "the run ended before the last kill: kill earlier"
            await wait_for(lambda: _acked_all(client, s), 180, "every entry acknowledged")
        process.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(process.wait, 30) == 0
        process = None
        ids = await archived_ids(s)  # without FINAL: every row there is
        assert len(ids) == expected and sorted(ids) == sorted(non_canary_ids(lines))
    finally:
        if process is not None:
            process.kill()
        redis.stop()


async def test_sql_and_history_while_the_archiver_holds_the_engine(redis_client: aioredis.Redis, archive_settings: Settings) -> None:
    lines = calibrated_lines()[:2000]
    await load_stream(redis_client, lines, with_fold=True)
    process = _spawn(archive_settings)
    try:
        await wait_for(lambda: _acked_all(redis_client, archive_settings), 60, "archived")
        s = archive_settings
        out = await cli(s, "sql", "SELECT domain, count() AS n FROM events GROUP BY domain ORDER BY n DESC LIMIT 1")
        assert out.returncode == 0, out.stderr
        assert orjson.loads(out.stdout) == {"domain": "commons.wikimedia.org", "n": _count(lines, "commons.wikimedia.org")}
        status = await cli(s, "stats", "--group", s.archive_group)
        assert orjson.loads(status.stdout)["archiver"]["archived"] == len(non_canary_ids(lines)), status.stderr
        hist = await cli(s, "history", "_all", "--since", "0")
        days = [orjson.loads(line) for line in hist.stdout.splitlines()]
        assert sum(d["events"] for d in days) == len(non_canary_ids(lines)), hist.stderr
        writes = (
            "DROP TABLE events",
            "INSERT INTO events (raw) VALUES ('x')",
            "SELECT 1; DROP TABLE events",
            "ALTER TABLE events DELETE WHERE 1",
        )
        for write in writes:
            refused = await cli(s, "sql", write)
            assert refused.returncode == 2 and "Traceback" not in refused.stderr, (write, refused.stderr)
        refused = await cli(s, "sql", "SELECT 1 SETTINGS readonly = 0")  # ClickHouse itself refuses to leave read-only
        assert refused.returncode == 1 and "readonly" in refused.stderr.lower(), refused.stderr
        assert len(await archived_ids(s)) == len(non_canary_ids(lines))  # nothing was written by the refused statements
    finally:
        process.send_signal(signal.SIGTERM)
        await asyncio.to_thread(process.wait, 30)


async def test_an_unavailable_clickhouse_holds_the_archiver_back_and_nothing_else(
    redis_client: aioredis.Redis, archive_settings: Settings, settings: Settings
) -> None:
    """The embedded directory is held by another process: the archiver waits and acknowledges nothing, the
    subscriber folds on; once ClickHouse can be opened, every event is archived."""
    from wikipulse.fold.subscriber import Subscriber

    await asyncio.to_thread(Path(archive_settings.archive_dir).mkdir, parents=True)
    dsn = f"chdb://{archive_settings.archive_dir}"
    hold = f"import clickhouse_connect, time; c = clickhouse_connect.get_client(dsn={dsn!r}); print('held', flush=True); time.sleep(60)"
    holder = await asyncio.to_thread(subprocess.Popen, [sys.executable, "-c", hold], stdout=subprocess.PIPE)
    assert holder.stdout is not None and await asyncio.to_thread(holder.stdout.readline) == b"held\n"
    lines = calibrated_lines()[:2000]
    await load_stream(redis_client, lines, with_fold=True)
    await redis_client.xgroup_create("wiki:events", archive_settings.archive_group, id="0")
    archiver = _spawn(archive_settings)
    subscriber = asyncio.create_task(
        Subscriber(dataclasses.replace(settings, retention="10s=400d,1m=400d,1h=400d"), redis_client).run_stream()
    )
    try:
        expected = len(non_canary_ids(lines))
        await wait_for(lambda: _folded(redis_client, expected), 30, "the subscriber folds everything")
        await asyncio.sleep(2)
        groups = {g["name"]: g for g in await redis_client.xinfo_groups("wiki:events")}
        assert groups[archive_settings.archive_group.encode()]["last-delivered-id"] in (b"0-0", "0-0")  # nothing read, nothing acked
        holder.kill()
        await asyncio.to_thread(holder.wait)
        await wait_for(lambda: _acked_all(redis_client, archive_settings), 60, "archived once ClickHouse opens")
    finally:
        await stop(subscriber)
        archiver.send_signal(signal.SIGTERM)
        await asyncio.to_thread(archiver.wait, 30)
        holder.kill()
        await asyncio.to_thread(holder.communicate)  # reaped, its pipe closed
    assert len(await archived_ids(archive_settings)) == expected


@pytest.mark.skipif(not os.environ.get("WIKIPULSE_TEST_CLICKHOUSE_URL"), reason="no ClickHouse server (set WIKIPULSE_TEST_CLICKHOUSE_URL)")
async def test_the_same_archive_on_a_clickhouse_server(redis_client: aioredis.Redis, archive_settings: Settings) -> None:
    s = dataclasses.replace(archive_settings, clickhouse_url=os.environ["WIKIPULSE_TEST_CLICKHOUSE_URL"])
    archive = Archive(connect(s))
    for table in ("events", "events_v2", "events_v1"):
        archive.client.command(f"DROP TABLE IF EXISTS {table}")
    archive.ensure_schema()
    await load_stream(redis_client, calibrated_lines()[:1000], with_fold=True)
    await archive_all(s, redis_client, archive)
    assert archive.query("SELECT count() FROM events")[1] == [(len(non_canary_ids(calibrated_lines()[:1000])),)]


# ---- helpers ---------------------------------------------------------------------------------
async def read(archiver: Archiver, cursor: str, count: int) -> list[Entry]:
    """One batch, read as the archiver reads it (on one Redis, no replica to confirm it)."""
    await archiver.reader.send(cursor, count, 1000 if cursor == ">" else None)
    entries, _ = await archiver.reader.receive()
    return entries


async def archive_all(settings: Settings, client: aioredis.Redis, archive: Archive) -> None:
    """Run an archiver on `archive` in this process until every entry of the stream is acknowledged."""
    archiver = Archiver(settings, client)
    archiver.archive = archive
    await archiver.ensure_group()
    task = asyncio.create_task(archiver.consume())
    await wait_for(lambda: _acked_all(client, settings), 60, "every entry acknowledged", task)
    await stop(task)


def _spawn(settings: Settings) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "archiver.py"], env=_env(settings), stdin=subprocess.DEVNULL)


def _count(lines: list[bytes] | tuple[bytes, ...], domain: str) -> int:
    return sum(1 for line in lines if orjson.loads(line)["meta"]["domain"] == domain)


async def _archived(client: aioredis.Redis) -> int:
    try:
        return int(await client.hget(keys.ARCHIVER_STATS, "archived") or 0)
    except (ConnectionError, OSError, aioredis.ConnectionError):
        return 0


async def _archived_at_least(client: aioredis.Redis, n: int) -> bool:
    return await _archived(client) >= n


async def _folded(client: aioredis.Redis, n: int) -> bool:
    return int(await client.hget(keys.SUBSCRIBER_STATS, "folded") or 0) >= n


async def _acked_all(client: aioredis.Redis, settings: Settings) -> bool:
    """Every entry of the stream delivered to the archiver's group and acknowledged."""
    try:
        groups = {g["name"]: g for g in await client.xinfo_groups(settings.stream)}
        last = (await client.xrevrange(settings.stream, count=1))[0][0]
    except (ConnectionError, OSError, aioredis.ConnectionError, aioredis.ResponseError):
        return False
    group = groups.get(settings.archive_group.encode())
    return group is not None and group["pending"] == 0 and group["last-delivered-id"] == last and time.time() > 0


def test_typed_columns_hold_the_real_events_fields(opened: Archive) -> None:
    """The 100 real recorded events: every typed column equals the field it comes from (tests/data, MIT)."""
    from tests.conftest import ENWIKI

    lines = ENWIKI.read_bytes().splitlines()
    ids = [f"{i}-0".encode() for i in range(len(lines))]
    opened.insert(ids, lines, batch_token(ids))
    columns = ["meta_id", "domain", "wiki", "type", "namespace", "title", "user", "bot", "minor", "length_old", "length_new",
               "revision_old", "revision_new", "comment", "server_name", "rc_id", "event_time"]  # fmt: skip
    names, rows = opened.query(f"SELECT stream_id, {', '.join(columns)} FROM events ORDER BY stream_id")
    stored = {row[0]: dict(zip(names[1:], row[1:], strict=True)) for row in rows}
    for i, line in enumerate(lines):
        e = orjson.loads(line)
        got = stored[f"{i}-0"]
        expected = {
            "meta_id": e["meta"]["id"], "domain": e["meta"]["domain"], "wiki": e["wiki"], "type": e["type"], "namespace": e["namespace"],
            "title": e["title"], "user": e["user"], "bot": e["bot"], "minor": e.get("minor", False),
            "length_old": (e.get("length") or {}).get("old"), "length_new": (e.get("length") or {}).get("new"),
            "revision_old": (e.get("revision") or {}).get("old"), "revision_new": (e.get("revision") or {}).get("new"),
            "comment": e["comment"], "server_name": e["server_name"], "rc_id": e["id"],
        }  # fmt: skip
        assert {k: got[k] for k in expected} == expected, i
        assert int(got["event_time"].replace(tzinfo=UTC).timestamp()) == e["timestamp"]
    result = opened.client.query("SELECT stream_id, raw FROM events", column_formats={"raw": "bytes"})
    raws: dict[str, bytes] = {row[0]: row[1] for row in result.result_rows}
    assert [raws[f"{i}-0"] for i in range(len(lines))] == lines  # the event as it came, byte for byte


def test_hostile_values_are_archived_and_read_back(opened: Archive) -> None:
    """Valid JSON with absurd values neither blocks an insert (a batch retried forever) nor breaks a read."""
    raws = [
        b'{"meta":{"domain":"a.org","id":"1"},"timestamp":99999999999999999}',
        b'{"meta":{"domain":"a.org","id":"2"},"timestamp":-99999999999}',
        b'{"meta":{"domain":"a.org","id":"3","dt":"garbage"},"timestamp":"x"}',
        b'{"meta":{"domain":"a.org","id":"4","dt":"2024-05-01T10:00:00Z"},"timestamp":1.5e300,"namespace":99999999999999999999}',
        b'{"meta":{"domain":"a.org","id":"5"},"length":{"old":"x","new":[1]},"revision":{"old":{}},"bot":"yes","title":12}',
    ]
    ids = [f"{i}-0".encode() for i in range(len(raws))]
    opened.insert(ids, raws, batch_token(ids))
    names, rows = opened.query("SELECT * FROM events ORDER BY meta_id")
    times = {row[names.index("meta_id")]: row[names.index("event_time")].isoformat() for row in rows}
    assert times == {"1": "1970-01-01T00:00:00", "2": "1970-01-01T00:00:00", "3": "1970-01-01T00:00:00",
                     "4": "2024-05-01T10:00:00", "5": "1970-01-01T00:00:00"}  # fmt: skip


# ---- issue 22: retention, odd timestamps, queries beside the inserts, the release before's archive ----------


def _event(base: bytes, n: int, timestamp: int) -> bytes:
    """A real event as another event: its own meta.id, and the given `timestamp` (meta.dt too)."""
    e = orjson.loads(base)
    e["meta"]["id"] = f"ev-{n}"
    e["meta"]["dt"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(max(timestamp, 0)))
    e["timestamp"] = timestamp
    return orjson.dumps(e)


def _merge_all(archive: Archive) -> None:
    """Merge every part of every table now, so a TTL is applied (ClickHouse would in time)."""
    names = archive.client.query("SELECT name FROM system.tables WHERE database = currentDatabase() AND engine LIKE '%MergeTree'")
    for (name,) in names.result_rows:
        archive.client.command(f"OPTIMIZE TABLE {name} FINAL")


@pytest.mark.parametrize(("retention", "kept"), [("1d", ["now"]), ("29500d", ["now", "2y", "1970"]), ("36500d", ["now", "2y", "1970"])])
def test_retention_at_its_edges_keeps_what_it_says(archive_settings: Settings, retention: str, kept: list[str]) -> None:
    """A day keeps today's events only; 80 or 100 years (past 2106, where DateTime wraps) keep every event, also
    on an archive that existed before the restart with that retention."""
    base = calibrated_lines()[0]
    now = int(time.time())
    raws = {"now": _event(base, 1, now - 60), "2y": _event(base, 2, now - 2 * 365 * 86400), "1970": _event(base, 3, 0)}
    archive = Archive(connect(archive_settings))
    try:
        archive.ensure_schema()
        ids = [f"{i}-0".encode() for i in range(len(raws))]
        archive.insert(ids, list(raws.values()), batch_token(ids))
        archive.ensure_schema(retention)  # the restart with ARCHIVE_RETENTION set
        _merge_all(archive)
        names = {row[0] for row in archive.query("SELECT meta_id FROM events")[1]}
        assert names == {orjson.loads(raws[k])["meta"]["id"] for k in kept}
    finally:
        archive.close()


async def test_a_retention_past_the_range_is_refused_with_one_line(archive_settings: Settings) -> None:
    out = await cli(archive_settings, "archive", "--archive-retention", "400000d")
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert "archive_retention must be at most 365000d" in out.stderr.splitlines()[-1], out.stderr


async def test_a_batch_spanning_two_centuries_is_archived_and_the_archiver_moves_on(
    redis_client: aioredis.Redis, archive_settings: Settings, opened: Archive
) -> None:
    """2,300 events a month apart (2001 to 2192: ClickHouse refuses more than 100 partitions in one insert by default,
    and the archiver retried that batch forever), then 500 ordinary ones: every one archived."""
    base = calibrated_lines()[0]
    odd = [_event(base, n, 978_307_200 + n * 2_629_800) for n in range(2300)]
    normal = [line for line in calibrated_lines()[:600] if b'"canary"' not in line][:500]
    await load_stream(redis_client, odd, with_fold=True)
    await load_stream(redis_client, normal, with_fold=True)
    await archive_all(archive_settings, redis_client, opened)
    assert opened.query("SELECT count(), uniqExact(meta_id) FROM events FINAL")[1] == [(2800, 2800)]
    years = opened.query("SELECT min(toYear(event_time)), max(toYear(event_time)) FROM events")[1]
    assert years == [(2001, 2192)]  # the times as they were, only the partitions are bounded


def _post(port: int, sql: str) -> tuple[int, str]:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(f"http://127.0.0.1:{port}/query", data=sql.encode(), method="POST")
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as failure:
        with failure:
            return failure.code, failure.read().decode()


async def test_a_heavy_query_neither_stops_the_inserts_nor_runs_past_its_limits(
    redis_client: aioredis.Redis, archive_settings: Settings
) -> None:
    """A person's query scanning 1e11 generated rows through the archiver's endpoint: batches keep being archived
    and acknowledged within a bound while it runs, it is refused at max_execution_time (one line from `sql`), and
    a result too large for the limits is refused at once (HTTP 413), not built in the archiver's memory."""
    from aiohttp import web

    s = archive_settings
    archiver = Archiver(s, redis_client)
    archiver.queries.limits = {"max_execution_time": 10}  # QUERY_LIMITS' 30 s, shorter for the test
    await archiver.open_archive()
    await archiver.ensure_group()
    runner = web.AppRunner(archiver.app())
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", s.archive_port).start()
    task = asyncio.create_task(archiver.consume())
    lines = [line for line in calibrated_lines() if b'"canary"' not in line]
    try:
        heavy = asyncio.create_task(cli(s, "sql", "SELECT sum(cityHash64(number)) FROM numbers(100000000000)"))
        await asyncio.sleep(2.0)  # the CLI started, the query runs
        lags: list[float] = []
        for i in range(20):
            if heavy.done():
                break
            await load_stream(redis_client, lines[i * 100 : (i + 1) * 100], with_fold=True)
            started = time.monotonic()
            await wait_for(lambda: _acked_all(redis_client, s), 5, f"chunk {i} acknowledged beside the query", task)
            lags.append(time.monotonic() - started)
        assert len(lags) >= 3, lags  # acknowledged while the query ran
        out = await heavy
        assert out.returncode == 1 and len(out.stderr.splitlines()) == 1, out.stderr
        assert "max_execution_time" in out.stderr and "Traceback" not in out.stderr, out.stderr
        assert max(lags) < 5, lags
        started = time.monotonic()
        status, text = await asyncio.to_thread(_post, s.archive_port, "SELECT number, toString(number) FROM numbers(10000000)")
        assert status == 413 and "max_result_rows" in text, (status, text)
        assert time.monotonic() - started < 10
        status, text = await asyncio.to_thread(_post, s.archive_port, "SELECT count() AS n FROM events")
        assert (status, orjson.loads(text)) == (200, {"n": len(lags) * 100})
    finally:
        await stop(task)
        await runner.cleanup()
        await asyncio.to_thread(archiver.close)


async def test_an_archive_of_the_release_before_keeps_working(redis_client: aioredis.Redis, archive_settings: Settings) -> None:
    """The old table, made with the old CREATE, holds 1,000 events and one batch whose insert landed before its
    XACK (the old archiver was killed). The new archiver starts on it: the old rows read as before through
    `events`, the pending batch is not archived twice, new events land in the new table, all through `sql`; its
    old TTL (400d, DateTime arithmetic) becomes a century's in DateTime64, which deletes nothing."""
    from bench import archive_baseline

    s = archive_settings
    columns = "meta_id, event_time, domain, type, bot, namespace, title, user"
    lines = [line for line in calibrated_lines() if b'"canary"' not in line][:3000]
    await load_stream(redis_client, lines[:1600], with_fold=True)
    await redis_client.xgroup_create(s.stream, s.archive_group, id="0")
    old = await asyncio.to_thread(connect, s)  # unchanged since the release before
    old.command(archive_baseline.CREATE)
    old.command(f"ALTER TABLE events MODIFY TTL {archive_baseline.ttl_clause(400)}")  # ARCHIVE_RETENTION=400d then
    archiver = Archiver(s, redis_client)
    for acked in (True, False):  # a batch archived and acknowledged, then one archived and left pending
        batch = await read(archiver, ">", 1000 if acked else 600)
        ids = [entry_id for entry_id, _ in batch]
        await redis_client.rpush(keys.archiver_batches(s.archive_group), len(batch))
        rows = [[entry_id, dict(zip((f or [])[::2], (f or [])[1::2], strict=True))[b"data"]] for entry_id, f in batch]
        settings = archive_baseline.INSERT_SETTINGS | {"insert_deduplication_token": batch_token(ids)}
        old.insert("events", rows, column_names=["stream_id", "raw"], settings=settings)
        if acked:
            await redis_client.xack(s.stream, s.archive_group, *ids)
            await redis_client.lpop(keys.archiver_batches(s.archive_group))
    await archiver.reader.close()
    old_rows = old.query(f"SELECT {columns} FROM events ORDER BY meta_id").result_rows
    old.close()
    await load_stream(redis_client, lines[1600:], with_fold=True)
    s = dataclasses.replace(s, archive_retention="36500d")  # now "keep a century", past 2106
    process = _spawn(s)
    try:
        await wait_for(lambda: _acked_all(redis_client, s), 60, "every entry acknowledged")
        out = await cli(s, "sql", "SELECT count() AS n, uniqExact(meta_id) AS ids FROM events")  # without FINAL
        assert orjson.loads(out.stdout) == {"n": 3000, "ids": 3000}, out.stderr
        out = await cli(s, "sql", f"SELECT {columns} FROM events WHERE _table = 'events_v1' ORDER BY meta_id")
        assert [tuple(orjson.loads(line).values()) for line in out.stdout.splitlines()] == [
            (r[0], r[1].replace(tzinfo=UTC).isoformat(), *r[2:]) for r in old_rows
        ], out.stderr
        out = await cli(s, "sql", "SELECT _table AS t, count() AS n FROM events GROUP BY t ORDER BY t")
        assert [orjson.loads(line) for line in out.stdout.splitlines()] == [{"t": "events_v1", "n": 1600}, {"t": "events_v2", "n": 1400}]
    finally:
        process.send_signal(signal.SIGTERM)
        await asyncio.to_thread(process.wait, 30)
    archive = await asyncio.to_thread(connect, s)  # the century's TTL applied to both tables: nothing goes
    try:
        _merge_all(Archive(archive))
        assert archive.query("SELECT count() FROM events").result_rows == [(3000,)]
    finally:
        archive.close()
