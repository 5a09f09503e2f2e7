-- For write.lua: the publisher's batch copied to the routes in the same atomic step as its write, when the copier's
-- read has nothing left to copy before it (route_copier.py, "Copied at the write"). The plan (the copier's, JSON):
-- {"epoch", "token", "group", "consumer", "maxlen", "keep", "grace", "filters": route_filters.lua_filters}.
-- routes_at_end(stream, plan): the plan when this write may copy, else nil. It may when KEYS[7] holds the plan's epoch
-- (the copier clears it before it changes its set of routes, and sets a new one after: a write sent with an older plan
-- copies nothing), the copier holds every route's lease (KEYS[7 + 3r]), and its group stands at the end of the stream
-- with nothing pending (so no entry before this batch is left to copy, in Redis or in the copier's process). A lease is
-- only read here, never taken again: once one lapsed, the copier's read (which takes it) copies until it is renewed.
-- Every key it touches is checked for its type first (a key made by hand under a route's name): nothing in the copy
-- may fail, since the publisher's write must not (it is past its first writes here).
local function holds(key, value)
  return redis.pcall('GET', key) == value  -- another type: an error reply, a table
end
local function of_type(key, wanted)
  local t = redis.call('TYPE', key)['ok']
  return t == wanted or t == 'none'
end
local function routes_at_end(stream, plan)
  if not holds(KEYS[7], plan['epoch']) then return nil end
  for r = 1, #plan['filters'] do
    local at = 7 + 3 * r
    if not (holds(KEYS[at], plan['token']) and of_type(KEYS[at - 2], 'stream') and of_type(KEYS[at - 1], 'hash')) then return nil end
  end
  local ok, groups = pcall(stream_groups, stream)
  if not ok then return nil end
  local last = redis.call('XREVRANGE', stream, '+', '-', 'COUNT', 1)[1]
  for _, g in ipairs(groups) do
    if g['name'] == plan['group'] then
      if g['pending'] > 0 or not last or g['last-delivered-id'] ~= last[1] then return nil end
      -- What this write adds comes after each route's start (or catch-up's end): none is after the stream's end.
      for _, route in ipairs(plan['filters']) do
        if id_after(route[2], last[1]) then return nil end  -- (a start set by hand): the read skips up to it
        route[2] = nil
      end
      return plan
    end
  end
  return nil
end
-- copy_batch(stream, plan, parts, last, entry): each route's part copied (route_copy.lua), then the copier's group
-- moved past the batch (`last`: its last entry), so its read does not copy it again. Returns copy_parts' results. Should
-- an XADD fail all the same (routes_at_end checked the keys' types), it returns {} and leaves the group where it is:
-- the copier's read copies the batch (what was added now is refused there, counted as duplicates) and says what failed.
local function copy_batch(stream, plan, parts, last, entry)
  local results = copy_parts(plan['filters'], parts, 7, plan['maxlen'], plan['keep'], plan['grace'], entry)
  if not results then return {} end
  redis.call('XGROUP', 'CREATECONSUMER', stream, plan['group'], plan['consumer'])  -- trimming counts it as read (trim.lua)
  redis.call('XGROUP', 'SETID', stream, plan['group'], last)
  return results
end
