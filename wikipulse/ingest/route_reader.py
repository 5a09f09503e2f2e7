"""The routes' copier's reads (consumer.StreamConsumer's source): the routes' group read in Redis by a script that
acknowledges the batch before and hands over only the entries some route may want (routes_read.lua).

It reads on a connection of its own to the ingest stream's master, so each batch is confirmed on a replica there
(streams.StreamReader's confirmation) before the copier copies it, as the router's are: else a failover could take
entries away whose copies exist in the routes' streams, and the publisher would write them again, under new ids.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import cast

from redis.exceptions import ResponseError

from wikipulse.core import model
from wikipulse.store import keys
from wikipulse.store.connect import Client, NodeConnection, pack
from wikipulse.store.consumer import NEW
from wikipulse.store.retry import REDIS_ERRORS
from wikipulse.store.scripts import lua
from wikipulse.store.streams import Entry, ReadBatch, StreamReader

CONSUMER = "routes"  # one copier at a time (its lease), so one name: a restarted copier finds its pending entries
READ_MAX = 5000  # entries a read takes at most (and so acknowledges at most next time: one XACK call per 1,000)
_KINDS = ", ".join(f"['{kind}'] = true" for kind in model.EVENT_TYPES)
READ_SCRIPT = f"local READ_MAX = {READ_MAX}\nlocal kinds = {{{_KINDS}}}\n" + lua(__package__, "routes_read")


class RouteReader(StreamReader):
    """READ_SCRIPT in place of XREADGROUP. A batch is acknowledged by the next read (acknowledge), in Redis; an idle
    stream is waited on with a plain XREAD on a second connection (a script cannot block)."""

    def __init__(self, client: Client, stream: str, filters: Callable[[], str]) -> None:
        super().__init__(client, stream, keys.ROUTES_GROUP, CONSUMER)
        self.filters = filters  # the routes' filters as READ_SCRIPT takes them (route_filters.lua_filters), at each read
        self.acked_to = ""  # the last id of the batch copied last: acknowledged, with those before it, by the next read
        self._waiter = NodeConnection(client, stream)
        self._ack = client.register_script(READ_SCRIPT)
        self._seen = "$"  # the last id read
        self._start: str = "0"  # the read on its way: where from, how long it may wait
        self._block: int | None = None

    def acknowledge(self, last: bytes) -> None:
        self.acked_to = last.decode()

    async def send(self, start: str, count: int, block_ms: int | None, confirm: bytes | None = None) -> None:
        self._start, self._block = start, block_ms
        read = pack(("EVAL", READ_SCRIPT, 1, self._stream, keys.ROUTES_GROUP, CONSUMER, count, start, self.acked_to, self.filters()))
        await self._node.connection.send_packed_command(await self._confirmation(confirm) + read)

    async def batch(self) -> ReadBatch:
        await self.confirmed()
        n, last, trimmed, candidates = await self._node.connection.read_response()
        self.acked_to = ""
        if not n:
            if self._start == NEW and self._block:  # wait for the next entry (without reading it for the group)
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
                    await self._ack(keys=[self._stream], args=[keys.ROUTES_GROUP, CONSUMER, 0, NEW, self.acked_to, "[]"])
        finally:
            self.acked_to = ""
