"""Leases: one live process per role and name (one publisher per feed, one subscriber per consumer name).

A lease is a Redis string holding its holder's token (host, pid, a random part) with a time to live,
renewed well before it lapses. A process that finds the lease held by another waits (it stands by)
and takes over when the holder stops renewing it (it stopped or died). The writes that must not come
from two processes at once check the lease inside their own atomic script (fencing), so a holder
that stalled past its lease cannot write after another took over.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from wikipulse.store.retry import REDIS_ERRORS, RedisFull, is_full, pause_before_retry
from wikipulse.store.scripts import lua

logger = logging.getLogger(__name__)

DEFAULT_TTL = 10.0  # seconds; a process that died holds its lease at most this long

TAKE_SCRIPT = lua(__package__, "lease_take")
RELEASE_SCRIPT = lua(__package__, "lease_release")
LEASE_LOST = "WPLEASE"  # the error a fenced script (fence.lua) answers with, followed by the holder's token


class LeaseLost(Exception):
    """Another process holds the lease this one needs; the message names it."""


_HELD: set[str] = set()  # tokens of this process's live leases (several roles may run in one process)


def new_token() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


def died_here(holder: str) -> bool:
    """Whether a holder's token names a process on this host that is gone: then a restart after kill -9
    need not wait out the lease. Its pid is not running, or it is this process's own pid (a restarted
    container reuses pid 1) with a token this process does not hold. Anything else counts as alive."""
    host, _, rest = holder.partition(":")
    pid_text = rest.partition(":")[0]
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return holder not in _HELD
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # running, as another user
    return False


class Lease:
    def __init__(self, client: aioredis.Redis, key: str, ttl: float = DEFAULT_TTL, token: str | None = None) -> None:
        self.client, self.key, self.ttl = client, key, ttl
        self.token = token or new_token()
        self._take = client.register_script(TAKE_SCRIPT)
        self._release = client.register_script(RELEASE_SCRIPT)

    @property
    def held(self) -> bool:
        """Whether this process holds the lease, as far as it knows (its last take or renewal said so)."""
        return self.token in _HELD

    @property
    def ttl_ms(self) -> int:
        return max(1, int(self.ttl * 1000))

    async def try_acquire(self) -> str | None:
        """Take or renew the lease: None when it is ours, else the other holder's token."""
        # Held before the take answers: another lease of this process that reads this fresh token in between must not
        # judge its holder dead (died_here) and take the lease over.
        held = self.token in _HELD
        _HELD.add(self.token)
        try:
            holder = _text(await self._take(keys=[self.key], args=[self.token, self.token, self.ttl_ms]))
            if holder != self.token and died_here(holder):
                logger.info("lease %s: its holder %s is no longer running on this host; taking it over", self.key, holder)
                holder = _text(await self._take(keys=[self.key], args=[holder, self.token, self.ttl_ms]))
        except BaseException:
            if not held:  # no answer: as it was
                _HELD.discard(self.token)
            raise
        if holder != self.token:
            _HELD.discard(self.token)
            return holder
        return None

    async def wait_until_held(self, what: str) -> None:
        """Stand by until the lease is ours, saying so once (and again every minute)."""
        said = -1e9
        while (holder := await self.try_acquire()) is not None:
            now = asyncio.get_running_loop().time()
            if now - said >= 60:
                logger.warning("%s is held by another live process (%s): standing by until it stops", what, holder)
                said = now
            await asyncio.sleep(self.ttl / 3)
        if said > -1e9:
            logger.warning("%s: taken over (the other process stopped)", what)

    async def keep(self) -> None:
        """Renew the lease every third of its time to live, until cancelled. A renewal that finds it
        taken logs so; the fenced writes are what stop this process from writing after that."""
        reported: str | None = None
        while True:
            await pause_before_retry(self.ttl / 3)
            try:
                holder = await self.try_acquire()
            except REDIS_ERRORS as exc:
                logger.debug("could not renew lease %s (%s); the next write re-takes it if it lapsed", self.key, exc)
                continue
            except ResponseError as exc:
                if not is_full(exc):
                    raise
                # A full Redis refuses the renewal as it refuses the writes, which say so and wait: this waits too.
                logger.debug("could not renew lease %s: Redis is full; the next write re-takes it if it lapsed", self.key)
                continue
            if holder is not None and holder != reported:
                logger.warning("lease %s was taken by %s while this process held it", self.key, holder)
            reported = holder

    async def release(self) -> None:
        _HELD.discard(self.token)
        with contextlib.suppress(*REDIS_ERRORS):
            await self._release(keys=[self.key], args=[self.token])


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def fenced_error(error: Exception, lost: str) -> Exception:
    """What a fenced script's error means: Redis is full (RedisFull), the lease is another process's (LeaseLost,
    `lost` with `{holder}` filled in), or anything else (the error itself)."""
    if is_full(error):
        return RedisFull(str(error))
    text = str(error)
    if text.startswith(LEASE_LOST + " "):
        return LeaseLost(lost.format(holder=text.split(" ", 1)[1]))
    return error
