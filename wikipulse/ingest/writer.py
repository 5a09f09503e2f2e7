"""Writing the publisher's batches into Redis: one atomic, fenced Lua script call a batch.

A batch's events go to the stream (XADD) and the channel (PUBLISH) together with the dedup window, the SSE
position and the counters, so the stored position never runs ahead of or behind what was written. The call
is fenced by the publisher's lease, checks the dedup window itself (two writers cannot add an event twice),
trims the stream and counts what a consumer group lost to it (trimming.py). Given the routes' copier's plan (one Redis),
the same call copies the batch to the routes while the copier keeps up (route_inline.lua, docs/routes.md).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import orjson
from redis.exceptions import ResponseError

from wikipulse.core.events import parse_dt
from wikipulse.core.settings import PublisherSettings
from wikipulse.ingest.route_filters import LUA_KINDS
from wikipulse.ingest.route_reader import Copied, ReadPlan, copied_of
from wikipulse.store import keys
from wikipulse.store.connect import Client
from wikipulse.store.lease import Lease, fenced_error
from wikipulse.store.retry import REDIS_ERRORS
from wikipulse.store.scripts import script
from wikipulse.store.trimming import declared_groups

# Its KEYS, ARGV and reply: write.lua; it copies to the routes as the copier's read does (route_judge, route_copy).
WRITE_SCRIPT = LUA_KINDS + script(__package__, "write", "fence", "trim", own=("route_judge", "route_copy", "route_inline"))


class RedisDown(Exception):
    """A write could not reach Redis; the message says why."""


class WritesLost(Exception):
    """Redis holds an older position than the one this process stored last: it lost the batches since (a failover to
    a replica they had not reached). Nothing of this batch was written; the feed is read again from the stored one."""

    def __init__(self, stored: str) -> None:
        super().__init__(f"Redis holds the position {stored[:200]}, older than the one this publisher stored last")
        self.stored = stored


BEHIND = "WPBEHIND"  # the write script's answer when Redis lost this process's last batches (WritesLost)


@dataclass
class IngestBatch:
    """The publisher's next write: validated frames, their fold summaries and their ids (one script call)."""

    frames: list[bytes] = field(default_factory=list)
    folds: list[str] = field(default_factory=list)  # summary.summarize of each frame
    ids: list[str] = field(default_factory=list)  # meta.id of each frame, '' if it has none
    counters: Counter[str] = field(default_factory=Counter)
    rejected: list[bytes] = field(default_factory=list)
    last_id: str | None = None
    last_dt: str | None = None
    taken: int = 0
    started: float = 0.0


class Written(NamedTuple):
    written: int  # events added (the others were in the dedup window already)
    duplicates: int
    had_position: bool  # a position was stored before: if this process stored one, its absence means Redis lost data
    trimmed_unread: dict[str, int]  # {group: entries trimmed unread so far} for the groups that lost entries now
    routed: Copied | None = None  # what the write copied to the routes itself (the copier's plan), by route


class BatchWriter:
    def __init__(
        self,
        settings: PublisherSettings,
        client: Client,
        lease: Lease,
        publisher_keys: keys.PublisherKeys = keys.UNSHARDED_PUBLISHER,
        sharded: bool = False,
        routes: Callable[[], ReadPlan] = ReadPlan,
    ) -> None:
        """`routes`: the routes' copier's current plan (route_copier.py), at each write."""
        self.settings, self.lease, self.routes = settings, lease, routes
        k = publisher_keys
        self._keys = [settings.stream, k.seen, k.position, k.stats, k.rejected, k.lease]
        self._script = client.register_script(WRITE_SCRIPT)
        self._groups = declared_groups(settings, settings.stream, sharded)

    async def write(self, batch: IngestBatch, now: float, after: str | None = None) -> Written:
        """`after`: the position this process stored last (None: unknown). Raises RedisDown, RedisFull (retry.py),
        LeaseLost (lease.py) or WritesLost; else the batch was written whole."""
        s = self.settings
        status: dict[str, str | float] = {"updated_at": now}
        if batch.frames:
            status["last_publish_at"] = now
        if batch.last_dt is not None:
            status["last_event_dt"] = batch.last_dt
            dt = parse_dt(batch.last_dt)
            if dt is not None:
                status["lag_seconds"] = round(now - dt, 3)
        payload = {
            "fold": batch.folds,
            "ids": batch.ids,
            "position": batch.last_id,
            "after": after,
            "counters": {name: n for name, n in batch.counters.items() if n},
            "status": status,
            "rejected": [r.decode() for r in batch.rejected],
            "keep": keys.REJECTED_KEEP,
            "groups": self._groups,
            "stream_keep": s.stream_keep,
            "grace_ms": int(s.stream_grace * 1000),
        }
        routes = self.routes()
        plan, routes_keys = (routes.at_write, [keys.ROUTES_EPOCH, *routes.targets]) if routes.at_write else (b"", [])
        args = [s.channel, s.stream_maxlen, s.dedup_window, orjson.dumps(payload), self.lease.token, self.lease.ttl_ms, plan, *batch.frames]
        try:
            reply = await self._script(keys=[*self._keys, *routes_keys], args=args)
        except REDIS_ERRORS as exc:  # first: on a cluster, CLUSTERDOWN and TRYAGAIN are ResponseErrors too
            raise RedisDown(f"{type(exc).__name__}: {exc}") from exc
        except ResponseError as exc:
            if str(exc).startswith(BEHIND + " "):
                raise WritesLost(str(exc).split(" ", 1)[1]) from None
            raise fenced_error(exc, "another publisher ({holder}) holds the lease") from exc
        written, duplicates, had_position, routed, *grew = reply
        groups = {(g.decode() if isinstance(g, bytes) else str(g)): int(n) for g, n in zip(grew[::2], grew[1::2], strict=True)}
        return Written(int(written), int(duplicates), bool(had_position), groups, copied_of(routes.names, routed))
