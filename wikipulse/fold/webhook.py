"""Spike alerts reach people: each alert of keys.ALERTS is POSTed once, as JSON, to ALERT_WEBHOOK.

It runs in the subscriber's process beside the folds and never in their way: a task of its own with its own HTTP
session, reading the alerts stream only. One poster at a time over every process (its lease). It keeps its position
(the last alert handled) in Redis, written in one script with the lease check, so a restart or a takeover neither
posts again what was handled nor skips what was raised meanwhile. The one window left: a crash (or Redis failing)
after a post returned and before its position was written posts that alert once more; the `id` in the body (and the X-Wikipulse-Alert-Id
header) lets a receiver drop it. A post that fails is retried with backoff, ATTEMPTS in all, each within `timeout`
seconds; one that still fails, or is refused (a 4xx but 408 and 429), is logged and counted as `failed`, and the
poster goes on to the next alert: a dead webhook must not hold back every alert after it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson
from redis.exceptions import ResponseError

from wikipulse.core.settings import SubscriberSettings
from wikipulse.store import keys
from wikipulse.store.connect import Client
from wikipulse.store.lease import Lease, LeaseLost, fenced_error
from wikipulse.store.retry import REDIS_ERRORS, Backoff, RedisFull, pause_before_retry, stop_if_cancelled
from wikipulse.store.scripts import script

logger = logging.getLogger(__name__)

ATTEMPTS = 5  # posts of one alert at most
TIMEOUT = 10.0  # seconds one post may take, connecting included
BLOCK_MS = 5000  # how long one read of the alerts stream waits for a new alert
RETRIED = (408, 429)  # refusals worth asking again (with any 5xx)

STORE_SCRIPT = script(__package__, "webhook_store", "fence")  # stores the position, fenced: webhook_store.lua


def site(url: str) -> str:
    """Where a webhook URL points, for logs: a webhook's path is often its secret (Slack's, Mattermost's)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}{f':{parts.port}' if parts.port else ''}/…"


def describe(alert: dict[str, Any]) -> str:
    """One line for people (chat webhooks show `text`)."""
    minute = alert.get("minute")
    at = time.strftime("%H:%M UTC", time.gmtime(minute)) if isinstance(minute, (int, float)) else "?"
    return f"spike on {alert.get('domain')}: {alert.get('rate')} events/min at {at}, usually {alert.get('baseline')}"


def body_of(entry_id: str, raw: Any) -> bytes | None:
    """The JSON posted for one alert entry: the alert, its id and a line of text; None if the entry is not an alert."""
    try:
        alert = orjson.loads(raw)
    except (orjson.JSONDecodeError, TypeError):
        return None
    if not isinstance(alert, dict):
        return None
    return orjson.dumps({**alert, "id": entry_id, "text": describe(alert)})


class AlertWebhook:
    def __init__(self, settings: SubscriberSettings, client: Client, attempts: int | None = None, timeout: float | None = None) -> None:
        self.url, self.client = settings.alert_webhook, client
        self.attempts = ATTEMPTS if attempts is None else attempts
        self.timeout = TIMEOUT if timeout is None else timeout
        self.backoff_cap = settings.backoff_cap
        self.lease = Lease(client, keys.ALERT_WEBHOOK_LEASE, settings.lease_ttl)
        self._store = client.register_script(STORE_SCRIPT)

    async def run(self) -> None:
        """Until cancelled: hold the lease, post every new alert, ride through Redis outages."""
        backoff = Backoff(self.backoff_cap)
        async with aiohttp.ClientSession() as session:
            try:
                while True:
                    try:
                        await self.lease.wait_until_held("the alert webhook lease (one poster at a time)")
                        keeper = asyncio.create_task(self.lease.keep())
                        try:
                            await self.post_alerts(session, backoff)
                        finally:
                            keeper.cancel()
                    except (*REDIS_ERRORS, RedisFull) as exc:  # the position is kept: the alert is posted after it
                        delay = backoff.next_delay()
                        logger.warning("alert webhook: Redis unavailable or full (%s); retrying in %.1fs", exc, delay)
                        await pause_before_retry(delay)
                    except LeaseLost as exc:
                        logger.error("alert webhook: %s; standing by", exc)
            finally:
                await self.lease.release()

    async def position(self) -> str:
        """Where this poster goes on from: the stored position, else (the first start) after the newest alert, so a
        webhook set up on a running deployment is not sent the alerts of the past."""
        stored = await self.client.hget(keys.ALERT_WEBHOOK_STATE, "position")
        if stored:
            return _text(stored)
        newest = await self.client.xrevrange(keys.ALERTS, count=1)
        start = _text(newest[0][0]) if newest else "0-0"
        await self.store(start, "")
        return start

    async def store(self, position: str, counter: str) -> None:
        try:
            await self._store(
                keys=[keys.ALERT_WEBHOOK_STATE, keys.ALERT_WEBHOOK_LEASE],
                args=[self.lease.token, self.lease.ttl_ms, position, counter, time.time()],
            )
        except ResponseError as exc:
            raise fenced_error(exc, "another process ({holder}) holds the alert webhook lease") from exc

    async def post_alerts(self, session: aiohttp.ClientSession, backoff: Backoff) -> None:
        at = await self.position()
        logger.info("alert webhook: posting spike alerts to %s", site(self.url))
        while True:
            stop_if_cancelled()
            reply = await self.client.xread({keys.ALERTS: at}, count=10, block=BLOCK_MS)
            backoff.reset()
            for _, entries in reply or []:
                for raw_id, fields in entries:
                    entry_id = _text(raw_id)
                    outcome = await self.post(session, entry_id, fields.get(b"alert", fields.get("alert")))
                    await self.store(entry_id, outcome)
                    at = entry_id

    async def post(self, session: aiohttp.ClientSession, entry_id: str, raw: Any) -> str:
        """`delivered` or `failed` (logged): the alert posted, with retries."""
        body = body_of(entry_id, raw)
        if body is None:
            logger.error("alert webhook: entry %s of %s is not an alert (not a JSON object): skipped, counted as failed", entry_id,
                         keys.ALERTS)  # fmt: skip
            return "failed"
        headers = {"Content-Type": "application/json", "X-Wikipulse-Alert-Id": entry_id}
        backoff = Backoff(self.backoff_cap)
        problem = ""
        for attempt in range(1, self.attempts + 1):
            try:
                async with session.post(self.url, data=body, headers=headers, timeout=aiohttp.ClientTimeout(total=self.timeout)) as resp:
                    await resp.read()
                    status = resp.status
            except TimeoutError:
                problem = f"no answer within {self.timeout:g}s"
            except aiohttp.ClientError as exc:
                problem = f"{type(exc).__name__}: {exc}"
            else:
                if 200 <= status < 300:
                    return "delivered"
                problem = f"HTTP {status}"
                if status < 500 and status not in RETRIED:
                    break  # refused: asking again gets the same answer
            if attempt < self.attempts:
                delay = backoff.next_delay()
                logger.warning("alert webhook: post %d of alert %s failed (%s); again in %.1fs", attempt, entry_id, problem, delay)
                await pause_before_retry(delay)
        logger.error("alert webhook: alert %s could not be posted to %s (%s): given up, counted as failed", entry_id, site(self.url),
                     problem)  # fmt: skip
        return "failed"


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
