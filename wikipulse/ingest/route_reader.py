"""The routes' copier's reads (consumer.StreamConsumer's source): the routes' group read in Redis by a script
(routes_read.lua). On one Redis, the script copies each batch to the routes' streams and channels itself, fenced by
their leases, and acknowledges it: the entries never leave Redis. On a cluster (each route's stream in a slot of its
own), or for a batch with an entry whose summary only its JSON can tell, it hands over only the entries some route may
want, for the copier to copy; the next read acknowledges them. A read that finds the group at the end of the stream
(the publisher's writes copy while it stands there: route_inline.lua) pauses AT_END_PAUSE, then waits for an entry
after the group's position.

It reads on a connection of its own to the ingest stream's master, so each batch is confirmed on a replica there
(streams.StreamReader's confirmation) before the copier copies it, as the router's are: else a failover could take
entries away whose copies exist in the routes' streams, and the publisher would write them again, under new ids.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from redis.exceptions import ResponseError

from wikipulse.ingest.route_filters import LUA_KINDS
from wikipulse.store import keys
from wikipulse.store.connect import Client, NodeConnection, pack
from wikipulse.store.consumer import NEW
from wikipulse.store.lease import fenced_error
from wikipulse.store.retry import REDIS_ERRORS
from wikipulse.store.scripts import script
from wikipulse.store.streams import Entry, ReadBatch, StreamReader

CONSUMER = "routes"  # one copier at a time (its lease), so one name: a restarted copier finds its pending entries
READ_MAX = 5000  # entries a read takes at most (and so acknowledges at most next time: one XACK call per 1,000)
READ_SCRIPT = f"local READ_MAX = {READ_MAX}\n{LUA_KINDS}" + script(
    __package__, "routes_read", "fence", "trim", "acknowledge", own=("route_judge", "route_copy")
)
# After a read that found the group at the end of the stream: the pause before the next look (the publisher's writes
# copy meanwhile). Without it the copier woke at about every second write to find nothing (`bench_routes --commands`,
# 60,000 events: 108 waits for 206 writes before it, 17 for 209 with it).
AT_END_PAUSE = 0.1
Copied = dict[str, tuple[int, int, list[Any]]]  # route -> (added, refused as duplicates, trim's reply)


def copied_of(names: tuple[str, ...], reply: list[Any]) -> Copied | None:
    """A script's copies in Redis ({added, refused, trim's reply} per route, in the plan's order), by route; None if none."""
    return {name: (int(a), int(r), list(grew)) for name, (a, r, grew) in zip(names, reply, strict=True)} if reply else None


@dataclass(frozen=True)
class ReadPlan:
    """What READ_SCRIPT is told at a read: the routes' filters (route_filters.lua_filters) and, to copy in Redis, each
    route's keys (its stream, counters and lease: `targets`) and the rest (lease token, its ttl ms, the trimming)."""

    names: tuple[str, ...] = ()
    filters: str = "[]"
    targets: tuple[str, ...] = ()  # empty: hand the entries over
    copy_args: tuple[str | int, ...] = ()
    at_write: bytes = b""  # the plan the publisher's write copies by (route_inline.lua); empty: it copies nothing


class RouteReader(StreamReader):
    """READ_SCRIPT in place of XREADGROUP. A batch handed over is acknowledged by the next read (acknowledge), in
    Redis; one copied in Redis is acknowledged there, and what the copy did is `copied`. An idle stream is waited on
    with a plain XREAD on a second connection (a script cannot block)."""

    def __init__(self, client: Client, stream: str, plan: Callable[[], ReadPlan]) -> None:
        super().__init__(client, stream, keys.ROUTES_GROUP, CONSUMER)
        self.plan = plan  # at each read
        self.acked_to = ""  # the last id of the batch copied last: acknowledged, with those before it, by the next read
        self.copied: Copied | None = None  # the last batch's copies, when they were made in Redis
        self._sent = ReadPlan()
        self._waiter = NodeConnection(client, stream)
        self._ack = client.register_script(READ_SCRIPT)
        self._seen = "$"  # the last id read
        self._start: str = "0"  # the read on its way: where from, how long it may wait
        self._block: int | None = None

    def acknowledge(self, last: bytes) -> None:
        self.acked_to = last.decode()

    async def send(self, start: str, count: int, block_ms: int | None, confirm: bytes | None = None) -> None:
        self._start, self._block = start, block_ms
        plan = self._sent = self.plan()
        copy = "1" if plan.targets else "0"
        read = pack(("EVAL", READ_SCRIPT, 1 + len(plan.targets), self._stream, *plan.targets, keys.ROUTES_GROUP, CONSUMER, count, start,
                     self.acked_to, plan.filters, copy, *plan.copy_args))  # fmt: skip
        await self._node.connection.send_packed_command(await self._confirmation(confirm) + read)

    async def batch(self) -> ReadBatch:
        await self.confirmed()
        try:
            n, last, trimmed, candidates, copied = await self._node.connection.read_response()
        except ResponseError as exc:  # a route's lease another copier's (LeaseLost), a full Redis (RedisFull)
            error = fenced_error(exc, "another router ({holder}) holds the lease on a route")
            if error is exc:
                raise
            raise error from exc
        self.acked_to = ""
        self.copied = copied_of(self._sent.names, copied)
        if not n:
            if self._start == NEW and self._block:  # wait for the next entry (without reading it for the group)
                if last:  # the group's last delivered id: the publisher's writes copy what comes next (route_inline.lua)
                    self._seen = last.decode()
                    await asyncio.sleep(AT_END_PAUSE)
                connection = self._waiter.connection
                await connection.send_packed_command(pack(("XREAD", "COUNT", 1, "BLOCK", self._block, "STREAMS", self._stream, self._seen)))
                await connection.read_response()
            return ReadBatch([], 0, None)
        self._seen = last.decode()
        return ReadBatch(cast(list[Entry], candidates), int(n), last, trimmed=int(trimmed))

    async def close(self) -> None:
        """Drop the connections; after a clean stop (the last batch copied), acknowledge it (on a pooled connection: at
        a stop, no new one is made), so that a restart need not copy it again."""
        try:
            await super().close()
            await self._waiter.drop()
            if self.acked_to:
                with contextlib.suppress(*REDIS_ERRORS, ResponseError):
                    await self._ack(keys=[self._stream], args=[keys.ROUTES_GROUP, CONSUMER, 0, NEW, self.acked_to, "[]", "0"])
        finally:
            self.acked_to = ""
