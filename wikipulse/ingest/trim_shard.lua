-- Trims a shard stream and counts what each group lost (trim, store/trim.lua). KEYS: the stream, the shard's router
-- stats. ARGV: maxlen, keep, grace ms. Returns {group, trimmed unread so far, ...} for the groups that lost entries now.
return trim(KEYS[1], tonumber(ARGV[1]), KEYS[2], tonumber(ARGV[2]), tonumber(ARGV[3]))
