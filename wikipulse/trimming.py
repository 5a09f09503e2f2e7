"""Trimming the stream to STREAM_MAXLEN, and counting what a consumer group lost to it.

The stream is a bounded buffer: it holds at most about `stream_maxlen` entries whether or not every
consumer group has read them, so a stopped consumer cannot fill Redis. Entries trimmed before a group
had them delivered are not lost silently: they are counted per group, exactly, in the publisher's
stats hash (`trimmed_unread:<group>`), logged by the publisher, and shown by `stats` and the page.

How the count is exact: a group's `lag` (XINFO GROUPS, Redis 7) is entries added minus entries
delivered to the group, and trimming does not change it; so while the group's last delivered id is
older than the stream's first entry, everything it has not had is either still there (XLEN) or was
trimmed: trimmed unread = lag - XLEN. Once the group reads past the gap the figure stays as it was.
(Entries delivered but trimmed before they were acknowledged are the subscriber's `trimmed`.)
"""

from __future__ import annotations

TRIMMED_UNREAD = "trimmed_unread:"  # + group name: a field of keys.PUBLISHER_STATS

# A Lua function for a script that adds to the stream: trim(stream, maxlen, stats hash) trims with
# MAXLEN ~ (whole listpack nodes: cheap) and returns {group, trimmed unread so far, ...} for each group
# whose count grew.
TRIM_LUA = """
local function id_before(a, b)
  local am, as = string.match(a, '^(%d+)-(%d+)$')
  local bm, bs = string.match(b, '^(%d+)-(%d+)$')
  am, as, bm, bs = tonumber(am), tonumber(as), tonumber(bm), tonumber(bs)
  return am < bm or (am == bm and as < bs)
end
local function trim(stream, maxlen, stats)
  if redis.call('XLEN', stream) <= maxlen then return {} end
  if redis.call('XTRIM', stream, 'MAXLEN', '~', maxlen) == 0 then return {} end
  local first = redis.call('XRANGE', stream, '-', '+', 'COUNT', 1)[1]
  local len = redis.call('XLEN', stream)
  local grew = {}
  for _, g in ipairs(redis.call('XINFO', 'GROUPS', stream)) do
    local info = {}
    for i = 1, #g, 2 do info[g[i]] = g[i + 1] end
    if first and info['lag'] and id_before(info['last-delivered-id'], first[1]) then
      local lost = info['lag'] - len
      local field = 'trimmed_unread:' .. info['name']
      if lost > tonumber(redis.call('HGET', stats, field) or '0') then
        redis.call('HSET', stats, field, lost)
        grew[#grew + 1] = info['name']
        grew[#grew + 1] = lost
      end
    end
  end
  return grew
end
"""


def trimmed_unread(publisher_stats: dict[str, object]) -> dict[str, int]:
    """{group: entries trimmed before they were delivered to it} from the decoded publisher stats."""
    return {k[len(TRIMMED_UNREAD) :]: int(str(v)) for k, v in publisher_stats.items() if k.startswith(TRIMMED_UNREAD)}
