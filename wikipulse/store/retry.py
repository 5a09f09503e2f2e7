"""Retrying after Redis or network trouble, and stopping when asked to, for every long-running loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time

from redis.asyncio.connection import Connection
from redis.exceptions import AskError, ClusterError, OutOfMemoryError, RedisError, ResponseError, SlotNotCoveredError, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError


class ReplicaBehind(Exception):
    """On a cluster, no replica of a master confirmed a write in time (connect.ReplicaWait): what depends on it waits."""


# What passes: Redis down or unreachable, and on a cluster a master down or restarting (CLUSTERDOWN, TRYAGAIN, no node
# for a slot), a slot that moved (MOVED/ASK on a connection of our own: connect.refresh, then a new connection), or a
# replica that has not confirmed a write yet.
REDIS_ERRORS = (
    RedisConnectionError, RedisTimeoutError, ConnectionError, OSError, ClusterError, TryAgainError, SlotNotCoveredError, AskError,
    ReplicaBehind,
)  # fmt: skip


class RedisFull(Exception):
    """Redis refused a write: maxmemory reached (with noeviction, as wikipulse requires)."""


def is_full(error: Exception) -> bool:
    """An OOM refusal: redis-py's OutOfMemoryError for a command, or a script's error that wraps `-OOM`."""
    return isinstance(error, OutOfMemoryError) or (isinstance(error, ResponseError) and "OOM command not allowed" in str(error))


def backoff_delay(attempt: int, cap: float, base: float = 0.5, rng: random.Random | None = None) -> float:
    """Exponential backoff with full jitter: uniform(0, min(cap, base * 2**attempt))."""
    return (rng or random).uniform(0, min(cap, base * 2 ** min(attempt, 32)))


class Backoff:
    """Waits between retries: exponential with full jitter over *consecutive* failures. A round that
    made progress (a feed connection that delivered events, a Redis round trip that worked) calls
    reset(), so a routine reconnect (the live feed closes every connection after ~15 minutes) waits
    as little as the first failure, not near the cap."""

    def __init__(self, cap: float, base: float = 0.5) -> None:
        self.cap, self.base = cap, base
        self.failures = 0

    def next_delay(self, extra: int = 0, cap: float | None = None) -> float:
        """The wait before the next try (`extra` doublings on top, e.g. for a throttled client)."""
        delay = backoff_delay(self.failures + extra, self.cap if cap is None else cap, self.base)
        self.failures += 1
        return delay

    def reset(self) -> None:
        self.failures = 0


class Outage:
    """What a retry loop says about Redis: one line when it became unavailable and one when it is back (how long it was
    gone, how many retries), the retries between them at DEBUG: a failover is a few seconds of retries, one event. Still
    unavailable a minute on, it says so again."""

    REPEAT = 60.0

    def __init__(self, log: logging.Logger, what: str) -> None:
        self.log, self.what = log, what
        self.since: float | None = None
        self._said, self.retries = 0.0, 0

    def failed(self, error: BaseException, delay: float) -> None:
        now = time.monotonic()
        reason = f"{type(error).__name__}: {error}"
        if self.since is None:
            self.since, self._said, self.retries = now, now, 0
            self.log.warning("%s: Redis unavailable (%s); retrying until it is back", self.what, reason)
        elif now - self._said >= self.REPEAT:
            self._said = now
            self.log.warning("%s: Redis still unavailable after %.0fs (%s)", self.what, now - self.since, reason)
        else:
            self.log.debug("%s: Redis unavailable (%s); retrying in %.1fs", self.what, reason, delay)
        self.retries += 1

    def over(self) -> None:
        """Redis answered again (the loop made progress)."""
        if self.since is not None:
            self.log.warning("%s: Redis is back after %.1fs (%d retries)", self.what, time.monotonic() - self.since, self.retries)
            self.since = None


def stop_if_cancelled() -> None:
    """Raise CancelledError if this task has been asked to stop. Long-running loops call it each
    round, because a cancellation can be lost on its way: on Python 3.11 an `asyncio.timeout` entered
    while a cancel is pending turns it into a TimeoutError, which redis-py's connection check
    (`can_read_destructive`, a zero timeout) then swallows; and cleanup that fails while a task is
    cancelled replaces the CancelledError with its own error. `Task.cancelling()` still counts it."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def pause_before_retry(delay: float) -> None:
    """Sleep before a retry, or before the next round of a loop that goes on after Redis errors (a lease's renewal, a
    periodic check), unless this task has been asked to stop (see stop_if_cancelled): else a cancellation lost in a
    Redis call leaves the loop running, and the process does not stop at SIGTERM."""
    stop_if_cancelled()
    await asyncio.sleep(delay)


async def drop(connection: Connection) -> None:
    """Close without waiting for the peer (a TLS close can wait for seconds). It runs in `finally`
    blocks while a task is cancelled: an error here would replace the cancellation, and the
    process would go on instead of stopping."""
    with contextlib.suppress(RedisError, OSError):
        await connection.disconnect(nowait=True)
