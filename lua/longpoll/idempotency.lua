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

-- What one remembered key costs besides its key, fingerprint and event id: the record, its ring
-- slot and its map slot (src/lp_keys.h).
M.RECORD_COST = core.KEYS_RECORD_COST

-- The engine's refusal codes for idempotent publishes, and their HTTP statuses.
M.REPLAY, M.MISMATCH, M.BUSY = "EREPLAY", "EKEYMISMATCH", "EKEYBUSY"
M.STATUS = { EKEYMISMATCH = 422, EKEYBUSY = 409 }
M.MISMATCH_MESSAGE = "Idempotency-Key was already used with a different request"
M.BUSY_MESSAGE = "a request with this Idempotency-Key is still being processed"

-- The message that goes with a refusal code.
function M.message(code)
  if code == M.MISMATCH then return M.MISMATCH_MESSAGE end
  if code == M.BUSY then return M.BUSY_MESSAGE end
  if code == "ENOMEM" then return "out of memory: the Idempotency-Key cannot be remembered" end
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

-- The bounded table of keys the in-memory engine keeps: lp_keys in C (src/lp_keys.h), so the
-- native stats handler reads its figures without entering Lua.
-- M.new_keys{ max_keys =, max_bytes =, window_ms = } -> keys, with
--   keys:begin(key, fingerprint, now) -> ticket (a new key: publish, then commit or abort) |
--     nil, code, prior (EREPLAY with prior = { id =, timestamp = } of the first event,
--     EKEYMISMATCH, EKEYBUSY, ENOMEM)
--   keys:commit(ticket, key, id, timestamp)  keys:abort(ticket, key)
--   keys:stats(now) -> the figures of /stats (after forgetting the keys whose window ended)
function M.new_keys(limits)
  return core.new_keys { max_keys = limits.max_keys or M.DEFAULT_MAX_KEYS,
    max_bytes = limits.max_bytes or M.DEFAULT_MAX_BYTES, window_ms = limits.window_ms }
end

return M
