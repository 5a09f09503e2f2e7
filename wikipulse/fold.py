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
    """Turn per-class counts into HINCRBY/EXPIREAT/ZINCRBY work at every resolution."""
    counts, expire_at, rank = out.counts, out.expire_at, out.rank
    rank_floor = now - keys.RANK_RETENTION
    for (domain, t, kind, bot), n in classes.items():
        out.folded += n
        who = "bot" if bot else "human"
        for res in keys.RESOLUTIONS:
            window = t - t % res.window
            expires = window + res.window + retention[res.name]
            if expires <= now:
                continue  # this resolution no longer keeps that window
            bucket = t - t % res.step
            total, by_kind, by_who = str(bucket), f"{bucket}:{kind}", f"{bucket}:{who}"
            for d in (domain, keys.ALL_DOMAINS):
                key = keys.series_key(d, res, window)
                counts[(key, total)] += n
                counts[(key, by_kind)] += n
                counts[(key, by_who)] += n
                expire_at[key] = expires
        minute = t - t % keys.RANK_STEP
        if minute > rank_floor:
            rkey = keys.rank_key(minute)
            rank[(rkey, domain)] += n
            expire_at[rkey] = minute + keys.RANK_RETENTION
