"""Reading the stream with a consumer group, fast: replies unparsed, on a connection of their own.

Shared by the subscriber and the archiver. redis-py would turn every entry into a dict, which costs more
than everything else either of them does per entry.
"""

from __future__ import annotations

from typing import cast

from wikipulse.connect import Client, raw_connection
from wikipulse.retry import drop

# An entry as XREADGROUP/XAUTOCLAIM reply it, unparsed: [id, [field, value, ...]], or [id, None]
# when it was trimmed from the stream before it was read.
Entry = tuple[bytes, list[bytes] | None]


class StreamReader:
    """XREADGROUP on a connection of its own, sent and received apart, so Redis can read the next batch
    while this process works on the current one. With `counter`, each read is preceded by a GET of that
    key on the same connection (so before it, in Redis): the subscriber's claims count (keys.CLAIMS)."""

    def __init__(self, client: Client, stream: str, group: str, consumer: str, counter: str | None = None) -> None:
        self._connection = raw_connection(client, stream)  # on a cluster, the counter shares the stream's slot
        self._stream, self._group, self._consumer, self._counter = stream, group, consumer, counter

    async def send(self, start: str, count: int, block_ms: int | None) -> None:
        block = ["BLOCK", block_ms] if block_ms is not None else []
        read = ["XREADGROUP", "GROUP", self._group, self._consumer, "COUNT", count, *block, "STREAMS", self._stream, start]
        commands = [("GET", self._counter), read] if self._counter else [read]
        await self._connection.send_packed_command(self._connection.pack_commands(commands))

    async def receive(self) -> tuple[list[Entry], bytes | None]:
        """(the entries read, the counter as it was before they were read; None without a counter or when unset)."""
        counter = await self._connection.read_response() if self._counter else None
        reply = await self._connection.read_response()
        return (cast(list[Entry], reply[0][1]) if reply else []), counter

    async def close(self) -> None:
        """Drop the connection, with any reply still on its way; the next send connects again."""
        await drop(self._connection)
