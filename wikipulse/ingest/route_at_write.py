"""The epoch of the routes' copier's set of routes (keys.ROUTES_EPOCH), by which the publisher's writes copy their
batches to the routes themselves on one Redis (route_inline.lua).

The copier deletes it before it changes its set of routes (a route declared, removed or declared again, with the
catch-up of a new one), and sets a new one after: a write sent with the plan from before copies nothing, so no write
moves the copier's group past what a change has not copied yet.
"""

from __future__ import annotations

import contextlib
from dataclasses import replace

import orjson
from redis.exceptions import ResponseError

from wikipulse.ingest.route_reader import CONSUMER, ReadPlan
from wikipulse.store import keys
from wikipulse.store.connect import Client
from wikipulse.store.retry import REDIS_ERRORS


class WriteEpoch:
    """The copier's side of the writes' copies: the epoch in Redis, and the plan the writes are given."""

    def __init__(self, client: Client, token: str) -> None:
        self.client, self.token = client, token
        self.taken = 0  # the sets of routes this copier took up: each has an epoch of its own

    @property
    def epoch(self) -> str:
        return f"{self.token}:{self.taken}"

    async def stop(self, plan: ReadPlan) -> ReadPlan:
        """Before the copier changes its set of routes: from now on, a write copies nothing."""
        await self.client.delete(keys.ROUTES_EPOCH)
        return replace(plan, at_write=b"")

    async def start(self, plan: ReadPlan) -> ReadPlan:
        """The plan with what the publisher's write needs to copy its batches itself when the group stands at the end of
        the stream, under a new epoch, set in Redis. A plan with nothing to copy in Redis (a cluster) is left as it is."""
        if not plan.targets:
            return plan
        self.taken += 1
        token, _ttl, maxlen, keep, grace = plan.copy_args
        at_write = {"epoch": self.epoch, "token": token, "group": keys.ROUTES_GROUP, "consumer": CONSUMER, "maxlen": maxlen,
                    "keep": keep, "grace": grace, "filters": orjson.loads(plan.filters)}  # fmt: skip
        await self.client.set(keys.ROUTES_EPOCH, self.epoch)
        return replace(plan, at_write=orjson.dumps(at_write))

    async def lost(self, plan: ReadPlan) -> bool:
        """Whether Redis no longer holds the epoch the writes copy by (deleted by another copier that took over for a
        while, or by hand): the set is then taken up anew, else the writes would never copy again."""
        return bool(plan.at_write) and await self.client.get(keys.ROUTES_EPOCH) != self.epoch.encode()

    async def forget(self, plan: ReadPlan) -> None:
        """When the copier lets go of its routes (their leases' release fences the writes as well)."""
        if plan.at_write:
            with contextlib.suppress(*REDIS_ERRORS, ResponseError):
                await self.client.delete(keys.ROUTES_EPOCH)
