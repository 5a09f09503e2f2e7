-- The functions the scripts that add to a stream call (trimming.py says what they trim, and why): create_groups and
-- trim, each documented where it is defined; the others are their helpers.
local function id_after(a, b)
  local am, as = string.match(a, '^(%d+)-(%d+)$')
  local bm, bs = string.match(b, '^(%d+)-(%d+)$')
  am, as, bm, bs = tonumber(am), tonumber(as), tonumber(bm), tonumber(bs)
  return am > bm or (am == bm and as > bs)
end
-- create_groups(stream, groups): a stream that does not exist yet is created with `groups` (a Lua array of group
-- names), each at id 0; an existing one is left as it is.
local function create_groups(stream, groups)
  if #groups == 0 or redis.call('EXISTS', stream) == 1 then return end
  for _, g in ipairs(groups) do redis.call('XGROUP', 'CREATE', stream, g, '0', 'MKSTREAM') end
end
-- XINFO GROUPS of the stream: a Lua array of {field: value} tables.
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
-- trim(stream, maxlen, stats, keep, grace_ms): trims the entries every group is done with, down to the newest `keep`
-- (only when keep < maxlen; a declared group no consumer has read holds the last `grace_ms` ms of the stream, no more),
-- then the hard cap `maxlen`; counts in the `stats` hash (trimmed_unread:<group>) what each group lost before it had
-- it delivered. Returns {group, trimmed unread so far, ...} for each group that lost entries now (a group can be named
-- twice: the later total is the larger).
local function trim(stream, maxlen, stats, keep, grace_ms)
  local grew = {}
  if keep < maxlen then trim_acknowledged(stream, keep, grace_ms, stats, grew) end
  trim_cap(stream, maxlen, stats, grew)
  return grew
end
