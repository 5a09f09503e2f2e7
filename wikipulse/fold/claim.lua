-- Claims idle entries and bumps keys.CLAIMS in one step, so a consumer whose entries could have been
-- taken sees it (apply.lua). KEYS: stream, keys.CLAIMS. ARGV: group, consumer, min idle ms,
-- start id, count. Returns XAUTOCLAIM's reply.
local reply = redis.call('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4], 'COUNT', ARGV[5])
if #reply[2] > 0 then redis.call('INCR', KEYS[2]) end
return reply
