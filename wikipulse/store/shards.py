"""The deployment's shard count, recorded in Redis (keys.SHARDS_RECORD), and changing it on purpose.

SHARDS decides where every domain's keys live and, on one Redis, whether the publisher and the archiver keep their
state under the sharded names (keys.Layout). A process started with another count reads and writes another layout
beside the first: SHARDS 1 -> 3 -> 1 on one Redis folded 2,466 events twice (the publisher resumed from the first
layout's position and re-published what the second had), and nothing said so. So the first process that writes
records its count, and every process that depends on it (publisher and router, subscriber, archiver, page, `counts`,
`stats`, `trending`, `new-pages`, `up`) refuses another count with one line.

`python -m wikipulse shards --set N` changes it on purpose, with every process stopped (no lease held). It keeps what
the new layout cannot rebuild and drops what it would fold again:
  - kept: the ingest stream, the publisher's position, dedup window and counters, the archiver's consumer group and
    progress (renamed to the new layout's names where those differ), the spike alerts;
  - dropped: everything the fold made (series, rankings, trending, new pages, admitted domains, the subscribers' and
    routers' counters and leases, the shard streams) and the fold's consumer groups on the ingest stream (the
    subscribers' group on one Redis, the router's when sharded), which would otherwise resume at a stale place;
  - so the new layout folds again what the ingest stream still holds (its groups start at its first entry): counts
    restart from there, each event once; older buckets are empty (the archive keeps every event: `history`, `sql`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import RedisError, ResponseError

from wikipulse.core.errors import OperatorError
from wikipulse.core.settings import RedisSettings, ShardsSettings, redact_url
from wikipulse.store import keys
from wikipulse.store.connect import Client, SyncClient

logger = logging.getLogger(__name__)


def _recorded(raw: bytes | str | None) -> int | None:
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:
        return None  # not ours: refused below as a count that does not match


def refusal(raw: bytes | str | None, settings: RedisSettings) -> str | None:
    """Why a process with settings.shards must not run on a Redis whose record says `raw` (None: it may)."""
    if raw is None or _recorded(raw) == settings.shards:
        return None
    recorded = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
    return (
        f"Redis at {redact_url(settings.redis_url)} is a deployment of SHARDS={recorded}, not {settings.shards}: another "
        f"count reads and writes other keys beside it, and counts events twice. Set SHARDS={recorded}, or change it on "
        f"purpose: stop every process, then `python -m wikipulse shards --set {settings.shards}` (README: Changing SHARDS)"
    )


async def check_shards(client: Client, settings: RedisSettings, record: bool = True) -> None:
    """Refuse (OperatorError) a count other than the recorded one; with `record`, the first writer records its own."""
    if record:
        await client.set(keys.SHARDS_RECORD, settings.shards, nx=True)
    why = refusal(await client.get(keys.SHARDS_RECORD), settings)
    if why:
        raise OperatorError(why)


def check_shards_sync(client: SyncClient, settings: RedisSettings) -> None:
    """The page's check at start (it records nothing). A page started before Redis checks nothing: it reads only."""
    try:
        raw = client.get(keys.SHARDS_RECORD)
    except (RedisError, OSError):
        return
    why = refusal(raw, settings)
    if why:
        raise OperatorError(why)


# ---- changing it on purpose -----------------------------------------------------------------------------------------

# Keys the fold makes (keys.py), under either layout: `wp:ts:...`, and `wp:` or `wp:{TAG}:` then one of these.
_FOLD_PARTS = ("rank:", "trend:", "subscriber:", "router:")
_TAGGED = re.compile(r"wp:\{([^}]*)\}:(.*)", re.DOTALL)
_LEASE = re.compile(r"(^|:)(publisher:lease|router:lease|archiver:lease:.*|subscriber:consumer:.*)$", re.DOTALL)


def is_fold_key(key: str, stream: str) -> bool:
    """Whether `key` is something the fold made, which the new layout makes again (pure)."""
    if key.startswith(f"{keys.PREFIX}:ts:") or key in (keys.DOMAINS, f"{keys.PREFIX}:new") or key.startswith(f"{keys.PREFIX}:{{rank}}:"):
        return True
    tagged = _TAGGED.fullmatch(key)
    if tagged is None:
        return key.startswith(tuple(f"{keys.PREFIX}:{part}" for part in _FOLD_PARTS))
    tag, rest = tagged.groups()
    if tag in (keys.hash_tag(stream), "alerts"):  # the publisher's and archiver's keys, the alerts
        return False
    return rest in ("new", stream) or rest.startswith(_FOLD_PARTS)


def is_lease(key: str) -> bool:
    """A live process's lease (keys.py: publisher, router, archiver, consumer names): it lapses when the process stops."""
    return _LEASE.search(key) is not None


def ingest_prefixes(layout: keys.Layout) -> list[str]:
    """Where the publisher's and the archiver's keys live under `layout`: `wp:publisher:`, or `wp:{stream}:publisher:`."""
    return [layout.publisher.position.removesuffix("position"), layout.archiver_stats.removesuffix("stats")]


@dataclass
class Change:
    """What `shards --set` did, printed as JSON."""

    was: int | None
    now: int
    removed: int = 0  # fold keys deleted
    renamed: list[str] = field(default_factory=list)  # "old -> new"
    groups_destroyed: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {"was": self.was, "shards": self.now, "fold_keys_removed": self.removed, "renamed": self.renamed,
                "groups_destroyed": self.groups_destroyed}  # fmt: skip


async def _scan(client: Client) -> list[str]:
    return [k.decode(errors="replace") if isinstance(k, bytes) else k async for k in client.scan_iter(match=f"{keys.PREFIX}:*", count=1000)]


async def change_shards(client: Client, settings: ShardsSettings, new: int, cluster: bool) -> Change:
    """Record `new` as the deployment's count; see the module's docstring. OperatorError while a process runs."""
    was = _recorded(await client.get(keys.SHARDS_RECORD))
    found = await _scan(client)
    live = sorted(k for k in found if is_lease(k))
    if live:
        raise OperatorError(
            f"a wikipulse process still runs on this Redis (it holds {live[0]}{f' and {len(live) - 1} more' if len(live) > 1 else ''}): "
            "stop every process first (a killed one's lease lapses within LEASE_TTL)"
        )
    change = Change(was, new)
    if (was or settings.shards) == new:  # the same layout: record it, and keep the fold
        await client.set(keys.SHARDS_RECORD, new)
        return change
    old = keys.Layout(settings.stream, was or settings.shards, cluster)
    layout = keys.Layout(settings.stream, new, cluster)
    for group in dict.fromkeys((settings.group, old.router_group, layout.router_group)):
        try:
            if await client.xgroup_destroy(settings.stream, group):
                change.groups_destroyed.append(group)
        except ResponseError:  # no stream yet
            pass
    doomed = [k for k in found if is_fold_key(k, settings.stream)]
    for chunk in _chunks(doomed, 1000):
        await client.unlink(*chunk)  # a cluster client splits it by slot (its async pipeline's unlink is a coroutine: queues nothing)
    change.removed = len(doomed)
    for before, after in zip(ingest_prefixes(old), ingest_prefixes(layout), strict=True):
        if before == after:
            continue
        for key in (k for k in found if k.startswith(before)):  # one Redis only (a cluster's layout is always sharded)
            await client.rename(key, after + key.removeprefix(before))
            change.renamed.append(f"{key} -> {after + key.removeprefix(before)}")
    await client.set(keys.SHARDS_RECORD, new)
    logger.info("shards: %s -> %d; %d fold keys removed; the new layout folds the ingest stream again", was, new, change.removed)
    return change


def _chunks(items: list[str], size: int) -> Iterable[list[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
