"""Retrying after Redis or network trouble, and stopping when asked to, for every long-running loop."""

from __future__ import annotations

import asyncio
import contextlib
import random

from redis.asyncio.connection import Connection
from redis.exceptions import AskError, ClusterError, OutOfMemoryError, RedisError, ResponseError, SlotNotCoveredError, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

# What passes: Redis down or unreachable, and on a cluster a master down or restarting (CLUSTERDOWN, TRYAGAIN, no node
# for a slot) or a slot that moved (MOVED/ASK on a connection of our own: connect.refresh, then a new connection).
REDIS_ERRORS = (
    RedisConnectionError, RedisTimeoutError, ConnectionError, OSError, ClusterError, TryAgainError, SlotNotCoveredError, AskError,
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
    """Sleep before a retry, unless this task has been asked to stop (see stop_if_cancelled)."""
    stop_if_cancelled()
    await asyncio.sleep(delay)


async def drop(connection: Connection) -> None:
    """Close without waiting for the peer (a TLS close can wait for seconds). It runs in `finally`
    blocks while a task is cancelled: an error here would replace the cancellation, and the
    process would go on instead of stopping."""
    with contextlib.suppress(RedisError, OSError):
        await connection.disconnect(nowait=True)
