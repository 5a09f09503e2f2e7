"""The pipeline's counters, read back for `python -m wikipulse stats` and the dashboard header."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

from redis.exceptions import ResponseError

from wikipulse.store import keys
from wikipulse.store.connect import Client
from wikipulse.store.trimming import trimmed_unread

STALE_AFTER = 60.0  # seconds without a publisher write before it counts as stale


def _number(value: bytes) -> int | float | str:
    text = value.decode()
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def decode_hash(raw: dict[bytes, bytes]) -> dict[str, Any]:
    return {k.decode(): _number(v) for k, v in sorted(raw.items())}


def merge_hashes(hashes: list[dict[str, Any]]) -> dict[str, Any]:
    """Several shards' counter hashes as one: numbers summed, `updated_at` the latest, anything else listed."""
    merged: dict[str, Any] = {}
    for h in hashes:
        for name, value in h.items():
            if name not in merged:
                merged[name] = value if isinstance(value, (int, float)) or len(hashes) == 1 else [value]
            elif name == "updated_at":
                merged[name] = max(merged[name], value)
            elif isinstance(value, (int, float)) and isinstance(merged[name], (int, float)):
                merged[name] += value
            elif isinstance(merged[name], list):
                merged[name].append(value)
    return merged


async def read_status(client: Client, layout: keys.Layout, group: str) -> dict[str, Any]:
    """Counters of every stage (summed over shards), the streams' lengths and what the group has pending, in one
    pipelined round trip."""
    shards = layout.all_shards
    pipe = client.pipeline(transaction=False)
    pipe.hgetall(layout.publisher.stats)
    pipe.hgetall(layout.archiver_stats)
    pipe.xlen(layout.stream)
    for shard in shards:
        pipe.hgetall(shard.stats)
        pipe.xpending(shard.stream, group)
        if layout.sharded:
            pipe.hgetall(shard.router_stats)
    replies = await pipe.execute(raise_on_error=False)

    def hash_at(i: int) -> dict[str, Any]:
        return decode_hash(replies[i]) if isinstance(replies[i], dict) else {}

    per_shard = 3 if layout.sharded else 2
    publisher = hash_at(0)
    subscriber = merge_hashes([hash_at(3 + per_shard * i) for i in range(len(shards))])
    pending = sum(r["pending"] for r in replies[4::per_shard] if isinstance(r, dict))
    router = merge_hashes([hash_at(5 + per_shard * i) for i in range(len(shards))]) if layout.sharded else {}
    trimmed = Counter(trimmed_unread(publisher))
    trimmed.update(trimmed_unread(router))  # sharded: what the shard streams lost before their groups read it
    now = time.time()
    updated = publisher.get("updated_at")
    return {
        "publisher": publisher,
        "subscriber": subscriber,
        **({"router": router, "shards": len(shards)} if layout.sharded else {}),
        "stream_length": replies[2] if not isinstance(replies[2], ResponseError) else 0,
        "pending": pending,
        "published": publisher.get("published", 0),
        "folded": subscriber.get("folded", 0),
        "duplicates": publisher.get("duplicates", 0),
        "rejected": sum(v for k, v in publisher.items() if k.startswith("rejected:")),
        "late": subscriber.get("late", 0),
        "overflow": subscriber.get("overflow", 0),  # events of domains over max_domains, folded as _other
        # per consumer group: entries trimmed from the stream before they were delivered to it (trimming.py)
        "trimmed_unread": dict(trimmed),
        "archiver": hash_at(1),  # archived, rejected:<reason>, ...
        "lag_seconds": publisher.get("lag_seconds"),
        "publisher_seen_seconds_ago": None if not isinstance(updated, (int, float)) else round(now - updated, 1),
    }
