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
