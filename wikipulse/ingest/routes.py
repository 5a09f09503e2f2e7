"""Routes: named slices of the feed, each kept as a durable stream and a pub/sub channel of its own (keys.Route).

`python -m wikipulse route add NAME --where FIELD=V1,V2 ...` stores a definition in Redis (keys.ROUTES); the copier,
in the publisher's process, reads the ingest stream with its own consumer group (keys.ROUTES_GROUP; the read is a
script that hands over only the entries some route may want, READ_SCRIPT) and copies each entry a route's filter
holds for, with its original id and fields, to the route's stream, then PUBLISHes its JSON on the route's channel.
The filter is evaluated on the entry's fold summary (no JSON parse): values in one --where are alternatives, several
--where must all hold.

Exactly once into each route's stream, across kill -9, by the router's rules and its writer (router.ShardWriter): a
stream accepts an explicit id only above its last, so an entry copied again (a restart re-reads its pending entries) is
refused and counted as a duplicate; each route's stream is written in id order by one copier at a time (the copier's
lease, and a lease per route that fences each MULTI/EXEC), and a batch is written to every route before it is
acknowledged. The channel is pub/sub's at-most-once: published after the write, only what the write added.

A route starts where the ingest stream ended when it was declared (`start`; 0 with --from-stream) and holds only what
came after. The group exists only while routes do (an idle group would count as trimmed unread), and is made at the
earliest route's start, so it delivers all they may hold. A route declared while the group exists is caught up from its
start to where the stream ends then (XRANGE), and from there copied with the group's batches (what they bring up to
that point is skipped). `live` in the route's counters records that it needs no catch-up (for that definition's token),
so a restart does not scan again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import orjson
from redis.exceptions import ResponseError

from wikipulse.core.errors import SettingsError
from wikipulse.core.events import CANARY_DOMAIN, Accepted, is_valid_domain, validate
from wikipulse.core.settings import PublisherSettings, RedisSettings
from wikipulse.core.summary import MAX_NAMESPACE, observe, summarize
from wikipulse.ingest.router import ShardWriter
from wikipulse.store import keys
from wikipulse.store.connect import Client, SyncClient, pack, raw_connection, refresh
from wikipulse.store.lease import Lease, LeaseLost, new_token
from wikipulse.store.retry import REDIS_ERRORS, Backoff, Outage, RedisFull, drop, is_full, pause_before_retry
from wikipulse.store.streams import Entry

logger = logging.getLogger(__name__)

CONSUMER = "routes"  # one copier at a time (its lease), so one name: a restarted copier finds its pending entries
POLL_INTERVAL = 2.0  # seconds between reads of the definitions: a change takes effect within about this
CATCH_UP_CHUNK = 5000
GATHER = 0.1  # seconds the copier lets entries gather after a short batch: routes lag the stream by about this
NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,39}")
FIELDS = ("domain", "type", "bot", "namespace")  # what the fold summary tells
MAX_VALUES = 200  # alternatives in one --where
MAX_CLAUSES = 8
_DATA, _FOLD = keys.DATA_FIELD.encode(), keys.FOLD_FIELD.encode()
_INDEX = {"domain": 0, "type": 2, "bot": 3, "namespace": 4}  # in a Head
_KINDS, _WHO = frozenset(kind.encode() for kind in keys.EVENT_TYPES), frozenset((b"bot", b"human"))

# KEYS: the definitions. ARGV: name, definition, cap. Refuses an existing name or one past the cap, in one step.
ADD_SCRIPT = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then return 'exists' end
if redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[3]) then return 'full' end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 'ok'
"""


# ---- definitions (pure) ----------------------------------------------------------------------------------------------
Clause = tuple[str, tuple[str, ...]]


def check_name(name: str) -> str:
    if not NAME.fullmatch(name):
        raise SettingsError(f"bad route name {name!r}: use 1-40 of a-z, 0-9, '-' and '_', starting with a letter or digit")
    return name


def parse_where(text: str) -> Clause:
    """'FIELD=V1,V2' -> (field, values), normalised (bot: true/false; namespace: a number); a clear error else."""
    name, sep, raw = text.partition("=")
    name = name.strip().lower()
    if not sep or name not in FIELDS:
        raise SettingsError(f"bad --where {text!r}: use FIELD=V1,V2 with FIELD one of {', '.join(FIELDS)}")
    values = [v.strip() for v in raw.split(",") if v.strip()]
    if not values:
        raise SettingsError(f"bad --where {text!r}: no value after '='")
    if len(values) > MAX_VALUES:
        raise SettingsError(f"bad --where {name}=...: {len(values)} values, at most {MAX_VALUES}")
    out = []
    for value in values:
        v = value.lower()
        if name == "domain" and not is_valid_domain(v):
            raise SettingsError(f"bad --where domain={value!r}: not a domain (e.g. en.wikipedia.org)")
        if name == "type" and v not in keys.EVENT_TYPES:
            raise SettingsError(f"bad --where type={value!r}: one of {', '.join(keys.EVENT_TYPES)}")
        if name == "bot" and v not in ("true", "false"):
            raise SettingsError(f"bad --where bot={value!r}: true or false")
        if name == "namespace":
            if not v.isdigit() or int(v) >= MAX_NAMESPACE:
                raise SettingsError(f"bad --where namespace={value!r}: a namespace number, 0 or more (0 = articles)")
            v = str(int(v))
        out.append(v)
    return name, tuple(dict.fromkeys(out))


def parse_filter(wheres: Sequence[str]) -> list[Clause]:
    if not wheres:
        raise SettingsError("a route needs at least one --where FIELD=V1,V2 (a route of everything is wiki:events itself)")
    if len(wheres) > MAX_CLAUSES:
        raise SettingsError(f"at most {MAX_CLAUSES} --where, not {len(wheres)}")
    return [parse_where(w) for w in wheres]


# A fold summary's head, split: [domain, time, type, bot|human, namespace] (fold.summarize), as bytes. The filters
# compare its parts with their values as the summary writes them: no parse, no conversion (this runs for every entry).
Head = list[bytes]
Matcher = Callable[[Head], bool]


def _as_written(name: str, value: str) -> bytes:
    if name == "bot":
        return b"bot" if value == "true" else b"human"
    return value.encode()


def matcher(clauses: Sequence[Clause]) -> Matcher:
    """The filter as a predicate on a Head: every clause holds, each by one of its values."""
    tests = [(_INDEX[name], frozenset(_as_written(name, v) for v in values)) for name, values in clauses]
    if len(tests) == 1:
        ((i, a),) = tests
        return lambda head: head[i] in a
    if len(tests) == 2:
        (i, a), (j, b) = tests
        return lambda head: head[i] in a and head[j] in b
    return lambda head: all(head[i] in allowed for i, allowed in tests)


def describe(clauses: Sequence[Clause]) -> str:
    return " ".join(f"--where {name}={','.join(values)}" for name, values in clauses)


@dataclass
class Definition:
    name: str
    where: list[Clause]
    start: str  # the ingest stream's last id when declared: the route holds what came after ("0-0": all it held)
    token: str  # tells a definition from a later one of the same name
    created: float = 0.0

    def dumps(self) -> bytes:
        return orjson.dumps({"where": self.where, "start": self.start, "token": self.token, "created": self.created})

    @classmethod
    def loads(cls, name: str, raw: bytes) -> Definition:
        d = orjson.loads(raw)
        return cls(name, [(str(f), tuple(str(v) for v in vs)) for f, vs in d["where"]], str(d["start"]), str(d["token"]),
                   float(d.get("created", 0)))  # fmt: skip


def id_key(entry_id: bytes | str) -> tuple[int, int]:
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


@lru_cache(maxsize=65536)
def _domain_ok(raw: bytes) -> bool:
    text = raw.decode("ascii", "replace")
    return is_valid_domain(text) and text != CANARY_DOMAIN


def head_of(fields: list[bytes], max_bytes: int) -> Head | None:
    """What the entry's filter fields are: from its fold summary (the publisher's entries), else its JSON; None for an
    entry that is no event (the subscriber counts it as rejected). Checked as fold.parse_summary checks a summary."""
    fold = fields[3] if len(fields) == 4 and fields[2] == _FOLD else None
    named = None
    if fold is None:
        named = dict(zip(fields[::2], fields[1::2], strict=False))
        fold = named.get(_FOLD)
    if fold is not None:
        head = fold.partition(b"\t")[0].split(b" ")
        if len(head) == 4:
            head.append(b"-")  # written before the namespace was
        if len(head) == 5 and head[2] in _KINDS and head[3] in _WHO and _domain_ok(head[0]):
            return head
    named = named if named is not None else dict(zip(fields[::2], fields[1::2], strict=False))
    verdict = validate(named.get(_DATA, b""), max_bytes)
    return summarize(observe(verdict.event)).encode().split(b" ") if isinstance(verdict, Accepted) else None


# ---- the command line's side -----------------------------------------------------------------------------------------
async def _last_id(client: Client, stream: str) -> str:
    try:
        info = await client.xinfo_stream(stream)
    except ResponseError:
        return "0-0"  # no stream yet
    last = info.get("last-generated-id") or b"0-0"
    return last.decode() if isinstance(last, bytes) else str(last)


async def add_route(client: Client, settings: RedisSettings, name: str, wheres: Sequence[str], from_stream: bool) -> Definition:
    check_name(name)
    where = parse_filter(wheres)
    start = "0-0" if from_stream else await _last_id(client, settings.stream)
    definition = Definition(name, where, start, secrets.token_hex(6), round(time.time(), 3))
    verdict = await client.eval(ADD_SCRIPT, 1, keys.ROUTES, name, definition.dumps(), keys.MAX_ROUTES)
    verdict = verdict.decode() if isinstance(verdict, bytes) else str(verdict)
    if verdict == "exists":
        raise SettingsError(f"a route {name!r} exists already (route remove {name} first)")
    if verdict == "full":
        raise SettingsError(f"there are {keys.MAX_ROUTES} routes already, the most there can be: remove one first")
    return definition


async def list_routes(client: Client) -> list[dict[str, Any]]:
    raw = await client.hgetall(keys.ROUTES)
    out = []
    for name in sorted(raw):
        d = Definition.loads(name.decode(), raw[name])
        route = keys.Route(d.name)
        pipe = client.pipeline(transaction=False)
        pipe.hgetall(route.router_stats)
        pipe.xlen(route.stream)
        stats, length = await pipe.execute()
        counts = {k.decode(): v.decode() for k, v in stats.items()}
        out.append({
            "name": d.name, "where": describe(d.where), "stream": route.stream, "channel": route.channel, "length": length,
            "copied": int(counts.get("copied", 0)), "duplicates": int(counts.get("duplicates", 0)),
            "live": counts.get("live") == d.token, "start": d.start,
        })  # fmt: skip
    return out


async def remove_route(client: Client, name: str) -> None:
    check_name(name)
    if not await client.hdel(keys.ROUTES, name):
        raise SettingsError(f"no route {name!r}")
    await _drop_keys(client, keys.Route(name))


async def route_command(settings: RedisSettings, action: str, name: str | None, wheres: Sequence[str], from_stream: bool) -> Any:
    """What `route add|list|remove` prints."""
    from wikipulse.store.connect import open_client

    if name is not None:
        check_name(name)
    if action == "add":
        parse_filter(wheres)  # refused before Redis is asked anything
    client, _ = await open_client(settings)
    async with client:
        if action == "add":
            assert name is not None
            d = await add_route(client, settings, name, wheres, from_stream)
            route = keys.Route(d.name)
            return {"added": d.name, "where": describe(d.where), "stream": route.stream, "channel": route.channel,
                    "from": "what the stream holds" if from_stream else f"after {d.start}"}  # fmt: skip
        if action == "remove":
            assert name is not None
            await remove_route(client, name)
            return {"removed": name}
        return await list_routes(client)


async def _drop_keys(client: Client, route: keys.Route) -> None:
    for key in (route.stream, route.router_stats):  # one at a time: on a cluster they are in one slot, but not the lease
        await client.delete(key)


async def _end(task: asyncio.Task[None] | None) -> None:
    """Cancel a lease keeper and wait for it, so that no command of it is left on a connection when the client closes."""
    if task is not None:
        task.cancel()
        await asyncio.wait([task])  # not `await task`: that would take a cancellation of this task for the keeper's


# ---- the copier ------------------------------------------------------------------------------------------------------
@dataclass
class Live:
    """A route as the copier holds it."""

    definition: Definition
    route: keys.Route
    matches: Matcher
    lease: Lease
    writer: ShardWriter
    keeper: asyncio.Task[None] | None = None
    done_to: tuple[int, int] | None = None  # its start, or where its catch-up ended: the group's entries up to it are skipped
    reported: dict[str, int] = field(default_factory=dict)


class RouteCopier:
    def __init__(self, settings: PublisherSettings, client: Client, layout: keys.Layout) -> None:
        self.settings, self.client, self.stream = settings, client, layout.stream
        self.token = new_token()
        self.lease = Lease(client, keys.ROUTES_LEASE, settings.lease_ttl, self.token)
        self.routes: dict[str, Live] = {}
        self.backoff = Backoff(settings.backoff_cap)
        self.outage = Outage(logger, "routes")
        self.totals: Counter[str] = Counter()
        self._polled = -1e9
        self._group = False  # whether the group is known to exist
        self._publish = client.register_script(PUBLISH_SCRIPT)
        self._read = client.register_script(READ_SCRIPT)
        self._filters = "[]"  # the routes' filters, for READ_SCRIPT

    async def run(self) -> None:
        """Copy until cancelled; Redis outages, a full Redis and a lost lease are waited out."""
        keeper: asyncio.Task[None] | None = None
        try:
            while True:
                try:
                    if keeper is None:
                        await self.lease.wait_until_held("the routes' copier lease")
                        keeper = asyncio.create_task(self.lease.keep())
                    await self._copy()
                except REDIS_ERRORS as exc:
                    delay = self.backoff.next_delay()
                    self.outage.failed(exc, delay)
                    await self._forget()
                    await pause_before_retry(delay)
                    await refresh(self.client)  # on a cluster, a slot may have moved: the writers reconnect to its node
                except LeaseLost as exc:
                    logger.error("routes: %s; the copier wrote nothing since, and waits for its leases again", exc)
                    await _end(keeper)
                    keeper = None
                    await self._forget()
                except (RedisFull, ResponseError) as exc:
                    if not (isinstance(exc, RedisFull) or is_full(exc)):
                        if "NOGROUP" not in str(exc):
                            raise
                        await self._forget()
                        continue
                    delay = self.backoff.next_delay()
                    logger.error("routes: Redis is full (%s): copying paused, the entries stay pending; retrying in %.1fs", exc, delay)
                    await pause_before_retry(delay)
        finally:
            await _end(keeper)
            await self._forget()
            await self.lease.release()

    async def _forget(self) -> None:
        """Drop what this process holds of the routes (a restart of the loop loads them again, as a new process would)."""
        for live in self.routes.values():
            await self._let_go(live)
        self.routes = {}
        self._polled, self._group = -1e9, False

    async def _let_go(self, live: Live) -> None:
        await _end(live.keeper)
        await live.writer.close()
        await live.lease.release()

    async def _copy(self) -> None:
        """Own pending entries first (a restart's), then new ones; each batch copied to every route before it is acked
        (by the next read, in Redis: READ_SCRIPT). Redis hands over only the entries some route may want."""
        cursor, acked_to, seen = "0", "", "$"
        count = min(self.settings.read_batch_size, READ_MAX)
        waiter = raw_connection(self.client, self.stream)  # its own: a blocking read cancelled on a pooled one leaks it
        try:
            while True:
                await self.refresh()
                if not self.routes:
                    cursor, acked_to = "0", ""
                    await asyncio.sleep(POLL_INTERVAL)
                    continue
                args = [keys.ROUTES_GROUP, CONSUMER, count, cursor, acked_to, self._filters]
                n, last, trimmed, candidates = await self._read(keys=[self.stream], args=args)
                acked_to = ""
                if not n:
                    if cursor != ">":
                        cursor = ">"
                    else:  # wait for the next entry (without reading it for the group), at most a second
                        await waiter.send_packed_command(pack(("XREAD", "COUNT", 1, "BLOCK", 1000, "STREAMS", self.stream, seen)))
                        await waiter.read_response()
                    continue
                seen = last.decode()
                if cursor != ">":
                    cursor = seen
                await self.copy(candidates, ack=False, trimmed=int(trimmed))
                acked_to = seen
                self.backoff.reset()
                self.outage.over()
                if cursor == ">" and n < count:
                    await asyncio.sleep(GATHER)  # let a batch gather: each costs round trips a route, whatever its size
        finally:
            await drop(waiter)
            if acked_to:  # a clean stop: the last batch was copied, so a restart need not copy it again
                with contextlib.suppress(*REDIS_ERRORS, ResponseError):
                    await self._read(keys=[self.stream], args=[keys.ROUTES_GROUP, CONSUMER, 0, ">", acked_to, "[]"])

    async def refresh(self, force: bool = False) -> None:
        """Read the definitions (every POLL_INTERVAL); take up new ones (catch-up), let go of removed ones."""
        now = time.monotonic()
        if not force and now - self._polled < POLL_INTERVAL:
            return
        self._polled = now
        raw = await self.client.hgetall(keys.ROUTES)
        wanted: dict[str, Definition] = {}
        for name, value in raw.items():
            try:
                d = Definition.loads(name.decode(), value)
                check_name(d.name)
                parse_filter([f"{f}={','.join(vs)}" for f, vs in d.where])
            except (ValueError, KeyError, TypeError) as exc:
                self._refuse(name, exc)
                continue
            wanted[d.name] = d
        for name in [n for n, live in self.routes.items() if wanted.get(n) is None or wanted[n].token != live.definition.token]:
            live = self.routes.pop(name)
            await self._let_go(live)
            await _drop_keys(self.client, live.route)  # anything this copier wrote after `route remove` (or a re-add)
            logger.warning("route %s %s", name, "removed" if name not in wanted else "declared again: starts anew")
        if not wanted:
            self._filters = "[]"
            if self._group:
                with contextlib.suppress(ResponseError):  # an idle group would count as trimmed unread
                    await self.client.xgroup_destroy(self.stream, keys.ROUTES_GROUP)
            self._group = False
            return
        fresh_group = await self._ensure_group(wanted)
        for name, d in sorted(wanted.items()):
            if name not in self.routes:
                await self._take_up(d, fresh_group)
        self._filters = lua_filters([live.definition.where for live in self.routes.values()])

    def _refuse(self, name: bytes, exc: Exception) -> None:
        key = f"bad:{name.decode(errors='replace')}"
        if not self.totals[key]:
            logger.error("route %r: its definition in %s cannot be read (%s): skipped", name, keys.ROUTES, exc)
        self.totals[key] += 1

    async def _ensure_group(self, wanted: dict[str, Definition]) -> bool:
        """Whether the group was made now. It is made at the earliest route's start, so it delivers everything any
        route may hold (no catch-up: a route skips what came before its own start); made anew (it was destroyed while
        routes remained), it delivers again what their streams hold already, and they refuse it."""
        if self._group:
            return False
        groups = []
        with contextlib.suppress(ResponseError):
            groups = [
                g["name"].decode() if isinstance(g["name"], bytes) else g["name"] for g in await self.client.xinfo_groups(self.stream)
            ]
        if keys.ROUTES_GROUP in groups:
            self._group = True
            return False
        for d in wanted.values():  # first: a crash before they are marked live again must find them so
            await self.client.hdel(keys.Route(d.name).router_stats, "live")
        earliest = min(id_key(d.start) for d in wanted.values())
        await self.client.xgroup_create(self.stream, keys.ROUTES_GROUP, id=f"{earliest[0]}-{earliest[1]}", mkstream=True)
        self._group = True
        return True

    async def _take_up(self, d: Definition, fresh_group: bool) -> None:
        route = keys.Route(d.name)
        lease = Lease(self.client, route.router_lease, self.settings.lease_ttl, self.token)
        await lease.wait_until_held(f"the lease on route {d.name}")
        live = Live(
            d, route, matcher(d.where), lease, ShardWriter(self.client, route, lease, self.settings, f"route {d.name}", groups=())
        )
        live.keeper = asyncio.create_task(lease.keep())
        live.done_to = id_key(d.start)  # a route holds only what came after its start
        self.routes[d.name] = live
        if fresh_group:  # the group delivers from before its start
            await self.client.hset(route.router_stats, "live", d.token)
        else:
            done = await self.client.hget(route.router_stats, "live")
            if done is None or done.decode() != d.token:
                await self._catch_up(live)
        logger.info("route %s: %s -> %s (and its channel)", d.name, describe(d.where), route.stream)

    async def _catch_up(self, live: Live) -> None:
        """Copy what the ingest stream holds after the route's start (or its own last entry) up to its end now. What
        comes after that, the group delivers (it has read no further: it is read by this task only, between refreshes);
        what it delivers up to there is skipped (done_to)."""
        start = max(id_key(live.definition.start), id_key(await _last_id(self.client, live.route.stream)))
        end = id_key(await _last_id(self.client, self.stream))
        at, last = f"{start[0]}-{start[1]}", f"{end[0]}-{end[1]}"
        copied = 0
        while start < end:
            raw = await self.client.xrange(self.stream, f"({at}", last, count=CATCH_UP_CHUNK)
            if not raw:
                break
            entries: list[Entry] = [(i, [x for kv in f.items() for x in kv]) for i, f in raw]
            at = entries[-1][0].decode()
            part = self._matching(live, entries, self._heads(entries))
            if part:
                copied += await self._write(live, part)
        live.done_to = max(start, end)
        await self.client.hset(live.route.router_stats, "live", live.definition.token)
        if copied:
            logger.info("route %s: caught up with %d entries from %s", live.definition.name, copied, self.stream)

    def _heads(self, entries: Sequence[Entry]) -> list[Head | None]:
        max_bytes = self.settings.max_event_bytes
        out = [head_of(fields, max_bytes) if fields is not None else None for _, fields in entries]
        self.totals["unreadable"] += sum(1 for head, (_, fields) in zip(out, entries, strict=True) if head is None and fields is not None)
        return out

    @staticmethod
    def _matching(live: Live, entries: Sequence[Entry], heads: Sequence[Head | None]) -> list[Entry]:
        matches = live.matches
        part = [e for e, head in zip(entries, heads, strict=True) if head is not None and matches(head)]
        done = live.done_to  # never cleared: a restart's pending entries may go back before it
        if done is not None and entries and id_key(entries[0][0]) <= done:
            if id_key(entries[-1][0]) <= done:
                return []
            part = [e for e in part if id_key(e[0]) > done]
        return part

    async def copy(self, entries: Sequence[Entry], ack: bool = True, trimmed: int = 0) -> None:
        """One batch of the group to every route, then acknowledged (`ack`: here; else by the next read)."""
        heads = self._heads(entries)
        trimmed += sum(1 for _, fields in entries if fields is None)
        parts = [(live, self._matching(live, entries, heads)) for live in self.routes.values()]
        await asyncio.gather(*(self._write(live, part) for live, part in parts if part))
        if ack:
            await self.client.xack(self.stream, keys.ROUTES_GROUP, *[e[0] for e in entries])
        if trimmed:
            # Delivered to the copier, then trimmed from the ingest stream before it copied them (it was down).
            await self.client.hincrby(keys.ROUTES_STATS, "trimmed", trimmed)
            logger.error("routes: %d entries were trimmed from %s before they were copied", trimmed, self.stream)
        self.totals["trimmed"] += trimmed

    async def _write(self, live: Live, part: list[Entry]) -> int:
        """Through the router's fenced writer; then the added ones are published (the refused ones lead: ids ascend)."""
        # Trimming: the hard cap STREAM_MAXLEN, with trimmed_unread per group of the route (TRIM_LUA, in the writer). The
        # trim of what every group acknowledged (a short window) plugs in where wiki:events gets it: trimming.py's script.
        added, duplicates, grew = await live.writer.write(part)
        if added or duplicates:
            # The added ones, from the stream itself (the data is not sent again), and the counters: not part of the guarantee.
            first = part[len(part) - added][0] if added else b"0-1"
            await self._publish(keys=[live.route.stream, live.route.router_stats], args=[first, added, duplicates])
        self.totals.update(copied=added, duplicates=duplicates)
        for group, total in zip(grew[::2], grew[1::2], strict=True):
            name = group.decode() if isinstance(group, bytes) else str(group)
            if live.reported.get(name) != int(total):
                logger.error(
                    "route %s: %d entries were trimmed before group %r read them (STREAM_MAXLEN)", live.definition.name, int(total), name
                )
                live.reported[name] = int(total)
        return added


# The copier's read, in Redis: acknowledge its own pending entries up to ARGV[5] (the batch before, copied), then
# XREADGROUP the next batch and hand back only the entries that some route may want: those whose fold summary is
# well-formed and holds for some route's filter (ARGV[6], lua_filters), and any whose summary is not (the copier then
# reads their JSON, as head_of does). Most entries thus never leave Redis: the copier costs the publisher's process
# only what the routes hold. KEYS: the ingest stream. ARGV: group, consumer, count (0: acknowledge only), start ('0'
# or an id: own pending entries; '>': new), acknowledge up to (an id, or ''), filters.
# Returns {entries read, the last one's id, how many of them were trimmed before they were read, {candidates}}.
READ_MAX = 5000  # entries a read takes at most (and so acknowledges at most next time: one XACK call per 1,000)
READ_SCRIPT = (
    f"local READ_MAX = {READ_MAX}\nlocal kinds = {{"
    + ", ".join(f"['{kind}'] = true" for kind in keys.EVENT_TYPES)
    + """}
local stream, group, consumer = KEYS[1], ARGV[1], ARGV[2]
if ARGV[5] ~= '' then
  local ids = {}
  for _, p in ipairs(redis.call('XPENDING', stream, group, '-', ARGV[5], 2 * READ_MAX, consumer)) do
    ids[#ids + 1] = p[1]
  end
  for i = 1, #ids, 1000 do redis.call('XACK', stream, group, unpack(ids, i, math.min(i + 999, #ids))) end
end
if tonumber(ARGV[3]) == 0 then return {0, '', 0, {}} end
local reply = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', ARGV[3], 'STREAMS', stream, ARGV[4])
if not reply or #reply[1][2] == 0 then return {0, '', 0, {}} end
local entries = reply[1][2]
local routes = cjson.decode(ARGV[6])
local out, trimmed = {}, 0
for _, e in ipairs(entries) do
  local f = e[2]
  if not f then
    trimmed = trimmed + 1
  else
    local fold
    for i = 1, #f, 2 do
      if f[i] == 'fold' then fold = f[i + 1] break end
    end
    local keep = true
    if fold then
      local head = fold
      local tab = string.find(fold, '\t', 1, true)
      if tab then head = string.sub(fold, 1, tab - 1) end
      local p = {string.match(head, '^([^ ]*) ([^ ]*) ([^ ]*) ([^ ]*) ([^ ]*)$')}
      if #p == 0 then
        p = {string.match(head, '^([^ ]*) ([^ ]*) ([^ ]*) ([^ ]*)$')}
        if #p == 4 then p[5] = '-' end
      end
      if #p == 5 and kinds[p[3]] and (p[4] == 'bot' or p[4] == 'human') then
        keep = false
        for _, clauses in ipairs(routes) do
          local all = true
          for _, c in ipairs(clauses) do
            if not c[2][p[c[1]]] then all = false break end
          end
          if all then keep = true break end
        end
      end
    end
    if keep then out[#out + 1] = e end
  end
end
return {#entries, entries[#entries][1], trimmed, out}
"""
)


def lua_filters(wheres: Sequence[Sequence[Clause]]) -> str:
    """The routes' filters for READ_SCRIPT: per route, its clauses as [part of the head (1-based), {value: 1, ...}]."""
    return orjson.dumps(
        [[[_INDEX[name] + 1, {_as_written(name, v).decode(): 1 for v in values}] for name, values in where] for where in wheres]
    ).decode()


# KEYS: the route's stream (its name is also the channel's), its counters. ARGV: the first id the write added, how many
# it added, how many it refused. PUBLISHes the added entries' JSON, read back from the stream, and counts.
PUBLISH_SCRIPT = """
local n = tonumber(ARGV[2])
if n > 0 then
  for _, entry in ipairs(redis.call('XRANGE', KEYS[1], ARGV[1], '+', 'COUNT', n)) do
    local f = entry[2]
    for i = 1, #f, 2 do
      if f[i] == 'data' then redis.call('PUBLISH', KEYS[1], f[i + 1]) break end
    end
  end
  redis.call('HINCRBY', KEYS[2], 'copied', n)
end
if tonumber(ARGV[3]) > 0 then redis.call('HINCRBY', KEYS[2], 'duplicates', ARGV[3]) end
return n
"""


# ---- counters, for `stats` and /metrics ------------------------------------------------------------------------------
def _counters(names: Sequence[str], replies: Sequence[Any]) -> dict[str, dict[str, Any]]:
    from wikipulse.store.status import decode_hash
    from wikipulse.store.trimming import trimmed_unread

    out = {}
    for i, name in enumerate(names):
        stats = decode_hash(replies[2 * i]) if isinstance(replies[2 * i], dict) else {}
        length = replies[2 * i + 1]
        out[name] = {
            "copied": int(stats.get("copied", 0)), "duplicates": int(stats.get("duplicates", 0)),
            "length": length if isinstance(length, int) else 0, "trimmed_unread": trimmed_unread(stats),
        }  # fmt: skip
    return out


def route_counters(client: SyncClient) -> dict[str, dict[str, Any]]:
    """{route: {"copied", "duplicates", "length", "trimmed_unread": {group: n}}} for every declared route (/metrics)."""
    names = sorted(n.decode() for n in client.hkeys(keys.ROUTES))
    if not names:
        return {}
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.hgetall(keys.Route(name).router_stats)
        pipe.xlen(keys.Route(name).stream)
    return _counters(names, pipe.execute())


async def read_route_counters(client: Client) -> dict[str, dict[str, Any]]:
    """route_counters, for `stats`."""
    names = sorted(n.decode() for n in await client.hkeys(keys.ROUTES))
    if not names:
        return {}
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.hgetall(keys.Route(name).router_stats)
        pipe.xlen(keys.Route(name).stream)
    return _counters(names, await pipe.execute())
