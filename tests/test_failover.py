"""Masters of a real Redis Cluster (3 masters + 3 replicas, Debian's redis-server 7, cluster-node-timeout 2 s) killed
-9 under the running pipeline, the publisher (with its router), the subscriber and the archiver each as its entry point
runs it: every process rides through by itself, and every key equals the reference fold, every event archived once.

A plain failover (the replica had everything), the killed master rejoining as a replica and taking over again, and
failovers that lose writes: the replica had fallen behind (stopped, its master's writes waiting in the master's output
buffer) when its master died, as asynchronous replication allows."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import time
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from tests.conftest import ServeFn
from tests.helpers import assert_same, calibrated_lines, calibrated_source, run_publisher_until, stop, stream_ids
from tests.test_subscriber import LONG, stored_counts
from wikipulse.archive.archiver import run_archiver
from wikipulse.core.settings import Settings
from wikipulse.devtools.eventstreams import ServerOptions
from wikipulse.devtools.redis_server import LocalCluster, free_port
from wikipulse.devtools.reference import reference_fold
from wikipulse.fold.subscriber import run_subscriber
from wikipulse.ingest.publisher import run_publisher
from wikipulse.store import keys
from wikipulse.store.connect import open_client

pytestmark = [
    pytest.mark.slow,
    # redis-py's cluster client (6.4) makes new node objects each time it learns the slot map (a failover: several
    # times), and a connection that a command had in use then is left connected in a node it discards: the garbage
    # collector closes it, with a ResourceWarning. Those, and only those, are not this test's subject.
    pytest.mark.filterwarnings(
        r"ignore:Exception ignored in. <(function (AbstractConnection|ClusterNode|RedisCluster|StreamWriter|_SelectorTransport)"
        r"\.__del__|socket\.socket):pytest.PytestUnraisableExceptionWarning"
    ),
]

SHARDS = 3
EVENTS = 9996  # calibrated_lines() without its canaries
BACKLOG = 16 << 20  # bytes written to a master while its replica is stopped: far more than the sockets' buffers hold


@pytest.fixture(scope="module", autouse=True)
def _close_what_redis_py_left() -> Iterator[None]:
    """Collect the connections redis-py left behind (above) before pytest's last collection reports them as errors."""
    yield
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    # cluster-node-timeout 2 s, as the cluster: a master is replaced about 3-4 s after it died.
    with LocalCluster(tmp_path_factory.mktemp("failover"), masters=3, replicas=1, node_timeout_ms=2000) as c:
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
async def client(cluster: LocalCluster, failover_settings: Settings) -> AsyncIterator[Any]:
    pytest.importorskip("chdb")
    await asyncio.to_thread(cluster.wait_ok)  # whole again after the test before
    client, _ = await open_client(failover_settings)
    assert isinstance(client, RedisCluster)
    await client.flushall(target_nodes=RedisCluster.PRIMARIES)
    yield client
    await client.aclose()


async def stat(client: Any, key: str, name: str) -> int:
    """A counter, or -1 while the master that holds it is failing over (the next poll asks again)."""
    with contextlib.suppress(Exception):
        return int(await client.hget(key, name) or 0)
    return -1


class Run:
    """The pipeline's entry points as `python -m wikipulse publisher|subscriber|archiver` run them, each with its own
    client, in this process (their logs are captured), against the cluster."""

    def __init__(self, cluster: LocalCluster, client: Any, s: Settings) -> None:
        self.cluster, self.client, self.s = cluster, client, s
        self.layout = keys.Layout(s.stream, SHARDS, cluster=True)
        self.tasks = {
            "publisher": asyncio.create_task(run_publisher(s)),
            "subscriber": asyncio.create_task(run_subscriber(s)),
            "archiver": asyncio.create_task(run_archiver(s)),
        }

    async def until(self, check: Callable[[], Awaitable[bool]], what: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not await check():
            for name, task in self.tasks.items():
                if task.done():
                    task.result()  # a crash surfaces with its own traceback
                    raise AssertionError(f"the {name} ended before {what}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}")
            await asyncio.sleep(0.05)

    async def published(self) -> int:
        return await stat(self.client, self.layout.publisher.stats, "published")

    async def until_published(self, n: int) -> None:
        async def check() -> bool:
            return await self.published() >= n

        await self.until(check, f"{n} events published")

    async def folded(self) -> int:
        counts = [await stat(self.client, shard.stats, "folded") for shard in self.layout.all_shards]
        return -1 if -1 in counts else sum(counts)

    async def done(self) -> bool:
        return await self.folded() >= EVENTS and await stat(self.client, self.layout.archiver_stats, "archived") >= EVENTS

    async def kill_master_of(self, key: str) -> tuple[int, int]:
        """Kill -9 the master of `key`'s slot; (its index, the index of the replica that replaced it)."""
        victim = self.cluster.master_of(key)
        self.cluster.kill(victim)
        return victim, await asyncio.to_thread(self.cluster.wait_failover, key)

    async def kill_master_of_a_lagging_replica(self, key: str, settle: float) -> int:
        """Stop the replica of `key`'s master, write BACKLOG bytes in that slot (they fill the replication sockets, so
        what the master writes next stays in its output buffer), let the pipeline write on for `settle` seconds, then
        kill -9 the master and let the stopped replica replace it: what the master wrote since it stopped is lost."""
        master = self.cluster.master_of(key)
        replica = self.cluster.replica_of(master)
        self.cluster.pause(replica)
        try:
            tag = key[key.index("{") + 1 : key.index("}")] if "{" in key else key
            await self.client.set(f"{{{tag}}}:test:backlog", b"x" * BACKLOG)
            await asyncio.sleep(settle)
            buffered = await self._replica_output(master)
            assert buffered > 0, "the replica kept up: the test would lose nothing"
            self.cluster.kill(master)
        finally:
            self.cluster.resume(replica)
        return await asyncio.to_thread(self.cluster.wait_failover, key)

    async def _replica_output(self, master: int) -> int:
        """Bytes the master holds for its replica, not yet in the socket."""
        async with aioredis.Redis(port=self.cluster.nodes[master].port) as node:
            listed = await node.execute_command("CLIENT", "LIST", "TYPE", "replica")
        text = listed.decode() if isinstance(listed, bytes) else str(listed)
        return sum(int(part.split("=")[1]) for part in text.split() if part.startswith("omem="))

    async def finish(self) -> None:
        try:
            await self.until(self.done, "every event folded and archived", timeout=90)
        except AssertionError as exc:
            archived = await stat(self.client, self.layout.archiver_stats, "archived")
            raise AssertionError(f"{exc}: folded {await self.folded()}, archived {archived} of {EVENTS}") from None
        finally:
            for task in self.tasks.values():
                await stop(task)

    async def assert_exact(self, expected: Any) -> None:
        assert_same(await stored_counts(self.client), expected)
        assert await stat(self.client, self.layout.archiver_stats, "archived") == EVENTS
        assert archive_rows(self.s) == (EVENTS, EVENTS)  # without FINAL: each event once


def archive_rows(s: Settings) -> tuple[int, int]:
    from wikipulse.archive.table import Archive, connect

    archive = Archive(connect(s))
    try:
        count, distinct = archive.query("SELECT count(), uniqExact(meta_id) FROM events")[1][0]
        return int(count), int(distinct)
    finally:
        archive.close()


def assert_quiet(records: list[logging.LogRecord]) -> None:
    """A failover is an event of note, logged in a line or two per process: never a traceback, never a line a retry."""
    ours = [r for r in records if r.name.startswith("wikipulse") and r.levelno >= logging.WARNING]
    tracebacks = [r.getMessage() for r in ours if r.exc_info]
    assert not tracebacks, tracebacks
    retries = [r.getMessage() for r in ours if "retrying in" in r.getMessage()]
    assert not retries, retries[:5]


def expected_counts() -> Any:
    return reference_fold([orjson.loads(line) for line in calibrated_lines()], time.time())


async def test_a_master_killed_mid_run_then_rejoining_and_taking_over_again(
    cluster: LocalCluster, client: Any, failover_settings: Settings, eventstreams: ServeFn, caplog: pytest.LogCaptureFixture
) -> None:
    """The ingest stream's master (the publisher's batches, the router's and the archiver's reads, and one shard) is
    killed; its replica takes over. It is started again and rejoins as that one's replica; then the new master is
    killed, and the rejoined one takes over with everything."""
    caplog.set_level(logging.INFO)
    _, url = await eventstreams(calibrated_source(), ServerOptions(rate=600))
    run = Run(cluster, client, dataclasses.replace(failover_settings, stream_url=url))
    killed = successor = -1
    try:
        await run.until_published(EVENTS // 5)
        killed, successor = await run.kill_master_of(run.s.stream)
        cluster.start_node(killed)
        await asyncio.to_thread(cluster.wait_ok)  # rejoined as a replica, in sync
        assert cluster.master_of(run.s.stream) == successor and cluster.replica_of(successor) == killed
        await run.until_published(await run.published() + 300)
        again, taken_over_by = await run.kill_master_of(run.s.stream)
        assert (again, taken_over_by) == (successor, killed)
        await run.finish()
    finally:
        with contextlib.suppress(Exception):
            for index in (killed, successor):
                if index >= 0 and cluster.nodes[index] not in cluster.live():
                    cluster.start_node(index)
    await run.assert_exact(expected_counts())
    assert_quiet(caplog.records)


async def test_failovers_that_lose_writes_lose_no_event_and_double_none(
    cluster: LocalCluster, client: Any, failover_settings: Settings, eventstreams: ServeFn, caplog: pytest.LogCaptureFixture
) -> None:
    """Twice a master dies with writes its replica never received. The ingest stream's: it loses the publisher's last
    batches, which the router and the archiver must not have acted on (copied, archived), for the publisher writes
    them again. Then a shard stream's master: it loses the router's last copies, which the router must not have
    acknowledged on the ingest stream."""
    caplog.set_level(logging.INFO)
    _, url = await eventstreams(calibrated_source(), ServerOptions(rate=1000))
    run = Run(cluster, client, dataclasses.replace(failover_settings, stream_url=url))
    killed: list[int] = []
    try:
        await run.until_published(EVENTS // 4)
        killed.append(cluster.master_of(run.s.stream))
        await run.kill_master_of_a_lagging_replica(run.s.stream, settle=0.5)
        await run.until_published(EVENTS // 2)
        ingest_master = cluster.master_of(run.s.stream)
        shard = next(sh for sh in run.layout.all_shards if cluster.master_of(sh.stream) != ingest_master)
        killed.append(cluster.master_of(shard.stream))
        await run.kill_master_of_a_lagging_replica(shard.stream, settle=1.0)
        await run.finish()
    finally:
        with contextlib.suppress(Exception):
            for index in killed:
                if cluster.nodes[index] not in cluster.live():
                    cluster.start_node(index)
    await run.assert_exact(expected_counts())
    assert_quiet(caplog.records)


async def test_a_redis_that_lost_the_publishers_last_batches_makes_it_read_them_again(
    redis_client: aioredis.Redis, settings: Settings, eventstreams: ServeFn, caplog: pytest.LogCaptureFixture
) -> None:
    """What a failover leaves when it takes the publisher's last batches and the publisher's next write is the first it
    meets (a quiet feed): an older position than the one the publisher stored. Here on one Redis, the position set
    back by hand mid-run: the publisher must read the feed again from it (its next write finds it and writes nothing),
    not go on from its own position past batches that would be in no stream. The ones re-read here were kept (only the
    position went back), so the dedup window finds them: every event once."""
    server, url = await eventstreams(calibrated_source(), ServerOptions(rate=3000))
    s = dataclasses.replace(settings, stream_url=url)
    position = keys.UNSHARDED_PUBLISHER.position
    older: list[bytes] = []

    async def set_back_then_all_published(client: aioredis.Redis) -> bool:
        n = int(await client.xlen(s.stream))
        if not older and n >= 2000:
            older.append(await client.get(position))
        elif len(older) == 1 and n >= 3000:
            await client.set(position, older[0])  # as the new master holds it
            older.append(b"set back")
        return n >= EVENTS

    publisher = await run_publisher_until(s, set_back_then_all_published)
    assert publisher.totals["writes_lost"] == 1
    assert older[0].decode() in server.last_event_ids  # the feed was read again from the position Redis held
    ids = await stream_ids(redis_client, s.stream)
    assert len(ids) == len(set(ids)) == EVENTS
    assert any("Redis lost this publisher's last batches" in r.getMessage() for r in caplog.records)
