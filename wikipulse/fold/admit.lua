-- KEYS: the admitted-domains zset. ARGV: cap, now, then the candidate domains. Returns those admitted.
local cap = tonumber(ARGV[1])
local admitted = {}
for i = 3, #ARGV do
  local domain = ARGV[i]
  if redis.call('ZSCORE', KEYS[1], domain) then
    admitted[#admitted + 1] = domain
  elseif redis.call('ZCARD', KEYS[1]) < cap then
    redis.call('ZADD', KEYS[1], ARGV[2], domain)
    admitted[#admitted + 1] = domain
  end
end
return admitted
