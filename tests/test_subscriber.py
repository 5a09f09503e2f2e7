"""The subscriber against a real Redis: exact counts, crash safety, shared work, expiry, pub/sub."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

from tests.helpers import assert_same, calibrated_lines, non_canary_ids, stop, wait_for
from wikipulse import queries as query
from wikipulse.core import model
from wikipulse.core.settings import Settings
from wikipulse.core.summary import summary_of
from wikipulse.devtools.reference import as_reference, reference_fold
from wikipulse.fold.subscriber import Subscriber
from wikipulse.store import keys
from wikipulse.store.streams import ReadBatch

LONG = "10s=400d,1m=400d,1h=400d"  # keep every resolution, however long a test runs


def events(lines: tuple[bytes, ...] | list[bytes]) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in lines]


async def load_stream(client: aioredis.Redis, lines: list[bytes] | tuple[bytes, ...], with_fold: bool = False) -> None:
    """Entries as other writers add them (`data` only), or as the publisher does (`data` and `fold`)."""
    pipe = client.pipeline(transaction=False)
    for line in lines:
        fields: dict[str, bytes | str] = {"data": line}
        if with_fold and b'"canary"' not in line:  # the publisher drops canaries
            fields["fold"] = summary_of(orjson.loads(line))
        pipe.xadd("wiki:events", fields)
    await pipe.execute()


async def stored_counts(client: aioredis.Redis) -> Counter[tuple[str, str, int, str]]:
    stored: dict[tuple[bytes, bytes], bytes] = {}
    async for key in client.scan_iter(match="wp:ts:*", count=1000):
        stored.update(((key, fld), n) for fld, n in (await client.hgetall(key)).items())
    return as_reference(stored)


async def stat(client: aioredis.Redis, name: str) -> int:
    value = await client.hget(keys.SUBSCRIBER_STATS, name)
    return int(value or 0)


def folded_at_least(client: aioredis.Redis, n: int) -> Any:
    async def check() -> bool:
        return await stat(client, "folded") >= n

    return check


async def run_subscriber(settings: Settings, client: aioredis.Redis, n: int, timeout: float = 60) -> Subscriber:
    subscriber = Subscriber(settings, client)
    task = asyncio.create_task(subscriber.run_stream() if settings.source == "stream" else subscriber.run_pubsub())
    try:
        await wait_for(folded_at_least(client, n), timeout, f"{n} events folded", task)
    finally:
        await stop(task)
    return subscriber


@pytest.mark.parametrize("with_fold", [True, False], ids=["publisher's entries", "json only"])
async def test_counts_equal_the_reference_fold(redis_client: aioredis.Redis, settings: Settings, with_fold: bool) -> None:
    lines = calibrated_lines()
    await load_stream(redis_client, lines, with_fold)
    await run_subscriber(dataclasses.replace(settings, retention=LONG), redis_client, 9996)
    assert_same(await stored_counts(redis_client), reference_fold(events(lines), time.time()))
    assert await stat(redis_client, "canaries") == 4
    assert (await redis_client.xpending("wiki:events", "wikipulse"))["pending"] == 0


async def test_default_retention_keeps_only_what_is_young_enough(redis_client: aioredis.Redis, settings: Settings) -> None:
    now = int(time.time())
    fresh = [orjson.dumps({"meta": {"domain": "a.org"}, "timestamp": now - 30, "type": "edit", "bot": False})]
    old = [orjson.dumps({"meta": {"domain": "a.org"}, "timestamp": now - 3 * 86400, "type": "edit", "bot": True})]
    ancient = [orjson.dumps({"meta": {"domain": "a.org"}, "timestamp": now - 500 * 86400})]
    future = [orjson.dumps({"meta": {"domain": "a.org"}, "timestamp": now + 3600})]
    await load_stream(redis_client, fresh + old + ancient + future)
    await run_subscriber(settings, redis_client, 2)
    counts = await stored_counts(redis_client)
    assert counts[("a.org", "10s", (now - 30) // 10 * 10, "")] == 1
    assert counts[("a.org", "1m", (now - 3 * 86400) // 60 * 60, "bot")] == 1
    assert not any(res == "10s" and b < now - 86400 for (_, res, b, _) in counts)  # 3 days old: past 10s retention
    assert (await stat(redis_client, "late"), await stat(redis_client, "future")) == (1, 1)
    # the ranking holds the fresh event only
    rank = await redis_client.zrange(keys.rank_key((now - 30) // 60 * 60), 0, -1, withscores=True)
    assert rank == [(b"a.org", 1.0)]


async def test_malformed_entries_are_counted_acked_and_skipped(redis_client: aioredis.Redis, settings: Settings) -> None:
    await load_stream(redis_client, [b"{oops", b"[]", calibrated_lines()[0], b'{"meta":{"domain":"x y"}}'])
    await redis_client.xadd("wiki:events", {"other": "field"})
    await run_subscriber(dataclasses.replace(settings, retention=LONG), redis_client, 1)
    await asyncio.sleep(0.1)
    assert (await redis_client.xpending("wiki:events", "wikipulse"))["pending"] == 0
    assert await stat(redis_client, "rejected:not_json") == 2  # "{oops" and the entry without data
    assert await stat(redis_client, "rejected:not_object") == 1
    assert await stat(redis_client, "rejected:bad_domain") == 1


async def test_the_fold_field_is_used_and_a_foreign_one_is_not_trusted(redis_client: aioredis.Redis, settings: Settings) -> None:
    t = int(time.time()) - 30
    event = {"meta": {"domain": "json.org"}, "timestamp": t, "type": "edit", "bot": False}
    await redis_client.xadd("wiki:events", {"data": b"not json", "fold": f"fold.org {t} new bot"})  # the summary is what is folded
    await redis_client.xadd("wiki:events", {"data": orjson.dumps(event), "fold": "not a summary"})  # unreadable: the JSON is
    await redis_client.xadd("wiki:events", {"fold": f"other.org {t} log human", "data": b"{}"})  # any field order
    await run_subscriber(settings, redis_client, 3)
    counts = await stored_counts(redis_client)
    bucket = t - t % 10
    assert [counts[(d, "10s", bucket, "")] for d in ("fold.org", "json.org", "other.org")] == [1, 1, 1]
    assert (counts[("fold.org", "10s", bucket, "new")], counts[("fold.org", "10s", bucket, "bot")]) == (1, 1)
    assert await stat(redis_client, "rejected:not_json") == 0


async def test_expiry_removes_old_windows(redis_client: aioredis.Redis, settings: Settings) -> None:
    now = int(time.time())
    ten, minute = model.RESOLUTION_BY_NAME["10s"], model.RESOLUTION_BY_NAME["1m"]
    t = now - 2 * 3600  # its 10 s window ended long ago
    window_end = t - t % ten.window + ten.window
    retention = now - window_end + 3  # so the window expires 3 s from now
    await load_stream(redis_client, [orjson.dumps({"meta": {"domain": "a.org"}, "timestamp": t})])
    await run_subscriber(dataclasses.replace(settings, retention=f"10s={retention}"), redis_client, 1)
    key = keys.series_key("a.org", ten, t - t % ten.window)
    assert await redis_client.exists(key)
    assert 0 < await redis_client.ttl(key) <= 4
    assert await redis_client.ttl(keys.series_key("a.org", minute, t - t % minute.window)) > 86400
    await asyncio.sleep(4.2)
    assert not await redis_client.exists(key)


async def test_stalled_consumer_that_wakes_does_not_double_count(redis_client: aioredis.Redis, settings: Settings) -> None:
    lines = calibrated_lines()[:2000]
    await load_stream(redis_client, lines, with_fold=True)
    s = dataclasses.replace(settings, retention=LONG, claim_idle=0.3)
    sleeper = Subscriber(dataclasses.replace(s, consumer="sleeper"), redis_client)
    await sleeper.ensure_group()
    taken, claims = await sleeper.read(">", None)  # reads a batch, then stalls before folding it
    assert len(taken) == len(lines)  # one batch holds them all
    await asyncio.sleep(0.4)
    expected = len(non_canary_ids(lines))
    await run_subscriber(dataclasses.replace(s, consumer="rescuer"), redis_client, expected)  # claims the sleeper's batch
    await sleeper.fold_entries(taken, claims)  # wakes up late
    await sleeper.close()
    assert await stat(redis_client, "folded") == expected
    assert_same(await stored_counts(redis_client), reference_fold(events(lines), time.time()))


@pytest.mark.parametrize("lost_as", ["an error", "nothing"])
async def test_a_cancellation_lost_in_a_library_still_stops_it(redis_client: aioredis.Redis, settings: Settings, lost_as: str) -> None:
    """On Python 3.11 redis-py can turn a cancellation into a TimeoutError it swallows, and cleanup
    that fails while cancelled replaces it with an error: the loop must stop all the same."""
    subscriber = Subscriber(settings, redis_client)
    read, losing = subscriber.stream.reader.batch, asyncio.Event()
    losing.set()

    async def read_that_loses_a_cancellation() -> ReadBatch:
        try:
            return await read()
        except asyncio.CancelledError:
            if not losing.is_set():
                raise
            if lost_as == "an error":
                raise ConnectionError("the connection could not be closed") from None
            return ReadBatch([], 0, None)

    subscriber.stream.reader.batch = read_that_loses_a_cancellation  # type: ignore[method-assign]
    task = asyncio.create_task(subscriber.run_stream())
    await asyncio.sleep(0.5)  # idle, in a blocking read
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=5)
    losing.clear()
    if not done:  # let it end, so that the failure below is reported instead of a hang
        task.cancel()
        await asyncio.wait({task}, timeout=5)
    assert done, "the subscriber went on after it was cancelled"
    assert task.cancelled()


async def test_pubsub_mode_end_to_end(redis_client: aioredis.Redis, settings: Settings) -> None:
    lines = calibrated_lines()
    s = dataclasses.replace(settings, retention=LONG, source="pubsub")
    subscriber = Subscriber(s, redis_client)
    task = asyncio.create_task(subscriber.run_pubsub())
    await wait_for(lambda: _has_subscriber(redis_client), 10, "the subscription", task)
    for start in range(0, len(lines), 500):
        pipe = redis_client.pipeline(transaction=False)
        for line in lines[start : start + 500]:
            pipe.publish("wiki", line)
        await pipe.execute()
    try:
        await wait_for(folded_at_least(redis_client, 9996), 30, "all published events folded", task)
    finally:
        await stop(task)
    assert_same(await stored_counts(redis_client), reference_fold(events(lines), time.time()))


async def test_pubsub_resubscribes_after_a_disconnect_and_says_events_were_missed(
    redis_client: aioredis.Redis, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    lines = calibrated_lines()[:1000]
    s = dataclasses.replace(settings, retention=LONG, source="pubsub", backoff_cap=0.2)
    task = asyncio.create_task(Subscriber(s, redis_client).run_pubsub())
    try:
        await wait_for(lambda: _has_subscriber(redis_client), 10, "the subscription", task)
        for line in lines[:500]:
            await redis_client.publish("wiki", line)
        await wait_for(folded_at_least(redis_client, 500), 10, "the first half folded", task)
        assert await redis_client.client_kill_filter(_type="pubsub") == 1  # as Redis does past its output-buffer limit
        await wait_for(lambda: _has_subscriber(redis_client), 10, "the subscription again", task)
        for line in lines[501:]:
            await redis_client.publish("wiki", line)
        await wait_for(folded_at_least(redis_client, 999), 10, "the second half folded", task)
    finally:
        await stop(task)
    assert await stat(redis_client, "folded") == 999
    assert any("events published while disconnected were missed" in r.getMessage() for r in caplog.records)


async def _has_subscriber(client: aioredis.Redis) -> bool:
    subscribers = dict(await client.pubsub_numsub("wiki")).get(b"wiki", 0)
    return bool(subscribers > 0)


def _spawn(redis_url: str, consumer: str, extra_env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "REDIS_URL": redis_url,
        "RETENTION": LONG,
        "CONSUMER_NAME": consumer,
        "BATCH_SIZE": "25",
        "LOG_LEVEL": "WARNING",
        "LEASE_TTL": "1",  # a killed process's name lapses in a second: the restart takes it over
        **(extra_env or {}),
    }
    return subprocess.Popen([sys.executable, "-m", "wikipulse", "subscribe"], env=env, stdin=subprocess.DEVNULL)


@pytest.mark.slow
async def test_kill_9_five_times_still_exact(redis_client: aioredis.Redis, settings: Settings) -> None:
    lines = calibrated_lines() * 5  # 50,000 entries, folded 250 at a time
    await load_stream(redis_client, lines, with_fold=True)
    rng = random.Random(7)
    kills = 0
    process = _spawn(settings.redis_url, "crashy")
    try:
        while kills < 5:
            folded_before = await stat(redis_client, "folded")
            await wait_for(folded_at_least(redis_client, folded_before + rng.randrange(200, 4000)), 60, "progress")
            process.send_signal(signal.SIGKILL)
            process.wait()
            kills += 1
            process = _spawn(settings.redis_url, "crashy")
        assert await stat(redis_client, "folded") < 5 * 9996, "the run ended before the last kill: kill earlier"
        await wait_for(folded_at_least(redis_client, 5 * 9996), 120, "all events folded")
        await asyncio.sleep(0.5)
    finally:
        process.terminate()
        assert process.wait(10) == 0  # SIGTERM is a clean stop
    assert await stat(redis_client, "folded") == 5 * 9996
    expected = reference_fold(events(calibrated_lines()), time.time())
    assert_same(await stored_counts(redis_client), Counter({k: 5 * v for k, v in expected.items()}))


@pytest.mark.slow
async def test_two_subscribers_share_the_work_exactly(redis_client: aioredis.Redis, settings: Settings) -> None:
    lines = calibrated_lines() * 3
    await load_stream(redis_client, lines, with_fold=True)
    a, b = _spawn(settings.redis_url, "a"), _spawn(settings.redis_url, "b")
    try:
        await wait_for(folded_at_least(redis_client, 3 * 9996), 120, "all events folded")
        await asyncio.sleep(0.5)
    finally:
        for p in (a, b):
            p.send_signal(signal.SIGINT)
            assert p.wait(10) == 0
    assert await stat(redis_client, "folded") == 3 * 9996
    expected = reference_fold(events(calibrated_lines()), time.time())
    assert_same(await stored_counts(redis_client), Counter({k: 3 * v for k, v in expected.items()}))
    consumers = {c["name"]: c for c in await redis_client.xinfo_consumers("wiki:events", "wikipulse")}
    assert set(consumers) == {b"a", b"b"} or set(consumers) == {"a", "b"}


async def test_a_flood_of_made_up_domains_is_capped(redis_client: aioredis.Redis, settings: Settings) -> None:
    now = int(time.time())
    flood = [{"meta": {"domain": f"a{i}.example.org"}, "timestamp": now - 30, "type": "edit", "bot": False} for i in range(40)]
    real = [{"meta": {"domain": "en.wikipedia.org"}, "timestamp": now - 30, "type": "new", "bot": False}] * 3
    await load_stream(redis_client, [orjson.dumps(e) for e in real + flood])  # "a…" sorts before "en…": order counts
    capped = dataclasses.replace(settings, max_domains=5)
    await run_subscriber(capped, redis_client, 43)
    counts = await stored_counts(redis_client)
    with_series = {domain for domain, res, _, _ in counts if res == "10s"} - {keys.ALL_DOMAINS}
    assert len(with_series - {keys.OTHER_DOMAINS}) == 5 and "en.wikipedia.org" in with_series  # first come, first served
    assert counts[(keys.OTHER_DOMAINS, "10s", (now - 30) // 10 * 10, "")] == 36  # the other 36 events: counted, not lost
    assert counts[(keys.ALL_DOMAINS, "10s", (now - 30) // 10 * 10, "")] == 43
    assert await stat(redis_client, "overflow") == 36
    bucket = (now - 30) // 10 * 10
    assert await query.counts(capped, keys.OTHER_DOMAINS, "10s", str(bucket), str(bucket), None) == {bucket: 36}  # readable from the shell
    assert await redis_client.zcard(keys.DOMAINS) == 5
    rank = await redis_client.zrange(keys.rank_key((now - 30) // 60 * 60), 0, -1)
    assert len(rank) == 5 and keys.OTHER_DOMAINS.encode() not in rank
    # A restarted subscriber (a new process: an empty cache) keeps to the same five.
    await load_stream(redis_client, [orjson.dumps({**flood[-1], "meta": {"domain": "late.example.org"}}), orjson.dumps(real[0])])
    await run_subscriber(capped, redis_client, 45)
    assert await stat(redis_client, "overflow") == 37
    assert await redis_client.zcard(keys.DOMAINS) == 5
