"""Real services for the tests: a redis-server on a free port, a local EventStreams server on 127.0.0.1."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from tests.helpers import flushed_client, served
from wikipulse.core.settings import Settings
from wikipulse.devtools.eventstreams import PATH, EventSource, EventStreamsServer, ServerOptions
from wikipulse.devtools.redis_server import RedisServer

# Small real recordings, kept in the repository (source and license in tests/data/README.md).
# Volume comes from the project's own seeded simulator: tests.helpers.calibrated_lines.
DATA = Path(__file__).resolve().parent / "data"
ENWIKI = DATA / "recentchange-real-enwiki-100.ndjson"
CAPTURE = DATA / "recentchange-real-capture.sse"


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture
async def redis_client(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    async with flushed_client(redis_server.url) as client:
        yield client


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
    async with contextlib.AsyncExitStack() as servers:

        async def serve(source: EventSource, options: ServerOptions | None = None) -> tuple[EventStreamsServer, str]:
            server = EventStreamsServer(source, options)
            base = await servers.enter_async_context(served(server.app()))
            return server, base + PATH

        yield serve
