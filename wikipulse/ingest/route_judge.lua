-- Judging an entry for the routes by its fold summary, exactly as route_filters.head_of reads a summary (the one
-- definition of its head), for the scripts that copy in Redis (routes_read.lua, write.lua). `kinds` (the event types,
-- a set) is defined before it (route_filters.LUA_KINDS).
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
local function fold_head(fold)
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
-- Each route's clauses (route_filters.lua_filters), flat: {part of the head, {value: 1}, ...}; and an empty part a route.
local function route_tests(routes)
  local tests, parts = {}, {}
  for r, route in ipairs(routes) do
    local t = {}
    for _, c in ipairs(route[1]) do t[#t + 1] = c[1]; t[#t + 1] = c[2] end
    tests[r], parts[r] = t, {}
  end
  return tests, parts
end
-- sort_entry(tests, h, parts, e): the entry `e` (its head `h`; an entry, or a number that stands for it) added to the
-- part of each route it belongs to; whether any route wants it.
local function sort_entry(tests, h, parts, e)
  local wanted = false
  for r = 1, #tests do
    local t, all = tests[r], true
    for i = 1, #t, 2 do
      if not t[i + 1][h[t[i]]] then all = false break end
    end
    if all then
      wanted = true
      local part = parts[r]
      part[#part + 1] = e
    end
  end
  return wanted
end
