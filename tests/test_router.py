"""The router's consumer group deleted under it (consumer.StreamConsumer's NOGROUP), against a real Redis: said once,
made again, nothing lost or doubled in the shard streams."""

from __future__ import annotations

import asyncio
import dataclasses
import logging

import pytest
import redis.asyncio as aioredis

from tests.helpers import calibrated_lines, stop, wait_for
from tests.test_subscriber import load_stream
from wikipulse.core.settings import Settings
from wikipulse.ingest.router import Router
from wikipulse.store import keys


async def test_a_group_deleted_under_the_router_is_said_once_made_again_and_nothing_is_lost_or_doubled(
    redis_client: aioredis.Redis, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    s = dataclasses.replace(settings, shards=2, stream_consumers="")
    layout = keys.Layout(s.stream, s.shards)
    lines = [line for line in calibrated_lines() if b'"canary"' not in line][:3000]
    await load_stream(redis_client, lines[:2000], with_fold=True)
    router = Router(s, redis_client, layout)
    task = asyncio.create_task(router.run())

    async def routed(n: int) -> bool:
        return router.totals["routed"] >= n

    try:
        await wait_for(lambda: routed(2000), 30, "the first 2,000 entries routed", task)
        await redis_client.xgroup_destroy(layout.stream, layout.router_group)  # while the router reads, blocked
        await asyncio.sleep(1.5)
        await load_stream(redis_client, lines[2000:], with_fold=True)
        await wait_for(lambda: routed(3000), 30, "the next 1,000 routed by the group made again", task)
        await asyncio.sleep(0.5)
    finally:
        await stop(task)
    gone = [r for r in caplog.records if "is gone" in r.getMessage()]
    assert len(gone) == 1 and gone[0].levelno == logging.WARNING, [r.getMessage() for r in caplog.records]
    assert layout.router_group in gone[0].getMessage()
    ingest = [entry_id for entry_id, _ in await redis_client.xrange(layout.stream)]
    copied = sorted([entry_id for shard in layout.all_shards for entry_id, _ in await redis_client.xrange(shard.stream)])
    assert copied == sorted(ingest) and len(copied) == 3000  # each entry once, with its original id
    assert router.totals["routed"] == 3000 and router.totals["duplicates"] == 2000  # the group made again, from the start
    group = {g["name"]: g for g in await redis_client.xinfo_groups(layout.stream)}[layout.router_group.encode()]
    assert group["pending"] == 0
