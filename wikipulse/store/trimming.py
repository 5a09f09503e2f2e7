"""The stream's bounds and its consumer groups: created with the stream, trimmed by what they acknowledged.

The stream is a buffer, not a store. Two trims, both in the script that adds to it (the publisher's, the router's):

- **Acknowledged** (`STREAM_KEEP`): once the stream is a chunk (a tenth of the window, at most 1,000 entries) over
  `stream_keep` entries, the entries every consumer group is done with are trimmed, down to the newest `stream_keep`
  (a window for late listeners: XRANGE readers, the page's ticker, a consumer started a little late). A group is done
  with an entry that it had delivered and acknowledged: the oldest entry still pending in any group (XPENDING's
  smallest id) or not yet delivered to it (after its last delivered id) bounds the trim. When all that the groups
  still need is among the window's newest entries (consumers keeping up), it is `XTRIM MAXLEN` to the window, and no
  trimmed entry is read; else `XTRIM MINID` at the bound. Redis 8.2's `ACKED` trimming is the model; this works on
  6.2 (the embedded default) and 7.0, which have neither it nor group `lag`. Its cost a trimmed entry is about that
  of the hard cap's, which reads each entry it trims (BENCHMARKS.md).
- **The hard cap** (`STREAM_MAXLEN`): chunks of 1% of its length (at most 1,000 entries), exactly (MAXLEN =), once it
  is a chunk over, whether or not every group has read them, so a stopped consumer cannot fill Redis.

Entries trimmed before a group had them delivered are not lost silently: they are counted per group, exactly, in the
writer's stats hash (`trimmed_unread:<group>`: the chunk's ids are read first, and for each group those above its
last delivered id, XINFO GROUPS, were never delivered to it), logged, and shown by `stats` and the page. Entries
delivered but trimmed before they were acknowledged are the consumer's own `trimmed` counter.

Every consumer group a deployment runs (`STREAM_CONSUMERS`: the subscriber's and the archiver's by default, as `up`
and docker-compose run both) is created together with the stream, at its first entry, by whoever creates the stream
(the publisher's write, the router's, a consumer's group creation): a consumer started a second late misses nothing.
A declared group that no consumer has read yet (no consumer, nothing pending: its role is not running) holds only the
last `STREAM_GRACE` seconds of the stream (by entry id, which is the time it was added): older entries are trimmed
past it, counted in its `trimmed_unread`, so a role that is not run costs a bounded window, not the hard cap. Once a
consumer has read it, a group holds everything it has not acknowledged, up to the hard cap.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from redis.exceptions import ResponseError

from wikipulse.core.settings import StreamGroupsSettings
from wikipulse.store import keys
from wikipulse.store.connect import Client
from wikipulse.store.scripts import script

TRIMMED_UNREAD = "trimmed_unread:"  # + group name: a field of keys.PUBLISHER_STATS

# The scripts of trim.lua's functions (create_groups, trim): a consumer's group creation, the router's shard writes.
ENSURE_GROUP_SCRIPT = script(__package__, "ensure_group", "trim")
CREATE_GROUPS_SCRIPT = script(__package__, "create_groups", "trim")


def declared_groups(settings: StreamGroupsSettings, stream: str, sharded: bool) -> list[str]:
    """The consumer groups the deployment runs on `stream` (created with it). Sharded, the ingest stream
    (settings.stream) is read by the router and the archiver, each shard stream by the subscribers."""
    roles = settings.consumer_roles()
    ingest = stream == settings.stream
    groups = [keys.Layout(settings.stream).router_group] if sharded and ingest else []
    if "subscriber" in roles and not (sharded and ingest):
        groups.append(settings.group)
    if "archiver" in roles and ingest:
        groups.append(settings.archive_group)
    return list(dict.fromkeys(groups))


async def has_group(client: Client, stream: str, group: str) -> bool:
    try:
        infos = await client.xinfo_groups(stream)
    except ResponseError as exc:
        if "no such key" in str(exc).lower():
            return False
        raise
    names = {i["name"].decode() if isinstance(i["name"], bytes) else str(i["name"]) for i in infos}
    return group in names


async def ensure_group(client: Client, stream: str, group: str, declared: list[str], start: Callable[[], Awaitable[str]]) -> str | None:
    """Create `group` on `stream` if it is missing: with the stream and the declared groups (at 0) when the stream is
    new, else at `await start()` (asked only then). Returns how it was created ('0', '$', ...), or None if it existed."""
    if await has_group(client, stream, group):
        return None
    first = await start()
    how = int(await client.eval(ENSURE_GROUP_SCRIPT, 1, stream, group, first, *declared))
    return None if how == 0 else ("0" if how == 2 else first)


def trimmed_unread(publisher_stats: dict[str, object]) -> dict[str, int]:
    """{group: entries trimmed before they were delivered to it} from the decoded publisher stats."""
    return {k[len(TRIMMED_UNREAD) :]: int(str(v)) for k, v in publisher_stats.items() if k.startswith(TRIMMED_UNREAD)}
