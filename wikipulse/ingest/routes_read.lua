-- The copier's read, in Redis (route_reader.py): XREADGROUP the next batch, judge each entry by its fold summary, and
-- either copy it here to every route it belongs to (`copy`: one Redis, where the routes' streams live beside the
-- ingest stream), or hand back only the entries some route may want, for the copier to copy (a cluster: each route's
-- stream is in a slot of its own, out of this script's reach).
-- KEYS: the ingest stream; with `copy`, then each route's stream, counters and lease, in the order of the filters.
-- ARGV: group, consumer, count (0: acknowledge only), start ('0' or an id: own pending entries; '>': new), acknowledge
-- up to (an id, or ''), filters (route_filters.lua_filters: per route, its clauses and the id it starts after), copy
-- ('1' or '0'), then with `copy`: lease token, lease ttl ms, maxlen, keep, grace ms (the routes' trimming, trim.lua).
-- Returns {entries read, the last one's id, how many of them were trimmed before they were read, {handed over},
-- {added, refused, trim's reply} per route when copied here, else {}}.
-- An entry is judged here only by a summary written as the publisher writes it (its fields `data`, `fold`; the head
-- as route_filters.head_of checks it, domain included). A batch with one that is not (written by another tool, or
-- crafted) is not copied here: it is handed over, for the copier to judge those by their JSON, as the subscriber folds
-- them, and to copy the batch in order. So Python's reading of a summary (route_filters) and this one agree on every
-- entry copied here.
-- Copied here, each entry is XADDed with its original id: one a route's stream holds already (the batch was copied,
-- then the copier was killed before its acknowledgement) is refused and counted as a duplicate. The batch is then
-- acknowledged here, and each route's lease fences the whole script (its first writes), as it fences the copier's own
-- writes (router.ShardWriter). The channel hears the entries added, after the write (pub/sub: at most once).
-- READ_MAX (entries a read takes at most) and `kinds` (the event types, a set) are defined before it (route_reader.py),
-- and fence.lua's, trim.lua's and acknowledge.lua's functions.
local stream, group, consumer = KEYS[1], ARGV[1], ARGV[2]
local routes = cjson.decode(ARGV[6])
local copy = ARGV[7] == '1'
if copy then
  for r = 1, #routes do
    local holder = fence(KEYS[3 * r + 1], ARGV[8], ARGV[9])
    if holder then return redis.error_reply('WPLEASE ' .. holder) end
  end
end
if ARGV[5] ~= '' then
  local ids = {}
  for _, p in ipairs(redis.call('XPENDING', stream, group, '-', ARGV[5], 2 * READ_MAX, consumer)) do
    ids[#ids + 1] = p[1]
  end
  acknowledge(stream, group, ids)
end
if tonumber(ARGV[3]) == 0 then return {0, '', 0, {}, {}} end
-- New entries to copy here: read with XRANGE from the group's last delivered id, which the copy then moves on (XGROUP
-- SETID): no pending entries to keep and acknowledge (that cost Redis as much as the copies). The consumer is made, so
-- that trimming counts the group as read (trim.lua: else it would hold only the last STREAM_GRACE of the stream).
local entries, delivered
if copy and ARGV[4] == '>' then
  local ok, groups = pcall(stream_groups, stream)
  for _, g in ipairs(ok and groups or {}) do
    if g['name'] == group then delivered = g['last-delivered-id'] end
  end
  if not delivered then return redis.error_reply("NOGROUP No such key '" .. stream .. "' or consumer group '" .. group .. "'") end
  redis.call('XGROUP', 'CREATECONSUMER', stream, group, consumer)
  entries = redis.call('XRANGE', stream, '(' .. delivered, '+', 'COUNT', ARGV[3])
else
  local reply = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', ARGV[3], 'STREAMS', stream, ARGV[4])
  entries = reply and reply[1][2] or {}
end
if #entries == 0 then return {0, '', 0, {}, {}} end

-- A host name as core/events.py's _HOSTNAME takes it (labels of a-z 0-9 and inner '-', 63 at most, 253 in all), not
-- the canary's: else the entry is Python's to judge.
local domains = {}
local function domain_ok(d)
  local ok = domains[d]
  if ok ~= nil then return ok end
  ok = #d >= 1 and #d <= 253 and d ~= 'canary'
  if ok then
    for label in string.gmatch(d .. '.', '([^.]*)%.') do
      if #label < 1 or #label > 63 or string.find(label, '[^a-z0-9-]') or string.find(label, '^-') or string.find(label, '-$') then
        ok = false
        break
      end
    end
  end
  domains[d] = ok
  return ok
end
-- The head {domain, time, type, bot|human, namespace} of a summary written as the publisher writes it, else nil: the
-- summary up to its first tab in exactly five parts split at spaces (four: written before the namespace was), none
-- with other white space in it (Python's split would keep that in a part: such an entry is Python's to judge). One
-- table for every entry, filled anew (the time is not read: no route filters on it).
local match, byte = string.match, string.byte
local head = {'', '-', '', '', ''}
local function head_of(f)
  if #f ~= 4 or f[1] ~= 'data' or f[3] ~= 'fold' then return nil end
  local fold = f[4]
  local domain, kind, who, ns, at = match(fold, '^(%S*) %S* (%S*) (%S*) (%S*)()')
  if not domain then
    domain, kind, who, at = match(fold, '^(%S*) %S* (%S*) (%S*)()')
    ns = '-'
  end
  if not domain or (at <= #fold and byte(fold, at) ~= 9) then return nil end  -- then a tab, or the end
  if not (kinds[kind] and (who == 'bot' or who == 'human')) then return nil end
  local ok = domains[domain]
  if ok == nil then ok = domain_ok(domain) end
  if not ok then return nil end
  head[1], head[3], head[4], head[5] = domain, kind, who, ns
  return head
end
-- Each route's clauses, flat: {part of the head, {value: 1}, ...}
local tests = {}
for r, route in ipairs(routes) do
  local t = {}
  for _, c in ipairs(route[1]) do t[#t + 1] = c[1]; t[#t + 1] = c[2] end
  tests[r] = t
end
local nroutes = #routes

local out, trimmed, judged = {}, 0, true
local parts = {}
for r = 1, #routes do parts[r] = {} end
for _, e in ipairs(entries) do
  local f = e[2]
  if not f then
    trimmed = trimmed + 1
  else
    local p = head_of(f)
    local keep = p == nil
    if p then
      for r = 1, nroutes do
        local t, all = tests[r], true
        for i = 1, #t, 2 do
          if not t[i + 1][p[t[i]]] then all = false break end
        end
        if all then
          keep = true
          local part = parts[r]
          part[#part + 1] = e
        end
      end
    else
      judged = false
    end
    if keep then out[#out + 1] = e end
  end
end
local last = entries[#entries][1]
if not (copy and judged) then
  if delivered then  -- read by XRANGE: delivered to the group now, to be handed over (pending until acknowledged)
    redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', #entries, 'STREAMS', stream, '>')
  end
  return {#entries, last, trimmed, out, {}}
end

local maxlen, keep, grace = tonumber(ARGV[10]), tonumber(ARGV[11]), tonumber(ARGV[12])
local patterns = redis.call('PUBSUB', 'NUMPAT') > 0
local results = {}
for r, route in ipairs(routes) do
  local target, stats = KEYS[3 * r - 1], KEYS[3 * r]
  local after = route[2]
  local added, refused, grew = 0, 0, {}
  -- Nobody listening, nothing to publish (pub/sub: a listener hears what is published while it listens).
  local heard = patterns or #parts[r] > 0 and redis.call('PUBSUB', 'NUMSUB', target)[2] > 0
  for _, e in ipairs(parts[r]) do
    if id_after(e[1], after) then  -- a route holds only what came after its start (or its catch-up's end)
      local f = e[2]
      local ok = redis.pcall('XADD', target, e[1], f[1], f[2], f[3], f[4])
      if type(ok) == 'table' and ok.err then
        if not string.find(ok.err, 'equal or smaller', 1, true) then return redis.error_reply(ok.err) end
        refused = refused + 1
      else
        added = added + 1
        if heard then redis.call('PUBLISH', target, f[2]) end
      end
    end
  end
  if added > 0 then redis.call('HINCRBY', stats, 'copied', added) end
  if refused > 0 then redis.call('HINCRBY', stats, 'duplicates', refused) end
  if added > 0 then grew = trim(target, maxlen, stats, keep, grace) end
  results[r] = {added, refused, grew}
end
if delivered then
  redis.call('XGROUP', 'SETID', stream, group, last)
else  -- own pending entries (a batch handed over, not acknowledged yet)
  local ids = {}
  for i, e in ipairs(entries) do ids[i] = e[1] end
  acknowledge(stream, group, ids)
end
return {#entries, last, trimmed, {}, results}
