"""A pushed refresh sends a Patch of the figure: applied to what the page shows, it must give the whole figure."""

from __future__ import annotations

import asyncio
import copy
import math
import random
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

from wikipulse.dashboard.figure_patch import figure_patch, plan_patch, shown_state
from wikipulse.dashboard.push import NoticeHub
from wikipulse.dashboard.view import Selection, ui_revision, utc_iso
from wikipulse.devtools.redis_server import RedisServer
from wikipulse.store import keys

STEP = 10
SEL = Selection(("en.wikipedia.org", "de.wikipedia.org"), "10s", "30m", "type")


def apply(figure: dict[str, Any], patch: Any) -> dict[str, Any]:
    """dash-renderer's patch handlers (Assign, Delete, Extend), applied in order, as the browser applies them."""
    out = copy.deepcopy(figure)
    for op in patch.to_plotly_json()["operations"]:
        *path, last = op["location"]
        parent = out
        for step in path:
            parent = parent[step]
        if op["operation"] == "Assign":
            parent[last] = op["params"]["value"]
        elif op["operation"] == "Delete":
            del parent[last]
        elif op["operation"] == "Extend":
            parent[last].extend(op["params"]["value"])
        else:
            raise AssertionError(f"unexpected operation {op['operation']}")
    return out


def figure_of(buckets: list[int], values: dict[int, dict[int, int | None]], shapes: list[Any]) -> dict[str, Any]:
    x = [utc_iso(b) for b in buckets]
    data = [{"type": "scatter", "x": list(x), "y": [values[i].get(b) for b in buckets], "name": str(i)} for i in sorted(values)]
    return {"data": data, "layout": {"shapes": shapes, "annotations": [{"text": str(len(shapes))}]}}


def test_a_patch_turns_the_shown_figure_into_the_new_one_whatever_moved() -> None:
    rng = random.Random(7)
    patched = 0
    for _ in range(500):
        n = 180
        first = 1_800_000_000 + rng.randrange(1000) * STEP
        old_buckets = [first + i * STEP for i in range(n)]
        traces = rng.randint(1, 6)
        series = {i: {b: rng.choice([None, 0, rng.randrange(500)]) for b in old_buckets} for i in range(traces)}
        old = figure_of(old_buckets, series, [{"x0": 1}])
        shown = shown_state(SEL, None, old_buckets, traces, "e:1")

        slide = rng.choice([0, 0, 1, 2, 7])
        new_buckets = [b + slide * STEP for b in old_buckets]
        since = rng.choice([math.inf, new_buckets[-1] - rng.randrange(40) * STEP + rng.randrange(STEP), first - 500])
        for i in series:  # everything from `since` on may change; nothing before it does
            for b in new_buckets:
                if b >= since - since % STEP if since != math.inf else b > old_buckets[-1]:
                    series[i][b] = rng.randrange(1000)
        new = figure_of(new_buckets, series, [{"x0": 2}, {"x0": 3}])
        now = shown_state(SEL, None, new_buckets, traces, "e:2")
        plan = plan_patch(shown, now, STEP, since)
        if plan is None:
            continue
        patched += 1
        unread = sum(b < plan.read_from for b in new_buckets)  # a patch reads from read_from on: the rest must not matter
        partial = copy.deepcopy(new)
        for trace in partial["data"]:
            trace["y"][:unread] = [-1] * unread
        patch = figure_patch(plan, partial)
        assert apply(old, patch) == new
        assert len(orjson.dumps(patch.to_plotly_json())) < len(orjson.dumps(new)) / 2
    assert patched > 250  # most pushes are patches, not whole figures


def test_the_whole_figure_is_sent_when_the_page_shows_something_else() -> None:
    buckets = list(range(1_800_000_000, 1_800_000_000 + 180 * STEP, STEP))
    now = shown_state(SEL, None, buckets, 1, "e:2")
    assert plan_patch(now, now, STEP, math.inf) is not None  # the same view: a patch
    other_view = shown_state(Selection(("en.wikipedia.org",)), None, buckets, 1, "e:1")
    other_zoom = shown_state(SEL, {"rev": ui_revision(SEL), "xaxis": [1, 2]}, buckets, 1, "e:1")
    assert shown_state(SEL, {"rev": "another selection's", "xaxis": [1, 2]}, buckets, 1, "e:2") == now  # not applied
    too_old = shown_state(SEL, None, [b - 100 * STEP for b in buckets], 1, "e:1")
    crafted: list[Any] = [None, "x", [], {"view": now["view"], "traces": 1, "first": "a", "last": 3}]
    for shown in (other_view, other_zoom, too_old, *crafted):
        assert plan_patch(shown, now, STEP, math.inf) is None
    assert plan_patch(now, now, STEP, None) is None  # what moved is not known
    assert plan_patch(now, now, STEP, float(buckets[10])) is None  # most of the window moved


async def test_the_hub_knows_which_buckets_moved_since_a_page_was_drawn(redis_server: RedisServer) -> None:
    hub = NoticeHub(redis_server.url, channel="wp:test-notices")
    hub.page_opened()
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        await until(lambda: hub.version == 1)  # subscribed: anything may have moved before
        drawn = hub.mark
        assert hub.moved_since(drawn) == math.inf
        for since in (1_800_000_300, 1_800_000_100, 1_800_000_200):
            await client.publish("wp:test-notices", orjson.dumps({"folded": 1, "domains": [], "shard": 0, "from": since}))
        await until(lambda: hub.version == 4)
        assert hub.moved_since(drawn) == 1_800_000_100
        assert hub.moved_since(f"{hub.epoch}:3") == 1_800_000_200
        await client.publish("wp:test-notices", orjson.dumps({"folded": 1, "domains": [], "shard": 0}))  # says nothing
        await until(lambda: hub.version == 5)
        assert hub.moved_since(drawn) is None and hub.moved_since(hub.mark) == math.inf
        for mark in ("other:1", f"{hub.epoch}:99", f"{hub.epoch}:" + "9" * 5000, None, 3):
            assert hub.moved_since(mark) is None
    finally:
        hub.page_closed()
        await client.aclose()
        if hub._task is not None:
            hub._task.cancel()


async def until(condition: Any, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


def test_notices_say_from_which_bucket_they_moved() -> None:
    from wikipulse.fold.series import notice

    assert orjson.loads(notice(3, ["b", "a", "a"], 1, 1_800_000_010)) == {
        "folded": 3,
        "domains": ["a", "b"],
        "shard": 1,
        "from": 1_800_000_010,
    }
    assert keys.NOTICES == "wp:notices"


pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
