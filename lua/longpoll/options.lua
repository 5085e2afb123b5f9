-- The manager's options: defaults (golongpoll's), checks, and a clear message
-- naming the option for anything wrong. A bad option is never a silent default.
local log = require "longpoll.log"

local M = {}

M.FOREVER = -1 -- event_ttl_seconds: events never expire (golongpoll's FOREVER)

local function integer(min, max)
  return function(v)
    if math.type(v) ~= "integer" and not (type(v) == "number" and v == math.floor(v) and v == v) then
      return "must be an integer"
    end
    if v < min or (max and v > max) then
      return max and ("must be between " .. min .. " and " .. max) or ("must be at least " .. min)
    end
  end
end

local function boolean(v)
  if type(v) ~= "boolean" then return "must be a boolean" end
end

local function ttl(v)
  if v == M.FOREVER or v == math.huge then return end
  if type(v) ~= "number" or v ~= v or v <= 0 then
    return "must be a positive number of seconds, or longpoll.FOREVER"
  end
end

local function add_on(v)
  local list = (type(v) == "table" and #v > 0) and v or { v }
  for i, a in ipairs(list) do
    if type(a) ~= "table" then return "must be an add-on table or a list of them" end
    for _, hook in ipairs { "on_start", "on_publish", "on_shutdown" } do
      if a[hook] ~= nil and type(a[hook]) ~= "function" then
        return ("entry %d: '%s' must be a function"):format(i, hook)
      end
    end
  end
end

local function status(v)
  if v ~= 200 and v ~= 400 then return "must be 200 (golongpoll's behaviour) or 400" end
end

local SPEC = {
  max_longpoll_timeout_seconds = { 110, integer(1, 86400) },
  max_event_buffer_size = { 250, integer(1, 100000000) },
  event_ttl_seconds = { M.FOREVER, ttl },
  delete_event_after_first_retrieval = { false, boolean },
  add_on = { nil, add_on },
  logger = { nil, function(v) local ok, msg = log.check(v); if not ok then return msg:gsub("^option 'logger' ", "") end end },
  subscribe_error_status = { 200, status },
  max_category_bytes = { 1024, integer(1, 1048576) },
  max_categories = { 0, integer(0) },                       -- 0: no cap
  max_waiting_per_category = { 0, integer(0) },             -- 0: no cap
  max_buffered_bytes = { 0, integer(0) },                   -- 0: no cap
  -- one long-poll answer stops before the event that would take it past this (at least one
  -- event always goes; the cursor gets the rest on the next poll): 0, no cap
  max_answer_bytes = { 4194304, integer(0) },
  max_categories_per_subscription = { 16, integer(1, 64) },
  purge_interval_seconds = { nil, function(v) if type(v) ~= "number" or v <= 0 then return "must be a positive number" end end },
  cors = { nil, function(v) return require("longpoll.cors").check(v) end },
  redis = { nil, function(v) return require("longpoll.engine.redis.config").check(v) end },
  sse_heartbeat_seconds = { 15, integer(1, 3600) },
  -- /stats?categories=1 lists category names, which apps often use as secrets: opt-in
  stats_categories = { false, boolean },
  -- the wall clock in epoch milliseconds (tests pass a fake one; the C core takes time as an
  -- argument, so TTL and timestamps then follow it)
  clock = { nil, function(v) if type(v) ~= "function" then return "must be a function returning epoch milliseconds" end end },
  -- idempotent publish (idempotency.lua): how long a key is remembered (bounded by the event
  -- TTL when that is shorter) and how many keys / bytes of them at most
  idempotency_window_seconds = { 86400, function(v)
    if type(v) ~= "number" or v ~= v or v < 0.001 or v > 31536000 then
      return "must be a number of seconds from 0.001 to 31536000 (a year)"
    end
  end },
  idempotency_max_keys = { 100000, integer(1, 100000000) },
  -- per-category buffer size / TTL / delete-after-first (category_rules.lua)
  category_rules = { nil, function(v) return require("longpoll.category_rules").check_rules(v) end },
  category_options = { nil, function(v)
    if type(v) ~= "function" then return "must be a function(category) -> table or nil" end
  end },
  idempotency_max_bytes = { 16 * 1024 * 1024, integer(1024) },
}

-- Returns a complete options table, or nil, message.
function M.check(options)
  if options == nil then options = {} end
  if type(options) ~= "table" then return nil, "options must be a table" end
  for k in pairs(options) do
    if not SPEC[k] then return nil, ("unknown option '%s'"):format(tostring(k)) end
  end
  local out = {}
  for k, spec in pairs(SPEC) do
    local v = options[k]
    if v == nil then
      out[k] = spec[1]
    else
      local err = spec[2](v)
      if err then return nil, ("option '%s' %s"):format(k, err) end
      out[k] = v
    end
  end
  if out.redis and out.delete_event_after_first_retrieval then
    return nil, "option 'delete_event_after_first_retrieval' cannot be used with 'redis'"
      .. " (the nodes could not agree on which retrieval is the first)"
  end
  local rules_err = require("longpoll.category_rules").check_with(out)
  if rules_err then return nil, rules_err end
  if out.redis and out.max_buffered_bytes > 0 then
    return nil, "option 'max_buffered_bytes' cannot be used with 'redis' (events are kept in Redis: set maxmemory there)"
  end
  return out
end

return M
