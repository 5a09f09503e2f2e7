"""The fold's exactly-once source: the shard's stream, read with the consumer group under the consumer name.

On start it re-folds its own pending entries; every claim_idle/2 it claims the entries of consumers that have been
idle past `claim_idle` (XAUTOCLAIM, claim.lua). Group creation, a lost group (NOGROUP), retries (said once:
retry.Outage) and the cluster's slot-map refresh are all in StreamSource.run: the one place a shared stream-consumer
mechanism would take over the reading from.
"""

from __future__ import annotations

import logging
import time

from redis.exceptions import ResponseError

from wikipulse.core.settings import SubscriberSettings
from wikipulse.fold.consumer_name import ConsumerName
from wikipulse.fold.folder import Folder
from wikipulse.fold.writes import WRITES_IN_FLIGHT, WritePipeline
from wikipulse.store.connect import Client, refresh
from wikipulse.store.lease import LeaseLost
from wikipulse.store.retry import REDIS_ERRORS, RedisFull, is_full, pause_before_retry, stop_if_cancelled
from wikipulse.store.scripts import lua
from wikipulse.store.streams import Entry, StreamReader
from wikipulse.store.trimming import declared_groups, ensure_group

logger = logging.getLogger(__name__)


class StreamSource:
    def __init__(self, settings: SubscriberSettings, client: Client, name: ConsumerName, folder: Folder, writes: WritePipeline) -> None:
        self.settings, self.client, self.name, self.folder, self.writes = settings, client, name, folder, writes
        self.shard = folder.shard
        self.claim_script = client.register_script(lua("wikipulse.fold", "claim"))
        self.batch_size = settings.read_batch_size  # reads are cheap; bigger batches fold better
        self.caught_up = False  # the last read found no backlog
        self.reader = self._reader()

    def _reader(self) -> StreamReader:
        return StreamReader(self.client, self.shard.stream, self.settings.group, self.name.consumer, counter=self.shard.claims)

    def reconnect(self) -> None:
        """A new reader and writer, under the consumer name as it is now (they connect on first use)."""
        self.reader = self._reader()
        self.writes.connect()

    async def take_name(self) -> None:
        if await self.name.take():
            self.reconnect()

    async def ensure_group(self) -> None:
        """The group, if missing: a new stream comes with every declared group (trimming.py); else from the stream's
        start (events published before the first subscriber ran are folded too), unless this shard has counts."""
        stream, group = self.shard.stream, self.settings.group
        declared = declared_groups(self.settings, stream, sharded=self.shard.tag is not None)
        how = await ensure_group(self.client, stream, group, declared, self._start_of_new_group)
        if how is not None:
            logger.info("created consumer group %s on %s from %s", group, stream, "its first entry" if how == "0" else "now")

    async def _start_of_new_group(self) -> str:
        if await self.client.hget(self.shard.stats, "folded"):
            # Counts were folded here before (by a group since deleted, or another name): folding what the stream
            # still holds would count it twice.
            logger.warning("consumer group %s is new but %s holds counts: it folds from now on", self.settings.group, self.shard.stats)
            return "$"
        return "0"

    async def read(self, start: str, block: int | None) -> tuple[list[Entry], bytes]:
        """(entries, keys.CLAIMS before they were read)."""
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
            while True:
                try:
                    await self.ensure_group()
                    await self.take_name()
                    await self._consume()
                except REDIS_ERRORS as exc:
                    delay = self.writes.backoff.next_delay()
                    self.writes.outage.failed(exc, delay)
                    await pause_before_retry(delay)
                    await refresh(self.client)  # on a cluster, the slot may have moved: new connections to its node
                    self.reconnect()
                except LeaseLost as exc:
                    logger.error("%s: it applied nothing since, and takes a consumer name again", exc)
                    await self.name.give_up()
                except (RedisFull, ResponseError) as exc:
                    if not (isinstance(exc, RedisFull) or is_full(exc)):
                        if "NOGROUP" not in str(exc):
                            raise
                        logger.warning("the consumer group is gone (Redis lost its data?); creating it again")
                        continue
                    delay = self.writes.backoff.next_delay()
                    logger.error("Redis is full (%s): folding paused, the entries stay pending; retrying in %.1fs", exc, delay)
                    await pause_before_retry(delay)
        finally:
            await self.name.give_up()

    async def _consume(self) -> None:
        """Read, fold and write as a pipeline: while this process folds one batch, Redis applies
        the previous ones and reads the next, so neither side waits for the other.

        At most WRITES_IN_FLIGHT writes are unanswered (memory stays bounded). Batches hold
        distinct entries and increments commute, so no write waits for the one before it."""
        cursor = "0"  # our own pending entries first: delivered to us before, never acknowledged
        block_ms = max(1, int(self.settings.batch_delay * 1000), 100)
        next_claim = 0.0
        writes = self.writes
        try:
            entries: list[Entry] = []
            claims: bytes | None = None
            while True:
                stop_if_cancelled()
                if time.monotonic() >= next_claim:
                    await writes.settle(0)
                    await self.claim_stale()
                    next_claim = time.monotonic() + max(self.settings.claim_idle / 2, 0.1)
                    await writes.heartbeat()
                if not entries:
                    entries, claims = await self.read(cursor, None if cursor != ">" or writes.inflight else block_ms)
                    if not entries:
                        if cursor != ">":
                            cursor = ">"  # our own pending entries are done: new ones from now on
                        await writes.settle(0)
                        self.caught_up = cursor == ">"
                        continue
                if cursor != ">":
                    cursor = entries[-1][0].decode()
                await self.reader.send(cursor, self.batch_size, None)  # Redis reads the next batch while we fold this one
                batch = await self.folder.entries(entries, claims)
                # Take the read's reply (megabytes: the events' JSON) before the write goes out:
                # Redis sends no reply while it runs a script.
                entries, claims = await self.reader.receive()
                claims = claims or b"0"
                self.caught_up = cursor == ">" and len(entries) < self.batch_size
                await writes.settle(WRITES_IN_FLIGHT - 1)
                await writes.send(batch)
        finally:
            await self.close()

    async def close(self) -> None:
        """Drop the reader's and writer's connections with whatever they had in flight (WritePipeline.close)."""
        await self.writes.close()
        await self.reader.close()
