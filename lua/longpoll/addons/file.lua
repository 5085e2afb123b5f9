-- File persistence add-on: appends every published event to a JSON-lines file, restores
-- them on start, compacts the file to the events the store still holds. Format, guarantees
-- and failure rules: docs/persistence.md. The rooms: file/restore.lua reads the file at
-- start, file/writer.lua appends (and runs file/compaction.lua), file/lock.lua keeps a
-- second process away, file/live.lua tracks which events are live.
local uv = require "luv"
local core = require "longpoll.core"
local log = require "longpoll.log"
local fs = require "longpoll.addons.file.fs"
local Live = require "longpoll.addons.file.live"
local restore = require "longpoll.addons.file.restore"
local Writer = require "longpoll.addons.file.writer"
local lock = require "longpoll.addons.file.lock"

local FOREVER = -1 -- event_ttl_seconds: events never expire (longpoll.FOREVER)

local function wall_clock_ms()
  local sec, usec = uv.gettimeofday()
  return sec * 1000 + usec // 1000
end

local function noop() end

---------------------------------------------------------------------------------------------
-- Options

local KNOWN = {
  path = true, flush_interval_ms = true, fsync = true, compact_ratio = true, compact_slack = true,
  max_live_events = true, max_event_buffer_size = true, event_ttl_seconds = true, logger = true,
  clock = true, max_pending_bytes = true,
}

local function is_int(v, min)
  return type(v) == "number" and v == math.floor(v) and v >= min and v < math.huge
end

-- Returns the complete configuration or nil, message.
local function check_options(o)
  if type(o) ~= "table" then return nil, "options must be a table" end
  for k in pairs(o) do
    if not KNOWN[k] then return nil, ("unknown option '%s'"):format(tostring(k)) end
  end
  if type(o.path) ~= "string" or o.path == "" then return nil, "option 'path' must be a non-empty string" end
  local c = { path = o.path, flush_interval_ms = 1000, fsync = false, compact_ratio = 2, compact_slack = 1000,
    max_pending_bytes = 64 * 1024 * 1024 }
  if o.flush_interval_ms ~= nil then
    if not is_int(o.flush_interval_ms, 0) then return nil, "option 'flush_interval_ms' must be an integer >= 0" end
    c.flush_interval_ms = math.tointeger(o.flush_interval_ms)
  end
  if o.fsync ~= nil then
    if type(o.fsync) ~= "boolean" then return nil, "option 'fsync' must be a boolean" end
    c.fsync = o.fsync
  end
  if o.compact_ratio ~= nil then
    if type(o.compact_ratio) ~= "number" or o.compact_ratio ~= o.compact_ratio
      or o.compact_ratio < 1 or o.compact_ratio == math.huge then
      return nil, "option 'compact_ratio' must be a number >= 1"
    end
    c.compact_ratio = o.compact_ratio
  end
  if o.compact_slack ~= nil then
    if not is_int(o.compact_slack, 0) then return nil, "option 'compact_slack' must be an integer >= 0" end
    c.compact_slack = math.tointeger(o.compact_slack)
  end
  for _, k in ipairs { "max_live_events", "max_event_buffer_size", "max_pending_bytes" } do
    if o[k] ~= nil then
      if not is_int(o[k], 1) then return nil, ("option '%s' must be an integer >= 1"):format(k) end
      c[k] = math.tointeger(o[k])
    end
  end
  if o.clock ~= nil then
    if type(o.clock) ~= "function" then return nil, "option 'clock' must be a function returning epoch milliseconds" end
    c.clock = o.clock
  end
  local ttl = o.event_ttl_seconds
  if ttl ~= nil and ttl ~= FOREVER and ttl ~= math.huge and (type(ttl) ~= "number" or ttl ~= ttl or ttl <= 0) then
    return nil, "option 'event_ttl_seconds' must be a positive number of seconds, or longpoll.FOREVER"
  end
  c.event_ttl_seconds = ttl
  local ok, msg = log.check(o.logger)
  if not ok then return nil, msg end
  -- nil: warnings and errors to stderr; false: silent
  c.logger = log.new(o.logger == nil and { level = "warn" } or o.logger)
  return c
end

local function ttl_ms_of(seconds)
  if seconds == nil or seconds == FOREVER or seconds == math.huge then return 0 end
  return math.max(1, math.floor(seconds * 1000))
end

---------------------------------------------------------------------------------------------
-- Start: the lock, then the file read and made clean, then the writer

-- Makes the file fit for appending after a read: a torn last line is cut off (that needs no
-- free space), a damaged or bloated file rewritten. A rewrite that fails (a full disk) is
-- logged and skipped: restarting must always work. Returns lines in the file and whether
-- the file still ends in a torn line.
local function tidy(cfg, result, report)
  local entries, lines = result.entries, result.lines
  if result.dirty or lines > cfg.compact_ratio * #entries + cfg.compact_slack then
    local ok, err = pcall(restore.rewrite, cfg.path, entries, cfg.fsync)
    if ok then return #entries, false end
    report("error", "file add-on: cannot rewrite the file at start; keeping it as it is", { error = err })
  end
  if result.torn_at then
    local ok, err = restore.truncate(cfg.path, result.torn_at)
    if ok then return lines - 1, false end
    report("error", "file add-on: cannot cut off the torn last line", { error = tostring(err) })
    return lines, true
  end
  return lines, false
end

local function new(options)
  local cfg, cerr = check_options(options)
  if not cfg then return nil, cerr end
  local logger = cfg.logger
  cfg.report = function(level, message, fields)
    if logger then
      fields = fields or {}
      fields.path = cfg.path
      logger(level, message, fields)
    end
  end
  local writer, held, start_stats -- made by on_start

  local addon = { _NAME = "longpoll.addons.file" }

  -- on_start([manager_options]): locks and reads the file (synchronously: nothing is
  -- served yet) and returns an iterator over the events to restore, oldest first.
  -- Raises when the file cannot be used. The manager's options, when given, fill
  -- in max_event_buffer_size, event_ttl_seconds and clock not set on the add-on.
  function addon.on_start(manager_options)
    if writer then error("already started (one add-on serves one manager)", 0) end
    local mo = type(manager_options) == "table" and manager_options or {}
    local buffer_size = cfg.max_event_buffer_size or mo.max_event_buffer_size or 250
    local ttl_seconds = cfg.event_ttl_seconds
    if ttl_seconds == nil then ttl_seconds = mo.event_ttl_seconds end
    cfg.clock = cfg.clock or (type(mo.clock) == "function" and mo.clock) or wall_clock_ms
    local path, dir = cfg.path, fs.dirname(cfg.path)
    local okd, derr = uv.fs_access(dir, "w")
    if not okd then error("directory " .. dir .. " is not writable: " .. tostring(derr), 0) end
    local stat = uv.fs_stat(path)
    if stat and stat.type ~= "file" then error(path .. " is not a regular file", 0) end
    local lerr
    held, lerr = lock.acquire(path)
    if not held then error(lerr, 0) end
    local ok, iter = pcall(function()
      uv.fs_unlink(path .. ".compact") -- left by a compaction that never finished
      local live = Live.new(buffer_size, ttl_ms_of(ttl_seconds), cfg.max_live_events)
      local result = { entries = {}, lines = 0, dirty = false, counts = {} }
      for _, k in ipairs(restore.SKIP_KINDS) do result.counts[k] = 0 end
      result.counts.expired = 0
      if stat then
        result = restore.read(path, { live = live, now = cfg.clock(), max_category_bytes = mo.max_category_bytes })
      end
      local counts, skipped = result.counts, 0
      for _, k in ipairs(restore.SKIP_KINDS) do skipped = skipped + counts[k] end
      if skipped > 0 then
        local fields = { first = counts.first_problem }
        for _, k in ipairs(restore.SKIP_KINDS) do fields[k] = counts[k] end
        cfg.report("warn", "file add-on: skipped unreadable stored events", fields)
      end
      local lines, torn = tidy(cfg, result, cfg.report)
      local fd, ferr = uv.fs_open(path, "a", fs.FILE_MODE)
      if not fd then error("cannot open " .. path .. ": " .. tostring(ferr), 0) end
      local fstat = uv.fs_fstat(fd)
      writer = Writer.new(cfg, { fd = fd, live = live, lines = lines, bytes = fstat and fstat.size or 0,
        needs_newline = torn })
      start_stats = { restored = #result.entries, skipped = counts, rewritten_on_start = result.dirty }
      local entries, i = result.entries, 0
      return function()
        i = i + 1
        local e = entries[i]
        if e == nil then return nil end
        entries[i] = nil -- restored: the store holds it now
        return e.event
      end
    end)
    if not ok then
      lock.release(held)
      held = nil
      error(iter, 0)
    end
    return iter
  end

  function addon.on_publish(event)
    if writer then writer:append(event) end
  end

  -- on_shutdown(done): writes what is pending (fsync'ed if asked), closes the file and
  -- releases the lock, then calls done.
  function addon.on_shutdown(done)
    if not writer then
      lock.release(held)
      held = nil
      return done()
    end
    writer:close(function()
      lock.release(held, done)
      held = nil
    end)
  end

  -- addon:flush([cb]): writes what is pending now; cb(err) once it is in the file.
  function addon.flush(_, cb)
    cb = cb or noop
    if not writer then return cb("not started") end
    writer:flush(cb)
  end

  -- addon:compact([cb]): compacts now, whatever the ratio; cb(err) when done.
  function addon.compact(_, cb)
    cb = cb or noop
    if not writer then return cb("not started") end
    writer:compact(cb)
  end

  -- addon:healthy() -> true | false, error: false while the file cannot be written.
  function addon.healthy()
    if not writer then return true end
    return writer:healthy()
  end

  -- addon:stats(): figures about the file and the writer.
  function addon.stats()
    if not writer then return { started = false } end
    local s = writer:stats()
    s.started, s.path = true, cfg.path
    s.restored, s.rewritten_on_start = start_stats.restored, start_stats.rewritten_on_start
    s.skipped = {}
    for _, k in ipairs(restore.SKIP_KINDS) do s.skipped[k] = start_stats.skipped[k] end
    s.expired_on_start = start_stats.skipped.expired
    return s
  end

  return addon
end

-- file.guard(addon, handler) -> handler: a publish handler wrapped to answer 503 while the
-- add-on's file cannot be written (a full disk), so no event is acknowledged that would be
-- lost. OPTIONS (CORS preflights) goes through.
local function guard(addon, handler)
  local prefix = "persistence is failing, publishing is paused: "
  return function(req, res)
    if req.method ~= "OPTIONS" then
      local ok, err = addon.healthy()
      if not ok then
        res:set_header("Content-Type", "application/json")
        res:set_header("Retry-After", "1")
        return res:send(503, '{"error":' .. core.json_string(prefix .. tostring(err)) .. "}")
      end
    end
    return handler(req, res)
  end
end

return setmetatable({ _NAME = "longpoll.addons.file", new = new, guard = guard }, {
  __call = function(_, options) return new(options) end,
})
