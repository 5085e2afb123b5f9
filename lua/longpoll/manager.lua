-- The manager: options, publish, the golongpoll-compatible HTTP handlers, the waiting long
-- polls' timeouts and their timeout answer, add-on hooks and shutdown. Events and waiting
-- subscribers live in an engine (engine/memory.lua: the C store; engine/redis.lua: Redis),
-- reached only through the engine interface (docs/architecture.md).
local core = require "longpoll.core"
local options_mod = require "longpoll.options"
local log = require "longpoll.log"
local Timeouts = require "longpoll.timeouts"
local answers = require "longpoll.answers"
local subscription = require "longpoll.subscription"
local hooks = require "longpoll.hooks"
local memory = require "longpoll.engine.memory"
local idempotency = require "longpoll.idempotency"
local native = require "longpoll.http.native"
local sse = require "longpoll.sse"
local stats = require "longpoll.stats"

local send_json, send_error = answers.send_json, answers.send_error

local Manager = {}
Manager.__index = Manager

local TIMEOUT_BODY = '{"timeout":"no events before timeout","timestamp":%d}'

-- HTTP status of an engine's refusal code.
local STATUS_OF_CODE = {
  EINVAL = 400,
  EUTF8 = 400,
  ETOOBIG = 413,
  ECATEGORIES = 503,
  EWAITERS = 503,
  ENOMEM = 503,
  ELIMIT = 503,
  ERANDOM = 503,
  ECLOSED = 503,
  EUNAVAILABLE = 503,
  EKEYMISMATCH = idempotency.STATUS.EKEYMISMATCH, -- 422
  EKEYBUSY = idempotency.STATUS.EKEYBUSY, -- 409
}

local function status_of(code)
  return STATUS_OF_CODE[code] or 503
end

local function check_category(self, category)
  if type(category) ~= "string" or #category == 0 or #category > self.options.max_category_bytes then
    return nil, ("category must be a string of 1 to %d bytes"):format(self.options.max_category_bytes)
  end
  return true
end

-- Publishes checked JSON text through the engine. callback(event | nil, message, code).
-- Returns the event when the engine stored it before returning (memory), true when it is on
-- its way (Redis), or nil, message, code when refused. key: an Idempotency-Key (checked) or
-- nil; a replay then counts as stored, as { id =, timestamp =, category =, replayed = true }.
local function replayed(category, prior)
  return { id = prior.id, timestamp = prior.timestamp, category = category, replayed = true }
end

local function publish_json_text(self, category, data_json, data, callback, key)
  local stored
  local opts = key and { idempotency_key = key, fingerprint = idempotency.fingerprint(category, data_json) }
  local ok, err, code, prior = self.engine:publish(category, data_json, function(event, perr, pcode, pprior)
    if event then
      stored = hooks.event(event, data)
      if callback then callback(stored) end
    elseif pcode == idempotency.REPLAY then
      stored = replayed(category, pprior)
      if callback then callback(stored) end
    elseif callback then
      callback(nil, perr, pcode)
    end
  end, data, opts)
  if not ok then
    if code ~= idempotency.REPLAY then return nil, err, code end
    stored = replayed(category, prior)
    if callback then callback(stored) end
    return stored
  end
  if self.logger then
    self.logger("debug", "published", { category = category, data = data_json })
  end
  return stored or true
end

-- The callback and the Idempotency-Key of publish's third argument: a function (the callback)
-- or a table { callback =, idempotency_key = }. nil, message when it is neither.
local function publish_options(arg)
  if arg == nil or type(arg) == "function" then return arg end
  if type(arg) ~= "table" then return nil, nil, "the third argument must be a callback or a table of options" end
  for k in pairs(arg) do
    if k ~= "callback" and k ~= "idempotency_key" then return nil, nil, ("unknown publish option '%s'"):format(tostring(k)) end
  end
  if arg.callback ~= nil and type(arg.callback) ~= "function" then return nil, nil, "option 'callback' must be a function" end
  local key
  if arg.idempotency_key ~= nil then
    local kerr
    key, kerr = idempotency.check_key(arg.idempotency_key)
    if not key then return nil, nil, kerr end
  end
  return arg.callback, key
end

-- manager:publish(category, data[, callback | { callback =, idempotency_key = }])
--   -> event | true | nil, message[, code]
-- callback(event) once the event is stored, or callback(nil, message) when storing failed
-- later (Redis). In memory the event is stored (and returned) before publish returns; with
-- Redis, true means it is on its way. With an idempotency_key, a repeat within the window
-- stores nothing and gives { id =, timestamp =, category =, replayed = true } of the first
-- event; the key with other data is refused with code EKEYMISMATCH, while the first publish
-- is in flight with EKEYBUSY (docs/api.md).
function Manager:publish(category, data, callback)
  if self.closed then return nil, "manager is shut down" end
  local ok, err = check_category(self, category)
  if not ok then return nil, err end
  if data == nil then return nil, "data must not be nil" end
  local cb, key, oerr = publish_options(callback)
  if oerr then return nil, oerr, "EINVAL" end
  local data_json, jerr = core.json_encode(data)
  if not data_json then return nil, "data cannot be encoded as JSON: " .. jerr end
  return publish_json_text(self, category, data_json, data, cb, key)
end

-- manager:publish_json(category, json_text[, callback | options]) (options as publish's): publishes JSON text as given.
function Manager:publish_json(category, data_json, callback)
  local cb, key, oerr = publish_options(callback)
  if self.closed then return nil, "manager is shut down" end
  local ok, err = check_category(self, category)
  if not ok then return nil, err end
  if type(data_json) ~= "string" then return nil, "data_json must be a string" end
  local jok, jerr = core.json_check(data_json)
  if not jok then return nil, "data_json is not JSON: " .. jerr end
  if data_json:match("^%s*null%s*$") then return nil, "data must not be null" end
  if oerr then return nil, oerr, "EINVAL" end
  return publish_json_text(self, category, data_json, nil, cb, key)
end

local function category_list(categories)
  if type(categories) == "string" then return { categories } end
  return categories
end

-- manager:watch(categories, on_event) -> handle | nil, message
-- Calls on_event(event) once, for the next event published in any of the categories (a
-- string or a list), then forgets the watch: a caller that wants more watches again. For
-- in-process listeners.
function Manager:watch(categories, on_event)
  if self.closed then return nil, "manager is shut down" end
  local handle
  local fired = false
  local err
  handle, err = self.engine:follow(category_list(categories), nil, nil, function(list)
    if fired or not list or #list == 0 then return end
    fired = true
    self.engine:unfollow(handle)
    local e = list[1]
    if e.category == nil then
      -- a stream item ({json, timestamp, id}): category and data as the core reads the JSON
      local category, data_json = core.parse_publish(e.json, math.maxinteger)
      e = { id = e.id, timestamp = e.timestamp, category = category, data_json = data_json, json = e.json }
    end
    on_event(hooks.event(e))
  end)
  if not handle then return nil, err end
  return handle
end

-- manager:unwatch(handle): ends a watch; true when it was still pending.
function Manager:unwatch(handle)
  return self.engine:unfollow(handle)
end

-- manager:follow(categories, since, last_id, on_events) -> handle | nil, message
-- Every event after the cursor (since nil: from now on), in batches, oldest first, each once:
-- on_events(list, missed) with list = { {json=, timestamp=, id=}, ... }, or on_events(nil,
-- message) once when the engine ends it. For streams (SSE). manager:unfollow(handle) ends it.
function Manager:follow(categories, since, last_id, on_events)
  if self.closed then return nil, "manager is shut down" end
  return self.engine:follow(category_list(categories), since, last_id, on_events)
end

function Manager:unfollow(handle)
  return self.engine:unfollow(handle)
end

-- manager:start_mark(callback): callback(ts) with a timestamp no later event reaches (a
-- stream's exact "from now on"), or callback(nil, message) when none can be had now.
function Manager:start_mark(callback)
  if self.closed then return callback(nil, "manager is shut down") end
  self.engine:timeout_mark(callback)
end

-- Writes the answer to a waiting long poll: events (one string shared by every subscriber a
-- publish woke) or, when body is nil, the timeout answer with ts (503 with failure when no
-- timestamp could be had).
local function answer_waiting(self, handle, body, ts, failure)
  local res = self.waiting[handle]
  if not res then return end
  self.waiting[handle] = nil
  self.timeouts:cancel(handle)
  if body then
    if self.shared_body ~= body then
      self.shared_body, self.shared_answer = body, answers.shared(body)
    end
    return answers.send_shared(res, self.shared_answer, body)
  end
  if ts then return send_json(res, 200, TIMEOUT_BODY:format(ts)) end
  return send_error(res, 503, failure or "manager is shut down")
end

local function on_timeout(self, handle)
  if not self.waiting[handle] then return end
  self.engine:expire(handle, function(ts, err) answer_waiting(self, handle, nil, ts, err) end)
end

-- The long-poll handler: answers at once with buffered events after the cursor, or waits.
local function subscribe(self, req, res)
  -- a wrapper that ends by calling this handler hands the request back to the engine's C path
  -- (longpoll.http.native); a response of another server has no `native`
  if self.native and res.native and res:native(self.native, req, answers.JSON) then return end
  if self.closed then return send_error(res, 503, "manager is shut down") end
  local sub, err = subscription.parse(req, self.options, "poll")
  if not sub then
    self:log("warn", "bad subscription request", { error = err })
    return send_error(res, self.options.subscribe_error_status, err)
  end
  local handle, answered_body
  local function on_answer(body)
    if handle == nil then
      answered_body = body -- before subscribe returned: answered below
    else
      answer_waiting(self, handle, body)
    end
  end
  local werr, code
  handle, werr, code = self.engine:subscribe(sub, on_answer)
  if answered_body then return send_json(res, 200, answered_body) end
  if not handle then
    self:log("warn", "subscriber refused", { error = werr })
    local status = status_of(code)
    if status == 400 then status = self.options.subscribe_error_status end
    return send_error(res, status, werr)
  end
  self.waiting[handle] = res
  self.timeouts:add(handle, sub.timeout_ms)
  res:on_close(function()
    -- the client went away: forget it at once
    if self.waiting[handle] == res then
      self.waiting[handle] = nil
      self.timeouts:cancel(handle)
      self.engine:cancel(handle)
    end
  end)
end

-- The publish handler: {"category": ..., "data": ...}, answered once the engine stored it.
local function publish_request(self, req, res)
  if req.method ~= "POST" then
    res:set_header("Allow", "POST")
    return send_error(res, 405, "Invalid HTTP Method. Only POST allowed.")
  end
  local category, data_json, parse_code = core.parse_publish(req.body or "", self.options.max_category_bytes)
  if not category then
    self:log("warn", "bad publish request", { error = data_json })
    return send_error(res, parse_code and status_of(parse_code) or 400, data_json) -- ENOMEM: 503
  end
  if self.closed then return send_error(res, 503, "manager is shut down") end
  local key_header = req.headers[idempotency.HEADER]
  local key
  if key_header ~= nil then
    local kerr
    key, kerr = idempotency.check_key(key_header)
    if not key then return send_error(res, 400, kerr) end
  end
  local ok, err, code = publish_json_text(self, category, data_json, nil, function(event, perr, scode)
    if not event then return send_error(res, status_of(scode or "EUNAVAILABLE"), perr) end
    if not key then return send_json(res, 200, '{"success":true}') end
    -- with the key the answer names the event, the same for the first request and replays
    if event.replayed then res:set_header(idempotency.REPLAYED_HEADER, "true") end
    return send_json(res, 200, idempotency.answer_body(event.id, event.timestamp))
  end, key)
  if not ok then return send_error(res, status_of(code), err) end
end

-- Calls logger(level, message, fields) when the manager has one.
function Manager:log(level, message, fields)
  if self.logger then self.logger(level, message, fields) end
end

-- Current figures from the engine, plus what only the manager knows.
function Manager:stats(with_categories)
  if self.closed then return { closed = true } end
  local s = self.engine:stats(with_categories)
  s.timeouts_pending = self.timeouts:count() + (self.native and self.native:parked() or 0) -- Lua and C long polls
  s.sse_streams = (self.sse and self.sse:count() or 0) + (self.native_sse and self.native_sse:streams() or 0)
  return s
end

-- Answers every waiting long poll with the timeout answer (the engine may ask Redis for its
-- timestamp: engine:close waits for that), ends the streams, stops the timers.
local function stop_serving(self)
  self.closed = true
  -- later requests get the Lua handlers' 503
  if self.native then self.native:disable() end
  if self.native_publish then self.native_publish:disable() end
  if self.native_sse then self.native_sse:disable() end -- its streams end cleanly
  if self.native_stats then self.native_stats:disable() end
  local handles = {}
  for handle in pairs(self.waiting) do handles[#handles + 1] = handle end
  for _, handle in ipairs(handles) do
    self.engine:expire(handle, function(ts, err) answer_waiting(self, handle, nil, ts, err) end)
  end
  if self.sse then self.sse:close() end -- ends the SSE streams cleanly
  self.timeouts:close()
end

-- manager:shutdown_with_timeout(seconds, callback): like shutdown, but gives up waiting for
-- asynchronous add-ons after `seconds`. callback(ok, err).
function Manager:shutdown_with_timeout(seconds, callback)
  if self.shutdown_started then
    if callback then callback(true) end
    return true
  end
  self.shutdown_started = true
  stop_serving(self)
  hooks.shutdown(self.add_ons, seconds, function(...) self:log(...) end, function(ok, err)
    self.engine:close(function()
      if callback then callback(ok, err) end
    end)
  end)
  return true
end

-- manager:shutdown([callback]): calling it twice is harmless.
function Manager:shutdown(callback)
  return self:shutdown_with_timeout(nil, callback)
end

local M = {}

-- longpoll.start(options) -> manager | nil, message
function M.start(options)
  local o, err = options_mod.check(options)
  if not o then return nil, err end
  local ttl_ms = (o.event_ttl_seconds == options_mod.FOREVER or o.event_ttl_seconds == math.huge) and 0
    or math.max(1, math.floor(o.event_ttl_seconds * 1000))
  local engine_options = setmetatable({ ttl_ms = ttl_ms }, { __index = o })
  local manager = setmetatable({
    options = o,
    ttl_ms = ttl_ms,
    logger = log.new(o.logger),
    add_ons = hooks.list(o.add_on),
    waiting = {}, -- engine handle -> res of a waiting long poll
    closed = false,
  }, Manager)
  local host = {
    log = function(level, message, fields) manager:log(level, message, fields) end,
  }
  if #manager.add_ons > 0 then -- without add-ons no event need be handed over
    host.on_event = function(event)
      hooks.call(manager.add_ons, "on_publish", function(msg, fields) manager:log("error", msg, fields) end,
        hooks.event(event))
    end
  end
  local engine, eerr
  if o.redis then
    for i, a in ipairs(manager.add_ons) do
      if a.on_start then
        return nil, ("add-on %d has on_start: with 'redis', events are kept in Redis, not restored by add-ons"):format(i)
      end
    end
    engine, eerr = require("longpoll.engine.redis").new(engine_options, host)
  else
    engine = memory.new(engine_options, host)
  end
  if not engine then return nil, eerr end
  manager.engine = engine
  manager.timeouts = Timeouts.new(function(handle) on_timeout(manager, handle) end)
  if not o.redis then
    local started = {}
    local ok, rerr = hooks.restore(manager.add_ons, o, ttl_ms, (o.clock or memory.wall_clock_ms)(),
      function(e, data_json) return engine:restore(e.category, data_json, tostring(e.id), e.timestamp) end, started)
    if not ok then
      -- add-ons that did start get their shutdown, so they release files and timers
      for _, a in ipairs(started) do
        if a.on_shutdown then pcall(a.on_shutdown, function() end) end
      end
      manager.timeouts:close()
      engine:close()
      return nil, rerr
    end
  end
  -- handlers are plain functions (no colon), ready to be wrapped
  local handlers = {
    subscription = function(req, res) return subscribe(manager, req, res) end,
    publish = function(req, res) return publish_request(manager, req, res) end,
  }
  -- extensions (docs/extensions.md): SSE, stats, and CORS around all four handlers
  manager.sse = sse.new(manager)
  handlers.sse = function(req, res)
    -- as for long polls: a wrapper that ends by calling this handler hands the stream to C
    if manager.native_sse and res.native and res:native(manager.native_sse, req, answers.STREAM) then return end
    return manager.sse:handle(req, res)
  end
  local stats_handler = stats.handler(manager)
  handlers.stats = function(req, res)
    -- as for streams: a wrapper that ends by calling this handler hands the request to C
    if manager.native_stats and res.native and res:native(manager.native_stats, req, answers.JSON) then return end
    return stats_handler(req, res)
  end
  if o.cors then
    local cors = require "longpoll.cors"
    local policy = cors.new(o.cors)
    manager.cors = policy
    handlers.subscription = cors.wrap(policy, handlers.subscription, "GET, HEAD")
    handlers.publish = cors.wrap(policy, handlers.publish, "POST", true)
    handlers.sse = cors.wrap(policy, handlers.sse, "GET, HEAD")
    handlers.stats = cors.wrap(policy, handlers.stats, "GET, HEAD")
  end
  -- the HTTP engine serves long polls to the unwrapped handler in C (longpoll.http.native), from
  -- the same store and with the same rules (lp_fast.c mirrors subscription.lua): catch-ups are
  -- answered, the others wait parked in C until a publish or their timeout answers them; with
  -- the `cors` option the C path writes the policy's headers and answers its preflights too
  local debug_logged = type(o.logger) == "function" or (type(o.logger) == "table" and o.logger.level == "debug")
  if not o.clock and engine.core_store then
    manager.native = core.native_subscription(engine:core_store(), {
      max_category_bytes = o.max_category_bytes,
      max_categories_per_subscription = o.max_categories_per_subscription,
      max_longpoll_timeout_seconds = o.max_longpoll_timeout_seconds,
      header_block = answers.JSON.text,
      cors = manager.cors and manager.cors:native("GET, HEAD"),
    })
    native.register(handlers.subscription, manager.native)
    -- SSE streams too: served from the store in C, each event framed once for every stream
    manager.native_sse = core.native_sse(engine:core_store(), {
      max_category_bytes = o.max_category_bytes,
      max_categories_per_subscription = o.max_categories_per_subscription,
      heartbeat_ms = o.sse_heartbeat_seconds * 1000,
      retry_ms = sse.RETRY_MS,
      header_block = answers.STREAM.text,
      cors = manager.cors and manager.cors:native("GET, HEAD"),
    })
    native.register(handlers.sse, manager.native_sse)
    -- and the stats: JSON, Prometheus and the dashboard page written in C from the same figures
    manager.native_stats = stats.native(engine:core_store(), {
      keys = engine:core_keys(),
      polls = manager.native,
      streams = manager.native_sse,
      lua_polls = manager.timeouts:gauge(),
      lua_streams = manager.sse:gauge(),
      categories = o.stats_categories,
      cors = manager.cors and manager.cors:native("GET, HEAD"),
    })
    native.register(handlers.stats, manager.native_stats)
    -- publishes too, when nothing but the store has to hear of them: no add-on, and no logger
    -- that takes the debug line of each publish (a publish that wakes a Lua waiter stays Lua's)
    if #manager.add_ons == 0 and not debug_logged then
      manager.native_publish = core.native_publish(engine:core_store(), {
        max_category_bytes = o.max_category_bytes,
        header_block = answers.JSON.text,
        cors = manager.cors and manager.cors:native("POST"),
        -- keyed publishes too: the key is looked up and set in the engine's table, in C
        keys = engine:core_keys(),
        mismatch_body = answers.error_body(idempotency.MISMATCH_MESSAGE),
      })
      native.register(handlers.publish, manager.native_publish)
    end
  elseif not o.clock and engine.core_cache then
    -- Redis mode: catch-up polls the engine's node-local cache answers with events, in C from
    -- that cache (lp_cache, the rule engine/redis/cache.lua answers with), and polls with nothing
    -- after their cursor parked on it, in C, until pub/sub brings an event of theirs; a parked
    -- poll's timeout takes a Redis mark (one per batch of timeouts); the rest go to Lua
    local cache = engine:core_cache()
    if cache then
      local function mark(batch)
        local ok = engine:timeout_mark(function(ts) manager.native:marked(batch, ts) end)
        if not ok then manager.native:marked(batch, nil) end
      end
      manager.native = core.native_cached_subscription(cache, {
        max_category_bytes = o.max_category_bytes,
        max_categories_per_subscription = o.max_categories_per_subscription,
        max_longpoll_timeout_seconds = o.max_longpoll_timeout_seconds,
        header_block = answers.JSON.text,
        cors = manager.cors and manager.cors:native("GET, HEAD"),
        mark = mark,
        -- one cap for the polls parked on the cache and the engine's own waiters
        max_waiting_per_category = o.max_waiting_per_category,
        waiting_store = engine:core_waiting_store(),
      })
      native.register(handlers.subscription, manager.native)
    end
    -- publishes too, sent to Redis from C (the engine's script call, lp_lua_redis_publish.c),
    -- when nothing but Redis has to hear of them (as in memory mode: no add-on, no debug line)
    local publisher = engine:core_publisher()
    if publisher and #manager.add_ons == 0 and not debug_logged then
      manager.native_publish = core.native_redis_publish(publisher, {
        max_category_bytes = o.max_category_bytes,
        header_block = answers.JSON.text,
        cors = manager.cors and manager.cors:native("POST"),
      })
      native.register(handlers.publish, manager.native_publish)
    end
  end
  manager.subscription_handler = handlers.subscription
  manager.publish_handler = handlers.publish
  manager.sse_handler = handlers.sse
  manager.stats_handler = handlers.stats
  manager:log("info", "manager started", { max_event_buffer_size = o.max_event_buffer_size, ttl_ms = ttl_ms })
  return manager
end

M.FOREVER = options_mod.FOREVER
M.now_ms = memory.wall_clock_ms
M.send_json = send_json
M.error_body = answers.error_body

return M
