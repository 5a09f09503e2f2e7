"""What the publisher resumes from, and how it comes back when Redis is not as it left it.

Redis holds the truth of what the stream holds: the position (the last SSE id written) and the dedup window. They
are loaded at the start and after every Redis trouble: Redis down (wait until it answers), full (wait until a write
fits), behind (it lost this process's last batches in a failover: `WritesLost`, read the feed again from the position
it holds), emptied (restarted without persistence: go on from the position this process knows, and say so), or the
lease lost to another publisher (stand by). Each ends with the in-memory batch dropped: its events are read again.
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter

from redis.exceptions import ResponseError

from wikipulse.core.settings import PublisherSettings
from wikipulse.ingest.batcher import Batcher
from wikipulse.ingest.writer import RedisDown, WritesLost
from wikipulse.store import keys
from wikipulse.store.connect import Client
from wikipulse.store.lease import Lease, LeaseLost
from wikipulse.store.retry import REDIS_ERRORS, Backoff, Outage, RedisFull, is_full, pause_before_retry

logger = logging.getLogger(__name__)

RECOVERABLE = (RedisDown, WritesLost, RedisFull, LeaseLost)  # what a write raises that `recover` waits out


class Recovery:
    def __init__(
        self,
        settings: PublisherSettings,
        client: Client,
        publisher_keys: keys.PublisherKeys,
        lease: Lease,
        batcher: Batcher,
        totals: Counter[str],
    ) -> None:
        self.settings, self.client, self.keys = settings, client, publisher_keys
        self.lease, self.batcher, self.totals = lease, batcher, totals
        self.position: str | None = None
        self._reset_pending = settings.reset_position  # once, at the first load: not after a Redis outage
        self._stored = False  # whether Redis holds a position of this process's (else its absence is no news)

    @property
    def after(self) -> str | None:
        """The position this process stored last, which Redis must still hold for a write to go on (None: none known)."""
        return self.position if self._stored else None

    async def load(self) -> None:
        """Take the position and the dedup window from Redis, the truth for what the stream holds.

        If Redis has no position but this process knows one, Redis lost its data (restarted without
        persistence, flushed): resume from the position this process knows, with its dedup window,
        and say loudly that what Redis held is gone."""
        if self._reset_pending:
            await self.client.delete(self.keys.position)
            self._reset_pending = False
        raw = await self.client.get(self.keys.position)
        seen: list[bytes] | None = None
        if raw:
            self.position = raw.decode()
            seen = await self.client.zrange(self.keys.seen, 0, -1)
        elif self.position is not None:
            await self._redis_lost_data()
        self._stored = bool(raw)
        self.batcher.discard(seen)
        logger.info("position %s, %d ids in the dedup window", self.position or "none (start from --since or now)", len(self.batcher.dedup))

    async def written(self, last_id: str | None, had_position: bool) -> None:
        """A batch was written; `had_position`: Redis held a position before it (the write script's answer)."""
        if not had_position and self._stored:
            await self._redis_lost_data()
        self._stored = self._stored or last_id is not None
        if last_id is not None:
            self.position = last_id

    async def _redis_lost_data(self) -> None:
        """Redis has no position where this process stored one: it restarted without persistence, or was flushed."""
        logger.error(
            "Redis has lost the publisher's position (restarted without persistence, or flushed): the stream entries, "
            "counts and state it held are gone. The feed goes on from the last position this process knows, so no new "
            "event is missed; run Redis with AOF (appendonly yes) to keep what it holds."
        )
        self.totals["position_lost"] += 1
        with contextlib.suppress(*REDIS_ERRORS, ResponseError):
            await self.client.hincrby(self.keys.stats, "position_lost", 1)

    async def recover(self, exc: Exception) -> str:
        """Wait out what a write raised (one of RECOVERABLE) and reload the state; what happened, for the log."""
        if isinstance(exc, RedisDown):
            logger.warning("Redis write failed (%s): pausing the feed until Redis is back", exc)
            await self.wait_for_redis()
            return "Redis was unavailable"
        if isinstance(exc, WritesLost):
            logger.error(
                "%s: Redis lost this publisher's last batches (a failover to a replica they had not reached). "
                "Reading the feed again from the position Redis holds: nothing is missed, nothing doubled",
                exc,
            )
            self.totals["writes_lost"] += 1
            await self.wait_for_redis()
            return "Redis lost the last batches"
        if isinstance(exc, RedisFull):
            await self._wait_for_room(exc)
            return "Redis was full"
        logger.error("%s: this publisher stops writing and stands by", exc)
        self.batcher.discard()
        await self.lease.wait_until_held("the publisher lease")
        await self.wait_for_redis()  # the other publisher moved the position on
        return "took the lease over"

    async def wait_for_redis(self) -> None:
        backoff = Backoff(self.settings.backoff_cap)
        outage = Outage(logger, "publisher")
        while True:
            try:
                await self.load()
                outage.over()
                return
            except REDIS_ERRORS as exc:
                delay = backoff.next_delay()
                outage.failed(exc, delay)
                await pause_before_retry(delay)

    async def _wait_for_room(self, exc: RedisFull) -> None:
        """Redis is at maxmemory: the batch was refused whole (nothing published, nothing added). Stop
        reading the feed, say why, and resume from the stored position once a write fits again."""
        logger.error(
            "Redis is full (%s): the feed is paused and nothing is lost (it resumes from the stored position). "
            "Free memory or raise maxmemory; a stopped subscriber with a long stream is the usual cause.",
            exc,
        )
        self.totals["paused_full"] += 1
        backoff = Backoff(self.settings.backoff_cap)
        while True:
            await pause_before_retry(backoff.next_delay())
            try:
                # The one write of the probe (a deny-oom command, refused while Redis is still full), so that a Redis
                # at the edge of maxmemory cannot take it and then refuse a second one: that is the next batch's to try.
                await self.client.hincrby(self.keys.stats, "paused_full", 1)
            except ResponseError as exc:
                if is_full(exc):
                    continue
                raise
            except REDIS_ERRORS:
                await self.wait_for_redis()
                continue
            logger.warning("Redis has room again: resuming the feed")
            await self.wait_for_redis()  # this process's dedup window took ids of the refused batch
            return
