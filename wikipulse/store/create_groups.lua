-- The router's shard writes: KEYS: the shard stream. ARGV: the declared groups (created with the stream if it is new).
local g = {}
for i = 1, #ARGV do g[i] = ARGV[i] end
create_groups(KEYS[1], g)
return 0
