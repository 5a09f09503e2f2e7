"""Consuming a stream with a consumer group: the one loop of every consumer (the router, the archiver, the routes' copier,
the subscriber's stream source).

A StreamConsumer owns everything but what to do with a batch (a Handler's part):

- **the group**, created once, with the stream's declared groups when the stream is new (trimming.ensure_group), else
  at the handler's start; BUSYGROUP (another process made it meanwhile) is no error. A read that meets NOGROUP means
  the group vanished (Redis lost its data, or someone deleted it): said once, made again, and read from its start.
- **the reads**: the consumer's own pending entries first (a restart's, delivered and never acknowledged), then new
  ones, blocking at most `block_ms` on an idle stream; with `read_ahead`, the next read is on its way while the handler
  works on this batch; with `gather`, the read after a short batch waits until `gather` seconds after the handler was
  done with it (at a trickle, fewer and larger batches). A two-phase handler (the subscriber) prepares a batch while
  the next read is on its way, and handles it once that read's reply is taken (Redis holds a reply back while it runs
  a script: a write sent first would delay the read), so its read-ahead never blocks.
- **the replica**: with `confirm` (a handler whose batches have an effect on another master or outside Redis), a batch
  is handed over only once a replica of the stream's master has it (streams.StreamReader's confirmation): else a
  failover could take entries away whose copies or rows exist elsewhere, and the publisher would write them again.
- **the retries**: Redis down, a failover (the cluster's slot map learnt again, the connections made anew), a full Redis,
  a vanished group are waited out with backoff, an outage said once (retry.Outage); a handler's own errors (a lost
  lease, ClickHouse away) are its to judge (Handler.failed).
- **the stats line**, every `stats_interval`, if the handler says one (Handler.stats).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

from redis.exceptions import ResponseError

from wikipulse.store.connect import Client, refresh
from wikipulse.store.retry import REDIS_ERRORS, Backoff, Outage, RedisFull, is_full, pause_before_retry, stop_if_cancelled
from wikipulse.store.streams import ReadBatch, StreamReader
from wikipulse.store.trimming import ensure_group

NEW = ">"  # XREADGROUP's cursor for entries never delivered to the group


async def from_first() -> str:
    """A new group's start: the stream's first entry."""
    return "0"


class Source(Protocol):
    """How a StreamConsumer reads (streams.StreamReader, or a reader of its own shape that filters in Redis)."""

    async def send(self, start: str, count: int, block_ms: int | None, confirm: bytes | None = None) -> None: ...
    async def batch(self) -> ReadBatch: ...
    async def confirm(self, last: bytes) -> None: ...
    async def confirmed(self) -> None: ...
    async def close(self) -> None: ...
    @staticmethod
    def last_held(entries: list[tuple[bytes, list[bytes] | None]]) -> bytes | None: ...


class Handler:
    """What a StreamConsumer's caller does with the batches: handle() at least; the rest as needed."""

    doing = "consuming"  # for the log: "<doing> paused"
    two_phase = False  # prepare() each batch while the next read is on its way, handle() it once that reply is taken

    async def begin(self) -> None:
        """Before each round of reads (again after an error): take leases, open what the batches go to."""

    async def ready(self) -> bool:
        """Before each read without read-ahead: False holds the reads back (the handler waits a while first) and starts
        them again from the own pending entries."""
        return True

    def count(self, pending: bool) -> int | None:
        """The size of the next read (`pending`: of the own pending entries); None: the consumer's."""
        return None

    async def prepare(self, batch: ReadBatch) -> None:
        """A two-phase handler's work on a batch with entries while the next read is on its way (no Redis replies to
        take on the reading connection: the consumer takes the read's reply after this)."""

    async def handle(self, batch: ReadBatch) -> None:
        """Act on a batch, empty ones included (an idle read: work in progress can be finished)."""
        raise NotImplementedError

    async def end(self) -> None:
        """After each round of reads, however it ended: drop connections (nothing half-done stays)."""

    async def failed(self, error: Exception) -> bool:
        """An error the consumer does not know: True once waited out (the reads start again), False to raise it."""
        return False

    def stats(self) -> str | None:
        """The periodic stats line; None: none."""
        return None


def _told(how: str) -> str:
    return {"0": "its first entry", "$": "now"}.get(how, how)


class StreamConsumer:
    def __init__(
        self,
        client: Client,
        stream: str,
        group: str,
        consumer: str,
        *,
        log: logging.Logger,
        what: str,
        declared: Sequence[str],
        count: int,
        backoff_cap: float,
        start: Callable[[], Awaitable[str]] = from_first,
        block_ms: int = 1000,
        confirm: bool = False,
        read_ahead: bool = True,
        gather: float = 0.0,
        source: Source | None = None,
    ) -> None:
        """`what` names the consumer in the log; `declared`: the groups a new stream is made with (trimming.py);
        `start`: where a new group on an existing stream starts (asked only then)."""
        self.client, self.stream, self.group, self.consumer = client, stream, group, consumer
        self.log, self.what, self.declared, self.start = log, what, list(declared), start
        self.count, self.block_ms, self.confirm, self.read_ahead, self.gather = count, block_ms, confirm, read_ahead, gather
        self.source: Source = source or StreamReader(client, stream, group, consumer)
        self.backoff = Backoff(backoff_cap)
        self.outage = Outage(log, what)
        self.group_known = False  # made or seen by this consumer, and not found gone since

    async def ensure_group(self) -> str | None:
        """Make the group if this consumer has not seen it yet: how it was made ('0', '$', ...), None if it existed."""
        if self.group_known:
            return None
        how = await ensure_group(self.client, self.stream, self.group, self.declared, self.start)
        self.group_known = True
        if how is not None:
            self.log.info("created consumer group %s on %s from %s", self.group, self.stream, _told(how))
        return how

    async def destroy_group(self) -> None:
        """For a group kept only while there is something to consume (the routes')."""
        await self.client.xgroup_destroy(self.stream, self.group)
        self.group_known = False

    def progress(self) -> None:
        """Redis took a batch: what failed before is over."""
        self.backoff.reset()
        self.outage.over()

    async def pause(self, why: str) -> None:
        delay = self.backoff.next_delay()
        self.log.error("%s: %s; retrying in %.1fs", self.what, why, delay)
        await pause_before_retry(delay)

    async def run(self, handler: Handler, stats_interval: float | None = None) -> None:
        """Consume until cancelled, waiting out what passes (above)."""
        stats = asyncio.create_task(self._log_stats(handler, stats_interval)) if stats_interval else None
        try:
            while True:
                try:
                    await self.consume(handler)
                except REDIS_ERRORS as exc:
                    delay = self.backoff.next_delay()
                    self.outage.failed(exc, delay)
                    await pause_before_retry(delay)
                    await refresh(self.client)  # on a cluster, a slot may have moved: the next connections go to its node
                except (RedisFull, ResponseError) as exc:
                    if isinstance(exc, RedisFull) or is_full(exc):
                        await self.pause(f"Redis is full ({exc}): {handler.doing} paused, the entries stay pending")
                    elif "NOGROUP" in str(exc):
                        self._vanished()
                    elif not await handler.failed(exc):
                        raise
                except Exception as exc:
                    if not await handler.failed(exc):
                        raise
        finally:
            if stats is not None:
                stats.cancel()

    def _vanished(self) -> None:
        if self.group_known:  # said once: the next round makes it again
            gone = "%s: consumer group %s on %s is gone (Redis lost its data?); creating it again"
            self.log.warning(gone, self.what, self.group, self.stream)
        self.group_known = False

    async def consume(self, handler: Handler) -> None:
        """One round of reads, until an error (or a cancellation): the own pending entries first, then new ones."""
        try:
            await handler.begin()
            await self._reads(handler)
        finally:
            await self.source.close()  # a reply half read must not be taken for the next one
            await handler.end()

    async def _reads(self, handler: Handler) -> None:
        source, two_phase = self.source, handler.two_phase
        cursor, sent = "0", False
        taken: ReadBatch | None = None  # the reply of the read on its way, taken before a two-phase handler's handle()
        short, batch_at = False, 0.0  # the last batch was short of its count, and when the handler was done with it
        while True:
            stop_if_cancelled()
            if taken is None:
                if not sent:
                    if not await handler.ready():
                        cursor = "0"
                        continue
                    await self.ensure_group()
                    if cursor == NEW and short and self.gather:
                        await asyncio.sleep(max(0.0, batch_at + self.gather - time.monotonic()))
                    count = handler.count(cursor != NEW) or self.count
                    await source.send(cursor, count, self.block_ms if cursor == NEW else None)
                taken = await source.batch()
            batch, taken = taken, None
            sent, batch.pending = False, cursor != NEW
            if batch.last is None:
                cursor = NEW  # the own pending entries are done (or none came for block_ms): new ones from now on
                await handler.handle(batch)
                continue
            if cursor != NEW:
                cursor = batch.last.decode()
            short = batch.read < count
            held = source.last_held(batch.entries) if self.confirm else None
            if self.read_ahead and not (short and self.gather):
                # Redis reads the next batch meanwhile; first, a replica confirms it has this one.
                count = handler.count(cursor != NEW) or self.count
                block = self.block_ms if cursor == NEW and not two_phase else None  # a two-phase handle() waits for it
                await source.send(cursor, count, block, confirm=held)
                sent = True
                await source.confirmed()
            elif held is not None:
                await source.confirm(held)
            if two_phase:
                await handler.prepare(batch)
                if sent:
                    taken = await source.batch()
            await handler.handle(batch)
            batch_at = time.monotonic()
            self.progress()

    async def _log_stats(self, handler: Handler, interval: float | None) -> None:
        while True:
            await asyncio.sleep(interval or 0)
            line = handler.stats()
            if line:
                self.log.info("%s", line)
