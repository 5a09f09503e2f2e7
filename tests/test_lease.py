"""Leases against a real Redis: one live holder, stand-by, and a holder that died on this host taken over at once."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys

import redis
import redis.asyncio as aioredis

from wikipulse.store.lease import Lease, died_here


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_which_holders_count_as_gone() -> None:
    host = socket.gethostname()
    assert died_here(f"{host}:{dead_pid()}:abcd")
    assert died_here(f"{host}:{os.getpid()}:not-one-of-ours")  # this pid's earlier life (a restarted container)
    assert not died_here(f"{host}:{os.getppid()}:abcd")  # running
    assert not died_here(f"other-host:{dead_pid()}:abcd")  # another host: only its lease's expiry tells
    assert not died_here("garbage")


async def test_one_holder_at_a_time_and_a_dead_one_is_taken_over_at_once(redis_client: aioredis.Redis) -> None:
    first, second = Lease(redis_client, "lease", ttl=60), Lease(redis_client, "lease", ttl=60)
    assert await first.try_acquire() is None
    assert await second.try_acquire() == first.token  # held by a live process (this one): wait
    assert await first.try_acquire() is None  # renewing is fine
    await first.release()
    assert await second.try_acquire() is None
    killed = f"{socket.gethostname()}:{dead_pid()}:cafe"
    await redis_client.set("other", killed, px=60_000)  # a process killed with -9, its lease 60 s from lapsing
    assert await Lease(redis_client, "other", ttl=60).try_acquire() is None


async def test_two_leases_of_one_process_taking_one_key_at_once_leave_one_holder(redis_client: aioredis.Redis) -> None:
    """The second take can read the first's fresh token before the first has heard its answer: it must not judge a
    token of this very process dead (died_here) and take the lease over. Before, both held it within 300 tries here."""
    import asyncio

    for attempt in range(300):
        first, second = (Lease(redis_client, f"wp:test:race:{attempt}", ttl=5) for _ in range(2))
        answers = await asyncio.gather(first.try_acquire(), second.try_acquire())
        assert sorted(a is None for a in answers) == [False, True], (attempt, answers)
        await first.release()
        await second.release()


async def test_a_renewal_that_loses_the_cancellation_still_stops(redis_client: aioredis.Redis) -> None:
    """A cancellation can be lost inside a Redis call (redis-py turns it into a connection error: store/retry.py's
    stop_if_cancelled). The renewal loop, which goes on after Redis errors, must stop all the same: else the process
    hangs at SIGTERM (seen: a publisher that did not stop in 30 s)."""
    lease = Lease(redis_client, "wp:test:lease", 0.3)
    assert await lease.try_acquire() is None
    real, entered = lease.try_acquire, asyncio.Event()

    async def losing_the_cancellation() -> str | None:
        entered.set()
        try:
            await asyncio.sleep(1)  # the call on its way when the stop comes
            return await real()
        except asyncio.CancelledError:
            raise redis.exceptions.ConnectionError("Connection closed by server.") from None

    lease.try_acquire = losing_the_cancellation  # type: ignore[method-assign]
    keeper = asyncio.create_task(lease.keep())
    await asyncio.wait_for(entered.wait(), 5)
    keeper.cancel()
    done, _ = await asyncio.wait([keeper], timeout=2)
    assert keeper in done and keeper.cancelled()
