"""Redis stream -> ClickHouse: every event archived, acknowledged only after ClickHouse confirmed the insert.

Its own consumer group on the stream (`archive_group`), one archiver per group (a lease; a second one stands
by) under one consumer name: read, insert, then XACK, the next batch read while ClickHouse inserts one. A crash before the XACK leaves
the batch pending; the next archiver reads its pending entries first, in the batch sizes recorded in Redis,
so it re-reads the same batches and inserts them with the same deduplication tokens (a digest of their
stream ids): ClickHouse drops the second insert. Were the boundaries ever to change (entries
claimed from another consumer name), the table's ReplacingMergeTree on the event is the backstop, and
`FINAL` reads it exactly (README: the archive).

The archiver holds the embedded engine's directory (only one process can), so it also answers read-only
queries on 127.0.0.1 (`POST /query`, JSON lines), for `sql` and `history` while it runs.
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

from wikipulse import keys
from wikipulse.archive import TABLE, Archive, ArchiveUnavailable, batch_token, connect, json_lines
from wikipulse.connect import Client, open_client
from wikipulse.events import Accepted, Canary, validate
from wikipulse.lease import Lease
from wikipulse.policy import check_redis
from wikipulse.retry import REDIS_ERRORS, Backoff, is_full, pause_before_retry, stop_if_cancelled
from wikipulse.settings import OperatorError, Settings, SettingsError, redact_url
from wikipulse.streams import Entry, StreamReader
from wikipulse.trimming import declared_groups, ensure_group

logger = logging.getLogger(__name__)

CONSUMER = "archiver"  # one archiver per group (its lease): a successor finds the pending batch under this name
# At a trickle (the live feed's ~35 events/s) an insert waits until this long after the last one, so the table
# gets about one part a second, not one per read.
MIN_INSERT_INTERVAL = 1.0
_DATA, _FOLD = keys.DATA_FIELD.encode(), keys.FOLD_FIELD.encode()


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
    def __init__(self, settings: Settings, client: Client, layout: keys.Layout | None = None) -> None:
        self.settings = settings
        self.client = client
        self.layout = layout or keys.Layout(settings.stream)
        self.lease = Lease(client, self.layout.archiver_lease(settings.archive_group), settings.lease_ttl)
        self.archive: Archive | None = None
        self.thread = ThreadPoolExecutor(1, thread_name_prefix="clickhouse")  # every ClickHouse call, one at a time
        self.totals: Counter[str] = Counter()
        self.backoff = Backoff(settings.backoff_cap)
        self.reader = StreamReader(client, settings.stream, settings.archive_group, CONSUMER)

    async def call(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.thread, fn, *args)

    async def open_archive(self) -> Archive:
        """The archive, opened (and its table made) once ClickHouse can be reached; retried until then."""
        while self.archive is None:
            try:
                archive = Archive(await self.call(connect, self.settings))
                await self.call(archive.ensure_schema, self.settings.archive_retention)
                self.archive = archive
            except ArchiveUnavailable as exc:
                delay = self.backoff.next_delay()
                logger.error("ClickHouse unavailable (%s); nothing is acknowledged until it is back; retrying in %.1fs", exc, delay)
                await pause_before_retry(delay)
        return self.archive

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
                    await self._pause(f"Redis unavailable ({exc})")
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
        await self.reader.send(cursor, count, 1000 if cursor == ">" else None)
        entries, _ = await self.reader.receive()
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
        pipe = self.client.pipeline(transaction=True)
        pipe.xack(s.stream, s.archive_group, *[e[0] for e in entries])
        pipe.lpop(self.layout.archiver_batches(s.archive_group))
        for name, n in counters.items():
            pipe.hincrby(self.layout.archiver_stats, name, n)
        pipe.hset(self.layout.archiver_stats, "updated_at", time.time())
        await pipe.execute()
        self.totals.update(counters)
        self.backoff.reset()

    # ---- read-only queries, for the processes that cannot open the embedded directory ----------
    def app(self) -> web.Application:
        app = web.Application(client_max_size=1 << 20)
        app.router.add_post("/query", self.handle_query)
        return app

    async def handle_query(self, request: web.Request) -> web.Response:
        sql = await request.text()
        archive = self.archive
        if archive is None:
            return web.Response(status=503, text="the archive is not open yet")
        try:
            columns, rows = await self.call(archive.query, sql)
        except (SettingsError, OperatorError) as exc:
            return web.Response(status=400, text=str(exc))
        return web.Response(body=json_lines(columns, rows), content_type="application/x-ndjson")

    def close(self) -> None:
        if self.archive is not None:
            with contextlib.suppress(Exception):  # closing an engine that failed must not hide why we stop
                self.archive.close()
        self.thread.shutdown(wait=True)


async def log_stats(archiver: Archiver, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        t = archiver.totals
        logger.info("archived %d, rejected %d", t["archived"], sum(v for k, v in t.items() if k.startswith("rejected:")))


async def run_archiver(settings: Settings) -> None:
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
