-- fence(key, token, ttl): the check a fenced script starts with. `key` is the lease, `token` this process's, `ttl`
-- its time to live in ms. Returns the holder's token when another process holds the lease: the script then ends
-- before it writes anything. Else (ours, or lapsed) the lease is taken again and it returns nil. Its SET is the
-- script's first write, so a Redis at maxmemory refuses the whole script there (see its callers).
local function fence(key, token, ttl)
  local holder = redis.call('GET', key)
  if holder and holder ~= token then return holder end
  redis.call('SET', key, token, 'PX', ttl)
  return nil
end
