"""Reading series back: the HMGET plan shared by the dashboard and `counts`, against a real Redis."""

from __future__ import annotations

import redis.asyncio as aioredis

from wikipulse import keys
from wikipulse.series import SeriesRead, bucket_range, read_series

TEN = keys.RESOLUTION_BY_NAME["10s"]


def test_a_plan_spanning_two_windows_reads_each_key_once_with_the_same_fields_for_every_domain() -> None:
    start = TEN.window - 20  # the last two buckets of one window, the first of the next
    read = SeriesRead.plan(TEN, bucket_range(TEN, start, TEN.window), ("edit", "bot"))
    assert [window for window, _ in read.windows] == [0, TEN.window]
    assert read.windows[0][1] == [f"{start}:edit", f"{start + 10}:edit", f"{start}:bot", f"{start + 10}:bot"]
    assert [key for key, _ in read.commands("a.org")] == [keys.series_key("a.org", TEN, 0), keys.series_key("a.org", TEN, TEN.window)]
    assert [fields for _, fields in read.commands("b.org")] == [fields for _, fields in read.commands("a.org")]


def test_decode_splits_each_reply_by_dimension_and_keeps_gaps() -> None:
    read = SeriesRead.plan(TEN, [TEN.window - 10, TEN.window], ("edit", "bot"))
    decoded = read.decode([[b"3", None], [b"7", b"1"]])  # window 1: edit, bot; window 2: edit, bot
    assert decoded == {"edit": [3, 7], "bot": [None, 1]}


async def test_read_series_returns_what_was_written(redis_client: aioredis.Redis) -> None:
    b0, b1 = TEN.window - 10, TEN.window
    await redis_client.hset(keys.series_key("a.org", TEN, 0), mapping={str(b0): 5, f"{b0}:edit": 4})
    await redis_client.hset(keys.series_key("a.org", TEN, TEN.window), mapping={str(b1): 2})
    await redis_client.hset(keys.series_key("b.org", TEN, TEN.window), mapping={f"{b1}:edit": 9})
    got = await read_series(redis_client, ["a.org", "b.org"], TEN, b0, b1, ("", "edit"))
    assert got == {"a.org": {"": [5, 2], "edit": [4, None]}, "b.org": {"": [None, None], "edit": [None, 9]}}
