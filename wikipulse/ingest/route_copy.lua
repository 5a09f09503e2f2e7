-- copy_parts(routes, parts, base, maxlen, keep, grace, entry): each route's part of a batch XADDed to its stream with
-- the original ids, for the scripts that copy in Redis (routes_read.lua, write.lua). A part holds what `entry` turns
-- into an entry's id, JSON and summary (a read's entries; the write's frame numbers: no table is made for an entry
-- that no route wants, which cost the write ~2.5 µs an event). KEYS[base + 3r - 2] and KEYS[base + 3r - 1] are route
-- r's stream and counters. An id its stream holds already (a batch copied again) is refused and counted as a
-- duplicate; a route holds only what came after its start (or its catch-up's end: route[2]; nil: all of it does).
-- Each entry added is PUBLISHed on the route's channel when somebody listens (pub/sub: a listener hears what is
-- published while it listens), counted, and the stream trimmed (trim.lua).
-- Returns {added, refused, trim's reply} per route; nil and the error when an XADD failed otherwise.
local function copy_parts(routes, parts, base, maxlen, keep, grace, entry)
  local patterns = redis.call('PUBSUB', 'NUMPAT') > 0
  local results = {}
  for r, route in ipairs(routes) do
    local target, stats = KEYS[base + 3 * r - 2], KEYS[base + 3 * r - 1]
    local after = route[2]
    local added, refused, grew = 0, 0, {}
    local heard = patterns or #parts[r] > 0 and redis.call('PUBSUB', 'NUMSUB', target)[2] > 0
    for _, x in ipairs(parts[r]) do
      local id, json, summary = entry(x)
      if not after or id_after(id, after) then
        local ok = redis.pcall('XADD', target, id, 'data', json, 'fold', summary)
        if type(ok) == 'table' and ok.err then
          if not string.find(ok.err, 'equal or smaller', 1, true) then return nil, ok.err end
          refused = refused + 1
        else
          added = added + 1
          if heard then redis.call('PUBLISH', target, json) end
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
