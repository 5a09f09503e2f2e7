"""The subscriber's write pipeline: folded batches applied by series.SeriesWriter (one atomic script each), sent as
they are folded and answered oldest first, so Redis applies one batch while this process folds the next.

A batch whose entries another consumer acknowledged meanwhile (it claimed them) is applied by nobody: its entries
still ours are folded again and sent. A fenced write refused because the consumer name was taken over raises
LeaseLost; a full Redis, RedisFull (lease.fenced_error).
"""

from __future__ import annotations

import collections
import logging
import time
from collections import Counter

from redis.exceptions import ResponseError

from wikipulse.core.settings import SubscriberSettings
from wikipulse.fold.consumer_name import ConsumerName
from wikipulse.fold.folder import FoldedBatch, Folder
from wikipulse.fold.series import SeriesWriter
from wikipulse.store import keys
from wikipulse.store.connect import Client
from wikipulse.store.lease import LeaseLost, fenced_error
from wikipulse.store.retry import Backoff, Outage, is_full

logger = logging.getLogger(__name__)

WRITES_IN_FLIGHT = 2


class WritePipeline:
    def __init__(
        self, settings: SubscriberSettings, client: Client, folder: Folder, name: ConsumerName, backoff: Backoff, outage: Outage
    ) -> None:
        self.client, self.group, self.folder, self.name = client, settings.group, folder, name
        self.shard = folder.shard
        self.backoff, self.outage = backoff, outage  # the source's retries (consumer.py's): an applied batch ends an outage
        self.inflight: collections.deque[FoldedBatch] = collections.deque()  # sent to the writer, unanswered
        self.totals: Counter[str] = Counter()
        self.writer = self._writer()

    def _writer(self) -> SeriesWriter:
        token, ttl_ms = self.name.fence
        stream = self.shard.stream
        return SeriesWriter(self.client, stream, self.group, self.name.consumer, token, ttl_ms, self.shard, keys.NOTICES)

    def connect(self) -> None:
        """A new writer, for the consumer name as it is now, on a new connection (to the node of the shard's slot now)."""
        self.writer = self._writer()

    async def send(self, batch: FoldedBatch) -> None:
        await self.writer.send(batch.increments, batch.ids, batch.counters, batch.claims, batch.notice)
        self.inflight.append(batch)

    async def settle(self, keep: int) -> None:
        """Take the writer's replies, oldest first, until at most `keep` batches are unanswered."""
        while len(self.inflight) > keep:
            try:
                owned = await self.writer.receive()
            except ResponseError as exc:
                lost = f"consumer name {self.name.consumer!r} was taken over by {{holder}} while this process stalled"
                error = fenced_error(exc, lost)
                if isinstance(error, LeaseLost):
                    self.name.lost()  # not ours any more: give_up stops its keeper and releases nothing
                raise error from exc
            batch = self.inflight.popleft()
            self.backoff.reset()  # Redis took a batch: what failed before is over
            self.outage.over()
            if owned is None:
                self.totals.update(batch.counters)
                continue
            # Some entries were acknowledged by another consumer meanwhile: fold only ours.
            ours = set(owned)
            logger.info("%d of %d entries were folded by another consumer; re-folding the rest", len(batch.ids) - len(ours), len(batch.ids))
            entries = [e for e in batch.entries if e[0] in ours]
            if entries:
                await self.send(await self.folder.entries(entries))

    async def write(self, batch: FoldedBatch) -> None:
        """Send and wait for every reply."""
        await self.send(batch)
        await self.settle(0)

    async def heartbeat(self) -> None:
        try:
            await self.client.hset(self.shard.stats, mapping={"updated_at": time.time(), "consumer": self.name.consumer})
        except ResponseError as exc:
            if not is_full(exc):
                raise  # a full Redis refuses it; the writes say so

    async def close(self) -> None:
        """Drop the connection with whatever was in flight: each write is atomic, and entries not acknowledged stay
        pending, to be folded on the next start."""
        self.inflight.clear()
        await self.writer.close()
