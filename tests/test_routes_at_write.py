"""Routes copied at the publisher's write (ingest/route_inline.lua), against a real Redis.

On one Redis, when the copier's group stands at the end of the stream with nothing pending, the publisher's write
script copies its batch to the routes itself and moves the group past it, in the same atomic step; in every other case
(the copier behind or holding a batch, its set of routes being changed, a route's lease elsewhere, an entry only its
JSON can tell) it copies nothing, and the copier's read copies the batch. Either way each route's stream is its slice
of the events, every entry once, in order, with the original ids."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

from tests.helpers import calibrated_lines
from tests.test_routes import CREATION_ARGS, CREATIONS, ENWIKI_ARGS, ENWIKI_HUMANS, drive, reference, route_entries
from wikipulse.core.settings import Settings
from wikipulse.core.summary import summary_of
from wikipulse.ingest.route_reader import Copied
from wikipulse.ingest.routes import RouteCopier, add_route
from wikipulse.ingest.writer import BatchWriter, IngestBatch
from wikipulse.store import keys
from wikipulse.store.consumer import NEW
from wikipulse.store.lease import Lease

NAMES = ("enwiki-humans", "creations")
SLICES = {"enwiki-humans": ENWIKI_HUMANS, "creations": CREATIONS}


def events(start: int, n: int) -> list[bytes]:
    return [line for line in calibrated_lines() if b'"canary"' not in line][start : start + n]


def batch_of(lines: list[bytes], folds: list[str] | None = None) -> IngestBatch:
    parsed = [orjson.loads(x) for x in lines]
    return IngestBatch(frames=list(lines), folds=folds or [summary_of(e) for e in parsed], ids=[e["meta"]["id"] for e in parsed])


class Pipeline:
    """A copier holding two routes and the publisher's writer that copies by its plan, on one Redis."""

    def __init__(self, client: aioredis.Redis, settings: Settings) -> None:
        self.client, self.settings = client, settings
        self.copier = RouteCopier(settings, client, keys.Layout(settings.stream))
        self.lease = Lease(client, keys.UNSHARDED_PUBLISHER.lease, settings.lease_ttl)
        self.writer = BatchWriter(settings, client, self.lease, routes=lambda: self.copier.plan)
        self.sent: list[bytes] = []

    async def start(self) -> None:
        assert await self.copier.lease.try_acquire() is None and await self.lease.try_acquire() is None
        await self.write(events(0, 1))  # before the routes: they hold what comes after it
        await add_route(self.client, self.settings, "enwiki-humans", ENWIKI_ARGS[1::2], from_stream=False)
        await add_route(self.client, self.settings, "creations", CREATION_ARGS[1::2], from_stream=False)
        await self.copier.refresh()
        assert await drive(self.copier) == []  # the group stands at the end

    async def write(self, lines: list[bytes], folds: list[str] | None = None) -> Copied | None:
        written = await self.writer.write(batch_of(lines, folds), time.time())
        assert written.written == len(lines)
        self.sent += lines
        if written.routed:
            self.copier.copied_at_write(written.routed)
        return written.routed

    async def group(self) -> dict[str, Any]:
        groups: dict[str, dict[str, Any]] = {g["name"].decode(): g for g in await self.client.xinfo_groups(self.settings.stream)}
        return groups[keys.ROUTES_GROUP]

    async def at_end(self) -> bool:
        last = (await self.client.xrevrange(self.settings.stream, count=1))[0][0]
        group = await self.group()
        return bool(group["last-delivered-id"] == last and group["pending"] == 0)

    async def assert_each_route_is_its_slice(self, since: int = 1) -> None:
        """Every entry once, in order, with its original id and fields (`since`: the events sent before the routes)."""
        ingest = dict(await self.client.xrange(self.settings.stream))
        for name in NAMES:
            got = await route_entries(self.client, name)
            want = [orjson.loads(x)["meta"]["id"] for x in self.sent[since:] if reference(orjson.loads(x), SLICES[name])]
            assert [orjson.loads(f[b"data"])["meta"]["id"] for _, f in got] == want
            assert all(ingest[i] == fields for i, fields in got)
            assert int(await self.client.hget(keys.Route(name).router_stats, "copied")) == len(want)

    async def close(self) -> None:
        await self.copier.reader.close()
        await self.copier._forget()


@pytest.fixture
async def pipeline(redis_client: aioredis.Redis, settings: Settings) -> Any:
    p = Pipeline(redis_client, settings)
    try:
        await p.start()
        yield p
    finally:
        await p.close()


async def test_a_write_copies_its_batch_when_the_copier_stands_at_the_end(pipeline: Pipeline, redis_client: aioredis.Redis) -> None:
    """Copied in the write: each route gets its slice at once, its channel hears it, and the group is moved past the
    batch, so the copier's read finds nothing to copy; its wait then blocks from there (it does not spin)."""
    first = events(1, 1)[0]
    await redis_client.xadd(pipeline.settings.stream, {"data": first, "fold": summary_of(orjson.loads(first))})
    pipeline.sent.append(first)
    assert len(await drive(pipeline.copier)) == 1  # the copier's read copies this one: it has read up to it
    async with redis_client.pubsub() as pubsub:
        await pubsub.subscribe("wiki:route:creations")
        assert (await pubsub.get_message(timeout=5))["type"] == "subscribe"
        for start in range(2, 3002, 500):
            routed = await pipeline.write(events(start, 500))
            assert routed is not None and set(routed) == set(NAMES)
            assert await pipeline.at_end()
        heard = []
        while (message := await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.2)) is not None:
            heard.append(message["data"])
    assert heard == [x for x in pipeline.sent[2:] if reference(orjson.loads(x), CREATIONS)]
    await pipeline.assert_each_route_is_its_slice()
    assert pipeline.copier.totals["copied"] == sum([await redis_client.xlen(keys.Route(n).stream) for n in NAMES])
    assert pipeline.copier.totals["duplicates"] == 0

    reader = pipeline.copier.reader
    began = time.monotonic()
    await reader.send(NEW, 1000, 300)
    assert (await reader.batch()).last is None  # nothing left to copy
    await reader.send(NEW, 1000, 300)
    assert (await reader.batch()).last is None
    assert time.monotonic() - began >= 0.3  # the second read waited for an entry after the group's position


async def test_a_write_copies_nothing_when_the_copier_has_work_before_it(pipeline: Pipeline, redis_client: aioredis.Redis) -> None:
    """The copier behind, holding a batch it has not acknowledged, or with a route's lease lost: the write copies
    nothing, the copier's read copies it, and then the writes copy again."""
    stream = pipeline.settings.stream
    await redis_client.xadd(stream, {"data": events(1, 1)[0], "fold": summary_of(orjson.loads(events(1, 1)[0]))})
    pipeline.sent += events(1, 1)  # written by another tool: the group is behind it
    assert await pipeline.write(events(2, 300)) is None
    assert await route_entries(redis_client, "creations") == []
    assert len(await drive(pipeline.copier)) == 1 and await pipeline.at_end()
    await pipeline.assert_each_route_is_its_slice()

    # A batch delivered to the copier, not acknowledged yet (handed over, as on a cluster): pending.
    assert await pipeline.write(events(302, 300)) is not None
    await redis_client.xadd(stream, {"data": events(602, 1)[0]})  # no summary: only its JSON tells, handed over
    pipeline.sent += events(602, 1)
    await pipeline.copier.reader.send(NEW, 1000, None)
    handed = await pipeline.copier.reader.batch()
    assert pipeline.copier.reader.copied is None and handed.last is not None
    assert (await pipeline.group())["pending"] == 1
    assert await pipeline.write(events(603, 300)) is None  # pending: the copier copies those first
    await pipeline.copier.handle(handed)
    assert len(await drive(pipeline.copier)) == 1 and await pipeline.at_end()
    await pipeline.assert_each_route_is_its_slice()

    await redis_client.set(keys.Route("creations").router_lease, "elsewhere:1:x", px=60_000)
    assert await pipeline.write(events(903, 300)) is None  # a route's lease elsewhere: not this copier's to write
    await redis_client.set(keys.Route("creations").router_lease, pipeline.copier.token, px=60_000)
    assert len(await drive(pipeline.copier)) == 1
    assert await pipeline.write(events(1203, 300)) is not None
    await pipeline.assert_each_route_is_its_slice()


async def test_a_batch_with_an_entry_only_its_json_tells_is_left_to_the_copier(pipeline: Pipeline, redis_client: aioredis.Redis) -> None:
    lines = events(1, 200)
    folds = [summary_of(orjson.loads(x)) for x in lines]
    folds[100] = folds[100].replace(" edit ", " rename ").replace(" new ", " rename ").replace(" log ", " rename ")
    assert await pipeline.write(lines, folds) is None
    assert await route_entries(redis_client, "creations") == [] and await route_entries(redis_client, "enwiki-humans") == []
    assert await drive(pipeline.copier) == [None]  # handed over, judged by their JSON, copied in order by the copier
    await pipeline.assert_each_route_is_its_slice()
    assert await pipeline.write(events(201, 200)) is not None
    await pipeline.assert_each_route_is_its_slice()


async def test_a_route_declared_meanwhile_is_caught_up_before_the_writes_copy_again(
    pipeline: Pipeline, redis_client: aioredis.Redis, settings: Settings
) -> None:
    """A write sent with the plan from before a change of the routes copies nothing (the epoch moved on), so the group
    never moves past what a new route's catch-up has not reached: the new route holds every event after its start."""
    assert await pipeline.write(events(1, 500)) is not None
    old = pipeline.copier.plan
    await add_route(redis_client, settings, "dewiki", ["domain=de.wikipedia.org"], from_stream=False)
    pipeline.writer.routes = lambda: old
    start = len(pipeline.sent)
    assert await pipeline.write(events(501, 500)) is not None  # still the old set: the copier has not seen the new route
    await pipeline.copier.refresh(force=True)  # the new route taken up: caught up from its start
    assert await pipeline.write(events(1001, 500)) is None  # the old plan's epoch is gone
    pipeline.writer.routes = lambda: pipeline.copier.plan
    assert await drive(pipeline.copier) != []
    routed = await pipeline.write(events(1501, 500))
    assert routed is not None and set(routed) == {*NAMES, "dewiki"}
    await pipeline.assert_each_route_is_its_slice()
    dewiki = [orjson.loads(x)["meta"]["id"] for x in pipeline.sent[start:] if orjson.loads(x)["meta"]["domain"] == "de.wikipedia.org"]
    assert [orjson.loads(f[b"data"])["meta"]["id"] for _, f in await route_entries(redis_client, "dewiki")] == dewiki
    assert pipeline.copier.totals["duplicates"] == 0


async def test_the_writes_copy_again_after_their_epoch_was_lost(pipeline: Pipeline, redis_client: aioredis.Redis) -> None:
    """Deleted (by another copier that held the lease for a while, or by hand): the copier's next look at the
    definitions takes its routes up anew under a new epoch, and the writes copy again."""
    assert await pipeline.write(events(1, 200)) is not None
    await redis_client.delete(keys.ROUTES_EPOCH)
    assert await pipeline.write(events(201, 200)) is None
    await pipeline.copier.refresh(force=True)
    assert await drive(pipeline.copier) != []
    assert await pipeline.write(events(401, 200)) is not None
    await pipeline.assert_each_route_is_its_slice()


async def test_a_key_of_another_type_under_a_routes_name_stops_no_write(pipeline: Pipeline, redis_client: aioredis.Redis) -> None:
    """The write is past its first writes when it copies: a key made by hand where a route's stream, counters, lease
    or the epoch live makes it copy nothing (the copier's read then says what is wrong), never fail."""
    route = keys.Route("creations")
    start = 1
    for key, make in ((route.stream, "list"), (route.router_stats, "list"), (route.router_lease, "hash"), (keys.ROUTES_EPOCH, "hash")):
        assert await pipeline.at_end()
        saved = await redis_client.dump(key)
        await redis_client.delete(key)
        if make == "list":
            await redis_client.rpush(key, "x")
        else:
            await redis_client.hset(key, "x", "y")
        assert await pipeline.write(events(start, 100)) is None, key  # written whole, copied to no route
        await redis_client.delete(key)
        if saved is not None:
            await redis_client.restore(key, 0, saved)
        assert await drive(pipeline.copier) != []  # the copier's read copies it
        assert await pipeline.write(events(start + 100, 100)) is not None
        start += 200
    await pipeline.assert_each_route_is_its_slice()


async def test_a_route_starting_past_the_end_of_the_stream_leaves_the_write_to_the_read(pipeline: Pipeline) -> None:
    """A start set by hand ahead of the stream: the write does not copy (the read skips what comes before the start)."""
    plan = pipeline.copier.plan
    ahead = orjson.loads(plan.at_write)
    ahead["filters"][0][1] = "99999999999999-0"
    pipeline.writer.routes = lambda: dataclasses.replace(plan, at_write=orjson.dumps(ahead))
    assert await pipeline.write(events(1, 100)) is None
    pipeline.writer.routes = lambda: pipeline.copier.plan
    assert await pipeline.write(events(101, 100)) is None  # the group is behind now: the copier's read is next
    assert await drive(pipeline.copier) != []
    await pipeline.assert_each_route_is_its_slice()
