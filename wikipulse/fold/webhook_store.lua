-- KEYS: the webhook's state hash, its lease. ARGV: lease token, lease ttl ms, position, the counter to bump ('' for
-- none), now. The position and the count of the alert it handled are written together, only by the lease's holder.
local holder = fence(KEYS[2], ARGV[1], ARGV[2])
if holder then return redis.error_reply('WPLEASE ' .. holder) end
redis.call('HSET', KEYS[1], 'position', ARGV[3], 'updated_at', ARGV[5])
if ARGV[4] ~= '' then redis.call('HINCRBY', KEYS[1], ARGV[4], 1) end
return 1
