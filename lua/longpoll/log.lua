-- Leveled logging for longpoll: `logger = true` writes to stderr, a function
-- receives (level, message, fields); event data is only logged at debug.
local M = {}

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
    io.stderr:write(os.date("!%Y-%m-%dT%H:%M:%SZ"), " ", level:upper(), " longpoll: ", message,
      format_fields(fields), "\n")
  end
  return function(level, message, fields)
    if (LEVELS[level] or LEVELS.error) >= threshold then sink(level, message, fields) end
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
