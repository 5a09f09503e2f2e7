-- KEYS: stream, seen zset, position, stats hash, rejected list, lease; with the routes' plan, their epoch key, then each
-- route's stream, counters and lease (in the order of the plan's filters).
-- ARGV: channel, stream maxlen, dedup window, JSON {"fold", "ids", "position", "counters", "status", "rejected", "keep",
--       "groups", "stream_keep", "grace_ms"},
--       lease token, lease ttl ms, the routes' plan (JSON, or ''), then the raw event frames. The frames go as plain ARGV items (no
--       re-encoding on either side); one script call costs the client one command to pack instead of two
--       per event. `fold` holds each frame's fold summary (keys.FOLD_FIELD), `ids` its meta.id ('' if none), `groups`
--       the consumer groups a new stream is created with (trimming.declared_groups).
-- The routes: with the copier's plan, when its group stands at the end of the stream, this batch is copied to them
-- here, and the group moved past it (route_inline.lua); else, or for a batch with an entry only its JSON can tell, the
-- copier's read copies it (routes_read.lua).
-- A full Redis refuses the whole call: Redis refuses a deny-oom command only while a script has written
-- nothing yet, and the first write here is the lease's SET (fence); the PUBLISHes come after every
-- XADD, so a full Redis can never publish frames that the stream then does not hold. The dedup window is checked here,
-- not only in this process's memory, so that two writers (a takeover, a second publisher by mistake)
-- cannot add an event twice; the lease fences out a publisher that lost it.
-- Returns {written, duplicates, 1 if a position was stored before, {routes copied}, group, trimmed unread, group, ...}
-- (see trim, store/trim.lua): no stored position where this process wrote one means Redis lost its data.
-- `after` is the position this process stored last (null: none it knows of). Another one stored means Redis lost this
-- process's last batches, and kept what came before them: a failover to a replica they had not reached yet. The call
-- then writes nothing and answers WPBEHIND <stored>: the publisher reads the feed again from there (its events of
-- those batches were in no stream, so nothing doubles), instead of going on from its own position past them.
local holder = fence(KEYS[6], ARGV[5], ARGV[6])
if holder then return redis.error_reply('WPLEASE ' .. holder) end
local channel, maxlen, window = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local p = cjson.decode(ARGV[4])
local stored = redis.call('GET', KEYS[3])
if stored and p['after'] ~= cjson.null and stored ~= p['after'] then return redis.error_reply('WPBEHIND ' .. stored) end
local folds, ids = p['fold'], p['ids']
local routes = ARGV[7] ~= '' and routes_at_end(KEYS[1], cjson.decode(ARGV[7])) or nil
local tests, parts
if routes then tests, parts = route_tests(routes['filters']) end
create_groups(KEYS[1], p['groups'])
local written, zadd, dups, last_added, wanted = {}, {}, 0, nil, {}
local had_position = redis.call('EXISTS', KEYS[3])
-- Which ids the window holds already: one ZMSCORE per 1,000 (a ZSCORE per event cost ~8% of the throughput).
local named, seen = {}, {}
for _, id in ipairs(ids) do if id ~= '' then named[#named + 1] = id end end
for i = 1, #named, 1000 do
  local scores = redis.call('ZMSCORE', KEYS[2], unpack(named, i, math.min(i + 999, #named)))
  for j = 1, #scores do if scores[j] then seen[named[i + j - 1]] = true end end
end
for i = 8, #ARGV do
  local id = ids[i - 7]
  if id ~= '' and seen[id] then
    dups = dups + 1
  else
    local fold = folds[i - 7]
    local entry = redis.call('XADD', KEYS[1], '*', 'data', ARGV[i], 'fold', fold)
    written[#written + 1] = ARGV[i]
    last_added = entry
    if tests then
      local h = fold_head(fold)
      if not h then tests = nil  -- Python's to judge: the copier's read copies this batch
      elseif sort_entry(tests, h, parts, i) then wanted[i] = entry end  -- frame i: for some route, the entry's id
    end
    if id ~= '' then
      zadd[#zadd + 1] = string.match(entry, '^%d+')
      zadd[#zadd + 1] = id
      if #zadd >= 1000 then redis.call('ZADD', KEYS[2], unpack(zadd)); zadd = {} end
    end
  end
end
if #zadd > 0 then redis.call('ZADD', KEYS[2], unpack(zadd)) end
redis.call('ZREMRANGEBYRANK', KEYS[2], 0, -(window + 1))
for _, frame in ipairs(written) do redis.call('PUBLISH', channel, frame) end
if p['position'] ~= cjson.null then redis.call('SET', KEYS[3], p['position']) end
if #written > 0 then redis.call('HINCRBY', KEYS[4], 'published', #written) end
if dups > 0 then redis.call('HINCRBY', KEYS[4], 'duplicates', dups) end
for name, n in pairs(p['counters']) do redis.call('HINCRBY', KEYS[4], name, n) end
for name, v in pairs(p['status']) do redis.call('HSET', KEYS[4], name, v) end
for _, r in ipairs(p['rejected']) do redis.call('LPUSH', KEYS[5], r) end
if #p['rejected'] > 0 then redis.call('LTRIM', KEYS[5], 0, tonumber(p['keep']) - 1) end
local copied = {}
if tests and #written > 0 then
  copied = copy_batch(KEYS[1], routes, parts, last_added, function(i) return wanted[i], ARGV[i], folds[i - 7] end)
end
local reply = {#written, dups, had_position, copied}
for _, v in ipairs(trim(KEYS[1], maxlen, KEYS[4], tonumber(p['stream_keep']), tonumber(p['grace_ms']))) do reply[#reply + 1] = v end
return reply
