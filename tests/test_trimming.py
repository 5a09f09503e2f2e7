"""The stream is a buffer (trimming.py), against real redis-servers: Debian's 7.0 and the embedded 6.2.

What every consumer group acknowledged is trimmed down to STREAM_KEEP; an entry pending or undelivered in any group
stays (up to the hard cap, STREAM_MAXLEN, whose losses are counted exactly); the groups a deployment runs exist from
the stream's first entry; a declared group no consumer reads holds only STREAM_GRACE of the stream."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from tests.conftest import ServeFn
from tests.helpers import assert_same, calibrated_lines, calibrated_source, flushed_client, stop, wait_for
from tests.test_subscriber import LONG, stored_counts
from wikipulse.core.settings import Settings
from wikipulse.core.summary import summary_of
from wikipulse.devtools.redis_server import LocalCluster, RedisServer
from wikipulse.devtools.reference import reference_fold
from wikipulse.devtools.simulate import Simulator
from wikipulse.fold.subscriber import Subscriber
from wikipulse.ingest.publisher import Publisher
from wikipulse.ingest.router import Router
from wikipulse.ingest.writer import BatchWriter, IngestBatch, Written
from wikipulse.queries import stats
from wikipulse.store import keys
from wikipulse.store.connect import open_client
from wikipulse.store.lease import Lease
from wikipulse.store.status import read_status
from wikipulse.store.streams import Entry

STREAM = "wiki:events"
SUB, ARCH = "wikipulse", "archiver"  # the default groups of the subscriber and the archiver
DEBIAN = "/usr/bin/redis-server"
KEEP = 1000  # STREAM_KEEP in these tests


@pytest.fixture(scope="module", params=["embedded-6.2", "debian-7.0"])
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    if request.param == "debian-7.0" and not Path(DEBIAN).exists():
        pytest.skip("no Debian redis-server")
    binary = DEBIAN if request.param == "debian-7.0" else None
    with RedisServer(tmp_path_factory.mktemp("redis"), appendonly=False, binary=binary) as started:
        yield started


@pytest.fixture
async def client(server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    async with flushed_client(server.url) as c:
        yield c


@pytest.fixture
def base(server: RedisServer) -> Settings:
    return Settings.from_args(environ={}, redis_url=server.url, stream_keep=KEEP, lease_ttl=30.0, consumer="test-consumer")


class Feed:
    """The publisher's write path (ingest.BatchWriter: the write script with its trims) fed simulated events."""

    def __init__(self, client: aioredis.Redis, settings: Settings, sharded: bool = False) -> None:
        layout = keys.Layout(settings.stream, settings.shards)
        self.lease = Lease(client, layout.publisher.lease, settings.lease_ttl)
        self.writer = BatchWriter(settings, client, self.lease, layout.publisher, sharded)
        self.sim = Simulator(seed=5, start=time.time() - 3600, rate=100, canary_every=0)
        self.sent = 0
        self.last: Written | None = None

    async def write(self, n: int, batch: int = 200) -> None:
        assert await self.lease.try_acquire() is None
        for start in range(self.sent, self.sent + n, batch):
            events = [self.sim.event(i) for i in range(start, min(start + batch, self.sent + n))]
            frames = [orjson.dumps(e) for e in events]
            self.last = await self.writer.write(
                IngestBatch(frames=frames, folds=[summary_of(e) for e in events], ids=[e["meta"]["id"] for e in events]), time.time()
            )
        self.sent += n


async def make_groups(client: aioredis.Redis) -> None:
    """Both groups at the stream's start, as their consumers make them (so that these tests of the trim hold apart
    from the groups' creation with the stream, below)."""
    for group in (SUB, ARCH):
        await client.xgroup_create(STREAM, group, id="0", mkstream=True)


async def read(client: aioredis.Redis, group: str, count: int = 100_000, stream: str = STREAM) -> list[Entry]:
    """Delivered to `group` (consumer c), not acknowledged."""
    reply = await client.xreadgroup(group, "c", {stream: ">"}, count=count)
    return [(i, None) for i, _ in reply[0][1]] if reply else []


async def consume(client: aioredis.Redis, group: str, stream: str = STREAM) -> int:
    """Read and acknowledge everything there is, as a consumer that keeps up does."""
    entries = await read(client, group, stream=stream)
    if entries:
        await client.xack(stream, group, *[e[0] for e in entries])
    return len(entries)


async def stream_ids(client: aioredis.Redis, stream: str = STREAM) -> list[bytes]:
    return [i for i, _ in await client.xrange(stream)]


async def _folded(client: aioredis.Redis, n: int) -> bool:
    return int(await client.hget(keys.SUBSCRIBER_STATS, "folded") or 0) >= n


def groups_of(infos: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {(g["name"].decode() if isinstance(g["name"], bytes) else g["name"]): g for g in infos}


async def test_what_every_group_acknowledged_is_trimmed_to_the_window(client: aioredis.Redis, base: Settings) -> None:
    """30,000 events, both groups keeping up: the stream holds about STREAM_KEEP entries, not 30,000 (today's
    trimming, at STREAM_MAXLEN only, kept all 30,000)."""
    await make_groups(client)
    feed = Feed(client, base)
    for _ in range(150):
        await feed.write(200)
        assert await consume(client, SUB) == 200 and await consume(client, ARCH) == 200
    length = int(await client.xlen(STREAM))
    assert KEEP <= length <= KEEP + 100 + 200, length  # the window, a chunk, a batch
    assert int(await client.hget(keys.PUBLISHER_STATS, "published")) == 30_000
    assert (await stats(base))["trimmed_unread"] == {}


async def test_an_entry_pending_in_one_group_is_kept_until_the_hard_cap(client: aioredis.Redis, base: Settings) -> None:
    """Delivered to the archiver and not acknowledged (its insert is in flight): it and everything after it stay,
    however far the others are ahead, until STREAM_MAXLEN; then the cap takes it (the archiver's `trimmed`)."""
    s = dataclasses.replace(base, stream_maxlen=8000)
    await make_groups(client)
    feed = Feed(client, s)
    await feed.write(2000)
    await consume(client, SUB)
    await consume(client, ARCH)
    await feed.write(100)
    await consume(client, SUB)
    held = await read(client, ARCH)  # delivered, never acknowledged
    pinned = held[0][0]
    for _ in range(25):
        await feed.write(200)
        await consume(client, SUB)
        await consume(client, ARCH)
    ids = await stream_ids(client)
    assert ids[0] == pinned  # nothing from the pending entry on was trimmed, nothing before it kept
    assert len(ids) == 100 + 25 * 200
    pending = await client.xpending(STREAM, ARCH)
    assert pending["pending"] == 100 and pending["min"] == pinned
    for _ in range(20):  # past the hard cap: it goes, counted by no one as unread (it was delivered)
        await feed.write(200)
        await consume(client, SUB)
        await consume(client, ARCH)
    assert 8000 <= int(await client.xlen(STREAM)) < 8000 + 80 + 200
    assert (await client.xrange(STREAM, pinned, pinned)) == []
    assert (await stats(s))["trimmed_unread"] == {}


async def test_an_undelivered_entry_is_not_trimmed(client: aioredis.Redis, base: Settings) -> None:
    """The archiver read up to some entry and stopped: every entry after it stays, the subscriber being done with them."""
    await make_groups(client)
    feed = Feed(client, base)
    await feed.write(500)
    await consume(client, SUB)
    await consume(client, ARCH)
    last_read = (await stream_ids(client))[-1]
    for _ in range(20):
        await feed.write(200)
        await consume(client, SUB)  # the archiver is stopped (it has a consumer: it ran)
    ids = await stream_ids(client)
    assert ids[0] == last_read and len(ids) == 1 + 20 * 200  # its last delivered id is kept too (no id arithmetic)
    assert await consume(client, ARCH) == 20 * 200  # it catches up on every one


async def test_the_hard_cap_counts_what_a_stopped_group_never_read_exactly(client: aioredis.Redis, base: Settings) -> None:
    """Acknowledged trimming on (STREAM_KEEP below STREAM_MAXLEN) and the archiver stopped after 100 entries: the cap
    trims what it never read, counted exactly; what it reads after plus what it lost is everything after its 100."""
    s = dataclasses.replace(base, stream_maxlen=3000)
    await make_groups(client)
    feed = Feed(client, s)
    await feed.write(100)
    await consume(client, SUB)
    await consume(client, ARCH)
    for _ in range(50):
        await feed.write(200)
        await consume(client, SUB)
    length = int(await client.xlen(STREAM))
    assert 3000 <= length < 3000 + 30 + 200
    lost = (await stats(s))["trimmed_unread"]
    assert lost == {ARCH: 10_100 - length - 100}  # the subscriber lost nothing
    assert feed.last is not None and feed.last.trimmed_unread == lost  # what the publisher logs
    assert await consume(client, ARCH) + lost[ARCH] == 10_000


async def test_the_groups_exist_from_the_streams_first_entry(client: aioredis.Redis, base: Settings) -> None:
    """The publisher's first write makes the stream with the subscriber's and the archiver's groups at 0 (today the
    archiver made its group "from now", a second after the publisher started, and never archived what came before)."""
    feed = Feed(client, base)
    await feed.write(1)
    groups = groups_of(await client.xinfo_groups(STREAM))
    assert set(groups) == {SUB, ARCH}
    assert all(g["last-delivered-id"] in (b"0-0", "0-0") for g in groups.values())
    none = dataclasses.replace(base, stream_consumers="")  # declared none: the stream is made by XADD, bare
    await client.flushall()
    await Feed(client, none).write(1)
    assert await client.xinfo_groups(STREAM) == []


async def test_a_late_subscriber_counts_every_event(client: aioredis.Redis, base: Settings) -> None:
    """Published and archived (acknowledged) well past the window before the subscriber first runs: its group was made
    with the stream, so nothing is trimmed before it folds it, and it counts all."""
    s = dataclasses.replace(base, retention="10s=400d,1m=400d,1h=400d")
    feed = Feed(client, s)
    for _ in range(20):
        await feed.write(200)
        await consume(client, ARCH)
    assert int(await client.xlen(STREAM)) == 4000
    subscriber = Subscriber(s, client)
    task = asyncio.create_task(subscriber.run_stream())
    try:
        await wait_for(lambda: _folded(client, 4000), 20, "every event folded", task)
    finally:
        await stop(task)
    assert int(await client.hget(keys.SUBSCRIBER_STATS, "folded")) == 4000
    await feed.write(200)
    assert KEEP <= int(await client.xlen(STREAM)) <= KEEP + 300  # now it trims


async def test_a_declared_group_no_consumer_reads_holds_only_the_grace(client: aioredis.Redis, base: Settings) -> None:
    """The archiver is declared (the default) but not run: its group holds the last STREAM_GRACE of the stream, no
    more; what it then loses is counted for it and shown by `stats`. Once a consumer reads it, it holds as any group."""
    s = dataclasses.replace(base, stream_grace=3.0, stream_keep=100)
    feed = Feed(client, s)
    started = time.monotonic()
    for _ in range(15):
        await feed.write(200)
        await consume(client, SUB)
    assert time.monotonic() - started < s.stream_grace, "too slow a machine for this test's grace"
    assert int(await client.xlen(STREAM)) == 3000  # within the grace: all held for a late archiver
    await asyncio.sleep(s.stream_grace + 0.3)
    await feed.write(200)
    await consume(client, SUB)
    # Older than the grace: gone but the subscriber's last delivered entry, as the subscriber acknowledged them.
    assert int(await client.xlen(STREAM)) == 201
    assert (await stats(s))["trimmed_unread"] == {ARCH: 2999}
    assert await consume(client, ARCH) == 201  # the archiver starts: it reads what is held, and from now holds on
    await asyncio.sleep(s.stream_grace + 0.3)
    for _ in range(10):
        await feed.write(200)
        await consume(client, SUB)
    assert int(await client.xlen(STREAM)) == 2000 + 1  # everything it has not read, and its last delivered entry
    assert (await stats(s))["trimmed_unread"] == {ARCH: 2999}


async def test_sharded_the_ingest_and_every_shard_stream_are_trimmed(client: aioredis.Redis, base: Settings) -> None:
    """SHARDS=2 on one Redis: the router's copies are trimmed on each shard stream once the subscribers acknowledged
    them, the ingest stream once the router and the archiver did; each new stream comes with its groups."""
    s = dataclasses.replace(base, shards=2)
    layout = keys.Layout(s.stream, s.shards)
    feed = Feed(client, s, sharded=True)
    router = Router(s, client, layout)
    await router.ensure_group()
    for lease in router.leases:
        assert await lease.try_acquire() is None
    await feed.write(1)
    assert set(groups_of(await client.xinfo_groups(STREAM))) == {layout.router_group, ARCH}
    try:
        for _ in range(60):
            await feed.write(200)
            reply = await client.xreadgroup(layout.router_group, "router", {STREAM: ">"}, count=10_000)
            await router.route([(i, [f for kv in fields.items() for f in kv]) for i, fields in reply[0][1]])
            await consume(client, ARCH)
            for shard in layout.all_shards:
                assert set(groups_of(await client.xinfo_groups(shard.stream))) == {SUB}
                await consume(client, SUB, stream=shard.stream)
    finally:
        await router.close()
    assert KEEP <= int(await client.xlen(STREAM)) <= KEEP + 300
    lengths = [int(await client.xlen(shard.stream)) for shard in layout.all_shards]
    assert all(KEEP <= n <= KEEP + 300 for n in lengths), lengths
    assert sum([int(await client.hget(shard.router_stats, "routed") or 0) for shard in layout.all_shards]) == 12_001


async def test_a_subscriber_group_made_over_counts_starts_from_now(client: aioredis.Redis, base: Settings) -> None:
    """A subscriber that finds its group missing on a stream that exists (not declared, or deleted) starts at the
    stream's first entry when its shard holds no counts, else from now: folding what the stream holds again over
    counts already folded would count it twice."""
    s = dataclasses.replace(base, stream_consumers="")
    await Feed(client, s).write(100)  # a bare stream: no group made with it
    last = (await client.xrevrange(STREAM, count=1))[0][0]
    await client.hset(keys.SUBSCRIBER_STATS, "folded", 100)  # counted before, by a group since deleted
    await Subscriber(s, client).ensure_group()
    assert groups_of(await client.xinfo_groups(STREAM))[SUB]["last-delivered-id"] == last
    await client.xgroup_destroy(STREAM, SUB)
    await client.delete(keys.SUBSCRIBER_STATS)  # nothing counted yet
    await Subscriber(s, client).ensure_group()
    assert groups_of(await client.xinfo_groups(STREAM))[SUB]["last-delivered-id"] in (b"0-0", "0-0")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with LocalCluster(tmp_path_factory.mktemp("cluster"), masters=3) as c:
        yield c


async def test_on_a_cluster_every_stream_is_trimmed_and_the_counts_are_exact(cluster: LocalCluster, eventstreams: ServeFn) -> None:
    """A real 3-master cluster, 3 shards, the real publisher, router and subscribers: the ingest stream is trimmed once
    the router acknowledged, each shard stream once its subscriber did, and every count equals the reference fold."""
    _, url = await eventstreams(calibrated_source(), None)
    s = Settings.from_args(
        environ={}, redis_url=cluster.url, shards=3, retention=LONG, stream_url=url, stream_keep=KEEP, stream_consumers="subscriber",
        backoff_cap=0.2, stats_interval=3600.0,
    )  # fmt: skip
    client, layout = await open_client(s)
    assert isinstance(client, RedisCluster)
    await client.flushall(target_nodes=RedisCluster.PRIMARIES)
    try:
        async with aiohttp.ClientSession() as session:
            publisher = Publisher(s, client, session, layout)
            tasks = [asyncio.create_task(publisher.run()), asyncio.create_task(Router(s, client, layout).run())]
            tasks += [asyncio.create_task(Subscriber(s, client, shard).run_stream()) for shard in layout.all_shards]
            try:
                await wait_for(lambda: _folded_everywhere(client, layout, 9996), 90, "every event folded")
                await publisher.drain()
                # The publisher's write trims what the router had acknowledged by then: the next write (here one with
                # no event, as after a quiet moment) trims the rest, however far the router was behind at the last one.
                await wait_for(lambda: _acknowledged(client, s.stream, layout.router_group), 30, "the router acknowledged all")
                await publisher.writer.write(IngestBatch(), time.time(), publisher.recovery.after)
            finally:
                for task in tasks:
                    await stop(task)
                await publisher.close()
        assert_same(await stored_counts(client), reference_fold([orjson.loads(line) for line in calibrated_lines()], time.time()))
        assert set(groups_of(await client.xinfo_groups(s.stream))) == {layout.router_group}
        assert int(await client.xlen(s.stream)) <= KEEP + 100 + s.batch_size * 10  # routed and acknowledged: trimmed
        for shard in layout.all_shards:
            assert set(groups_of(await client.xinfo_groups(shard.stream))) == {SUB}
            assert int(await client.xlen(shard.stream)) <= KEEP + 100 + s.batch_size * 10, shard.stream
        assert (await read_status(client, layout, SUB))["trimmed_unread"] == {}
    finally:
        await client.aclose()


async def _acknowledged(client: Any, stream: str, group: str) -> bool:
    info, last = groups_of(await client.xinfo_groups(stream))[group], (await client.xinfo_stream(stream))["last-generated-id"]
    return int(info["pending"]) == 0 and info["last-delivered-id"] == last


async def _folded_everywhere(client: Any, layout: keys.Layout, n: int) -> bool:
    return sum([int(await client.hget(shard.stats, "folded") or 0) for shard in layout.all_shards]) >= n


def test_the_settings_refuse_an_unknown_role_and_an_empty_window() -> None:
    from wikipulse.core.errors import SettingsError
    from wikipulse.store.trimming import declared_groups

    with pytest.raises(SettingsError, match="unknown 'indexer'"):
        Settings.from_args(environ={}, stream_consumers="subscriber,indexer")
    with pytest.raises(SettingsError, match="stream_keep must be at least 1"):
        Settings.from_args(environ={"STREAM_KEEP": "0"})
    s = Settings.from_args(environ={"STREAM_CONSUMERS": " archiver , subscriber,archiver"})
    assert s.consumer_roles() == ("archiver", "subscriber")
    shard = keys.Layout(s.stream, 2).all_shards[1].stream
    assert declared_groups(s, s.stream, sharded=False) == [SUB, ARCH]
    assert declared_groups(s, s.stream, sharded=True) == ["wikipulse-router", ARCH]
    assert declared_groups(s, shard, sharded=True) == [SUB]
