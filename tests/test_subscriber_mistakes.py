"""The subscriber under operators' mistakes, against a real Redis: two processes with one consumer name, a process
that stalls past its lease, a full Redis."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
import time

import pytest
import redis.asyncio as aioredis

from tests.helpers import assert_same, calibrated_lines, non_canary_ids, stop, wait_for
from tests.test_subscriber import LONG, events, folded_at_least, load_stream, stat, stored_counts
from wikipulse.core.settings import Settings
from wikipulse.devtools.reference import reference_fold
from wikipulse.fold.subscriber import Subscriber
from wikipulse.store import keys
from wikipulse.store.lease import LeaseLost


async def test_two_subscribers_on_one_host_get_names_of_their_own(redis_client: aioredis.Redis, settings: Settings) -> None:
    """The default name is the host name: a second subscriber on the same host must not share it, or it would take
    the first one's in-flight entries for its own pending ones and count them twice."""
    lines = calibrated_lines() * 2
    await load_stream(redis_client, lines, with_fold=True)
    s = dataclasses.replace(settings, consumer="", retention=LONG, batch_size=25)
    first, second = Subscriber(s, redis_client), Subscriber(s, redis_client)
    tasks = [asyncio.create_task(first.run_stream()), asyncio.create_task(second.run_stream())]
    expected = len(non_canary_ids(lines))
    try:
        await wait_for(folded_at_least(redis_client, expected), 60, "every event folded")
        await asyncio.sleep(0.3)
    finally:
        for task in tasks:
            await stop(task)
    host = socket.gethostname()
    assert {first.consumer, second.consumer} == {host, f"{host}-2"}
    assert await stat(redis_client, "folded") == expected
    once = reference_fold(events(calibrated_lines()), time.time())
    assert_same(await stored_counts(redis_client), {k: 2 * v for k, v in once.items()})


async def test_a_configured_name_held_by_a_live_process_is_waited_for(
    redis_client: aioredis.Redis, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    s = dataclasses.replace(settings, consumer="worker", lease_ttl=1.0)
    holder, waiter = Subscriber(s, redis_client), Subscriber(s, redis_client)
    await holder.ensure_group()
    await holder.take_name()
    waiting = asyncio.create_task(waiter.take_name())
    await asyncio.sleep(1.5)  # the holder renews its lease: the waiter stands by
    assert not waiting.done()
    assert any("standing by" in r.getMessage() for r in caplog.records)
    await holder.give_up_name()
    await asyncio.wait_for(waiting, 5)
    assert waiter.consumer == "worker"
    await waiter.give_up_name()


async def test_a_process_that_stalled_past_its_lease_applies_nothing(redis_client: aioredis.Redis, settings: Settings) -> None:
    """A stalls with a batch read; its lease lapses and B takes the name, folds the pending batch; A wakes: fenced."""
    lines = calibrated_lines()[:1000]
    await load_stream(redis_client, lines, with_fold=True)
    s = dataclasses.replace(settings, consumer="worker", retention=LONG, lease_ttl=0.5)
    a = Subscriber(s, redis_client)
    await a.ensure_group()
    await a.take_name()
    assert a.name.keeper is not None
    a.name.keeper.cancel()  # A stalls: it renews nothing from here on
    taken, claims = await a.read(">", None)
    await asyncio.sleep(0.8)  # the lease lapses
    expected = len(non_canary_ids(lines))
    b = Subscriber(s, redis_client)
    task = asyncio.create_task(b.run_stream())
    await wait_for(folded_at_least(redis_client, expected), 20, "B folds A's pending batch", task)
    with pytest.raises(LeaseLost):
        await a.fold_entries(taken, claims)  # A wakes up late
    await stop(task)
    await a.close()
    assert await stat(redis_client, "folded") == expected
    assert_same(await stored_counts(redis_client), reference_fold(events(lines), time.time()))


async def test_a_full_redis_pauses_folding_and_loses_nothing(
    redis_client: aioredis.Redis, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    lines = calibrated_lines()[:3000]
    await load_stream(redis_client, lines, with_fold=True)
    await redis_client.config_set("maxmemory", 1)  # full from the start: every write refused
    s = dataclasses.replace(settings, retention=LONG)
    subscriber = Subscriber(s, redis_client)
    task = asyncio.create_task(subscriber.run_stream())  # even creating its group is refused at first
    try:
        await wait_for(lambda: _said(caplog, "Redis is full"), 20, "the subscriber to pause", task)
        assert not task.done() and await stat(redis_client, "folded") == 0
        await redis_client.config_set("maxmemory", 0)
        expected = len(non_canary_ids(lines))
        await wait_for(folded_at_least(redis_client, expected), 30, "every event after the pause", task)
        await asyncio.sleep(0.2)
    finally:
        await redis_client.config_set("maxmemory", 0)
        await stop(task)
    assert await stat(redis_client, "folded") == expected
    assert_same(await stored_counts(redis_client), reference_fold(events(lines), time.time()))
    assert any(r.levelno == logging.ERROR and "Redis is full" in r.getMessage() for r in caplog.records)
    assert not await redis_client.exists(keys.consumer_lease("wikipulse", "test-consumer"))  # released on stop


async def _said(caplog: pytest.LogCaptureFixture, text: str) -> bool:
    return any(text in r.getMessage() for r in caplog.records)
