-- The copier's read, in Redis (route_reader.py): XREADGROUP the next batch, judge each entry by its fold summary, and
-- either copy it here to every route it belongs to (`copy`: one Redis, where the routes' streams live beside the
-- ingest stream), or hand back only the entries some route may want, for the copier to copy (a cluster: each route's
-- stream is in a slot of its own, out of this script's reach).
-- KEYS: the ingest stream; with `copy`, then each route's stream, counters and lease, in the order of the filters.
-- ARGV: group, consumer, count (0: acknowledge only), start ('0' or an id: own pending entries; '>': new), acknowledge
-- up to (an id, or ''), filters (route_filters.lua_filters: per route, its clauses and the id it starts after), copy
-- ('1' or '0'), then with `copy`: lease token, lease ttl ms, maxlen, keep, grace ms (the routes' trimming, trim.lua).
-- Returns {entries read, the last one's id (none read: the group's last delivered id, when known), how many of them
-- were trimmed before they were read, {handed over}, {added, refused, trim's reply} per route when copied here, else {}}.
-- An entry is judged here only by a summary written as the publisher writes it (its fields `data`, `fold`; the head
-- as route_filters.head_of checks it, domain included). A batch with one that is not (written by another tool, or
-- crafted) is not copied here: it is handed over, for the copier to judge those by their JSON, as the subscriber folds
-- them, and to copy the batch in order. So Python's reading of a summary (route_filters) and this one agree on every
-- entry copied here.
-- Copied here, each entry is XADDed with its original id: one a route's stream holds already (the batch was copied,
-- then the copier was killed before its acknowledgement) is refused and counted as a duplicate. The batch is then
-- acknowledged here, and each route's lease fences the whole script (its first writes), as it fences the copier's own
-- writes (router.ShardWriter). The channel hears the entries added, after the write (pub/sub: at most once).
-- READ_MAX (entries a read takes at most) is defined before it (route_reader.py), and the functions of fence.lua,
-- trim.lua, acknowledge.lua, route_judge.lua and route_copy.lua.
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
if #entries == 0 then return {0, delivered or '', 0, {}, {}} end

local function head_of(f)
  if #f ~= 4 or f[1] ~= 'data' or f[3] ~= 'fold' then return nil end
  return fold_head(f[4])
end
local tests, parts = route_tests(routes)

local out, trimmed, judged = {}, 0, true
for _, e in ipairs(entries) do
  local f = e[2]
  if not f then
    trimmed = trimmed + 1
  else
    local p = head_of(f)
    if not p then judged = false end
    if not p or sort_entry(tests, p, parts, e) then out[#out + 1] = e end
  end
end
local last = entries[#entries][1]
if not (copy and judged) then
  if delivered then  -- read by XRANGE: delivered to the group now, to be handed over (pending until acknowledged)
    redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', #entries, 'STREAMS', stream, '>')
  end
  return {#entries, last, trimmed, out, {}}
end

local function entry(e) return e[1], e[2][2], e[2][4] end  -- head_of checked its fields: data, fold
local results, err = copy_parts(routes, parts, 1, tonumber(ARGV[10]), tonumber(ARGV[11]), tonumber(ARGV[12]), entry)
if not results then return redis.error_reply(err) end
if delivered then
  redis.call('XGROUP', 'SETID', stream, group, last)
else  -- own pending entries (a batch handed over, not acknowledged yet)
  local ids = {}
  for i, e in ipairs(entries) do ids[i] = e[1] end
  acknowledge(stream, group, ids)
end
return {#entries, last, trimmed, {}, results}
