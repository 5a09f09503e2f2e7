-- copy_parts(routes, parts, base, maxlen, keep, grace): each route's part of a batch (entries {id, {'data', json,
-- 'fold', summary}}) XADDed to its stream with the original ids, for the scripts that copy in Redis (routes_read.lua,
-- write.lua). KEYS[base + 3r - 2] and KEYS[base + 3r - 1] are route r's stream and counters. An id its stream holds
-- already (a batch copied again) is refused and counted as a duplicate; a route holds only what came after its start
-- (or its catch-up's end: route[2]). Each entry added is PUBLISHed on the route's channel when somebody listens (pub/sub:
-- a listener hears what is published while it listens), counted, and the stream trimmed (trim.lua).
-- Returns {added, refused, trim's reply} per route.
local function copy_parts(routes, parts, base, maxlen, keep, grace)
  local patterns = redis.call('PUBSUB', 'NUMPAT') > 0
  local results = {}
  for r, route in ipairs(routes) do
    local target, stats = KEYS[base + 3 * r - 2], KEYS[base + 3 * r - 1]
    local after = route[2]
    local added, refused, grew = 0, 0, {}
    local heard = patterns or #parts[r] > 0 and redis.call('PUBSUB', 'NUMSUB', target)[2] > 0
    for _, e in ipairs(parts[r]) do
      if id_after(e[1], after) then
        local f = e[2]
        local ok = redis.pcall('XADD', target, e[1], f[1], f[2], f[3], f[4])
        if type(ok) == 'table' and ok.err then
          if not string.find(ok.err, 'equal or smaller', 1, true) then return nil, ok.err end
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
  return results
end
