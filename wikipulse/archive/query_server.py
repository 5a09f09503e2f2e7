"""The archiver's read-only query endpoint (`POST /query`, JSON lines on 127.0.0.1), for `sql` and `history`.

The archiver holds the embedded engine's directory (only one process can), so it answers the queries of the processes
that cannot open it. They run beside the inserts, never in their way: each query slot is a chDB handle of its own (one
engine, any number of handles, which run concurrently) in a thread of its own, within table.QUERY_LIMITS; a query
finding every slot busy is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from aiohttp import web

from wikipulse.archive.table import Archive, QueryRefused, connect
from wikipulse.core.errors import OperatorError, SettingsError
from wikipulse.core.settings import ArchiverSettings

# Queries at once beside the inserts, each a handle and a thread: they share the CPU, not a lock (a 20,000-event
# insert: 0.42 s alone, 1.1 s beside one 1e11-row scan, 2.6 s beside two, on 2 loaded cores; BENCHMARKS.md), and
# how long a query waits for a free slot before it is refused (HTTP 429).
QUERY_SLOTS = 2
QUERY_WAIT = 5.0


class QueryServer:
    def __init__(self, settings: ArchiverSettings, limits: dict[str, int | str] | None = None) -> None:
        self.settings = settings
        self.limits = limits  # table.QUERY_LIMITS unless overridden (tests)
        self.slots: asyncio.Queue[Archive] | None = None
        self.thread = ThreadPoolExecutor(QUERY_SLOTS, thread_name_prefix="clickhouse-query")

    async def open(self, call: Callable[..., Awaitable[Any]]) -> None:
        """QUERY_SLOTS clients for the endpoint's queries, apart from the inserts' (a client's calls are serialised);
        `call` runs a connect in the archiver's ClickHouse thread."""
        slots: asyncio.Queue[Archive] = asyncio.Queue()
        for _ in range(QUERY_SLOTS):
            slots.put_nowait(Archive(await call(connect, self.settings), self.limits))
        self.slots = slots

    def app(self) -> web.Application:
        app = web.Application(client_max_size=1 << 20)
        app.router.add_post("/query", self.handle_query)
        return app

    async def handle_query(self, request: web.Request) -> web.Response:
        sql = await request.text()
        slots = self.slots
        if slots is None:
            return web.Response(status=503, text="the archive is not open yet")
        try:
            archive = await asyncio.wait_for(slots.get(), QUERY_WAIT)
        except TimeoutError:
            busy = f"the archive is busy: {QUERY_SLOTS} queries running for more than {QUERY_WAIT:.0f} s; retry later"
            return web.Response(status=429, text=busy)
        work = asyncio.get_running_loop().run_in_executor(self.thread, archive.query_json, sql)
        work.add_done_callback(lambda _: slots.put_nowait(archive))  # free when the query ends, even if the request did not wait
        try:
            body = await asyncio.shield(work)
        except QueryRefused as exc:  # 413: the answer would be too large; 422: the query itself ran past a limit
            return web.Response(status=413 if exc.limit.startswith("max_result") else 422, text=str(exc))
        except (SettingsError, OperatorError) as exc:
            return web.Response(status=400, text=str(exc))
        return web.Response(body=body, content_type="application/x-ndjson")

    def close(self) -> None:
        while self.slots is not None and not self.slots.empty():
            with contextlib.suppress(Exception):  # closing an engine that failed must not hide why we stop
                self.slots.get_nowait().close()
        self.thread.shutdown(wait=True)
