"""Writing the publisher's batches into Redis: one atomic, fenced Lua script call a batch.

A batch's events go to the stream (XADD) and the channel (PUBLISH) together with the dedup window, the SSE
position and the counters, so the stored position never runs ahead of or behind what was written. The call
is fenced by the publisher's lease, checks the dedup window itself (two writers cannot add an event twice),
trims the stream and counts what a consumer group lost to it (trimming.py).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import NamedTuple

import orjson
from redis.exceptions import ResponseError

from wikipulse.core.events import parse_dt
from wikipulse.core.settings import PublisherSettings
from wikipulse.store import keys
from wikipulse.store.connect import Client
from wikipulse.store.lease import FENCE_LUA, Lease, fenced_error
from wikipulse.store.retry import REDIS_ERRORS
from wikipulse.store.trimming import TRIM_LUA, declared_groups

# KEYS: stream, seen zset, position, stats hash, rejected list, lease.
# ARGV: channel, stream maxlen, dedup window, JSON {"fold", "ids", "position", "counters", "status", "rejected", "keep",
#       "groups", "stream_keep", "grace_ms"},
#       lease token, lease ttl ms, then the raw event frames. The frames go as plain ARGV items (no
#       re-encoding on either side); one script call costs the client one command to pack instead of two
#       per event. `fold` holds each frame's fold summary (keys.FOLD_FIELD), `ids` its meta.id ('' if none), `groups`
#       the consumer groups a new stream is created with (trimming.declared_groups).
# A full Redis refuses the whole call: Redis refuses a deny-oom command only while a script has written
# nothing yet, and the first write here is the lease's SET (fence); the PUBLISHes come after every
# XADD, so a full Redis can never publish frames that the stream then does not hold. The dedup window is checked here,
# not only in this process's memory, so that two writers (a takeover, a second publisher by mistake)
# cannot add an event twice; the lease fences out a publisher that lost it.
# Returns {written, duplicates, 1 if a position was stored before, group, trimmed unread, group, ...}
# (see trimming.TRIM_LUA): no stored position where this process wrote one means Redis lost its data.
# `after` is the position this process stored last (null: none it knows of). Another one stored means Redis lost this
# process's last batches, and kept what came before them: a failover to a replica they had not reached yet. The call
# then writes nothing and answers WPBEHIND <stored>: the publisher reads the feed again from there (its events of
# those batches were in no stream, so nothing doubles), instead of going on from its own position past them.
WRITE_SCRIPT = (
    FENCE_LUA
    + TRIM_LUA
    + """
local holder = fence(KEYS[6], ARGV[5], ARGV[6])
if holder then return redis.error_reply('WPLEASE ' .. holder) end
local channel, maxlen, window = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local p = cjson.decode(ARGV[4])
local stored = redis.call('GET', KEYS[3])
if stored and p['after'] ~= cjson.null and stored ~= p['after'] then return redis.error_reply('WPBEHIND ' .. stored) end
local folds, ids = p['fold'], p['ids']
create_groups(KEYS[1], p['groups'])
local written, zadd, dups = {}, {}, 0
local had_position = redis.call('EXISTS', KEYS[3])
-- Which ids the window holds already: one ZMSCORE per 1,000 (a ZSCORE per event cost ~8% of the throughput).
local named, seen = {}, {}
for _, id in ipairs(ids) do if id ~= '' then named[#named + 1] = id end end
for i = 1, #named, 1000 do
  local scores = redis.call('ZMSCORE', KEYS[2], unpack(named, i, math.min(i + 999, #named)))
  for j = 1, #scores do if scores[j] then seen[named[i + j - 1]] = true end end
end
for i = 7, #ARGV do
  local id = ids[i - 6]
  if id ~= '' and seen[id] then
    dups = dups + 1
  else
    local entry = redis.call('XADD', KEYS[1], '*', 'data', ARGV[i], 'fold', folds[i - 6])
    written[#written + 1] = ARGV[i]
    if id ~= '' then
      zadd[#zadd + 1] = string.match(entry, '^%d+')
      zadd[#zadd + 1] = id
      if #zadd >= 1000 then redis.call('ZADD', KEYS[2], unpack(zadd)); zadd = {} end
    end
  end
end
if #zadd > 0 then redis.call('ZADD', KEYS[2], unpack(zadd)) end
redis.call('ZREMRANGEBYRANK', KEYS[2], 0, -(window + 1))
for _, frame in ipairs(written) do redis.call('PUBLISH', channel, frame) end
if p['position'] ~= cjson.null then redis.call('SET', KEYS[3], p['position']) end
if #written > 0 then redis.call('HINCRBY', KEYS[4], 'published', #written) end
if dups > 0 then redis.call('HINCRBY', KEYS[4], 'duplicates', dups) end
for name, n in pairs(p['counters']) do redis.call('HINCRBY', KEYS[4], name, n) end
for name, v in pairs(p['status']) do redis.call('HSET', KEYS[4], name, v) end
for _, r in ipairs(p['rejected']) do redis.call('LPUSH', KEYS[5], r) end
if #p['rejected'] > 0 then redis.call('LTRIM', KEYS[5], 0, tonumber(p['keep']) - 1) end
local reply = {#written, dups, had_position}
for _, v in ipairs(trim(KEYS[1], maxlen, KEYS[4], tonumber(p['stream_keep']), tonumber(p['grace_ms']))) do reply[#reply + 1] = v end
return reply
"""
)


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
class Batch:
    frames: list[bytes] = field(default_factory=list)
    folds: list[str] = field(default_factory=list)  # fold.summarize of each frame
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


class BatchWriter:
    def __init__(
        self,
        settings: PublisherSettings,
        client: Client,
        lease: Lease,
        publisher_keys: keys.PublisherKeys = keys.UNSHARDED_PUBLISHER,
        sharded: bool = False,
    ) -> None:
        self.settings, self.lease = settings, lease
        k = publisher_keys
        self._keys = [settings.stream, k.seen, k.position, k.stats, k.rejected, k.lease]
        self._script = client.register_script(WRITE_SCRIPT)
        self._groups = declared_groups(settings, settings.stream, sharded)

    async def write(self, batch: Batch, now: float, after: str | None = None) -> Written:
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
        args = [s.channel, s.stream_maxlen, s.dedup_window, orjson.dumps(payload), self.lease.token, self.lease.ttl_ms, *batch.frames]
        try:
            reply = await self._script(keys=self._keys, args=args)
        except REDIS_ERRORS as exc:  # first: on a cluster, CLUSTERDOWN and TRYAGAIN are ResponseErrors too
            raise RedisDown(f"{type(exc).__name__}: {exc}") from exc
        except ResponseError as exc:
            if str(exc).startswith(BEHIND + " "):
                raise WritesLost(str(exc).split(" ", 1)[1]) from None
            raise fenced_error(exc, "another publisher ({holder}) holds the lease") from exc
        written, duplicates, had_position, *grew = reply
        groups = {(g.decode() if isinstance(g, bytes) else str(g)): int(n) for g, n in zip(grew[::2], grew[1::2], strict=True)}
        return Written(int(written), int(duplicates), bool(had_position), groups)
