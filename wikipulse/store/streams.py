"""Reading the stream with a consumer group, fast: replies unparsed, on a connection of their own.

Shared by every consumer (consumer.StreamConsumer: the router, the archiver, the routes' copier, the subscriber).
redis-py would turn every entry into a dict, which costs more than everything else any of them does per entry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

from wikipulse.store.connect import Client, NodeConnection, ReplicaWait, pack

# An entry as XREADGROUP/XAUTOCLAIM reply it, unparsed: [id, [field, value, ...]], or [id, None]
# when it was trimmed from the stream before it was read.
Entry = tuple[bytes, list[bytes] | None]


@dataclass(slots=True)
class ReadBatch:
    """One read: the entries handed over, and what the reading loop needs to know of the read itself."""

    entries: list[Entry]
    read: int  # entries the read took from the stream (more than len(entries) when a source filters in Redis)
    last: bytes | None  # the id of the last of them (None: the read found nothing)
    counter: bytes | None = None  # StreamReader's counter, as it was before the read
    trimmed: int = 0  # entries read but left out of `entries` because they were trimmed (a filtering source)
    pending: bool = False  # read from the consumer's own pending entries (a restart's), not new ones


class StreamReader:
    """XREADGROUP on a connection of its own, sent and received apart, so Redis can read the next batch
    while this process works on the current one. With `counter`, each read is preceded by a GET of that
    key on the same connection (so before it, in Redis): the subscriber's claims count (keys.CLAIMS).

    A reader whose entries have an effect on another master or in ClickHouse (the router, the archiver) confirms each
    batch before acting on it (send(confirm=last_held(batch)), then confirmed(); or confirm(last_held(batch))): a
    replica of the stream's master has the entries. Without it, a failover could lose entries whose copies or rows
    exist elsewhere, and the publisher would then write them again (it reads the feed again from the position the new
    master holds): counted twice. WAIT waits for what this connection wrote; a read of pending entries writes nothing,
    and a blocked read served later may not count as this connection's write. So the confirmation first re-claims the
    batch's last entry to its own consumer (XCLAIM JUSTID, no idle floor: it changes nothing but that entry's idle
    time), a write replicated after every entry before it."""

    def __init__(self, client: Client, stream: str, group: str, consumer: str, counter: str | None = None) -> None:
        self._node = NodeConnection(client, stream)  # on a cluster, the counter shares the stream's slot
        self._stream, self._group, self._counter = stream, group, counter
        self.consumer = consumer  # the name it reads under (the subscriber's changes when it takes another one)
        self.replicas = ReplicaWait(client, stream)
        self._waiting = 0  # replicas the WAIT on the wire asks for (confirmed() takes its answer)

    async def send(self, start: str, count: int, block_ms: int | None, confirm: bytes | None = None) -> None:
        """Ask for the next batch; with `confirm` (the previous batch's last_held id), first for a replica to have it."""
        block = ["BLOCK", block_ms] if block_ms is not None else []
        read = ["XREADGROUP", "GROUP", self._group, self.consumer, "COUNT", count, *block, "STREAMS", self._stream, start]
        commands = [("GET", self._counter), read] if self._counter else [read]
        connection = self._node.connection
        await connection.send_packed_command([await self._confirmation(confirm), *connection.pack_commands(commands)])

    async def confirm(self, last: bytes) -> None:
        """Return once a replica has the batch whose last_held id is `last` (raises ReplicaBehind); nothing else in
        flight."""
        confirmation = await self._confirmation(last)
        if confirmation:  # else no replica to wait for (one Redis, or a master without one)
            await self._node.connection.send_packed_command(confirmation)
            await self.confirmed()

    async def confirmed(self) -> None:
        """After send(confirm=...): return once a replica has the previous batch (raises ReplicaBehind)."""
        if self._waiting:
            wanted, self._waiting = self._waiting, 0
            connection = self._node.connection
            await connection.read_response()  # XCLAIM's
            await self.replicas.check(wanted, int(await connection.read_response()))

    async def _confirmation(self, last: bytes | None) -> bytes:
        self._waiting = await self.replicas.wanted() if last is not None else 0
        if not self._waiting or last is None:
            return b""
        claim = pack(("XCLAIM", self._stream, self._group, self.consumer, 0, last, "JUSTID"))
        return claim + self.replicas.command(self._waiting)

    async def receive(self) -> tuple[list[Entry], bytes | None]:
        """(the entries read, the counter as it was before they were read; None without a counter or when unset)."""
        await self.confirmed()
        connection = self._node.connection
        counter = await connection.read_response() if self._counter else None
        reply = await connection.read_response()
        return (cast(list[Entry], reply[0][1]) if reply else []), counter

    async def batch(self) -> ReadBatch:
        """receive(), as a ReadBatch."""
        entries, counter = await self.receive()
        return ReadBatch(entries, len(entries), entries[-1][0] if entries else None, counter)

    @staticmethod
    def last_held(entries: list[Entry]) -> bytes | None:
        """The id to confirm a batch by: its last entry the stream still holds (XCLAIM would drop a trimmed one from the
        group's pending entries); None when it holds none (then nothing in the batch has an effect to protect)."""
        return next((entry_id for entry_id, fields in reversed(entries) if fields is not None), None)

    async def close(self) -> None:
        """Drop the connection, with any reply still on its way; the next send connects again (to the master that
        serves the stream's slot then)."""
        self._waiting = 0
        await self._node.drop()
