"""Routing the ingest stream to the shard streams (sharded layouts only: keys.Layout), exactly once.

The publisher's batch stays one atomic script in one slot: it writes the ingest stream. The router reads that
stream with a consumer group of its own and copies each entry, with its original id and fields, to the stream of
its domain's shard (keys.Layout.shard_of), then acknowledges it on the ingest stream.

Why this holds through any crash: a shard stream accepts an explicit id only when it is greater than its last one,
so copying an entry again (a restart re-reads its pending entries) is refused, and counted as `duplicates`, not
added twice. For that to drop nothing, each shard stream must be written in id order by one router at a time: the
router holds a lease on every shard (in the shard's slot), and each shard's script is fenced by it; a router reads
its own pending entries first, in order, and a batch's shards are written before the next batch is read.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Sequence

import orjson
from redis.exceptions import ResponseError

from wikipulse import keys
from wikipulse.connect import Client
from wikipulse.events import Accepted, validate
from wikipulse.fold import parse_summary
from wikipulse.lease import FENCE_LUA, Lease, LeaseLost, fenced_error, new_token
from wikipulse.retry import REDIS_ERRORS, Backoff, RedisFull, is_full, pause_before_retry
from wikipulse.settings import Settings
from wikipulse.streams import Entry, StreamReader
from wikipulse.trimming import TRIM_LUA

logger = logging.getLogger(__name__)

CONSUMER = "router"  # one router at a time (the leases), so one name: a restarted router finds its pending entries
_DATA, _FOLD = keys.DATA_FIELD.encode(), keys.FOLD_FIELD.encode()

# KEYS: the shard stream, the shard's router stats, the shard's router lease. ARGV: lease token, ttl ms, stream
# maxlen, then the entries as one blob of their ids, fields and values end to end, and a JSON array that cuts it:
# per entry its number of field/value items, the id's length, then each item's length. (One blob, not an ARGV item
# per id, field and value: packing those cost the router 15 µs an entry, half its time.) Returns {added, duplicates,
# group, trimmed unread, ...}. An id not above the stream's last one was added before (the ids come in order): skipped.
ROUTE_SCRIPT = (
    FENCE_LUA
    + TRIM_LUA
    + """
local holder = fence(KEYS[3], ARGV[1], ARGV[2])
if holder then return redis.error_reply('WPLEASE ' .. holder) end
local blob, cut = ARGV[4], cjson.decode(ARGV[5])
local added, dups, i, at = 0, 0, 1, 1
while i <= #cut do
  local n = cut[i]
  local args = {'XADD', KEYS[1]}
  for j = i + 1, i + 1 + n do
    args[#args + 1] = string.sub(blob, at, at + cut[j] - 1)
    at = at + cut[j]
  end
  local reply = redis.pcall(unpack(args))
  if type(reply) == 'table' and reply.err then
    if not string.find(reply.err, 'equal or smaller', 1, true) then return reply end
    dups = dups + 1
  else
    added = added + 1
  end
  i = i + 2 + n
end
if added > 0 then redis.call('HINCRBY', KEYS[2], 'routed', added) end
if dups > 0 then redis.call('HINCRBY', KEYS[2], 'duplicates', dups) end
local reply = {added, dups}
for _, v in ipairs(trim(KEYS[1], tonumber(ARGV[3]), KEYS[2])) do reply[#reply + 1] = v end
return reply
"""
)


def domain_of(fields: list[bytes], max_bytes: int) -> str | None:
    """The domain an entry is folded under: from its fold summary (the publisher's entries), else its JSON."""
    if len(fields) == 4 and fields[2] == _FOLD:
        obs = parse_summary(fields[3])
        if obs is not None:
            return obs[0]
    named = dict(zip(fields[::2], fields[1::2], strict=False))
    if _FOLD in named:
        obs = parse_summary(named[_FOLD])
        if obs is not None:
            return obs[0]
    verdict = validate(named.get(_DATA, b""), max_bytes)
    return verdict.event["meta"]["domain"] if isinstance(verdict, Accepted) else None


def split(entries: Sequence[Entry], layout: keys.Layout, max_bytes: int) -> tuple[dict[int, list[Entry]], int]:
    """{shard index: its entries, in stream order}, and how many entries were trimmed before they were routed.
    An entry whose domain cannot be told goes to shard 0, whose subscriber counts it as rejected."""
    by_shard: dict[int, list[Entry]] = {}
    trimmed = 0
    for entry in entries:
        fields = entry[1]
        if fields is None:
            trimmed += 1
            continue
        domain = domain_of(fields, max_bytes)
        shard = layout.shard_of(domain).index if domain is not None else 0
        by_shard.setdefault(shard, []).append(entry)
    return by_shard, trimmed


def pack_entries(entries: Sequence[Entry]) -> tuple[bytes, bytes]:
    """ROUTE_SCRIPT's blob of the entries' ids, fields and values, and the JSON array that cuts it (pure)."""
    items: list[bytes] = []
    cut: list[int] = []
    for entry_id, fields in entries:
        if fields is None:
            continue  # trimmed before it was routed: split() counts it
        items.append(entry_id)
        items += fields
        cut.append(len(fields))
        cut.append(len(entry_id))
        cut += map(len, fields)
    return b"".join(items), orjson.dumps(cut)


class Router:
    def __init__(self, settings: Settings, client: Client, layout: keys.Layout) -> None:
        self.settings, self.client, self.layout = settings, client, layout
        token = new_token()
        self.leases = [Lease(client, shard.router_lease, settings.lease_ttl, token) for shard in layout.all_shards]
        self._script = client.register_script(ROUTE_SCRIPT)
        self.backoff = Backoff(settings.backoff_cap)
        self.totals: Counter[str] = Counter()
        self.reported: dict[str, int] = {}

    async def ensure_group(self) -> None:
        try:
            await self.client.xgroup_create(self.layout.stream, self.layout.router_group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def run(self) -> None:
        """Route until cancelled; Redis outages, a full Redis and a lost lease are waited out."""
        keepers: list[asyncio.Task[None]] = []
        try:
            while True:
                try:
                    await self.ensure_group()
                    if not keepers:
                        for lease in self.leases:
                            await lease.wait_until_held(f"the router's lease on {lease.key}")
                        keepers = [asyncio.create_task(lease.keep()) for lease in self.leases]
                        logger.info("routing %s to %d shard streams", self.layout.stream, len(self.leases))
                    await self._route()
                except REDIS_ERRORS as exc:
                    delay = self.backoff.next_delay()
                    logger.warning("router: Redis unavailable (%s); retrying in %.1fs", exc, delay)
                    await pause_before_retry(delay)
                except LeaseLost as exc:
                    logger.error("router: %s; it wrote nothing since, and waits for the leases again", exc)
                    for task in keepers:
                        task.cancel()
                    keepers = []
                except (RedisFull, ResponseError) as exc:
                    if not (isinstance(exc, RedisFull) or is_full(exc)):
                        if "NOGROUP" not in str(exc):
                            raise
                        continue
                    delay = self.backoff.next_delay()
                    logger.error("router: Redis is full (%s): routing paused, the entries stay pending; retrying in %.1fs", exc, delay)
                    await pause_before_retry(delay)
        finally:
            for task in keepers:
                task.cancel()
            for lease in self.leases:
                await lease.release()

    async def _route(self) -> None:
        """Own pending entries first (a restart's), then new ones; each batch routed whole before the next is read."""
        s = self.settings
        reader = StreamReader(self.client, self.layout.stream, self.layout.router_group, CONSUMER)
        cursor = "0"
        count = s.batch_size * 10
        try:
            await reader.send(cursor, count, None)
            while True:
                entries, _ = await reader.receive()
                if not entries:
                    cursor = ">"
                    await reader.send(cursor, count, 1000)
                    continue
                if cursor != ">":
                    cursor = entries[-1][0].decode()
                await reader.send(cursor, count, None if cursor != ">" else 1000)  # Redis reads the next batch meanwhile
                await self.route(entries)
                self.backoff.reset()
        finally:
            await reader.close()

    async def route(self, entries: Sequence[Entry]) -> None:
        by_shard, trimmed = split(entries, self.layout, self.settings.max_event_bytes)
        shards = self.layout.all_shards
        replies = await asyncio.gather(*(self._write(shards[i], part) for i, part in by_shard.items()))
        pipe = self.client.pipeline(transaction=False)
        pipe.xack(self.layout.stream, self.layout.router_group, *[e[0] for e in entries])
        if trimmed:
            # Delivered to the router, then trimmed from the ingest stream before it routed them (it was down).
            pipe.hincrby(shards[0].router_stats, "trimmed", trimmed)
            logger.error("router: %d entries were trimmed from %s before they were routed", trimmed, self.layout.stream)
        await pipe.execute()
        for added, duplicates in replies:
            self.totals.update(routed=added, duplicates=duplicates)
        self.totals["trimmed"] += trimmed

    async def _write(self, shard: keys.Shard, entries: list[Entry]) -> tuple[int, int]:
        lease = self.leases[shard.index]
        blob, cut = pack_entries(entries)
        args = [lease.token, lease.ttl_ms, self.settings.stream_maxlen, blob, cut]
        script_keys = [shard.stream, shard.router_stats, shard.router_lease]
        try:
            reply = await self._script(keys=script_keys, args=args)
        except ResponseError as exc:
            raise fenced_error(exc, f"another router ({{holder}}) holds the lease on shard {shard.index}") from exc
        added, duplicates, *grew = reply
        for group, total in zip(grew[::2], grew[1::2], strict=True):
            name = group.decode() if isinstance(group, bytes) else str(group)
            if self.reported.get(name) != int(total):
                logger.error("shard %d: %d entries were trimmed before group %r read them (STREAM_MAXLEN)", shard.index, int(total), name)
                self.reported[name] = int(total)
        return int(added), int(duplicates)
