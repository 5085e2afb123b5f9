-- Leveled logging for longpoll: `logger = true` writes to stderr, a function
-- receives (level, message, fields); event data is only logged at debug.
-- Writing to stderr never blocks the loop (core.stderr_write drops lines a full pipe cannot
-- take, and says how many), and one message repeated by request after request is written at
-- most RATE times a second, with the count of those left out.
local core = require "longpoll.core"

local M = {}

local RATE = 10

local LEVELS = { debug = 1, info = 2, warn = 3, error = 4 }

local function format_fields(fields)
  if not fields then return "" end
  local keys = {}
  for k in pairs(fields) do keys[#keys + 1] = tostring(k) end
  table.sort(keys)
  local parts = {}
  for _, k in ipairs(keys) do parts[#parts + 1] = k .. "=" .. tostring(fields[k]) end
  return " " .. table.concat(parts, " ")
end

-- Returns a function(level, message, fields), or nil when logging is off.
-- spec: nil/false (off), true (stderr, info and above), a function, or
-- { level = "debug", sink = function } to choose the threshold.
function M.new(spec)
  if not spec then return nil end
  if type(spec) == "function" then return spec end
  local threshold, sink = LEVELS.info, nil
  if type(spec) == "table" then
    threshold = LEVELS[spec.level or "info"]
    sink = spec.sink
  end
  sink = sink or function(level, message, fields)
    core.stderr_write(os.date("!%Y-%m-%dT%H:%M:%SZ") .. " " .. level:upper() .. " longpoll: " .. message
      .. format_fields(fields) .. "\n")
  end
  -- message -> { second, written in it, left out since the last line written }
  local recent, recent_second = {}, nil
  return function(level, message, fields)
    if (LEVELS[level] or LEVELS.error) < threshold then return end
    local now = os.time()
    if now ~= recent_second then -- a new second: the counts start again (the table stays small)
      local carried = {}
      for m, r in pairs(recent) do
        if r[3] > 0 then carried[m] = { now, 0, r[3] } end
      end
      recent, recent_second = carried, now
    end
    local r = recent[message]
    if not r then
      r = { now, 0, 0 }
      recent[message] = r
    end
    if r[2] >= RATE then
      r[3] = r[3] + 1
      return
    end
    r[2] = r[2] + 1
    if r[3] > 0 then
      local f = { suppressed = r[3] }
      for k, v in pairs(fields or {}) do f[k] = v end
      fields, r[3] = f, 0
    end
    sink(level, message, fields)
  end
end

-- Checks a logger option; returns true or nil, message.
function M.check(spec)
  if spec == nil or type(spec) == "boolean" or type(spec) == "function" then return true end
  if type(spec) == "table" and (spec.level == nil or LEVELS[spec.level])
    and (spec.sink == nil or type(spec.sink) == "function") then
    return true
  end
  return nil, "option 'logger' must be true, a function, or { level = 'debug'|'info'|'warn'|'error', sink = fn }"
end

return M
