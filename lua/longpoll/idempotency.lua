-- Idempotent publish (the IETF Idempotency-Key header, draft-ietf-httpapi-idempotency-key-header):
-- the key's checks, the fingerprint of a publish, the answer that names the event, and the
-- bounded table of keys the in-memory engine keeps. (In Redis mode the keys live in Redis: the
-- publish script of engine/redis/scripts.lua sets them atomically with the event.)
--
-- A key's record: the fingerprint of the first publish (category and data), then the id and
-- timestamp of its event once stored. A repeat with the same fingerprint is a replay; with
-- another one a conflict; while the first is not stored yet it is busy.
local core = require "longpoll.core"

local format, find, match = string.format, string.find, string.match

local M = {}

M.HEADER = "idempotency-key" -- as the request parser lowers it
M.REPLAYED_HEADER = "Idempotent-Replayed"

M.DEFAULT_WINDOW_SECONDS = 86400
M.DEFAULT_MAX_KEYS = 100000
M.DEFAULT_MAX_BYTES = 16 * 1024 * 1024

-- What one record costs besides its key and fingerprint: the record table, its map entry and
-- its queue slot (measured with collectgarbage("count") on Lua 5.4, rounded up).
M.RECORD_COST = 200

-- The engine's refusal codes for idempotent publishes, and their HTTP statuses.
M.REPLAY, M.MISMATCH, M.BUSY = "EREPLAY", "EKEYMISMATCH", "EKEYBUSY"
M.STATUS = { EKEYMISMATCH = 422, EKEYBUSY = 409 }
M.MISMATCH_MESSAGE = "Idempotency-Key was already used with a different request"
M.BUSY_MESSAGE = "a request with this Idempotency-Key is still being processed"

-- The message that goes with a refusal code.
function M.message(code)
  if code == M.MISMATCH then return M.MISMATCH_MESSAGE end
  if code == M.BUSY then return M.BUSY_MESSAGE end
  return "replayed: the event was published before"
end

-- The key of a header value or of manager:publish's option: 1 to 255 printable ASCII
-- characters, either as sent or as a structured-field string ("..." without " or \ inside).
-- Returns the key, or nil, message.
function M.check_key(value)
  if type(value) ~= "string" then return nil, "Idempotency-Key must be a string" end
  local inner = match(value, '^"(.*)"$')
  if inner then
    if find(inner, '["\\]') then
      return nil, "Idempotency-Key: a quoted key must not hold '\"' or '\\'"
    end
    value = inner
  end
  if #value < 1 or #value > 255 or find(value, "[^\32-\126]") then
    return nil, "Idempotency-Key must be 1 to 255 printable ASCII characters"
  end
  return value
end

-- The fingerprint of a publish: what makes a repeat "the same request".
function M.fingerprint(category, data_json)
  return core.fingerprint(category, data_json)
end

-- The window in milliseconds: the option, bounded by the event TTL when that is shorter (a
-- replay must not name an event that is gone). ttl_ms 0: events never expire.
function M.window_ms(options, ttl_ms)
  local w = math.floor((options.idempotency_window_seconds or M.DEFAULT_WINDOW_SECONDS) * 1000)
  if ttl_ms and ttl_ms > 0 and ttl_ms < w then w = ttl_ms end
  return math.max(1, w)
end

-- The publish answer that names the event: {"success":true,"id":"..","timestamp":..}.
function M.answer_body(id, timestamp)
  return format('{"success":true,"id":"%s","timestamp":%d}', id, timestamp)
end

---------------------------------------------------------------------------------------------
-- The bounded table of keys (in-memory engine)

local Keys = {}
Keys.__index = Keys

-- M.new_keys{ max_keys =, max_bytes =, window_ms = } -> keys
function M.new_keys(limits)
  return setmetatable({
    max_keys = limits.max_keys or M.DEFAULT_MAX_KEYS,
    max_bytes = limits.max_bytes or M.DEFAULT_MAX_BYTES,
    window_ms = limits.window_ms,
    map = {}, -- key -> record
    queue = {}, -- records oldest first (one window for all: insertion order is expiry order)
    head = 1,
    tail = 0,
    count = 0,
    bytes = 0,
    replays = 0,
    conflicts = 0,
    evicted = 0,
  }, Keys)
end

local function forget(self, r)
  if self.map[r.key] == r then
    self.map[r.key] = nil
    self.count = self.count - 1
    self.bytes = self.bytes - r.cost
  end
end

local function pop_oldest(self)
  local r = self.queue[self.head]
  self.queue[self.head] = nil
  self.head = self.head + 1
  if self.head > self.tail then self.head, self.tail = 1, 0 end
  return r
end

-- Forgets the records whose window ended.
function Keys:expire(now)
  while self.head <= self.tail do
    local r = self.queue[self.head]
    if self.map[r.key] == r and r.expires > now then return end
    pop_oldest(self)
    forget(self, r)
  end
end

-- keys:begin(key, fingerprint, now) -> record (a new key: publish, then commit or abort) |
-- nil, code, record (EREPLAY with the first event's record, EKEYMISMATCH, EKEYBUSY).
function Keys:begin(key, fingerprint, now)
  self:expire(now)
  local r = self.map[key]
  if r then
    if r.fingerprint ~= fingerprint then
      self.conflicts = self.conflicts + 1
      return nil, M.MISMATCH
    end
    if not r.id then return nil, M.BUSY end
    self.replays = self.replays + 1
    return nil, M.REPLAY, r
  end
  r = { key = key, fingerprint = fingerprint, expires = now + self.window_ms,
    cost = #key + #fingerprint + 36 + M.RECORD_COST }
  -- over a bound: the oldest keys go first (a retry of theirs would publish again)
  while (self.count + 1 > self.max_keys or self.bytes + r.cost > self.max_bytes) and self.head <= self.tail do
    local old = pop_oldest(self)
    if self.map[old.key] == old then
      forget(self, old)
      self.evicted = self.evicted + 1
    end
  end
  self.map[key] = r
  self.tail = self.tail + 1
  self.queue[self.tail] = r
  self.count = self.count + 1
  self.bytes = self.bytes + r.cost
  return r
end

-- The event of a begun key was stored.
function Keys.commit(_, r, id, timestamp)
  r.id, r.timestamp = id, timestamp
end

-- The publish of a begun key failed: the key is free again.
function Keys:abort(r)
  forget(self, r)
end

-- Figures for stats.
function Keys:stats(now)
  self:expire(now)
  return { idempotency_keys = self.count, idempotency_key_bytes = self.bytes, idempotency_replays = self.replays,
    idempotency_conflicts = self.conflicts, idempotency_evicted = self.evicted }
end

return M
