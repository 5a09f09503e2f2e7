"""Spike alerts to ALERT_WEBHOOK, against a real Redis and real HTTP servers on 127.0.0.1: each alert posted once,
retried after a failure, given up (counted) after a timeout, and never in the way of the fold."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import orjson
import pytest
import redis.asyncio as aioredis
from aiohttp import web

from tests.helpers import calibrated_lines, stop, wait_for
from tests.test_subscriber import load_stream
from wikipulse.core.errors import SettingsError
from wikipulse.core.settings import Settings
from wikipulse.devtools.redis_server import free_port
from wikipulse.fold import webhook
from wikipulse.fold.spikes import Spike, SpikeWatch
from wikipulse.fold.subscriber import run_subscriber
from wikipulse.fold.webhook import AlertWebhook, body_of, describe
from wikipulse.store import keys

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@asynccontextmanager
async def receiver(handler: Handler) -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_post("/hook/secret-token", handler)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}/hook/secret-token"
    finally:
        await runner.cleanup()


async def raise_alert(client: aioredis.Redis, domain: str, minute: int) -> None:
    """An alert as the subscriber's spike watch raises it (its stream, its channel, its marker)."""
    assert await SpikeWatch(client, keys.UNSHARDED).raise_alert(Spike(domain, minute, 600, 40.0, 9.5))


async def state(client: aioredis.Redis) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in (await client.hgetall(keys.ALERT_WEBHOOK_STATE)).items()}


def counted(client: aioredis.Redis, outcome: str, n: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return int((await state(client)).get(outcome, 0)) >= n

    return check


async def test_each_alert_is_posted_once_after_a_failure_and_a_restart_neither_posts_again_nor_skips(
    redis_client: aioredis.Redis, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    got: list[tuple[str, dict[str, object]]] = []

    async def handler(request: web.Request) -> web.Response:
        got.append((request.headers["X-Wikipulse-Alert-Id"], orjson.loads(await request.read())))
        return web.Response(status=500 if len(got) == 1 else 200)  # the first post fails, the rest succeed

    await raise_alert(redis_client, "old.wikipedia.org", 60)  # raised before the webhook was set up: not sent
    async with receiver(handler) as url:
        s = dataclasses.replace(settings, alert_webhook=url, backoff_cap=0.05, lease_ttl=1.0)
        task = asyncio.create_task(AlertWebhook(s, redis_client).run())
        await wait_for(lambda: _has_position(redis_client), 10, "the poster's first position", task)
        await raise_alert(redis_client, "en.wikipedia.org", 120)
        await raise_alert(redis_client, "de.wikipedia.org", 180)
        await wait_for(counted(redis_client, "delivered", 2), 10, "two alerts delivered", task)
        await stop(task)
        first, second = [e[0].decode() for e in await redis_client.xrange(keys.ALERTS)][1:]
        assert [i for i, _ in got] == [first, first, second]  # the first retried after its 500, each delivered once
        body = got[1][1]
        assert body["domain"] == "en.wikipedia.org" and body["minute"] == 120 and body["id"] == first
        assert body["text"] == describe(body)
        # Stopped, another alert is raised; a restarted poster sends it, and only it.
        await raise_alert(redis_client, "fr.wikipedia.org", 240)
        task = asyncio.create_task(AlertWebhook(s, redis_client).run())
        await wait_for(counted(redis_client, "delivered", 3), 10, "the third alert delivered", task)
        await asyncio.sleep(0.3)  # time to post anything else it (wrongly) would
        await stop(task)
    assert [b["domain"] for _, b in got] == ["en.wikipedia.org", "en.wikipedia.org", "de.wikipedia.org", "fr.wikipedia.org"]
    assert (await state(redis_client)).get("failed", "0") == "0"
    assert "secret-token" not in caplog.text and "Traceback" not in caplog.text  # a webhook's path is its secret


async def test_a_hanging_webhook_times_out_is_counted_and_the_fold_goes_on(
    redis_client: aioredis.Redis, settings: Settings, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The whole subscriber, as `subscribe` runs it with ALERT_WEBHOOK set: while the webhook hangs, events are folded."""
    monkeypatch.setattr(webhook, "TIMEOUT", 1.5)
    monkeypatch.setattr(webhook, "ATTEMPTS", 2)
    hanging = asyncio.Event()
    posts = 0

    async def handler(request: web.Request) -> web.Response:
        nonlocal posts
        posts += 1
        hanging.set()
        await asyncio.sleep(3600)
        return web.Response()

    caplog.set_level(logging.INFO, "wikipulse")
    async with receiver(handler) as url:
        s = dataclasses.replace(settings, alert_webhook=url, backoff_cap=0.05)
        task = asyncio.create_task(run_subscriber(s))
        await wait_for(lambda: _has_position(redis_client), 10, "the poster's first position", task)
        await raise_alert(redis_client, "en.wikipedia.org", 120)
        await asyncio.wait_for(hanging.wait(), 5)
        lines = calibrated_lines()[:2000]
        await load_stream(redis_client, lines, with_fold=True)
        folded = len([line for line in lines if b'"canary"' not in line])

        async def all_folded() -> bool:
            return int(await redis_client.hget(keys.SUBSCRIBER_STATS, "folded") or 0) == folded

        await wait_for(all_folded, 20, "every event folded while the webhook hangs", task)
        assert (await state(redis_client)).get("failed", "0") == "0"  # still waiting on the webhook meanwhile
        await wait_for(counted(redis_client, "failed", 1), 10, "the alert given up after its timeouts", task)
        await stop(task)
    assert posts == 2
    assert "could not be posted" in caplog.text and "no answer within 1.5s" in caplog.text and "Traceback" not in caplog.text
    assert int((await state(redis_client)).get("delivered", "0")) == 0


async def test_a_refused_post_is_not_asked_again(redis_client: aioredis.Redis, settings: Settings) -> None:
    posts = 0

    async def handler(request: web.Request) -> web.Response:
        nonlocal posts
        posts += 1
        return web.Response(status=400, text="bad payload")

    async with receiver(handler) as url:
        task = asyncio.create_task(AlertWebhook(dataclasses.replace(settings, alert_webhook=url, backoff_cap=0.05), redis_client).run())
        await wait_for(lambda: _has_position(redis_client), 10, "the poster's first position", task)
        await raise_alert(redis_client, "en.wikipedia.org", 120)
        await wait_for(counted(redis_client, "failed", 1), 10, "the refused alert counted", task)
        await stop(task)
    assert posts == 1


def test_the_body_and_the_setting() -> None:
    body = body_of("1-0", orjson.dumps({"domain": "en.wikipedia.org", "minute": 3600, "rate": 600, "baseline": 40.0}))
    assert body is not None and orjson.loads(body) == {
        "domain": "en.wikipedia.org", "minute": 3600, "rate": 600, "baseline": 40.0, "id": "1-0",
        "text": "spike on en.wikipedia.org: 600 events/min at 01:00 UTC, usually 40.0",
    }  # fmt: skip
    assert body_of("1-0", b"not json") is None and body_of("1-0", b"[1]") is None and body_of("1-0", None) is None
    assert Settings.from_args(environ={"ALERT_WEBHOOK": "https://hooks.example.org/x"}).alert_webhook == "https://hooks.example.org/x"
    for bad in ("ftp://example.org/x", "hooks.example.org", "http://:80/x", "http://example.org:port/"):
        with pytest.raises(SettingsError, match="alert_webhook"):
            Settings.from_args(environ={"ALERT_WEBHOOK": bad})


async def _has_position(client: aioredis.Redis) -> bool:
    return bool(await client.hget(keys.ALERT_WEBHOOK_STATE, "position"))
