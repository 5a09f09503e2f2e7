-- The exactly-once apply of one folded batch (series.SeriesWriter): its counts, its trending and new pages, its stats
-- and the XACK of the stream entries that produced them, in one atomic step. A crash before it leaves the entries
-- pending (they are folded again), a crash after it leaves them acknowledged (never folded again).
--
-- KEYS: [1] the stream, [2] the stats hash, [3] the claims counter (keys.CLAIMS), [4] the consumer name's lease, then
--   every key the payload writes, declared as Redis asks of scripts (on a cluster they all share the shard's slot):
--   the series hashes and ranking zsets, then the trending keys (trending.TrendIncrements.declared).
-- ARGV: [1] group, [2] consumer, [3] the claims count seen before the entries were read ('' if unknown),
--   [4] the payload (below), [5] the lease token ('' for none: pub/sub mode), [6] its ttl ms,
--   [7] the notice channel ('' for none), [8] the notice, PUBLISHed once the batch is applied.
--
-- The payload: one JSON object instead of thousands of ARGV items (packing each item costs the client far more than
-- cjson.decode costs Redis), of flat arrays (every nested object costs cjson a Lua table). A key no. of h and z is the
-- key's index in KEYS; one of t, g and n counts from tk (KEYS[tk + no.]), in the order of the trending keys.
--   ids    the stream ids of the batch's entries
--   stats  {name: n} added to the stats hash
--   h      per series hash: key no., expire_at, k, then k pairs: field, n (HINCRBY)
--   z      per ranking zset: key no., expire_at, k, then k pairs: member, n (ZINCRBY)
--   tk     the index in KEYS before the first trending key
--   t      per domain-minute: all, bot, editors key no., expire_at, cap, editors cap, n, then n pages: member, edits,
--          bot edits; then k, then k editor entries in the order of the stream: page no. (1..n), editor field, bytes
--          changed, edits
--   g      per shard-minute: all, bot key no., expire_at, cap, n, then n members: member, edits, bot edits
--   n      new-pages key no., how many to keep, k, then k pairs: event time, JSON item ([] for none)
--
-- Returns true once the batch is applied. Unless no entries were claimed anywhere since these were read (the claims
-- counter unchanged, the usual case), the entries are first XCLAIMed to this consumer (JUSTID, no idle floor): only
-- those still pending come back, so when another consumer acknowledged some of them, nothing is applied and the ids
-- this consumer still owns are returned, for a re-fold. A process whose consumer name was taken over by another (it
-- stalled past its lease) applies nothing: the error WPLEASE <holder>. A full Redis refuses the whole call: the
-- fence's SET (or, with no lease, HINCRBY) is its first write, and Redis refuses a deny-oom command while nothing is
-- written.

-- The ids of `ids` still pending for this consumer, after XCLAIMing them to it, 1,000 a call.
local function claim(stream, group, consumer, ids)
  local owned = {}
  for i = 1, #ids, 1000 do
    local args = {stream, group, consumer, 0}
    for j = i, math.min(i + 999, #ids) do args[#args + 1] = ids[j] end
    args[#args + 1] = 'JUSTID'
    for _, id in ipairs(redis.call('XCLAIM', unpack(args))) do owned[#owned + 1] = id end
  end
  return owned
end

-- The h section: HINCRBY each field, then EXPIREAT the hash.
local function add_hashes(h)
  local i = 1
  while i <= #h do
    local key, last = KEYS[h[i]], i + 2 + 2 * h[i + 2]
    for j = i + 3, last, 2 do redis.call('HINCRBY', key, h[j], h[j + 1]) end
    redis.call('EXPIREAT', key, h[i + 1])
    i = last + 1
  end
end

-- The z section: ZINCRBY each member, then EXPIREAT the zset.
local function add_zsets(z)
  local i = 1
  while i <= #z do
    local key, last = KEYS[z[i]], i + 2 + 2 * z[i + 2]
    for j = i + 3, last, 2 do redis.call('ZINCRBY', key, z[j + 1], z[j]) end
    redis.call('EXPIREAT', key, z[i + 1])
    i = last + 1
  end
end

-- The editor fields an editors hash holds: HLEN less the two rest fields.
local function editor_fields(keds)
  return redis.call('HLEN', keds) - redis.call('HEXISTS', keds, '\trest') - redis.call('HEXISTS', keds, '\trest_editors')
end

-- The t section, trending pages per domain-minute. A page past its minute's cap (keys.TREND_CAP) is counted in the
-- editors hash's "\trest" field only; an editor of an admitted page past the hash's cap of editor fields
-- (keys.TREND_EDITOR_CAP), in "\trest_editors" only. Both caps admit first come, in the order of the stream (the
-- editors are sent in it, not grouped by page), so a replay split into other batches admits the same. Bots, not
-- humans, are stored (a third of the edits): humans are read as everyone minus bots. An editor's bytes are the
-- page's bytes, so bytes and distinct editors cost one HINCRBY per editor of a page (HINCRBY by 0 still makes the
-- field: an editor who changed no byte is counted).
local function add_page_minutes(t, tk)
  local i = 1
  while i <= #t do
    local kall, kbot, keds = KEYS[tk + t[i]], KEYS[tk + t[i + 1]], KEYS[tk + t[i + 2]]
    local expire, cap, ecap, n = t[i + 3], t[i + 4], t[i + 5], t[i + 6]
    local card, rest, admitted = redis.call('ZCARD', kall), 0, {}
    i = i + 7
    for j = 1, n do
      local m, edits, bot = t[i], t[i + 1], t[i + 2]
      if card < cap or redis.call('ZSCORE', kall, m) then
        if tonumber(redis.call('ZINCRBY', kall, edits, m)) == edits then card = card + 1 end
        if bot > 0 then redis.call('ZINCRBY', kbot, bot, m) end
        admitted[j] = true
      else
        rest = rest + edits
      end
      i = i + 3
    end
    -- fields: at least the editor fields keds holds (HLEN counts the two rest fields too, and each admitted entry one,
    -- new or not); exact after a recount, which only a minute near its cap needs
    local k, fields, erest = t[i], redis.call('HLEN', keds), 0
    i = i + 1
    for _ = 1, k do
      local f, b = t[i + 1], t[i + 2]
      if admitted[t[i]] then
        if fields < ecap or redis.call('HEXISTS', keds, f) == 1 then
          redis.call('HINCRBY', keds, f, b)
          fields = fields + 1
        else
          fields = editor_fields(keds)
          if fields < ecap then
            redis.call('HINCRBY', keds, f, b)
            fields = fields + 1
          else
            erest = erest + t[i + 3]
          end
        end
      end
      i = i + 4
    end
    if rest > 0 then redis.call('HINCRBY', keds, '\trest', rest) end
    if erest > 0 then redis.call('HINCRBY', keds, '\trest_editors', erest) end
    redis.call('EXPIREAT', kall, expire)
    redis.call('EXPIREAT', kbot, expire)
    redis.call('EXPIREAT', keds, expire)
  end
end

-- The g section, trending pages over the shard's domains per minute (keys.TREND_GLOBAL_CAP), first come.
local function add_shard_minutes(g, tk)
  local i = 1
  while i <= #g do
    local kall, kbot, expire, cap, n = KEYS[tk + g[i]], KEYS[tk + g[i + 1]], g[i + 2], g[i + 3], g[i + 4]
    local card = redis.call('ZCARD', kall)
    i = i + 5
    for _ = 1, n do
      local m, edits, bot = g[i], g[i + 1], g[i + 2]
      if card < cap or redis.call('ZSCORE', kall, m) then
        if tonumber(redis.call('ZINCRBY', kall, edits, m)) == edits then card = card + 1 end
        if bot > 0 then redis.call('ZINCRBY', kbot, bot, m) end
      end
      i = i + 3
    end
    redis.call('EXPIREAT', kall, expire)
    redis.call('EXPIREAT', kbot, expire)
  end
end

-- The n section: a sorted set by event time keeps the newest `keep` whatever order batches are applied in (two
-- consumers of one stream interleave).
local function add_new_pages(new, tk)
  if #new == 0 then return end
  local key, keep, k = KEYS[tk + new[1]], new[2], new[3]
  for j = 4, 3 + 2 * k, 1000 do redis.call('ZADD', key, unpack(new, j, math.min(j + 999, 3 + 2 * k))) end
  redis.call('ZREMRANGEBYRANK', key, 0, -keep - 1)
end

local group, consumer, seen = ARGV[1], ARGV[2], ARGV[3]
if ARGV[5] ~= '' then
  local holder = fence(KEYS[4], ARGV[5], ARGV[6])
  if holder then return redis.error_reply('WPLEASE ' .. holder) end
end
local p = cjson.decode(ARGV[4])
local ids = p['ids']
-- No claim since the entries were read: they are all still ours. Else check them one by one.
if #ids > 0 and (seen == '' or (redis.call('GET', KEYS[3]) or '0') ~= seen) then
  local owned = claim(KEYS[1], group, consumer, ids)
  if #owned < #ids then return owned end
end
acknowledge(KEYS[1], group, ids)
for name, n in pairs(p['stats']) do redis.call('HINCRBY', KEYS[2], name, n) end
add_hashes(p['h'])
add_zsets(p['z'])
add_page_minutes(p['t'], p['tk'])
add_shard_minutes(p['g'], p['tk'])
add_new_pages(p['n'], p['tk'])
if ARGV[7] ~= '' then redis.call('PUBLISH', ARGV[7], ARGV[8]) end
return true
