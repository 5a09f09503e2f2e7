-- KEYS: keys.ALERTS, the alert's marker. ARGV: the alert (JSON), keys.ALERTS_CHANNEL, how many to keep, marker ttl s.
if not redis.call('SET', KEYS[2], 1, 'NX', 'EX', ARGV[4]) then return 0 end
redis.call('XADD', KEYS[1], 'MAXLEN', ARGV[3], '*', 'alert', ARGV[1])
redis.call('PUBLISH', ARGV[2], ARGV[1])
return 1
