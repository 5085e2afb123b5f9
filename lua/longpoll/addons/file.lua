-- File persistence add-on: appends every published event to a JSON-lines file
-- (batched, asynchronous luv writes), restores them on start, and compacts the
-- file to the events the store still holds. Format and guarantees: docs/persistence.md.
local uv = require "luv"
local core = require "longpoll.core"
local cjson = require "cjson"
local log = require "longpoll.log"

local FOREVER = -1 -- event_ttl_seconds: events never expire (longpoll.FOREVER)
local READ_CHUNK = 256 * 1024 -- compaction reads the old file in pieces of this size
local WRITE_CHUNK = 1024 * 1024 -- the start-up rewrite writes about this much at a time
local FILE_MODE = tonumber("644", 8)
local ID_SUFFIX = ',"id":"' -- a canonical line ends with ,"id":"<36-char uuid>"}
local SUFFIX_LEN = #ID_SUFFIX + 36 + 2
local ANY_CATEGORY_BYTES = 1 << 30 -- the store, not the file, decides how long a category may be

local concat, find, sub = table.concat, string.find, string.sub

local function now_ms()
  local sec, usec = uv.gettimeofday()
  return sec * 1000 + usec // 1000
end

local function noop() end

-- Starts an asynchronous luv fs call fn(...) with callback cb; a request luv
-- refuses at once (it then returns nil, err and never calls back) reports to cb too.
local function fs(cb, fn, ...)
  local args = table.pack(...)
  args.n = args.n + 1
  args[args.n] = cb
  local req, err = fn(table.unpack(args, 1, args.n))
  if req == nil and err ~= nil then cb(err) end
end

-- Writes all of `data` at fd's current position (or its end, for O_APPEND),
-- continuing after short writes; done(err, bytes_written).
local function write_fully(fd, data, done)
  local written = 0
  local function step(err, n)
    if err then return done(err, written) end
    if n == 0 then return done("write made no progress", written) end
    written = written + n
    if written >= #data then return done(nil, written) end
    fs(step, uv.fs_write, fd, sub(data, written + 1), -1)
  end
  fs(step, uv.fs_write, fd, data, -1)
end

local function dirname(path)
  local dir = path:match("^(.*)/[^/]*$")
  if dir == nil then return "." end
  if dir == "" then return "/" end
  return dir
end

---------------------------------------------------------------------------------------------
-- Options

local KNOWN = {
  path = true, flush_interval_ms = true, fsync = true, compact_ratio = true, compact_slack = true,
  max_live_events = true, max_event_buffer_size = true, event_ttl_seconds = true, logger = true,
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
  local c = { path = o.path, flush_interval_ms = 1000, fsync = false, compact_ratio = 2, compact_slack = 1000 }
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
  for _, k in ipairs { "max_live_events", "max_event_buffer_size" } do
    if o[k] ~= nil then
      if not is_int(o[k], 1) then return nil, ("option '%s' must be an integer >= 1"):format(k) end
      c[k] = math.tointeger(o[k])
    end
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
-- Live events: which events the store still holds, as far as the file can tell
-- (at most max_event_buffer_size per category, none past the TTL, at most
-- max_live_events in all). Compaction keeps exactly these.

local Live = {}
Live.__index = Live

local function new_queue() return { first = 1, last = 0, n = 0 } end

local function new_live(buffer_size, ttl_ms, max_events)
  return setmetatable({
    buffer_size = buffer_size, ttl_ms = ttl_ms, max_events = max_events,
    by_id = {}, count = 0,
    order = new_queue(), dead_in_order = 0, -- every entry in publish order, dead ones until popped
    categories = {}, -- category -> queue of its live entries, oldest first
  }, Live)
end

-- The oldest live entry (dropping dead ones from the head of the order).
function Live:_oldest()
  local o = self.order
  for _ = o.first, o.last do
    local e = o[o.first]
    if not e.dead then return e end
    o[o.first] = nil
    o.first = o.first + 1
    self.dead_in_order = self.dead_in_order - 1
  end
end

-- Kills e, which is always the oldest live entry of its category: evicted by
-- the buffer size, or the oldest of all (TTL, max_live_events).
function Live:_kill(e)
  e.dead = true
  self.by_id[e.id] = nil
  self.count = self.count - 1
  self.dead_in_order = self.dead_in_order + 1
  local q = self.categories[e.category]
  q[q.first] = nil
  q.first = q.first + 1
  q.n = q.n - 1
  if q.n == 0 then self.categories[e.category] = nil end
end

function Live:_rebuild_order()
  local o, fresh = self.order, new_queue()
  for i = o.first, o.last do
    local e = o[i]
    if not e.dead then
      fresh.last = fresh.last + 1
      fresh[fresh.last] = e
    end
  end
  self.order, self.dead_in_order = fresh, 0
end

function Live:add(id, ts, category)
  if self.by_id[id] then return self.by_id[id] end
  local e = { id = id, ts = ts, category = category }
  self.by_id[id] = e
  self.count = self.count + 1
  local o = self.order
  o.last = o.last + 1
  o[o.last] = e
  local q = self.categories[category]
  if not q then
    q = new_queue()
    self.categories[category] = q
  end
  q.last = q.last + 1
  q[q.last] = e
  q.n = q.n + 1
  if q.n > self.buffer_size then self:_kill(q[q.first]) end
  if self.max_events and self.count > self.max_events then self:_kill(self:_oldest()) end
  -- evictions leave dead entries inside the order; sweep them before they outnumber the living
  if self.dead_in_order > self.count + 1024 then self:_rebuild_order() end
  return e
end

function Live:expire(now)
  if self.ttl_ms == 0 then return end
  for _ = 1, self.count do
    local e = self:_oldest()
    if not e or now - e.ts < self.ttl_ms then return end
    self:_kill(e)
  end
end

function Live:holds(id, now)
  local e = self.by_id[id]
  return e ~= nil and (self.ttl_ms == 0 or now - e.ts < self.ttl_ms)
end

---------------------------------------------------------------------------------------------
-- Reading the file (at start, before serving: synchronous)

local function canonical_line(ev)
  return ('{"timestamp":%d,"category":%s,"data":%s,"id":"%s"}'):format(ev.timestamp,
    core.json_string(ev.category), ev.data_json, ev.id)
end

-- Parses one line (without its newline). Returns the event and whether the line
-- is canonical (what the store writes: timestamp first, id last), or nil, reason.
-- data_json is the exact text of "data" in the line (core.parse_publish ignores
-- the other keys and returns it untouched), so numbers keep every digit.
local function parse_line(line, max_category_bytes)
  local ok, err = core.json_check(line)
  if not ok then return nil, "not JSON (" .. err .. ")" end
  local category, data_json = core.parse_publish(line, max_category_bytes)
  if not category then return nil, "no valid category or data" end
  local ts = line:match('^{"timestamp":(%-?%d+),')
  local id = #line > SUFFIX_LEN and sub(line, -SUFFIX_LEN):match('^,"id":"(.*)"}$')
  local canonical = ts ~= nil and id ~= nil
  if not canonical then
    -- written by someone else (other key order, spaces): let cjson find the fields
    local okd, obj = pcall(cjson.decode, line)
    if not okd or type(obj) ~= "table" then return nil, "cjson cannot read it" end
    ts, id = obj.timestamp, obj.id
  end
  ts = (type(ts) == "string" or type(ts) == "number") and math.tointeger(tonumber(ts))
  if not ts then return nil, "timestamp is not an integer" end
  if type(id) ~= "string" or not core.is_uuid(id) then return nil, "id is not a UUID" end
  if not core.utf8_valid(category) then return nil, "category is not UTF-8" end
  local lower = id:lower()
  if lower ~= id then canonical = false end
  return { id = lower, timestamp = ts, category = category, data_json = data_json }, canonical
end

-- Reads every line of an open file. Returns the kept entries ({event, line, live}) in
-- order, the number of lines, and whether the file should be rewritten.
local function read_lines(f, cfg, live, now, counts)
  local entries, seen = {}, {}
  local last_ts, line_no, dirty = math.mininteger, 0, false
  local function skip(kind, why)
    counts[kind] = counts[kind] + 1
    counts.first_problem = counts.first_problem or ("line %d: %s"):format(line_no, why)
    dirty = true
  end
  -- "L" keeps the newline, so a torn last line shows; no length limit
  for line in f:lines("L") do
    line_no = line_no + 1
    if line:byte(-1) ~= 10 then
      skip("torn", "torn last line (no newline)")
    else
      line = sub(line, 1, -2)
      if not find(line, "%S") then
        dirty = true -- blank: harmless, dropped by the rewrite
      else
        local ev, canonical = parse_line(line, cfg.max_category_bytes or ANY_CATEGORY_BYTES)
        if not ev then
          skip("corrupt", canonical)
        elseif ev.timestamp < last_ts then
          skip("out_of_order", "timestamp older than the line before")
        elseif seen[ev.id] then
          skip("duplicate", "id already seen")
        else
          seen[ev.id] = true
          last_ts = ev.timestamp
          if not canonical then
            line, dirty = canonical_line(ev), true
          end
          if live.ttl_ms > 0 and now - ev.timestamp >= live.ttl_ms then
            counts.expired = counts.expired + 1
          else
            entries[#entries + 1] = { event = ev, line = line, live = live:add(ev.id, ev.timestamp, ev.category) }
          end
        end
      end
    end
  end
  local kept = {}
  for i = 1, #entries do
    if not entries[i].live.dead then kept[#kept + 1] = entries[i] end
  end
  return kept, line_no, dirty
end

local function check(ok, err, what)
  if ok == nil then error(what .. ": " .. tostring(err), 0) end
  return ok
end

local function sync_dir_now(dir)
  local dfd = uv.fs_open(dir, "r", 0)
  if dfd then
    uv.fs_fsync(dfd)
    uv.fs_close(dfd)
  end
end

-- Replaces the file with `entries`' lines: write a sibling, fsync it, rename it over.
local function rewrite_now(cfg, entries)
  local tmp = cfg.path .. ".compact"
  local fd, oerr = uv.fs_open(tmp, "w", FILE_MODE)
  check(fd, oerr, "cannot create " .. tmp)
  local ok, err = pcall(function()
    local function write(s)
      local off = 0
      for _ = 1, #s do -- every pass writes at least one byte
        local n, werr = uv.fs_write(fd, off == 0 and s or sub(s, off + 1), -1)
        check(n, werr, "cannot write " .. tmp)
        if n == 0 then error("cannot write " .. tmp .. ": no progress", 0) end
        off = off + n
        if off >= #s then return end
      end
    end
    local buf, size = {}, 0
    for i = 1, #entries do
      local line = entries[i].line
      buf[#buf + 1] = line
      buf[#buf + 1] = "\n"
      size = size + #line + 1
      if size >= WRITE_CHUNK then
        write(concat(buf))
        buf, size = {}, 0
      end
    end
    if #buf > 0 then write(concat(buf)) end
    local fok, ferr = uv.fs_fsync(fd)
    check(fok, ferr, "cannot fsync " .. tmp)
  end)
  uv.fs_close(fd)
  if not ok then
    uv.fs_unlink(tmp)
    error(err, 0)
  end
  local rok, rerr = uv.fs_rename(tmp, cfg.path)
  if not rok then
    uv.fs_unlink(tmp)
    error("cannot rename " .. tmp .. ": " .. tostring(rerr), 0)
  end
  if cfg.fsync then sync_dir_now(dirname(cfg.path)) end
end

---------------------------------------------------------------------------------------------
-- The add-on

local function new(options)
  local cfg, cerr = check_options(options)
  if not cfg then return nil, cerr end
  local logger = cfg.logger
  local st = { started = false } -- the writer's state, (re)made by on_start
  local kick -- forward: starts the next job when none is in flight

  local function report(level, message, fields)
    if logger then
      fields = fields or {}
      fields.path = cfg.path
      logger(level, message, fields)
    end
  end

  local function call_all(list, err)
    for i = 1, #list do list[i](err) end
  end

  local function on_timer()
    st.flush_due = st.pending_events > 0
    kick()
  end

  local function arm_timer()
    if st.closing then return end
    if not st.timer then
      -- made on first use, so a start the manager gives up on leaves no handle behind
      st.timer = uv.new_timer()
      st.timer:unref() -- it never keeps the process alive; shutdown flushes
    end
    if not st.timer:is_active() then st.timer:start(cfg.flush_interval_ms, 0, on_timer) end
  end

  local function compaction_wanted()
    if st.closing or st.lines_in_file < st.compact_floor then return false end
    st.live:expire(now_ms())
    return st.lines_in_file > cfg.compact_ratio * st.live.count + cfg.compact_slack
  end

  -- A write that failed: complete lines that reached the file are not written
  -- again; a torn line left there is ended with a newline, so a restore skips it.
  local function requeue(data, written, n_events)
    local lines, last_nl, pos = 0, 0, 1
    for _ = 1, n_events do
      local nl = find(data, "\n", pos, true)
      if not nl or nl > written then break end
      lines, last_nl, pos = lines + 1, nl, nl + 1
    end
    st.lines_in_file = st.lines_in_file + lines
    st.bytes_in_file = st.bytes_in_file + written
    st.events_written = st.events_written + lines
    local rest = sub(data, last_nl + 1)
    if written > last_nl then
      rest = "\n" .. rest
      st.lines_in_file = st.lines_in_file + 1 -- the torn fragment becomes a (corrupt) line
    end
    if st.closing then
      report("error", "file add-on: events lost at shutdown, the file cannot be written",
        { events = n_events - lines + st.pending_events })
      st.pending, st.pending_events = {}, 0
      return
    end
    local pending = { rest }
    for i = 1, #st.pending do pending[i + 1] = st.pending[i] end
    st.pending, st.pending_events = pending, st.pending_events + n_events - lines
    arm_timer() -- retried after one more interval
  end

  local function start_flush()
    local data, n = concat(st.pending), st.pending_events
    local waiters = st.waiters
    st.pending, st.pending_events, st.waiters = {}, 0, {}
    st.flush_due, st.busy = false, true
    local function finish(err)
      st.busy = false
      st.stats.flushes = st.stats.flushes + 1
      if err then st.stats.write_errors = st.stats.write_errors + 1 end
      call_all(waiters, err)
      if not err and compaction_wanted() then st.compact_due = true end
      kick()
    end
    write_fully(st.fd, data, function(err, written)
      if err then
        report("error", "file add-on: write failed", { error = tostring(err) })
        requeue(data, written, n)
        return finish(err)
      end
      st.lines_in_file = st.lines_in_file + n
      st.bytes_in_file = st.bytes_in_file + written
      st.events_written = st.events_written + n
      if not cfg.fsync then return finish(nil) end
      fs(function(ferr)
        if ferr then report("error", "file add-on: fsync failed", { error = tostring(ferr) }) end
        finish(ferr)
      end, uv.fs_fsync, st.fd)
    end)
  end

  -- Copies the live events' lines to path..".compact", fsyncs it and renames it
  -- over the file; the new file's fd becomes the one appends go to. Events
  -- published meanwhile wait in `pending` and are appended afterwards.
  local function start_compaction()
    local waiters = st.compact_waiters
    st.compact_waiters, st.compact_due, st.busy = {}, false, true
    local now = now_ms()
    local live = st.live
    live:expire(now)
    local tmp = cfg.path .. ".compact"
    local size = st.bytes_in_file
    local rfd, wfd
    local offset, kept, kept_bytes, carry, emitted = 0, 0, 0, {}, {}

    local function finish(err)
      st.busy = false
      if err then
        st.stats.compaction_errors = st.stats.compaction_errors + 1
        st.compact_floor = st.lines_in_file + math.max(cfg.compact_slack, 100)
        report("error", "file add-on: compaction failed", { error = tostring(err) })
      else
        st.stats.compactions = st.stats.compactions + 1
      end
      call_all(waiters, err)
      kick()
    end

    local function fail(err)
      -- close, then unlink, then finish: a later compaction must not race this unlink
      local function unlink() fs(function() finish(err) end, uv.fs_unlink, tmp) end
      local function close_w()
        if wfd then fs(unlink, uv.fs_close, wfd) else unlink() end
      end
      if rfd then fs(close_w, uv.fs_close, rfd) else close_w() end
    end

    local function keep(line)
      if #line <= SUFFIX_LEN or sub(line, -SUFFIX_LEN, -SUFFIX_LEN + #ID_SUFFIX - 1) ~= ID_SUFFIX then
        return false -- a fragment of a failed write
      end
      local id = sub(line, -38, -3)
      if emitted[id] or not live:holds(id, now) then return false end
      emitted[id] = true
      return true
    end

    -- Returns the kept lines of a chunk; a line cut by the chunk's end waits in `carry`.
    local function sift(chunk)
      local out, pos = {}, 1
      for _ = 1, #chunk + 1 do
        local nl = find(chunk, "\n", pos, true)
        if not nl then
          if pos <= #chunk then carry[#carry + 1] = sub(chunk, pos) end
          break
        end
        local line
        if #carry > 0 then
          carry[#carry + 1] = sub(chunk, pos, nl - 1)
          line, carry = concat(carry), {}
        else
          line = sub(chunk, pos, nl - 1)
        end
        if keep(line) then
          out[#out + 1] = line
          out[#out + 1] = "\n"
          kept = kept + 1
        end
        pos = nl + 1
      end
      return concat(out)
    end

    local function seal()
      fs(function(ferr)
        if ferr then return fail(ferr) end
        fs(function(rerr)
          if rerr then return fail(rerr) end
          local old, newfd = st.fd, wfd
          wfd = nil
          st.fd, st.lines_in_file, st.bytes_in_file = newfd, kept, kept_bytes
          local function close_old()
            fs(function()
              fs(function() finish(nil) end, uv.fs_close, rfd)
            end, uv.fs_close, old)
          end
          if not cfg.fsync then return close_old() end
          -- the rename itself must survive a power loss, or later appends would be lost
          fs(function(derr, dfd)
            if derr then return close_old() end
            fs(function() fs(close_old, uv.fs_close, dfd) end, uv.fs_fsync, dfd)
          end, uv.fs_open, dirname(cfg.path), "r", 0)
        end, uv.fs_rename, tmp, cfg.path)
      end, uv.fs_fsync, wfd)
    end

    local function read_next()
      if offset >= size then return seal() end
      fs(function(err, chunk)
        if err then return fail(err) end
        if chunk == nil or #chunk == 0 then return fail("the file is shorter than written") end
        offset = offset + #chunk
        local text = sift(chunk)
        if #text == 0 then return read_next() end
        write_fully(wfd, text, function(werr, n)
          if werr then return fail(werr) end
          kept_bytes = kept_bytes + n
          read_next()
        end)
      end, uv.fs_read, rfd, math.min(READ_CHUNK, size - offset), offset)
    end

    fs(function(err, fd)
      if err then return fail(err) end
      rfd = fd
      fs(function(werr, fd2)
        if werr then return fail(werr) end
        wfd = fd2
        read_next()
      end, uv.fs_open, tmp, "w", FILE_MODE)
    end, uv.fs_open, cfg.path, "r", 0)
  end

  kick = function()
    if st.busy or not st.fd then return end
    if st.pending_events > 0 and (st.flush_due or st.closing or #st.waiters > 0) then return start_flush() end
    if st.compact_due then
      if not st.closing then return start_compaction() end
      st.compact_due = false
      local ws = st.compact_waiters
      st.compact_waiters = {}
      call_all(ws, "shutting down")
    end
    if #st.waiters > 0 then
      local ws = st.waiters
      st.waiters = {}
      call_all(ws, nil)
    end
  end

  local addon = { _NAME = "longpoll.addons.file" }

  -- on_start([manager_options]): reads the file (synchronously: nothing is served
  -- yet) and returns an iterator over the events to restore, oldest first.
  -- Raises when the file cannot be used. The manager's options, when given, fill
  -- in max_event_buffer_size and event_ttl_seconds not set on the add-on.
  function addon.on_start(manager_options)
    if st.fd then error("already started (one add-on serves one manager)", 0) end
    local mo = type(manager_options) == "table" and manager_options or {}
    local buffer_size = cfg.max_event_buffer_size or mo.max_event_buffer_size or 250
    local ttl_seconds = cfg.event_ttl_seconds
    if ttl_seconds == nil then ttl_seconds = mo.event_ttl_seconds end
    local read_cfg = { path = cfg.path, fsync = cfg.fsync, max_category_bytes = mo.max_category_bytes }
    local path, dir = cfg.path, dirname(cfg.path)
    local okd, derr = uv.fs_access(dir, "w")
    if not okd then error("directory " .. dir .. " is not writable: " .. tostring(derr), 0) end
    local stat = uv.fs_stat(path)
    if stat and stat.type ~= "file" then error(path .. " is not a regular file", 0) end
    uv.fs_unlink(path .. ".compact") -- left by a compaction that never finished

    local now = now_ms()
    local live = new_live(buffer_size, ttl_ms_of(ttl_seconds), cfg.max_live_events)
    local counts = { corrupt = 0, torn = 0, out_of_order = 0, duplicate = 0, expired = 0 }
    local entries, lines, dirty = {}, 0, false
    if stat then
      local f, oerr = io.open(path, "rb")
      if not f then error("cannot read " .. tostring(oerr), 0) end
      local ok, a, b, c = pcall(read_lines, f, read_cfg, live, now, counts)
      f:close()
      if not ok then error("cannot read " .. path .. ": " .. tostring(a), 0) end
      entries, lines, dirty = a, b, c
    end
    local skipped = counts.corrupt + counts.torn + counts.out_of_order + counts.duplicate
    if skipped > 0 then
      report("warn", "file add-on: skipped unreadable stored events", {
        corrupt = counts.corrupt, torn = counts.torn, out_of_order = counts.out_of_order,
        duplicate = counts.duplicate, first = counts.first_problem,
      })
    end
    if dirty or lines > cfg.compact_ratio * #entries + cfg.compact_slack then
      rewrite_now(read_cfg, entries)
      lines = #entries
    end
    local fd, ferr = uv.fs_open(path, "a", FILE_MODE)
    if not fd then error("cannot open " .. path .. ": " .. tostring(ferr), 0) end
    local fstat = uv.fs_fstat(fd)

    st = {
      started = true, fd = fd, live = live,
      pending = {}, pending_events = 0, -- lines not written yet: json, "\n", json, "\n", ...
      waiters = {}, compact_waiters = {}, -- flush(cb) and compact(cb) callers
      busy = false, flush_due = false, compact_due = false, closing = false,
      lines_in_file = lines, bytes_in_file = fstat and fstat.size or 0, compact_floor = 0,
      events_written = 0,
      stats = { flushes = 0, write_errors = 0, compactions = 0, compaction_errors = 0,
        restored = #entries, skipped = counts, rewritten_on_start = dirty },
    }
    local i = 0
    return function()
      i = i + 1
      local e = entries[i]
      if e == nil then return nil end
      entries[i] = nil -- restored: the store holds it now
      return e.event
    end
  end

  function addon.on_publish(event)
    if not st.fd or st.closing then return end
    local json = event.json
    -- a raw newline in JSON text is always white space between tokens (strings
    -- cannot hold one), so a space keeps the meaning and the line intact
    if find(json, "\n", 1, true) then json = json:gsub("\n", " ") end
    local p = st.pending
    p[#p + 1] = json
    p[#p + 1] = "\n"
    st.pending_events = st.pending_events + 1
    st.live:add(event.id, event.timestamp, event.category)
    arm_timer()
  end

  -- on_shutdown(done): writes what is pending (fsync'ed if asked), closes the
  -- file, then calls done.
  function addon.on_shutdown(done)
    if not st.fd or st.closing then
      if st.closing and st.fd then
        st.waiters[#st.waiters + 1] = function() done() end
        return
      end
      return done()
    end
    st.closing = true
    if st.timer then st.timer:stop() end
    st.waiters[#st.waiters + 1] = function()
      local fd, timer = st.fd, st.timer
      st.fd, st.timer = nil, nil
      if timer and not timer:is_closing() then timer:close() end
      fs(function(err)
        if err then report("error", "file add-on: close failed", { error = tostring(err) }) end
        done()
      end, uv.fs_close, fd)
    end
    kick()
  end

  -- addon:flush([cb]): writes what is pending now; cb(err) once it is in the file.
  function addon.flush(_, cb)
    cb = cb or noop
    if not st.fd then return cb("not started") end
    st.waiters[#st.waiters + 1] = cb
    kick()
  end

  -- addon:compact([cb]): compacts now, whatever the ratio; cb(err) when done.
  function addon.compact(_, cb)
    cb = cb or noop
    if not st.fd or st.closing then return cb("not started") end
    st.compact_waiters[#st.compact_waiters + 1] = cb
    st.compact_due = true
    kick()
  end

  -- addon:stats(): figures about the file and the writer.
  function addon.stats()
    if not st.started then return { started = false } end
    local s = st.stats
    return {
      started = true, open = st.fd ~= nil, path = cfg.path,
      lines_in_file = st.lines_in_file, bytes_in_file = st.bytes_in_file,
      live_events = st.live.count, pending_events = st.pending_events, events_written = st.events_written,
      flushes = s.flushes, write_errors = s.write_errors,
      compactions = s.compactions, compaction_errors = s.compaction_errors,
      restored = s.restored, rewritten_on_start = s.rewritten_on_start,
      skipped = { corrupt = s.skipped.corrupt, torn = s.skipped.torn, out_of_order = s.skipped.out_of_order,
        duplicate = s.skipped.duplicate },
      expired_on_start = s.skipped.expired,
    }
  end

  return addon
end

return setmetatable({ _NAME = "longpoll.addons.file", new = new }, {
  __call = function(_, options) return new(options) end,
})
