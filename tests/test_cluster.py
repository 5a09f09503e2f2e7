"""wikipulse on a real 3-master Redis Cluster (Debian's redis-server 7, created with `redis-cli --cluster create`).

The fault scenarios on a cluster (drops, kills, a master restarted) run in tests/test_scenarios.py; here: the
router's exactly-once mechanism itself, pub/sub across nodes, the readers giving the same numbers as on one Redis,
and the operator's errors.
"""

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
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

from tests.conftest import ServeFn
from tests.helpers import assert_same, calibrated_lines, calibrated_source, stop, wait_for
from tests.test_subscriber import LONG, load_stream, stored_counts
from wikipulse import queries as query
from wikipulse.core import model
from wikipulse.core.errors import OperatorError
from wikipulse.core.settings import Settings
from wikipulse.dashboard.data import read_snapshot
from wikipulse.dashboard.view import Selection, trimmed_notice
from wikipulse.devtools.redis_server import LocalCluster
from wikipulse.devtools.reference import reference_fold
from wikipulse.fold.subscriber import Subscriber, run_subscriber
from wikipulse.ingest.publisher import Publisher
from wikipulse.ingest.router import Router
from wikipulse.store import keys
from wikipulse.store.connect import open_client, open_sync_client
from wikipulse.store.lease import LeaseLost
from wikipulse.store.status import read_status

SHARDS = 3
PAGE_DOMAINS = ("commons.wikimedia.org", "www.wikidata.org", "en.wikipedia.org", "de.wikipedia.org")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with LocalCluster(tmp_path_factory.mktemp("cluster"), masters=3) as c:
        yield c


@pytest.fixture
def cluster_settings(cluster: LocalCluster, settings: Settings) -> Settings:
    return dataclasses.replace(settings, redis_url=cluster.url, shards=SHARDS, retention=LONG, consumer="")


@pytest.fixture
async def cluster_client(cluster: LocalCluster, cluster_settings: Settings) -> AsyncIterator[RedisCluster]:
    client, layout = await open_client(cluster_settings)
    assert isinstance(client, RedisCluster) and layout.sharded, "a cluster node was not detected as one"
    await client.flushall(target_nodes=RedisCluster.PRIMARIES)
    yield client
    await client.aclose()


def layout_of(settings: Settings) -> keys.Layout:
    return keys.Layout(settings.stream, settings.shards, cluster=True)


async def folded(client: Any, layout: keys.Layout) -> int:
    return sum([int(await client.hget(shard.stats, "folded") or 0) for shard in layout.all_shards])


def test_shards_spread_over_the_masters() -> None:
    layout = keys.Layout("wiki:events", SHARDS, cluster=True)
    thirds = [key_slot(s.stream.encode()) * 3 // REDIS_CLUSTER_HASH_SLOTS for s in layout.all_shards]
    assert thirds == [0, 1, 2]  # with the slots split evenly, shard i is on master i
    shard = layout.shard_of("en.wikipedia.org")
    assert {key_slot(k.encode()) for k in (shard.stream, shard.stats, shard.claims, shard.consumer_lease("g", "c"))} == {
        key_slot(shard.series_key("en.wikipedia.org", model.RESOLUTIONS[0], 0).encode())
    }
    p = layout.publisher
    assert {key_slot(k.encode()) for k in (layout.stream, p.position, p.seen, p.stats, p.rejected, p.lease)} == {key_slot(b"wiki:events")}
    assert keys.Layout("wiki:events").publisher == keys.UNSHARDED_PUBLISHER  # one Redis: the keys as they always were


async def test_a_replayed_route_adds_nothing_and_a_second_router_is_fenced(
    cluster_client: RedisCluster, cluster_settings: Settings
) -> None:
    layout = layout_of(cluster_settings)
    lines = [line for line in calibrated_lines() if b'"canary"' not in line][:3000]
    await load_stream(cluster_client, lines, with_fold=True)  # as the publisher writes the ingest stream
    router = Router(cluster_settings, cluster_client, layout)
    await router.ensure_group()
    for lease in router.leases:
        assert await lease.try_acquire() is None
    reply = await cluster_client.xreadgroup(layout.router_group, "router", {layout.stream: ">"}, count=10_000)
    entries = [(i, [f for kv in fields.items() for f in kv]) for i, fields in reply[0][1]]
    await router.route(entries[:2000])
    # A crash after the shards were written and before the XACK: the restarted router routes them again.
    await router.route(entries)
    assert router.totals == {"routed": 3000, "duplicates": 2000, "trimmed": 0}
    routed: dict[bytes, bytes] = {}
    for shard in layout.all_shards:
        for entry_id, fields in await cluster_client.xrange(shard.stream):
            assert entry_id not in routed
            routed[entry_id] = fields[b"fold"]
            assert layout.shard_of(fields[b"fold"].split(b" ")[0].decode()) == shard  # in its domain's shard
    assert routed == {i: dict(zip(f[::2], f[1::2], strict=True))[b"fold"] for i, f in entries}  # original ids, each once

    other = Router(cluster_settings, cluster_client, layout)  # a second router by mistake: it holds no lease
    with pytest.raises(LeaseLost, match="another router"):
        await other.route(entries[:10])
    await router.close()
    await other.close()


async def test_the_pipeline_on_a_cluster_reads_like_one_redis(
    cluster_client: RedisCluster,
    cluster_settings: Settings,
    redis_client: aioredis.Redis,
    settings: Settings,
    eventstreams: ServeFn,
) -> None:
    """The same 10,000 events, published from a local feed, on one Redis and on the cluster: every series key equals
    the reference fold, and `counts`, `stats` and the page read the same numbers from both."""
    layout = layout_of(cluster_settings)
    lines = calibrated_lines()
    expected = reference_fold([orjson.loads(line) for line in lines], time.time())
    single = dataclasses.replace(settings, retention=LONG)
    runs: tuple[tuple[Settings, Any, keys.Layout], ...] = (
        (cluster_settings, cluster_client, layout),
        (single, redis_client, keys.Layout(single.stream)),
    )
    for s, client, target in runs:
        _, url = await eventstreams(calibrated_source(), None)
        s = dataclasses.replace(s, stream_url=url)
        async with aiohttp.ClientSession() as session:
            publisher = Publisher(s, client, session, target)
            tasks = [asyncio.create_task(publisher.run())]
            if target.sharded:
                tasks.append(asyncio.create_task(Router(s, client, target).run()))
            tasks += [asyncio.create_task(Subscriber(s, client, shard).run_stream()) for shard in target.all_shards]
            try:
                await wait_for(lambda c=client, t=target: _all_folded(c, t, 9996), 90, "every event folded")  # type: ignore[misc]
            finally:
                for task in tasks:
                    await stop(task)
                await publisher.close()
    assert_same(await stored_counts(cluster_client), expected)
    assert_same(await stored_counts(redis_client), expected)

    now = str(int(time.time()))
    for domain in (*PAGE_DOMAINS, keys.ALL_DOMAINS):
        on_cluster = await query.counts(cluster_settings, domain, "1h", "0", now, "type")
        on_one = await query.counts(single, domain, "1h", "0", now, "type")
        assert on_cluster == on_one and on_cluster, domain
    cluster_status, one_status = (
        await read_status(cluster_client, layout, "wikipulse"),
        await read_status(redis_client, keys.Layout(single.stream), "wikipulse"),
    )
    for name in ("published", "folded", "pending", "duplicates", "rejected", "late"):
        assert cluster_status[name] == one_status[name], name
    assert cluster_status["folded"] == 9996 and cluster_status["router"]["routed"] == 9996

    sel = Selection(PAGE_DOMAINS, "1h", "6h", "type")
    sync_cluster = open_sync_client(cluster_settings, cluster=True)
    sync_one = open_sync_client(single, cluster=False)
    t = time.time()
    page_cluster = read_snapshot(sync_cluster, cluster_settings.stream, sel, t, layout)
    page_one = read_snapshot(sync_one, single.stream, sel, t)
    assert page_cluster.series == page_one.series
    assert sorted(page_cluster.ranked_hour) == sorted(page_one.ranked_hour) and page_one.ranked_hour
    assert page_cluster.recent_10s == page_one.recent_10s and page_cluster.last_hour_1m == page_one.last_hour_1m
    sync_cluster.close()
    sync_one.close()


async def _all_folded(client: Any, layout: keys.Layout, n: int) -> bool:
    return await folded(client, layout) >= n


async def test_every_node_hears_every_event_on_the_channel(
    cluster: LocalCluster, cluster_client: RedisCluster, cluster_settings: Settings, eventstreams: ServeFn
) -> None:
    """`redis-cli -c subscribe wiki` on any node: classic PUBLISH is broadcast over the cluster bus."""
    _, url = await eventstreams(calibrated_source(), None)
    s = dataclasses.replace(cluster_settings, stream_url=url)
    listeners = [aioredis.Redis(port=node.port) for node in cluster.nodes]
    pubsubs = [listener.pubsub() for listener in listeners]
    for ps in pubsubs:
        await ps.subscribe(s.channel)
        assert (await ps.get_message(timeout=5))["type"] == "subscribe"
    heard: list[list[bytes]] = [[] for _ in pubsubs]

    async def listen(i: int) -> None:
        while True:
            message = await pubsubs[i].get_message(ignore_subscribe_messages=True, timeout=1)
            if message is not None:
                heard[i].append(message["data"])

    async with aiohttp.ClientSession() as session:
        publisher = Publisher(s, cluster_client, session, layout_of(s))
        tasks = [asyncio.create_task(listen(i)) for i in range(len(pubsubs))] + [asyncio.create_task(publisher.run())]

        async def all_heard() -> bool:
            return all(len(h) >= 9996 for h in heard)

        try:
            await wait_for(all_heard, 60, "every node heard every event")
        finally:
            for task in tasks:
                await stop(task)
            await publisher.close()
    assert heard[0] == heard[1] == heard[2] and len(heard[0]) == 9996
    for ps, listener in zip(pubsubs, listeners, strict=True):
        await ps.aclose()
        await listener.aclose()


async def test_operator_errors_on_a_cluster(cluster_settings: Settings, tmp_path: Path) -> None:
    with pytest.raises(OperatorError, match="use the stream"):
        await run_subscriber(dataclasses.replace(cluster_settings, source="pubsub"))
    with pytest.raises(Exception, match="shard"):
        Settings.from_args(environ={"SHARDS": "3", "SUBSCRIBER_SHARDS": "3"})
    with pytest.raises(Exception, match="shard"):
        Settings.from_args(environ={"SHARDS": "3", "SUBSCRIBER_SHARDS": "one"})


async def test_the_archiver_on_a_cluster_archives_every_event_once(
    cluster_client: RedisCluster, cluster_settings: Settings, tmp_path: Path
) -> None:
    """Its XACK and its batch list are one MULTI: on a cluster they share the ingest stream's slot."""
    pytest.importorskip("chdb")
    from wikipulse.archive.archiver import Archiver
    from wikipulse.archive.table import Archive, connect

    s = dataclasses.replace(cluster_settings, archive_dir=str(tmp_path / "clickhouse"), archive_from_stream=True, archive_batch=3000)
    layout = layout_of(s)
    lines = calibrated_lines()
    await load_stream(cluster_client, lines, with_fold=True)
    archive = Archive(connect(s))
    archive.ensure_schema()
    archiver = Archiver(s, cluster_client, layout)
    archiver.archive = archive
    await archiver.ensure_group()
    task = asyncio.create_task(archiver.consume())

    async def all_acknowledged() -> bool:
        pending = await cluster_client.xpending(s.stream, s.archive_group)
        return archiver.totals["archived"] >= 9996 and pending["pending"] == 0

    try:
        await wait_for(all_acknowledged, 60, "every entry archived and acknowledged", task)
    finally:
        await stop(task)
    assert archive.query("SELECT count(), uniqExact(meta_id) FROM events")[1] == [(9996, 9996)]
    assert await cluster_client.llen(layout.archiver_batches(s.archive_group)) == 0
    assert int(await cluster_client.hget(layout.archiver_stats, "archived") or 0) == 9996
    archive.close()


async def test_what_a_shard_stream_loses_to_trimming_is_counted_and_shown(cluster_client: RedisCluster, cluster_settings: Settings) -> None:
    """The subscribers are stopped while the router writes past STREAM_MAXLEN: the entries trimmed from the shard streams
    before the group read them are counted per shard, summed by `stats` and said on the page."""
    s = dataclasses.replace(cluster_settings, stream_maxlen=500)
    layout = layout_of(s)
    for shard in layout.all_shards:  # the subscribers ran once (their group exists), then stopped
        await cluster_client.xgroup_create(shard.stream, s.group, id="0", mkstream=True)
    lines = [line for line in calibrated_lines() if b'"canary"' not in line][:4000]
    await load_stream(cluster_client, lines, with_fold=True)
    router = Router(s, cluster_client, layout)
    await router.ensure_group()
    for lease in router.leases:
        assert await lease.try_acquire() is None
    reply = await cluster_client.xreadgroup(layout.router_group, "router", {layout.stream: ">"}, count=10_000)
    for start in range(0, 4000, 500):  # in batches, as the router reads
        await router.route([(i, [f for kv in fields.items() for f in kv]) for i, fields in reply[0][1][start : start + 500]])
    await router.close()
    kept = sum([await cluster_client.xlen(shard.stream) for shard in layout.all_shards])
    status = await read_status(cluster_client, layout, s.group)
    lost = status["trimmed_unread"].get(s.group, 0)
    assert lost > 0 and lost + kept == 4000
    client = open_sync_client(s, cluster=True)
    snap = read_snapshot(client, s.stream, Selection((), "1m", "1h", "total"), layout=layout)
    client.close()
    assert f"{lost:,} events were trimmed from the stream before consumer group 'wikipulse'" in trimmed_notice(snap)
