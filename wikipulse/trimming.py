"""Trimming the stream to STREAM_MAXLEN, and counting what a consumer group lost to it.

The stream is a bounded buffer: it holds about `stream_maxlen` entries whether or not every consumer
group has read them, so a stopped consumer cannot fill Redis. Entries trimmed before a group had them
delivered are not lost silently: they are counted per group, exactly, in the publisher's stats hash
(`trimmed_unread:<group>`), logged by the publisher, and shown by `stats` and the page.

How: the stream is trimmed in chunks of 1% of its length (at most 1,000 entries), exactly (MAXLEN =), once it is a
chunk over its length; the chunk's ids are read first, and for each group those above the group's
last delivered id (XINFO GROUPS) were never delivered to it. This works on Redis 6.2 (the embedded
default), which has no group `lag`. Entries delivered but trimmed before they were acknowledged are
the subscriber's own `trimmed` counter.
"""

from __future__ import annotations

TRIMMED_UNREAD = "trimmed_unread:"  # + group name: a field of keys.PUBLISHER_STATS

# A Lua function for a script that adds to the stream: trim(stream, maxlen, stats hash) trims a chunk
# once there is one to trim, and returns {group, trimmed unread so far, ...} for each group that lost entries.
TRIM_LUA = """
local function id_after(a, b)
  local am, as = string.match(a, '^(%d+)-(%d+)$')
  local bm, bs = string.match(b, '^(%d+)-(%d+)$')
  am, as, bm, bs = tonumber(am), tonumber(as), tonumber(bm), tonumber(bs)
  return am > bm or (am == bm and as > bs)
end
local function trim(stream, maxlen, stats)
  local chunk = math.max(1, math.min(1000, math.floor(maxlen / 100)))
  local excess = redis.call('XLEN', stream) - maxlen
  if excess < chunk then return {} end
  local head = redis.call('XRANGE', stream, '-', '+', 'COUNT', excess)
  local last = head[#head][1]
  local grew = {}
  for _, g in ipairs(redis.call('XINFO', 'GROUPS', stream)) do
    local info = {}
    for i = 1, #g, 2 do info[g[i]] = g[i + 1] end
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
  redis.call('XTRIM', stream, 'MAXLEN', maxlen)
  return grew
end
"""


def trimmed_unread(publisher_stats: dict[str, object]) -> dict[str, int]:
    """{group: entries trimmed before they were delivered to it} from the decoded publisher stats."""
    return {k[len(TRIMMED_UNREAD) :]: int(str(v)) for k, v in publisher_stats.items() if k.startswith(TRIMMED_UNREAD)}
