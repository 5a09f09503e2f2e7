-- The copier's read, in Redis (route_reader.py): acknowledge its own pending entries up to ARGV[5] (the batch before,
-- copied), then XREADGROUP the next batch and hand back only the entries that some route may want: those whose fold
-- summary is well-formed and holds for some route's filter (ARGV[6], route_filters.lua_filters), and any whose summary
-- is not (the copier then reads their JSON, as route_filters.head_of does). Most entries thus never leave Redis: the
-- copier costs the publisher's process only what the routes hold.
-- KEYS: the ingest stream. ARGV: group, consumer, count (0: acknowledge only), start ('0' or an id: own pending
-- entries; '>': new), acknowledge up to (an id, or ''), filters.
-- Returns {entries read, the last one's id, how many of them were trimmed before they were read, {candidates}}.
-- READ_MAX (entries a read takes at most) and `kinds` (the event types, a set) are defined before it (route_reader.py).
local stream, group, consumer = KEYS[1], ARGV[1], ARGV[2]
if ARGV[5] ~= '' then
  local ids = {}
  for _, p in ipairs(redis.call('XPENDING', stream, group, '-', ARGV[5], 2 * READ_MAX, consumer)) do
    ids[#ids + 1] = p[1]
  end
  for i = 1, #ids, 1000 do redis.call('XACK', stream, group, unpack(ids, i, math.min(i + 999, #ids))) end
end
if tonumber(ARGV[3]) == 0 then return {0, '', 0, {}} end
local reply = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', ARGV[3], 'STREAMS', stream, ARGV[4])
if not reply or #reply[1][2] == 0 then return {0, '', 0, {}} end
local entries = reply[1][2]
local routes = cjson.decode(ARGV[6])
local out, trimmed = {}, 0
for _, e in ipairs(entries) do
  local f = e[2]
  if not f then
    trimmed = trimmed + 1
  else
    local fold
    for i = 1, #f, 2 do
      if f[i] == 'fold' then fold = f[i + 1] break end
    end
    local keep = true
    if fold then
      local head = fold
      local tab = string.find(fold, '\t', 1, true)
      if tab then head = string.sub(fold, 1, tab - 1) end
      local p = {string.match(head, '^([^ ]*) ([^ ]*) ([^ ]*) ([^ ]*) ([^ ]*)$')}
      if #p == 0 then
        p = {string.match(head, '^([^ ]*) ([^ ]*) ([^ ]*) ([^ ]*)$')}
        if #p == 4 then p[5] = '-' end
      end
      if #p == 5 and kinds[p[3]] and (p[4] == 'bot' or p[4] == 'human') then
        keep = false
        for _, clauses in ipairs(routes) do
          local all = true
          for _, c in ipairs(clauses) do
            if not c[2][p[c[1]]] then all = false break end
          end
          if all then keep = true break end
        end
      end
    end
    if keep then out[#out + 1] = e end
  end
end
return {#entries, entries[#entries][1], trimmed, out}
