-- longpoll.client: a client for longpoll (and golongpoll) servers on luv: polls in the
-- background with callbacks, or as an iterator for scripts, and publishes.
local uv = require "luv"
local cjson = require "cjson"
local core = require "longpoll.core"
local log = require "longpoll.log"
local http_client = require "longpoll.http.client"
local util = require "longpoll.http.util"

local find, format, gsub, byte, concat = string.find, string.format, string.gsub, string.byte,
  table.concat
local tointeger, mtype = math.tointeger, math.type
local type, pairs, ipairs, tostring, setmetatable = type, pairs, ipairs, tostring, setmetatable

local client = {}

local MAX_CATEGORY_BYTES = 1024
-- A poll answer may take poll_timeout_seconds; past this much more the server is presumed lost.
local POLL_GRACE_MS = 15000
local PUBLISH_TIMEOUT_MS = 30000
local USER_AGENT = "longpoll-lua-client/0.1"
-- Integers above this come out of lua-cjson rounded, so they stay floats.
local EXACT_FLOAT = 2 ^ 53

local Client = {}
Client.__index = Client

---------------------------------------------------------------------------------------------
-- Options

local KNOWN = {
  subscribe_url = true, publish_url = true, category = true, poll_timeout_seconds = true,
  reattempt_wait_seconds = true, success_wait_seconds = true, basic_auth = true, headers = true,
  on_failure = true, on_missed = true, logger = true, publish_retries = true,
}

-- A publish that got a 503 or no answer is sent again with the same Idempotency-Key, after
-- PUBLISH_RETRY_BASE_MS, then twice that, ... (the server stores it once).
local PUBLISH_RETRY_BASE_MS = 100

local function check_category(c)
  return type(c) == "string" and #c >= 1 and #c <= MAX_CATEGORY_BYTES
end

local function check_seconds(o, name, default, integer, min)
  local v = o[name]
  if v == nil then
    return default
  end
  if type(v) ~= "number" or v ~= v or v == math.huge or v < min or (integer and v ~= math.floor(v)) then
    return nil, format("option '%s' must be %s of at least %s", name,
      integer and "a whole number of seconds" or "a number of seconds", tostring(min))
  end
  return integer and tointeger(v) or v
end

local function check_header(name, value)
  if type(name) ~= "string" or not find(name, "^[%w!#$%%&'*+.^_`|~-]+$") then
    return nil, "option 'headers': invalid header name " .. format("%q", tostring(name))
  end
  if type(value) ~= "string" or find(value, "[%z\r\n]") then
    return nil, "option 'headers': the value of '" .. name .. "' must be a string without line breaks"
  end
  return true
end

-- Headers as a list of { name, value }: from a map { name = value } or a list of pairs
-- (golongpoll's ExtraHeaders, where a name may repeat).
local function check_headers(h)
  if h == nil then
    return {}
  end
  if type(h) ~= "table" then
    return nil, "option 'headers' must be a table"
  end
  local out = {}
  if #h > 0 then
    for _, pair in ipairs(h) do
      if type(pair) ~= "table" then
        return nil, "option 'headers' must be { name = value } or a list of { name, value }"
      end
      local ok, err = check_header(pair[1], pair[2])
      if not ok then
        return nil, err
      end
      out[#out + 1] = { pair[1], pair[2] }
    end
  else
    local names = {}
    for name in pairs(h) do
      names[#names + 1] = name
    end
    table.sort(names, function(a, b) return tostring(a) < tostring(b) end)
    for _, name in ipairs(names) do
      local ok, err = check_header(name, h[name])
      if not ok then
        return nil, err
      end
      out[#out + 1] = { name, h[name] }
    end
  end
  return out
end

local function check_options(o)
  if type(o) ~= "table" then
    return nil, "options must be a table"
  end
  for k in pairs(o) do
    if not KNOWN[k] then
      return nil, "unknown option '" .. tostring(k) .. "'"
    end
  end
  local c = {}
  -- category: required, as golongpoll's NewClient; a list subscribes to several at once
  local category = o.category
  if type(category) == "table" then
    if #category == 0 then
      return nil, "option 'category' must not be an empty list"
    end
    for _, v in ipairs(category) do
      if not check_category(v) then
        return nil, "option 'category' must be a string of 1 to 1024 bytes, or a list of them"
      end
    end
    c.categories = { table.unpack(category) }
  elseif check_category(category) then
    c.categories = { category }
  else
    return nil, "option 'category' must be a string of 1 to 1024 bytes, or a list of them"
  end
  -- URLs: at least one of them, both http://
  if (o.subscribe_url == nil or o.subscribe_url == "") and (o.publish_url == nil or o.publish_url == "") then
    return nil, "at least one of the options 'subscribe_url' and 'publish_url' must be given"
  end
  for _, name in ipairs { "subscribe_url", "publish_url" } do
    if o[name] ~= nil and o[name] ~= "" then
      local url, err = http_client.parse_url(o[name])
      if not url then
        return nil, "option '" .. name .. "' " .. err
      end
      c[name] = url
      c[name .. "_text"] = o[name]
    end
  end
  local err
  c.poll_timeout_seconds, err = check_seconds(o, "poll_timeout_seconds", 45, true, 1)
  if not c.poll_timeout_seconds then
    return nil, err
  end
  c.reattempt_wait_seconds, err = check_seconds(o, "reattempt_wait_seconds", 30, false, 0)
  if not c.reattempt_wait_seconds then
    return nil, err
  end
  c.success_wait_seconds, err = check_seconds(o, "success_wait_seconds", 0, false, 0)
  if not c.success_wait_seconds then
    return nil, err
  end
  local retries = o.publish_retries
  if retries == nil then
    retries = 3
  elseif math.type(retries) ~= "integer" or retries < 0 or retries > 10 then
    return nil, "option 'publish_retries' must be a whole number from 0 to 10"
  end
  c.publish_retries = retries
  -- basic auth: both user and password, or neither (golongpoll's rule)
  local auth = o.basic_auth
  if auth ~= nil then
    if type(auth) ~= "table" then
      return nil, "option 'basic_auth' must be { user, password }"
    end
    local user, password = auth.user or auth[1], auth.password or auth[2]
    if (user ~= nil and type(user) ~= "string") or (password ~= nil and type(password) ~= "string") then
      return nil, "option 'basic_auth' must be { user, password } with strings"
    end
    user, password = user or "", password or ""
    if (user == "") ~= (password == "") then
      return nil, "option 'basic_auth' needs both a user and a password, or neither"
    end
    if find(user, ":", 1, true) then
      return nil, "option 'basic_auth': the user must not contain ':'"
    end
    if user ~= "" then
      c.authorization = "Basic " .. util.base64_encode(user .. ":" .. password)
    end
  end
  c.headers, err = check_headers(o.headers)
  if not c.headers then
    return nil, err
  end
  for _, name in ipairs { "on_failure", "on_missed" } do
    if o[name] ~= nil and type(o[name]) ~= "function" then
      return nil, "option '" .. name .. "' must be a function"
    end
    c[name] = o[name]
  end
  local ok, lerr = log.check(o.logger)
  if not ok then
    return nil, lerr
  end
  c.logger = log.new(o.logger)
  return c
end

-- client.new(options) -> client | nil, message
function client.new(options)
  local o, err = check_options(options)
  if not o then
    return nil, err
  end
  local headers = { { "User-Agent", USER_AGENT }, { "Accept", "application/json" } }
  if o.authorization then
    headers[#headers + 1] = { "Authorization", o.authorization }
  end
  for _, h in ipairs(o.headers) do
    headers[#headers + 1] = h
  end
  return setmetatable({
    options = o,
    categories = o.categories,
    request_headers = headers,
    state = "new", -- "running" after start, "stopped" after stop (final)
    since_time = nil, -- the cursor: timestamp and id of the last event seen
    last_id = nil,
    poll_conn = nil,
    publish_conn = nil,
    publish_queue = {},
    timer = nil, -- waits between polls (reattempt or success wait)
    waker = nil, -- set by events(): called on every event and on stop
  }, Client)
end

function Client:log(level, message, fields)
  local logger = self.options.logger
  if logger then
    pcall(logger, level, message, fields)
  end
end

---------------------------------------------------------------------------------------------
-- Waiting in the caller's context: a coroutine yields until woken; the main thread runs
-- the luv loop itself.

-- Runs start(wake) and waits until wake(...) is called; returns what was passed to it.
-- wake returns false when it resumed a coroutine that then died of an error.
local function wait_for(start)
  local co, is_main = coroutine.running()
  local done, results = false, nil
  local yielded = false
  start(function(...)
    if done then
      return
    end
    done, results = true, table.pack(...)
    if yielded then
      -- The coroutine runs on from here; an error in it must not escape into luv (which
      -- would end the process), and nobody else is left to catch it.
      local ok, err = coroutine.resume(co)
      if not ok then
        io.stderr:write("longpoll client: error in a coroutine resumed by the client: ",
          debug.traceback(co, tostring(err)), "\n")
        return false
      end
    end
  end)
  if not done then
    if is_main then
      -- Each pass runs one loop iteration, and the request in flight keeps the loop alive
      -- until its answer or its deadline.
      while not done do
        if not uv.run("once") and not done then
          error("cannot wait: the luv loop is already running here (use a callback or a coroutine)", 3)
        end
      end
    else
      yielded = true
      while not done do
        coroutine.yield()
      end
    end
  end
  return table.unpack(results, 1, results.n)
end

---------------------------------------------------------------------------------------------
-- Polling

-- lua-cjson turns every number into a float; whole ones that are exact become integers again.
local function integers(v)
  if type(v) == "table" then
    for k, x in pairs(v) do
      if mtype(x) == "float" or type(x) == "table" then
        v[k] = integers(x)
      end
    end
    return v
  end
  if mtype(v) == "float" and v >= -EXACT_FLOAT and v <= EXACT_FLOAT then
    return tointeger(v) or v
  end
  return v
end

-- Percent-encodes a query value.
local function escape(s)
  return (gsub(s, "[^%w%-._~]", function(ch) return format("%%%02X", byte(ch)) end))
end

function Client:subscribe_target()
  local url = self.options.subscribe_url
  local parts = {}
  for _, c in ipairs(self.categories) do
    parts[#parts + 1] = "category=" .. escape(c)
  end
  parts[#parts + 1] = "timeout=" .. self.options.poll_timeout_seconds
  if self.since_time then
    parts[#parts + 1] = format("since_time=%d", self.since_time)
    if self.last_id then
      parts[#parts + 1] = "last_id=" .. escape(self.last_id)
    end
  end
  return url.target .. (find(url.target, "?", 1, true) and "&" or "?") .. concat(parts, "&")
end

-- An error raised by a callback stops the client (it is logged, and kept in c.error)
-- instead of escaping into luv, which would end the process.
function Client:callback_failed(err)
  self.error = err
  if self.options.logger then
    self:log("error", "callback failed; client stopped", { error = tostring(err) })
  else
    io.stderr:write("longpoll client: callback failed; client stopped: ", tostring(err), "\n")
  end
  self:stop()
end

function Client:call_user(fn, ...)
  local ok, err = xpcall(fn, debug.traceback, ...)
  if not ok then
    self:callback_failed(err)
  end
  return ok
end

function Client:wait_then(seconds, fn)
  if seconds <= 0 then
    return fn()
  end
  self.timer = self.timer or uv.new_timer()
  self.timer:start(math.floor(seconds * 1000 + 0.5), 0, fn)
end

function Client:fail(err)
  self:log("warn", "poll failed", { error = err, since_time = self.since_time, last_id = self.last_id })
  local on_failure = self.options.on_failure
  if on_failure then
    local ok, keep_going = xpcall(on_failure, debug.traceback, err)
    if self.state ~= "running" then
      return
    end
    if not ok then
      return self:callback_failed(keep_going)
    end
    if keep_going == false then
      self:log("info", "on_failure returned false; client stopped")
      return self:stop()
    end
  end
  self:wait_then(self.options.reattempt_wait_seconds, function() self:poll() end)
end

function Client:deliver(answer)
  local events = answer.events
  -- check the whole answer first: a malformed event must not move the cursor halfway
  for _, event in ipairs(events) do
    if type(event) ~= "table" or not tointeger(event.timestamp) or type(event.id) ~= "string" then
      return self:fail("Malformed event in poll response")
    end
    event.timestamp = tointeger(event.timestamp)
    event.data = integers(event.data)
  end
  if answer.missed == true then
    self:log("warn", "events were missed", { since_time = self.since_time })
    local on_missed = self.options.on_missed
    if on_missed and not self:call_user(on_missed, events[1], self.since_time, self.last_id) then
      return
    end
    if self.state ~= "running" then
      return
    end
  end
  for _, event in ipairs(events) do
    self.since_time, self.last_id = event.timestamp, event.id
    if not self:call_user(self.on_event, event) or self.state ~= "running" then
      return
    end
  end
  self:wait_then(self.options.success_wait_seconds, function() self:poll() end)
end

function Client:on_answer(res, err)
  if self.state ~= "running" then
    return
  end
  if not res then
    return self:fail(format("Error connecting to %s: %s", self.options.subscribe_url_text, err))
  end
  if res.status ~= 200 then
    return self:fail("HTTP response code: " .. res.status)
  end
  local ok, answer = pcall(cjson.decode, res.body)
  if not ok or type(answer) ~= "table" then
    return self:fail("Error decoding poll response: " .. (ok and "not a JSON object" or tostring(answer)))
  end
  if answer.error ~= nil then
    return self:fail("Longpoll API error message: " .. tostring(answer.error))
  end
  if type(answer.events) == "table" and #answer.events > 0 then
    return self:deliver(answer)
  end
  if answer.timeout ~= nil then
    -- continue from the server's time, keeping last_id (as golongpoll's client does)
    local ts = tointeger(answer.timestamp)
    if ts and (self.since_time == nil or ts > self.since_time) then
      self.since_time = ts
    end
    return self:poll()
  end
  return self:fail("Unexpected poll response: " .. res.body:sub(1, 200))
end

function Client:poll()
  if self.state ~= "running" then
    return
  end
  self.poll_conn:request({
    method = "GET",
    target = self:subscribe_target(),
    headers = self.request_headers,
    timeout_ms = self.options.poll_timeout_seconds * 1000 + POLL_GRACE_MS,
  }, function(res, err)
    self:on_answer(res, err)
  end)
end

-- c:start([since], on_event): polls in the background on the luv loop. since: epoch ms
-- (events after it), { since_time = ms, last_id = id } (a saved cursor), or nil (events
-- published from now on, by the server's clock).
function Client:start(since, on_event)
  if self.state ~= "new" then
    error("client already " .. (self.state == "running" and "started" or "stopped")
      .. " (a client starts once; make a new one)", 2)
  end
  if type(on_event) ~= "function" then
    error("bad argument #2 to 'start' (function expected)", 2)
  end
  local o = self.options
  if not o.subscribe_url then
    error("cannot start: option 'subscribe_url' was not given", 2)
  end
  if type(since) == "table" then
    if since.since_time ~= nil and not tointeger(since.since_time) then
      error("bad argument #1 to 'start' (since_time must be an integer)", 2)
    end
    if since.last_id ~= nil and (type(since.last_id) ~= "string" or since.since_time == nil) then
      error("bad argument #1 to 'start' (last_id must be a string, given with since_time)", 2)
    end
    self.since_time, self.last_id = tointeger(since.since_time), since.last_id
  elseif since ~= nil then
    if not tointeger(since) or since < 0 then
      error("bad argument #1 to 'start' (epoch milliseconds expected)", 2)
    end
    self.since_time = tointeger(since)
  end
  self.state = "running"
  self.on_event = on_event
  self.poll_conn = http_client.connection { host = o.subscribe_url.host, port = o.subscribe_url.port }
  self:log("info", "client started", { subscribe_url = o.subscribe_url_text, since_time = self.since_time })
  self:poll()
  return self
end

-- The cursor to resume from later: since_time, last_id (both nil before the first answer).
function Client:cursor()
  return self.since_time, self.last_id
end

function Client:is_running()
  return self.state == "running"
end

-- c:stop(): stops polling at once. The poll in flight is cancelled by closing its
-- connection, and no callback runs afterwards. Publishes already sent still complete.
-- Called outside a running loop, it runs one non-blocking loop turn (see below).
function Client:stop()
  if self.state == "stopped" then
    return
  end
  self.state = "stopped"
  if self.poll_conn then
    self.poll_conn:close(true)
  end
  if self.timer then
    if not self.timer:is_closing() then
      self.timer:close()
    end
    self.timer = nil
  end
  if self.publish_conn and not self.publish_conn:busy() and #self.publish_queue == 0 and not self.publish_retry_timer then
    self.publish_conn:close(true)
    self.publish_conn = nil
  end
  self:log("info", "client stopped", { since_time = self.since_time, last_id = self.last_id })
  if uv.loop_mode() == nil then
    -- Outside the loop (a script after its last event): one non-blocking turn finishes the
    -- closes, since a process that exits with a handle half-closed crashes inside luv.
    uv.run("nowait")
  end
  local waker = self.waker
  if waker then
    waker()
  end
end

-- for event in c:events([since]) do ... end: polls and returns events one by one, running
-- the luv loop (in the main thread) or yielding (in a coroutine) until the next. Leaving
-- the loop (break, error) stops the client, through Lua 5.4's to-be-closed loop variable.
function Client:events(since)
  local queue, first, last = {}, 1, 0
  local wake
  self:start(since, function(event)
    last = last + 1
    queue[last] = event
    if wake then
      wake()
    end
  end)
  self.waker = function()
    if wake then
      wake()
    end
  end
  local function next_event()
    -- Each pass waits for one event or the stop.
    while self.state == "running" and first > last do
      wait_for(function(w)
        wake = function()
          wake = nil
          if w() == false then
            self:stop() -- the loop's coroutine is dead: nobody takes events any more
          end
        end
      end)
    end
    if self.state ~= "running" or first > last then
      return nil
    end
    local event = queue[first]
    queue[first] = nil
    first = first + 1
    return event
  end
  local closer = setmetatable({}, { __close = function() self:stop() end })
  return next_event, nil, nil, closer
end

---------------------------------------------------------------------------------------------
-- Publishing

local function publish_error(res, err, url)
  if not res then
    return format("Error connecting to %s: %s", url, err)
  end
  local ok, answer = pcall(cjson.decode, res.body)
  if res.status ~= 200 then
    local detail = ok and type(answer) == "table" and type(answer.error) == "string"
      and (": " .. answer.error) or ""
    return "HTTP response code: " .. res.status .. detail
  end
  if not ok or type(answer) ~= "table" then
    return "Error decoding publish response"
  end
  if answer.success == true then
    return nil
  end
  if answer.error ~= nil then
    return "Publish response had error: " .. tostring(answer.error)
  end
  return "Unexpected publish response: " .. res.body:sub(1, 200)
end

-- A publish worth sending again with its key: no answer (network error, timeout) or 503.
local function publish_retryable(res)
  return res == nil or res.status == 503
end

function Client:next_publish()
  local conn = self.publish_conn
  if conn:busy() or self.publish_retry_timer then
    return
  end
  local item = table.remove(self.publish_queue, 1)
  if not item then
    if self.state == "stopped" then
      conn:close(true)
      self.publish_conn = nil
    end
    return
  end
  local headers = { { "Content-Type", "application/json" }, { "Idempotency-Key", item.key } }
  for _, h in ipairs(self.request_headers) do
    headers[#headers + 1] = h
  end
  local url = self.options.publish_url
  conn:request({ method = "POST", target = url.target, headers = headers, body = item.body,
    timeout_ms = PUBLISH_TIMEOUT_MS }, function(res, err)
    local perr = publish_error(res, err, self.options.publish_url_text)
    if perr and publish_retryable(res) and item.attempts < self.options.publish_retries then
      -- the same key again: stored once, whether or not the first attempt was
      item.attempts = item.attempts + 1
      self:log("info", "publish retried", { category = item.category, attempt = item.attempts, error = perr })
      table.insert(self.publish_queue, 1, item)
      local timer = uv.new_timer()
      self.publish_retry_timer = timer
      timer:start(PUBLISH_RETRY_BASE_MS << (item.attempts - 1), 0, function()
        timer:close()
        self.publish_retry_timer = nil
        if self.publish_conn == conn then
          self:next_publish()
        end
      end)
      return
    end
    if perr then
      self:log("warn", "publish failed", { category = item.category, error = perr })
    end
    item.callback(perr == nil, perr)
    -- a callback may have published again or stopped the client
    if self.publish_conn == conn then
      self:next_publish()
    end
  end)
end

-- c:publish(category, data[, callback]): publishes data (any JSON value but nil) on
-- publish_url. With a callback: callback(true) or callback(false, message). Without: waits
-- (yielding in a coroutine, running the loop in the main thread) and returns true or
-- false, message.
function Client:publish(category, data, callback)
  if callback ~= nil and type(callback) ~= "function" then
    error("bad argument #3 to 'publish' (function expected)", 2)
  end
  local function send(done)
    if not self.options.publish_url then
      return done(false, "Cannot publish: option 'publish_url' was not given")
    end
    if not check_category(category) then
      return done(false, "category must be 1-1024 bytes long")
    end
    if data == nil then
      return done(false, "data must not be nil")
    end
    local data_json, err = core.json_encode(data)
    if not data_json then
      return done(false, "data cannot be encoded as JSON: " .. tostring(err))
    end
    local body = '{"category":' .. core.json_string(category) .. ',"data":' .. data_json .. "}"
    self.publish_queue[#self.publish_queue + 1] = { category = category, body = body, callback = done,
      key = core.uuid(), attempts = 0 }
    if not self.publish_conn then
      local url = self.options.publish_url
      self.publish_conn = http_client.connection { host = url.host, port = url.port }
    end
    self:next_publish()
  end
  if callback then
    return send(function(ok, err)
      local cok, cerr = xpcall(callback, debug.traceback, ok, err)
      if not cok then
        io.stderr:write("longpoll client: publish callback failed: ", tostring(cerr), "\n")
      end
    end)
  end
  return wait_for(send)
end

client.Client = Client
return client
