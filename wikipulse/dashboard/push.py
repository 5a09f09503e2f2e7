"""Server push: the page moves when the data moves, not on a timer.

The subscriber announces every applied batch on keys.NOTICES (apply.lua). A dashboard process holds one
Redis subscription to it (NoticeHub), whatever the number of open pages, and each socket's push loop (socket_push.py)
waits on the hub and sends its pages the update over the socket (view_updates.py: computed once per view and
version): a page costs no Redis read per event, and nothing at all while nothing happens. Bursts are coalesced: a
page is pushed to at most once per MIN_PUSH_GAP. The hub admits pages up to a cap per process and per client address.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
import time
from collections import Counter, deque
from typing import Any

import orjson
import redis.asyncio as aioredis

from wikipulse.store import keys
from wikipulse.store.retry import REDIS_ERRORS, Backoff, pause_before_retry

logger = logging.getLogger(__name__)

MIN_PUSH_GAP = 0.25  # seconds between two pokes of one page: at most 4 refreshes a second, however busy the feed
SILENCE_CHECK = 5.0  # seconds without a notice before the hub PINGs its connection (a dead one is replaced)
IDLE_STOP = 10.0  # seconds the hub keeps its subscription once the last page closed
MOVED_KEPT = 1024  # notices remembered for moved_since: a page further behind gets a whole refresh


class NoticeHub:
    """One subscription to the notice channel per process, fanned out to every open page.

    `state` is (version, redis_up): version grows with every notice, and once more whenever the subscription is
    (re)established, so a page that waited through an outage refreshes on recovery. `moved_since` tells a refresh
    which buckets moved since the version its page shows (`mark`), so it can send only those."""

    def __init__(self, redis_url: str, channel: str = keys.NOTICES, max_pages: int = 2000, max_pages_per_address: int = 100) -> None:
        self.redis_url, self.channel = redis_url, channel
        self.max_pages, self.max_pages_per_address = max_pages, max_pages_per_address
        self.by_address: Counter[str] = Counter()  # open pages by client address
        self.refused = 0  # pages refused a push by the caps (they poll)
        self.epoch = secrets.token_hex(4)  # versions of another process (or an earlier run) mean nothing here
        self.version = 0
        self._moved: deque[tuple[int, float]] = deque(maxlen=MOVED_KEPT)  # (version, earliest bucket moved)
        self.redis_up = True
        self.pages = 0  # open pushed pages (the metrics read it)
        self._changed: asyncio.Event | None = None
        self.woken = 0  # times the pages were woken
        self._woken_at = -math.inf
        self._wake_due: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopper: asyncio.TimerHandle | None = None

    @property
    def state(self) -> tuple[int, bool]:
        return self.version, self.redis_up

    @property
    def subscribed(self) -> bool:
        return self._task is not None and not self._task.done()

    def admit(self, address: str) -> bool:
        """Whether one more page from `address` may be pushed to (then page_opened), within the caps."""
        if self.pages >= self.max_pages or self.by_address[address] >= self.max_pages_per_address:
            self.refused += 1
            if self.refused == 1 or self.refused % 1000 == 0:
                logger.warning("refused a page's push (%d so far): %d pages open, %d from %s", self.refused, self.pages,
                               self.by_address[address], address)  # fmt: skip
            return False
        return True

    def page_opened(self, address: str = "") -> None:
        self.pages += 1
        self.by_address[address] += 1
        if self._stopper is not None:
            self._stopper.cancel()
            self._stopper = None
        if not self.subscribed:  # none, or one being let go (_stop_if_idle): another, at once
            self._changed = self._changed or asyncio.Event()  # the same one: no waiter is left on a forgotten event
            self._task = asyncio.get_running_loop().create_task(self._listen(), name="wikipulse-notice-hub")

    def page_closed(self, address: str = "") -> None:
        self.pages -= 1
        self.by_address[address] -= 1
        if not self.by_address[address]:
            del self.by_address[address]
        if self.pages == 0 and self._stopper is None:
            self._stopper = asyncio.get_running_loop().call_later(IDLE_STOP, self._stop_if_idle)

    @property
    def mark(self) -> str:
        """Where the data stood, for a page to hand back to moved_since."""
        return f"{self.epoch}:{self.version}"

    def moved_since(self, mark: Any) -> float | None:
        """The earliest bucket any notice after `mark` moved (inf: none moved), or None when that is not known: a
        mark of another process, notices forgotten or without a bucket, a resubscription in between."""
        epoch, _, version = str(mark).partition(":")
        now, entries = self.version, tuple(self._moved)  # a copy: refreshes may run in worker threads
        if epoch != self.epoch or not (version.isascii() and version.isdigit() and len(version) <= 18) or int(version) > now:
            return None
        seen = int(version)
        moved = [since for v, since in entries if seen < v <= now]
        if len(moved) < now - seen:
            return None
        return min(moved, default=math.inf)

    async def wait(self, woken: int, timeout: float | None = None) -> int:
        """Wait until the pages are woken after wake `woken` (the count the caller saw last), or `timeout` seconds;
        the count now. Pages are woken once per change of state, at most every MIN_PUSH_GAP: a burst is one push."""
        if self.woken == woken and self._changed is not None:
            if timeout is None:
                await self._changed.wait()  # no timer: a thousand waiting pages cost nothing
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), timeout)
        return self.woken

    def _announce(self, since: float = -math.inf) -> None:
        """A new version: `since` is the earliest bucket it moved (-inf: anything may have)."""
        self.version += 1
        if since == -math.inf:
            self._moved.clear()  # nothing before this can be patched from
        else:
            self._moved.append((self.version, since))
        if self._changed is None or self._wake_due is not None:
            return
        delay = self._woken_at + MIN_PUSH_GAP - time.monotonic()
        if delay > 0:
            self._wake_due = asyncio.get_running_loop().call_later(delay, self._wake)
        else:
            self._wake()

    def _wake(self) -> None:
        self._wake_due, self._woken_at = None, time.monotonic()
        self.woken += 1
        if self._changed is not None:
            self._changed.set()
            self._changed = asyncio.Event()

    def _set_up(self, up: bool) -> None:
        if up != self.redis_up:
            self.redis_up = up
            logger.warning("notices: Redis is %s", "back" if up else "unavailable; resubscribing")
            self._announce()

    def _stop_if_idle(self) -> None:
        """IDLE_STOP after the last page closed. A timer, not a task, and the subscription is forgotten as it is
        cancelled: no moment remains at which a page opens, sees it still held, and waits on it as it closes."""
        self._stopper = None
        if self.pages == 0 and self._task is not None:
            self._task.cancel()  # it closes its connection by itself
            self._task = None

    async def _listen(self) -> None:
        backoff = Backoff(5.0)
        while True:
            # A plain client even on a cluster: classic PUBLISH reaches every node.
            client = aioredis.Redis.from_url(self.redis_url, socket_connect_timeout=5, socket_timeout=SILENCE_CHECK * 2)
            try:
                async with client.pubsub() as pubsub:
                    await pubsub.subscribe(self.channel)
                    self._set_up(True)
                    self._announce()  # (re)subscribed: what happened meanwhile is unknown, so every page refreshes
                    backoff.reset()
                    while True:
                        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=SILENCE_CHECK)
                        if message is None:
                            await pubsub.ping()  # a quiet channel: prove the connection is alive
                        elif message.get("type") == "message":
                            self._announce(moved_from(message.get("data")))
            except Exception as exc:  # not only Redis's (a reply redis-py cannot handle): every page waits on this task
                self._set_up(False)
                delay, level = backoff.next_delay(), logging.DEBUG if isinstance(exc, REDIS_ERRORS) else logging.ERROR
                logger.log(level, "notice subscription lost (%s: %s); subscribing again in %.1fs", type(exc).__name__, exc, delay)
                await pause_before_retry(delay)
            finally:
                with contextlib.suppress(*REDIS_ERRORS):
                    await client.aclose()


def moved_from(data: Any) -> float:
    """The earliest bucket a notice says it moved; -inf when it does not say (an older subscriber)."""
    try:
        since = orjson.loads(data).get("from")
    except (orjson.JSONDecodeError, TypeError, AttributeError):
        return -math.inf
    return float(since) if isinstance(since, int) and not isinstance(since, bool) else -math.inf
