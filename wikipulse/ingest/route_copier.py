"""The routes' copier, in the publisher's process: the ingest stream -> each route's stream and channel (routes.py).

It reads the ingest stream with its own consumer group (keys.ROUTES_GROUP; consumer.StreamConsumer's loop, the reads
route_reader.py's) and copies each entry a route's filter holds for, with its original id and fields, to the route's
stream, then PUBLISHes its JSON on the route's channel. On one Redis, the copies are made in Redis (the entries never
leave it): while the group stands at the end of the stream, by the publisher's write itself, by the copier's plan and
under its epoch (route_inline.lua, route_at_write.py); else by the read's script. On a cluster, or for a batch with an
entry only its JSON can tell, the copier makes them, through the router's writer.

Exactly once into each route's stream, across kill -9, by the router's rules and its writer (router.ShardWriter): a
stream accepts an explicit id only above its last, so an entry copied again (a restart re-reads its pending entries) is
refused and counted as a duplicate; each route's stream is written in id order by one copier at a time (the copier's
lease, and a lease per route that fences each MULTI/EXEC), and a batch is written to every route before it is
acknowledged. Through a failover, a batch is copied only once a replica of the ingest stream's master has it, and a
route's write returns only once a replica of the route's master has it (ShardWriter's WAIT). Copied in Redis, by the
same rules in one script (original ids, duplicates refused and counted, each route's lease fencing it): the copies and
the group's move past the batch are one atomic step, which a kill -9 of this process cannot split. The channel is
pub/sub's at-most-once: published after the write, only what the write added.

The group exists only while routes do (an idle group would count as trimmed unread), and is made at the earliest
route's start, so it delivers all they may hold. A route declared while the group exists is caught up from its start
to where the stream ends then (XRANGE), and from there copied with the group's batches (what they bring up to that
point is skipped). `live` in the route's counters records that it needs no catch-up (for that definition's token), so
a restart does not scan again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ResponseError

from wikipulse.core.settings import PublisherSettings
from wikipulse.ingest.route_at_write import WriteEpoch
from wikipulse.ingest.route_filters import Definition, Head, Matcher, describe, heads_of, id_key, load_definitions, lua_filters, matcher
from wikipulse.ingest.route_reader import CONSUMER, READ_MAX, Copied, ReadPlan, RouteReader
from wikipulse.ingest.router import ShardWriter
from wikipulse.store import keys
from wikipulse.store.connect import Client
from wikipulse.store.consumer import Handler, StreamConsumer
from wikipulse.store.lease import Lease, LeaseLost, new_token
from wikipulse.store.scripts import lua
from wikipulse.store.streams import Entry, ReadBatch
from wikipulse.store.trimming import declared_groups

logger = logging.getLogger(__name__)

POLL_INTERVAL = 2.0  # seconds between reads of the definitions: a change takes effect within about this
CATCH_UP_CHUNK = 5000
COPY_READ = 1000  # entries a read copying in Redis takes at most (measured: 2.4 µs an entry in Lua at 1,000, 3.4 at 5,000)
GATHER = 0.1  # seconds the copier lets entries gather after a short batch: routes lag the stream by about this
PUBLISH_SCRIPT = lua(__package__, "routes_publish")
Publish = Callable[..., Awaitable[Any]]


async def last_id(client: Client, stream: str) -> str:
    try:
        info = await client.xinfo_stream(stream)
    except ResponseError:
        return "0-0"  # no stream yet
    last = info.get("last-generated-id") or b"0-0"
    return last.decode() if isinstance(last, bytes) else str(last)


async def drop_keys(client: Client, route: keys.Route) -> None:
    for key in (route.stream, route.router_stats):  # one at a time: on a cluster they are in one slot, but not the lease
        await client.delete(key)


async def _end(task: asyncio.Task[None] | None) -> None:
    """Cancel a lease keeper and wait for it, so that no command of it is left on a connection when the client closes."""
    if task is not None:
        task.cancel()
        await asyncio.wait([task])  # not `await task`: that would take a cancellation of this task for the keeper's


@dataclass
class Live:
    """A route as the copier holds it."""

    definition: Definition
    route: keys.Route
    matches: Matcher
    lease: Lease
    writer: ShardWriter
    keeper: asyncio.Task[None] | None = None
    done_to: tuple[int, int] | None = None  # its start, or where its catch-up ended: the group's entries up to it are skipped
    reported: dict[str, int] = field(default_factory=dict)

    def matching(self, entries: Sequence[Entry], heads: Sequence[Head | None]) -> list[Entry]:
        matches = self.matches
        part = [e for e, head in zip(entries, heads, strict=True) if head is not None and matches(head)]
        done = self.done_to  # never cleared: a restart's pending entries may go back before it
        if done is not None and entries and id_key(entries[0][0]) <= done:
            if id_key(entries[-1][0]) <= done:
                return []
            part = [e for e in part if id_key(e[0]) > done]
        return part

    async def write(self, part: list[Entry], publish: Publish) -> tuple[int, int]:
        """Through the router's fenced writer; then the added ones are published (the refused ones lead: ids ascend).
        (added, duplicates)."""
        # Trimming: the hard cap STREAM_MAXLEN, with trimmed_unread per group of the route (trim.lua, in the writer). The
        # trim of what every group acknowledged (a short window) plugs in where wiki:events gets it: trimming.py's script.
        added, duplicates, grew = await self.writer.write(part)
        if added or duplicates:
            # The added ones, from the stream itself (the data is not sent again), and the counters: not part of the guarantee.
            first = part[len(part) - added][0] if added else b"0-1"
            await publish(keys=[self.route.stream, self.route.router_stats], args=[first, added, duplicates])
        self.report(grew)
        return added, duplicates

    def report(self, grew: list[Any]) -> None:
        """Log what groups of the route lost to its hard cap (trim's reply), once for each new total."""
        for group, total in zip(grew[::2], grew[1::2], strict=True):
            name = group.decode() if isinstance(group, bytes) else str(group)
            if self.reported.get(name) != int(total):
                logger.error(
                    "route %s: %d entries were trimmed before group %r read them (STREAM_MAXLEN)", self.definition.name, int(total), name
                )
                self.reported[name] = int(total)

    async def let_go(self) -> None:
        await _end(self.keeper)
        await self.writer.close()
        await self.lease.release()


async def catch_up(
    client: Client,
    stream: str,
    live: Live,
    heads: Callable[[Sequence[Entry]], list[Head | None]],
    write: Callable[[Live, list[Entry]], Awaitable[int]],
) -> None:
    """Copy what the ingest stream holds after the route's start (or its own last entry) up to its end now. What comes
    after that, the group delivers (it has read no further: it is read by the copier's task only, between refreshes);
    what it delivers up to there is skipped (done_to)."""
    start = max(id_key(live.definition.start), id_key(await last_id(client, live.route.stream)))
    end = id_key(await last_id(client, stream))
    at, last = f"{start[0]}-{start[1]}", f"{end[0]}-{end[1]}"
    copied = 0
    while start < end:
        raw = await client.xrange(stream, f"({at}", last, count=CATCH_UP_CHUNK)
        if not raw:
            break
        entries: list[Entry] = [(i, [x for kv in f.items() for x in kv]) for i, f in raw]
        at = entries[-1][0].decode()
        part = live.matching(entries, heads(entries))
        if part:
            copied += await write(live, part)
    live.done_to = max(start, end)
    await client.hset(live.route.router_stats, "live", live.definition.token)
    if copied:
        logger.info("route %s: caught up with %d entries from %s", live.definition.name, copied, stream)


def read_plan(routes: dict[str, Live], lease: Lease | None) -> ReadPlan:
    """What the reads are told of the routes; with the copier's `lease` (one Redis), to copy them in Redis."""
    lives = list(routes.values())
    filters = lua_filters([(live.definition.where, live.done_to or (0, 0)) for live in lives])
    if lease is None or not lives:
        return ReadPlan(tuple(routes), filters)
    targets = tuple(key for live in lives for key in (live.route.stream, live.route.router_stats, live.route.router_lease))
    return ReadPlan(tuple(routes), filters, targets, (lease.token, lease.ttl_ms, *lives[0].writer.trim_args))


def count_copied(copied: Copied, routes: dict[str, Live], totals: Counter[str]) -> None:
    """What a read copied in Redis, in the totals; what a route's groups lost to its hard cap, logged."""
    for name, (added, duplicates, grew) in copied.items():
        totals.update(copied=added, duplicates=duplicates)
        if (live := routes.get(name)) is not None:
            live.report(grew)


async def count_trimmed(client: Client, stream: str, totals: Counter[str], trimmed: int) -> None:
    if trimmed:
        # Delivered to the copier, then trimmed from the ingest stream before it copied them (it was down).
        await client.hincrby(keys.ROUTES_STATS, "trimmed", trimmed)
        logger.error("routes: %d entries were trimmed from %s before they were copied", trimmed, stream)
    totals["trimmed"] += trimmed


async def load_wanted(client: Client, totals: Counter[str]) -> dict[str, Definition]:
    """The routes' definitions; one that cannot be read is logged (once) and counted, and skipped."""
    wanted, refused = load_definitions(await client.hgetall(keys.ROUTES))
    for bad, exc in refused.items():
        if not totals[key := f"bad:{bad.decode(errors='replace')}"]:
            logger.error("route %r: its definition in %s cannot be read (%s): skipped", bad, keys.ROUTES, exc)
        totals[key] += 1
    return wanted


async def start_of_group(client: Client, wanted: dict[str, Definition]) -> str:
    """The earliest route's start. First, no route is marked live: a crash before they are marked again finds them so."""
    for d in wanted.values():
        await client.hdel(keys.Route(d.name).router_stats, "live")
    earliest = min(id_key(d.start) for d in wanted.values())
    return f"{earliest[0]}-{earliest[1]}"


class RouteCopier(Handler):
    doing = "copying"

    def __init__(self, settings: PublisherSettings, client: Client, layout: keys.Layout) -> None:
        self.settings, self.client, self.stream = settings, client, layout.stream
        self.token = new_token()
        self.lease = Lease(client, keys.ROUTES_LEASE, settings.lease_ttl, self.token)
        self.keeper: asyncio.Task[None] | None = None
        self.routes: dict[str, Live] = {}
        self.totals: Counter[str] = Counter()
        self._polled = -1e9
        self._wanted: dict[str, Definition] = {}  # the definitions read last
        self.at_write = WriteEpoch(client, self.token)  # what the publisher's writes copy by (route_at_write.py)
        self._publish = client.register_script(PUBLISH_SCRIPT)
        self.in_redis = not isinstance(client, RedisCluster)  # one Redis: the reads copy (route_reader.py)
        self.plan = ReadPlan()  # what the reads, and the publisher's writes, are told of the routes
        self.reader = RouteReader(client, self.stream, lambda: self.plan)
        self.consumer = StreamConsumer(client, self.stream, keys.ROUTES_GROUP, CONSUMER, log=logger, what="routes",
                                       declared=declared_groups(settings, layout.stream, layout.sharded),
                                       count=min(settings.read_batch_size, READ_MAX), backoff_cap=settings.backoff_cap,
                                       start=lambda: start_of_group(client, self._wanted), confirm=True, read_ahead=False, gather=GATHER,
                                       source=self.reader)  # fmt: skip

    async def run(self) -> None:
        """Copy until cancelled; Redis outages, a full Redis and a lost lease are waited out."""
        try:
            await self.consumer.run(self)
        finally:
            await _end(self.keeper)
            await self._forget()
            await self.lease.release()

    async def begin(self) -> None:
        if self.keeper is None:
            await self.lease.wait_until_held("the routes' copier lease")
            self.keeper = asyncio.create_task(self.lease.keep())

    async def ready(self) -> bool:
        """Whether there are routes to copy to (else the group is gone, and the reads wait)."""
        await self.refresh()
        if self.routes:
            return True
        self.reader.acked_to = ""
        await asyncio.sleep(POLL_INTERVAL)
        return False

    def count(self, pending: bool) -> int | None:
        return COPY_READ if self.in_redis else None  # a longer script holds Redis longer, and costs more an entry

    async def handle(self, batch: ReadBatch) -> None:
        """Each batch copied (in Redis by the read itself, or here) to every route, then acknowledged (by the next read)."""
        if batch.last is not None and (copied := self.reader.copied) is not None:
            count_copied(copied, self.routes, self.totals)
            await count_trimmed(self.client, self.stream, self.totals, batch.trimmed)
        elif batch.last is not None:
            await self.copy(batch.entries, ack=False, trimmed=batch.trimmed)
            self.reader.acknowledge(batch.last)

    async def end(self) -> None:
        """Drop what this process holds of the routes (the next round loads them again, as a new process would)."""
        await self._forget()

    async def failed(self, error: Exception) -> bool:
        if not isinstance(error, LeaseLost):
            return False
        logger.error("routes: %s; the copier wrote nothing since, and waits for its leases again", error)
        await _end(self.keeper)
        self.keeper = None
        return True

    async def _forget(self) -> None:
        routes, self.routes = list(self.routes.values()), {}
        await self.at_write.forget(self.plan)
        self.plan = ReadPlan()
        await asyncio.gather(*(live.let_go() for live in routes))  # at once: a stop is quick
        self._polled = -1e9

    async def refresh(self, force: bool = False) -> None:
        """Read the definitions (every POLL_INTERVAL); take up new ones (catch-up), let go of removed ones."""
        now = time.monotonic()
        if not force and now - self._polled < POLL_INTERVAL:
            return
        self._polled = now
        wanted = await load_wanted(self.client, self.totals)
        stale = [n for n, live in self.routes.items() if wanted.get(n) is None or wanted[n].token != live.definition.token]
        changing = bool(stale) or not wanted.keys() <= self.routes.keys() or await self.at_write.lost(self.plan)
        if changing:  # first: a write copying at once must not move the group past what the change needs (a catch-up)
            self.plan = await self.at_write.stop(self.plan)
        for name in stale:
            live = self.routes.pop(name)
            await live.let_go()
            await drop_keys(self.client, live.route)  # anything this copier wrote after `route remove` (or a re-add)
            logger.warning("route %s %s", name, "removed" if name not in wanted else "declared again: starts anew")
        self._wanted = wanted
        if not wanted:
            self.plan = ReadPlan()
            if self.consumer.group_known:
                with contextlib.suppress(ResponseError):  # an idle group would count as trimmed unread
                    await self.consumer.destroy_group()
            return
        if not changing:
            return
        # Made now, the group delivers everything any route may hold (no catch-up: a route skips what came before its
        # own start); made anew (it vanished while routes remained), it delivers again what their streams hold, refused.
        fresh = await self.consumer.ensure_group() is not None
        for name, d in sorted(wanted.items()):
            if name not in self.routes:
                await self._take_up(d, fresh)
        self.plan = await self.at_write.start(read_plan(self.routes, self.lease if self.in_redis else None))

    def copied_at_write(self, copied: Copied) -> None:
        """What the publisher's write copied to the routes itself (route_inline.lua), in the totals."""
        count_copied(copied, self.routes, self.totals)

    async def _take_up(self, d: Definition, fresh_group: bool) -> None:
        route = keys.Route(d.name)
        lease = Lease(self.client, route.router_lease, self.settings.lease_ttl, self.token)
        await lease.wait_until_held(f"the lease on route {d.name}")
        writer = ShardWriter(self.client, route, lease, self.settings, f"route {d.name}", groups=())
        live = Live(d, route, matcher(d.where), lease, writer, asyncio.create_task(lease.keep()), id_key(d.start))
        self.routes[d.name] = live  # it holds only what came after its start
        if fresh_group:  # the group delivers from before its start
            await self.client.hset(route.router_stats, "live", d.token)
        else:
            done = await self.client.hget(route.router_stats, "live")
            if done is None or done.decode() != d.token:
                await catch_up(self.client, self.stream, live, self._heads, self._write)
        logger.info("route %s: %s -> %s (and its channel)", d.name, describe(d.where), route.stream)

    def _heads(self, entries: Sequence[Entry]) -> list[Head | None]:
        heads, unreadable = heads_of(entries, self.settings.max_event_bytes)
        self.totals["unreadable"] += unreadable
        return heads

    async def copy(self, entries: Sequence[Entry], ack: bool = True, trimmed: int = 0) -> None:
        """One batch of the group to every route, then acknowledged (`ack`: here; else by the next read)."""
        heads = self._heads(entries)
        trimmed += sum(1 for _, fields in entries if fields is None)
        parts = [(live, live.matching(entries, heads)) for live in self.routes.values()]
        await asyncio.gather(*(self._write(live, part) for live, part in parts if part))
        if ack:
            await self.client.xack(self.stream, keys.ROUTES_GROUP, *[e[0] for e in entries])
        await count_trimmed(self.client, self.stream, self.totals, trimmed)

    async def _write(self, live: Live, part: list[Entry]) -> int:
        added, duplicates = await live.write(part, self._publish)
        self.totals.update(copied=added, duplicates=duplicates)
        return added
