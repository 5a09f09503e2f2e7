"""SSE -> Redis fan-out: resumable, validated, deduplicated, batched.

The publisher wires the parts: the feed client (feed.py) reads the SSE feed, the batcher (batcher.py) validates,
deduplicates and batches its events, the writer (writer.py) hands each batch to one atomic, fenced write, and the
recovery (recovery.py) keeps the stored position and reloads it from Redis after any trouble, so that the feed is
resumed with `Last-Event-ID`: nothing lost, nothing doubled. It holds the publisher lease (one publisher per Redis
and feed) and pauses while Redis is full.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter

import aiohttp
from redis.exceptions import ResponseError

from wikipulse.core.settings import PublisherSettings
from wikipulse.core.tasks import background, run_together
from wikipulse.ingest.batcher import Batcher
from wikipulse.ingest.feed import FEED_ERRORS, Connection, Feed, FeedEnded, Rejected400
from wikipulse.ingest.recovery import RECOVERABLE, Recovery
from wikipulse.ingest.route_reader import ReadPlan
from wikipulse.ingest.router import Router
from wikipulse.ingest.routes import RouteCopier
from wikipulse.ingest.writer import BatchWriter, IngestBatch, RedisDown
from wikipulse.store import keys
from wikipulse.store.connect import Client, open_client
from wikipulse.store.lease import Lease
from wikipulse.store.policy import check_redis
from wikipulse.store.retry import REDIS_ERRORS, RedisFull, pause_before_retry

logger = logging.getLogger(__name__)


class Publisher:
    def __init__(
        self,
        settings: PublisherSettings,
        client: Client,
        session: aiohttp.ClientSession,
        layout: keys.Layout | None = None,
        routes: RouteCopier | None = None,
    ) -> None:
        """`routes`: the routes' copier of this process, whose plan the writes copy by when they can (route_inline.lua)."""
        s = self.settings = settings
        self.client = client
        self.layout = layout or keys.Layout(s.stream)
        self.keys = self.layout.publisher
        self.totals: Counter[str] = Counter()
        self.feed = Feed(s, session)
        self.connected = self.feed.connected  # set while a feed connection is open (for tests and `up`)
        self.batcher = Batcher(s.batch_size, s.batch_delay, s.max_event_bytes, s.dedup_window)
        self.lease = Lease(client, self.keys.lease, s.lease_ttl)
        self.recovery = Recovery(s, client, self.keys, self.lease, self.batcher, self.totals)
        self.routes = routes
        self.writer = BatchWriter(s, client, self.lease, self.keys, self.layout.sharded, (lambda: routes.plan) if routes else ReadPlan)
        self._inflight: asyncio.Future[None] | None = None

    async def load_state(self) -> None:
        await self.recovery.load()

    # ---- writing batches ---------------------------------------------------------------------
    async def flush(self) -> None:
        """Start writing the batch and go on reading while Redis works on it.

        At most one write is in flight (memory stays bounded when Redis is slow or down), and the
        previous one is awaited first, so batches land in order and a failure surfaces here."""
        if self.batcher.empty:
            return
        await self.drain()
        batch = self.batcher.cut()
        if batch is not None:
            # Not a background task: the next flush, drain() or close() awaits it, so its failure surfaces there.
            self._inflight = asyncio.ensure_future(self._write(batch))

    async def drain(self) -> None:
        """Wait for the write in flight. Shielded: a shutdown that cancels the reader must not
        leave it unknown whether the batch landed (close() awaits it)."""
        inflight = self._inflight
        if inflight is None:
            return
        try:
            await asyncio.shield(inflight)
        finally:
            if inflight.done():
                self._inflight = None

    async def _write(self, batch: IngestBatch) -> None:
        written, duplicates, had_position, grew, routed = await self.writer.write(batch, time.time(), self.recovery.after)
        if routed and self.routes is not None:
            self.routes.copied_at_write(routed)
        self.totals.update(batch.counters)
        self.totals.update(published=written, duplicates=duplicates)
        if duplicates:
            logger.warning("%d events were in the stream already (written by another publisher): not added again", duplicates)
        say_trimmed_unread(grew, self.settings)
        await self.recovery.written(batch.last_id, had_position)

    async def heartbeat(self) -> None:
        """Mark the publisher alive even when the feed is quiet (the dashboard's status)."""
        await self.client.hset(self.keys.stats, "updated_at", time.time())

    # ---- reading the feed --------------------------------------------------------------------
    async def stream_once(self) -> None:
        """One connection: read, batch and flush until the feed ends or fails."""
        async with self.feed.connect(self.recovery.position) as connection:
            try:
                await self._read(connection)
            except FeedEnded:
                await self.flush()
                raise

    async def _read(self, connection: Connection) -> None:
        """Read for as long as the batcher's next flush allows, then flush when the batch is full or due."""
        batcher = self.batcher
        while True:
            events = await connection.read(batcher.flush_in(time.monotonic()))
            now = time.monotonic()
            for sse in events:
                if batcher.take(sse, now):
                    await self.flush()
            if batcher.due(now):
                await self.flush()

    async def run(self) -> None:
        """Forever: hold the lease, connect, read, and on any failure back off and resume from the stored position."""
        await self.recovery.wait_for_redis()
        await self.lease.wait_until_held("the publisher lease (one publisher per Redis and feed)")
        try:
            async with background(self.lease.keep(), "the publisher's lease renewal"):
                while True:
                    delay = await self._run_once()
                    self.totals["reconnects"] += 1
                    with contextlib.suppress(*REDIS_ERRORS, ResponseError):  # counted in memory; Redis trouble: the next write's
                        await self.client.hincrby(self.keys.stats, "reconnects", 1)
                    await pause_before_retry(delay)
        finally:
            await self.lease.release()

    async def _run_once(self) -> float:
        """One connection and what follows its end: the wait before the next one."""
        try:
            try:
                await self.stream_once()
            finally:
                await self.drain()  # the reconnect resumes from the position of the last batch read
        except FEED_ERRORS as exc:
            if isinstance(exc, Rejected400):
                self._rejected(exc)
            delay, reason = self.feed.delay_after(exc)
            if reason is None:
                return delay
        except RECOVERABLE as exc:
            reason = await self.recovery.recover(exc)
            if isinstance(exc, (RedisDown, RedisFull)):
                self.feed.backoff.reset()
            delay = 0.0
        logger.warning(
            "reconnecting in %.1fs: %s (resume from %s)", delay, reason, "stored position" if self.recovery.position else "--since or now"
        )
        return delay

    def _rejected(self, exc: Rejected400) -> None:
        if exc.counter == "position_rejected":
            self.recovery.position = None
        self.totals[exc.counter] += 1
        self.batcher.count(exc.counter)

    async def close(self) -> None:
        """Flush what was read and store the position (on shutdown)."""
        try:
            await self.drain()
            await self.flush()
            await self.drain()
        except RECOVERABLE as exc:
            logger.warning("could not flush the last batch on shutdown (%s); it will be re-read on restart", exc)


def say_trimmed_unread(grew: dict[str, int], settings: PublisherSettings) -> None:
    """{group: entries trimmed unread so far}, for the groups that lost entries to the write just made."""
    for group, lost in grew.items():
        logger.error(
            "entries were trimmed from the stream before consumer group %s had read them: %d entries trimmed unread so far "
            "(is it stopped? raise STREAM_MAXLEN, %d, to bridge longer outages; a group no consumer has read yet holds "
            "STREAM_GRACE, %gs; drop a role the deployment does not run from STREAM_CONSUMERS)",
            group, lost, settings.stream_maxlen, settings.stream_grace,
        )  # fmt: skip


def log_totals(publisher: Publisher) -> None:
    t = publisher.totals
    rejected = sum(v for k, v in t.items() if k.startswith("rejected:"))
    logger.info(
        "published %d, duplicates %d, canaries %d, rejected %d, reconnects %d",
        t["published"], t["duplicates"], t["canaries"], rejected, t["reconnects"],
    )  # fmt: skip


async def log_stats(publisher: Publisher, interval: float) -> None:
    while True:
        await pause_before_retry(interval)
        log_totals(publisher)
        with contextlib.suppress(*REDIS_ERRORS, ResponseError):  # a full Redis refuses it: the write path says so
            await publisher.heartbeat()


async def run_publisher(settings: PublisherSettings) -> None:
    client, layout = await open_client(settings)
    async with client, aiohttp.ClientSession(read_bufsize=1 << 20) as session:
        await check_redis(client, settings)
        copier = RouteCopier(settings, client, layout)  # the routes (routes.py): idle while none is declared
        publisher = Publisher(settings, client, session, layout, copier)
        # Sharded, the publisher's process also routes its stream to the shards' streams (router.py); if a role
        # fails, the others are stopped and the process fails, rather than publish on with nothing routed.
        roles = {"publisher": publisher.run()}
        if layout.sharded:
            roles["router"] = Router(settings, client, layout).run()
        roles["routes"] = copier.run()
        try:
            async with background(log_stats(publisher, settings.stats_interval), "the publisher's stats logging"):
                await run_together(roles)
        finally:
            await asyncio.shield(publisher.close())
            log_totals(publisher)
