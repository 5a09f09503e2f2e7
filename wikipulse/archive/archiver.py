"""Redis stream -> ClickHouse: every event archived, acknowledged only after ClickHouse confirmed the insert.

Its own consumer group on the stream (`archive_group`), one archiver per group (a lease; a second one stands
by) under one consumer name: read, insert, then XACK, the next batch read while ClickHouse inserts one (the reading
loop is store/consumer.py's, each batch confirmed on a replica before it is inserted). A crash before the XACK leaves
the batch pending; the next archiver reads its pending entries first, in the batch sizes recorded in Redis,
so it re-reads the same batches and inserts them with the same deduplication tokens (a digest of their
stream ids): ClickHouse drops the second insert. Were the boundaries ever to change (entries
claimed from another consumer name), the table's ReplacingMergeTree on the event is the backstop, and
`FINAL` reads it exactly (README: the archive).

The archiver holds the embedded engine's directory (only one process can), so it also answers read-only
queries on 127.0.0.1 for `sql` and `history` while it runs (query_server.py). Between its inserts, in the same
ClickHouse thread, it rolls up the settled days for the History view (rollups.py).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from aiohttp import web

from wikipulse.archive.query_server import QueryServer
from wikipulse.archive.rollups import Pacer
from wikipulse.archive.table import TABLE, Archive, ArchiveUnavailable, batch_token, connect
from wikipulse.core.events import Accepted, Canary, validate
from wikipulse.core.settings import ArchiverSettings, redact_url
from wikipulse.core.tasks import background
from wikipulse.store import keys
from wikipulse.store.connect import Client, NodeConnection, open_client
from wikipulse.store.consumer import Handler, StreamConsumer
from wikipulse.store.lease import Lease
from wikipulse.store.policy import check_redis
from wikipulse.store.retry import pause_before_retry
from wikipulse.store.streams import Entry, ReadBatch, StreamReader
from wikipulse.store.trimming import declared_groups

logger = logging.getLogger(__name__)

CONSUMER = "archiver"  # one archiver per group (its lease): a successor finds the pending batch under this name
# At a trickle (the live feed's ~35 events/s) a read waits until this long after the last batch, so the table
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


class Archiver(Handler):
    doing = "archiving"

    def __init__(
        self,
        settings: ArchiverSettings,
        client: Client,
        layout: keys.Layout | None = None,
        query_limits: dict[str, int | str] | None = None,
    ) -> None:
        self.settings, self.client = settings, client
        self.layout = layout or keys.Layout(settings.stream)
        self.lease = Lease(client, self.layout.archiver_lease(settings.archive_group), settings.lease_ttl)
        self.archive: Archive | None = None
        self.thread = ThreadPoolExecutor(1, thread_name_prefix="clickhouse")  # every ClickHouse call, one at a time
        self.queries = QueryServer(settings, query_limits)
        self.totals: Counter[str] = Counter()
        self.reader = StreamReader(client, settings.stream, settings.archive_group, CONSUMER)
        declared = declared_groups(settings, settings.stream, self.layout.sharded)
        self.consumer = StreamConsumer(client, settings.stream, settings.archive_group, CONSUMER, log=logger, what="archiver",
                                       declared=declared, count=settings.archive_batch, backoff_cap=settings.backoff_cap,
                                       start=self._start_of_new_group, confirm=True, gather=MIN_INSERT_INTERVAL,
                                       source=self.reader)  # fmt: skip
        self.acks = NodeConnection(client, settings.stream)  # its XACK, batch list and stats: one MULTI, in the stream's slot
        self._recorded: list[int] = []  # the sizes of the pending batches, to read them again in the same batches
        self._replays: collections.deque[bool] = collections.deque()  # for each read on its way: whether it replays
        self._inserting: tuple[list[Entry], asyncio.Future[Counter[str]]] | None = None
        self.rollups = Pacer()  # the rollups, made in the ClickHouse thread between inserts (rollups.py)

    async def call(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.thread, fn, *args)

    async def open_archive(self) -> Archive:
        """The archive, opened (and its table made) once ClickHouse can be reached; retried until then."""
        while self.archive is None:
            try:
                archive = Archive(await self.call(connect, self.settings))
                await self.call(archive.ensure_schema, self.settings.archive_retention)
                await self.call(self.rollups.open, archive.client, self.settings.archive_retention)
                await self.queries.open(self.call)
                self.archive = archive
            except ArchiveUnavailable as exc:
                delay = self.consumer.backoff.next_delay()
                logger.error("ClickHouse unavailable (%s); nothing is acknowledged until it is back; retrying in %.1fs", exc, delay)
                await pause_before_retry(delay)
        return self.archive

    async def ensure_group(self) -> None:
        """The group, if missing (a new stream comes with every declared group, trimming.py: none of its events missed)."""
        await self.consumer.ensure_group()

    async def _start_of_new_group(self) -> str:
        """A new group on a stream that exists: from its first entry over an empty archive (nothing of this deployment
        is archived yet) or with --from-stream; else from now (what the stream holds was archived by an earlier group)."""
        if self.settings.archive_from_stream:
            return "0"
        archive = await self.open_archive()
        return "0" if await self.call(archive_is_empty, archive) else "$"

    async def run(self) -> None:
        if not self.lease.held:  # run_archiver waited for it already, before binding the query port
            await self.lease.wait_until_held(f"the archiver lease of group {self.settings.archive_group!r} (one archiver per group)")
        try:
            async with background(self.lease.keep(), "the archiver's lease renewal"):
                await self.open_archive()
                await self.consumer.run(self, self.settings.stats_interval)
        finally:
            await self.lease.release()

    async def consume(self) -> None:
        """Read, insert, acknowledge, with the next batch read while ClickHouse inserts this one, until an error. Each
        batch's size is recorded (keys.Layout.archiver_batches) before it is inserted and dropped with its XACK, in order:
        after a crash the pending entries are read again in the very same batches (own pending first, COUNT = the
        recorded sizes), and a batch whose insert had landed is inserted again with the same token: ClickHouse drops
        it. At most three batches are unacknowledged: one acknowledged, one inserted, one read."""
        await self.consumer.consume(self)

    async def begin(self) -> None:
        await self.open_archive()
        self._recorded = [int(n) for n in await self.client.lrange(self.layout.archiver_batches(self.settings.archive_group), 0, -1)]
        self._replays.clear()
        self._inserting = None

    def count(self, pending: bool) -> int | None:
        replay = pending and bool(self._recorded)
        self._replays.append(replay)
        return self._recorded.pop(0) if replay else None

    async def handle(self, batch: ReadBatch) -> None:
        batches = self.layout.archiver_batches(self.settings.archive_group)
        replayed = self._replays.popleft()
        if not batch.entries and batch.pending and self._inserting is None:
            await self.client.delete(batches)  # our own pending entries are done, nothing pending: no size to remember
        if batch.entries and not replayed:
            await self.client.rpush(batches, len(batch.entries))
        if self._inserting is not None:
            await self.acknowledge(*self._inserting)
            self._inserting = None
        if batch.entries:
            self._inserting = (batch.entries, asyncio.ensure_future(self.call(self.insert, self.archive, batch.entries)))
        elif self._inserting is None:  # an idle stream: the rollups go on (an archive of before them is rolled up)
            await self.call(self.rollups.step)

    async def end(self) -> None:
        self._inserting = None  # its batch stays pending: read again, in the same batch, and inserted with the same token
        await self.acks.drop()

    async def failed(self, error: Exception) -> bool:
        if not isinstance(error, ArchiveUnavailable):
            return False
        await self.consumer.pause(f"ClickHouse unavailable ({error}): the batch stays pending, nothing is acknowledged")
        return True

    def stats(self) -> str:
        t = self.totals
        return f"archived {t['archived']}, rejected {sum(v for k, v in t.items() if k.startswith('rejected:'))}"

    def insert(self, archive: Archive, entries: list[Entry]) -> Counter[str]:
        """The batch's rows into ClickHouse (in the ClickHouse thread); what it counted."""
        counters: Counter[str] = Counter()
        ids, raws = rows_of(entries, self.settings.max_event_bytes, counters)
        if ids:
            archive.insert(ids, raws, batch_token([e[0] for e in entries]))
            counters["inserts"] += 1
        counters["archived"] += len(ids)
        self.rollups.step()
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

    def app(self) -> web.Application:
        return self.queries.app()

    def close(self) -> None:
        self.queries.close()
        if self.archive is not None:
            with contextlib.suppress(Exception):  # closing an engine that failed must not hide why we stop
                self.archive.close()
        self.thread.shutdown(wait=True)


async def run_archiver(settings: ArchiverSettings) -> None:
    client, layout = await open_client(settings)
    async with client:
        await check_redis(client, settings)
        archiver = Archiver(settings, client, layout)
        runner = web.AppRunner(archiver.app())
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", settings.archive_port)
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
            await runner.cleanup()
            await asyncio.get_running_loop().run_in_executor(None, archiver.close)
