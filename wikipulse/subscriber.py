"""Fold raw events into per-domain time series in Redis.

Stream mode (default) reads `wiki:events` with a consumer group and is exactly-once:
each batch's increments and the XACK of its entries are one Lua script (series.py).
On start it re-folds its own pending entries; it claims the entries of consumers
that have been idle past `claim_idle` (XAUTOCLAIM). Pub/sub mode reads the channel,
at-most-once as Redis pub/sub is, and says so in the log when it had to resubscribe.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from wikipulse import keys
from wikipulse.domains import DomainGate
from wikipulse.events import Accepted, Canary, validate
from wikipulse.fold import fold
from wikipulse.publisher import REDIS_ERRORS, backoff_delay
from wikipulse.series import SeriesWriter
from wikipulse.settings import Settings

logger = logging.getLogger(__name__)

Entry = tuple[bytes, dict[bytes, bytes] | None]


def default_consumer() -> str:
    # Stable across restarts on one host, so a restarted subscriber finds its own pending entries.
    return socket.gethostname()


class Subscriber:
    def __init__(self, settings: Settings, client: aioredis.Redis) -> None:
        self.settings = settings
        self.client = client
        self.consumer = settings.consumer or default_consumer()
        self.retention = settings.retention_seconds()
        self.writer = SeriesWriter(client, settings.stream, settings.group, self.consumer)
        self.gate = DomainGate(client, settings.max_domains)
        self.totals: Counter[str] = Counter()
        self.batch_size = settings.batch_size * 10  # reads are cheap; bigger batches fold better

    # ---- folding (shared by both sources) ----------------------------------------------------
    def verdicts(self, payloads: Sequence[bytes | None]) -> tuple[list[dict[str, Any]], Counter[str]]:
        """(accepted events, counters of everything else)."""
        events: list[dict[str, Any]] = []
        counters: Counter[str] = Counter()
        for data in payloads:
            if data is None:
                counters["trimmed"] += 1  # the entry was trimmed from the stream before we read it
                continue
            verdict = validate(data, self.settings.max_event_bytes)
            if isinstance(verdict, Accepted):
                events.append(verdict.event)
            elif isinstance(verdict, Canary):
                counters["canaries"] += 1
            else:
                counters[f"rejected:{verdict.reason.value}"] += 1
        return events, counters

    async def fold_and_write(self, ids: Sequence[bytes], payloads: Sequence[bytes | None]) -> None:
        while True:
            events, counters = self.verdicts(payloads)
            counters["overflow"] = await self.gate.route(events)
            inc = fold(events, time.time(), self.retention)
            counters.update(folded=inc.folded, late=inc.late, future=inc.future, untimed=inc.untimed)
            owned = await self.writer.apply(inc, ids, counters)
            if owned is None:
                self.totals.update(counters)
                return
            # Some entries were acknowledged by another consumer meanwhile: fold only ours.
            keep = set(owned)
            logger.info("%d of %d entries were folded by another consumer; re-folding the rest", len(ids) - len(keep), len(ids))
            pairs = [(i, p) for i, p in zip(ids, payloads, strict=True) if i in keep]
            ids, payloads = [i for i, _ in pairs], [p for _, p in pairs]
            if not ids:
                return

    async def fold_entries(self, entries: Sequence[Entry]) -> None:
        if entries:
            # None: the entry was trimmed before we read it; no `data` field: b"", rejected as not JSON.
            payloads = [None if fields is None else fields.get(b"data", b"") for _, fields in entries]
            await self.fold_and_write([e[0] for e in entries], payloads)

    # ---- stream source -----------------------------------------------------------------------
    async def ensure_group(self) -> None:
        try:
            # From the stream's start: events published before the first subscriber ran are folded too.
            await self.client.xgroup_create(self.settings.stream, self.settings.group, id="0", mkstream=True)
            logger.info("created consumer group %s on %s", self.settings.group, self.settings.stream)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def read(self, start: str, block: int | None) -> list[Entry]:
        reply = await self.client.xreadgroup(
            self.settings.group, self.consumer, {self.settings.stream: start}, count=self.batch_size, block=block
        )
        return list(reply[0][1]) if reply else []

    async def claim_stale(self) -> int:
        """Fold the entries that other consumers left pending for longer than claim_idle."""
        claimed = 0
        start: bytes | str = "0-0"
        min_idle = int(self.settings.claim_idle * 1000)
        while True:
            reply = await self.client.xautoclaim(
                self.settings.stream, self.settings.group, self.consumer, min_idle, start_id=start, count=self.batch_size
            )
            start, entries = reply[0], [e for e in reply[1] if e is not None]
            if entries:
                logger.info("claimed %d entries idle for over %ss", len(entries), self.settings.claim_idle)
                await self.fold_entries(entries)
                claimed += len(entries)
            if start in (b"0-0", "0-0"):
                return claimed

    async def run_stream(self) -> None:
        attempt = 0
        while True:
            try:
                await self.ensure_group()
                await self._consume()
            except REDIS_ERRORS as exc:
                delay = backoff_delay(attempt, self.settings.backoff_cap)
                attempt += 1
                logger.warning("Redis unavailable (%s); retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                logger.warning("the consumer group is gone (Redis lost its data?); creating it again")

    async def _consume(self) -> None:
        start = "0"  # our own pending entries first: delivered to us before, never acknowledged
        next_claim = 0.0
        block_ms = max(1, int(self.settings.batch_delay * 1000))
        while True:
            if time.monotonic() >= next_claim:
                await self.claim_stale()
                next_claim = time.monotonic() + max(self.settings.claim_idle / 2, 0.1)
                await self.heartbeat()
            if start != ">":
                entries = await self.read(start, None)
                if not entries:
                    start = ">"
                    continue
                start = entries[-1][0].decode()
            else:
                entries = await self.read(">", max(block_ms, 100))
            await self.fold_entries(entries)

    async def heartbeat(self) -> None:
        await self.client.hset(keys.SUBSCRIBER_STATS, mapping={"updated_at": time.time(), "consumer": self.consumer})

    # ---- pub/sub source ---------------------------------------------------------------------
    async def run_pubsub(self) -> None:
        attempt = 0
        first = True
        while True:
            try:
                async with self.client.pubsub(ignore_subscribe_messages=True) as pubsub:
                    await pubsub.subscribe(self.settings.channel)
                    if not first:
                        logger.warning(
                            "resubscribed to %r: events published while disconnected were missed "
                            "(pub/sub is at-most-once; use --source stream)",
                            self.settings.channel,
                        )
                    first = False
                    attempt = 0
                    await self._consume_pubsub(pubsub)
            except REDIS_ERRORS as exc:
                delay = backoff_delay(attempt, self.settings.backoff_cap)
                attempt += 1
                logger.warning("pub/sub connection lost (%s); resubscribing in %.1fs", exc, delay)
                await asyncio.sleep(delay)

    async def _consume_pubsub(self, pubsub: Any) -> None:
        payloads: list[bytes | None] = []
        deadline = 0.0
        next_beat = 0.0
        while True:
            timeout = max(0.0, deadline - time.monotonic()) if payloads else 1.0
            message = await pubsub.get_message(timeout=timeout)
            if message is not None and message.get("type") == "message":
                if not payloads:
                    deadline = time.monotonic() + self.settings.batch_delay
                payloads.append(message["data"])
            if payloads and (len(payloads) >= self.batch_size or time.monotonic() >= deadline):
                await self.fold_and_write([], payloads)
                payloads = []
            if time.monotonic() >= next_beat:
                await self.heartbeat()
                next_beat = time.monotonic() + 5


async def log_stats(subscriber: Subscriber, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        t = subscriber.totals
        logger.info(
            "folded %d, late %d, future %d, rejected %d",
            t["folded"],
            t["late"],
            t["future"],
            sum(v for k, v in t.items() if k.startswith("rejected:")),
        )


async def run_subscriber(settings: Settings) -> None:
    client = aioredis.Redis.from_url(settings.redis_url, socket_connect_timeout=5, socket_timeout=30, health_check_interval=30)
    async with client:
        subscriber = Subscriber(settings, client)
        logger.info(
            "subscriber %s reading %s",
            subscriber.consumer,
            settings.stream if settings.source == "stream" else f"channel {settings.channel}",
        )
        stats_task = asyncio.create_task(log_stats(subscriber, settings.stats_interval))
        try:
            await (subscriber.run_stream() if settings.source == "stream" else subscriber.run_pubsub())
        finally:
            stats_task.cancel()
