"""Fold raw events into per-domain time series in Redis.

Stream mode (default) reads `wiki:events` with a consumer group and is exactly-once:
each batch's increments and the XACK of its entries are one Lua script (series.py).
On start it re-folds its own pending entries; it claims the entries of consumers
that have been idle past `claim_idle` (XAUTOCLAIM). Pub/sub mode reads the channel,
at-most-once as Redis pub/sub is, and says so in the log when it had to resubscribe.
"""

from __future__ import annotations

import asyncio
import collections
import gc
import logging
import socket
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, cast

from redis.exceptions import ResponseError

from wikipulse.core.errors import OperatorError
from wikipulse.core.events import Accepted, Canary, validate
from wikipulse.core.settings import SubscriberSettings
from wikipulse.core.summary import Observation, observe, parse_summary
from wikipulse.core.wiki_page import PageEdit, page_of, parse_page
from wikipulse.fold.domains import DomainGate
from wikipulse.fold.fold import Increments, expand, tally
from wikipulse.fold.series import SeriesWriter, notice
from wikipulse.fold.spikes import CHECK_EVERY, SpikeWatch
from wikipulse.fold.trending import fold_pages
from wikipulse.fold.webhook import AlertWebhook
from wikipulse.store import keys
from wikipulse.store.connect import Client, open_client, raw_connection, refresh
from wikipulse.store.lease import Lease, LeaseLost, fenced_error
from wikipulse.store.policy import check_redis
from wikipulse.store.retry import REDIS_ERRORS, Backoff, Outage, RedisFull, drop, is_full, pause_before_retry, stop_if_cancelled
from wikipulse.store.streams import Entry, StreamReader
from wikipulse.store.trimming import declared_groups, ensure_group

logger = logging.getLogger(__name__)

_DATA, _FOLD = keys.DATA_FIELD.encode(), keys.FOLD_FIELD.encode()
WRITES_IN_FLIGHT = 2
PUBSUB_SILENCE = 30  # seconds without a message or a PING reply before the pub/sub connection counts as dead


MAX_NAME_SUFFIX = 1000


def default_consumers() -> Iterator[str]:
    """Default consumer names, in the order tried: the host name (stable across restarts on one host, so
    a restarted subscriber finds its own pending entries), then host-2, host-3, ... for a second live
    subscriber on the same host: each name is held by one live process (its lease)."""
    host = socket.gethostname()
    yield host
    for n in range(2, MAX_NAME_SUFFIX):
        yield f"{host}-{n}"


def observe_payloads(
    payloads: Iterable[bytes | None], max_bytes: int, counters: Counter[str], pages: list[PageEdit] | None = None
) -> Counter[Observation]:
    """Validate raw JSON events: what the accepted ones contribute (their page edits appended to `pages`, in
    order); everything else is counted."""
    observations: Counter[Observation] = Counter()
    for data in payloads:
        if data is None:
            counters["trimmed"] += 1  # the entry was trimmed from the stream before we read it
            continue
        verdict = validate(data, max_bytes)
        if isinstance(verdict, Accepted):
            obs = observe(verdict.event)
            observations[obs] += 1
            page = page_of(verdict.event)
            if page is not None and pages is not None and obs[1] is not None:
                pages.append(PageEdit(obs[0], obs[1], obs[2], obs[3], page))
        elif isinstance(verdict, Canary):
            counters["canaries"] += 1
        else:
            counters[f"rejected:{verdict.reason.value}"] += 1
    return observations


def observe_entries(entries: Sequence[Entry], max_bytes: int, counters: Counter[str], pages: list[PageEdit]) -> Counter[Observation]:
    """What stream entries contribute: from their fold summary where the publisher wrote one (equal
    summaries are counted first and parsed once), else from their JSON. Page edits are appended to `pages`
    in stream order."""
    heads: Counter[bytes] = Counter()
    parsed: dict[bytes, Observation | None] = {}  # each distinct head parsed once, for the counts and the pages
    payloads: list[bytes | None] = []
    for _, fields in entries:
        if fields is not None and len(fields) == 4 and fields[2] == _FOLD:  # the publisher's layout: most entries
            summary = fields[3]
        elif fields is None:
            payloads.append(None)
            continue
        else:
            named = dict(zip(fields[::2], fields[1::2], strict=False))
            if _FOLD not in named:
                payloads.append(named.get(_DATA, b""))  # no `data` field: b"", rejected as not JSON
                continue
            summary = named[_FOLD]
        head, tab, described = summary.partition(b"\t")
        heads[head] += 1
        if tab:
            obs = parsed[head] if head in parsed else parsed.setdefault(head, parse_summary(head))
            page = parse_page(described)
            if obs is not None and page is not None and obs[1] is not None:
                pages.append(PageEdit(obs[0], obs[1], obs[2], obs[3], page))
    observations: Counter[Observation] = Counter()
    unreadable: set[bytes] = set()
    for head, n in heads.items():
        obs = parsed[head] if head in parsed else parse_summary(head)
        if obs is None:
            unreadable.add(head)
        else:
            observations[obs] += n
    if unreadable:  # not written by our publisher: fall back to the JSON of those entries
        for _, fields in entries:
            named = dict(zip(fields[::2], fields[1::2], strict=False)) if fields is not None else {}
            if named.get(_FOLD, b"").partition(b"\t")[0] in unreadable:
                payloads.append(named.get(_DATA, b""))
    observations.update(observe_payloads(payloads, max_bytes, counters, pages))
    return observations


# Claims idle entries and bumps keys.CLAIMS in one step, so a consumer whose entries could have been
# taken sees it (series.APPLY_SCRIPT). KEYS: stream, keys.CLAIMS. ARGV: group, consumer, min idle ms,
# start id, count. Returns XAUTOCLAIM's reply.
CLAIM_SCRIPT = """
local reply = redis.call('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4], 'COUNT', ARGV[5])
if #reply[2] > 0 then redis.call('INCR', KEYS[2]) end
return reply
"""


@dataclass
class Batch:
    ids: list[bytes]
    increments: Increments
    counters: Counter[str]
    source: Sequence[Entry] | Sequence[bytes | None]  # kept to re-fold a part of it
    claims: bytes | None = None  # keys.CLAIMS before the entries were read; None: unknown
    notice: bytes = b""  # announced on keys.NOTICES once applied (series.notice)


class Subscriber:
    def __init__(self, settings: SubscriberSettings, client: Client, shard: keys.Shard | None = None) -> None:
        self.settings = settings
        self.client = client
        self.shard = shard or keys.Layout(settings.stream).all_shards[0]  # the stream it folds, and where its keys live
        self.claim_script = client.register_script(CLAIM_SCRIPT)
        self.retention = settings.retention_seconds()
        self.lease: Lease | None = None  # on the consumer name, while this process holds it (take_name)
        self._lease_keeper: asyncio.Task[None] | None = None
        self.use_name(settings.consumer or next(default_consumers()))
        self.backoff = Backoff(settings.backoff_cap)
        self.outage = Outage(logger, f"subscriber of {self.shard.stream}")
        self.inflight: collections.deque[Batch] = collections.deque()  # sent to the writer, unanswered
        self.caught_up = settings.source == "pubsub"  # the last read found no backlog (pub/sub has none)
        self.gate = DomainGate(client, settings.max_domains)
        self.totals: Counter[str] = Counter()
        self.batch_size = settings.read_batch_size  # reads are cheap; bigger batches fold better

    def use_name(self, consumer: str, lease: Lease | None = None) -> None:
        self.consumer = consumer
        token, ttl_ms = (lease.token, lease.ttl_ms) if lease is not None else ("", 0)
        stream = self.shard.stream
        self.reader = StreamReader(self.client, stream, self.settings.group, consumer, counter=self.shard.claims)
        self.writer = SeriesWriter(self.client, stream, self.settings.group, consumer, token, ttl_ms, self.shard, keys.NOTICES)

    async def take_name(self) -> None:
        """Hold a consumer name no other live process holds: the configured one (standing by while another
        process holds it), else the first free default one."""
        if self.lease is not None:
            return
        s = self.settings
        if s.consumer:
            lease = Lease(self.client, self.shard.consumer_lease(s.group, s.consumer), s.lease_ttl)
            await lease.wait_until_held(f"consumer name {s.consumer!r} in group {s.group!r}")
            name = s.consumer
        else:
            for name in default_consumers():
                lease = Lease(self.client, self.shard.consumer_lease(s.group, name), s.lease_ttl)
                if await lease.try_acquire() is None:
                    break
            else:
                raise LeaseLost(f"every default consumer name up to {name!r} is held by a live process")
        logger.info("consumer name %s (group %s) on %s", name, s.group, self.shard.stream)
        self.lease = lease
        self.use_name(name, lease)
        self._lease_keeper = asyncio.create_task(lease.keep())

    async def give_up_name(self) -> None:
        if self._lease_keeper is not None:
            self._lease_keeper.cancel()
            self._lease_keeper = None
        if self.lease is not None:
            await self.lease.release()
            self.lease = None

    # ---- folding (shared by both sources) ----------------------------------------------------
    async def prepare(self, ids: list[bytes], source: Sequence[Entry] | Sequence[bytes | None], claims: bytes | None = None) -> Batch:
        """Fold stream entries (ids given) or pub/sub payloads (no ids) into one write."""
        counters: Counter[str] = Counter()
        edits: list[PageEdit] = []
        if ids:
            observations = observe_entries(cast(Sequence[Entry], source), self.settings.max_event_bytes, counters, edits)
        else:
            observations = observe_payloads(cast(Sequence[bytes | None], source), self.settings.max_event_bytes, counters, edits)
        now = time.time()
        inc = Increments()
        classes = tally(observations.items(), now, self.retention, inc)
        classes, counters["overflow"] = await self.gate.route(classes)
        expand(classes, now, self.retention, inc, self.shard)
        inc.pages = fold_pages(edits, now, {key[0] for key in classes})
        counters.update(folded=inc.folded, late=inc.late, future=inc.future, untimed=inc.untimed)
        moved = b""
        if inc.folded and classes:
            moved = notice(inc.folded, (key[0] for key in classes), self.shard.index, min(key[1] for key in classes))
        return Batch(ids, inc, counters, source, claims, moved)

    async def send(self, batch: Batch) -> None:
        await self.writer.send(batch.increments, batch.ids, batch.counters, batch.claims, batch.notice)
        self.inflight.append(batch)

    async def settle(self, keep: int) -> None:
        """Take the writer's replies, oldest first, until at most `keep` batches are unanswered."""
        while len(self.inflight) > keep:
            try:
                owned = await self.writer.receive()
            except ResponseError as exc:
                error = fenced_error(exc, f"consumer name {self.consumer!r} was taken over by {{holder}} while this process stalled")
                if isinstance(error, LeaseLost):
                    self.lease = None  # not ours any more: give_up_name stops its keeper and releases nothing
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
            entries = [e for e in cast(Sequence[Entry], batch.source) if e[0] in ours]
            if entries:
                await self.send(await self.prepare([e[0] for e in entries], entries))

    async def write(self, batch: Batch) -> None:
        await self.send(batch)
        await self.settle(0)

    async def fold_entries(self, entries: Sequence[Entry], claims: bytes | None = None) -> None:
        if entries:
            await self.write(await self.prepare([e[0] for e in entries], entries, claims))

    async def close(self) -> None:
        """Drop the reader's and writer's connections with whatever they had in flight: each
        write is atomic, and entries not acknowledged stay pending, to be folded on the next start."""
        self.inflight.clear()
        await self.reader.close()
        await self.writer.close()

    # ---- stream source -----------------------------------------------------------------------
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

    async def claim_stale(self) -> int:
        """Fold the entries that other consumers left pending for longer than claim_idle."""
        claimed = 0
        start: bytes | str = "0-0"
        min_idle = int(self.settings.claim_idle * 1000)
        while True:
            script_keys = [self.shard.stream, self.shard.claims]
            args = [self.settings.group, self.consumer, min_idle, start, self.batch_size]
            reply = await self.claim_script(keys=script_keys, args=args)
            start, entries = reply[0], [(e[0], e[1] or None) for e in reply[1] if e]
            if entries:
                logger.info("claimed %d entries idle for over %ss", len(entries), self.settings.claim_idle)
                await self.fold_entries(entries)
                claimed += len(entries)
            if start in (b"0-0", "0-0"):
                return claimed

    async def run_stream(self) -> None:
        try:
            while True:
                try:
                    await self.ensure_group()
                    await self.take_name()
                    await self._consume()
                except REDIS_ERRORS as exc:
                    delay = self.backoff.next_delay()
                    self.outage.failed(exc, delay)
                    await pause_before_retry(delay)
                    await refresh(self.client)  # on a cluster, the slot may have moved: new connections to its node
                    self.use_name(self.consumer, self.lease)
                except LeaseLost as exc:
                    logger.error("%s: it applied nothing since, and takes a consumer name again", exc)
                    await self.give_up_name()
                except (RedisFull, ResponseError) as exc:
                    if not (isinstance(exc, RedisFull) or is_full(exc)):
                        if "NOGROUP" not in str(exc):
                            raise
                        logger.warning("the consumer group is gone (Redis lost its data?); creating it again")
                        continue
                    delay = self.backoff.next_delay()
                    logger.error("Redis is full (%s): folding paused, the entries stay pending; retrying in %.1fs", exc, delay)
                    await pause_before_retry(delay)
        finally:
            await self.give_up_name()

    async def _consume(self) -> None:
        """Read, fold and write as a pipeline: while this process folds one batch, Redis applies
        the previous ones and reads the next, so neither side waits for the other.

        At most WRITES_IN_FLIGHT writes are unanswered (memory stays bounded). Batches hold
        distinct entries and increments commute, so no write waits for the one before it."""
        cursor = "0"  # our own pending entries first: delivered to us before, never acknowledged
        block_ms = max(1, int(self.settings.batch_delay * 1000), 100)
        next_claim = 0.0
        try:
            entries: list[Entry] = []
            claims: bytes | None = None
            while True:
                stop_if_cancelled()
                if time.monotonic() >= next_claim:
                    await self.settle(0)
                    await self.claim_stale()
                    next_claim = time.monotonic() + max(self.settings.claim_idle / 2, 0.1)
                    await self.heartbeat()
                if not entries:
                    entries, claims = await self.read(cursor, None if cursor != ">" or self.inflight else block_ms)
                    if not entries:
                        if cursor != ">":
                            cursor = ">"  # our own pending entries are done: new ones from now on
                        await self.settle(0)
                        self.caught_up = cursor == ">"
                        continue
                if cursor != ">":
                    cursor = entries[-1][0].decode()
                await self.reader.send(cursor, self.batch_size, None)  # Redis reads the next batch while we fold this one
                batch = await self.prepare([e[0] for e in entries], entries, claims)
                # Take the read's reply (megabytes: the events' JSON) before the write goes out:
                # Redis sends no reply while it runs a script.
                entries, claims = await self.reader.receive()
                claims = claims or b"0"
                self.caught_up = cursor == ">" and len(entries) < self.batch_size
                await self.settle(WRITES_IN_FLIGHT - 1)
                await self.send(batch)
        finally:
            await self.close()

    async def heartbeat(self) -> None:
        try:
            await self.client.hset(self.shard.stats, mapping={"updated_at": time.time(), "consumer": self.consumer})
        except ResponseError as exc:
            if not is_full(exc):
                raise  # a full Redis refuses it; the writes say so

    # ---- pub/sub source ---------------------------------------------------------------------
    async def run_pubsub(self) -> None:
        first = True
        while True:
            # A connection of its own, read directly with read_response (~5 µs a message here):
            # redis-py's PubSub.get_message costs 15-18 µs. The connection still comes from the
            # client's settings (TLS, password, timeouts).
            connection = raw_connection(self.client, self.settings.channel)
            try:
                await connection.connect()
                await connection.send_command("SUBSCRIBE", self.settings.channel)
                if not first:
                    logger.warning(
                        "resubscribed to %r: events published while disconnected were missed "
                        "(pub/sub is at-most-once; use --source stream)",
                        self.settings.channel,
                    )
                first = False
                self.backoff.reset()
                await self._consume_pubsub(connection)
            except REDIS_ERRORS as exc:
                delay = self.backoff.next_delay()
                logger.warning("pub/sub connection lost (%s); resubscribing in %.1fs", exc, delay)
                await pause_before_retry(delay)
            except RedisFull as exc:
                delay = self.backoff.next_delay()
                logger.error(
                    "Redis is full (%s): events of this batch are not counted (pub/sub is at-most-once); retrying in %.1fs", exc, delay
                )
                await pause_before_retry(delay)
            finally:
                await drop(connection)
                await self.close()

    async def _consume_pubsub(self, connection: Any) -> None:
        payloads: list[bytes | None] = []
        deadline = 0.0
        next_beat = 0.0
        last_heard = time.monotonic()
        while True:
            stop_if_cancelled()
            timeout = max(0.0, deadline - time.monotonic()) if payloads else 1.0
            reply = await connection.read_response(timeout=timeout)
            now = time.monotonic()
            if reply is not None:
                last_heard = now
                if reply[0] == b"message":
                    if not payloads:
                        deadline = now + self.settings.batch_delay
                    payloads.append(reply[2])
            if payloads and (len(payloads) >= self.batch_size or now >= deadline):
                await self.write(await self.prepare([], payloads))
                payloads = []
            if now >= next_beat:
                await self.heartbeat()
                next_beat = now + 5
                if now - last_heard > PUBSUB_SILENCE:
                    raise ConnectionError(f"no reply from Redis on the pub/sub connection for {now - last_heard:.0f}s")
                if now - last_heard > 5:
                    await connection.send_command("PING")  # a quiet channel: prove the connection is alive


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


async def watch_spikes(client: Client, subscriber: Subscriber) -> None:
    """The spike watch of the subscriber's shard, judging only while the subscriber is caught up (a minute read
    while a backlog is still being folded would look quiet)."""
    watch = SpikeWatch(client, subscriber.shard)
    while True:
        if subscriber.caught_up:
            try:
                await watch.check(time.time())
            except REDIS_ERRORS as exc:
                logger.warning("spike check failed, trying again: %s: %s", type(exc).__name__, exc)
        await asyncio.sleep(CHECK_EVERY)


def tune_gc() -> None:
    """A batch is thousands of small lists (the reply's entries); with the default thresholds the
    cyclic GC runs dozens of times a batch and finds no cycles. Collecting far less often makes the
    fold ~20% faster (BENCHMARKS.md). Process-wide, so called by the entry point, not the class."""
    gc.set_threshold(20_000, 50, 1000)


async def run_subscriber(settings: SubscriberSettings) -> None:
    tune_gc()
    client, layout = await open_client(settings)
    async with client:
        await check_redis(client, settings)
        if settings.source == "stream":
            # One fold per shard this process takes, each with its own consumer-name lease, connections and batches.
            subscribers = [Subscriber(settings, client, layout.all_shards[i]) for i in settings.shard_indexes()]
        elif layout.sharded:
            raise OperatorError("--source pubsub folds into one Redis's keys: on a cluster or with SHARDS > 1, use the stream")
        else:
            subscribers = [Subscriber(settings, client)]
        for subscriber in subscribers:
            logger.info(
                "subscriber %s reading %s",
                subscriber.consumer,
                subscriber.shard.stream if settings.source == "stream" else f"channel {settings.channel}",
            )
        stats_tasks = [asyncio.create_task(log_stats(subscriber, settings.stats_interval)) for subscriber in subscribers]
        stats_tasks += [asyncio.create_task(watch_spikes(client, subscriber)) for subscriber in subscribers]
        # The webhook's poster runs beside the folds (a failed post never holds them up); were it to fail in a way
        # it does not handle, the process fails with it (gather) rather than go on with it dead unseen.
        webhook = [AlertWebhook(settings, client).run()] if settings.alert_webhook else []
        try:
            await asyncio.gather(*(sub.run_stream() if settings.source == "stream" else sub.run_pubsub() for sub in subscribers), *webhook)
        finally:
            for task in stats_tasks:
                task.cancel()
