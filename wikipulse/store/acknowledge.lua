-- acknowledge(stream, group, ids): XACK the ids, 1,000 a call (Lua's unpack and Redis's argument count stay small).
local function acknowledge(stream, group, ids)
  for i = 1, #ids, 1000 do
    redis.call('XACK', stream, group, unpack(ids, i, math.min(i + 999, #ids)))
  end
end
