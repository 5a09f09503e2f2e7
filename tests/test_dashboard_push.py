"""The notice hub's one subscription: stopped once the last page is gone, held again for a page opened at any moment."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import orjson
import pytest
import redis.asyncio as aioredis

from wikipulse.dashboard import push
from wikipulse.dashboard.push import NoticeHub
from wikipulse.devtools.redis_server import RedisServer

CHANNEL = "wp:test-hub-notices"
LISTENER = "wikipulse-notice-hub"  # the name of the hub's subscription task


def listeners() -> list[asyncio.Task[object]]:
    return [t for t in asyncio.all_tasks() if t.get_name() == LISTENER and not t.done()]


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


async def spin_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Like `until`, but at every turn of the loop: a moment a few turns long is not missed."""
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0)


async def pushed_to(hub: NoticeHub, client: aioredis.Redis) -> bool:
    """Whether a page waiting on the hub is woken by a notice published now."""
    woken = await hub.wait(-1, 0)  # the count now
    await client.publish(CHANNEL, orjson.dumps({"folded": 1, "domains": [], "shard": 0, "from": 1_800_000_000}))
    return await hub.wait(woken, 5.0) != woken


# "cancelling": the stopper cancelled the subscription task, which is still tearing its connection down.
# "done": the task is gone, the stopper not yet resumed. A page opened at either moment must be pushed to.
@pytest.mark.parametrize("moment", ["cancelling", "done"])
async def test_a_page_opened_while_the_subscription_stops_is_pushed_to(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch, moment: str
) -> None:
    monkeypatch.setattr(push, "IDLE_STOP", 0.05)
    hub = NoticeHub(redis_server.url, channel=CHANNEL)
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        hub.page_opened()
        await until(lambda: hub.version == 1)  # subscribed
        assert await pushed_to(hub, client)
        (old,) = listeners()
        hub.page_closed()  # the last page: the stopper sleeps IDLE_STOP, then cancels `old`
        await spin_until(lambda: old.cancelling() > 0 if moment == "cancelling" else old.done())
        assert old.cancelling() > 0 and (old.done() == (moment == "done"))
        hub.page_opened()  # exactly now
        await until(lambda: hub.subscribed and len(listeners()) == 1 and listeners()[0] is not old)
        assert await pushed_to(hub, client)
        for _ in range(20):  # whatever the stopper still does, the subscription stays, and stays the only one
            await asyncio.sleep(0.01)
        assert hub.subscribed and len(listeners()) == 1
        assert await pushed_to(hub, client)
    finally:
        await client.aclose()
        for task in listeners():
            task.cancel()
        await until(lambda: asyncio.all_tasks() == {asyncio.current_task()})  # the stopper too


async def test_the_subscription_is_let_go_once_the_last_page_closed(redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(push, "IDLE_STOP", 0.05)
    hub = NoticeHub(redis_server.url, channel=CHANNEL)
    hub.page_opened()
    await until(lambda: hub.subscribed and hub.version == 1)
    hub.page_closed()
    hub.page_opened()  # within IDLE_STOP: the same subscription is kept
    await asyncio.sleep(0.2)
    assert hub.subscribed and len(listeners()) == 1
    hub.page_closed()
    await until(lambda: not hub.subscribed and asyncio.all_tasks() == {asyncio.current_task()})


class CraftedRedis:
    """A server on 127.0.0.1 that speaks just enough RESP for a subscription, and hands its first subscriber a push
    that breaks redis-py's handling of it (an error that is not a Redis error): the case no real Redis produces."""

    def __init__(self) -> None:
        self.subscriptions = 0
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self.serve, "127.0.0.1", 0)
        return f"redis://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *_: object) -> None:
        assert self.server is not None
        self.server.close()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while command := await read_command(reader):
                if command[0].upper() == b"SUBSCRIBE":
                    self.subscriptions += 1
                    channel = command[1]
                    writer.write(b"*3\r\n$9\r\nsubscribe\r\n$%d\r\n%s\r\n:1\r\n" % (len(channel), channel))
                    if self.subscriptions == 1:
                        writer.write(b"*1\r\n$7\r\nmessage\r\n")  # no channel, no data
                elif command[0].upper() == b"PING":
                    writer.write(b"*2\r\n$4\r\npong\r\n$0\r\n\r\n")
                else:
                    writer.write(b"+OK\r\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


async def read_command(reader: asyncio.StreamReader) -> list[bytes]:
    header = await reader.readline()
    if not header:
        return []
    parts = []
    for _ in range(int(header[1:])):
        size = int((await reader.readline())[1:])
        parts.append((await reader.readexactly(size + 2))[:-2])
    return parts


async def test_a_subscription_broken_by_something_else_than_redis_is_said_and_made_again(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The hub's one subscription serves every page: an error redis-py raises that is not a Redis error (here from a
    malformed push) must not end it silently, leaving every open page waiting for a push that never comes."""
    monkeypatch.setattr(push, "IDLE_STOP", 0.05)
    crafted = CraftedRedis()
    async with crafted as url:
        hub = NoticeHub(url, channel=CHANNEL)
        hub.page_opened()
        await until(lambda: crafted.subscriptions == 2, timeout=10)  # subscribed again, by itself
        assert hub.subscribed
        assert any(r.levelname == "ERROR" and "notice subscription lost (IndexError" in r.getMessage() for r in caplog.records)
        hub.page_closed()
        await until(lambda: not hub.subscribed and asyncio.all_tasks() == {asyncio.current_task()})
