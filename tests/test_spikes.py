"""Spike alerts: the rule on its own, and the watch over what a real subscriber folded into a real Redis."""

from __future__ import annotations

import asyncio
import logging
import time

import orjson
import pytest
import redis.asyncio as aioredis

from tests.helpers import stop, wait_for
from tests.test_subscriber import load_stream, run_subscriber
from wikipulse.core.settings import Settings
from wikipulse.devtools.simulate import SimulatedSpike, Simulator
from wikipulse.fold.spikes import CHECK_EVERY, FACTOR, MIN_VOLUME, SpikeWatch, is_spike, judge, read_alerts
from wikipulse.store import keys

STEADY = [100, 96, 110, 104, 99, 92, 101, 108, 95, 103, 97, 100]


def test_the_rule() -> None:
    assert is_spike(2000, STEADY)
    assert not is_spike(300, STEADY)  # 3x: under FACTOR
    assert not is_spike(2000, STEADY[:5])  # too little history to know the wiki's level
    assert not is_spike(MIN_VOLUME - 1, [1] * 60)  # a quiet wiki: 59x, but under the minimum volume
    assert is_spike(MIN_VOLUME * 2, [1] * 60)


def test_one_alert_per_episode_measured_against_the_usual_level() -> None:
    counts = {m * 60: {"a.org": 100} for m in range(70)}
    for m in (61, 62, 63):  # three minutes at 20x
        counts[m * 60]["a.org"] = 2000
    alerts = [s for m in range(70) for s in judge(counts, m * 60)]
    assert [(s.domain, s.minute, s.rate, s.baseline) for s in alerts] == [("a.org", 61 * 60, 2000, 100)]
    counts[66 * 60]["a.org"] = 2000  # a second episode after a normal minute
    assert [s.minute for m in range(70) for s in judge(counts, m * 60)] == [61 * 60, 66 * 60]


def feed(seconds: int, spike: SimulatedSpike | None, rate: float = 8.0) -> tuple[Simulator, list[bytes]]:
    start = time.time() - seconds
    sim = Simulator(seed=21, start=start, rate=rate, canary_every=0, spike=spike)
    return sim, [orjson.dumps(sim.event(i)) for i in range(sim.index_at(time.time() - 1))]


async def watch_all(client: aioredis.Redis, since: float) -> tuple[SpikeWatch, list[object]]:
    watch = SpikeWatch(client, keys.UNSHARDED)
    watch.judged = int(since) // 60 * 60  # judge every minute since then, not only the last few
    return watch, list(await watch.check(time.time()))


@pytest.mark.parametrize("spike_at", [0.0, 42.5], ids=["at a minute's start", "mid-minute"])
async def test_an_injected_spike_raises_exactly_one_alert_at_its_time(
    redis_client: aioredis.Redis, settings: Settings, spike_at: float
) -> None:
    now = time.time()
    at = (int(now) // 60 - 20) * 60 + spike_at  # 20 minutes ago, after half an hour of the usual mix
    sim, lines = feed(50 * 60, SimulatedSpike("en.wikipedia.org", at))
    pubsub = redis_client.pubsub()
    await pubsub.subscribe(keys.ALERTS_CHANNEL)
    await load_stream(redis_client, lines, with_fold=True)
    await run_subscriber(settings, redis_client, len(lines))
    _, raised = await watch_all(redis_client, sim.start + 15 * 60)
    assert len(raised) == 1, raised
    alerts = await read_alerts(redis_client, 10)
    assert len(alerts) == 1
    alert = alerts[0]
    assert alert["domain"] == "en.wikipedia.org"
    assert int(at) // 60 * 60 <= int(alert["minute"]) <= int(at) // 60 * 60 + 60  # type: ignore[call-overload]
    assert alert["rate"] >= FACTOR * alert["baseline"]  # type: ignore[operator]
    assert alert["top"] and all(title.startswith("Zürich spike") for title, _ in alert["top"])  # type: ignore[attr-defined]
    message = None
    for _ in range(50):
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.1)
        if message:
            break
    assert message is not None and orjson.loads(message["data"]) == alert
    await pubsub.aclose()
    # Judged again (a restarted subscriber): the marker keeps it from being raised twice.
    _, again = await watch_all(redis_client, sim.start + 15 * 60)
    assert again == [] and len(await read_alerts(redis_client, 10)) == 1


async def test_the_usual_mix_raises_none(redis_client: aioredis.Redis, settings: Settings) -> None:
    _, lines = feed(50 * 60, None, rate=35.0)  # the live rate: 105,000 events over 50 minutes
    await load_stream(redis_client, lines, with_fold=True)
    await run_subscriber(settings, redis_client, len(lines), timeout=120)
    watch, raised = await watch_all(redis_client, time.time() - 40 * 60)
    assert raised == [] and await read_alerts(redis_client, 10) == []
    assert len(watch.counts) >= 45 and max(max(c.values()) for c in watch.counts.values()) > 10 * MIN_VOLUME  # busy wikis were judged


async def test_the_subscriber_process_watches_its_shards(redis_client: aioredis.Redis, settings: Settings) -> None:
    """The watch runs inside `subscribe`, and judges only once the subscriber has caught up."""
    from wikipulse.fold.subscriber import watch_spikes

    now = time.time()
    at = (int(now) // 60 - 5) * 60  # within the watch's first look back
    _, lines = feed(45 * 60, SimulatedSpike("en.wikipedia.org", at))
    await load_stream(redis_client, lines, with_fold=True)
    subscriber = await run_subscriber(settings, redis_client, len(lines))
    subscriber.caught_up = False  # as while a backlog is folded: minutes read now would look quiet
    task = asyncio.create_task(watch_spikes(redis_client, subscriber))
    try:
        await asyncio.sleep(1)
        assert await read_alerts(redis_client, 10) == [], "judged while the subscriber was behind"
        subscriber.caught_up = True
        for _ in range(100):
            if await read_alerts(redis_client, 10):
                break
            await asyncio.sleep(0.1)
    finally:
        task.cancel()
    assert [a["domain"] for a in await read_alerts(redis_client, 10)] == ["en.wikipedia.org"]


async def test_a_full_redis_pauses_the_watch_said_once_and_the_spike_is_alerted_after(
    redis_client: aioredis.Redis, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """An alert is a write: a Redis at maxmemory (noeviction, as wikipulse requires) refuses it with OOM. The watch
    must not die of it unseen: it says so once, goes on, and raises the alert once Redis takes writes again."""
    from wikipulse.fold.subscriber import watch_spikes

    at = (int(time.time()) // 60 - 5) * 60  # within the watch's first look back
    _, lines = feed(45 * 60, SimulatedSpike("en.wikipedia.org", at))
    await load_stream(redis_client, lines, with_fold=True)
    subscriber = await run_subscriber(settings, redis_client, len(lines))
    assert (await redis_client.config_get("maxmemory-policy"))["maxmemory-policy"] == "noeviction"
    await redis_client.config_set("maxmemory", 1)  # full: every write refused, reads still served
    task = asyncio.create_task(watch_spikes(redis_client, subscriber))
    try:
        await wait_for(lambda: _said(caplog, "spike alerts paused"), 10, "the watch to say Redis is full", task)
        await asyncio.sleep(CHECK_EVERY + 1)  # a second check, refused too
        assert not task.done(), "the watch died"
        assert await read_alerts(redis_client, 10) == []
        await redis_client.config_set("maxmemory", 0)
        await wait_for(lambda: _has_alerts(redis_client), 2 * CHECK_EVERY, "the alert once Redis takes writes", task)
    finally:
        await redis_client.config_set("maxmemory", 0)
        await stop(task)
    assert [a["domain"] for a in await read_alerts(redis_client, 10)] == ["en.wikipedia.org"]
    full = [r for r in caplog.records if "spike alerts paused" in r.getMessage()]
    assert len(full) == 1 and full[0].levelno == logging.ERROR and "OOM" in full[0].getMessage()
    assert await _said(caplog, "spike alerts resumed")


async def _said(caplog: pytest.LogCaptureFixture, text: str) -> bool:
    return any(text in r.getMessage() for r in caplog.records)


async def _has_alerts(client: aioredis.Redis) -> bool:
    return bool(await read_alerts(client, 10))
