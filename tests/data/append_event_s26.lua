-- The event append script of the release before session 27 (service/store.py at
-- 763a8c7), as its workers run it: tests/test_store_reader.py runs it beside the
-- current one, as a rolling deploy or a rollback does.
if redis.call('ZSCORE', KEYS[2], ARGV[1]) then return 0 end
local ts = tonumber(ARGV[2])
local keep = tonumber(ARGV[4])
local function ts_of(raw)  -- nil: no usable ts (counts as the oldest)
  if not raw then return nil end
  local ok, ev = pcall(cjson.decode, raw)
  if ok and type(ev) == 'table' and type(ev['ts']) == 'number' then return ev['ts'] end
  return nil
end
-- older than the oldest of the newest `keep`: it would be trimmed at once. Nothing is
-- written, its ID included: a retry is outside again (the edge only moves forward)
local edge = nil
if redis.call('LLEN', KEYS[1]) >= keep then edge = ts_of(redis.call('LINDEX', KEYS[1], -keep)) end
if edge ~= nil and ts < edge then return 2 end
-- lift the newer ones off the tail (newest first), push this one, put them back
local later = {}
while true do
  local t = ts_of(redis.call('LINDEX', KEYS[1], -1))
  if t == nil or t <= ts then break end
  later[#later + 1] = redis.call('RPOP', KEYS[1])
end
redis.call('RPUSH', KEYS[1], ARGV[3])
for i = #later, 1, -1 do redis.call('RPUSH', KEYS[1], later[i]) end
redis.call('LTRIM', KEYS[1], -keep, -1)
local ttl = tonumber(ARGV[6])
if ttl > 0 then redis.call('EXPIRE', KEYS[1], ttl) end
local t = redis.call('TIME')
local arrival = tonumber(t[1]) * 1000000 + tonumber(t[2])
redis.call('ZADD', KEYS[2], arrival, ARGV[1])
local n = redis.call('ZCARD', KEYS[2])
if n > tonumber(ARGV[5]) then
  redis.call('ZREMRANGEBYRANK', KEYS[2], 0, n - tonumber(ARGV[5]) - 1)
end
-- the key exists now, and the TTL is bounded (MAX_TTL_S): this cannot fail
if ttl > 0 then redis.call('EXPIRE', KEYS[2], ttl) end
return 1
