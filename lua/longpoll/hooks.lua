-- The add-ons' hooks, as the manager calls them: on_start (events restored, oldest first,
-- before anyone is served), on_publish (every event once, in the engine's order) and
-- on_shutdown (synchronous, or asynchronous with a done callback). Also the event object
-- add-ons and Lua callers see.
local core = require "longpoll.core"
local cjson = require "cjson"
local uv = require "luv"
local Timeouts = require "longpoll.timeouts"

local M = {}

-- An event as add-ons and Lua callers see it: id, timestamp, category, data_json, json; `data`
-- is decoded from data_json on first use unless the publisher gave it.
local Event = {}
Event.__index = function(e, k)
  if k == "data" then
    local ok, v = pcall(cjson.decode, rawget(e, "data_json"))
    if ok then
      rawset(e, "data", v)
      return v
    end
  end
end

-- M.event(engine_event[, data]) -> event
function M.event(e, data)
  if data == nil then data = e.data end
  return setmetatable({ id = e.id, timestamp = e.timestamp, category = e.category, data = data,
    data_json = e.data_json, json = e.json }, Event)
end

-- The option add_on (one add-on or a list) as a list.
function M.list(a)
  if a == nil then return {} end
  if #a > 0 then return a end
  return { a }
end

-- Calls hook `name` of every add-on with the arguments; an error inside one is reported with
-- on_error(message, fields) and the others still run.
function M.call(add_ons, name, on_error, ...)
  for i = 1, #add_ons do
    local hook = add_ons[i][name]
    if hook then
      local ok, err = pcall(hook, ...)
      if not ok then on_error("add-on hook failed", { add_on = i, hook = name, error = tostring(err) }) end
    end
  end
end

-- A read-only view of the manager's options for add-ons (buffer size, TTL...).
local function readonly(t)
  return setmetatable({}, { __index = t, __newindex = function() error("options are read-only", 2) end })
end

-- Loads the events the add-ons kept, oldest first: put(event, data_json) -> true | nil, err
-- stores one. Events older than the TTL at now_ms are skipped, as are ids already restored
-- (two persistence add-ons may hold the same events). started lists the add-ons whose
-- on_start ran (to undo on failure). Returns true or nil, message.
function M.restore(add_ons, options, ttl_ms, now_ms, put, started)
  local restored = {}
  local view = readonly(options)
  for i, a in ipairs(add_ons) do
    if a.on_start then
      local ok, iter, state, init = pcall(a.on_start, view)
      if not ok then return nil, ("add-on %d: on_start failed: %s"):format(i, tostring(iter)) end
      started[#started + 1] = a
      if iter ~= nil then
        if type(iter) ~= "function" then return nil, ("add-on %d: on_start must return an iterator"):format(i) end
        while true do
          local okn, e = pcall(iter, state, init)
          if not okn then return nil, ("add-on %d: reading stored events failed: %s"):format(i, tostring(e)) end
          if e == nil then break end
          init = e
          if type(e) ~= "table" or type(e.category) ~= "string" or math.type(e.timestamp) ~= "integer" then
            return nil, ("add-on %d: a stored event lacks category or an integer timestamp"):format(i)
          end
          if (ttl_ms == 0 or now_ms - e.timestamp < ttl_ms) and not restored[e.id] then
            restored[e.id] = true
            local data_json = e.data_json
            if data_json == nil then
              local err
              data_json, err = core.json_encode(e.data)
              if not data_json then return nil, ("add-on %d: stored event data: %s"):format(i, err) end
            end
            local rok, rerr = put(e, data_json)
            if not rok then
              return nil, ("add-on %d: stored event %s refused: %s"):format(i, tostring(e.id), rerr)
            end
          end
        end
      end
    end
  end
  return true
end

-- Runs every on_shutdown hook; a hook that takes an argument is asynchronous and calls it
-- when finished. done(ok, err) once all finished, or after `seconds` (nil: no limit) with
-- false, "shutdown timeout exceeded". log(level, message, fields) reports problems.
function M.shutdown(add_ons, seconds, log, done)
  local pending = 0
  local finished = false
  local timer
  local function finish(ok, err)
    if finished then return end
    finished = true
    if timer then Timeouts.close_handle(timer) end
    done(ok, err)
  end
  for i, a in ipairs(add_ons) do
    local hook = a.on_shutdown
    if hook then
      local async = debug.getinfo(hook, "u").nparams >= 1
      if async then pending = pending + 1 end
      local called = false
      local function hook_done()
        if called or not async then return end
        called = true
        pending = pending - 1
        if pending == 0 then finish(true) end
      end
      local ok, err = pcall(hook, hook_done)
      if not ok then
        log("error", "add-on hook failed", { add_on = i, hook = "on_shutdown", error = tostring(err) })
        hook_done()
      end
    end
  end
  if pending == 0 then
    finish(true)
  elseif seconds then
    timer = uv.new_timer()
    timer:start(math.floor(seconds * 1000), 0, function()
      log("warn", "shutdown timeout exceeded while waiting for add-ons", { seconds = seconds })
      finish(false, "shutdown timeout exceeded")
    end)
  end
end

return M
