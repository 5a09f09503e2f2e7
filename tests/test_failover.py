"""A master of a real Redis Cluster (3 masters + 3 replicas, Debian's redis-server 7) killed -9 under the running
pipeline: the publisher (and its router), the subscriber and the archiver ride through it by themselves, and every key
equals the reference fold; then the killed master rejoins as a replica and takes over again, still exact."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from redis.asyncio.cluster import RedisCluster

from tests.conftest import ServeFn
from tests.helpers import assert_same, calibrated_lines, calibrated_source, stop
from tests.test_fold import reference_fold
from tests.test_subscriber import LONG, stored_counts
from wikipulse import keys
from wikipulse.archiver import run_archiver
from wikipulse.connect import open_client
from wikipulse.eventstreams import ServerOptions
from wikipulse.publisher import run_publisher
from wikipulse.redis_server import LocalCluster, free_port
from wikipulse.settings import Settings
from wikipulse.subscriber import run_subscriber

pytestmark = pytest.mark.slow

SHARDS = 3
EVENTS = 9996  # calibrated_lines() without its canaries
RATE = 1500.0  # events/s from the feed: the run lasts long enough to kill a master in its middle


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    # cluster-node-timeout 2 s, as the cluster: a master is replaced about 3-4 s after it died.
    with LocalCluster(tmp_path / "cluster", masters=3, replicas=1, node_timeout_ms=2000) as c:
        yield c


@pytest.fixture
def failover_settings(cluster: LocalCluster, settings: Settings, tmp_path: Path) -> Settings:
    return dataclasses.replace(
        settings,
        redis_url=cluster.url,
        shards=SHARDS,
        retention=LONG,
        consumer="",
        backoff_cap=0.5,
        lease_ttl=3.0,
        archive_dir=str(tmp_path / "clickhouse"),
        archive_from_stream=True,
        archive_port=free_port(),
    )


@pytest.fixture
async def client(failover_settings: Settings) -> AsyncIterator[Any]:
    client, _ = await open_client(failover_settings)
    assert isinstance(client, RedisCluster)
    yield client
    await client.aclose()


async def folded(client: Any, layout: keys.Layout) -> int:
    with contextlib.suppress(Exception):  # the cluster may be failing over: the next poll asks again
        return sum([int(await client.hget(shard.stats, "folded") or 0) for shard in layout.all_shards])
    return -1


async def archived(client: Any, layout: keys.Layout) -> int:
    with contextlib.suppress(Exception):
        return int(await client.hget(layout.archiver_stats, "archived") or 0)
    return -1


async def published(client: Any, layout: keys.Layout) -> int:
    with contextlib.suppress(Exception):
        return int(await client.hget(layout.publisher.stats, "published") or 0)
    return -1


def processes(s: Settings) -> dict[str, asyncio.Task[None]]:
    """The pipeline's entry points, as `python -m wikipulse ...` runs them (each its own client)."""
    return {
        "publisher": asyncio.create_task(run_publisher(s)),
        "subscriber": asyncio.create_task(run_subscriber(s)),
        "archiver": asyncio.create_task(run_archiver(s)),
    }


async def wait_all(tasks: dict[str, asyncio.Task[None]], check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        for name, task in tasks.items():
            if task.done():
                task.result()  # a crash surfaces with its own traceback
                raise AssertionError(f"the {name} ended before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)


async def kill_when_published(cluster: LocalCluster, client: Any, layout: keys.Layout, tasks: dict[str, asyncio.Task[None]],
                              at: int, key: str) -> int:  # fmt: skip
    """Kill -9 the master of `key`'s slot once `at` events are published; the index of the master that replaces it."""
    await wait_all(tasks, lambda: _at_least(published(client, layout), at), 60, f"{at} events published")
    victim = cluster.master_of(key)
    cluster.kill(victim)
    return await asyncio.to_thread(cluster.wait_failover, key)


async def _at_least(value: Any, n: int) -> bool:
    return int(await value) >= n


def assert_quiet(records: list[logging.LogRecord]) -> None:
    """A failover is an event of note, logged as such: never a traceback."""
    tracebacks = [r for r in records if r.exc_info and r.name.startswith("wikipulse")]
    assert not tracebacks, [r.getMessage() for r in tracebacks]


async def test_a_master_killed_mid_run_loses_nothing_and_doubles_nothing(
    cluster: LocalCluster, client: Any, failover_settings: Settings, eventstreams: ServeFn, caplog: pytest.LogCaptureFixture
) -> None:
    pytest.importorskip("chdb")
    caplog.set_level(logging.INFO)
    _, url = await eventstreams(calibrated_source(), ServerOptions(rate=RATE))
    s = dataclasses.replace(failover_settings, stream_url=url)
    layout = keys.Layout(s.stream, SHARDS, cluster=True)
    expected = reference_fold([orjson.loads(line) for line in calibrated_lines()], time.time())
    tasks = processes(s)
    try:
        # The ingest stream's master: the publisher's batches, the router's reads and the archiver's are all on it.
        await kill_when_published(cluster, client, layout, tasks, EVENTS // 3, s.stream)
        await wait_all(tasks, lambda: _done(client, layout), 90, "every event folded and archived")
    finally:
        for task in tasks.values():
            await stop(task)
    assert_same(await stored_counts(client), expected)
    assert await archived(client, layout) == EVENTS
    assert archive_rows(s) == (EVENTS, EVENTS)  # without FINAL: each event once
    assert_quiet(caplog.records)


def archive_rows(s: Settings) -> tuple[int, int]:
    from wikipulse.archive import Archive, connect

    archive = Archive(connect(s))
    try:
        count, distinct = archive.query("SELECT count(), uniqExact(meta_id) FROM events")[1][0]
        return int(count), int(distinct)
    finally:
        archive.close()


async def _done(client: Any, layout: keys.Layout) -> bool:
    return await folded(client, layout) >= EVENTS and await archived(client, layout) >= EVENTS
