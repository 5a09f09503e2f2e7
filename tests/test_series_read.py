"""Reading series back: the read plan shared by the dashboard and `counts`, against a real Redis."""

from __future__ import annotations

import redis.asyncio as aioredis

from wikipulse import keys
from wikipulse.series import SeriesRead, bucket_range, read_series

TEN = keys.RESOLUTION_BY_NAME["10s"]


def test_a_plan_spanning_two_windows_reads_each_hash_once_and_names_them_per_domain() -> None:
    start = TEN.window - 20  # the last two buckets of one window, the first of the next
    read = SeriesRead.plan(TEN, bucket_range(TEN, start, TEN.window), ("edit", "bot"))
    assert read.windows == ((0, [start, start + 10]), (TEN.window, [TEN.window]))
    assert read.hashes("a.org") == [keys.series_key("a.org", TEN, 0), keys.series_key("a.org", TEN, TEN.window)]
    assert read.hashes("b.org") == [keys.series_key("b.org", TEN, 0), keys.series_key("b.org", TEN, TEN.window)]


def test_decode_picks_each_dimension_in_bucket_order_and_keeps_gaps() -> None:
    b0, b1 = TEN.window - 10, TEN.window
    read = SeriesRead.plan(TEN, [b0, b1], ("edit", "bot"))
    first = {f"{b0}:edit".encode(): b"3", str(b0).encode(): b"3", f"{b0}:human".encode(): b"3"}  # no bot field: a gap
    second = {f"{b1}:edit".encode(): b"7", f"{b1}:bot".encode(): b"1"}
    assert read.decode([first, second]) == {"edit": [3, 7], "bot": [None, 1]}


async def test_read_series_returns_what_was_written(redis_client: aioredis.Redis) -> None:
    b0, b1 = TEN.window - 10, TEN.window
    await redis_client.hset(keys.series_key("a.org", TEN, 0), mapping={str(b0): 5, f"{b0}:edit": 4})
    await redis_client.hset(keys.series_key("a.org", TEN, TEN.window), mapping={str(b1): 2})
    await redis_client.hset(keys.series_key("b.org", TEN, TEN.window), mapping={f"{b1}:edit": 9})
    got = await read_series(redis_client, ["a.org", "b.org"], TEN, b0, b1, ("", "edit"))
    assert got == {"a.org": {"": [5, 2], "edit": [4, None]}, "b.org": {"": [None, None], "edit": [None, 9]}}
