"""Writing folded increments to Redis atomically, and reading the series back.

Writes go through one Lua script (apply.lua) so that a batch's increments, its counters and
the XACK of the stream entries that produced them are one atomic step: a crash
before it leaves the entries pending (they are folded again), a crash after it
leaves them acknowledged (never folded again). Unless no entries have been claimed
anywhere since these were read (keys.CLAIMS unchanged, the usual case), the script first
XCLAIMs them to its own consumer (JUSTID, no idle floor): only entries still pending
come back, so when another consumer already acknowledged some of them, the script
applies nothing and returns the ids it still owns for a re-fold.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from itertools import chain
from typing import Any

import orjson

from wikipulse.core import model
from wikipulse.fold.fold import Increments
from wikipulse.store import keys
from wikipulse.store.connect import Client, pack, raw_connection
from wikipulse.store.retry import drop
from wikipulse.store.scripts import script

APPLY_SCRIPT = script(__package__, "apply", "fence", "acknowledge")  # every KEYS and ARGV slot and payload section: apply.lua


_NOT_IN_IDS = re.compile(rb'[^0-9",-]')


FIXED_KEYS = 4  # the stream, stats, claims and lease come first in KEYS


def script_payload(
    inc: Increments, ids: Sequence[bytes | str], stats: Mapping[str, int], shard: keys.Shard = keys.UNSHARDED
) -> tuple[list[str], bytes]:
    """The keys APPLY_SCRIPT declares after its fixed ones, and its JSON payload (pure, so it can be tested with
    plain values)."""
    declared = [*inc.hashes, *inc.zsets]
    number = {key: FIXED_KEYS + 1 + i for i, key in enumerate(declared)}
    trending_keys = FIXED_KEYS + len(declared)  # the trending sections number their keys from here on
    declared += inc.pages.declared(shard)
    payload = orjson.dumps({
        "ids": _json_ids(ids),
        "stats": {k: v for k, v in stats.items() if v},
        "h": _flat(inc.hashes, inc.expire_at, number),
        "z": _flat(inc.zsets, inc.expire_at, number),
        "tk": trending_keys,
        **inc.pages.payload(),
    })  # fmt: skip
    return declared, payload


def _json_ids(ids: Sequence[bytes | str]) -> orjson.Fragment:
    """Stream ids as a JSON array, joined as they come (ids are digits and a '-': nothing to escape)."""
    joined = b'","'.join(i if isinstance(i, bytes) else i.encode() for i in ids)
    if _NOT_IN_IDS.search(joined):
        raise ValueError(f"not stream ids: {joined[:100]!r}")
    return orjson.Fragment(b'["' + joined + b'"]' if ids else b"[]")


def _flat(counts: Mapping[str, Mapping[str, int]], expire_at: Mapping[str, int], number: Mapping[str, int]) -> list[str | int]:
    out: list[str | int] = []
    for key, members in counts.items():
        out += (number[key], expire_at[key], len(members))
        out += chain.from_iterable(members.items())
    return out


class SeriesWriter:
    """Applies folded batches with APPLY_SCRIPT on a connection of its own, pipelined: send() puts
    a batch on the wire and returns at once, receive() takes the replies in the order sent. So Redis
    applies one batch while this process folds the next.

    EVAL, not EVALSHA: Redis caches the compiled script by its digest either way, the script is
    small next to the payload, and a Redis that restarted and lost its script cache needs no retry."""

    def __init__(
        self,
        client: Client,
        stream: str,
        group: str,
        consumer: str,
        lease_token: str = "",
        lease_ttl_ms: int = 0,
        shard: keys.Shard = keys.UNSHARDED,
        notices: str = "",
    ) -> None:
        self._connection = raw_connection(client, stream)  # on a cluster, the node of the shard's slot
        self._stream, self._group, self._consumer = stream, group, consumer
        self._fixed_keys = (stream, shard.stats, shard.claims, shard.consumer_lease(group, consumer))
        self._shard = shard
        self._lease = (lease_token, lease_ttl_ms)
        self._notices = notices  # the channel each applied batch is announced on ('' for none)

    async def send(
        self, inc: Increments, ids: Sequence[bytes | str], stats: Mapping[str, int], claims: bytes | None = None, notice: bytes = b""
    ) -> None:
        """`claims`: keys.CLAIMS as read before the entries were (None: unknown, check every entry). `notice`: what
        the batch's PUBLISH on the notice channel says once it is applied."""
        declared, payload = script_payload(inc, ids, stats, self._shard)
        seen = b"" if claims is None else claims
        token, ttl_ms = self._lease
        command: tuple[bytes | str | int, ...] = (
            "EVAL",
            APPLY_SCRIPT,
            FIXED_KEYS + len(declared),
            *self._fixed_keys,
            *declared,
            self._group,
            self._consumer,
            seen,
            payload,
            token,
            ttl_ms,
            self._notices if notice else "",
            notice,
        )
        await self._connection.send_packed_command(pack(command))

    async def receive(self) -> list[bytes] | None:
        """The oldest unanswered batch's outcome. None when it was applied; else the subset of its
        ids this consumer still owns (the others were acknowledged elsewhere) and nothing was written."""
        result = await self._connection.read_response()
        if result == 1:
            return None
        return [i if isinstance(i, bytes) else str(i).encode() for i in result]

    async def apply(self, inc: Increments, ids: Sequence[bytes | str], stats: Mapping[str, int], notice: bytes = b"") -> list[bytes] | None:
        """send + receive, with nothing else in flight."""
        await self.send(inc, ids, stats, None, notice)
        return await self.receive()

    async def close(self) -> None:
        """Drop the connection and any unanswered batches (each was applied whole or not at all);
        the next send connects again."""
        await drop(self._connection)


def bucket_range(res: model.Resolution, start: int, end: int) -> list[int]:
    """Bucket starts from the one holding `start` to the one holding `end`, inclusive."""
    first = start - start % res.step
    return list(range(first, end - end % res.step + 1, res.step))


@dataclass(frozen=True)
class SeriesRead:
    """How to read some dimensions ('' = total) of some buckets: one HGETALL per window key.

    HGETALL, not HMGET: the hashes are small listpacks (model.Resolution), where HMGET scans the
    whole hash once per field asked for, and HGETALL once in all (a refresh of 10 domains by type:
    51 -> 31 ms, bench/bench_dashboard.py).
    The fields are the same for every domain, so a plan is made once per refresh and reused."""

    res: model.Resolution
    dims: tuple[str, ...]
    windows: tuple[tuple[int, list[int]], ...]  # (window start, its buckets)

    @classmethod
    def plan(cls, res: model.Resolution, buckets: Sequence[int], dims: Sequence[str]) -> SeriesRead:
        by_window: dict[int, list[int]] = {}
        for b in buckets:
            by_window.setdefault(keys.window_start(res, b), []).append(b)
        return cls(res, tuple(dims), tuple(by_window.items()))

    def hashes(self, domain: str, shard: keys.Shard = keys.UNSHARDED) -> list[str]:
        """The hashes to HGETALL for this domain, in the order decode() takes their replies."""
        return [shard.series_key(domain, self.res, window) for window, _ in self.windows]

    @cached_property
    def _fields(self) -> dict[str, list[bytes]]:
        """{stored dim ('' = total): the field of each bucket, in bucket order}."""
        buckets = [b for _, bs in self.windows for b in bs]
        dims = {"", "bot"} | {stored for d in self.dims for stored in _stored(d)}
        return {d: [(keys.total_field(b) if d == "" else keys.dimension_field(b, d)).encode() for b in buckets] for d in dims}

    def decode(self, replies: Sequence[Mapping[bytes, bytes]]) -> dict[str, list[int | None]]:
        """The HGETALL replies of one domain, in hashes() order -> {dim: [count or None per bucket]}.

        None: nothing was recorded in that bucket (a gap). In a bucket with a total, a dimension
        with no field of its own counted 0, and human is total - bot (ns<k>human: ns<k> - ns<k>bot)."""
        merged: dict[bytes, bytes] = {}
        for reply in replies:
            merged.update(reply)  # bucket fields are unique across windows
        stored = {d: [merged.get(f) for f in fields] for d, fields in self._fields.items()}
        totals = stored[""]
        out: dict[str, list[int | None]] = {}
        for d in self.dims:
            if d == "human":
                out[d] = [None if t is None else int(t) - int(b or 0) for t, b in zip(totals, stored["bot"], strict=True)]
            elif d.endswith("human"):
                everyone, bots = _stored(d)
                pairs = zip(totals, stored[everyone], stored[bots], strict=True)
                out[d] = [None if t is None else int(v or 0) - int(b or 0) for t, v, b in pairs]
            elif d == "":
                out[d] = [None if t is None else int(t) for t in totals]
            else:
                out[d] = [int(v) if v is not None else (None if t is None else 0) for v, t in zip(stored[d], totals, strict=True)]
        return out


def _stored(dim: str) -> tuple[str, ...]:
    """The stored dimensions a read dimension is made of: humans are everyone minus bots."""
    if dim == "human":
        return ("", "bot")
    if dim.endswith("human"):
        return (dim.removesuffix("human"), dim.removesuffix("human") + "bot")
    return (dim,)


def notice(folded: int, domains: Iterable[str], shard: int, since: int) -> bytes:
    """What an applied batch announces on keys.NOTICES (pure): `since` is the earliest bucket it moved."""
    moved = sorted(set(domains))
    return orjson.dumps({"folded": folded, "domains": moved[: keys.NOTICE_DOMAINS], "shard": shard, "from": since})


def merge_counts(parts: Sequence[dict[str, list[int | None]]]) -> dict[str, list[int | None]]:
    """The sum of several shards' decoded counts of one pseudo-domain (_all, _other); a gap only where all have one."""
    merged = dict(parts[0])
    for part in parts[1:]:
        for dim, values in part.items():
            merged[dim] = [a if b is None else b if a is None else a + b for a, b in zip(merged[dim], values, strict=True)]
    return merged


def queue_reads(pipe: Any, layout: keys.Layout, reads: Sequence[tuple[str, SeriesRead]]) -> None:
    """HGETALL every hash of these (domain, plan) reads on a non-transactional pipeline, in every shard that holds
    a share of the domain; decode_reads takes the replies in the same order."""
    for domain, read in reads:
        for shard in layout.shards_holding(domain):
            for key in read.hashes(domain, shard):
                pipe.hgetall(key)


def decode_reads(
    layout: keys.Layout, reads: Sequence[tuple[str, SeriesRead]], replies: Sequence[Any]
) -> tuple[list[dict[str, list[int | None]]], int]:
    """The decoded counts of each read (summed over shards), and how many replies they took."""
    out = []
    at = 0
    for domain, read in reads:
        parts = []
        for _ in layout.shards_holding(domain):
            parts.append(read.decode(replies[at : at + len(read.windows)]))
            at += len(read.windows)
        out.append(merge_counts(parts))
    return out, at


def queue_ranking(pipe: Any, layout: keys.Layout, now: int, seconds: int) -> None:
    """ZUNION of each shard's ranking keys (one slot each) over the last `seconds`; merge_ranking reads them."""
    for shard in layout.all_shards:
        pipe.zunion(shard.rank_keys(now, seconds), withscores=True)


def merge_ranking(layout: keys.Layout, replies: Sequence[Any]) -> tuple[list[tuple[str, float]], int]:
    """[(domain, events)] lowest first, as ZUNION answers (a domain lives in one shard), and the replies taken."""
    n = len(layout.all_shards)
    ranked = [(m.decode() if isinstance(m, bytes) else str(m), float(score)) for reply in replies[:n] for m, score in reply]
    return sorted(ranked, key=lambda pair: pair[1]), n


async def read_series(
    client: Client,
    domains: Sequence[str],
    res: model.Resolution,
    start: int,
    end: int,
    dims: Sequence[str] = ("",),
    layout: keys.Layout | None = None,
) -> dict[str, dict[str, list[int | None]]]:
    """{domain: {dim: [count or None per bucket]}} in one pipelined round trip.

    None means nothing was recorded for that bucket (a gap, not a zero)."""
    layout = layout or keys.Layout("")
    read = SeriesRead.plan(res, bucket_range(res, start, end), dims)
    reads = [(domain, read) for domain in domains]
    pipe = client.pipeline(transaction=False)
    queue_reads(pipe, layout, reads)
    decoded, _ = decode_reads(layout, reads, await pipe.execute())
    return dict(zip(domains, decoded, strict=True))
