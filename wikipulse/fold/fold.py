"""Folding events into time-series increments: pure, on a clock passed in.

Data shapes:
  Observation      what one event contributes (summary.py: the publisher's fold summary, parsed)
  FoldKey          (domain, base bucket start, type, is_bot, graph namespace or -1)   one per distinct event class
  Increments.hashes    {redis key: {hash field: n}}               what HINCRBY will add
  Increments.zsets     {rank key: {domain: n}}                    ZINCRBY for the domain ranking
  Increments.expire_at {redis key: unix s}                        EXPIREAT for each touched key
  Increments.pages     trending.TrendIncrements                   the batch's trending and new pages

Events are bucketed by their own time (`timestamp`, else `meta.dt`), so replays and
backfills land where they belong. Events are first counted per FoldKey at the finest
step; coarser buckets are multiples of it, so each class is expanded only once.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from wikipulse.core import model
from wikipulse.core.summary import Observation
from wikipulse.fold.trending import TrendIncrements
from wikipulse.store import keys

FUTURE_TOLERANCE = model.FUTURE_TOLERANCE

FoldKey = tuple[str, int, str, bool, int]
NO_NAMESPACE = -1  # a FoldKey's namespace when it is none of model.GRAPH_NAMESPACES
_GRAPH_NAMESPACES = frozenset(model.GRAPH_NAMESPACES)


@dataclass
class Increments:
    hashes: dict[str, dict[str, int]] = field(default_factory=dict)
    zsets: dict[str, dict[str, int]] = field(default_factory=dict)
    expire_at: dict[str, int] = field(default_factory=dict)
    pages: TrendIncrements = field(default_factory=TrendIncrements)
    folded: int = 0
    late: int = 0
    future: int = 0
    untimed: int = 0

    @property
    def counts(self) -> Counter[tuple[str, str]]:
        """{(key, field): n}: the hash increments flattened (for tests and baselines)."""
        return Counter({(key, f): n for key, fields in self.hashes.items() for f, n in fields.items()})

    @property
    def rank(self) -> Counter[tuple[str, str]]:
        return Counter({(key, m): n for key, members in self.zsets.items() for m, n in members.items()})


def base_step(resolutions: Iterable[model.Resolution]) -> int:
    return math.gcd(*(r.step for r in resolutions))


def tally(observations: Iterable[tuple[Observation, int]], now: float, retention: Mapping[str, int], out: Increments) -> Counter[FoldKey]:
    """Count (observation, n) pairs per FoldKey; late, future and untimed ones are counted in `out` and left out."""
    step = base_step(model.RESOLUTIONS)
    oldest = now - max(retention.values())
    newest = now + FUTURE_TOLERANCE
    classes: Counter[FoldKey] = Counter()
    for (domain, t, kind, bot, namespace), n in observations:
        if t is None:
            out.untimed += n
        elif t < oldest:
            out.late += n
        elif t > newest:
            out.future += n
        else:
            classes[(domain, t - t % step, kind, bot, namespace if namespace in _GRAPH_NAMESPACES else NO_NAMESPACE)] += n
    return classes


def expand(
    classes: Mapping[FoldKey, int], now: float, retention: Mapping[str, int], out: Increments, shard: keys.Shard = keys.UNSHARDED
) -> None:
    """Turn per-class counts into HINCRBY/EXPIREAT/ZINCRBY work at every resolution, on `shard`'s keys (its
    domains' series, its share of the totals and of the ranking).

    Classes are merged per resolution first (many fall into one 1 min or 1 h bucket), and the
    global totals are summed apart, so each hash field is touched once per batch."""
    hashes, expire_at = out.hashes, out.expire_at
    names: dict[tuple[int, str, bool, int], tuple[str, ...]] = {}
    step = base_step(model.RESOLUTIONS)
    for res in model.RESOLUTIONS:
        keep, width = retention[res.name], res.window
        merged: Mapping[FoldKey, int] = classes
        if res.step != step:
            merged = Counter()
            for (domain, t, kind, bot, namespace), n in classes.items():
                merged[(domain, t - t % res.step, kind, bot, namespace)] += n
        everywhere: Counter[tuple[int, str, bool, int]] = Counter()
        for (domain, bucket, kind, bot, namespace), n in merged.items():
            window = bucket - bucket % width
            expires = window + width + keep
            if expires <= now:
                continue  # this resolution no longer keeps that window
            _add(hashes, expire_at, names, shard.series_key(domain, res, window), expires, (bucket, kind, bot, namespace), n)
            everywhere[(bucket, kind, bot, NO_NAMESPACE)] += n
        for dims, n in everywhere.items():
            window = dims[0] - dims[0] % width
            _add(hashes, expire_at, names, shard.series_key(keys.ALL_DOMAINS, res, window), window + width + keep, dims, n)
    rank_floor = now - keys.RANK_RETENTION
    for (domain, t, *_), n in classes.items():
        out.folded += n
        minute = t - t % keys.RANK_STEP
        if minute > rank_floor and domain != keys.OTHER_DOMAINS:  # the ranking lists real domains only
            rkey = shard.rank_key(minute)
            members = out.zsets.get(rkey)
            if members is None:
                members = out.zsets[rkey] = {}
                expire_at[rkey] = minute + keys.RANK_RETENTION
            members[domain] = members.get(domain, 0) + n


def _add(
    hashes: dict[str, dict[str, int]],
    expire_at: dict[str, int],
    names: dict[tuple[int, str, bool, int], tuple[str, ...]],
    key: str,
    expires: int,
    dims: tuple[int, str, bool, int],
    n: int,
) -> None:
    """Add n to the total, type and (for bots) bot fields of one bucket, and to its namespace's (keys.
    GRAPH_NAMESPACES); field names are made once per batch. Humans are not stored: human = total - bot."""
    fields = hashes.get(key)
    if fields is None:
        fields = hashes[key] = {}
        expire_at[key] = expires
    names_of = names.get(dims)
    if names_of is None:
        bucket, kind, bot, namespace = dims
        names_of = (keys.total_field(bucket), keys.dimension_field(bucket, kind))
        if bot:
            names_of += (keys.dimension_field(bucket, "bot"),)
        if namespace != NO_NAMESPACE:
            names_of += (keys.dimension_field(bucket, keys.namespace_dimension(namespace)),)
            if bot:
                names_of += (keys.dimension_field(bucket, keys.namespace_dimension(namespace, "bot")),)
        names[dims] = names_of
    for name in names_of:
        fields[name] = fields.get(name, 0) + n
