-- The server-side Lua scripts of the Redis engine (run by Redis, Lua 5.1).
-- Each runs atomically, so order and timestamps are issued by Redis alone.
--
-- Keys (P = the prefix, "longpoll:" by default):
--   P.."clock"      hash: last (timestamp of the newest event), seq (its
--                   sequence number, one counter for every category),
--                   min_next (smallest timestamp the next event may carry,
--                   raised by timeout answers), epoch (random, made when the
--                   hash is: a new epoch means Redis lost its data)
--   P.."s:"..C      stream of category C; entry ID "<timestamp>-<seq>", fields
--                   "i" (the event id) and "d" (its data as JSON text); the event
--                   JSON itself is built by each node's C core (core.event_json)
--   P.."d:"..C      "<entry ID> <event id>" of the newest event C dropped
--                   (buffer size or TTL), for the "missed" flag
--   P.."k:"..K      "<fingerprint> <event id> <timestamp>" of the publish made
--                   with Idempotency-Key K (expires after the window)
--   P.."keys"       sorted set of those keys by expiry time, so at most
--                   max_keys of them live
-- Channels: P.."events" carries every event to every node:
--   "E <epoch> <seq> <timestamp> <category length>\n<category><event id><data JSON>"
-- and P.."node:"..N carries a node's own markers:
--   "M <token> <epoch> <seq> <last> <T>"
local M = {}

-- Shared by every script. Reads the clock (making the epoch when missing)
-- and Redis's own time, in milliseconds.
local PROLOGUE = [[
local function int(x) return string.format('%.0f', x) end
local function clock(key, epoch_candidate)
  local c = redis.call('HMGET', key, 'last', 'min_next', 'seq', 'epoch')
  local epoch = c[4]
  if not epoch then
    epoch = epoch_candidate
    redis.call('HSET', key, 'epoch', epoch)
  end
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  return tonumber(c[1]) or 0, tonumber(c[2]) or 0, tonumber(c[3]) or 0, epoch, now
end
local function parse_id(id)
  local t, s = string.match(id, '^(%d+)%-(%d+)$')
  return tonumber(t), tonumber(s)
end
local function newer(a, b) -- the newer of two stream entries (either may be nil)
  if not a then return b end
  if not b then return a end
  local at, as = parse_id(a[1])
  local bt, bs = parse_id(b[1])
  if at > bt or (at == bt and as > bs) then return a end
  return b
end
-- The entry of stream that TTL drops at now (the newest one older than
-- ttl_ms), and the minimum ID that stays.
local function expired(stream, ttl, now)
  if ttl <= 0 or now - ttl + 1 <= 0 then return nil end
  local minid = int(now - ttl + 1) .. '-0'
  local old = redis.call('XREVRANGE', stream, '(' .. minid, '-', 'COUNT', 1)
  return old[1], minid
end
-- Remembers entry as the newest dropped event of its category.
local function remember_dropped(dropped, entry)
  redis.call('SET', dropped, entry[1] .. ' ' .. entry[2][2])
end
]]

-- KEYS: clock, stream, dropped[, key record, key index]
-- ARGV: category, data JSON, event id, buffer size, ttl_ms (0: forever),
--       channel, epoch candidate, floor[, idempotency key, fingerprint,
--       window_ms, max_keys, key record prefix]
-- Returns { epoch, timestamp, seq }; with a key already set, publishes
-- nothing and returns { "replay", event id, timestamp } (same fingerprint) or
-- { "mismatch" }.
M.publish = PROLOGUE .. [[
local clock_key, stream, dropped = KEYS[1], KEYS[2], KEYS[3]
local idem = #KEYS == 5
if idem then
  local record = redis.call('GET', KEYS[4])
  if record then
    local fp, rid, rts = string.match(record, '^(%S+) (%S+) (%S+)$')
    if fp ~= ARGV[10] then return { 'mismatch' } end
    return { 'replay', rid, rts }
  end
end
local last, min_next, seq, epoch, now = clock(clock_key, ARGV[7])
local ts = now
if ts < last then ts = last end
if ts < min_next then ts = min_next end
local floor = tonumber(ARGV[8])
if ts < floor then ts = floor end
seq = seq + 1
local tss, seqs = int(ts), int(seq)
local maxlen, ttl = tonumber(ARGV[4]), tonumber(ARGV[5])
-- which entry goes last: by size (the oldest beyond maxlen - 1) or by TTL
local gone
local len = redis.call('XLEN', stream)
if len >= maxlen then
  local oldest = redis.call('XRANGE', stream, '-', '+', 'COUNT', len - maxlen + 1)
  gone = oldest[#oldest]
end
local old, minid = expired(stream, ttl, now)
gone = newer(gone, old)
-- first write: if it fails (an ID at or below the stream's last), nothing changed
local added = redis.pcall('XADD', stream, 'MAXLEN', maxlen, tss .. '-' .. seqs, 'i', ARGV[3], 'd', ARGV[2])
if type(added) == 'table' and added.err then return added end
redis.call('HSET', clock_key, 'last', tss, 'seq', seqs)
if gone then remember_dropped(dropped, gone) end
if old then redis.call('XTRIM', stream, 'MINID', minid) end
if idem then
  local window = tonumber(ARGV[11])
  redis.call('SET', KEYS[4], ARGV[10] .. ' ' .. ARGV[3] .. ' ' .. tss, 'PX', window)
  redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', int(now))
  redis.call('ZADD', KEYS[5], int(now + window), ARGV[9])
  redis.call('PEXPIRE', KEYS[5], window)
  local extra = redis.call('ZCARD', KEYS[5]) - tonumber(ARGV[12])
  if extra > 0 then -- over max_keys: the oldest keys go
    local gone_keys = redis.call('ZPOPMIN', KEYS[5], extra)
    for i = 1, #gone_keys, 2 do redis.call('DEL', ARGV[13] .. gone_keys[i]) end
  end
end
if ttl > 0 then
  -- the keys outlive their newest event by nothing: an idle category frees itself
  local keep = int(ttl + ts - now)
  redis.call('PEXPIRE', stream, keep)
  redis.call('PEXPIRE', dropped, keep)
end
redis.call('PUBLISH', ARGV[6], 'E ' .. epoch .. ' ' .. seqs .. ' ' .. tss .. ' ' .. string.len(ARGV[1]) .. '\n' ..
  ARGV[1] .. ARGV[3] .. ARGV[2])
return { epoch, tss, seqs }
]]

-- KEYS: clock, then stream and dropped key of each category
-- ARGV: mode, a, b, c, ttl_ms, epoch candidate[, ttl_ms of each category (per-category
--       rules; ttl_ms for all otherwise)], where mode is
--   "all"    every buffered event (a cursor older than everything)
--   "since"  a = since_time, b = since_time + 1, c = last_id or "" (the
--            wire contract's cursor)
--   "after"  a = timestamp, b = seq, c = epoch: the events after that
--            position (a node's own cursor); another epoch means "all"
-- Returns { epoch, last, seq, missed (0/1), then per event, oldest first: timestamp,
-- category (its index among the streams of KEYS), event id, data JSON }.
M.fetch = PROLOGUE .. [[
local last, _, seq, epoch, now = clock(KEYS[1], ARGV[6])
local mode, ttl = ARGV[1], tonumber(ARGV[5])
if mode == 'after' and ARGV[4] ~= epoch then mode = 'all' end
local ncat = (#KEYS - 1) / 2
-- TTL first: an expired event is never served
for i = 1, ncat do
  local stream, dropped = KEYS[2 * i], KEYS[2 * i + 1]
  local old, minid = expired(stream, tonumber(ARGV[6 + i]) or ttl, now)
  if old then
    remember_dropped(dropped, old)
    local pttl = redis.call('PTTL', stream)
    if pttl > 0 then redis.call('PEXPIRE', dropped, pttl) end
    redis.call('XTRIM', stream, 'MINID', minid)
  end
end
-- the cursor: where reading starts, and how a dropped event compares to it
local start, rule, cts, cseq
local since, last_id = tonumber(ARGV[2]), ARGV[4]
if mode == 'all' then
  start, rule = '-', 'all'
elseif mode == 'after' then
  start, rule, cts, cseq = '(' .. ARGV[2] .. '-' .. ARGV[3], 'after', tonumber(ARGV[2]), tonumber(ARGV[3])
elseif last_id ~= '' then
  -- last_id may be an event of any of the categories, in since_time's millisecond
  for i = 1, ncat do
    local same_ms = redis.call('XRANGE', KEYS[2 * i], ARGV[2] .. '-0', ARGV[2] .. '-18446744073709551615')
    for _, entry in ipairs(same_ms) do
      if entry[2][2] == last_id then
        start, rule = '(' .. entry[1], 'after'
        cts, cseq = parse_id(entry[1])
        break
      end
    end
    if start then break end
  end
  if not start then start, rule = ARGV[2] .. '-0', 'included' end
else
  start, rule = ARGV[3] .. '-0', 'excluded'
end
local function after_cursor(id, evid)
  if rule == 'all' then return true end
  local t, s = parse_id(id)
  if rule == 'after' then return t > cts or (t == cts and s > cseq) end
  if t ~= since then return t > since end
  return rule == 'included' and evid ~= last_id
end
local found, missed = {}, false
for i = 1, ncat do
  local stream = KEYS[2 * i]
  if redis.call('XLEN', stream) > 0 then
    for _, entry in ipairs(redis.call('XRANGE', stream, start, '+')) do
      local t, s = parse_id(entry[1])
      found[#found + 1] = { t, s, i, entry[2][2], entry[2][4] }
    end
    local d = redis.call('GET', KEYS[2 * i + 1])
    if d and not missed then
      local id, evid = string.match(d, '^(%S+) (%S+)$')
      missed = after_cursor(id, evid)
    end
  end
end
if ncat > 1 then
  table.sort(found, function(x, y) return x[1] < y[1] or (x[1] == y[1] and x[2] < y[2]) end)
end
local out = { epoch, int(last), int(seq), (#found > 0 and missed) and 1 or 0 }
for _, f in ipairs(found) do
  out[#out + 1] = int(f[1])
  out[#out + 1] = f[3]
  out[#out + 1] = f[4]
  out[#out + 1] = f[5]
end
return out
]]

-- A timestamp T for timeout answers: no event published later gets T or less.
-- KEYS: clock
-- ARGV: floor (T >= floor - 1), channel ("" for none), token, epoch candidate
-- Publishes the marker "M <token> <epoch> <seq> <last> <T>" on channel, so
-- the node knows every event published before T reached it first.
-- Returns { epoch, last, seq, T }.
M.mark = PROLOGUE .. [[
local last, min_next, seq, epoch, now = clock(KEYS[1], ARGV[4])
local T = now
if T < last then T = last end
if T < min_next - 1 then T = min_next - 1 end
local floor = tonumber(ARGV[1])
if T < floor - 1 then T = floor - 1 end
if min_next < T + 1 then redis.call('HSET', KEYS[1], 'min_next', int(T + 1)) end
if ARGV[2] ~= '' then
  redis.call('PUBLISH', ARGV[2], 'M ' .. ARGV[3] .. ' ' .. epoch .. ' ' .. int(seq) .. ' ' .. int(last) .. ' ' .. int(T))
end
return { epoch, int(last), int(seq), int(T) }
]]

M.NAMES = { "publish", "fetch", "mark" }

return M
