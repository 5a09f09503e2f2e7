"""SSE -> Redis fan-out: resumable, validated, deduplicated, batched.

The publisher reads the feed, validates and batches its events, and hands each batch to the
atomic, fenced write of ingest.py. On any failure the in-memory state is reloaded from Redis
and the feed is resumed from the stored position with `Last-Event-ID`: nothing lost, nothing
doubled. It holds the publisher lease (one publisher per Redis and feed) and pauses while
Redis is full.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter

import aiohttp
import orjson
from redis.exceptions import ResponseError

from wikipulse.core.events import Accepted, Canary, Reject, Rejected, validate
from wikipulse.core.settings import PublisherSettings
from wikipulse.core.summary import summary_of
from wikipulse.ingest.router import Router
from wikipulse.ingest.routes import RouteCopier
from wikipulse.ingest.sse import ServerSentEvent, SSEDecoder
from wikipulse.ingest.writer import Batch, BatchWriter, RedisDown, WritesLost
from wikipulse.store import keys
from wikipulse.store.connect import Client, open_client
from wikipulse.store.lease import Lease, LeaseLost
from wikipulse.store.policy import check_redis
from wikipulse.store.retry import REDIS_ERRORS, Backoff, Outage, RedisFull, is_full, pause_before_retry, stop_if_cancelled

logger = logging.getLogger(__name__)

HTTP_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError)
UNREACHABLE = (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError)  # no route, refused, no DNS: no network?
THROTTLE_STATUSES = (429, 503)


class StreamError(Exception):
    """The feed connection ended or failed; the message says why."""


class Throttled(StreamError):
    def __init__(self, status: int, retry_after: float | None) -> None:
        super().__init__(f"HTTP {status}, Retry-After {retry_after}")
        self.retry_after = retry_after


class Rejected400(StreamError):
    """The feed answered 400 to what this publisher asked for (a stored position or --since)."""


def parse_retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # an HTTP date: fall back to our own backoff


class Dedup:
    """The last `size` meta.id values, oldest evicted first: this process's fast filter. The
    authority is keys.SEEN, checked inside the write script."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._ids: dict[str, None] = {}

    def load(self, entries: list[bytes]) -> None:
        self._ids = dict.fromkeys(m.decode() for m in entries[-self.size :])

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, meta_id: str) -> bool:
        return meta_id in self._ids

    def add(self, meta_id: str) -> None:
        self._ids[meta_id] = None
        if len(self._ids) > self.size:
            del self._ids[next(iter(self._ids))]


class Publisher:
    def __init__(
        self, settings: PublisherSettings, client: Client, session: aiohttp.ClientSession, layout: keys.Layout | None = None
    ) -> None:
        self.settings = settings
        self.client = client
        self.layout = layout or keys.Layout(settings.stream)
        self.keys = self.layout.publisher
        self.session = session
        self.dedup = Dedup(settings.dedup_window)
        self.position: str | None = None
        self.since = settings.since  # dropped when the feed rejects it
        self.batch = Batch()
        self.totals: Counter[str] = Counter()
        self.connected = asyncio.Event()  # set while a feed connection is open (for tests and `up`)
        self.events_this_connection = 0
        self.lease = Lease(client, self.keys.lease, settings.lease_ttl)
        self.writer = BatchWriter(settings, client, self.lease, self.keys, self.layout.sharded)
        self._inflight: asyncio.Future[None] | None = None
        self._reset_pending = settings.reset_position  # once, at the first load: not after a Redis outage
        self._stored = False  # whether Redis holds a position of this process's (else its absence is no news)
        self._said_unreachable = False  # said once that the feed cannot be reached; the retries after it are quiet

    # ---- state ---------------------------------------------------------------------------
    async def load_state(self) -> None:
        """Take the position and the dedup window from Redis, the truth for what the stream holds.

        If Redis has no position but this process knows one, Redis lost its data (restarted without
        persistence, flushed): resume from the position this process knows, with its dedup window,
        and say loudly that what Redis held is gone."""
        if self._reset_pending:
            await self.client.delete(self.keys.position)
            self._reset_pending = False
        raw = await self.client.get(self.keys.position)
        if raw:
            self.position = raw.decode()
            self.dedup.load(await self.client.zrange(self.keys.seen, 0, -1))
        elif self.position is not None:
            await self._redis_lost_data()
        self._stored = bool(raw)
        self.batch = Batch()
        logger.info("position %s, %d ids in the dedup window", self.position or "none (start from --since or now)", len(self.dedup))

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

    # ---- taking events ---------------------------------------------------------------------
    def take(self, sse: ServerSentEvent) -> None:
        batch = self.batch
        if not batch.taken:
            batch.started = time.monotonic()
        batch.taken += 1
        if sse.id is not None:
            batch.last_id = sse.id
        if sse.event == "error":
            logger.warning("the feed sent an error event: %r", sse.data[:500])
            batch.counters["server_errors"] += 1
            return
        if sse.event != "message":
            return
        self.events_this_connection += 1
        verdict = Rejected(Reject.TOO_LARGE, "over max_event_bytes") if sse.oversize else validate(sse.data, self.settings.max_event_bytes)
        if isinstance(verdict, Accepted):
            meta_id = verdict.meta_id
            if meta_id is not None:
                if meta_id in self.dedup:
                    batch.counters["duplicates"] += 1
                    return
                self.dedup.add(meta_id)
            batch.frames.append(sse.data)
            batch.folds.append(summary_of(verdict.event))
            batch.ids.append(meta_id or "")
            meta = verdict.event["meta"]
            batch.last_dt = meta.get("dt") if isinstance(meta.get("dt"), str) else batch.last_dt
        elif isinstance(verdict, Canary):
            batch.counters["canaries"] += 1
        else:
            batch.counters[f"rejected:{verdict.reason.value}"] += 1
            batch.rejected.append(
                orjson.dumps(
                    {
                        "reason": verdict.reason.value,
                        "detail": verdict.detail,
                        "at": time.time(),
                        "frame": sse.data[:512].decode("utf-8", "replace"),
                    }
                )
            )
            logger.debug("rejected frame (%s): %s", verdict.reason.value, verdict.detail)

    async def flush(self) -> None:
        """Start writing the batch and go on reading while Redis works on it.

        At most one write is in flight (memory stays bounded when Redis is slow or down), and the
        previous one is awaited first, so batches land in order and a failure surfaces here."""
        if not self.batch.taken:
            return
        await self.drain()
        batch, self.batch = self.batch, Batch()
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

    async def _write(self, batch: Batch) -> None:
        after = self.position if self._stored else None
        written, duplicates, had_position, grew = await self.writer.write(batch, time.time(), after)
        if not had_position and self._stored:
            await self._redis_lost_data()
        self._stored = self._stored or batch.last_id is not None
        self.totals.update(batch.counters)
        self.totals.update(published=written, duplicates=duplicates)
        if duplicates:
            logger.warning("%d events were in the stream already (written by another publisher): not added again", duplicates)
        for group, lost in grew.items():
            logger.error(
                "entries were trimmed from the stream before consumer group %s had read them: %d entries trimmed unread so far "
                "(is it stopped? raise STREAM_MAXLEN, %d, to bridge longer outages; a group no consumer has read yet holds "
                "STREAM_GRACE, %gs; drop a role the deployment does not run from STREAM_CONSUMERS)",
                group, lost, self.settings.stream_maxlen, self.settings.stream_grace,
            )  # fmt: skip
        if batch.last_id is not None:
            self.position = batch.last_id

    async def heartbeat(self) -> None:
        """Mark the publisher alive even when the feed is quiet (the dashboard's status)."""
        await self.client.hset(self.keys.stats, "updated_at", time.time())

    # ---- the feed ----------------------------------------------------------------------------
    def request_headers(self) -> dict[str, str]:
        headers = {"User-Agent": self.settings.user_agent, "Accept": "text/event-stream"}
        if self.position:
            headers["Last-Event-ID"] = self.position
        return headers

    async def stream_once(self) -> None:
        """One connection: read, batch and flush until the feed ends or fails."""
        s = self.settings
        params = {"since": self.since} if self.since and not self.position else {}
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=None)
        self.events_this_connection = 0
        async with self.session.get(s.stream_url, headers=self.request_headers(), params=params, timeout=timeout) as resp:
            if resp.status in THROTTLE_STATUSES:
                raise Throttled(resp.status, parse_retry_after(resp.headers.get("Retry-After")))
            if resp.status != 200:
                body = (await resp.content.read(300)).decode("utf-8", "replace")
                if resp.status == 400 and (self.position or params):
                    self._fall_back(body)
                    raise Rejected400(f"HTTP 400: {body}")
                raise StreamError(f"HTTP {resp.status}: {body}")
            logger.info("connected to %s (Last-Event-ID %s)", s.stream_url, "sent" if self.position else "none")
            self._said_unreachable = False
            self.connected.set()
            try:
                await self._read(resp)
            finally:
                self.connected.clear()

    def _fall_back(self, body: str) -> None:
        """The feed rejected the position or --since (too old, or invalid): asking again the same way
        would be refused forever, so drop it and start from --since, or now."""
        if self.position:
            logger.error(
                "the feed rejected the stored position (HTTP 400: %s): it is too old or invalid. Starting from %s instead: "
                "events between them are missed",
                body.strip()[:200], f"--since {self.since}" if self.since else "now",
            )  # fmt: skip
            self.position = None
            self.totals["position_rejected"] += 1
            self.batch.counters["position_rejected"] += 1
        else:
            logger.error("the feed rejected --since %r (HTTP 400: %s): starting from now instead", self.since, body.strip()[:200])
            self.since = ""
            self.totals["since_rejected"] += 1
            self.batch.counters["since_rejected"] += 1

    async def _read(self, resp: aiohttp.ClientResponse) -> None:
        """Read the feed until it ends. The idle timeout counts from the last *complete* event: the
        feed sends no heartbeats, and a peer that trickles bytes but no events is as dead as a silent one."""
        s = self.settings
        decoder = SSEDecoder(s.max_event_bytes)
        decoder.last_event_id = self.position
        last_event = time.monotonic()
        while True:
            idle_left = s.idle_timeout - (time.monotonic() - last_event)
            if idle_left <= 0 and not self.batch.taken:
                raise StreamError(f"no complete event for {s.idle_timeout:g}s (idle timeout)")
            try:
                # asyncio.timeout, not wait_for: wait_for on 3.11 can swallow a cancellation (shutdown).
                async with asyncio.timeout(s.batch_delay if self.batch.taken else idle_left):
                    chunk = await resp.content.readany()
            except TimeoutError:
                if self.batch.taken:
                    await self.flush()
                continue
            if not chunk:
                await self.flush()
                raise StreamError("the server ended the stream")
            stop_if_cancelled()
            now = time.monotonic()
            for sse in decoder.feed(chunk):
                last_event = now
                self.take(sse)
                if len(self.batch.frames) >= s.batch_size:
                    await self.flush()
            if self.batch.taken and now - self.batch.started >= s.batch_delay:
                await self.flush()

    async def run(self) -> None:
        """Forever: hold the lease, connect, read, and on any failure back off and resume from the stored position."""
        backoff = Backoff(self.settings.backoff_cap)
        await self._wait_for_redis()
        await self.lease.wait_until_held("the publisher lease (one publisher per Redis and feed)")
        keeper = asyncio.create_task(self.lease.keep())
        try:
            while True:
                delay = await self._run_once(backoff)
                self.totals["reconnects"] += 1
                with contextlib.suppress(*REDIS_ERRORS, ResponseError):  # counted in memory; Redis trouble is handled on the next write
                    await self.client.hincrby(self.keys.stats, "reconnects", 1)
                await pause_before_retry(delay)
        finally:
            keeper.cancel()
            await self.lease.release()

    async def _run_once(self, backoff: Backoff) -> float:
        """One connection and what follows its end: the wait before the next one."""
        try:
            try:
                await self.stream_once()
            finally:
                await self.drain()  # the reconnect resumes from the position of the last batch read
        except Throttled as exc:
            delay = max(exc.retry_after or 0.0, backoff.next_delay(extra=2, cap=self.settings.backoff_cap * 4))
            reason = str(exc)
        except Rejected400 as exc:
            return self._log_reconnect(0.0, str(exc))
        except RedisDown as exc:
            logger.warning("Redis write failed (%s): pausing the feed until Redis is back", exc)
            await self._wait_for_redis()
            backoff.reset()
            return self._log_reconnect(0.0, "Redis was unavailable")
        except WritesLost as exc:
            logger.error(
                "%s: Redis lost this publisher's last batches (a failover to a replica they had not reached). "
                "Reading the feed again from the position Redis holds: nothing is missed, nothing doubled",
                exc,
            )
            self.totals["writes_lost"] += 1
            await self._wait_for_redis()
            return self._log_reconnect(0.0, "Redis lost the last batches")
        except RedisFull as exc:
            await self._wait_for_room(exc)
            backoff.reset()
            return self._log_reconnect(0.0, "Redis was full")
        except LeaseLost as exc:
            logger.error("%s: this publisher stops writing and stands by", exc)
            self.batch = Batch()
            await self.lease.wait_until_held("the publisher lease")
            await self._wait_for_redis()  # the other publisher moved the position on
            return self._log_reconnect(0.0, "took the lease over")
        except UNREACHABLE as exc:
            return self._unreachable(backoff.next_delay(), exc)
        except (StreamError, *HTTP_ERRORS) as exc:
            if self.events_this_connection:
                backoff.reset()  # that connection worked: its end is routine, not a failure in a row
            delay = backoff.next_delay()
            reason = f"{type(exc).__name__}: {exc}"
        return self._log_reconnect(delay, reason)

    def _log_reconnect(self, delay: float, reason: str) -> float:
        logger.warning(
            "reconnecting in %.1fs: %s (resume from %s)", delay, reason, "stored position" if self.position else "--since or now"
        )
        return delay

    def _unreachable(self, delay: float, exc: Exception) -> float:
        """The feed cannot be reached (no network, a wrong URL): said once, clearly, with the way to run offline; the
        retries after it are quiet until a connection is made."""
        if self._said_unreachable:
            logger.debug("the feed is still unreachable (%s: %s); again in %.1fs", type(exc).__name__, exc, delay)
            return delay
        self._said_unreachable = True
        logger.warning(
            "the feed at %s cannot be reached (%s: %s): no network? Retrying quietly (at most every %gs) until it answers. "
            "To run offline, on simulated events: python -m wikipulse up --simulate",
            self.settings.stream_url, type(exc).__name__, exc, self.settings.backoff_cap,
        )  # fmt: skip
        return delay

    async def _wait_for_redis(self) -> None:
        backoff = Backoff(self.settings.backoff_cap)
        outage = Outage(logger, "publisher")
        while True:
            try:
                await self.load_state()
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
                await self._wait_for_redis()
                continue
            logger.warning("Redis has room again: resuming the feed")
            await self._wait_for_redis()  # this process's dedup window took ids of the refused batch
            return

    async def close(self) -> None:
        """Flush what was read and store the position (on shutdown)."""
        try:
            await self.drain()
            await self.flush()
            await self.drain()
        except (RedisDown, RedisFull, LeaseLost, WritesLost) as exc:
            logger.warning("could not flush the last batch on shutdown (%s); it will be re-read on restart", exc)


def log_totals(publisher: Publisher) -> None:
    t = publisher.totals
    rejected = sum(v for k, v in t.items() if k.startswith("rejected:"))
    logger.info(
        "published %d, duplicates %d, canaries %d, rejected %d, reconnects %d",
        t["published"], t["duplicates"], t["canaries"], rejected, t["reconnects"],
    )  # fmt: skip


async def log_stats(publisher: Publisher, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        log_totals(publisher)
        with contextlib.suppress(*REDIS_ERRORS, ResponseError):  # a full Redis refuses it: the write path says so
            await publisher.heartbeat()


async def run_publisher(settings: PublisherSettings) -> None:
    client, layout = await open_client(settings)
    async with client, aiohttp.ClientSession(read_bufsize=1 << 20) as session:
        await check_redis(client, settings)
        publisher = Publisher(settings, client, session, layout)
        stats_task = asyncio.create_task(log_stats(publisher, settings.stats_interval))
        # Sharded, the publisher's process also routes its stream to the shards' streams (router.py); if either
        # fails, the process does (gather), rather than publish on with nothing routed.
        roles = [publisher.run(), *([Router(settings, client, layout).run()] if layout.sharded else [])]
        roles.append(RouteCopier(settings, client, layout).run())  # the routes (routes.py): idle while none is declared
        try:
            await asyncio.gather(*roles)
        finally:
            stats_task.cancel()
            await asyncio.shield(publisher.close())
            log_totals(publisher)
