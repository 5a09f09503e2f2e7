"""The subscriber's name in its consumer group, held by one live process at a time.

Two processes with one name would each take the other's in-flight entries for their own pending ones and fold
them twice; so a name is held with a lease (store/lease.py), and the apply script is fenced by it (series.py).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Iterator

from wikipulse.core.settings import SubscriberSettings
from wikipulse.store import keys
from wikipulse.store.connect import Client
from wikipulse.store.lease import Lease, LeaseLost

logger = logging.getLogger(__name__)

MAX_NAME_SUFFIX = 1000


def default_consumers() -> Iterator[str]:
    """Default consumer names, in the order tried: the host name (stable across restarts on one host, so
    a restarted subscriber finds its own pending entries), then host-2, host-3, ... for a second live
    subscriber on the same host: each name is held by one live process (its lease)."""
    host = socket.gethostname()
    yield host
    for n in range(2, MAX_NAME_SUFFIX):
        yield f"{host}-{n}"


class ConsumerName:
    """The consumer name of one shard's fold, and its lease while this process holds it."""

    def __init__(self, settings: SubscriberSettings, client: Client, shard: keys.Shard) -> None:
        self.client, self.shard = client, shard
        self.group, self.configured, self.ttl = settings.group, settings.consumer, settings.lease_ttl
        self.consumer = settings.consumer or next(default_consumers())  # the name until one is taken (pub/sub: for good)
        self.lease: Lease | None = None  # while this process holds the name (take)
        self.keeper: asyncio.Task[None] | None = None  # renews the lease

    @property
    def fence(self) -> tuple[str, int]:
        """(token, ttl ms) the apply script checks the name's lease by; ('', 0) while none is held: no check."""
        return (self.lease.token, self.lease.ttl_ms) if self.lease is not None else ("", 0)

    async def take(self) -> bool:
        """Hold a consumer name no other live process holds: the configured one (standing by while another
        process holds it), else the first free default one. False when one was held already."""
        if self.lease is not None:
            return False
        group = self.group
        if self.configured:
            name = self.configured
            lease = Lease(self.client, self.shard.consumer_lease(group, name), self.ttl)
            await lease.wait_until_held(f"consumer name {name!r} in group {group!r}")
        else:
            for name in default_consumers():
                lease = Lease(self.client, self.shard.consumer_lease(group, name), self.ttl)
                if await lease.try_acquire() is None:
                    break
            else:
                raise LeaseLost(f"every default consumer name up to {name!r} is held by a live process")
        logger.info("consumer name %s (group %s) on %s", name, group, self.shard.stream)
        self.lease, self.consumer = lease, name
        self.keeper = asyncio.create_task(lease.keep())
        return True

    def lost(self) -> None:
        """Another process took the name over (a fenced write said so): not ours to release any more."""
        self.lease = None

    async def give_up(self) -> None:
        if self.keeper is not None:
            self.keeper.cancel()
            self.keeper = None
        if self.lease is not None:
            await self.lease.release()
            self.lease = None
