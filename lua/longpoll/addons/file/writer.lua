-- The file add-on's writer: batches appended lines and writes them every flush interval
-- (asynchronous luv writes, fsync'ed if asked), and runs one job at a time on the file: a
-- flush or a compaction. It notices a failing disk (counted, logged, retried; see
-- writer:healthy) and a file deleted under it (recreated, logged).
local uv = require "luv"
local fs = require "longpoll.addons.file.fs"
local compaction = require "longpoll.addons.file.compaction"

local concat, find, sub = table.concat, string.find, string.sub
local call = fs.call

local Writer = {}
Writer.__index = Writer

local function call_all(list, err)
  for i = 1, #list do list[i](err) end
end

-- Writer.new(cfg, file): cfg = { path, flush_interval_ms, fsync, compact_ratio, compact_slack,
-- max_pending_bytes, clock (epoch ms), report(level, message, fields) }; file = { fd (open for
-- appending), live (Live index), lines, bytes, needs_newline (the file ends in a torn line) }.
function Writer.new(cfg, file)
  return setmetatable({
    cfg = cfg, fd = file.fd, live = file.live,
    pending = {}, pending_events = 0, pending_bytes = 0, -- lines not written yet: json, "\n", ...
    needs_newline = file.needs_newline or false,
    waiters = {}, compact_waiters = {}, -- flush(cb) and compact(cb) callers
    busy = false, flush_due = false, compact_due = false, closing = false,
    lines_in_file = file.lines, bytes_in_file = file.bytes, compact_floor = 0,
    events_written = 0,
    failing = nil, -- the error of the last write while it keeps failing
    counts = { flushes = 0, write_errors = 0, compactions = 0, compaction_errors = 0, recreated = 0,
      lost_events = 0 },
    report = cfg.report,
  }, Writer)
end

local kick -- starts the next job when none is in flight

local function arm_timer(self)
  if self.closing then return end
  if not self.timer then
    -- made on first use, so a start the manager gives up on leaves no handle behind
    self.timer = uv.new_timer()
    self.timer:unref() -- it never keeps the process alive; shutdown flushes
  end
  if not self.timer:is_active() then
    self.timer:start(self.cfg.flush_interval_ms, 0, function()
      self.flush_due = self.pending_events > 0
      kick(self)
    end)
  end
end

local function compaction_wanted(self)
  if self.closing or self.lines_in_file < self.compact_floor then return false end
  self.live:expire(self.cfg.clock())
  return self.lines_in_file > self.cfg.compact_ratio * self.live.count + self.cfg.compact_slack
end

-- A write that failed: complete lines that reached the file are not written
-- again; a torn line left there is ended with a newline first, so a restore skips it.
local function requeue(self, data, written, n_events, err)
  self.bytes_in_file = self.bytes_in_file + written
  if self.leading_newline then -- the newline that ends an earlier torn line
    if written >= 1 then self.needs_newline = false end
    data, written = sub(data, 2), math.max(0, written - 1)
  end
  local lines, last_nl, pos = 0, 0, 1
  for _ = 1, n_events do
    local nl = find(data, "\n", pos, true)
    if not nl or nl > written then break end
    lines, last_nl, pos = lines + 1, nl, nl + 1
  end
  self.lines_in_file = self.lines_in_file + lines
  self.events_written = self.events_written + lines
  local rest = sub(data, last_nl + 1)
  if written > last_nl then
    self.needs_newline = true -- the torn fragment becomes a (corrupt) line
    self.lines_in_file = self.lines_in_file + 1
  end
  local lost_now = n_events - lines
  self.failing = tostring(err)
  self.report("error", "file add-on: write failed; events wait in memory and are retried", {
    error = tostring(err), waiting_events = lost_now + self.pending_events,
    write_errors = self.counts.write_errors + 1, lost_events = self.counts.lost_events })
  if self.closing then
    self.report("error", "file add-on: events lost at shutdown, the file cannot be written",
      { events = lost_now + self.pending_events })
    self.counts.lost_events = self.counts.lost_events + lost_now + self.pending_events
    self.pending, self.pending_events, self.pending_bytes = {}, 0, 0
    return
  end
  local pending = { rest }
  for i = 1, #self.pending do pending[i + 1] = self.pending[i] end
  self.pending, self.pending_events = pending, self.pending_events + lost_now
  self.pending_bytes = self.pending_bytes + #rest
  arm_timer(self) -- retried after one more interval
end

-- The file was deleted (or renamed away) while we append to it: nothing written from now
-- on would be found by a restart. Open a new one at the path and say so loudly.
local function recreate_if_deleted(self, next_step)
  call(function(err, stat)
    if err or not stat or stat.nlink > 0 then return next_step() end
    call(function(oerr, fd)
      if oerr then
        self.report("error", "file add-on: the file was deleted and cannot be recreated", { error = tostring(oerr) })
        return next_step()
      end
      local old = self.fd
      self.fd = fd
      self.counts.recreated = self.counts.recreated + 1
      self.report("error", "file add-on: the file was deleted while running; recreated it (events written"
        .. " before are gone from disk, later ones are kept)", { lines_lost = self.lines_in_file })
      self.lines_in_file, self.bytes_in_file, self.needs_newline = 0, 0, false
      call(function() next_step() end, uv.fs_close, old)
    end, uv.fs_open, self.cfg.path, "a", fs.FILE_MODE)
  end, uv.fs_fstat, self.fd)
end

local function start_flush(self)
  self.flush_due, self.busy = false, true
  recreate_if_deleted(self, function()
    local data, n = concat(self.pending), self.pending_events
    self.leading_newline = self.needs_newline
    if self.needs_newline then data = "\n" .. data end
    local waiters = self.waiters
    self.pending, self.pending_events, self.pending_bytes, self.waiters = {}, 0, 0, {}
    local function finish(err)
      self.busy = false
      self.counts.flushes = self.counts.flushes + 1
      if err then self.counts.write_errors = self.counts.write_errors + 1 end
      call_all(waiters, err)
      if not err and compaction_wanted(self) then self.compact_due = true end
      kick(self)
    end
    fs.write_fully(self.fd, data, function(err, written)
      if err then
        requeue(self, data, written, n, err)
        return finish(err)
      end
      if self.failing then
        self.report("warn", "file add-on: writing works again", { after = self.failing })
        self.failing = nil
      end
      self.needs_newline = false
      self.lines_in_file = self.lines_in_file + n
      self.bytes_in_file = self.bytes_in_file + written
      self.events_written = self.events_written + n
      if not self.cfg.fsync then return finish(nil) end
      call(function(ferr)
        if ferr then self.report("error", "file add-on: fsync failed", { error = tostring(ferr) }) end
        finish(ferr)
      end, uv.fs_fsync, self.fd)
    end)
  end)
end

local function start_compaction(self)
  local waiters = self.compact_waiters
  self.compact_waiters, self.compact_due, self.busy = {}, false, true
  local now = self.cfg.clock()
  self.live:expire(now)
  local job = { path = self.cfg.path, size = self.bytes_in_file, live = self.live, now = now,
    fsync = self.cfg.fsync }
  compaction.run(job, function(err, result)
    local function finish()
      self.busy = false
      if err then
        self.counts.compaction_errors = self.counts.compaction_errors + 1
        self.compact_floor = self.lines_in_file + math.max(self.cfg.compact_slack, 100)
        self.report("error", "file add-on: compaction failed", { error = tostring(err) })
      else
        self.counts.compactions = self.counts.compactions + 1
      end
      call_all(waiters, err)
      kick(self)
    end
    if err then return finish() end
    local old = self.fd
    self.fd, self.lines_in_file, self.bytes_in_file = result.fd, result.lines, result.bytes
    self.needs_newline = false
    call(finish, uv.fs_close, old)
  end)
end

kick = function(self)
  if self.busy or not self.fd then return end
  if self.pending_events > 0 and (self.flush_due or self.closing or #self.waiters > 0) then
    return start_flush(self)
  end
  if self.compact_due then
    if not self.closing then return start_compaction(self) end
    self.compact_due = false
    local ws = self.compact_waiters
    self.compact_waiters = {}
    call_all(ws, "shutting down")
  end
  if #self.waiters > 0 then
    local ws = self.waiters
    self.waiters = {}
    call_all(ws, nil)
  end
end

-- Queues an event's line. While the file cannot be written, the lines wait in memory up
-- to max_pending_bytes; past that an event is lost, counted and logged.
function Writer:append(event)
  if not self.fd or self.closing then return end
  local json = event.json
  -- a raw newline in JSON text is always white space between tokens (strings
  -- cannot hold one), so a space keeps the meaning and the line intact
  if find(json, "\n", 1, true) then json = json:gsub("\n", " ") end
  if self.pending_bytes + #json + 1 > self.cfg.max_pending_bytes then
    if self.failing then
      self.counts.lost_events = self.counts.lost_events + 1
      if self.counts.lost_events == 1 or self.counts.lost_events % 1000 == 0 then
        self.report("error", "file add-on: events lost: the file cannot be written and max_pending_bytes is full",
          { lost_events = self.counts.lost_events, error = self.failing })
      end
      return
    end
    self.flush_due = true -- a burst: write it now rather than at the interval
  end
  local p = self.pending
  p[#p + 1] = json
  p[#p + 1] = "\n"
  self.pending_events = self.pending_events + 1
  self.pending_bytes = self.pending_bytes + #json + 1
  self.live:add(event.id, event.timestamp, event.category)
  arm_timer(self)
  if self.flush_due then kick(self) end
end

-- writer:flush(cb): writes what is pending now; cb(err) once it is in the file.
function Writer:flush(cb)
  if not self.fd then return cb("not started") end
  self.waiters[#self.waiters + 1] = cb
  kick(self)
end

-- writer:compact(cb): compacts now, whatever the ratio; cb(err) when done.
function Writer:compact(cb)
  if not self.fd or self.closing then return cb("not started") end
  self.compact_waiters[#self.compact_waiters + 1] = cb
  self.compact_due = true
  kick(self)
end

-- writer:close(done): writes what is pending (fsync'ed if asked), closes the file, done().
function Writer:close(done)
  if not self.fd then return done() end
  if self.closing then
    self.waiters[#self.waiters + 1] = function() done() end
    return
  end
  self.closing = true
  if self.timer then self.timer:stop() end
  self.waiters[#self.waiters + 1] = function()
    local fd, timer = self.fd, self.timer
    self.fd, self.timer = nil, nil
    if timer and not timer:is_closing() then timer:close() end
    call(function(err)
      if err then self.report("error", "file add-on: close failed", { error = tostring(err) }) end
      done()
    end, uv.fs_close, fd)
  end
  kick(self)
end

function Writer:is_open() return self.fd ~= nil end

-- true, or false and the error while the file cannot be written (the last write failed).
function Writer:healthy()
  if self.failing then return false, self.failing end
  return true
end

function Writer:stats()
  local c = self.counts
  return {
    open = self.fd ~= nil, lines_in_file = self.lines_in_file, bytes_in_file = self.bytes_in_file,
    live_events = self.live.count, pending_events = self.pending_events, pending_bytes = self.pending_bytes,
    events_written = self.events_written, flushes = c.flushes, write_errors = c.write_errors,
    compactions = c.compactions, compaction_errors = c.compaction_errors, recreated = c.recreated,
    lost_events = c.lost_events, failing = self.failing,
  }
end

return Writer
