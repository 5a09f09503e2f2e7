"""Routing the ingest stream to the shard streams (sharded layouts only: keys.Layout), exactly once.

The publisher's batch stays one atomic script in one slot: it writes the ingest stream. The router reads that
stream with a consumer group of its own and copies each entry, with its original id and fields, to the stream of
its domain's shard (keys.Layout.shard_of), then acknowledges it on the ingest stream.

Why this holds through any crash: a shard stream accepts an explicit id only when it is greater than its last one,
so copying an entry again (a restart re-reads its pending entries) is refused, and counted as `duplicates`, not
added twice. For that to drop nothing, each shard stream must be written in id order by one router at a time: the
router holds a lease on every shard (in the shard's slot), and each shard's write (a MULTI/EXEC) is fenced by it; a router reads
its own pending entries first, in order, and a batch's shards are written before the next batch is read.

And through a failover (replication is asynchronous): a batch is copied only once a replica of the ingest stream's
master has it (consumer.StreamConsumer, confirm), and acknowledged on the ingest stream only once a replica of each shard
stream's master has its copy (ShardWriter's WAIT): a master that dies can take a copy or an ack with it, never one
without the other being redone.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Sequence
from typing import Any, Protocol

from redis.exceptions import ResponseError

from wikipulse.core.events import Accepted, validate
from wikipulse.core.settings import PublisherSettings
from wikipulse.core.summary import parse_summary
from wikipulse.store import keys
from wikipulse.store.connect import Client, NodeConnection, ReplicaWait, pack
from wikipulse.store.consumer import Handler, StreamConsumer
from wikipulse.store.lease import Lease, LeaseLost, fenced_error, new_token
from wikipulse.store.scripts import script
from wikipulse.store.streams import Entry, ReadBatch
from wikipulse.store.trimming import CREATE_GROUPS_SCRIPT, declared_groups

logger = logging.getLogger(__name__)

CONSUMER = "router"  # one router at a time (the leases), so one name: a restarted router finds its pending entries
_DATA, _FOLD = keys.DATA_FIELD.encode(), keys.FOLD_FIELD.encode()

# Trims a shard stream and counts what each group lost (trimming.py). KEYS: the stream, the shard's router stats.
# ARGV: maxlen, keep, grace ms. Returns {group, trimmed unread so far, ...} for the groups that lost entries now.
TRIM_SCRIPT = script(__package__, "trim_shard", "trim")  # trims a shard stream: trim_shard.lua


class Target(Protocol):
    """What a ShardWriter writes: a stream, the lease that fences its writer, the hash its trimming counts in, all in one
    slot (keys.Shard; keys.Route for the routes' copier, routes.py)."""

    @property
    def stream(self) -> str: ...
    @property
    def router_lease(self) -> str: ...
    @property
    def router_stats(self) -> str: ...


class ShardWriter:
    """Writes one shard's part of a batch in one MULTI/EXEC on a connection of its own to the shard's master, fenced by
    the router's lease on the shard: WATCH the lease, check it is ours (or lapsed), then renew it, create a new shard
    stream with its consumer groups (trimming.py), XADD every entry with its id, trim, EXEC. Another router that took
    the lease meanwhile makes EXEC abort; a lease held by another raises LeaseLost. Within the transaction an XADD whose
    id is not above the stream's last is refused alone (it was written before) while the others go on: that is the
    idempotence. Plain XADDs cost Redis ~1.6 µs an entry; the same in a Lua script cost ~7.8 (bench/bench_cluster.py's
    router figures). On a cluster with replicas, a WAIT follows the EXEC in the same round trip: the write returns
    once a replica has the copy (connect.ReplicaWait)."""

    def __init__(
        self, client: Client, shard: Target, lease: Lease, settings: PublisherSettings, name: str = "", groups: Sequence[str] | None = None
    ) -> None:
        """`groups`: the consumer groups a new stream comes with (default: those the deployment runs on a shard stream;
        a route's stream has none of its own: its readers make theirs)."""
        self.shard, self.lease = shard, lease
        self.name = name or (f"shard {shard.index}" if isinstance(shard, keys.Shard) else shard.stream)  # for messages
        self.trim_args = (settings.stream_maxlen, settings.stream_keep, int(settings.stream_grace * 1000))
        self.groups = list(groups) if groups is not None else declared_groups(settings, shard.stream, sharded=True)
        self._node = NodeConnection(client, shard.stream)
        self.replicas = ReplicaWait(client, shard.stream)

    async def write(self, entries: Sequence[Entry]) -> tuple[int, int, list[Any]]:
        """(added, duplicates, trim's reply). Raises LeaseLost, RedisFull, or a Redis error (the connection is dropped:
        the transaction was applied whole or not at all, and the batch is routed again; ReplicaBehind: applied, not yet
        on a replica, and routed again, as duplicates, until a replica confirms it)."""
        try:
            for _ in range(MAX_ABORTS):
                wanted = await self.replicas.wanted()
                reply, confirmed = await self._try(entries, wanted)
                await self.replicas.check(wanted, confirmed)
                if reply is not None:
                    return self._count(reply)
            raise LeaseLost(f"the lease on {self.name} kept changing during {MAX_ABORTS} writes")
        except BaseException:
            await self._node.drop()
            raise

    async def _try(self, entries: Sequence[Entry], wanted: int) -> tuple[list[Any] | None, int]:
        """(EXEC's reply or None when the lease changed after WATCH, how many replicas confirmed it: WAIT's answer)."""
        conn, key, token = self._node.connection, self.shard.router_lease, self.lease.token
        await conn.send_packed_command(pack(("WATCH", key)) + pack(("GET", key)))
        await conn.read_response()
        holder = await conn.read_response()
        if holder is not None and holder.decode() != token:
            await conn.send_packed_command(pack(("UNWATCH",)))
            await conn.read_response()
            raise LeaseLost(f"another router ({holder.decode()}) holds the lease on {self.name}")
        commands = [pack(("MULTI",)), pack(("SET", key, token, "PX", self.lease.ttl_ms))]
        commands += [pack(("EVAL", CREATE_GROUPS_SCRIPT, 1, self.shard.stream, *self.groups))]
        commands += [pack(("XADD", self.shard.stream, entry_id, *fields)) for entry_id, fields in entries if fields is not None]
        commands += [pack(("EVAL", TRIM_SCRIPT, 2, self.shard.stream, self.shard.router_stats, *self.trim_args)), pack(("EXEC",))]
        await conn.send_packed_command(b"".join(commands) + (self.replicas.command(wanted) if wanted else b""))
        queued_error: ResponseError | None = None
        for _ in range(len(commands) - 1):  # OK, then QUEUED each; a command refused here (OOM) makes EXEC refuse all
            try:
                await conn.read_response()
            except ResponseError as exc:
                queued_error = queued_error or exc
        try:
            reply = await conn.read_response()
        except ResponseError as exc:
            raise fenced_error(queued_error or exc, "") from exc
        confirmed = int(await conn.read_response()) if wanted else 0
        return (None if reply is None else list(reply)), confirmed  # None: the lease changed after WATCH (EXEC aborted)

    async def close(self) -> None:
        await self._node.drop()

    def _count(self, reply: list[Any]) -> tuple[int, int, list[Any]]:
        added = duplicates = 0
        for result in reply[2:-1]:  # after the SET and the groups' creation: the XADDs
            if isinstance(result, ResponseError):
                if "equal or smaller" not in str(result):
                    raise result
                duplicates += 1
            else:
                added += 1
        return added, duplicates, list(reply[-1])


MAX_ABORTS = 10  # our own lease keeper renewing between WATCH and EXEC aborts a write now and then: try again


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


class Router(Handler):
    """The ingest stream's consumer (consumer.StreamConsumer, confirming each batch on a replica before it is routed)."""

    doing = "routing"

    def __init__(self, settings: PublisherSettings, client: Client, layout: keys.Layout) -> None:
        self.settings, self.client, self.layout = settings, client, layout
        token = new_token()
        self.leases = [Lease(client, shard.router_lease, settings.lease_ttl, token) for shard in layout.all_shards]
        self.writers = [ShardWriter(client, shard, lease, settings) for shard, lease in zip(layout.all_shards, self.leases, strict=True)]
        self.keepers: list[asyncio.Task[None]] = []
        self.totals: Counter[str] = Counter()
        self.reported: dict[str, int] = {}
        # From the ingest stream's first entry; a new stream is created with every declared group (trimming.py).
        declared = declared_groups(settings, layout.stream, sharded=True)
        self.consumer = StreamConsumer(client, layout.stream, layout.router_group, CONSUMER, log=logger, what="router",
                                       declared=declared, count=settings.read_batch_size, backoff_cap=settings.backoff_cap,
                                       confirm=True)  # fmt: skip

    async def ensure_group(self) -> None:
        await self.consumer.ensure_group()

    async def run(self) -> None:
        """Route until cancelled; Redis outages, a full Redis and a lost lease are waited out."""
        try:
            await self.consumer.run(self)
        finally:
            self._stop_keepers()
            await self.close()
            for lease in self.leases:
                await lease.release()

    async def begin(self) -> None:
        if not self.keepers:
            for lease in self.leases:
                await lease.wait_until_held(f"the router's lease on {lease.key}")
            self.keepers = [asyncio.create_task(lease.keep()) for lease in self.leases]
            logger.info("routing %s to %d shard streams", self.layout.stream, len(self.leases))

    async def handle(self, batch: ReadBatch) -> None:
        """Own pending entries first (a restart's), then new ones; each batch routed whole before the next is read."""
        if batch.entries:
            await self.route(batch.entries)

    async def end(self) -> None:
        await self.close()

    async def failed(self, error: Exception) -> bool:
        if not isinstance(error, LeaseLost):
            return False
        logger.error("router: %s; it wrote nothing since, and waits for the leases again", error)
        self._stop_keepers()
        return True

    def _stop_keepers(self) -> None:
        for task in self.keepers:
            task.cancel()
        self.keepers = []

    async def close(self) -> None:
        """Drop the shard writers' connections (each transaction was applied whole or not at all)."""
        for writer in self.writers:
            await writer.close()

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
        added, duplicates, grew = await self.writers[shard.index].write(entries)
        if added or duplicates:
            await self.client.hincrby(shard.router_stats, "routed", added)  # counters only: not part of the guarantee
            if duplicates:
                await self.client.hincrby(shard.router_stats, "duplicates", duplicates)
        for group, total in zip(grew[::2], grew[1::2], strict=True):
            name = group.decode() if isinstance(group, bytes) else str(group)
            if self.reported.get(name) != int(total):
                logger.error("shard %d: %d entries were trimmed before group %r read them (STREAM_MAXLEN)", shard.index, int(total), name)
                self.reported[name] = int(total)
        return added, duplicates
