"""Redis stream -> ClickHouse: every event archived, acknowledged only after ClickHouse confirmed the insert.

Its own consumer group on the stream (`archive_group`), one archiver per group (a lease; a second one stands
by) under one consumer name: read, insert, then XACK, the next batch read while ClickHouse inserts one. A crash before the XACK leaves
the batch pending; the next archiver reads its pending entries first, in the batch sizes recorded in Redis,
so it re-reads the same batches and inserts them with the same deduplication tokens (a digest of their
stream ids): ClickHouse drops the second insert. Were the boundaries ever to change (entries
claimed from another consumer name), the table's ReplacingMergeTree on the event is the backstop, and
`FINAL` reads it exactly (README: the archive).

The archiver holds the embedded engine's directory (only one process can), so it also answers read-only
queries on 127.0.0.1 (`POST /query`, JSON lines), for `sql` and `history` while it runs. They run beside the
inserts, never in their way: each query slot is a chDB handle of its own (one engine, any number of handles, which
run concurrently) in a thread of its own, within archive.QUERY_LIMITS; a query finding every slot busy is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from aiohttp import web
from redis.exceptions import ResponseError

from wikipulse.archive.table import TABLE, Archive, ArchiveUnavailable, QueryRefused, batch_token, connect
from wikipulse.core.errors import OperatorError, SettingsError
from wikipulse.core.events import Accepted, Canary, validate
from wikipulse.core.settings import ArchiverSettings, redact_url
from wikipulse.store import keys
from wikipulse.store.connect import Client, NodeConnection, open_client, refresh
from wikipulse.store.lease import Lease
from wikipulse.store.policy import check_redis
from wikipulse.store.retry import REDIS_ERRORS, Backoff, Outage, is_full, pause_before_retry, stop_if_cancelled
from wikipulse.store.streams import Entry, StreamReader
from wikipulse.store.trimming import declared_groups, ensure_group

logger = logging.getLogger(__name__)

CONSUMER = "archiver"  # one archiver per group (its lease): a successor finds the pending batch under this name
# At a trickle (the live feed's ~35 events/s) an insert waits until this long after the last one, so the table
# gets about one part a second, not one per read.
MIN_INSERT_INTERVAL = 1.0
_DATA, _FOLD = keys.DATA_FIELD.encode(), keys.FOLD_FIELD.encode()
# Queries at once beside the inserts, each a handle and a thread: they share the CPU, not a lock (a 20,000-event
# insert: 0.42 s alone, 1.1 s beside one 1e11-row scan, 2.6 s beside two, on 2 loaded cores; BENCHMARKS.md), and
# how long a query waits for a free slot before it is refused (HTTP 429).
QUERY_SLOTS = 2
QUERY_WAIT = 5.0


def rows_of(entries: Sequence[Entry], max_bytes: int, counters: Counter[str]) -> tuple[list[bytes], list[bytes]]:
    """(stream ids, raw JSON) of the entries to archive. The publisher's entries (with a fold summary) were
    validated when they were written; any other writer's are validated here, and what fails is counted."""
    ids: list[bytes] = []
    raws: list[bytes] = []
    for entry_id, fields in entries:
        if not fields:
            counters["trimmed"] += 1  # trimmed from the stream after it was delivered, before it was archived
            continue
        if len(fields) == 4 and fields[0] == _DATA and fields[2] == _FOLD:  # the publisher's layout: most entries
            ids.append(entry_id)
            raws.append(fields[1])
            continue
        named = dict(zip(fields[::2], fields[1::2], strict=False))
        data = named.get(_DATA)
        if data is not None and _FOLD in named:
            ids.append(entry_id)
            raws.append(data)
            continue
        verdict = validate(data or b"", max_bytes)
        if isinstance(verdict, Accepted):
            ids.append(entry_id)
            raws.append(data or b"")
        elif isinstance(verdict, Canary):
            counters["canaries"] += 1
        else:
            counters[f"rejected:{verdict.reason.value}"] += 1
    return ids, raws


def archive_is_empty(archive: Archive) -> bool:
    return not archive.query(f"SELECT 1 FROM {TABLE} LIMIT 1")[1]


class Archiver:
    def __init__(
        self, settings: ArchiverSettings, client: Client, layout: keys.Layout | None = None,
        query_limits: dict[str, int | str] | None = None,
    ) -> None:
        self.settings = settings
        self.query_limits = query_limits  # archive.QUERY_LIMITS unless overridden (tests)
        self.query_slots: asyncio.Queue[Archive] | None = None
        self.query_thread = ThreadPoolExecutor(QUERY_SLOTS, thread_name_prefix="clickhouse-query")
        self.client = client
        self.layout = layout or keys.Layout(settings.stream)
        self.lease = Lease(client, self.layout.archiver_lease(settings.archive_group), settings.lease_ttl)
        self.archive: Archive | None = None
        self.thread = ThreadPoolExecutor(1, thread_name_prefix="clickhouse")  # every ClickHouse call, one at a time
        self.totals: Counter[str] = Counter()
        self.backoff = Backoff(settings.backoff_cap)
        self.outage = Outage(logger, "archiver")
        self.reader = StreamReader(client, settings.stream, settings.archive_group, CONSUMER)
        self.acks = NodeConnection(client, settings.stream)  # its XACK, batch list and stats: one MULTI, in the stream's slot

    async def call(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.thread, fn, *args)

    async def open_archive(self) -> Archive:
        """The archive, opened (and its table made) once ClickHouse can be reached; retried until then."""
        while self.archive is None:
            try:
                archive = Archive(await self.call(connect, self.settings))
                await self.call(archive.ensure_schema, self.settings.archive_retention)
                await self.open_query_slots()
                self.archive = archive
            except ArchiveUnavailable as exc:
                delay = self.backoff.next_delay()
                logger.error("ClickHouse unavailable (%s); nothing is acknowledged until it is back; retrying in %.1fs", exc, delay)
                await pause_before_retry(delay)
        return self.archive

    async def open_query_slots(self) -> None:
        """QUERY_SLOTS clients for the endpoint's queries, apart from the inserts' (a client's calls are serialised)."""
        slots: asyncio.Queue[Archive] = asyncio.Queue()
        for _ in range(QUERY_SLOTS):
            slots.put_nowait(Archive(await self.call(connect, self.settings), self.query_limits))
        self.query_slots = slots

    async def ensure_group(self) -> None:
        """The group, if missing: a new stream comes with every declared group (trimming.py), so a fresh deployment's
        first events are archived however late the archiver starts."""
        s = self.settings
        declared = declared_groups(s, s.stream, self.layout.sharded)
        how = await ensure_group(self.client, s.stream, s.archive_group, declared, self._start_of_new_group)
        if how is not None:
            logger.info("created consumer group %s on %s from %s", s.archive_group, s.stream, "its first entry" if how == "0" else "now")

    async def _start_of_new_group(self) -> str:
        """A new group on a stream that exists: from its first entry over an empty archive (nothing of this deployment
        is archived yet) or with --from-stream; else from now (what the stream holds was archived by an earlier group)."""
        if self.settings.archive_from_stream:
            return "0"
        archive = await self.open_archive()
        return "0" if await self.call(archive_is_empty, archive) else "$"

    async def run(self) -> None:
        await self.lease.wait_until_held(f"the archiver lease of group {self.settings.archive_group!r} (one archiver per group)")
        keeper = asyncio.create_task(self.lease.keep())
        try:
            await self.open_archive()
            while True:
                try:
                    await self.ensure_group()
                    await self.consume()
                except REDIS_ERRORS as exc:
                    delay = self.backoff.next_delay()
                    self.outage.failed(exc, delay)
                    await pause_before_retry(delay)
                    await refresh(self.client)  # on a cluster, the slot may have moved: the reader reconnects to its node
                except ArchiveUnavailable as exc:
                    await self._pause(f"ClickHouse unavailable ({exc}): the batch stays pending, nothing is acknowledged")
                except ResponseError as exc:
                    if is_full(exc):
                        await self._pause(f"Redis is full ({exc})")
                    elif "NOGROUP" in str(exc):
                        logger.warning("the consumer group is gone (Redis lost its data?); creating it again")
                    else:
                        raise
        finally:
            keeper.cancel()
            await self.lease.release()

    async def _pause(self, why: str) -> None:
        delay = self.backoff.next_delay()
        logger.error("%s; retrying in %.1fs", why, delay)
        await pause_before_retry(delay)

    async def read(self, cursor: str, count: int) -> list[Entry]:
        """The next batch, once a replica of the stream's master has it (streams.StreamReader): a failover must not
        take entries away whose rows are archived, for the publisher would write them again."""
        await self.reader.send(cursor, count, 1000 if cursor == ">" else None)
        entries, _ = await self.reader.receive()
        last = self.reader.last_held(entries)
        if last is not None:
            await self.reader.confirm(last)
        return entries

    async def consume(self) -> None:
        """Read, insert, acknowledge, with the next batch read while ClickHouse inserts this one.

        Each batch's size is recorded (keys.Layout.archiver_batches) before it is inserted and dropped with its XACK, in
        order. So after a crash the pending entries are read again in the very same batches (own pending first,
        COUNT = the recorded sizes), and a batch whose insert had landed is inserted again with the same token:
        ClickHouse drops it. At most two batches are unacknowledged."""
        try:
            await self._consume(await self.open_archive())
        finally:
            await self.reader.close()  # a reply half read must not be taken for the next one
            await self.acks.drop()

    async def _consume(self, archive: Archive) -> None:
        s = self.settings
        batches = self.layout.archiver_batches(s.archive_group)
        recorded = [int(n) for n in await self.client.lrange(batches, 0, -1)]
        cursor = "0"
        inserting: tuple[list[Entry], asyncio.Future[Counter[str]]] | None = None
        last_insert, full = 0.0, True
        while True:
            stop_if_cancelled()
            if cursor == ">" and not full:
                await asyncio.sleep(max(0.0, last_insert + MIN_INSERT_INTERVAL - time.monotonic()))
            replaying = cursor != ">" and bool(recorded)
            entries = await self.read(cursor, recorded.pop(0) if replaying else s.archive_batch)
            if not entries and cursor != ">":
                cursor = ">"  # our own pending entries are done: new ones from now on
                if inserting is None:
                    await self.client.delete(batches)  # nothing pending: no size to remember
                continue
            if entries:
                if cursor != ">":
                    cursor = entries[-1][0].decode()
                if not replaying:
                    await self.client.rpush(batches, len(entries))
            if inserting is not None:
                await self.acknowledge(*inserting)
                inserting = None
            if entries:
                inserting = (entries, asyncio.ensure_future(self.call(self.insert, archive, entries)))
                last_insert, full = time.monotonic(), len(entries) >= s.archive_batch

    def insert(self, archive: Archive, entries: list[Entry]) -> Counter[str]:
        """The batch's rows into ClickHouse (in the ClickHouse thread); what it counted."""
        counters: Counter[str] = Counter()
        ids, raws = rows_of(entries, self.settings.max_event_bytes, counters)
        if ids:
            archive.insert(ids, raws, batch_token([e[0] for e in entries]))
            counters["inserts"] += 1
        counters["archived"] += len(ids)
        return counters

    async def acknowledge(self, entries: list[Entry], insert: asyncio.Future[Counter[str]]) -> None:
        """After ClickHouse's receipt, and only then: XACK the batch, forget its size, count it."""
        counters = await insert
        s = self.settings
        stats = self.layout.archiver_stats
        await self.acks.transaction([
            ("XACK", s.stream, s.archive_group, *[e[0] for e in entries]),
            ("LPOP", self.layout.archiver_batches(s.archive_group)),
            *[("HINCRBY", stats, name, n) for name, n in counters.items()],
            ("HSET", stats, "updated_at", time.time()),
        ])  # fmt: skip
        self.totals.update(counters)
        self.backoff.reset()
        self.outage.over()

    # ---- read-only queries, for the processes that cannot open the embedded directory ----------
    def app(self) -> web.Application:
        app = web.Application(client_max_size=1 << 20)
        app.router.add_post("/query", self.handle_query)
        return app

    async def handle_query(self, request: web.Request) -> web.Response:
        sql = await request.text()
        slots = self.query_slots
        if self.archive is None or slots is None:
            return web.Response(status=503, text="the archive is not open yet")
        try:
            archive = await asyncio.wait_for(slots.get(), QUERY_WAIT)
        except TimeoutError:
            busy = f"the archive is busy: {QUERY_SLOTS} queries running for more than {QUERY_WAIT:.0f} s; retry later"
            return web.Response(status=429, text=busy)
        work = asyncio.get_running_loop().run_in_executor(self.query_thread, archive.query_json, sql)
        work.add_done_callback(lambda _: slots.put_nowait(archive))  # free when the query ends, even if the request did not wait
        try:
            body = await asyncio.shield(work)
        except QueryRefused as exc:  # 413: the answer would be too large; 422: the query itself ran past a limit
            return web.Response(status=413 if exc.limit.startswith("max_result") else 422, text=str(exc))
        except (SettingsError, OperatorError) as exc:
            return web.Response(status=400, text=str(exc))
        return web.Response(body=body, content_type="application/x-ndjson")

    def close(self) -> None:
        archives = [self.archive] if self.archive is not None else []
        while self.query_slots is not None and not self.query_slots.empty():
            archives.append(self.query_slots.get_nowait())
        for archive in archives:
            with contextlib.suppress(Exception):  # closing an engine that failed must not hide why we stop
                archive.close()
        self.query_thread.shutdown(wait=True)
        self.thread.shutdown(wait=True)


async def log_stats(archiver: Archiver, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        t = archiver.totals
        logger.info("archived %d, rejected %d", t["archived"], sum(v for k, v in t.items() if k.startswith("rejected:")))


async def run_archiver(settings: ArchiverSettings) -> None:
    client, layout = await open_client(settings)
    async with client:
        await check_redis(client, settings)
        archiver = Archiver(settings, client, layout)
        runner = web.AppRunner(archiver.app())
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", settings.archive_port)
        stats_task = asyncio.create_task(log_stats(archiver, settings.stats_interval))
        try:
            # A second archiver stands by here, before it binds the port or opens the embedded engine.
            await archiver.lease.wait_until_held(f"the archiver lease of group {settings.archive_group!r} (one archiver per group)")
            try:
                await site.start()
                logger.info("archiver: %s -> %s; queries on http://127.0.0.1:%d/query", settings.stream,
                            redact_url(settings.clickhouse_url) or settings.archive_dir, settings.archive_port)  # fmt: skip
            except OSError as exc:  # archiving matters more than the query endpoint
                logger.error("cannot serve queries on 127.0.0.1:%d (%s): `sql` and `history` cannot reach the archive while "
                             "this archiver holds it; set ARCHIVE_PORT", settings.archive_port, exc)  # fmt: skip
            await archiver.run()
        finally:
            stats_task.cancel()
            await runner.cleanup()
            await asyncio.get_running_loop().run_in_executor(None, archiver.close)
