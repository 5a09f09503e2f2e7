"""Which domains get series of their own: at most `max_domains`, first come first served.

The feed has about 900 active domains. A flood of made-up ones (every one a valid host
name) would otherwise create keys faster than expiry removes them. Admission is recorded
in Redis (keys.DOMAINS), so it survives restarts and is shared by every subscriber; each
process caches the answers, so only a batch that brings a domain never seen before costs
a round trip.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable

import redis.asyncio as aioredis

from wikipulse.fold.fold import FoldKey
from wikipulse.store import keys
from wikipulse.store.scripts import lua

ADMIT_SCRIPT = lua(__package__, "admit")  # admits domains up to a cap: admit.lua


class DomainGate:
    def __init__(self, client: aioredis.Redis, max_domains: int) -> None:
        self.max_domains = max_domains
        self._script = client.register_script(ADMIT_SCRIPT)
        self._admitted: set[str] = set()
        self._refused: set[str] = set()

    async def admit(self, domains: Iterable[str]) -> set[str]:
        """The subset of `domains` that may have series of their own."""
        wanted = dict.fromkeys(domains)  # in order of appearance: first come, first served
        unknown = [d for d in wanted if d not in self._admitted and d not in self._refused]
        if unknown:
            if len(self._refused) > self.max_domains * 10:
                self._refused.clear()  # the cache of refusals is bounded too; Redis stays the truth
            reply = await self._script(keys=[keys.DOMAINS], args=[self.max_domains, int(time.time()), *unknown])
            got = {d.decode() if isinstance(d, bytes) else d for d in reply}
            self._admitted |= got
            self._refused.update(d for d in unknown if d not in got)
        return {d for d in wanted if d in self._admitted}

    async def route(self, classes: Counter[FoldKey]) -> tuple[Counter[FoldKey], int]:
        """The classes with the domains over the cap folded into keys.OTHER_DOMAINS, and how many events that moved."""
        admitted = await self.admit(key[0] for key in classes)
        if all(key[0] in admitted for key in classes):
            return classes, 0
        routed: Counter[FoldKey] = Counter()
        overflow = 0
        for (domain, t, kind, bot, namespace), n in classes.items():
            if domain not in admitted:
                domain = keys.OTHER_DOMAINS
                overflow += n
            routed[(domain, t, kind, bot, namespace)] += n
        return routed, overflow
