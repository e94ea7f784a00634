"""The Lua scripts of the Redis backend: the arithmetic of ``window.py``, run atomically.

Each script reads the clock with ``TIME`` on the server, so replicas with skewed clocks still
agree on slots. Keys of one bucket share a hash tag (``{team:search}``), so the scripts also
run on Redis Cluster. Every write refreshes a TTL: a window hash lives one window plus one
slot after its last write, a concurrency set one lease after its last refresh; an idle key
disappears by itself.

Window hashes map slot index -> count. The concurrency sorted set maps a slot id (one per
admitted stream) to the instant its lease ends; holders refresh leases while they stream, so
the slots of a replica that died expire after one lease and are pruned by the next admission.
"""

from __future__ import annotations

_WINDOW_FUNCTIONS = """
local slot_ms = tonumber(ARGV[1])
local slots = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local cur = math.floor(now / slot_ms)

-- Drop slots that left the window; return the count and the live slots, oldest first.
local function scan(key)
  local raw = redis.call('HGETALL', key)
  local used, live, stale = 0, {}, {}
  for i = 1, #raw, 2 do
    local slot = tonumber(raw[i])
    if slot <= cur - slots then
      stale[#stale + 1] = raw[i]
    else
      local n = tonumber(raw[i + 1])
      used = used + n
      live[#live + 1] = {slot, n}
    end
  end
  if #stale > 0 then
    redis.call('HDEL', key, unpack(stale))
  end
  table.sort(live, function(a, b) return a[1] < b[1] end)
  return used, live
end

-- Milliseconds until cost fits under limit once the oldest slots leave the window.
local function retry_ms(live, used, cost, limit)
  if used + cost <= limit then return 0 end
  local freed = 0
  for _, entry in ipairs(live) do
    freed = freed + entry[2]
    if used - freed + cost <= limit then
      return math.max(0, (entry[1] + slots) * slot_ms - now)
    end
  end
  return slots * slot_ms
end

-- Milliseconds until the window is empty.
local function reset_ms(live, used)
  if used == 0 or #live == 0 then return 0 end
  return math.max(0, (live[#live][1] + slots) * slot_ms - now)
end

local function count(key, amount)
  redis.call('HINCRBY', key, cur, amount)
  redis.call('PEXPIRE', key, (slots + 1) * slot_ms)
end
"""

ADMIT = (
    _WINDOW_FUNCTIONS
    + """
-- KEYS: requests window, tokens window, concurrency set
-- ARGV: slot_ms, slots, request limit, token limit, token cost, stream limit, slot id,
--       lease ms (a limit of -1 means not limited)
local req_limit = tonumber(ARGV[3])
local tok_limit = tonumber(ARGV[4])
local tok_cost = tonumber(ARGV[5])
local conc_limit = tonumber(ARGV[6])
local lease_ms = tonumber(ARGV[8])
local fits = true
local req_used, req_retry, req_reset = 0, 0, 0
local tok_used, tok_retry, tok_reset = 0, 0, 0
local conc_used = 0

if req_limit >= 0 then
  local live
  req_used, live = scan(KEYS[1])
  req_retry = retry_ms(live, req_used, 1, req_limit)
  req_reset = reset_ms(live, req_used)
  fits = fits and req_used + 1 <= req_limit
end
if tok_limit >= 0 then
  local live
  tok_used, live = scan(KEYS[2])
  tok_retry = retry_ms(live, tok_used, tok_cost, tok_limit)
  tok_reset = reset_ms(live, tok_used)
  fits = fits and tok_used + tok_cost <= tok_limit
end
if conc_limit >= 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
  conc_used = redis.call('ZCARD', KEYS[3])
  fits = fits and conc_used + 1 <= conc_limit
end

if fits then
  if req_limit >= 0 then count(KEYS[1], 1) end
  if tok_limit >= 0 then count(KEYS[2], tok_cost) end
  if conc_limit >= 0 then
    redis.call('ZADD', KEYS[3], now + lease_ms, ARGV[7])
    redis.call('PEXPIRE', KEYS[3], lease_ms)
  end
end
return {fits and 1 or 0, cur, (cur + slots) * slot_ms - now,
        req_used, req_retry, req_reset, tok_used, tok_retry, tok_reset, conc_used}
"""
)

ADJUST = (
    _WINDOW_FUNCTIONS
    + """
-- Return part of a reservation, count tokens beyond it, release a stream slot.
-- KEYS: tokens window, concurrency set
-- ARGV: slot_ms, slots, refund slot, refund amount, extra tokens, slot id ('' for none)
local refund_slot = tonumber(ARGV[3])
local refund = tonumber(ARGV[4])
local extra = tonumber(ARGV[5])
if refund > 0 and refund_slot > cur - slots then
  local held = tonumber(redis.call('HGET', KEYS[1], refund_slot) or 0)
  local taken = math.min(held, refund)
  if taken > 0 then redis.call('HINCRBY', KEYS[1], refund_slot, -taken) end
end
if extra > 0 then count(KEYS[1], extra) end
if ARGV[6] ~= '' then redis.call('ZREM', KEYS[2], ARGV[6]) end
local used = scan(KEYS[1])
return used
"""
)

REFRESH = """
-- Extend the leases of the stream slots this replica still holds on one key.
-- KEYS: concurrency set; ARGV: lease ms, slot ids...
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease_ms = tonumber(ARGV[1])
for i = 2, #ARGV do
  redis.call('ZADD', KEYS[1], 'XX', now + lease_ms, ARGV[i])
end
redis.call('PEXPIRE', KEYS[1], lease_ms)
return #ARGV - 1
"""
