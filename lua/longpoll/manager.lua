-- The manager: options, publish, the golongpoll-compatible HTTP handlers,
-- the waiting subscribers' timeouts, add-on hooks and shutdown. Events and
-- subscriptions live in the C store (longpoll.core); this file is the glue
-- between it, the luv loop and the HTTP req/res objects.
local uv = require "luv"
local core = require "longpoll.core"
local options_mod = require "longpoll.options"
local log = require "longpoll.log"
local Timeouts = require "longpoll.timeouts"
local response = require "longpoll.http.response"
local cjson = require "cjson"

local Manager = {}
Manager.__index = Manager

-- The headers of every JSON answer, checked once and written as one block.
local NO_CACHE = response.header_block {
  { "Content-Type", "application/json" },
  { "Cache-Control", "no-cache, no-store, must-revalidate" },
  { "Pragma", "no-cache" },
  { "Expires", "0" },
  { "X-Content-Type-Options", "nosniff" },
}

local function now_ms()
  local sec, usec = uv.gettimeofday()
  return sec * 1000 + usec // 1000
end

local function send_json(res, status, body)
  return res:_send_block(status, NO_CACHE, body)
end

local function error_body(message)
  return '{"error":' .. core.json_string(message) .. "}"
end

-- The HTTP status of a core error code: the one place codes become statuses. Running out
-- of memory or into a cap is the server's state, not the client's fault: 503, retryable.
local CODE_STATUS = { ENOMEM = 503, ECATEGORIES = 503, EWAITERS = 503, ELIMIT = 503, ERANDOM = 503, ETOOBIG = 413 }
local function status_of(code, default)
  return CODE_STATUS[code] or default
end

-- An event as add-ons and Lua callers see it; `data` is decoded on first use
-- when the event came in as JSON text (an HTTP publish).
local Event = {}
Event.__index = function(e, k)
  if k == "data" then
    local ok, v = pcall(cjson.decode, rawget(e, "data_json"))
    if ok then rawset(e, "data", v) return v end
  end
end

local function new_event(category, data, data_json, json, id, timestamp)
  return setmetatable({ id = id, timestamp = timestamp, category = category, data = data,
    data_json = data_json, json = json }, Event)
end

local function add_on_list(a)
  if a == nil then return {} end
  if #a > 0 then return a end
  return { a }
end

function Manager:_log(level, message, fields)
  if self.logger then self.logger(level, message, fields) end
end

-- Calls hook `name` of every add-on; an error inside one is logged and the
-- others still run.
function Manager:_call_add_ons(name, ...)
  for i, a in ipairs(self.add_ons) do
    local hook = a[name]
    if hook then
      local ok, err = pcall(hook, ...)
      if not ok then
        self:_log("error", "add-on hook failed", { add_on = i, hook = name, error = tostring(err) })
      end
    end
  end
end

-- Publishes already-validated JSON text. Returns the event or nil, message.
function Manager:_publish_json(category, data_json, data)
  if self.closed then return nil, "manager is shut down" end
  local json, id, timestamp, woken = self.store:publish(category, data_json, now_ms())
  if not json then return nil, id, timestamp end -- message, error code
  local event = new_event(category, data, data_json, json, id, timestamp)
  if #woken > 0 then
    local body = '{"events":[' .. json .. "]}"
    local answer -- the whole HTTP answer, built once for every plain keep-alive subscriber
    local waiting, timeouts = self.waiting, self.timeouts
    for i = 1, #woken do
      local handle = woken[i]
      local res = waiting[handle]
      if res then
        waiting[handle] = nil
        timeouts:cancel(handle)
        answer = answer or response.shared_answer(200, NO_CACHE, body)
        if not res:_send_shared(answer, NO_CACHE) then send_json(res, 200, body) end
      else
        local watcher = self.watchers[handle]
        if watcher then
          self.watchers[handle] = nil
          local ok, err = pcall(watcher, event)
          if not ok then self:_log("error", "watcher failed", { error = tostring(err) }) end
        end
      end
    end
  end
  if self.logger then
    self:_log("debug", "published", { category = category, id = id, woken = #woken, data = data_json })
  end
  if #self.add_ons > 0 then self:_call_add_ons("on_publish", event) end
  return event
end

-- Publishes and tells callback(event) (or, in Redis mode, callback(nil, message) when Redis
-- failed). In memory the event is returned and callback runs before that; with the `redis`
-- option publishing is asynchronous: true means the event is on its way to Redis.
function Manager:_publish_with(category, data_json, data, callback)
  if self.engine then return self:_publish_json(category, data_json, data, callback) end
  local event, err, code = self:_publish_json(category, data_json, data)
  if event and callback then callback(event) end
  return event, err, code
end

-- manager:publish(category, data[, callback]) -> event (true in Redis mode) | nil, message
function Manager:publish(category, data, callback)
  if type(category) ~= "string" or #category == 0 or #category > self.options.max_category_bytes then
    return nil, ("category must be a string of 1 to %d bytes"):format(self.options.max_category_bytes)
  end
  if data == nil then return nil, "data must not be nil" end
  local data_json, err = core.json_encode(data)
  if not data_json then return nil, "data cannot be encoded as JSON: " .. err end
  return self:_publish_with(category, data_json, data, callback)
end

-- manager:publish_json(category, json_text[, callback]): publishes JSON text as given.
function Manager:publish_json(category, data_json, callback)
  if type(category) ~= "string" or #category == 0 or #category > self.options.max_category_bytes then
    return nil, ("category must be a string of 1 to %d bytes"):format(self.options.max_category_bytes)
  end
  if type(data_json) ~= "string" then return nil, "data_json must be a string" end
  local ok, err = core.json_check(data_json)
  if not ok then return nil, "data_json is not JSON: " .. err end
  if data_json:match("^%s*null%s*$") then return nil, "data must not be null" end
  return self:_publish_with(category, data_json, nil, callback)
end

-- manager:watch(categories, on_event) -> handle | nil, message
-- Calls on_event(event) once, for the next event published in any of the
-- categories (a string or a list), then forgets the watch: a caller that wants
-- more watches again (fetching with its cursor first). For in-process
-- listeners and streaming handlers (SSE).
function Manager:watch(categories, on_event)
  if self.closed then return nil, "manager is shut down" end
  local handle, err = self.store:wait(categories)
  if not handle then return nil, err end
  self.watchers[handle] = on_event
  return handle
end

-- manager:unwatch(handle): ends a watch; true when it was still pending.
function Manager:unwatch(handle)
  if not self.watchers[handle] then return false end
  self.watchers[handle] = nil
  return self.store:cancel(handle)
end

function Manager:_answer_timeout(handle)
  local res = self.waiting[handle]
  if not res then return end
  self.waiting[handle] = nil
  self.store:cancel(handle)
  send_json(res, 200, ('{"timeout":"no events before timeout","timestamp":%d}'):format(self.store:mark_time(now_ms())))
end

-- Parses and checks a subscription request's query. Returns a table or nil,
-- message (golongpoll's messages).
function Manager:_parse_subscription(req)
  local o = self.options
  local timeout = req.query.timeout
  timeout = timeout and tonumber(timeout:match("^%+?(%d+)$"))
  if not timeout or timeout < 1 or timeout > o.max_longpoll_timeout_seconds then
    return nil, ("Invalid or missing 'timeout' arg.  Must be 1-%d."):format(o.max_longpoll_timeout_seconds)
  end
  local categories = req:query_all("category")
  if #categories == 0 then
    return nil, ("Invalid subscription category, must be 1-%d characters long."):format(o.max_category_bytes)
  end
  if #categories > o.max_categories_per_subscription then
    return nil, ("Too many categories: at most %d per subscription."):format(o.max_categories_per_subscription)
  end
  for _, c in ipairs(categories) do
    if #c == 0 or #c > o.max_category_bytes then
      return nil, ("Invalid subscription category, must be 1-%d characters long."):format(o.max_category_bytes)
    end
    if not core.utf8_valid(c) then return nil, "Invalid subscription category, must be valid UTF-8." end
  end
  -- an empty value counts as absent, as in golongpoll (its JS client sends `last_id=`)
  local since = req.query.since_time
  if since == "" then since = nil end
  if since ~= nil then
    -- as Go's strconv.ParseInt(s, 10, 64): an optional sign, digits, within int64 (Lua
    -- reads a decimal integer out of range as a float, which is refused here)
    local n = since:match("^[+-]?%d+$") and tonumber(since)
    since = math.type(n) == "integer" and n or nil
    if not since then return nil, "Invalid 'since_time' arg." end
  end
  local last_id = req.query.last_id
  if last_id == "" then last_id = nil end
  if last_id ~= nil then
    if since == nil then return nil, "Must provide 'since_time' arg when providing 'last_id'." end
    if not core.is_uuid(last_id) then return nil, "Param 'last_id' was not a valid UUID." end
  end
  return { timeout = timeout, categories = #categories == 1 and categories[1] or categories,
    since = since, last_id = last_id }
end

-- Answers now with buffered events after the cursor, or registers a waiting
-- subscriber. on_wait(handle) lets the caller (SSE) keep its own state.
function Manager:_subscribe(req, res)
  if self.closed then
    return send_json(res, 503, error_body("manager is shut down"))
  end
  local sub, err = self:_parse_subscription(req)
  if not sub then
    self:_log("warn", "bad subscription request", { error = err })
    return send_json(res, self.options.subscribe_error_status, error_body(err))
  end
  local store = self.store
  if sub.since then
    local body, count_or_err, code = store:fetch(sub.categories, sub.since, sub.last_id, now_ms())
    if body then return send_json(res, 200, body) end
    if type(count_or_err) == "string" then
      return send_json(res, status_of(code, self.options.subscribe_error_status), error_body(count_or_err))
    end
  end
  local handle, werr, wcode = store:wait(sub.categories)
  if not handle then
    self:_log("warn", "subscriber refused", { error = werr })
    return send_json(res, status_of(wcode, 503), error_body(werr))
  end
  self.waiting[handle] = res
  self.timeouts:add(handle, sub.timeout * 1000)
  res:on_close(function()
    -- the client went away: forget it at once
    if self.waiting[handle] == res then
      self.waiting[handle] = nil
      self.timeouts:cancel(handle)
      self.store:cancel(handle)
    end
  end)
end

function Manager:_publish_request(req, res)
  if req.method ~= "POST" then
    res:set_header("Allow", "POST")
    return send_json(res, 405, error_body("Invalid HTTP Method. Only POST allowed."))
  end
  local category, data_json, pcode = core.parse_publish(req.body or "", self.options.max_category_bytes)
  if not category then
    self:_log("warn", "bad publish request", { error = data_json })
    return send_json(res, status_of(pcode, 400), error_body(data_json))
  end
  if self.engine then -- Redis mode: answered once Redis stored the event (503 when it could not)
    local queued, qerr, qcode = self:_publish_json(category, data_json, nil, function(event, perr)
      if event then return send_json(res, 200, '{"success":true}') end
      return send_json(res, 503, error_body(perr))
    end)
    if not queued then return send_json(res, status_of(qcode, qcode == "EINVAL" and 400 or 503), error_body(qerr)) end
    return
  end
  local event, err, code = self:_publish_json(category, data_json)
  if not event then
    local status = self.closed and 503 or status_of(code, 400)
    return send_json(res, status, error_body(err))
  end
  return send_json(res, 200, '{"success":true}')
end

-- Current figures from the store, plus what only the manager knows.
function Manager:stats(with_categories)
  if self.closed then return { closed = true } end
  local s = self.store:stats(with_categories)
  s.timeouts_pending = self.timeouts.count
  return s
end

-- Answers every waiting subscriber with the timeout answer and stops timers.
function Manager:_stop_serving()
  self.closed = true
  local handles = {}
  for handle in pairs(self.waiting) do handles[#handles + 1] = handle end
  for _, handle in ipairs(handles) do self:_answer_timeout(handle) end
  if self.sse then self.sse:close() end -- ends the SSE streams cleanly
  self.watchers = {}
  self.timeouts:close()
  if self.purge_timer then Timeouts.close_handle(self.purge_timer) end
end

-- manager:shutdown_with_timeout(seconds, callback): like shutdown, but gives
-- up waiting for asynchronous add-ons after `seconds`. callback(ok, err).
function Manager:shutdown_with_timeout(seconds, callback)
  if self.shutdown_started then
    if callback then callback(true) end
    return true
  end
  self.shutdown_started = true
  self:_stop_serving()
  local pending = 0
  local finished = false
  local timer
  local function finish(ok, err)
    if finished then return end
    finished = true
    if timer then Timeouts.close_handle(timer) end
    self.store:close()
    if callback then callback(ok, err) end
  end
  for i, a in ipairs(self.add_ons) do
    local hook = a.on_shutdown
    if hook then
      -- a hook that takes an argument is asynchronous: it calls done() when finished
      local async = debug.getinfo(hook, "u").nparams >= 1
      if async then pending = pending + 1 end
      local called = false
      local function done()
        if called or not async then return end
        called = true
        pending = pending - 1
        if pending == 0 then finish(true) end
      end
      local ok, err = pcall(hook, done)
      if not ok then
        self:_log("error", "add-on hook failed", { add_on = i, hook = "on_shutdown", error = tostring(err) })
        done()
      end
    end
  end
  if pending == 0 then
    finish(true)
  elseif seconds then
    timer = uv.new_timer()
    timer:start(math.floor(seconds * 1000), 0, function()
      self:_log("warn", "shutdown timeout exceeded while waiting for add-ons", { seconds = seconds })
      finish(false, "shutdown timeout exceeded")
    end)
  end
  return true
end

-- manager:shutdown([callback]): calling it twice is harmless.
function Manager:shutdown(callback)
  return self:shutdown_with_timeout(nil, callback)
end

local M = {}

-- A read-only view of the manager's options for add-ons (buffer size, TTL...).
local function readonly(t)
  return setmetatable({}, { __index = t, __newindex = function() error("options are read-only", 2) end })
end

-- Loads the events the add-ons kept, oldest first, before anyone is served.
-- manager.started_add_ons lists those whose on_start ran (to undo on failure).
local function restore(manager)
  local ttl_ms = manager.ttl_ms
  local now = now_ms()
  local started = manager.started_add_ons
  local restored = {} -- ids already restored: two persistence add-ons may hold the same events
  local view = readonly(manager.options)
  for i, a in ipairs(manager.add_ons) do
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
          if (ttl_ms == 0 or now - e.timestamp < ttl_ms) and not restored[e.id] then
            restored[e.id] = true
            local data_json = e.data_json
            if data_json == nil then
              local err
              data_json, err = core.json_encode(e.data)
              if not data_json then return nil, ("add-on %d: stored event data: %s"):format(i, err) end
            end
            local rok, rerr = manager.store:restore(e.category, data_json, tostring(e.id), e.timestamp)
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

-- longpoll.start(options) -> manager | nil, message
function M.start(options)
  local o, err = options_mod.check(options)
  if not o then return nil, err end
  local ttl_ms = (o.event_ttl_seconds == options_mod.FOREVER or o.event_ttl_seconds == math.huge) and 0
    or math.max(1, math.floor(o.event_ttl_seconds * 1000))
  local manager = setmetatable({
    options = o,
    ttl_ms = ttl_ms,
    logger = log.new(o.logger),
    add_ons = add_on_list(o.add_on),
    waiting = {}, -- subscription handle -> res of a waiting long poll
    watchers = {}, -- subscription handle -> function(event), see manager:watch
    started_add_ons = {},
    store = core.new_store {
      max_event_buffer_size = o.max_event_buffer_size,
      event_ttl_ms = ttl_ms,
      delete_after_first = o.delete_event_after_first_retrieval,
      max_category_bytes = o.max_category_bytes,
      max_categories = o.max_categories,
      max_waiting_per_category = o.max_waiting_per_category,
      max_buffered_bytes = o.max_buffered_bytes,
    },
    closed = false,
  }, Manager)
  manager.timeouts = Timeouts.new(function(handle) manager:_answer_timeout(handle) end)
  local ok, rerr
  if o.redis then -- events live in Redis: the engine replaces publish/subscribe internals
    ok, rerr = require("longpoll.redis.engine").attach(manager,
      { send_json = send_json, error_body = error_body, new_event = new_event })
  else
    ok, rerr = restore(manager)
  end
  if not ok then
    -- add-ons that did start get their shutdown, so they release files and timers
    for _, a in ipairs(manager.started_add_ons) do
      if a.on_shutdown then pcall(a.on_shutdown, function() end) end
    end
    manager.timeouts:close()
    manager.store:close()
    return nil, rerr
  end
  if ttl_ms > 0 then
    -- expiry also happens on every publish and fetch; this timer returns the
    -- memory of idle categories, and never keeps the process alive by itself
    local interval = o.purge_interval_seconds and math.floor(o.purge_interval_seconds * 1000)
      or math.min(60000, math.max(250, ttl_ms // 2))
    manager.purge_timer = uv.new_timer()
    manager.purge_timer:start(interval, interval, function()
      if not manager.closed then manager.store:expire(now_ms()) end
    end)
    manager.purge_timer:unref()
  end
  -- handlers are plain functions (no colon), ready to be wrapped
  manager.subscription_handler = function(req, res) return manager:_subscribe(req, res) end
  manager.publish_handler = function(req, res) return manager:_publish_request(req, res) end
  -- extensions (docs/extensions.md): SSE, stats, and CORS around all four handlers
  manager.sse_handler = require("longpoll.sse").attach(manager)
  manager.stats_handler = require("longpoll.stats").handler(manager)
  if o.cors then require("longpoll.cors").apply(manager) end
  manager:_log("info", "manager started", { max_event_buffer_size = o.max_event_buffer_size, ttl_ms = ttl_ms })
  return manager
end

M.FOREVER = options_mod.FOREVER
M.now_ms = now_ms
M.send_json = send_json
M.error_body = error_body

return M
