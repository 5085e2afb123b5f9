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
--
-- Records live in a ring of parallel arrays (no table per key: a publish with a key allocates
-- nothing here but its map entry), oldest first; one window for all, so insertion order is
-- expiry order. map[key] is the key's slot; a slot whose key was forgotten (aborted, evicted)
-- is skipped when the ring reaches it.

local Keys = {}
Keys.__index = Keys

-- M.new_keys{ max_keys =, max_bytes =, window_ms = } -> keys
function M.new_keys(limits)
  return setmetatable({
    max_keys = limits.max_keys or M.DEFAULT_MAX_KEYS,
    max_bytes = limits.max_bytes or M.DEFAULT_MAX_BYTES,
    window_ms = limits.window_ms,
    map = {}, -- key -> slot
    keys = {}, fps = {}, ids = {}, tss = {}, exps = {}, costs = {}, -- by slot, 0 .. cap - 1
    cap = 0, head = 0, n = 0, -- the ring: slots head .. head + n - 1 (mod cap)
    count = 0, -- live keys
    bytes = 0,
    replays = 0,
    conflicts = 0,
    evicted = 0,
  }, Keys)
end

-- Takes the oldest slot off the ring; forgets its key if it is still live there. Returns
-- whether a live key went.
local function pop_oldest(self)
  local slot = self.head
  local key = self.keys[slot]
  local live = key and self.map[key] == slot
  if live then
    self.map[key] = nil
    self.count = self.count - 1
    self.bytes = self.bytes - self.costs[slot]
  end
  self.keys[slot], self.fps[slot], self.ids[slot], self.tss[slot], self.exps[slot], self.costs[slot] =
    nil, nil, nil, nil, nil, nil
  self.head = (slot + 1) % self.cap
  self.n = self.n - 1
  return live
end

-- Doubles the ring, keeping its order (slots renumbered from 0).
local function grow(self)
  local cap = math.max(16, self.cap * 2)
  local keys, fps, ids, tss, exps, costs = {}, {}, {}, {}, {}, {}
  local map = self.map
  for i = 0, self.n - 1 do
    local old = (self.head + i) % self.cap
    local key = self.keys[old]
    keys[i], fps[i], ids[i], tss[i], exps[i], costs[i] =
      key, self.fps[old], self.ids[old], self.tss[old], self.exps[old], self.costs[old]
    if key and map[key] == old then map[key] = i end
  end
  self.keys, self.fps, self.ids, self.tss, self.exps, self.costs = keys, fps, ids, tss, exps, costs
  self.cap, self.head = cap, 0
end

-- Forgets the keys whose window ended (and dead slots at the head).
function Keys:expire(now)
  while self.n > 0 do
    local slot = self.head
    local key = self.keys[slot]
    if key and self.map[key] == slot and self.exps[slot] > now then return end
    pop_oldest(self)
  end
end

-- keys:begin(key, fingerprint, now) -> slot (a new key: publish, then commit or abort) |
-- nil, code, prior (EREPLAY with prior = { id =, timestamp = } of the first event,
-- EKEYMISMATCH, EKEYBUSY).
function Keys:begin(key, fingerprint, now)
  self:expire(now)
  local slot = self.map[key]
  if slot then
    if self.fps[slot] ~= fingerprint then
      self.conflicts = self.conflicts + 1
      return nil, M.MISMATCH
    end
    local id = self.ids[slot]
    if not id then return nil, M.BUSY end
    self.replays = self.replays + 1
    return nil, M.REPLAY, { id = id, timestamp = self.tss[slot] }
  end
  local cost = #key + #fingerprint + 36 + M.RECORD_COST
  -- over a bound: the oldest keys go first (a retry of theirs would publish again)
  while (self.count + 1 > self.max_keys or self.bytes + cost > self.max_bytes) and self.n > 0 do
    if pop_oldest(self) then self.evicted = self.evicted + 1 end
  end
  if self.n == self.cap then grow(self) end
  slot = (self.head + self.n) % self.cap
  self.n = self.n + 1
  self.keys[slot], self.fps[slot], self.exps[slot], self.costs[slot] = key, fingerprint, now + self.window_ms, cost
  self.map[key] = slot
  self.count = self.count + 1
  self.bytes = self.bytes + cost
  return slot
end

-- The event of a begun key was stored.
function Keys:commit(slot, key, id, timestamp)
  if self.map[key] == slot then self.ids[slot], self.tss[slot] = id, timestamp end
end

-- The publish of a begun key failed: the key is free again (its slot is skipped later).
function Keys:abort(slot, key)
  if self.map[key] == slot then
    self.map[key] = nil
    self.count = self.count - 1
    self.bytes = self.bytes - self.costs[slot]
  end
end

-- Figures for stats.
function Keys:stats(now)
  self:expire(now)
  return { idempotency_keys = self.count, idempotency_key_bytes = self.bytes, idempotency_replays = self.replays,
    idempotency_conflicts = self.conflicts, idempotency_evicted = self.evicted }
end

return M
