"""SSE -> Redis fan-out: resumable, validated, deduplicated, batched.

Each batch is one atomic Lua script call holding the events (PUBLISH to the channel
and XADD to the stream), the new dedup-window entries, the SSE position and the
counters, so the stored position never runs ahead of or behind what was written.
On any failure the in-memory state is reloaded from Redis and the feed is resumed
from the stored position with `Last-Event-ID`: nothing lost, nothing doubled.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from dataclasses import dataclass, field

import aiohttp
import orjson
import redis.asyncio as aioredis

from wikipulse import keys
from wikipulse.events import Accepted, Canary, Reject, Rejected, parse_dt, validate
from wikipulse.fold import observe, summarize
from wikipulse.retry import REDIS_ERRORS, backoff_delay, pause_before_retry, stop_if_cancelled
from wikipulse.settings import Settings
from wikipulse.sse import ServerSentEvent, SSEDecoder

logger = logging.getLogger(__name__)

HTTP_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError)
THROTTLE_STATUSES = (429, 503)


# KEYS: stream, seen zset, position, stats hash, rejected list.
# ARGV: channel, stream maxlen, dedup window, JSON {"fold", "seen", "position", "counters", "status", "rejected"},
#       then the raw event frames. The frames go as plain ARGV items (no re-encoding on either side);
#       one script call costs the client one command to pack instead of two per event. `fold` holds
#       each frame's fold summary (keys.FOLD_FIELD), in order: the subscriber then needs no JSON parsing.
WRITE_SCRIPT = """
local channel, maxlen, window = ARGV[1], ARGV[2], tonumber(ARGV[3])
local p = cjson.decode(ARGV[4])
local folds = p['fold']
for i = 5, #ARGV do
  redis.call('PUBLISH', channel, ARGV[i])
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', maxlen, '*', 'data', ARGV[i], 'fold', folds[i - 4])
end
local zadd = {}
for id, seq in pairs(p['seen']) do
  zadd[#zadd + 1] = seq
  zadd[#zadd + 1] = id
  if #zadd >= 1000 then redis.call('ZADD', KEYS[2], unpack(zadd)); zadd = {} end
end
if #zadd > 0 then redis.call('ZADD', KEYS[2], unpack(zadd)) end
redis.call('ZREMRANGEBYRANK', KEYS[2], 0, -(window + 1))
if p['position'] ~= cjson.null then redis.call('SET', KEYS[3], p['position']) end
for name, n in pairs(p['counters']) do redis.call('HINCRBY', KEYS[4], name, n) end
for name, v in pairs(p['status']) do redis.call('HSET', KEYS[4], name, v) end
for _, r in ipairs(p['rejected']) do redis.call('LPUSH', KEYS[5], r) end
if #p['rejected'] > 0 then redis.call('LTRIM', KEYS[5], 0, tonumber(p['keep']) - 1) end
return #ARGV - 4
"""


class StreamError(Exception):
    """The feed connection ended or failed; the message says why."""


class Throttled(StreamError):
    def __init__(self, status: int, retry_after: float | None) -> None:
        super().__init__(f"HTTP {status}, Retry-After {retry_after}")
        self.retry_after = retry_after


class RedisDown(Exception):
    pass


def parse_retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # an HTTP date: fall back to our own backoff


class Dedup:
    """The last `size` meta.id values, oldest evicted first; mirrored in Redis (keys.SEEN)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.seq = 0
        self._ids: dict[str, int] = {}

    def load(self, entries: list[tuple[bytes, float]]) -> None:
        self._ids = {m.decode(): int(s) for m, s in entries[-self.size :]}
        self.seq = max(self._ids.values(), default=0)

    def __contains__(self, meta_id: str) -> bool:
        return meta_id in self._ids

    def add(self, meta_id: str) -> int:
        self.seq += 1
        self._ids[meta_id] = self.seq
        if len(self._ids) > self.size:
            del self._ids[next(iter(self._ids))]
        return self.seq


@dataclass
class Batch:
    frames: list[bytes] = field(default_factory=list)
    folds: list[str] = field(default_factory=list)  # fold.summarize of each frame
    seen: dict[str, int] = field(default_factory=dict)
    counters: Counter[str] = field(default_factory=Counter)
    rejected: list[bytes] = field(default_factory=list)
    last_id: str | None = None
    last_dt: str | None = None
    taken: int = 0
    started: float = 0.0


class Publisher:
    def __init__(self, settings: Settings, client: aioredis.Redis, session: aiohttp.ClientSession) -> None:
        self.settings = settings
        self.client = client
        self.session = session
        self.dedup = Dedup(settings.dedup_window)
        self.position: str | None = None
        self.batch = Batch()
        self.totals: Counter[str] = Counter()
        self.connected = asyncio.Event()  # set while a feed connection is open (for tests and `up`)
        self._inflight: asyncio.Future[None] | None = None
        self._script = client.register_script(WRITE_SCRIPT)

    # ---- state ---------------------------------------------------------------------------
    async def load_state(self) -> None:
        if self.settings.reset_position:
            await self.client.delete(keys.POSITION)
        raw = await self.client.get(keys.POSITION)
        self.position = raw.decode() if raw else None
        self.dedup.load(await self.client.zrange(keys.SEEN, 0, -1, withscores=True))
        self.batch = Batch()
        logger.info("position %s, %d ids in the dedup window", self.position or "none (start from --since or now)", len(self.dedup._ids))

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
        verdict = Rejected(Reject.TOO_LARGE, "over max_event_bytes") if sse.oversize else validate(sse.data, self.settings.max_event_bytes)
        if isinstance(verdict, Accepted):
            meta_id = verdict.meta_id
            if meta_id is not None:
                if meta_id in self.dedup:
                    batch.counters["duplicates"] += 1
                    return
                batch.seen[meta_id] = self.dedup.add(meta_id)
            batch.frames.append(sse.data)
            batch.folds.append(summarize(observe(verdict.event)))
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
        s = self.settings
        counters = batch.counters
        counters["published"] += len(batch.frames)
        now = time.time()
        status: dict[str, str | float] = {"updated_at": now}
        if batch.frames:
            status["last_publish_at"] = now
        if batch.last_dt is not None:
            status["last_event_dt"] = batch.last_dt
            dt = parse_dt(batch.last_dt)
            if dt is not None:
                status["lag_seconds"] = round(now - dt, 3)
        payload = {
            "fold": batch.folds,
            "seen": batch.seen,
            "position": batch.last_id,
            "counters": {name: n for name, n in counters.items() if n},
            "status": status,
            "rejected": [r.decode() for r in batch.rejected],
            "keep": keys.REJECTED_KEEP,
        }
        script_keys = [s.stream, keys.SEEN, keys.POSITION, keys.PUBLISHER_STATS, keys.REJECTED]
        args = [s.channel, s.stream_maxlen, s.dedup_window, orjson.dumps(payload), *batch.frames]
        try:
            await self._script(keys=script_keys, args=args)
        except REDIS_ERRORS as exc:
            raise RedisDown(f"{type(exc).__name__}: {exc}") from exc
        self.totals.update(counters)
        if batch.last_id is not None:
            self.position = batch.last_id

    async def heartbeat(self) -> None:
        """Mark the publisher alive even when the feed is quiet (the dashboard's status)."""
        await self.client.hset(keys.PUBLISHER_STATS, "updated_at", time.time())

    # ---- the feed ----------------------------------------------------------------------------
    def request_headers(self) -> dict[str, str]:
        headers = {"User-Agent": self.settings.user_agent, "Accept": "text/event-stream"}
        if self.position:
            headers["Last-Event-ID"] = self.position
        return headers

    async def stream_once(self) -> None:
        """One connection: read, batch and flush until the feed ends or fails."""
        s = self.settings
        params = {"since": s.since} if s.since and not self.position else {}
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=None)
        async with self.session.get(s.stream_url, headers=self.request_headers(), params=params, timeout=timeout) as resp:
            if resp.status in THROTTLE_STATUSES:
                raise Throttled(resp.status, parse_retry_after(resp.headers.get("Retry-After")))
            if resp.status != 200:
                body = (await resp.content.read(300)).decode("utf-8", "replace")
                raise StreamError(f"HTTP {resp.status}: {body}")
            logger.info("connected to %s (Last-Event-ID %s)", s.stream_url, "sent" if self.position else "none")
            self.connected.set()
            try:
                await self._read(resp)
            finally:
                self.connected.clear()

    async def _read(self, resp: aiohttp.ClientResponse) -> None:
        s = self.settings
        decoder = SSEDecoder(s.max_event_bytes)
        decoder.last_event_id = self.position
        last_data = time.monotonic()
        while True:
            idle_left = s.idle_timeout - (time.monotonic() - last_data)
            try:
                # asyncio.timeout, not wait_for: wait_for on 3.11 can swallow a cancellation (shutdown).
                async with asyncio.timeout(s.batch_delay if self.batch.taken else max(idle_left, 0.0)):
                    chunk = await resp.content.readany()
            except TimeoutError:
                if self.batch.taken:
                    await self.flush()
                    continue
                raise StreamError(f"no data for {s.idle_timeout:g}s (idle timeout)") from None
            if not chunk:
                await self.flush()
                raise StreamError("the server ended the stream")
            last_data = time.monotonic()
            stop_if_cancelled()
            for sse in decoder.feed(chunk):
                self.take(sse)
                if len(self.batch.frames) >= s.batch_size:
                    await self.flush()
            if self.batch.taken and last_data - self.batch.started >= s.batch_delay:
                await self.flush()

    async def run(self) -> None:
        """Forever: connect, read, and on any failure back off and resume from the stored position."""
        attempt = 0
        await self._wait_for_redis()
        while True:
            delay: float | None = None
            try:
                try:
                    await self.stream_once()
                finally:
                    await self.drain()  # the reconnect resumes from the position of the last batch read
            except Throttled as exc:
                delay = max(exc.retry_after or 0.0, backoff_delay(attempt + 2, self.settings.backoff_cap * 4))
                reason = str(exc)
            except RedisDown as exc:
                logger.warning("Redis write failed (%s): pausing the feed until Redis is back", exc)
                await self._wait_for_redis()
                reason = "Redis was unavailable"
                delay = 0.0
            except (StreamError, *HTTP_ERRORS) as exc:
                reason = f"{type(exc).__name__}: {exc}"
            flushed_any = self.totals["published"] > 0 or bool(self.position)
            attempt = 0 if delay == 0.0 else attempt + 1
            if delay is None:
                delay = backoff_delay(attempt, self.settings.backoff_cap)
            self.totals["reconnects"] += 1
            with contextlib.suppress(*REDIS_ERRORS):  # counted in memory; Redis trouble is handled on the next write
                await self.client.hincrby(keys.PUBLISHER_STATS, "reconnects", 1)
            logger.warning("reconnecting in %.1fs: %s (resume from %s)", delay, reason, "stored position" if flushed_any else "start")
            await pause_before_retry(delay)

    async def _wait_for_redis(self) -> None:
        attempt = 0
        while True:
            try:
                await self.load_state()
                return
            except REDIS_ERRORS as exc:
                delay = backoff_delay(attempt, self.settings.backoff_cap)
                logger.warning("Redis unavailable (%s); retrying in %.1fs", exc, delay)
                attempt += 1
                await pause_before_retry(delay)

    async def close(self) -> None:
        """Flush what was read and store the position (on shutdown)."""
        try:
            await self.drain()
            await self.flush()
            await self.drain()
        except RedisDown as exc:
            logger.warning("could not flush the last batch on shutdown (%s); it will be re-read on restart", exc)


async def log_stats(publisher: Publisher, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        t = publisher.totals
        rejected = sum(v for k, v in t.items() if k.startswith("rejected:"))
        logger.info(
            "published %d, duplicates %d, canaries %d, rejected %d, reconnects %d",
            t["published"], t["duplicates"], t["canaries"], rejected, t["reconnects"],
        )  # fmt: skip
        with contextlib.suppress(*REDIS_ERRORS):
            await publisher.heartbeat()


async def run_publisher(settings: Settings) -> None:
    client = aioredis.Redis.from_url(settings.redis_url, socket_connect_timeout=5, socket_timeout=30, health_check_interval=30)
    async with client, aiohttp.ClientSession(read_bufsize=1 << 20) as session:
        publisher = Publisher(settings, client, session)
        stats_task = asyncio.create_task(log_stats(publisher, settings.stats_interval))
        try:
            await publisher.run()
        finally:
            stats_task.cancel()
            await asyncio.shield(publisher.close())
