-- KEYS: stream. ARGV: the group's last delivered id, how many entries after it to count at most.
local n, at, most = 0, ARGV[1], tonumber(ARGV[2])
while n < most do
  local chunk = redis.call('XRANGE', KEYS[1], '(' .. at, '+', 'COUNT', math.min(100, most - n))
  if #chunk == 0 then break end
  n = n + #chunk
  at = chunk[#chunk][1]
end
return n
