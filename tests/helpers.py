"""Shared test helpers: run the pipeline's stages in-process against real services."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import redis.asyncio as aioredis
from aiohttp import web

from wikipulse.core.settings import Settings
from wikipulse.devtools.eventstreams import PATH, ReplaySource
from wikipulse.devtools.redis_server import free_port
from wikipulse.devtools.simulate import LIVE_RATE, Simulator
from wikipulse.ingest.publisher import Publisher

ROOT = Path(__file__).resolve().parents[1]  # where ./dash_app.py is

CORPUS_SIZE = 10_000
CORPUS_CANARIES = 4
CORPUS_SEED = 7


@cache
def calibrated_lines() -> tuple[bytes, ...]:
    """The tests' volume data: 10,000 events in the real schema with the live feed's measured mix
    (wikipulse.devtools.simulate), the same for every run but for their times, which end about now so that
    every resolution keeps them; 4 canaries, every 2,500th event, the last one among them."""
    sim = Simulator(seed=CORPUS_SEED, start=time.time() - CORPUS_SIZE / LIVE_RATE, canary_every=CORPUS_SIZE // CORPUS_CANARIES)
    return tuple(orjson.dumps(sim.event(i)) for i in range(CORPUS_SIZE))


def calibrated_source() -> ReplaySource:
    return ReplaySource(calibrated_lines())


def non_canary_ids(lines: tuple[bytes, ...] | list[bytes]) -> list[str]:
    out = []
    for line in lines:
        meta = orjson.loads(line)["meta"]
        if meta["domain"] != "canary":
            out.append(meta["id"])
    return out


def assert_same(got: Mapping[Any, Any] | Sequence[Any], expected: Mapping[Any, Any] | Sequence[Any], show: int = 5) -> None:
    """Equality with a short report: pytest's own diff of two 10,000-entry collections takes minutes."""
    if got == expected:
        return
    if isinstance(got, Mapping) and isinstance(expected, Mapping):
        wrong = [(k, got.get(k), expected.get(k)) for k in sorted(set(got) | set(expected), key=repr) if got.get(k) != expected.get(k)]
        raise AssertionError(f"{len(wrong)} keys differ (got, expected), e.g. {wrong[:show]}")
    got_list, expected_list = list(got), list(expected)
    first = next(
        (i for i, (a, b) in enumerate(zip(got_list, expected_list, strict=False)) if a != b), min(len(got_list), len(expected_list))
    )
    raise AssertionError(f"lengths {len(got_list)} vs {len(expected_list)}; first difference at {first}: "
                         f"{got_list[first:first + show]} vs {expected_list[first:first + show]}")  # fmt: skip


async def stream_ids(client: aioredis.Redis, stream: str = "wiki:events") -> list[str]:
    entries = await client.xrange(stream)
    return [orjson.loads(fields[b"data"])["meta"]["id"] for _, fields in entries]


async def wait_for(check: Callable[[], Awaitable[bool]], timeout: float, what: str, task: asyncio.Task[None] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if task is not None and task.done():
            task.result()  # surface the stage's exception
            raise AssertionError(f"the task ended before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


async def stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def run_publisher_until(settings: Settings, check: Callable[[aioredis.Redis], Awaitable[bool]], timeout: float = 60) -> Publisher:
    """Run a Publisher until `check(client)` holds, then stop it as SIGINT would."""
    async with aioredis.Redis.from_url(settings.redis_url) as client, aiohttp.ClientSession() as session:
        publisher = Publisher(settings, client, session)
        task = asyncio.create_task(publisher.run())
        try:
            await wait_for(lambda: check(client), timeout, "the publisher's condition", task)
        finally:
            await stop(task)
            await publisher.close()
    return publisher


def xlen_at_least(n: int, stream: str = "wiki:events") -> Callable[[aioredis.Redis], Awaitable[bool]]:
    async def check(client: aioredis.Redis) -> bool:
        return int(await client.xlen(stream)) >= n

    return check


@contextlib.asynccontextmanager
async def serving(handler: object) -> AsyncIterator[str]:
    """A raw aiohttp handler served at the feed's path on 127.0.0.1, for peers that misbehave; yields its URL."""
    app = web.Application()
    app.router.add_get(PATH, handler)  # type: ignore[arg-type]
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}{PATH}"
    finally:
        await runner.cleanup()


def start_dashboard(redis_url: str, port: int, log: Any, env: Mapping[str, str] | None = None, ready: str = "/", wait: float = 30) -> Any:
    """`./dash_app.py` on `port` (its output appended to the file `log`), once it answers `ready` (`/healthz`: even
    without Redis) within `wait` seconds: a subprocess.Popen."""
    import os
    import subprocess
    import sys
    import urllib.request

    full_env = {**os.environ, "REDIS_URL": redis_url, "DASH_PORT": str(port), "LOG_LEVEL": "WARNING", **(env or {})}
    with open(log, "ab") as out:  # the child has its own copy of the descriptor
        process = subprocess.Popen(
            [sys.executable, "dash_app.py"], cwd=ROOT, env=full_env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
        )
    deadline = time.monotonic() + wait
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}{ready}", timeout=2).close()
            return process
        except OSError:
            assert process.poll() is None and time.monotonic() < deadline, "the dashboard did not start"
            time.sleep(0.2)
