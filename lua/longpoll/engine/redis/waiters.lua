-- The waiters of one Redis: long polls (subscribe) and streams (follow), their cursors, the
-- reads that catch them up from Redis, and how an event from pub/sub reaches them.
--
-- A waiter always has a cursor: the client's (since_time, last_id) until a read from Redis
-- resolves it, then a position in Redis's one sequence of events (epoch, timestamp, seq). An
-- event reaches a waiter only when it comes after that position, so a late pub/sub message is
-- never a duplicate; a waiter registers (in the local C store, which indexes who waits on what)
-- before its read, and events arriving during the read wait beside it, so none is lost.
local core = require "longpoll.core"
local Position = require "longpoll.engine.redis.position"

local concat, tointeger = table.concat, math.tointeger
local event_json, events_answer = core.event_json, core.events_answer
local after = Position.after

local Waiters = {}
Waiters.__index = Waiters

local M = {}

-- parts = {
--   store = a core store, the index of who waits on which category,
--   link = the Redis link, position = its Position, marks = its Marks, cache = its Cache or nil,
--   keys = { clock = "...", stream = f(category), dropped = f(category) },
--   ttl_ms = event TTL (0: forever), log = function(level, message, fields),
--   limits_of = nil or function(category) -> { event_ttl_ms =, ... } (per-category rules),
--   max_waiting_per_category = the cap on the waiters of one category (0: none), counting
--     these waiters and the polls parked in C on the cache together,
-- }
function M.new(parts)
  return setmetatable({
    store = parts.store, link = parts.link, position = parts.position, marks = parts.marks, cache = parts.cache,
    keys = parts.keys, ttl_ms = parts.ttl_ms, limits_of = parts.limits_of, log = parts.log,
    max_waiting = parts.max_waiting_per_category or 0,
    by_handle = {}, by_id = {}, next_id = 0, count = 0, fetches = 0,
    delivered = 0, -- events handed out, once per subscriber (stats, the dashboard)
  }, Waiters)
end

local function call(log, f, ...)
  local ok, err = pcall(f, ...)
  if not ok then log("error", "engine callback failed", { error = tostring(err) }) end
end

---------------------------------------------------------------------------------------------
-- Registration

local WAITERS_FULL = "too many waiting subscribers in this category (max_waiting_per_category)"

-- Registers w in the local store under a fresh store handle.
function Waiters:_wait(w)
  local cache, max = self.cache, self.max_waiting
  if cache and max > 0 then
    -- the store counts these waiters; the polls parked in C on the cache count too
    for _, category in ipairs(w.categories) do
      if self.store:waiting_in(category) + cache:parked_in(category) >= max then
        return nil, WAITERS_FULL, "EWAITERS"
      end
    end
  end
  local handle, err, code = self.store:wait(w.categories)
  if not handle then return nil, err, code end
  w.handle = handle
  self.by_handle[handle] = w
  return true
end

-- Forgets w everywhere; it is answered or gone.
function Waiters:finish(w)
  if w.done then return end
  w.done = true
  if w.handle then
    self.by_handle[w.handle] = nil
    self.store:cancel(w.handle)
    w.handle = nil
  end
  self.by_id[w.id] = nil
  self.count = self.count - 1
end

-- A timestamp for w's timeout answer when Redis cannot be asked. A waiter whose cursor is
-- current gets the newest time this node knows was issued; one whose read is still owed gets
-- its own cursor back, so continuing from it skips nothing.
function Waiters:offline_time(w)
  if w.cursor and not w.fetching and not w.needs_fetch then
    local T = self.position:known_time()
    if w.since and w.since > T then T = w.since end
    return T
  end
  if w.since then return w.since end
  if w.cursor then return w.cursor.ts end
  return self.position:known_time()
end

-- Calls w's pending timeout callback (at most once).
function Waiters:_settle_timeout(w, T)
  local cb = w.timeout_cb
  if not cb then return end
  w.timeout_cb, w.expired, w.mark_T = nil, nil, nil
  call(self.log, cb, T)
end

-- Ends a follower the engine cannot keep; its owner learns it once.
function Waiters:end_follow(w, message)
  if w.done then return end
  self:finish(w)
  call(self.log, w.on_events, nil, message)
end

-- Puts w back in the store after an event it must not get woke it.
function Waiters:_rewait(w)
  local ok, err = self:_wait(w)
  if ok then return end
  if w.follow then return self:end_follow(w, "cannot wait: " .. tostring(err)) end
  -- a long poll that cannot wait again gets no more events: its timeout answers it
  self.log("warn", "subscriber cannot wait again", { error = tostring(err) })
end

-- A new waiter. fields: categories (a list), since, last_id (lower case), and on_answer (a long
-- poll) or on_events + follow = true (a stream). Without since it starts at the node's
-- position; with it, the local cache or a read resolves it. Returns its id (0: answered
-- already, from the cache) or nil, message, code.
function Waiters:add(w)
  local cached, x
  if self.cache and w.since ~= nil and not w.follow then
    cached, x = self.cache:answer(w.categories, w.since, w.last_id)
    if cached == "events" then
      call(self.log, w.on_answer, x)
      return 0
    end
  end
  local ok, err, code = self:_wait(w)
  if not ok then return nil, err, code end
  self.next_id = self.next_id + 1
  w.id = self.next_id
  self.by_id[w.id] = w
  self.count = self.count + 1
  if cached == "wait" then
    w.cursor = x -- the cache holds everything up to there: nothing after the client's cursor yet
  elseif w.since == nil then
    w.cursor = self.position:cursor()
    -- pub/sub may have missed events, which only a read can tell
    if not self.link:is_online() then w.needs_fetch = true end
  elseif self.link:is_online() then
    self:_fetch({ w })
  else
    w.needs_fetch = true
  end
  return w.id
end

-- Forgets waiter id; true if it was still waiting.
function Waiters:cancel(id)
  local w = self.by_id[id]
  if not w or w.done then return false end
  self:finish(w)
  return true
end

---------------------------------------------------------------------------------------------
-- Delivery

-- An event as a stream gets it: { json =, timestamp =, id =, category =, data_json = }, made
-- once per event.
local function stream_item(ev)
  local item = ev.item
  if not item then
    item = { json = ev.json, timestamp = ev.ts, id = ev.id, category = ev.category, data_json = ev.data_json }
    ev.item = item
  end
  return item
end

-- A follower stays: its cursor moves to the last event it got when that came by pub/sub (a
-- read's events leave it at the read's position), and it waits again if the event took it out
-- of the store.
function Waiters:_deliver_follow(w, events, missed)
  local last = events[#events]
  if last.seq then w.cursor = { epoch = last.epoch, ts = last.ts, seq = last.seq } end
  local list = {}
  for i = 1, #events do list[i] = stream_item(events[i]) end
  self.delivered = self.delivered + #events
  call(self.log, w.on_events, list, missed == true)
  if not w.done and not w.handle then self:_rewait(w) end
end

-- Answers w with events (a list of event records, oldest first).
function Waiters:_deliver(w, events, missed)
  if w.follow then return self:_deliver_follow(w, events, missed) end
  self:finish(w)
  local body
  if #events == 1 and not missed then
    -- one event waking many subscribers: its answer is built once
    local ev = events[1]
    body = ev.body or events_answer({ ev.json }, false)
    ev.body = body
  else
    local parts = {}
    for i = 1, #events do parts[i] = events[i].json end
    body = events_answer(parts, missed == true)
  end
  self.delivered = self.delivered + #events
  -- a timeout asked for meanwhile is settled by this answer
  w.timeout_cb, w.expired, w.mark_T = nil, nil, nil
  call(self.log, w.on_answer, body)
end

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

-- The events of a read's reply (after its 4 header values): ts, category index, id, data.
local function read_events(reply, cats)
  local events = {}
  for i = 5, #reply - 3, 4 do
    local ts, category, id, data_json = tointeger(tonumber(reply[i])), cats[tointeger(reply[i + 1])], reply[i + 2], reply[i + 3]
    events[#events + 1] = { ts = ts, id = id, category = category, data_json = data_json,
      json = event_json(ts, category, data_json, id) }
  end
  return events
end

-- Reads from Redis what the waiters of group (same categories, same cursor) missed. Each keeps
-- waiting meanwhile; events arriving meanwhile are kept beside it (pending) until the answer
-- tells which of them are new to it.
function Waiters:_fetch(group)
  local w1 = group[1]
  local keys, seen, cats = { self.keys.clock }, {}, {}
  for _, c in ipairs(w1.categories) do
    if not seen[c] then
      seen[c] = true
      cats[#cats + 1] = c
      keys[#keys + 1] = self.keys.stream(c)
      keys[#keys + 1] = self.keys.dropped(c)
    end
  end
  local args = cursor_args(w1)
  args[5] = ("%d"):format(self.ttl_ms)
  args[6] = Position.epoch_candidate()
  if self.limits_of then -- per-category rules: each category's TTL (ARGV[7..]), in the keys' order
    for _, c in ipairs(w1.categories) do
      if seen[c] == true then
        seen[c] = "ttl given"
        args[#args + 1] = ("%d"):format(self.limits_of(c).event_ttl_ms)
      end
    end
  end
  for _, w in ipairs(group) do
    w.fetching, w.needs_fetch = true, false
    w.pending = w.pending or {}
  end
  -- a first read of one category may fill the local cache with what Redis holds
  local warm = self.cache and #cats == 1 and w1.cursor == nil and not w1.follow and w1.since
  self.fetches = self.fetches + 1
  local ok = self.link:script("fetch", keys, args, function(reply, err)
    self.fetches = self.fetches - 1
    if warm and not err then
      self.cache:warm(cats[1], warm, read_events(reply, cats), reply[4] == 1,
        { epoch = reply[1], ts = tointeger(tonumber(reply[2])), seq = tointeger(tonumber(reply[3])) })
    end
    self:_fetched(group, cats, reply, err)
  end)
  if not ok then
    self.fetches = self.fetches - 1
    for _, w in ipairs(group) do w.fetching, w.needs_fetch = false, true end
  end
end

function Waiters:_fetched(group, cats, reply, err)
  local epoch, last, seq, missed, events
  if not err then
    epoch, last, seq = reply[1], tointeger(tonumber(reply[2])), tointeger(tonumber(reply[3]))
    missed = reply[4] == 1
    self.position:observe(epoch, last, seq)
    events = read_events(reply, cats)
  else
    self.log("warn", "read from Redis failed", { error = err })
  end
  for _, w in ipairs(group) do
    if not w.done then
      w.fetching = false
      local pending = w.pending
      w.pending = nil
      if err then
        w.needs_fetch = true
        if w.expired then self:_settle_timeout(w, self:offline_time(w)) end
      elseif w.follow then
        self:_followed(w, reply, events, pending)
      elseif #events > 0 then
        self:_deliver(w, events, missed)
      else
        w.cursor = { epoch = epoch, ts = last, seq = seq }
        local new = {}
        for _, ev in ipairs(pending or {}) do
          if after(w.cursor, ev) then new[#new + 1] = ev end
        end
        if w.needs_fetch then
          -- a gap or a lost pub/sub connection while this read was in flight: events may be
          -- missing before the pending ones, so read again (they stay pending meanwhile)
          w.pending = new
          if self.link:is_online() then
            self:_fetch({ w })
          elseif w.expired then
            self:_settle_timeout(w, self:offline_time(w))
          end
        elseif #new > 0 then
          self:_deliver(w, new)
        elseif w.mark_T then
          self:_settle_timeout(w, w.mark_T)
        elseif w.expired then
          self:timeout(w) -- its cursor is current now: ask Redis for the time
        end
      end
    end
  end
end

-- A follower's read: its events, then those pub/sub brought meanwhile after the position Redis
-- was at (the read holds everything up to there). The follower stays in the store throughout.
function Waiters:_followed(w, reply, read, pending)
  local cursor = { epoch = reply[1], ts = tointeger(tonumber(reply[2])), seq = tointeger(tonumber(reply[3])) }
  w.cursor = cursor
  local events = {}
  for i = 1, #read do events[i] = read[i] end
  -- after a gap or a lost pub/sub connection while the read was in flight, events may be
  -- missing before the pending ones: the next read, from the new cursor, returns them all
  if not w.needs_fetch then
    for _, ev in ipairs(pending or {}) do
      if after(cursor, ev) then events[#events + 1] = ev end
    end
  end
  if #events > 0 then self:_deliver(w, events, reply[4] == 1) end
  if not w.done and w.needs_fetch and not w.fetching and self.link:is_online() then self:_fetch({ w }) end
end

-- Reads again for every waiter that needs it, one read per (categories, cursor) group.
function Waiters:fetch_owed()
  local groups, order = {}, {}
  for _, w in pairs(self.by_id) do
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

-- Every waiter may have missed events: each reads again.
function Waiters:all_owe_a_read()
  for _, w in pairs(self.by_id) do w.needs_fetch = true end
end

---------------------------------------------------------------------------------------------
-- Events from pub/sub

-- ev = { epoch, seq, ts, category, json }: wakes the waiters of its category that have not
-- seen it.
function Waiters:on_event(ev)
  local handles = self.store:take_waiters(ev.category)
  if not handles then return end
  for _, handle in ipairs(handles) do
    local w = self.by_handle[handle]
    self.by_handle[handle] = nil
    if w and not w.done then
      w.handle = nil
      if w.fetching or w.needs_fetch or not w.cursor then
        if w.fetching then w.pending[#w.pending + 1] = ev end
        self:_rewait(w)
        -- a read owed while online (an earlier one failed): do it now
        if not w.done and not w.fetching and self.link:is_online() then self:_fetch({ w }) end
      elseif after(w.cursor, ev) then
        self:_deliver(w, { ev })
      else
        self:_rewait(w) -- published before this waiter started
      end
    end
  end
end

---------------------------------------------------------------------------------------------
-- Timeouts

-- Long poll id's time is up: it gets on_timeout(T) once Waiters:timeout settles it (and is
-- forgotten then), unless events reach it first (on_answer). False when id is no waiting
-- long poll.
function Waiters:expire(id, on_timeout)
  local w = self.by_id[id]
  if not w or w.done or w.follow then return false end
  w.timeout_cb = function(T)
    self:finish(w)
    on_timeout(T)
  end
  self:timeout(w)
  return true
end

-- Settles w's pending timeout: through a Redis mark when its cursor is current and Redis is
-- there, otherwise from what the node knows. w.timeout_cb is set.
function Waiters:timeout(w)
  if w.done then return self:_settle_timeout(w, self.position:known_time()) end
  w.expired = true
  if w.fetching then return end -- the read's answer settles it
  if w.needs_fetch or not self.link:is_online() then return self:_settle_timeout(w, self:offline_time(w)) end
  self.marks:request(function(T)
    if w.done or not T then return self:_settle_timeout(w, T or self:offline_time(w)) end
    if w.fetching then
      w.mark_T = T -- settled when its read is
    elseif w.needs_fetch then
      self:_settle_timeout(w, self:offline_time(w))
    else
      self:_settle_timeout(w, T)
    end
  end)
end

-- Ends every waiter: streams learn it (on_events(nil, why)), timeouts asked for get
-- (nil, why), long polls are forgotten (the manager answered them).
function Waiters:close(why)
  local all = {}
  for _, w in pairs(self.by_id) do all[#all + 1] = w end
  for _, w in ipairs(all) do
    if w.follow then
      self:end_follow(w, why)
    else
      local cb = w.timeout_cb
      self:finish(w)
      w.timeout_cb = nil
      if cb then call(self.log, cb, nil) end
    end
  end
end

function Waiters:stats()
  return { waiters = self.count, fetches_in_flight = self.fetches, delivered = self.delivered }
end

return M
