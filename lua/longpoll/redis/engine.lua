-- The Redis engine: several longpoll servers share categories through one
-- Redis. It replaces the publish and subscribe internals of one manager:
-- events live in Redis streams (longpoll.redis.scripts), every node keeps one
-- pub/sub connection that wakes its own waiting subscribers, and the local C
-- store only holds who waits on what. docs/scaling.md tells the whole story.
--
-- A waiting subscriber (a "waiter") always has a cursor: the client's
-- (since_time, last_id) until a read from Redis resolves it, then a position
-- in Redis's one sequence of events (epoch, timestamp, seq). An event reaches
-- a waiter only when it comes after that position, so a late pub/sub message
-- is never a duplicate; a waiter registers before its read, and events
-- arriving during the read wait beside it, so none is lost in between.
local uv = require "luv"
local core = require "longpoll.core"
local cjson = require "cjson"
local hiredis = require "longpoll.hiredis"
local config = require "longpoll.redis.config"
local Connection = require "longpoll.redis.connection"
local scripts = require "longpoll.redis.scripts"

local concat, tointeger = table.concat, math.tointeger

local Engine = {}
Engine.__index = Engine

local M = {}

local TIMEOUT_BODY = '{"timeout":"no events before timeout","timestamp":%d}'
-- How long a node waits for its own marker after Redis answered the mark.
local MARKER_WAIT_MS = 2000
-- How long shutdown waits for reads and marks in flight.
local SHUTDOWN_WAIT_MS = 1000

local function close_handle(h)
  if h and not h:is_closing() then h:close() end
end

local function random_hex(n)
  return (core.uuid():gsub("-", ""):sub(1, n))
end

function Engine:_log(level, message, fields)
  local logger = self.manager.logger
  if logger then pcall(logger, level, message, fields) end
end

---------------------------------------------------------------------------------------------
-- What the node knows of Redis's sequence

-- Notes a position Redis reported (an event, a read, a mark).
function Engine:_observe(epoch, ts, seq)
  if epoch ~= self.epoch then
    -- a late message of the old epoch must not switch back to it
    if self.old_epochs[epoch] then return end
    if self.epoch then
      self:_log("warn", "Redis has a new epoch: it lost its data", { epoch = epoch })
      self.old_epochs[self.epoch] = true
    end
    self.epoch, self.pos_ts, self.pos_seq = epoch, ts, seq
  elseif seq > self.pos_seq then
    self.pos_ts, self.pos_seq = ts, seq
  end
  if ts > self.floor then self.floor = ts end
end

-- The largest timestamp this node knows was issued (events or timeout answers).
function Engine:_known_time()
  return self.floor - 1 >= self.pos_ts and self.floor - 1 or self.pos_ts
end

local function deliverable(cursor, ev)
  return ev.epoch ~= cursor.epoch or ev.seq > cursor.seq
end

---------------------------------------------------------------------------------------------
-- Waiters

-- Registers w in the local store under a fresh handle.
function Engine:_wait(w)
  local handle, err, code = self.manager.store:wait(w.cat_arg)
  if not handle then return nil, err, code end
  w.handle = handle
  self.by_handle[handle] = w
  return true
end

-- Puts w back in the store after an event it must not get woke it.
function Engine:_rewait(w)
  local ok, err = self:_wait(w)
  if ok then return end
  if w.follow then return self:_end_follow(w, "cannot wait: " .. tostring(err)) end
  self:_answer_timeout_now(w, self:_offline_time(w))
end

-- Ends a follower the engine cannot keep; its owner learns it once.
function Engine:_end_follow(w, message)
  if w.done then return end
  self:_finish(w)
  local ok, err = pcall(w.on_events, nil, message)
  if not ok then self:_log("error", "watcher failed", { error = tostring(err) }) end
end

-- Forgets w everywhere; it is answered or gone.
function Engine:_finish(w)
  if w.done then return end
  w.done = true
  local m = self.manager
  if w.handle then
    self.by_handle[w.handle] = nil
    m.store:cancel(w.handle)
  end
  if w.res then
    if m.waiting[w] then m.waiting[w] = nil end
    m.timeouts:cancel(w)
  end
  if w.watch_id then self.watches[w.watch_id] = nil end
  self.nwaiters = self.nwaiters - 1
end

-- An event object as watchers and add-ons get it (its data decoded on first use).
function Engine:_event_object(ev)
  if ev.object then return ev.object end
  local json = ev.json
  local ts_text, cat_at = json:match('^{"timestamp":(%d+),"category":()')
  -- the category's JSON string ends at the first '","data":' (inside it, every quote is escaped)
  local data_at = cat_at and json:find('","data":', cat_at, true)
  if not data_at then return nil end
  local category = ev.category
  if not category then
    local ok, c = pcall(cjson.decode, json:sub(cat_at, data_at))
    if not ok then return nil end
    category = c
  end
  -- the JSON ends with ,"id":"<36 characters>"}
  local data_json, id = json:sub(data_at + #'","data":', -46), json:sub(-38, -3)
  ev.object = self.new_event(category, nil, data_json, json, id, tointeger(tonumber(ts_text)))
  return ev.object
end

-- A follower stays: its cursor moves to the last event it got when that came by pub/sub (a
-- read's events leave it at the read's position), and it waits again if the event took it out
-- of the store.
function Engine:_deliver_follow(w, events, missed)
  local last = events[#events]
  if last.seq then w.cursor = { epoch = last.epoch, ts = last.ts, seq = last.seq } end
  local list = {}
  for i = 1, #events do list[i] = events[i].json end
  local ok, err = pcall(w.on_events, list, missed == true)
  if not ok then self:_log("error", "watcher failed", { error = tostring(err) }) end
  if not w.done and not w.handle then self:_rewait(w) end
end

-- Answers w with events (a list of event records, oldest first).
function Engine:_deliver(w, events, missed)
  if w.follow then return self:_deliver_follow(w, events, missed) end
  self:_finish(w)
  if w.res then
    local body
    if #events == 1 and not missed then
      -- one event waking many subscribers: its answer is built once
      local ev = events[1]
      body = ev.body or '{"events":[' .. ev.json .. "]}"
      ev.body = body
    else
      local parts = {}
      for i = 1, #events do parts[i] = events[i].json end
      body = '{"events":[' .. concat(parts, ",") .. (missed and '],"missed":true}' or "]}")
    end
    self.send_json(w.res, 200, body)
  elseif w.watcher then
    local event = self:_event_object(events[1])
    local ok, err = pcall(w.watcher, event)
    if not ok then self:_log("error", "watcher failed", { error = tostring(err) }) end
  elseif w.on_events then
    local list = {}
    for i = 1, #events do list[i] = events[i].json end
    local ok, err = pcall(w.on_events, list, missed == true)
    if not ok then self:_log("error", "watcher failed", { error = tostring(err) }) end
  end
end

function Engine:_answer_timeout_now(w, T)
  if w.done then return end
  self:_finish(w)
  if w.res then self.send_json(w.res, 200, TIMEOUT_BODY:format(T)) end
end

-- A timeout timestamp when Redis cannot be asked. A waiter whose cursor is
-- current gets the newest time this node knows was issued; one whose read is
-- still owed gets its own cursor back, so continuing from it skips nothing.
function Engine:_offline_time(w)
  if w.cursor and not w.fetching and not w.needs_fetch then
    local T = self:_known_time()
    if w.since and w.since > T then T = w.since end
    return T
  end
  if w.since then return w.since end
  if w.cursor then return w.cursor.ts end
  return self:_known_time()
end

-- A new waiter: res (a long poll) or watcher (manager:watch). Without
-- since it starts at the node's position; with it, a read resolves it.
function Engine:_new_waiter(fields, categories)
  local w = fields
  w.cat_arg = categories
  w.categories = type(categories) == "string" and { categories } or categories
  local ok, err, code = self:_wait(w)
  if not ok then return nil, err, code end
  self.nwaiters = self.nwaiters + 1
  if w.since == nil then
    w.cursor = { epoch = self.epoch, ts = self.pos_ts, seq = self.pos_seq }
    -- pub/sub may have missed events, which only a read can tell
    if not self.online then w.needs_fetch = true end
  elseif self.online then
    self:_fetch({ w })
  else
    w.needs_fetch = true
  end
  return w
end

---------------------------------------------------------------------------------------------
-- Scripts

-- Runs a script by SHA, falling back to its text when Redis lost it.
function Engine:_script(name, keys, args, callback)
  local cmd = self.cmd
  if not (cmd and self.cmd_ready) then return nil, "Redis is unavailable" end
  local argv = { "EVALSHA", self.shas[name], #keys }
  for i = 1, #keys do argv[#argv + 1] = keys[i] end
  for i = 1, #args do argv[#argv + 1] = args[i] end
  return cmd:command(argv, function(reply, err, lost)
    if err and not lost and err:find("^NOSCRIPT") then
      argv[1], argv[2] = "EVAL", scripts[name]
      local ok, cerr = cmd:command(argv, callback)
      if not ok then callback(nil, cerr, true) end
      return
    end
    callback(reply, err, lost)
  end)
end

function Engine:_stream_key(category) return self.prefix .. "s:" .. category end
function Engine:_dropped_key(category) return self.prefix .. "d:" .. category end

---------------------------------------------------------------------------------------------
-- Reads (catch-up)

-- The script arguments of a waiter's cursor.
local function cursor_args(w)
  local c = w.cursor
  if c then
    if c.epoch == nil then return { "all", "", "", "" } end
    return { "after", ("%d"):format(c.ts), ("%d"):format(c.seq), c.epoch }
  end
  local since = w.since
  if since < 0 then return { "all", "", "", "" } end
  local plus1 = since == math.maxinteger and "9223372036854775808" or ("%d"):format(since + 1)
  return { "since", ("%d"):format(since), plus1, w.last_id or "" }
end

-- Reads from Redis what the waiters of group (same categories, same cursor)
-- missed. Each keeps waiting meanwhile; events arriving meanwhile are kept
-- beside it (pending) until the answer tells which of them are new to it.
function Engine:_fetch(group)
  local w1 = group[1]
  local keys, seen = { self.clock_key }, {}
  for _, c in ipairs(w1.categories) do
    if not seen[c] then
      seen[c] = true
      keys[#keys + 1] = self:_stream_key(c)
      keys[#keys + 1] = self:_dropped_key(c)
    end
  end
  local args = cursor_args(w1)
  args[5] = ("%d"):format(self.ttl_ms)
  args[6] = random_hex(16)
  for _, w in ipairs(group) do
    w.fetching, w.needs_fetch = true, false
    w.pending = w.pending or {}
  end
  self.fetches = self.fetches + 1
  local ok = self:_script("fetch", keys, args, function(reply, err)
    self.fetches = self.fetches - 1
    local hooks = self.hooks
    if hooks.fetch_reply_delay_ms then -- tests: a read whose answer travels slowly
      hooks.delayed_replies = (hooks.delayed_replies or 0) + 1
      local t = uv.new_timer()
      t:start(hooks.fetch_reply_delay_ms, 0, function()
        t:close()
        hooks.delayed_replies = hooks.delayed_replies - 1
        self:_fetched(group, reply, err)
      end)
    else
      self:_fetched(group, reply, err)
    end
  end)
  if not ok then
    self.fetches = self.fetches - 1
    for _, w in ipairs(group) do w.fetching, w.needs_fetch = false, true end
  end
end

function Engine:_fetched(group, reply, err)
  local epoch, last, seq, missed
  if not err then
    epoch, last, seq = reply[1], tointeger(tonumber(reply[2])), tointeger(tonumber(reply[3]))
    missed = reply[4] == 1
    self:_observe(epoch, last, seq)
  else
    self:_log("warn", "read from Redis failed", { error = err })
  end
  for _, w in ipairs(group) do
    if not w.done then
      w.fetching = false
      local pending = w.pending
      w.pending = nil
      if err then
        w.needs_fetch = true
        if w.expired and not w.mark_inflight then self:_answer_timeout_now(w, self:_offline_time(w)) end
      elseif w.follow then
        self:_followed(w, reply, pending)
      elseif #reply > 4 then
        local events = {}
        for i = 5, #reply do events[#events + 1] = { json = reply[i] } end
        self:_deliver(w, events, missed)
      else
        w.cursor = { epoch = epoch, ts = last, seq = seq }
        local new = {}
        for _, ev in ipairs(pending or {}) do
          if deliverable(w.cursor, ev) then new[#new + 1] = ev end
        end
        if w.needs_fetch then
          -- a gap or a lost pub/sub connection while this read was in flight: events may be
          -- missing before the pending ones, so read again (they stay pending meanwhile)
          w.pending = new
          if self.online then
            self:_fetch({ w })
          elseif w.expired and not w.mark_inflight then
            self:_answer_timeout_now(w, self:_offline_time(w))
          end
        elseif #new > 0 then
          self:_deliver(w, new)
        elseif w.expired and w.mark_T then
          self:_answer_timeout_now(w, w.mark_T)
        elseif w.expired and not w.mark_inflight then
          self:_answer_timeout(w) -- its cursor is current now: ask Redis for the time
        end
      end
    end
  end
end

-- A follower's read: its events, then those pub/sub brought meanwhile after the position Redis
-- was at (the read holds everything up to there). The follower stays in the store throughout.
function Engine:_followed(w, reply, pending)
  local cursor = { epoch = reply[1], ts = tointeger(tonumber(reply[2])), seq = tointeger(tonumber(reply[3])) }
  w.cursor = cursor
  local events = {}
  for i = 5, #reply do events[#events + 1] = { json = reply[i] } end
  -- after a gap or a lost pub/sub connection while the read was in flight, events may be
  -- missing before the pending ones: the next read, from the new cursor, returns them all
  if not w.needs_fetch then
    for _, ev in ipairs(pending or {}) do
      if deliverable(cursor, ev) then events[#events + 1] = ev end
    end
  end
  if #events > 0 then self:_deliver(w, events, reply[4] == 1) end
  if not w.done and w.needs_fetch and not w.fetching and self.online then self:_fetch({ w }) end
end

-- Reads again for every waiter that needs it, one read per (categories,
-- cursor) group.
function Engine:_fetch_owed()
  local groups, order = {}, {}
  for _, w in pairs(self.by_handle) do
    if w.needs_fetch and not w.fetching and not w.done then
      local args = cursor_args(w)
      local key = concat(w.categories, "\0") .. "\1" .. concat(args, "\0")
      local g = groups[key]
      if not g then
        g = {}
        groups[key] = g
        order[#order + 1] = g
      end
      g[#g + 1] = w
    end
  end
  for _, g in ipairs(order) do self:_fetch(g) end
end

-- Every waiter may have missed events: read again for all.
function Engine:_all_owe_a_read()
  for _, w in pairs(self.by_handle) do w.needs_fetch = true end
end

---------------------------------------------------------------------------------------------
-- Timeout answers: a timestamp from Redis, answered once the marker proves
-- that every event published before it reached this node.

function Engine:_answer_timeout(w)
  if w.done then return end
  w.expired = true
  if w.fetching then return end -- the read's answer settles it
  if self.online and not self.closing_now then
    w.mark_inflight = true
    local batch = self.mark_batch
    batch[#batch + 1] = w
    if #batch == 1 then self.flush_timer:start(0, 0, function() self:_send_mark() end) end
  else
    self:_answer_timeout_now(w, self:_offline_time(w))
  end
end

function Engine:_mark_failed(batch)
  for _, w in ipairs(batch.waiters) do
    w.mark_inflight = false
    if not w.done and not w.fetching then self:_answer_timeout_now(w, self:_offline_time(w)) end
  end
end

function Engine:_send_mark()
  local waiters = self.mark_batch
  if #waiters == 0 then return end
  self.mark_batch = {}
  self.mark_seq = self.mark_seq + 1
  local token = ("%d"):format(self.mark_seq)
  local batch = { waiters = waiters, token = token }
  self.marks[token] = batch
  local ok = self:_script("mark", { self.clock_key },
    { ("%d"):format(self.floor), self.node_channel, token, random_hex(16) }, function(_, err)
      if self.marks[token] ~= batch then return end -- settled already
      if err then
        self.marks[token] = nil
        self:_log("warn", "timeout mark failed", { error = err })
        return self:_mark_failed(batch)
      end
      -- the marker should follow at once on the pub/sub connection; if it
      -- does not, that connection is broken even if it looks open
      batch.timer = uv.new_timer()
      batch.timer:start(MARKER_WAIT_MS, 0, function()
        batch.timer:close()
        batch.timer = nil
        if self.marks[token] ~= batch then return end
        self.marks[token] = nil
        self:_log("warn", "pub/sub marker overdue: reconnecting pub/sub", { token = token })
        self:_mark_failed(batch)
        if self.sub then self.sub:_fail("marker overdue") end
      end)
    end)
  if not ok then
    self.marks[token] = nil
    self:_mark_failed(batch)
  end
end

function Engine:_on_marker(token, epoch, seq, last, T)
  self:_observe(epoch, last, seq)
  if T + 1 > self.floor then self.floor = T + 1 end
  local batch = self.marks[token]
  if not batch then return end
  self.marks[token] = nil
  if batch.timer then close_handle(batch.timer) end
  for _, w in ipairs(batch.waiters) do
    w.mark_inflight = false
    if not w.done then
      if w.fetching then
        w.mark_T = T -- answered when its read is
      elseif w.needs_fetch then
        self:_answer_timeout_now(w, self:_offline_time(w))
      else
        self:_answer_timeout_now(w, T)
      end
    end
  end
end

-- Settles every mark in flight (the pub/sub connection was lost).
function Engine:_fail_marks()
  local marks = self.marks
  self.marks = {}
  for _, batch in pairs(marks) do
    if batch.timer then close_handle(batch.timer) end
    self:_mark_failed(batch)
  end
end

---------------------------------------------------------------------------------------------
-- Pub/sub

function Engine:_on_event(ev)
  -- a gap in the one sequence: this node missed messages, so every waiter reads
  if self.msg_epoch == ev.epoch and self.msg_seq and ev.seq > self.msg_seq + 1 then
    self:_log("warn", "pub/sub gap: reading missed events from Redis",
      { expected = self.msg_seq + 1, got = ev.seq })
    self.gaps = self.gaps + 1
    self:_all_owe_a_read()
    self:_fetch_owed()
  end
  if self.msg_epoch ~= ev.epoch or not self.msg_seq or ev.seq > self.msg_seq then
    self.msg_epoch, self.msg_seq = ev.epoch, ev.seq
  end
  self:_observe(ev.epoch, ev.ts, ev.seq)
  local handles = self.manager.store:take_waiters(ev.category)
  if handles then
    for _, handle in ipairs(handles) do
      local w = self.by_handle[handle]
      self.by_handle[handle] = nil
      if w and not w.done then
        w.handle = nil
        if w.fetching or w.needs_fetch or not w.cursor then
          if w.fetching then w.pending[#w.pending + 1] = ev end
          self:_rewait(w)
          -- a read owed while online (an earlier one failed): do it now
          if not w.done and not w.fetching and self.online then self:_fetch({ w }) end
        elseif deliverable(w.cursor, ev) then
          self:_deliver(w, { ev })
        else
          self:_rewait(w) -- published before this waiter started
        end
      end
    end
  end
  if self.has_on_publish then
    local event = self:_event_object(ev)
    if event then self.manager:_call_add_ons("on_publish", event) end
  end
end

function Engine:_on_message(payload)
  local kind = payload:sub(1, 2)
  if kind == "E " then
    local epoch, seq, ts, clen, at = payload:match("^E (%S+) (%d+) (%d+) (%d+)\n()")
    if not epoch then return self:_log("error", "bad event message from Redis", {}) end
    clen = tointeger(tonumber(clen))
    return self:_on_event({
      epoch = epoch, seq = tointeger(tonumber(seq)), ts = tointeger(tonumber(ts)),
      category = payload:sub(at, at + clen - 1), json = payload:sub(at + clen),
    })
  elseif kind == "M " then
    local token, epoch, seq, last, T = payload:match("^M (%S+) (%S+) (%d+) (%d+) (%d+)$")
    if token then
      return self:_on_marker(token, epoch, tointeger(tonumber(seq)), tointeger(tonumber(last)),
        tointeger(tonumber(T)))
    end
  end
end

function Engine:_on_push(reply)
  if type(reply) ~= "table" then return end
  local kind = reply[1]
  if kind == "message" then
    if self.hooks.hold_messages then
      local held = self.hooks.held
      held[#held + 1] = reply[3]
      return
    end
    return self:_on_message(reply[3])
  elseif kind == "subscribe" then
    self.sub_confirmed = self.sub_confirmed + 1
    if self.sub_confirmed == 2 then
      self.sub_ready = true
      self:_log("info", "Redis pub/sub subscribed", {})
      self:_maybe_sync()
    end
  end
end

---------------------------------------------------------------------------------------------
-- Connections, reconnection with backoff, and the sync that brings a node
-- back: a mark (its timestamps never go below what the node handed out) and
-- a read for every waiter that may have missed events.

function Engine:_backoff(kind)
  local n = self.attempts[kind]
  self.attempts[kind] = n + 1
  local base = math.min(self.cfg.reconnect_max_ms, self.cfg.reconnect_min_ms * 2 ^ math.min(n, 20))
  return math.floor(base * (0.5 + math.random() * 0.5))
end

function Engine:_set_offline(reason)
  if self.online then
    self.online = false
    self:_log("warn", "Redis unavailable", { error = reason })
  end
end

function Engine:_connect_cmd()
  if self.stopped then return end
  local handshake = {}
  for i, name in ipairs(scripts.NAMES) do handshake[i] = { "SCRIPT", "LOAD", scripts[name] } end
  local conn
  conn = Connection.new(self.cfg, nil, function(err)
    if self.cmd ~= conn then return end
    self.cmd, self.cmd_ready = nil, false
    self:_set_offline(err)
    self:_log("warn", "Redis command connection lost", { error = err })
    self.reconnect_timers.cmd:start(self:_backoff("cmd"), 0, function() self:_connect_cmd() end)
  end)
  self.cmd = conn
  conn:connect(handshake, function(shas)
    for i, name in ipairs(scripts.NAMES) do self.shas[name] = shas[i] end
    self.cmd_ready = true
    self.attempts.cmd = 0
    self:_maybe_sync()
  end)
end

function Engine:_connect_sub()
  if self.stopped then return end
  local conn
  conn = Connection.new(self.cfg, function(reply) self:_on_push(reply) end, function(err)
    if self.sub ~= conn then return end
    self.sub, self.sub_ready = nil, false
    self.msg_seq = nil
    self:_set_offline(err)
    self:_log("warn", "Redis pub/sub connection lost", { error = err })
    self:_all_owe_a_read()
    self:_fail_marks()
    self.reconnect_timers.sub:start(self:_backoff("sub"), 0, function() self:_connect_sub() end)
  end)
  self.sub = conn
  self.sub_confirmed = 0
  conn:connect(nil, function()
    self.attempts.sub = 0
    conn:send({ "SUBSCRIBE", self.channel, self.node_channel })
  end)
end

function Engine:_maybe_sync()
  if not (self.cmd_ready and self.sub_ready) or self.online or self.syncing then return end
  self.syncing = true
  local ok = self:_script("mark", { self.clock_key }, { ("%d"):format(self.floor), "", "", random_hex(16) },
    function(reply, err)
      self.syncing = false
      if err then return end -- the lost connection retries
      self:_observe(reply[1], tointeger(tonumber(reply[2])), tointeger(tonumber(reply[3])))
      local T = tointeger(tonumber(reply[4]))
      if T + 1 > self.floor then self.floor = T + 1 end
      if not (self.cmd_ready and self.sub_ready) then return end
      self.online = true
      self.syncs = self.syncs + 1
      self:_log("info", "Redis available", { epoch = self.epoch, seq = self.pos_seq })
      self:_fetch_owed()
    end)
  if not ok then self.syncing = false end
end

---------------------------------------------------------------------------------------------
-- The manager's entry points in Redis mode

-- manager:_publish_json(category, data_json, data, callback) -> true | nil, message
function Engine:publish(category, data_json, data, callback)
  local m = self.manager
  if m.closed then return nil, "manager is shut down", "ECLOSED" end
  if not self.cmd_ready then return nil, "Redis is unavailable", "EUNAVAILABLE" end
  local catjson = core.json_string(category)
  if not catjson then return nil, "category is not valid UTF-8", "EINVAL" end
  local id = core.uuid()
  local args = { category, catjson, data_json, id, self.max_event_buffer_size, self.ttl_ms, self.channel,
    random_hex(16), ("%d"):format(self.floor) }
  local ok, err = self:_script("publish",
    { self.clock_key, self:_stream_key(category), self:_dropped_key(category) }, args, function(reply, perr)
      if perr then
        self:_log("warn", "publish failed", { category = category, error = perr })
        if callback then callback(nil, "publish failed: " .. perr) end
        return
      end
      local ts = tointeger(tonumber(reply[2]))
      self:_observe(reply[1], ts, tointeger(tonumber(reply[3])))
      local json = '{"timestamp":' .. reply[2] .. ',"category":' .. catjson .. ',"data":' .. data_json ..
        ',"id":"' .. id .. '"}'
      if m.logger then
        self:_log("debug", "published", { category = category, id = id, seq = reply[3], data = data_json })
      end
      if callback then callback(self.new_event(category, data, data_json, json, id, ts)) end
    end)
  if not ok then return nil, err, "EUNAVAILABLE" end
  return true
end

function Engine:subscribe(req, res)
  local m = self.manager
  if m.closed then return self.send_json(res, 503, self.error_body("manager is shut down")) end
  local sub, err = m:_parse_subscription(req)
  if not sub then
    m:_log("warn", "bad subscription request", { error = err })
    return self.send_json(res, m.options.subscribe_error_status, self.error_body(err))
  end
  local last_id = sub.last_id and sub.last_id:lower()
  local w, werr = self:_new_waiter({ res = res, since = sub.since, last_id = last_id }, sub.categories)
  if not w then
    m:_log("warn", "subscriber refused", { error = werr })
    return self.send_json(res, 503, self.error_body(werr))
  end
  m.waiting[w] = res
  m.timeouts:add(w, sub.timeout * 1000)
  res:on_close(function()
    if not w.done then self:_finish(w) end
  end)
end

-- Gives a new waiter of watch / watch_after / follow its id (or passes its error on).
function Engine:_register_watch(w, err)
  if not w then return nil, err end
  self.watch_seq = self.watch_seq + 1
  w.watch_id = self.watch_seq
  self.watches[w.watch_id] = w
  return w.watch_id
end

function Engine:watch(categories, on_event)
  if self.manager.closed then return nil, "manager is shut down" end
  return self:_register_watch(self:_new_waiter({ watcher = on_event }, categories))
end

-- engine:watch_after(categories, since_time, last_id, on_events) -> id | nil, message
-- A cursor read that waits: on_events(jsons, missed) is called once, with the JSON texts of the
-- events after the cursor (the wire contract's (since_time, last_id), read from Redis), or, when
-- there are none yet, with the next ones published. Registered before its read, so nothing
-- published meanwhile is lost. For streaming handlers (SSE); ended early by unwatch(id).
function Engine:watch_after(categories, since_time, last_id, on_events)
  if self.manager.closed then return nil, "manager is shut down" end
  if math.type(since_time) ~= "integer" then return nil, "since_time must be an integer" end
  if last_id ~= nil and not core.is_uuid(last_id) then return nil, "last_id must be a UUID" end
  local w, err = self:_new_waiter({ on_events = on_events, since = since_time, last_id = last_id and last_id:lower() },
    categories)
  return self:_register_watch(w, err)
end

-- engine:follow(categories, since_time, last_id, on_events) -> id | nil, message
-- Like watch_after, but it stays until unwatch(id): on_events(jsons, missed) gets every batch
-- of events after the cursor, oldest first, each event once. The cursor is (since_time,
-- last_id) until the first read resolves it (since_time nil: the node's position, no read),
-- then the position of what was handed out, so live events cost no read; the engine reads
-- again from it after a gap or a lost pub/sub connection. When the engine must end it (it
-- cannot wait again, shutdown), on_events(nil, message) is called once. For SSE.
function Engine:follow(categories, since_time, last_id, on_events)
  if self.manager.closed then return nil, "manager is shut down" end
  if since_time ~= nil and math.type(since_time) ~= "integer" then return nil, "since_time must be an integer" end
  if last_id ~= nil and (since_time == nil or not core.is_uuid(last_id)) then return nil, "last_id must be a UUID" end
  local w, err = self:_new_waiter({ on_events = on_events, follow = true, since = since_time,
    last_id = last_id and last_id:lower() }, categories)
  return self:_register_watch(w, err)
end

-- engine:mark_time(callback) -> true | nil, message
-- callback(T) with a timestamp from Redis that no event published later reaches (those
-- published before it have T or less), or callback(nil, message): an exact "from now on".
function Engine:mark_time(callback)
  return self:_script("mark", { self.clock_key }, { ("%d"):format(self.floor), "", "", random_hex(16) },
    function(reply, err)
      if err then return callback(nil, err) end
      self:_observe(reply[1], tointeger(tonumber(reply[2])), tointeger(tonumber(reply[3])))
      local T = tointeger(tonumber(reply[4]))
      if T + 1 > self.floor then self.floor = T + 1 end
      callback(T)
    end)
end

function Engine:unwatch(id)
  local w = self.watches[id]
  if not w or w.done then return false end
  self:_finish(w)
  return true
end

-- Figures for tests and operators.
function Engine:stats()
  return {
    online = self.online, epoch = self.epoch, seq = self.pos_seq, last_timestamp = self.pos_ts,
    waiters = self.nwaiters, fetches_in_flight = self.fetches, syncs = self.syncs, gaps = self.gaps,
    command_connected = self.cmd_ready, pubsub_connected = self.sub_ready,
  }
end

-- Stops the engine: waits (briefly) for reads and marks in flight, answers
-- whoever still waits, closes connections and timers, then done().
function Engine:shutdown(done)
  if self.stopped then return done and done() end
  if #self.mark_batch > 0 then self:_send_mark() end
  local waited = 0
  local timer = uv.new_timer()
  local function finish()
    close_handle(timer)
    self.stopped, self.closing_now = true, true
    self:_fail_marks()
    for _, w in pairs(self.by_handle) do
      if w.res then self:_answer_timeout_now(w, self:_offline_time(w)) end
    end
    for _, w in pairs(self.watches) do
      if w.follow then self:_end_follow(w, "manager is shut down") elseif not w.done then self:_finish(w) end
    end
    if self.cmd then self.cmd:close() end
    if self.sub then self.sub:close() end
    self.cmd, self.sub, self.cmd_ready, self.sub_ready, self.online = nil, nil, false, false, false
    close_handle(self.flush_timer)
    close_handle(self.reconnect_timers.cmd)
    close_handle(self.reconnect_timers.sub)
    if done then done() end
  end
  timer:start(0, 10, function()
    waited = waited + 10
    if (next(self.marks) == nil and self.fetches == 0) or waited >= SHUTDOWN_WAIT_MS or not self.online then
      finish()
    end
  end)
end

---------------------------------------------------------------------------------------------
-- Start-up

-- One blocking round trip before serving: is Redis there, recent enough,
-- and where is its sequence. Returns the mark reply or nil, message.
local function probe(cfg, clock_key)
  local conn, err = hiredis.connect(cfg.host, cfg.port, cfg.connect_timeout_ms)
  if not conn then return nil, err end
  local function call(argv)
    local reply, cerr = conn:command(argv)
    if not reply then return nil, cerr end
    if type(reply) == "table" and reply.error then return nil, reply.error end
    return reply
  end
  local reply
  if cfg.password then
    reply, err = call(cfg.user and { "AUTH", cfg.user, cfg.password } or { "AUTH", cfg.password })
    if not reply then conn:close() return nil, "Redis refused AUTH: " .. err end
  end
  if cfg.db ~= 0 then
    reply, err = call({ "SELECT", cfg.db })
    if not reply then conn:close() return nil, "Redis refused SELECT: " .. err end
  end
  reply, err = call({ "INFO", "server" })
  if not reply then conn:close() return nil, "Redis INFO failed: " .. err end
  local major, minor = tostring(reply):match("redis_version:(%d+)%.(%d+)")
  major, minor = tonumber(major), tonumber(minor)
  if not major or major < 6 or (major == 6 and minor < 2) then
    conn:close()
    return nil, ("Redis 6.2 or later is needed (this one says %s.%s)"):format(tostring(major), tostring(minor))
  end
  reply, err = call({ "EVAL", scripts.mark, 1, clock_key, "0", "", "", random_hex(16) })
  conn:close()
  if not reply then return nil, "Redis script failed: " .. err end
  return reply
end

-- Attaches the engine to a manager whose options carry `redis`. Blocks once
-- (up to connect_timeout_ms per step) to check that Redis answers, then
-- connects on the loop. Returns the engine, or nil, message.
function M.attach(manager, helpers)
  local o = manager.options
  for i, a in ipairs(manager.add_ons) do
    if a.on_start then
      return nil, ("add-on %d has on_start: with 'redis', events are kept in Redis, not restored by add-ons"):format(i)
    end
  end
  local cfg = config.resolve(o.redis)
  local prefix = cfg.prefix
  local node_id = random_hex(16)
  local self = setmetatable({
    manager = manager, cfg = cfg, prefix = prefix, node_id = node_id,
    clock_key = prefix .. "clock", channel = prefix .. "events", node_channel = prefix .. "node:" .. node_id,
    max_event_buffer_size = o.max_event_buffer_size, ttl_ms = manager.ttl_ms,
    send_json = helpers.send_json, error_body = helpers.error_body, new_event = helpers.new_event,
    shas = {}, by_handle = {}, watches = {}, watch_seq = 0, nwaiters = 0,
    marks = {}, mark_batch = {}, mark_seq = 0, fetches = 0, syncs = 0, gaps = 0,
    online = false, cmd_ready = false, sub_ready = false, sub_confirmed = 0,
    floor = 0, pos_ts = 0, pos_seq = 0, attempts = { cmd = 0, sub = 0 },
    hooks = { held = {} }, old_epochs = {},
  }, Engine)
  for _, a in ipairs(manager.add_ons) do
    if a.on_publish then self.has_on_publish = true end
  end
  local reply, err = probe(cfg, self.clock_key)
  if not reply then return nil, ("cannot use Redis at %s:%d: %s"):format(cfg.host, cfg.port, err) end
  self:_observe(reply[1], tointeger(tonumber(reply[2])), tointeger(tonumber(reply[3])))
  self.floor = math.max(self.floor, tointeger(tonumber(reply[4])) + 1)
  self.flush_timer = uv.new_timer()
  self.flush_timer:unref()
  self.reconnect_timers = { cmd = uv.new_timer(), sub = uv.new_timer() }
  self.reconnect_timers.cmd:unref()
  self.reconnect_timers.sub:unref()
  self:_connect_cmd()
  self:_connect_sub()
  -- the manager's internals this engine replaces, for this instance only
  manager.engine = self
  manager._publish_json = function(_, category, data_json, data, callback)
    return self:publish(category, data_json, data, callback)
  end
  manager._subscribe = function(_, req, res) return self:subscribe(req, res) end
  manager._answer_timeout = function(_, w) return self:_answer_timeout(w) end
  manager.watch = function(_, categories, on_event) return self:watch(categories, on_event) end
  manager.unwatch = function(_, id) return self:unwatch(id) end
  -- an asynchronous add-on that only shuts the engine down
  manager.add_ons[#manager.add_ons + 1] = { on_shutdown = function(done) self:shutdown(done) end }
  return self
end

-- Test-only: hold pub/sub messages (as a slow network would) until release.
function Engine:hold_messages() self.hooks.hold_messages = true end
function Engine:release_messages()
  self.hooks.hold_messages = false
  local held = self.hooks.held
  self.hooks.held = {}
  for _, payload in ipairs(held) do self:_on_message(payload) end
end

return M
