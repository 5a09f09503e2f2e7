-- KEYS: the lease. ARGV: the holder it may have (ours, to renew it; a dead one's, to take over), our token, ttl ms.
-- Takes the lease when it is free or held by that holder; returns the holder after.
local holder = redis.call('GET', KEYS[1])
if not holder or holder == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return ARGV[2]
end
return holder
