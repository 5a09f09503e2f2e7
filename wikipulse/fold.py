"""Folding events into time-series increments: pure, on a clock passed in.

Data shapes:
  event            dict in the recentchange schema (validated: has meta.domain)
  FoldKey          (domain, base bucket start, type, is_bot)   one per distinct event class
  Increments.counts  {(redis key, hash field): n}              what HINCRBY will add
  Increments.expire_at {redis key: unix s}                     EXPIREAT for each touched key
  Increments.rank  {(rank key, domain): n}                     ZINCRBY for the domain ranking

Events are bucketed by their own time (`timestamp`, else `meta.dt`), so replays and
backfills land where they belong. Events are first counted per FoldKey at the finest
step; coarser buckets are multiples of it, so each class is expanded only once.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from wikipulse import keys
from wikipulse.events import event_time

FUTURE_TOLERANCE = 300  # seconds ahead of the clock an event may be stamped and still count

FoldKey = tuple[str, int, str, bool]
_KNOWN_TYPES = frozenset(keys.EVENT_TYPES) - {"other"}


@dataclass
class Increments:
    counts: Counter[tuple[str, str]] = field(default_factory=Counter)
    expire_at: dict[str, int] = field(default_factory=dict)
    rank: Counter[tuple[str, str]] = field(default_factory=Counter)
    folded: int = 0
    late: int = 0
    future: int = 0
    untimed: int = 0


def classify(event: Mapping[str, Any]) -> tuple[str, bool]:
    """(type dimension, is_bot) of a validated event."""
    kind = event.get("type")
    return (kind if kind in _KNOWN_TYPES else "other"), event.get("bot") is True


def base_step(resolutions: Iterable[keys.Resolution]) -> int:
    return math.gcd(*(r.step for r in resolutions))


def classify_events(events: Iterable[dict[str, Any]], now: float, retention: Mapping[str, int], out: Increments) -> Counter[FoldKey]:
    """Count events per FoldKey; late, future and untimed events are counted in `out` and left out."""
    step = base_step(keys.RESOLUTIONS)
    oldest = now - max(retention.values())
    newest = now + FUTURE_TOLERANCE
    classes: Counter[FoldKey] = Counter()
    for event in events:
        t = event_time(event)
        if t is None:
            out.untimed += 1
            continue
        if t < oldest:
            out.late += 1
            continue
        if t > newest:
            out.future += 1
            continue
        kind, bot = classify(event)
        classes[(event["meta"]["domain"], t - t % step, kind, bot)] += 1
    return classes


def fold(events: Iterable[dict[str, Any]], now: float, retention: Mapping[str, int]) -> Increments:
    out = Increments()
    classes = classify_events(events, now, retention, out)
    expand(classes, now, retention, out)
    return out


def expand(classes: Mapping[FoldKey, int], now: float, retention: Mapping[str, int], out: Increments) -> None:
    """Turn per-class counts into HINCRBY/EXPIREAT/ZINCRBY work at every resolution.

    Classes are merged per resolution first (many fall into one 1 min or 1 h bucket), and the
    global totals are summed apart, so each hash field is touched once per batch."""
    counts, expire_at, rank = out.counts, out.expire_at, out.rank
    for res in keys.RESOLUTIONS:
        keep = retention[res.name]
        per_domain: Counter[FoldKey] = Counter()
        for (domain, t, kind, bot), n in classes.items():
            per_domain[(domain, t - t % res.step, kind, bot)] += n
        everywhere: Counter[tuple[str, int, str, bool]] = Counter()
        for (domain, bucket, kind, bot), n in per_domain.items():
            window = bucket - bucket % res.window
            expires = window + res.window + keep
            if expires <= now:
                continue  # this resolution no longer keeps that window
            key = keys.series_key(domain, res, window)
            expire_at[key] = expires
            _add_fields(counts, key, bucket, kind, bot, n)
            everywhere[(keys.ALL_DOMAINS, bucket, kind, bot)] += n
        for (domain, bucket, kind, bot), n in everywhere.items():
            window = bucket - bucket % res.window
            key = keys.series_key(domain, res, window)
            expire_at[key] = window + res.window + keep
            _add_fields(counts, key, bucket, kind, bot, n)
    rank_floor = now - keys.RANK_RETENTION
    for (domain, t, _kind, _bot), n in classes.items():
        out.folded += n
        minute = t - t % keys.RANK_STEP
        if minute > rank_floor and domain != keys.OTHER_DOMAINS:  # the ranking lists real domains only
            rkey = keys.rank_key(minute)
            rank[(rkey, domain)] += n
            expire_at[rkey] = minute + keys.RANK_RETENTION


def _add_fields(counts: Counter[tuple[str, str]], key: str, bucket: int, kind: str, bot: bool, n: int) -> None:
    counts[(key, keys.total_field(bucket))] += n
    counts[(key, keys.dimension_field(bucket, kind))] += n
    counts[(key, keys.dimension_field(bucket, "bot" if bot else "human"))] += n
