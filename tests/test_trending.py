"""Trending pages and new pages, folded by a real subscriber into a real Redis, against independent references."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import re
import subprocess
import sys
import time
from collections import Counter
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

from tests.test_subscriber import load_stream, run_subscriber
from wikipulse.core.settings import Settings
from wikipulse.devtools.reference import reference_trending, stored_trending
from wikipulse.devtools.simulate import Simulator
from wikipulse.fold.trending import TrendingQuery, read_new_pages, read_trending
from wikipulse.store import keys

NOW = int(time.time())


def simulated(n: int, seconds: float, seed: int = 5) -> list[dict[str, Any]]:
    """n simulated events over the last `seconds` (canaries left out: the publisher drops them)."""
    sim = Simulator(seed=seed, start=NOW - seconds, rate=n / seconds, canary_every=0)
    return [sim.event(i) for i in range(n)]


def lines(events: list[dict[str, Any]]) -> list[bytes]:
    return [orjson.dumps(e) for e in events]


def expected_top(
    events: list[dict[str, Any]], now: int, minutes: int, limit: int, domain: str | None, who: str, namespaces: list[int] | None
) -> list[dict[str, Any]]:
    """The most-edited pages, worked out from the events themselves (no trimming binds at these volumes)."""
    first = now - now % 60 - (minutes - 1) * 60
    edits: Counter[tuple[str, int, str]] = Counter()
    editors: dict[tuple[str, int, str], set[str]] = {}
    changed: Counter[tuple[str, int, str]] = Counter()
    for e in events:
        page = (e["meta"]["domain"], e["namespace"], e["title"])
        if (
            e["type"] in ("edit", "new")
            and e["timestamp"] >= first
            and (domain is None or page[0] == domain)
            and (who == "all" or e["bot"] == (who == "bots"))
            and (namespaces is None or page[1] in namespaces)
        ):
            edits[page] += 1
            editors.setdefault(page, set()).add(e["user"])
            changed[page] += e["length"]["new"] - (e["length"]["old"] or 0)
    ranked = sorted(edits, key=lambda p: (-edits[p], p[0], f"{p[1]}\t{p[2]}"))[:limit]
    return [
        {"domain": d, "namespace": ns, "title": t, "edits": edits[(d, ns, t)], "editors": len(editors[(d, ns, t)]),
         "bytes_changed": changed[(d, ns, t)]}
        for d, ns, t in ranked
    ]  # fmt: skip


@pytest.mark.parametrize("with_fold", [True, False], ids=["publisher's entries", "json only"])
async def test_lists_and_keys_equal_the_reference(redis_client: aioredis.Redis, settings: Settings, with_fold: bool) -> None:
    events = simulated(12_000, 900)
    await load_stream(redis_client, lines(events), with_fold)
    await run_subscriber(settings, redis_client, len(events))
    layout = keys.Layout("wiki:events")
    assert stored_trending(await _sync(redis_client)) == reference_trending(events, layout)
    queries: list[tuple[int, str | None, str, list[int] | None]] = [
        (5, None, "all", None), (60, None, "all", None), (60, None, "humans", None), (60, None, "bots", None),
        (5, "commons.wikimedia.org", "all", None), (60, "en.wikipedia.org", "humans", [0]), (5, "commons.wikimedia.org", "bots", None),
        (60, None, "all", [0, 4]),
    ]  # fmt: skip
    for minutes, domain, who, namespaces in queries:
        got = await read_trending(redis_client, layout, NOW, minutes, 15, None if domain is None else [domain], who, namespaces)
        expected = expected_top(events, NOW, minutes, 15, domain, who, namespaces)
        assert [row.as_json() for row in got] == expected, (minutes, domain, who, namespaces)
        assert expected[0]["edits"] > 1, (minutes, domain, who)  # a list with a head: else any order would pass
    new = await read_new_pages(redis_client, layout, 50)
    expected_new = [i for i in reference_trending(events, layout)[layout.all_shards[0].new_pages] if i["namespace"] == 0]
    assert new == expected_new[:50] and len(new) == 50


async def _sync(client: aioredis.Redis) -> Any:
    """A blocking client on the same Redis, for the shared reference reader."""
    import redis

    kwargs = client.connection_pool.connection_kwargs
    return redis.Redis(host=kwargs.get("host", "127.0.0.1"), port=kwargs.get("port", 6379), db=kwargs.get("db", 0))


HOSTILE = [
    "Tab\there", "New\nline", "<script>alert(1)</script>", "{s0}:braces", "*?[glob]", "\u202eRTL override", "emoji 🧨🔥",
    "a" * 1000, "wp:ts:{en.wikipedia.org}:1m:0", "\x00nul", "\\\\backslash\\", "'quotes\" & <b>",
]  # fmt: skip


async def test_hostile_titles_stay_members_and_read_back(redis_client: aioredis.Redis, settings: Settings) -> None:
    base = simulated(1, 30)[0]
    events = []
    for i, title in enumerate(HOSTILE):
        e = copy.deepcopy(base)
        e["meta"]["id"] = f"hostile-{i}"
        e.update(type="edit", title=title, user=f"U\t{title[:10]}", namespace=0, timestamp=NOW - 10, bot=False)
        e["length"], e["revision"] = {"old": 10, "new": 20 + i}, {"old": 1, "new": 2}
        events.append(e)
    await load_stream(redis_client, lines(events), with_fold=True)
    await run_subscriber(settings, redis_client, len(events))
    schema = re.compile(
        r"^wp:(trend:\{[a-z0-9.-]+\}:(all|bot|byeditor):\d+|trend:\{_all\}:(all|bot):\d+|new|ts:.*|\{rank\}:1m:\d+|domains|subscriber:.*)$"
    )
    assert all(schema.match(k.decode()) for k in await redis_client.keys("wp:*")), await redis_client.keys("wp:*")
    got = await read_trending(redis_client, keys.Layout("wiki:events"), NOW, 5, 50)
    cleaned = {re.sub(r"[\x00-\x1f]", "\ufffd", t)[:300] for t in HOSTILE}
    assert {row.title for row in got} == cleaned
    assert all(row.editors == 1 and row.edits == 1 for row in got)


async def test_the_previous_releases_trending_keys_do_not_break_the_fold(redis_client: aioredis.Redis, settings: Settings) -> None:
    """An upgrade on a live Redis: the keys the release before wrote (zsets `human` and `editors`, a hash `bytes`) are
    still there for an hour. The fold must not touch them (a WRONGTYPE would fail its script midway)."""
    events = simulated(2_000, 120)
    layout = keys.Layout("wiki:events")
    for e in events:
        shard, minute = layout.shard_of(e["meta"]["domain"]), e["timestamp"] // 60 * 60
        for part in ("human", "editors"):
            await redis_client.zadd(shard.trend_key(part, e["meta"]["domain"], minute), {"0\tOld\thUser": 0})
        await redis_client.hset(shard.trend_key("bytes", e["meta"]["domain"], minute), "0\tOld", 5)
    await load_stream(redis_client, lines(events), with_fold=True)
    await run_subscriber(settings, redis_client, len(events))
    assert stored_trending(await _sync(redis_client)) == reference_trending(events, layout)


async def test_a_minute_admits_its_first_pages_up_to_the_cap(redis_client: aioredis.Redis, settings: Settings) -> None:
    base = simulated(1, 30)[0]
    events = []
    for i in range(keys.TREND_CAP + 200):
        e = copy.deepcopy(base)
        e["meta"].update(id=f"cap-{i}", domain="de.wikipedia.org")
        e.update(type="edit", title=f"Page {i}", namespace=0, timestamp=NOW - NOW % 60, bot=True)
        e["length"] = {"old": 1, "new": 2}
        events.append(e)
    await load_stream(redis_client, lines(events), with_fold=True)
    await run_subscriber(settings, redis_client, len(events))
    minute = NOW - NOW % 60
    admitted = await redis_client.zrange(keys.UNSHARDED.trend_key("all", "de.wikipedia.org", minute), 0, -1)
    assert sorted(m.decode() for m in admitted) == sorted(f"0\tPage {i}" for i in range(keys.TREND_CAP))
    assert await redis_client.hget(keys.UNSHARDED.trend_key("byeditor", "de.wikipedia.org", minute), "\trest") == b"200"
    # An hour of minutes, from its minute (NOW is the module's import time: the suite may reach this test minutes later).
    assert await redis_client.ttl(keys.UNSHARDED.trend_key("all", "de.wikipedia.org", minute)) > minute + 3600 - time.time()


async def test_a_minutes_editors_are_capped_in_the_order_of_the_stream(redis_client: aioredis.Redis, settings: Settings) -> None:
    """One page-minute's byeditor hash reached 61,000 fields (10 MB, kept an hour). Now it admits its first
    TREND_EDITOR_CAP (page, editor) fields and counts later editors' edits in `rest_editors`. Two pages' new editors
    alternate across the cap, in batches of 300 (the fold groups a batch by page; the cap must follow the stream)."""
    base = simulated(1, 30)[0]
    minute = NOW - NOW % 60
    events = []
    for i in range(keys.TREND_EDITOR_CAP + 400):
        e = copy.deepcopy(base)
        e["meta"].update(id=f"editor-{i}", domain="de.wikipedia.org")
        e.update(type="edit", title=f"Page {i % 2}", namespace=0, timestamp=minute, bot=False, user=f"User {i}")
        e["length"] = {"old": 10, "new": 10 + i % 7}
        events.append(e)
    for i in range(100):  # editors admitted before the cap go on counting
        e = copy.deepcopy(events[i])
        e["meta"]["id"] = f"again-{i}"
        events.append(e)
    await load_stream(redis_client, lines(events), with_fold=True)
    await run_subscriber(dataclasses.replace(settings, batch_size=300), redis_client, len(events))
    layout = keys.Layout("wiki:events")
    assert stored_trending(await _sync(redis_client)) == reference_trending(events, layout)
    editors = await redis_client.hgetall(keys.UNSHARDED.trend_key("byeditor", "de.wikipedia.org", minute))
    assert len(editors) == keys.TREND_EDITOR_CAP + 1 and editors[b"\trest_editors"] == b"400"
    assert {f"0\tPage {i % 2}\thUser {i}".encode() for i in range(keys.TREND_EDITOR_CAP)} == editors.keys() - {b"\trest_editors"}
    top = await read_trending(redis_client, layout, NOW, 5, 2, ["de.wikipedia.org"])
    assert [(row.title, row.edits, row.editors) for row in top] == [
        ("Page 0", (keys.TREND_EDITOR_CAP + 400) // 2 + 50, keys.TREND_EDITOR_CAP // 2),
        ("Page 1", (keys.TREND_EDITOR_CAP + 400) // 2 + 50, keys.TREND_EDITOR_CAP // 2),
    ]  # every edit counted; the editors past the cap are not told apart


async def test_both_caps_at_once(redis_client: aioredis.Redis, settings: Settings) -> None:
    """Pages past their cap (`rest` is a field of the same hash, and not an editor) and then editors past theirs."""
    base = simulated(1, 30)[0]
    minute = NOW - NOW % 60
    events = []
    fillers = [(f"Page {p}", "Filler") for p in range(keys.TREND_CAP + 5)]
    flood = [("Page 0", f"User {u}") for u in range(keys.TREND_EDITOR_CAP - keys.TREND_CAP + 100)]
    for i, (title, user) in enumerate(fillers + flood):
        e = copy.deepcopy(base)
        e["meta"].update(id=f"both-{i}", domain="de.wikipedia.org")
        e.update(type="edit", title=title, namespace=0, timestamp=minute, bot=i % 3 == 0, user=user)
        e["length"] = {"old": 10, "new": 10 + i % 7}
        events.append(e)
    await load_stream(redis_client, lines(events), with_fold=True)
    await run_subscriber(dataclasses.replace(settings, batch_size=250), redis_client, len(events))
    assert stored_trending(await _sync(redis_client)) == reference_trending(events, keys.Layout("wiki:events"))
    editors = await redis_client.hgetall(keys.UNSHARDED.trend_key("byeditor", "de.wikipedia.org", minute))
    assert (len(editors), editors[b"\trest"], editors[b"\trest_editors"]) == (keys.TREND_EDITOR_CAP + 2, b"5", b"100")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--minutes", "7"], "kept for 5 or 60 minutes"),
        (["--domain", "not a domain"], "not a domain"),
        (["--limit", "0"], "from 1 to"),
        (["--namespace", "main"], "not namespaces"),
        (["--humans", "--bots"], "not allowed with"),
    ],
)
def test_trending_refuses_what_it_cannot_answer(settings: Settings, args: list[str], message: str) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "wikipulse", "trending", "--redis-url", settings.redis_url, *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2 and message in run.stderr, run.stderr


async def test_trending_cli_prints_json(redis_client: aioredis.Redis, settings: Settings) -> None:
    events = simulated(3_000, 200)
    await load_stream(redis_client, lines(events), with_fold=True)
    await run_subscriber(settings, redis_client, len(events))
    command = [sys.executable, "-m", "wikipulse", "trending", "--redis-url", settings.redis_url, "--minutes", "60", "--limit", "3"]
    run = await asyncio.to_thread(subprocess.run, command, capture_output=True, timeout=60)
    assert run.returncode == 0, run.stderr
    out = orjson.loads(run.stdout)
    assert [p["title"] for p in out["pages"]] == [p["title"] for p in expected_top(events, int(time.time()), 60, 3, None, "all", None)]
    assert out["pages"][0]["history"].startswith(f"https://{out['pages'][0]['domain']}/w/index.php?title=")


def test_a_query_refuses_an_unknown_who() -> None:
    with pytest.raises(ValueError, match="one of all, humans, bots"):
        TrendingQuery(keys.Layout("wiki:events"), NOW, 5, 10, who="robots")
