"""Shared test helpers: run the pipeline's stages in-process against real services."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
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
async def flushed_client(url: str) -> AsyncIterator[aioredis.Redis]:
    """A client of the Redis at `url`, emptied first (each test starts from nothing), closed after."""
    client = aioredis.Redis.from_url(url)
    await client.flushall()
    try:
        yield client
    finally:
        await client.aclose()


@contextlib.asynccontextmanager
async def served(app: web.Application) -> AsyncIterator[str]:
    """An aiohttp app on a free port of 127.0.0.1 until the block ends; yields its base URL (http://127.0.0.1:PORT)."""
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def serving(handler: object) -> AsyncIterator[str]:
    """A raw aiohttp handler served at the feed's path on 127.0.0.1, for peers that misbehave; yields its URL."""
    app = web.Application()
    app.router.add_get(PATH, handler)  # type: ignore[arg-type]
    async with served(app) as base:
        yield base + PATH


def callback_body(callback: dict[str, Any], values: dict[tuple[str, str], Any]) -> dict[str, Any]:
    """A `_dash-update-component` body for one server-side callback (as `_dash-dependencies` lists it), with chosen
    values for its inputs and state."""
    parts = callback["output"].strip(".").split("...")
    outputs = [dict(zip(("id", "property"), part.rsplit(".", 1), strict=True)) for part in parts if "." in part]  # none: set_props only

    def slot(s: dict[str, Any]) -> dict[str, Any]:
        return {**s, "value": values.get((s["id"], s["property"]))}

    return {"output": callback["output"], "outputs": outputs[0] if len(outputs) == 1 else outputs,
            "inputs": [slot(s) for s in callback["inputs"]], "state": [slot(s) for s in callback["state"]],
            "changedPropIds": [f"{s['id']}.{s['property']}" for s in callback["inputs"][:1]]}  # fmt: skip


def post_callback(base: str, body: bytes) -> tuple[int, bytes]:
    """POST a callback body to the dashboard at `base`: (status, body), an HTTP error's too."""
    import urllib.error
    import urllib.request

    request = urllib.request.Request(base + "_dash-update-component", data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as failure:
        with failure:
            return failure.code, failure.read()


def start_dashboard(redis_url: str, port: int, log: Any, env: Mapping[str, str] | None = None, ready: str = "/", wait: float = 30) -> Any:
    """`./dash_app.py` on `port` (its output appended to the file `log`), once it answers `ready` (`/healthz`: even
    without Redis) within `wait` seconds: a subprocess.Popen."""
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


@dataclass
class Up:
    """`python -m wikipulse up --simulate` running as a user runs it (up_running), on free ports."""

    process: subprocess.Popen[str]
    command: list[str]
    env: dict[str, str]
    redis_url: str
    dash_port: int
    archive_port: int
    banner: str  # its "wikipulse is up" line


@contextlib.contextmanager
def up_running(data_dir: Path, rate: int, log_level: str, stderr: int = subprocess.STDOUT, wait: float = 60) -> Iterator[Up]:
    """`up --simulate --rate RATE --data-dir DATA_DIR` once it printed its banner (stdout, with stderr if STDOUT),
    within `wait` seconds; killed if still running after the block (a test stops it itself, to check how it stops)."""
    redis_port, dash_port, archive_port = free_port(), free_port(), free_port()
    url = f"redis://127.0.0.1:{redis_port}/0"
    env = {**os.environ, "REDIS_URL": url, "DASH_PORT": str(dash_port), "ARCHIVE_PORT": str(archive_port), "LOG_LEVEL": log_level}
    command = [sys.executable, "-m", "wikipulse", "up", "--simulate", "--rate", str(rate), "--data-dir", str(data_dir)]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=stderr, stdin=subprocess.DEVNULL, text=True)
    try:
        assert process.stdout is not None
        started = time.monotonic()
        banner = process.stdout.readline()
        while "wikipulse is up" not in banner:
            assert process.poll() is None and time.monotonic() - started < wait, f"up did not start: {banner}"
            banner = process.stdout.readline()
        yield Up(process, command, env, url, dash_port, archive_port, banner)
    finally:
        if process.poll() is None:
            process.kill()
        if process.stdout is not None:
            process.stdout.close()
