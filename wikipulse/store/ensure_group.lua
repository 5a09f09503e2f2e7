-- A consumer's group creation. KEYS: the stream. ARGV: the group, where it starts if it is new, then the declared
-- groups. A new stream is created with the declared groups (at 0); then the group, if still missing, at its start.
-- Returns 0: it existed; 1: created at its start; 2: created with the stream.
local declared = {}
for i = 3, #ARGV do declared[#declared + 1] = ARGV[i] end
local new = redis.call('EXISTS', KEYS[1]) == 0
create_groups(KEYS[1], declared)
if redis.call('EXISTS', KEYS[1]) == 1 then
  for _, info in ipairs(stream_groups(KEYS[1])) do
    if info['name'] == ARGV[1] then return new and 2 or 0 end
  end
end
redis.call('XGROUP', 'CREATE', KEYS[1], ARGV[1], ARGV[2], 'MKSTREAM')
return 1
