"""The pipeline's counters, read back for `python -m wikipulse stats` and the dashboard header."""

from __future__ import annotations

import time
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from wikipulse import keys
from wikipulse.trimming import trimmed_unread

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


async def read_status(client: aioredis.Redis, stream: str, group: str) -> dict[str, Any]:
    """Counters of both stages, the stream's length and what the group has pending, in one round trip."""
    pipe = client.pipeline(transaction=False)
    pipe.hgetall(keys.PUBLISHER_STATS)
    pipe.hgetall(keys.SUBSCRIBER_STATS)
    pipe.xlen(stream)
    pipe.xpending(stream, group)
    pipe.hgetall(keys.ARCHIVER_STATS)
    replies = await pipe.execute(raise_on_error=False)
    publisher = decode_hash(replies[0]) if isinstance(replies[0], dict) else {}
    subscriber = decode_hash(replies[1]) if isinstance(replies[1], dict) else {}
    pending = replies[3]["pending"] if isinstance(replies[3], dict) else 0
    now = time.time()
    updated = publisher.get("updated_at")
    return {
        "publisher": publisher,
        "subscriber": subscriber,
        "stream_length": replies[2] if not isinstance(replies[2], ResponseError) else 0,
        "pending": pending,
        "published": publisher.get("published", 0),
        "folded": subscriber.get("folded", 0),
        "duplicates": publisher.get("duplicates", 0),
        "rejected": sum(v for k, v in publisher.items() if k.startswith("rejected:")),
        "late": subscriber.get("late", 0),
        "overflow": subscriber.get("overflow", 0),  # events of domains over max_domains, folded as _other
        # per consumer group: entries trimmed from the stream before they were delivered to it (trimming.py)
        "trimmed_unread": trimmed_unread(publisher),
        "archiver": decode_hash(replies[4]) if isinstance(replies[4], dict) else {},  # archived, rejected:<reason>, ...
        "lag_seconds": publisher.get("lag_seconds"),
        "publisher_seen_seconds_ago": None if not isinstance(updated, (int, float)) else round(now - updated, 1),
    }
