"""The fold's exactly-once source: the shard's stream, read with the consumer group under the consumer name.

A Handler of consumer.StreamConsumer, which owns the reading: group creation (and a lost group, NOGROUP), retries
(said once: retry.Outage), the cluster's slot-map refresh, a full Redis. It is a two-phase handler: a batch is folded
while Redis reads the next one, and its write goes out once that read's reply is taken. On start it re-folds its own
pending entries; every claim_idle/2 it claims the entries of consumers that have been idle past `claim_idle`
(XAUTOCLAIM, claim.lua).
"""

from __future__ import annotations

import logging
import time

from wikipulse.core.settings import SubscriberSettings
from wikipulse.fold.consumer_name import ConsumerName
from wikipulse.fold.folder import FoldedBatch, Folder
from wikipulse.fold.writes import WRITES_IN_FLIGHT, WritePipeline
from wikipulse.store.connect import Client
from wikipulse.store.consumer import Handler, StreamConsumer
from wikipulse.store.lease import LeaseLost
from wikipulse.store.scripts import lua
from wikipulse.store.streams import Entry, ReadBatch, StreamReader
from wikipulse.store.trimming import declared_groups

logger = logging.getLogger(__name__)


class StreamSource(Handler):
    """Read, fold and write as a pipeline: while this process folds one batch, Redis applies the previous ones and
    reads the next, so neither side waits for the other. At most WRITES_IN_FLIGHT writes are unanswered (memory stays
    bounded). Batches hold distinct entries and increments commute, so no write waits for the one before it. The
    writes land on the stream's master, atomically with their XACK: no replica confirmation (consumer.py's confirm)."""

    doing = "folding"
    two_phase = True

    def __init__(self, settings: SubscriberSettings, client: Client, name: ConsumerName, folder: Folder, writes: WritePipeline) -> None:
        self.settings, self.client, self.name, self.folder, self.writes = settings, client, name, folder, writes
        self.shard = folder.shard
        self.claim_script = client.register_script(lua("wikipulse.fold", "claim"))
        self.batch_size = settings.read_batch_size  # reads are cheap; bigger batches fold better
        self.caught_up = False  # the last read found no backlog
        stream, group = self.shard.stream, settings.group
        self.reader = StreamReader(client, stream, group, name.consumer, counter=self.shard.claims)
        # A new stream comes with every declared group (trimming.py); a new group on an existing stream starts at its
        # first entry (events published before the first subscriber ran are folded too), unless this shard has counts.
        self.consumer = StreamConsumer(client, stream, group, name.consumer, log=logger, what=f"subscriber of {stream}",
                                       declared=declared_groups(settings, stream, sharded=self.shard.tag is not None),
                                       count=self.batch_size, backoff_cap=settings.backoff_cap, start=self._start_of_new_group,
                                       block_ms=max(1, int(settings.batch_delay * 1000), 100), source=self.reader)  # fmt: skip
        self.consumer.backoff, self.consumer.outage = writes.backoff, writes.outage  # an applied write ends an outage too
        self.folded: FoldedBatch | None = None  # the batch prepared, its write not sent yet
        self.next_claim = 0.0

    async def take_name(self) -> None:
        """Hold a consumer name (if none is held), and read and write under it."""
        if await self.name.take():
            self._use_name()

    def _use_name(self) -> None:
        """The reads under the consumer name as it is now; the writes fenced by its lease, on a new connection (to the
        node of the shard's slot now)."""
        self.reader.consumer = self.consumer.consumer = self.name.consumer
        self.writes.connect()

    async def ensure_group(self) -> None:
        await self.consumer.ensure_group()

    async def _start_of_new_group(self) -> str:
        if await self.client.hget(self.shard.stats, "folded"):
            # Counts were folded here before (by a group since deleted, or another name): folding what the stream
            # still holds would count it twice.
            logger.warning("consumer group %s is new but %s holds counts: it folds from now on", self.settings.group, self.shard.stats)
            return "$"
        return "0"

    async def read(self, start: str, block: int | None) -> tuple[list[Entry], bytes]:
        """(entries, keys.CLAIMS before they were read): one read, by hand (tests)."""
        await self.reader.send(start, self.batch_size, block)
        entries, claims = await self.reader.receive()
        return entries, claims or b"0"

    async def fold_entries(self, entries: list[Entry], claims: bytes | None = None) -> None:
        """Fold and write, with nothing else in flight."""
        if entries:
            await self.writes.write(await self.folder.entries(entries, claims))

    async def claim_stale(self) -> int:
        """Fold the entries that other consumers left pending for longer than claim_idle."""
        claimed = 0
        start: bytes | str = "0-0"
        min_idle = int(self.settings.claim_idle * 1000)
        while True:
            script_keys = [self.shard.stream, self.shard.claims]
            args = [self.settings.group, self.name.consumer, min_idle, start, self.batch_size]
            reply = await self.claim_script(keys=script_keys, args=args)
            start, entries = reply[0], [(e[0], e[1] or None) for e in reply[1] if e]
            if entries:
                logger.info("claimed %d entries idle for over %ss", len(entries), self.settings.claim_idle)
                await self.fold_entries(entries)
                claimed += len(entries)
            if start in (b"0-0", "0-0"):
                return claimed

    async def run(self) -> None:
        try:
            await self.consumer.run(self)
        finally:
            await self.name.give_up()

    async def begin(self) -> None:
        await self.name.take()
        self._use_name()  # again after an error too: end() dropped the writer's connection, maybe to a master gone since
        self.folded = None

    async def prepare(self, batch: ReadBatch) -> None:
        self.folded = await self.folder.entries(batch.entries, batch.counter or b"0")

    async def handle(self, batch: ReadBatch) -> None:
        writes = self.writes
        if self.folded is not None:
            folded, self.folded = self.folded, None
            self.caught_up = not batch.pending and batch.read < self.batch_size
            await writes.settle(WRITES_IN_FLIGHT - 1)
            await writes.send(folded)
        else:  # an idle read (or the own pending entries are done)
            await writes.settle(0)
            self.caught_up = True
        if time.monotonic() >= self.next_claim:
            await writes.settle(0)
            await self.claim_stale()
            self.next_claim = time.monotonic() + max(self.settings.claim_idle / 2, 0.1)
            await writes.heartbeat()

    async def end(self) -> None:
        await self.close()

    async def failed(self, error: Exception) -> bool:
        if not isinstance(error, LeaseLost):
            return False
        logger.error("%s: it applied nothing since, and takes a consumer name again", error)
        await self.name.give_up()
        return True

    async def close(self) -> None:
        """Drop the reader's and writer's connections with whatever they had in flight (WritePipeline.close)."""
        await self.writes.close()
        await self.reader.close()
