"""Reading series back: the read plan shared by the dashboard and `counts`, against a real Redis."""

from __future__ import annotations

import orjson
import pytest
import redis.asyncio as aioredis

from wikipulse.core import model
from wikipulse.core.settings import Settings
from wikipulse.devtools.reference import fold
from wikipulse.fold.series import SeriesRead, bucket_range, read_series, script_payload
from wikipulse.store import keys

TEN = model.RESOLUTION_BY_NAME["10s"]
RETENTION = Settings.from_args(environ={}).retention_seconds()


def test_a_plan_spanning_two_windows_reads_each_hash_once_and_names_them_per_domain() -> None:
    start = TEN.window - 20  # the last two buckets of one window, the first of the next
    read = SeriesRead.plan(TEN, bucket_range(TEN, start, TEN.window), ("edit", "bot"))
    assert read.windows == ((0, [start, start + 10]), (TEN.window, [TEN.window]))
    assert read.hashes("a.org") == [keys.series_key("a.org", TEN, 0), keys.series_key("a.org", TEN, TEN.window)]
    assert read.hashes("b.org") == [keys.series_key("b.org", TEN, 0), keys.series_key("b.org", TEN, TEN.window)]


def test_decode_picks_each_dimension_in_bucket_order_keeps_gaps_and_works_out_humans() -> None:
    b0, b1, b2 = TEN.window - 10, TEN.window, TEN.window + 10
    read = SeriesRead.plan(TEN, [b0, b1, b2], ("", "edit", "bot", "human"))
    first = {f"{b0}:edit".encode(): b"3", str(b0).encode(): b"3"}  # no bot field: no bots
    second = {str(b1).encode(): b"9", f"{b1}:edit".encode(): b"7", f"{b1}:log".encode(): b"2", f"{b1}:bot".encode(): b"4"}
    # b2: nothing recorded at all, a gap in every dimension
    got = read.decode([first, second])
    assert got == {"": [3, 9, None], "edit": [3, 7, None], "bot": [0, 4, None], "human": [3, 5, None]}


def test_decode_works_out_a_namespaces_humans_from_its_everyone_and_bots() -> None:
    b0, b1, b2 = TEN.window - 10, TEN.window, TEN.window + 10
    read = SeriesRead.plan(TEN, [b0, b1, b2], ("ns0", "ns0human", "ns0bot"))
    first = {str(b0).encode(): b"5", f"{b0}:ns0".encode(): b"3", f"{b0}:ns0bot".encode(): b"1", f"{b0}:bot".encode(): b"2"}
    second = {str(b1).encode(): b"4"}  # events, none in namespace 0
    got = read.decode([first, second])
    assert got == {"ns0": [3, 0, None], "ns0human": [2, 0, None], "ns0bot": [1, 0, None]}


async def test_read_series_returns_what_was_written(redis_client: aioredis.Redis) -> None:
    b0, b1 = TEN.window - 10, TEN.window
    await redis_client.hset(keys.series_key("a.org", TEN, 0), mapping={str(b0): 5, f"{b0}:edit": 4})
    await redis_client.hset(keys.series_key("a.org", TEN, TEN.window), mapping={str(b1): 2})
    await redis_client.hset(keys.series_key("b.org", TEN, TEN.window), mapping={f"{b1}:edit": 9})
    got = await read_series(redis_client, ["a.org", "b.org"], TEN, b0, b1, ("", "edit"))
    assert got == {"a.org": {"": [5, 2], "edit": [4, 0]}, "b.org": {"": [None, None], "edit": [None, 9]}}


def test_script_payload_is_flat_and_keeps_ids_verbatim() -> None:
    inc = fold([{"meta": {"domain": "a.org"}, "timestamp": 1_700_000_005, "type": "edit", "bot": True}], 1_700_000_010, RETENTION)
    declared, raw = script_payload(inc, [b"1700000000000-0", "1700000000001-12"], {"folded": 1, "late": 0})
    payload = orjson.loads(raw)
    assert payload["ids"] == ["1700000000000-0", "1700000000001-12"]
    assert payload["stats"] == {"folded": 1}
    assert declared == [*inc.hashes, *inc.zsets]  # every key the script touches is declared
    key = keys.series_key("a.org", TEN, 1_700_000_005 - 1_700_000_005 % TEN.window)
    i = payload["h"].index(declared.index(key) + 5)  # its number in KEYS, after the 4 fixed keys (1-based)
    assert payload["h"][i + 1 : i + 9] == [inc.expire_at[key], 3, "1700000000", 1, "1700000000:edit", 1, "1700000000:bot", 1]
    assert orjson.loads(script_payload(inc, [], {})[1])["ids"] == []
    with pytest.raises(ValueError, match="not stream ids"):
        script_payload(inc, [b'1-0"],"x'], {})
