"""Real services for the tests: a redis-server on a free port, a local EventStreams server on 127.0.0.1."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from aiohttp import web

from wikipulse.core.settings import Settings
from wikipulse.devtools.eventstreams import PATH, EventSource, EventStreamsServer, ServerOptions
from wikipulse.devtools.redis_server import RedisServer, free_port

# Small real recordings, kept in the repository (source and license in tests/data/README.md).
# Volume comes from the project's own seeded simulator: tests.helpers.calibrated_lines.
DATA = Path(__file__).resolve().parent / "data"
ENWIKI = DATA / "recentchange-real-enwiki-100.ndjson"
CAPTURE = DATA / "recentchange-real-capture.sse"


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
async def redis_client(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_server.url)
    await client.flushall()
    yield client
    await client.aclose()


@pytest.fixture
def settings(redis_server: RedisServer) -> Settings:
    return Settings.from_args(
        environ={},
        redis_url=redis_server.url,
        idle_timeout=5.0,
        backoff_cap=0.2,
        claim_idle=60.0,
        stats_interval=3600.0,
        consumer="test-consumer",
    )


ServeFn = Callable[[EventSource, ServerOptions | None], Awaitable[tuple[EventStreamsServer, str]]]


@pytest.fixture
async def eventstreams() -> AsyncIterator[ServeFn]:
    """Factory: serve a source on 127.0.0.1, return (server, url); all stopped at teardown."""
    runners: list[web.AppRunner] = []

    async def serve(source: EventSource, options: ServerOptions | None = None) -> tuple[EventStreamsServer, str]:
        server = EventStreamsServer(source, options)
        runner = web.AppRunner(server.app(), shutdown_timeout=0.1)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        runners.append(runner)
        return server, f"http://127.0.0.1:{port}{PATH}"

    yield serve
    for runner in runners:
        await runner.cleanup()
