-- The in-memory engine: events and waiting subscribers in the C store (longpoll.core), in this
-- process. Implements the engine interface (docs/architecture.md): publish, subscribe / cancel,
-- timeout_mark, follow / unfollow, stats, close; plus restore and the TTL purge timer, which
-- only an in-memory store has.
local uv = require "luv"
local core = require "longpoll.core"
local Timeouts = require "longpoll.timeouts"
local idempotency = require "longpoll.idempotency"
local category_rules = require "longpoll.category_rules"

local pcall, type = pcall, type

local M = {}

local Memory = {}
Memory.__index = Memory

-- The handle of a subscription answered at once from the buffers: nothing to cancel.
local ANSWERED = 0

function M.wall_clock_ms()
  local sec, usec = uv.gettimeofday()
  return sec * 1000 + usec // 1000
end

-- M.new(options, host) -> engine. options: the manager's checked options plus ttl_ms;
-- host.log(level, message, fields), host.on_event(event) (optional).
function M.new(options, host)
  local self = setmetatable({
    host = host,
    now = options.clock or M.wall_clock_ms,
    store = core.new_store {
      max_event_buffer_size = options.max_event_buffer_size,
      event_ttl_ms = options.ttl_ms,
      delete_after_first = options.delete_event_after_first_retrieval,
      max_category_bytes = options.max_category_bytes,
      max_categories = options.max_categories,
      max_waiting_per_category = options.max_waiting_per_category,
      max_buffered_bytes = options.max_buffered_bytes,
      max_answer_bytes = options.max_answer_bytes,
      -- per-category rules: asked by the store once per new category, never per publish
      category_limits = category_rules.resolver(options, host.log),
    },
    waiters = {}, -- store handle -> on_answer (a long poll) or a follow (a table)
    queue = {}, -- events stored but not yet handed to waiters and host, oldest first
    queue_head = 1,
    fanning_out = false,
    closed = false,
    keys = idempotency.new_keys { max_keys = options.idempotency_max_keys, max_bytes = options.idempotency_max_bytes,
      window_ms = options.idempotency_window_ms or idempotency.window_ms(options, options.ttl_ms) },
  }, Memory)
  if options.ttl_ms > 0 then
    -- expiry also happens on every publish and fetch; this timer returns the memory of idle
    -- categories, and never keeps the process alive by itself
    local interval = options.purge_interval_seconds and math.floor(options.purge_interval_seconds * 1000)
      or math.min(60000, math.max(250, options.ttl_ms // 2))
    self.purge_timer = uv.new_timer()
    self.purge_timer:start(interval, interval, function()
      if not self.closed then self.store:expire(self.now()) end
    end)
    self.purge_timer:unref()
  end
  return self
end

local function call(self, what, fn, ...)
  local ok, err = pcall(fn, ...)
  if not ok then self.host.log("error", what .. " failed", { error = tostring(err) }) end
end

local function wait_again(self, follow)
  local handle, err = self.store:wait(follow.categories)
  if not handle then
    follow.handle = nil
    call(self, "follow", follow.on_events, nil, "cannot wait: " .. tostring(err))
    return
  end
  follow.handle = handle
  self.waiters[handle] = follow
end

-- Hands one stored event to the subscribers it woke, then to the host (add-ons).
local function fan_out(self, item)
  local event, woken, answer = item[1], item[2], item[3]
  local waiters = self.waiters
  for i = 1, #woken do
    local handle = woken[i]
    local w = waiters[handle]
    waiters[handle] = nil
    if type(w) == "function" then
      call(self, "answering a subscriber", w, answer)
    elseif w and not w.ended then
      -- a follow is always caught up while it waits: the event that woke it is the next one
      wait_again(self, w)
      call(self, "follow", w.on_events, { event }, false)
    end
  end
  if self.host.on_event then call(self, "on_event", self.host.on_event, event) end
end

-- Events go out strictly in the store's order: a publish made while another one is being
-- handed out (by a watcher, an add-on, a handler) queues behind it.
local function deliver(self, event, woken, answer)
  local queue = self.queue
  queue[#queue + 1] = { event, woken, answer }
  if self.fanning_out then return end
  self.fanning_out = true
  while self.queue_head <= #queue do
    local item = queue[self.queue_head]
    queue[self.queue_head] = nil
    self.queue_head = self.queue_head + 1
    fan_out(self, item)
  end
  self.queue_head, self.fanning_out = 1, false -- every entry was taken out: the queue is empty
end

-- engine:publish(category, data_json, callback[, data[, opts]]) -> true | nil, message, code[, prior]
-- data: the publisher's Lua value, handed to in-process consumers as event.data.
-- opts.idempotency_key (with opts.fingerprint): a key seen before is refused with EREPLAY and
-- prior = { id =, timestamp = } of its event, EKEYMISMATCH or EKEYBUSY (idempotency.lua).
function Memory:publish(category, data_json, callback, data, opts)
  if self.closed then return nil, "manager is shut down", "ECLOSED" end
  local key = opts and opts.idempotency_key
  local ticket
  if key then
    local code, prior
    ticket, code, prior = self.keys:begin(key, opts.fingerprint, self.now())
    if not ticket then return nil, idempotency.message(code), code, prior end
  end
  local json, id, timestamp, woken, _, answer = self.store:publish(category, data_json, self.now())
  if not json then
    if ticket then self.keys:abort(ticket, key) end
    return nil, id, timestamp -- message, code
  end
  local event = { id = id, timestamp = timestamp, category = category, data_json = data_json, json = json,
    data = data }
  deliver(self, event, woken, answer)
  if ticket then self.keys:commit(ticket, key, id, timestamp) end
  if callback then callback(event) end
  return true
end

-- engine:subscribe(sub, on_answer) -> handle | nil, message, code
function Memory:subscribe(sub, on_answer)
  if self.closed then return nil, "manager is shut down", "ECLOSED" end
  local store = self.store
  if sub.since then
    local body, count_or_err = store:fetch(sub.categories, sub.since, sub.last_id, self.now())
    if body then
      on_answer(body)
      return ANSWERED
    end
    if type(count_or_err) == "string" then return nil, count_or_err, "EINVAL" end
  end
  local handle, err, code = store:wait(sub.categories)
  if not handle then return nil, err, code end
  self.waiters[handle] = on_answer
  return handle
end

function Memory:cancel(handle)
  if handle == ANSWERED or not self.waiters[handle] then return false end
  self.waiters[handle] = nil
  return self.store:cancel(handle)
end

-- The long poll's time is up: on_timeout(ts) with the timeout answer's timestamp.
function Memory:expire(handle, on_timeout)
  self:cancel(handle)
  on_timeout(self.store:mark_time(self.now()))
end

function Memory:timeout_mark(callback)
  callback(self.store:mark_time(self.now()))
  return true
end

-- engine:follow(categories, since, last_id, on_events) -> handle | nil, message
function Memory:follow(categories, since, last_id, on_events)
  if self.closed then return nil, "manager is shut down" end
  local follow = { categories = categories, on_events = on_events }
  if since ~= nil then
    local list, count_or_err, missed = self.store:fetch_events(categories, since, last_id, self.now())
    if not list and type(count_or_err) == "string" then return nil, count_or_err end
    if list or missed then call(self, "follow", on_events, list or {}, missed) end
  end
  local handle, err = self.store:wait(categories)
  if not handle then return nil, err end
  follow.handle = handle
  self.waiters[handle] = follow
  return follow
end

function Memory:unfollow(follow)
  if type(follow) ~= "table" or follow.ended then return false end
  follow.ended = true
  local handle = follow.handle
  if handle and self.waiters[handle] == follow then
    self.waiters[handle] = nil
    self.store:cancel(handle)
  end
  return true
end

-- The C store itself (longpoll.core), for the HTTP engine's fast path (core.native_subscription),
-- which reads from it what subscribe would: catch-up answers, nothing else.
function Memory:core_store()
  return self.store
end

-- Its table of Idempotency-Keys (core.new_keys), for the native stats handler's figures.
function Memory:core_keys()
  return self.keys
end

function Memory:stats(with_categories)
  local s = self.store:stats(with_categories)
  for k, v in pairs(self.keys:stats(self.now())) do s[k] = v end
  return s
end

-- Puts back an event kept by an add-on (oldest first, before anyone is served).
function Memory:restore(category, data_json, id, timestamp)
  return self.store:restore(category, data_json, id, timestamp)
end

-- Ends the follows still open (on_events(nil, message)), stops the timer, frees the store.
function Memory:close(done)
  if not self.closed then
    self.closed = true
    local follows = {}
    for _, w in pairs(self.waiters) do
      if type(w) == "table" then follows[#follows + 1] = w end
    end
    self.waiters = {}
    for _, f in ipairs(follows) do
      f.ended = true
      call(self, "follow", f.on_events, nil, "manager is shut down")
    end
    if self.purge_timer then
      Timeouts.close_handle(self.purge_timer)
      self.purge_timer = nil
    end
    self.store:close()
  end
  if done then done() end
end

return M
