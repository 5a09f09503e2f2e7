"""Every Redis key, field and retention of wikipulse, in one place.

Writers (publisher, subscriber) and the reader (dashboard, CLI) import their key
names from here only, so they cannot drift apart. The README documents the same
layout for `redis-cli` users.

Keys that hold per-domain data carry the domain as a Redis Cluster hash tag
(`{en.wikipedia.org}`), so one domain's keys share a slot; keys read together
across domains (the ranking) share the `{rank}` tag.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from functools import cached_property
from itertools import count

from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

from wikipulse.core.model import EVENT_TYPES, Resolution

PREFIX = "wp"

# Publisher state. The position and the dedup window are written in the same
# atomic script call as the events they describe, so they can never disagree with the stream.
POSITION = f"{PREFIX}:publisher:position"  # string: last SSE `id:` stored, verbatim
SEEN = f"{PREFIX}:publisher:seen"  # zset meta.id -> sequence no.; the dedup window
PUBLISHER_STATS = f"{PREFIX}:publisher:stats"  # hash of counters (see README)
REJECTED = f"{PREFIX}:publisher:rejected"  # list: last rejected frames, newest first
REJECTED_KEEP = 100  # rejected frames kept for inspection

# One publisher per Redis and feed: its lease (lease.py) holds the live publisher's token. A second
# publisher stands by until it lapses; the write script is fenced by it.
PUBLISHER_LEASE = f"{PREFIX}:publisher:lease"

# The deployment's shard count (settings.shards), as a string: recorded by the first process that writes, and every
# process that depends on it refuses another count (shards.py); `python -m wikipulse shards --set N` changes it.
SHARDS_RECORD = f"{PREFIX}:shards"

SUBSCRIBER_STATS = f"{PREFIX}:subscriber:stats"  # hash of counters
# Counter bumped by every claim of idle entries (XAUTOCLAIM, in one script with it). A batch read
# while it held E and applied while it still holds E cannot have lost entries to another consumer,
# so the apply script skips its per-entry ownership check (apply.lua).
CLAIMS = f"{PREFIX}:subscriber:claims"


# The archiver (archiver.py): its counters (`archived`, `inserts`, `rejected:<reason>`, `canaries`, `trimmed`, `updated_at`)
# and its lease, one archiver per consumer group.
ARCHIVER_STATS = f"{PREFIX}:archiver:stats"


def archiver_lease(group: str) -> str:
    return f"{PREFIX}:archiver:lease:{group}"


def archiver_batches(group: str) -> str:
    """List: the sizes of the batches read but not yet acknowledged, oldest first. A restarted archiver reads its
    pending entries again in exactly these batches, so a retried insert carries the same deduplication token."""
    return f"{PREFIX}:archiver:batches:{group}"


def consumer_lease(group: str, consumer: str) -> str:
    """The lease on a consumer name in a group: one live process per name, or two processes would
    take each other's in-flight entries for their own pending ones. The apply script is fenced by it."""
    return f"{PREFIX}:subscriber:consumer:{group}:{consumer}"


# Channel of the subscriber's notices: after each applied batch, in the same script, a small JSON
# {"folded": n, "domains": [up to 50 of the domains it moved], "shard": i, "from": the earliest 10 s bucket it
# moved}. The page is pushed an update on it (push.py) instead of polling, and sent only the buckets from "from" on
# (figure_patch.py); `redis-cli subscribe wp:notices` shows them.
NOTICES = f"{PREFIX}:notices"
NOTICE_DOMAINS = 50

# Trending pages (trending.py), folded in the same script as the counts. Per domain and minute (event time), in
# the domain's shard: `all` and `bot`, zsets "<namespace>\t<title>" -> edits (everyone, bots; humans are read as
# all - bot, ZUNION with weights 1 and -1); `byeditor`, a hash "<namespace>\t<title>\t<b|h><user>" -> bytes that
# editor changed on that page ("\trest": edits of pages past the cap), which gives a page's distinct editors and
# bytes changed. Per shard and minute, under the pseudo-domain ALL_DOMAINS: `all` and `bot` zsets
# "<domain>\t<ns>\t<title>". A minute's zset admits its first TREND_CAP pages (TREND_GLOBAL_CAP for the shard's);
# the edits of others are counted in `rest`. First come, not the top N: which pages are admitted then depends only
# on the order of the stream, so a replay folds the same lists (exactly-once), and a hot page is almost always
# among the first.

# Parts are never reused with another type: the release before kept zsets at `human` and `editors` and a hash at
# `bytes`, and a command on a key of the wrong type fails the apply script midway (scripts do not roll back).
TREND_PARTS = ("all", "bot", "byeditor")
TREND_CAP = 1000
TREND_GLOBAL_CAP = 3000
# A minute's byeditor hash admits its first 2,000 (page, editor) fields; the edits of later editors of its pages are
# counted in `rest_editors` (one page-minute of a flood reached 61,000 fields, 10 MB, kept an hour).
TREND_EDITOR_CAP = 2000
TREND_RETENTION = 3600 + 60  # an hour of minutes, and the current one
TREND_WINDOWS = (5, 60)  # minutes the lists are asked over
NEW_PAGES_KEEP = 500  # page creations kept per shard (every namespace; readers filter)

# Spikes (spikes.py): each alert goes to the capped stream ALERTS and is PUBLISHed on ALERTS_CHANNEL, as JSON
# {"domain", "minute", "rate", "baseline", "deviation", "top": [[title, edits], ...]}. The stream and the
# per-(domain, minute) markers that keep an alert from being raised twice share one hash tag.
ALERTS = f"{PREFIX}:{{alerts}}:stream"
ALERTS_CHANNEL = f"{PREFIX}:alerts"
ALERTS_KEEP = 1000


def alert_marker(domain: str, minute: int) -> str:
    return f"{PREFIX}:{{alerts}}:raised:{domain}:{minute}"


# The alert webhook (webhook.py, ALERT_WEBHOOK): one poster at a time (its lease) reads ALERTS and posts each alert
# once; its hash keeps `position` (the last entry handled: a restart neither posts again nor skips) and the
# counters `delivered` and `failed`. In the alerts' slot: the position is written in one script with the lease check.
ALERT_WEBHOOK_STATE = f"{PREFIX}:{{alerts}}:webhook"
ALERT_WEBHOOK_LEASE = f"{PREFIX}:{{alerts}}:webhook:lease"


# Fields of each entry of the stream (settings.stream): the raw JSON, and what the subscriber folds
# (summary.summarize: "<domain> <event time or -> <type> <bot|human>"), which the publisher has worked out
# already; entries that other writers add without it are folded from their JSON.
DATA_FIELD = "data"
FOLD_FIELD = "fold"

# The pseudo-domain that holds the totals over all domains. It cannot collide
# with a real domain: validated domains never contain "_".
ALL_DOMAINS = "_all"

# A flood of made-up domains must not exhaust memory: at most max_domains get series of
# their own (admitted in DOMAINS, domain -> unix time admitted); events of any other go to
# the pseudo-domain OTHER_DOMAINS (and to the totals), and are counted as `overflow`.
DOMAINS = f"{PREFIX}:domains"
OTHER_DOMAINS = "_other"

# What the hashes hold besides the total. Every event is a bot's or a human's, so humans are not
# stored but read as total - bot (series.SeriesRead): a third fewer writes and fields.
STORED_DIMENSIONS = (*EVENT_TYPES, "bot")


def namespace_dimension(namespace: int, who: str = "") -> str:
    """The series dimension of one namespace: everyone (who=''), "bot" or "human"."""
    return f"ns{namespace}{who}"


# Ranking of domains by activity: one sorted set per minute of event time,
# kept for an hour, so "top of the last 5 minutes / hour" is a ZUNION of them.
RANK_STEP = 60
RANK_RETENTION = 3600 + RANK_STEP


def window_start(res: Resolution, t: int) -> int:
    return t - t % res.window


def series_key(domain: str, res: Resolution, window: int) -> str:
    """Hash of counts for one domain, resolution and window.

    Fields: `<bucket start>` = total, `<bucket start>:<dimension>` = by type/bot."""
    return f"{PREFIX}:ts:{{{domain}}}:{res.name}:{window}"


def total_field(bucket: int) -> str:
    return str(bucket)


def dimension_field(bucket: int, dimension: str) -> str:
    return f"{bucket}:{dimension}"


def rank_key(minute: int) -> str:
    """Sorted set domain -> events in the minute starting at `minute`."""
    return f"{PREFIX}:{{rank}}:1m:{minute}"


# ---- Shards (Redis Cluster) ------------------------------------------------------------------------------------------
# On one Redis the keys are named as above. Sharded (on a cluster, or SHARDS > 1), the work is split into N shards,
# each one hash tag, so every atomic script keeps all its keys in one slot while the shards spread over the masters:
#   - the publisher writes one ingest stream (settings.stream) with its own keys tagged like it (PublisherKeys);
#   - the router (router.py) copies each entry, with its original id, to the stream of its domain's shard;
#   - a shard's consumers fold it into series and ranking keys tagged by the shard, with the shard's stats,
#     claims count and consumer-name leases in the same slot. `_all` and `_other` exist once per shard: readers sum them.


@dataclass(frozen=True)
class PublisherKeys:
    position: str
    seen: str
    stats: str
    rejected: str
    lease: str


UNSHARDED_PUBLISHER = PublisherKeys(POSITION, SEEN, PUBLISHER_STATS, REJECTED, PUBLISHER_LEASE)


def hash_tag(key: str) -> str:
    """The part of `key` that Redis Cluster hashes: the first non-empty {...}, else the whole key."""
    start = key.find("{")
    if start >= 0:
        end = key.find("}", start + 1)
        if end > start + 1:
            return key[start + 1 : end]
    return key


def shard_tag(index: int, shards: int) -> str:
    """The hash tag of shard `index` of `shards`: the first of s<i>, s<i>.1, s<i>.2, ... whose slot lies in the
    index-th Nth of the slot space. `redis-cli --cluster create` splits the slots evenly, so with as many shards as
    masters each shard lands on a master of its own."""
    for j in count():
        tag = f"s{index}" if j == 0 else f"s{index}.{j}"
        if key_slot(tag.encode()) * shards // REDIS_CLUSTER_HASH_SLOTS == index:
            return tag
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class Shard:
    """Where one shard's keys live. `tag` None: the single-node layout, keys named as they always were."""

    index: int
    tag: str | None
    stream: str  # the stream its consumers read

    def _key(self, name: str) -> str:
        return f"{PREFIX}:{{{self.tag}}}:{name}"

    def series_key(self, domain: str, res: Resolution, window: int) -> str:
        if self.tag is None:  # series_key's name, inline: this is called for every class of every batch
            return f"{PREFIX}:ts:{{{domain}}}:{res.name}:{window}"
        return f"{PREFIX}:ts:{{{self.tag}}}:{domain}:{res.name}:{window}"

    def rank_key(self, minute: int) -> str:
        return rank_key(minute) if self.tag is None else self._key(f"rank:1m:{minute}")

    def rank_keys(self, now: int, seconds: int) -> list[str]:
        last = now - now % RANK_STEP
        return [self.rank_key(m) for m in range(last - seconds + RANK_STEP, last + 1, RANK_STEP)]

    def trend_key(self, part: str, domain: str, minute: int) -> str:
        """One of a domain's (or, for ALL_DOMAINS, the shard's) trending keys of one minute (TREND_PARTS)."""
        if self.tag is None:
            return f"{PREFIX}:trend:{{{domain}}}:{part}:{minute}"
        return self._key(f"trend:{domain}:{part}:{minute}")

    def trend_keys(self, part: str, domain: str, now: int, minutes: int) -> list[str]:
        """The trend keys of the last `minutes` minutes, the current one included, oldest first."""
        last = now - now % RANK_STEP
        return [self.trend_key(part, domain, last - k * RANK_STEP) for k in reversed(range(minutes))]

    @property
    def new_pages(self) -> str:
        """The shard's newest page creations (NEW_PAGES_KEEP): a sorted set of JSON items by event time."""
        return f"{PREFIX}:new" if self.tag is None else self._key("new")

    @property
    def stats(self) -> str:
        """The shard's subscriber counters (SUBSCRIBER_STATS on one Redis)."""
        return SUBSCRIBER_STATS if self.tag is None else self._key("subscriber:stats")

    @property
    def claims(self) -> str:
        return CLAIMS if self.tag is None else self._key("subscriber:claims")

    def consumer_lease(self, group: str, consumer: str) -> str:
        return consumer_lease(group, consumer) if self.tag is None else self._key(f"subscriber:consumer:{group}:{consumer}")

    @property
    def router_lease(self) -> str:
        """Held by the one router that writes this shard's stream (router.py)."""
        return self._key("router:lease")

    @property
    def router_stats(self) -> str:
        """Counters of the router's writes to this shard: `routed`, `trimmed_unread:<group>` (trimming.py)."""
        return self._key("router:stats")


UNSHARDED = Shard(0, None, "")  # the single-node layout's keys (its stream is settings.stream)


@dataclass(frozen=True)
class Layout:
    """The deployment's key layout: one Redis (the default), or `shards` shards, on a cluster or not.
    The number of shards is fixed per deployment: it decides where every domain's keys live."""

    stream: str  # the stream the publisher writes (settings.stream)
    shards: int = 1
    cluster: bool = False

    @property
    def sharded(self) -> bool:
        return self.cluster or self.shards > 1

    @cached_property
    def all_shards(self) -> tuple[Shard, ...]:
        if not self.sharded:
            return (Shard(0, None, self.stream),)
        tags = [shard_tag(i, self.shards) for i in range(self.shards)]
        return tuple(Shard(i, tag, f"{PREFIX}:{{{tag}}}:{self.stream}") for i, tag in enumerate(tags))

    def shard_of(self, domain: str) -> Shard:
        """The shard that folds `domain` (crc32: stable across processes and Python versions)."""
        if self.shards == 1:
            return self.all_shards[0]
        return self.all_shards[zlib.crc32(domain.encode()) % self.shards]

    def shards_holding(self, domain: str) -> tuple[Shard, ...]:
        """Where a domain's series live: its shard; for the totals and _other, a share in every shard."""
        if domain in (ALL_DOMAINS, OTHER_DOMAINS):
            return self.all_shards
        return (self.shard_of(domain),)

    @cached_property
    def publisher(self) -> PublisherKeys:
        """The publisher's keys, in the ingest stream's slot (its write script touches them all)."""
        if not self.sharded:
            return UNSHARDED_PUBLISHER
        return PublisherKeys(*(self._ingest_key(f"publisher:{name}") for name in ("position", "seen", "stats", "rejected", "lease")))

    def _ingest_key(self, name: str) -> str:
        """A key in the ingest stream's slot (sharded), for what is written in one step with the stream."""
        return f"{PREFIX}:{{{hash_tag(self.stream)}}}:{name}"

    @property
    def archiver_stats(self) -> str:
        return self._ingest_key("archiver:stats") if self.sharded else ARCHIVER_STATS

    def archiver_batches(self, group: str) -> str:
        """Acknowledged in one MULTI with the ingest stream's XACK, so in its slot."""
        return self._ingest_key(f"archiver:batches:{group}") if self.sharded else archiver_batches(group)

    def archiver_lease(self, group: str) -> str:
        return self._ingest_key(f"archiver:lease:{group}") if self.sharded else archiver_lease(group)

    @property
    def router_group(self) -> str:
        """The consumer group the router reads the ingest stream with."""
        return "wikipulse-router"


# ---- Routes (routes.py) ----------------------------------------------------------------------------------------------
# A route is a named slice of the feed, declared by `python -m wikipulse route add`. Its definition lives in the hash
# ROUTES (name -> JSON {"where": [[field, [values]], ...], "start": id, "token": ...}), so every process sees the same
# set; at most MAX_ROUTES. The copier (in the publisher's process) reads the ingest stream with the consumer group
# ROUTES_GROUP and copies each matching entry, with its original id, to the route's stream, and PUBLISHes its JSON on
# the route's channel; ROUTES_LEASE makes it one copier at a time. Each route's stream is named `wiki:route:NAME` on any
# layout: without braces, Redis Cluster hashes the whole name, and the route's lease and counters carry that name as
# their hash tag, so each route has a slot of its own and its fenced write (router.ShardWriter) stays in one slot.
ROUTES = f"{PREFIX}:routes"
ROUTES_STATS = f"{PREFIX}:routes:stats"  # the copier's counters: `trimmed` (delivered, then trimmed before copied), `unreadable`
ROUTES_LEASE = f"{PREFIX}:routes:lease"
# The copier's current set of routes, for the publisher's write to copy its batch at once (one Redis only): the copier
# deletes it before it changes the set, and sets a new value after (ingest/route_inline.lua).
ROUTES_EPOCH = f"{PREFIX}:routes:epoch"
ROUTES_GROUP = "wikipulse-routes"
ROUTE_PREFIX = "wiki:route:"
MAX_ROUTES = 16


@dataclass(frozen=True)
class Route:
    """Where one route's keys live (the attribute names are router.Target's, so the router's writer writes it)."""

    name: str

    @property
    def stream(self) -> str:
        return f"{ROUTE_PREFIX}{self.name}"

    @property
    def channel(self) -> str:
        return f"{ROUTE_PREFIX}{self.name}"

    @property
    def router_lease(self) -> str:
        """Held by the copier that writes the route's stream; its write is fenced by it."""
        return f"{PREFIX}:{{{self.stream}}}:lease"

    @property
    def router_stats(self) -> str:
        """`copied`, `duplicates`, `trimmed_unread:<group>` (trimming.py), `live` (the definition's token once caught up)."""
        return f"{PREFIX}:{{{self.stream}}}:stats"
