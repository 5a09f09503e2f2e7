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

TRIMMED_UNREAD = "trimmed_unread:"  # + group name: a field of keys.PUBLISHER_STATS

# Lua functions for the scripts that add to the stream:
# - create_groups(stream, groups): a stream that does not exist yet is created with `groups`, each at id 0;
# - trim(stream, maxlen, stats hash, keep, grace ms) trims what there is to trim (above), and returns {group, trimmed
#   unread so far, ...} for each group that lost entries (a group can be named twice: the later total is the larger).
TRIM_LUA = """
local function id_after(a, b)
  local am, as = string.match(a, '^(%d+)-(%d+)$')
  local bm, bs = string.match(b, '^(%d+)-(%d+)$')
  am, as, bm, bs = tonumber(am), tonumber(as), tonumber(bm), tonumber(bs)
  return am > bm or (am == bm and as > bs)
end
local function create_groups(stream, groups)
  if #groups == 0 or redis.call('EXISTS', stream) == 1 then return end
  for _, g in ipairs(groups) do redis.call('XGROUP', 'CREATE', stream, g, '0', 'MKSTREAM') end
end
local function stream_groups(stream)
  local out = {}
  for _, g in ipairs(redis.call('XINFO', 'GROUPS', stream)) do
    local info = {}
    for i = 1, #g, 2 do info[g[i]] = g[i + 1] end
    out[#out + 1] = info
  end
  return out
end
-- head: the oldest entries, about to be trimmed; each group's entries among them after its last delivered id are counted.
local function count_unread(head, groups, stats, grew)
  local last = head[#head][1]
  for _, info in ipairs(groups) do
    local delivered = info['last-delivered-id']
    if id_after(last, delivered) then
      local lost = 0
      for i = #head, 1, -1 do
        if not id_after(head[i][1], delivered) then break end
        lost = lost + 1
      end
      local total = redis.call('HINCRBY', stats, 'trimmed_unread:' .. info['name'], lost)
      grew[#grew + 1] = info['name']
      grew[#grew + 1] = total
    end
  end
end
-- The oldest id any group still needs (entries from it on stay), or nil without groups; and whether a group was let
-- go of (then what is trimmed must be read, to count what it loses). A group needs its oldest pending entry and what
-- follows its last delivered id (that id itself is kept: one entry, and no id arithmetic).
local function oldest_needed(stream, groups, grace_ms)
  local newest = redis.call('XREVRANGE', stream, '+', '-', 'COUNT', 1)[1][1]
  local floor = string.format('%.0f-0', math.max(0, tonumber(string.match(newest, '^(%d+)')) - grace_ms))
  local bound, lapsed = nil, false
  for _, info in ipairs(groups) do
    local need = info['last-delivered-id']
    if info['pending'] > 0 then
      local oldest = redis.call('XPENDING', stream, info['name'])[2]
      if oldest and id_after(need, oldest) then need = oldest end
    elseif info['consumers'] == 0 and id_after(floor, need) then
      need, lapsed = floor, true  -- declared, never read: it holds the last grace_ms of the stream, no more
    end
    if bound == nil or id_after(bound, need) then bound = need end
  end
  return bound, lapsed
end
local function trim_acknowledged(stream, keep, grace_ms, stats, grew)
  local chunk = math.max(1, math.min(1000, math.floor(keep / 10)))
  local excess = redis.call('XLEN', stream) - keep
  if excess < chunk then return end
  local groups = stream_groups(stream)
  local bound, lapsed = oldest_needed(stream, groups, grace_ms)
  -- At most 10,000 entries a call: a backlog a group let go of is trimmed over a few writes, not in one long script.
  local n = math.min(excess, 10000)
  -- A group that holds the oldest entry (stopped, or behind): one entry read a write, nothing trimmed.
  if bound ~= nil then
    local first = redis.call('XRANGE', stream, '-', bound, 'COUNT', 1)[1]
    if first == nil or not id_after(bound, first[1]) then return end
  end
  -- The usual case, consumers keeping up: what some group still needs is a few newest entries, all within the
  -- window, so the window is what stays (MAXLEN); nothing is read but those few, no trimmed entry is copied into Lua.
  local few = math.min(keep, 200)
  if bound == nil or (not lapsed and #redis.call('XRANGE', stream, bound, '+', 'COUNT', few + 1) <= few) then
    redis.call('XTRIM', stream, 'MAXLEN', keep + excess - n)
    return
  end
  -- Else the oldest `n` entries, those before the bound only, read (to count what a group let go of loses): MINID the
  -- first one kept.
  local head = redis.call('XRANGE', stream, '-', bound, 'COUNT', n + 1)
  if #head == 0 then return end
  local target = bound
  if #head == n + 1 then target = head[#head][1] end
  if not id_after(target, head[#head][1]) then head[#head] = nil end
  if #head == 0 then return end
  count_unread(head, groups, stats, grew)
  redis.call('XTRIM', stream, 'MINID', target)
end
local function trim_cap(stream, maxlen, stats, grew)
  local chunk = math.max(1, math.min(1000, math.floor(maxlen / 100)))
  local excess = redis.call('XLEN', stream) - maxlen
  if excess < chunk then return end
  local head = redis.call('XRANGE', stream, '-', '+', 'COUNT', excess)
  count_unread(head, stream_groups(stream), stats, grew)
  redis.call('XTRIM', stream, 'MAXLEN', maxlen)
end
local function trim(stream, maxlen, stats, keep, grace_ms)
  local grew = {}
  if keep < maxlen then trim_acknowledged(stream, keep, grace_ms, stats, grew) end
  trim_cap(stream, maxlen, stats, grew)
  return grew
end
"""

# A consumer's group creation. KEYS: the stream. ARGV: the group, where it starts if it is new, then the declared
# groups. A new stream is created with the declared groups (at 0); then the group, if still missing, at its start.
# Returns 0: it existed; 1: created at its start; 2: created with the stream.
ENSURE_GROUP_SCRIPT = (
    TRIM_LUA
    + """
local declared = {}
for i = 3, #ARGV do declared[#declared + 1] = ARGV[i] end
local new = redis.call('EXISTS', KEYS[1]) == 0
create_groups(KEYS[1], declared)
if redis.call('EXISTS', KEYS[1]) == 1 then
  for _, info in ipairs(stream_groups(KEYS[1])) do
    if info['name'] == ARGV[1] then return new and 2 or 0 end
  end
end
redis.call('XGROUP', 'CREATE', KEYS[1], ARGV[1], ARGV[2], 'MKSTREAM')
return 1
"""
)

# The router's shard writes: KEYS: the shard stream. ARGV: the declared groups.
CREATE_GROUPS_SCRIPT = TRIM_LUA + "local g = {} for i = 1, #ARGV do g[i] = ARGV[i] end create_groups(KEYS[1], g) return 0"

ROLES = ("subscriber", "archiver")  # the consumers a deployment can run on the stream (settings.stream_consumers)


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
