-- KEYS: the route's stream (its name is also the channel's), its counters. ARGV: the first id the write added, how many
-- it added, how many it refused. PUBLISHes the added entries' JSON, read back from the stream, and counts.
local n = tonumber(ARGV[2])
if n > 0 then
  for _, entry in ipairs(redis.call('XRANGE', KEYS[1], ARGV[1], '+', 'COUNT', n)) do
    local f = entry[2]
    for i = 1, #f, 2 do
      if f[i] == 'data' then redis.call('PUBLISH', KEYS[1], f[i + 1]) break end
    end
  end
  redis.call('HINCRBY', KEYS[2], 'copied', n)
end
if tonumber(ARGV[3]) > 0 then redis.call('HINCRBY', KEYS[2], 'duplicates', ARGV[3]) end
return n
