-- Test helper: runs a spec body in a coroutine on luv's loop so network tests read top to bottom,
-- plus small HTTP clients (one-shot, raw bytes, persistent connection). Every wait is bounded.
local uv = require "luv"

local async = {}

local find, sub, lower, concat = string.find, string.sub, string.lower, table.concat

local owned = {} -- uv handles created here, until their close callback ran

-- The loop's time brought up to date: a deadline counts from now, not from when the loop last
-- polled (synchronous work in between, slow under ASan, would eat it).
local function fresh_now()
  uv.update_time()
  return uv.now()
end
local tasks = {} -- coroutine -> task
local run_tasks -- tasks spawned during the current async.run

local function new_handle(h)
  owned[h] = true
  return h
end

local function close_handle(h)
  if owned[h] and not h:is_closing() then
    h:close(function()
      owned[h] = nil
    end)
  end
end

local function wake_all(list)
  for i = 1, #list do
    list[i]()
  end
end

local function resume(co, ...)
  local ok, err = coroutine.resume(co, ...)
  local task = tasks[co]
  if not ok then
    task.err = type(err) == "string" and debug.traceback(co, err) or err
  end
  if coroutine.status(co) == "dead" then
    tasks[co] = nil
    task.done = true
    wake_all(task.waiters)
  end
end

-- A waiter suspends the running coroutine until wake(w, ...) or its timeout (nil, "timeout").
local function waiter()
  return { co = coroutine.running(), done = false }
end

local function wake(w, ...)
  if w.done then
    return
  end
  w.done = true
  if w.timer then
    close_handle(w.timer)
  end
  resume(w.co, ...)
end

local function wait(w, timeout_ms)
  if timeout_ms then
    -- the deadline counts from now, not from the loop's cached time: synchronous work since the
    -- loop last polled (a slow start under ASan, thousands of publishes) must not eat it
    uv.update_time()
    local t = new_handle(uv.new_timer())
    w.timer = t
    t:start(math.max(0, timeout_ms), 0, function()
      wake(w, nil, "timeout")
    end)
  end
  return coroutine.yield()
end

local function start(fn)
  local task = { done = false, waiters = {} }
  local co = coroutine.create(fn)
  task.co = co
  tasks[co] = task
  run_tasks[#run_tasks + 1] = task
  resume(co)
  return task
end

-- Runs fn(), driving uv until it returns; raises its error, or a timeout error after timeout_ms.
function async.run(fn, timeout_ms)
  timeout_ms = timeout_ms or 10000
  local outer = run_tasks
  run_tasks = {}
  local timed_out = false
  local guard = new_handle(uv.new_timer())
  guard:start(timeout_ms, 0, function()
    timed_out = true
  end)
  local main = start(fn)
  -- Bounded by the guard timer, which wakes uv.run at the latest after timeout_ms.
  while not main.done and not timed_out do
    uv.run("once")
  end
  -- Close what the helpers opened (abandoned clients included) and let close callbacks run.
  for h in pairs(owned) do
    close_handle(h)
  end
  for _ = 1, 100 do
    if next(owned) == nil then
      break
    end
    uv.run("nowait")
  end
  local spawned = run_tasks
  run_tasks = outer
  if timed_out then
    error("async.run: timed out after " .. timeout_ms .. " ms", 2)
  end
  for i = 1, #spawned do
    if spawned[i].err ~= nil then
      error(spawned[i].err, 0)
    end
  end
end

-- True while async's own handles are open (tests check that servers leave nothing else).
function async.owns(handle)
  return owned[handle] == true
end

-- True inside a coroutine that async runs (where async.sleep and the waits may be used).
function async.in_task()
  return tasks[coroutine.running()] ~= nil
end

function async.sleep(ms)
  wait(waiter(), ms)
end

-- Polls pred() every 10 ms until it is true (returns true) or timeout_ms
-- passes (returns false): for conditions a busy machine reaches late.
function async.wait_for(pred, timeout_ms)
  local deadline = fresh_now() + (timeout_ms or 2000)
  while not pred() do
    if uv.now() >= deadline then
      return false
    end
    async.sleep(10)
  end
  return true
end

-- Like wait_for, but raises "timed out waiting for <what>" (at the caller) on timeout.
function async.wait_or_fail(what, pred, timeout_ms)
  if not async.wait_for(pred, timeout_ms or 5000) then
    error("timed out waiting for " .. what, 2)
  end
end

-- Runs fn concurrently; returns a task for wait_all.
function async.spawn(fn)
  return start(fn)
end

-- Waits for every task; raises the first error among them.
function async.wait_all(list)
  for i = 1, #list do
    local task = list[i]
    if not task.done then
      local w = waiter()
      task.waiters[#task.waiters + 1] = function()
        wake(w)
      end
      wait(w)
    end
  end
  for i = 1, #list do
    if list[i].err ~= nil then
      local err = list[i].err
      list[i].err = nil -- reported here, not again by run
      error(err, 0)
    end
  end
end

-- A one-shot event: ev:set(...) wakes whoever waits in ev:wait(timeout_ms), which returns the
-- values given to set (true when none; at once if set already happened), or nil, "timeout".
local Event = {}
Event.__index = Event

function async.event()
  return setmetatable({ is_set = false, waiters = {} }, Event)
end

function Event:set(...)
  if self.is_set then
    return
  end
  self.is_set = true
  self.values = select("#", ...) > 0 and table.pack(...) or { true, n = 1 }
  local ws = self.waiters
  self.waiters = {}
  for i = 1, #ws do
    wake(ws[i], true)
  end
end

function Event:wait(timeout_ms)
  if not self.is_set then
    local w = waiter()
    self.waiters[#self.waiters + 1] = w
    if not wait(w, timeout_ms or 5000) then
      return nil, "timeout"
    end
  end
  return table.unpack(self.values, 1, self.values.n)
end

---------------------------------------------------------------------------------------------
-- Client connections

local Conn = {}
Conn.__index = Conn

function async.connect(port, host, timeout_ms)
  local tcp = new_handle(uv.new_tcp())
  local w = waiter()
  tcp:connect(host or "127.0.0.1", port, function(err)
    wake(w, err == nil, err)
  end)
  local ok, err = wait(w, timeout_ms or 5000)
  if not ok then
    close_handle(tcp)
    error("connect to port " .. tostring(port) .. " failed: " .. tostring(err), 2)
  end
  local conn = setmetatable({ tcp = tcp, buf = "", eof = false }, Conn)
  tcp:read_start(function(rerr, data)
    if data then
      conn.buf = conn.buf .. data
    else
      conn.eof, conn.err = true, rerr
    end
    local cw = conn.waiter
    if cw then
      conn.waiter = nil
      wake(cw, true)
    end
  end)
  return conn
end

-- Waits until more bytes or EOF arrive; false on timeout or when already at EOF.
function Conn:wait_data(timeout_ms)
  if self.eof then
    return false
  end
  local w = waiter()
  self.waiter = w
  local ok = wait(w, timeout_ms)
  self.waiter = nil
  return ok == true
end

-- Writes bytes and waits for the write to complete: true or nil, err.
function Conn:send(bytes)
  if self.tcp:is_closing() then
    return nil, "closed"
  end
  local w = waiter()
  local ok, err = self.tcp:write(bytes, function(werr)
    wake(w, werr == nil, werr)
  end)
  if not ok then
    return nil, err
  end
  return wait(w, 5000)
end

-- Whatever is buffered, or what arrives within timeout_ms ("" if nothing).
function Conn:read_raw(timeout_ms)
  if self.buf == "" then
    self:wait_data(timeout_ms or 1000)
  end
  local data = self.buf
  self.buf = ""
  return data
end

-- True once the peer closed the connection (within timeout_ms).
function Conn:closed_by_peer(timeout_ms)
  local deadline = fresh_now() + (timeout_ms or 2000)
  -- Every pass waits for an event or gives up at the deadline.
  while not self.eof do
    local left = deadline - uv.now()
    if left <= 0 or not self:wait_data(left) then
      break
    end
  end
  return self.eof
end

-- Waits until the buffer has n bytes; false on EOF or timeout.
local function need(self, n, deadline)
  while #self.buf < n do
    local left = deadline - uv.now()
    if left <= 0 or not self:wait_data(left) then
      return false
    end
  end
  return true
end

-- Waits until plain text occurs in the buffer; returns its position.
local function need_text(self, text, deadline)
  while true do
    local s, e = find(self.buf, text, 1, true)
    if s then
      return s, e
    end
    local left = deadline - uv.now()
    if left <= 0 or not self:wait_data(left) then
      return nil
    end
  end
end

-- Reads one response: status, headers (lower-case names), body; nil, message on failure.
-- opts.head: the request was HEAD (no body follows). opts.timeout_ms: default 5000.
function Conn:read_response(opts)
  opts = opts or {}
  local deadline = fresh_now() + (opts.timeout_ms or 5000)
  local _, he = need_text(self, "\r\n\r\n", deadline)
  if not he then
    return nil, "no complete response head (got " .. #self.buf .. " bytes)"
  end
  local head = sub(self.buf, 1, he)
  self.buf = sub(self.buf, he + 1)
  local _, le, status = find(head, "^HTTP/1%.%d (%d%d%d)[^\r\n]*\r\n")
  if not status then
    return nil, "bad status line: " .. head
  end
  status = tonumber(status)
  local headers = {}
  for name, value in head:sub(le + 1):gmatch("([^:\r\n]+):[ \t]*([^\r\n]*)\r\n") do
    name = lower(name)
    headers[name] = headers[name] and headers[name] .. ", " .. value or value
  end
  if opts.head or status < 200 or status == 204 or status == 304 then
    return status, headers, ""
  end
  if headers["transfer-encoding"] and lower(headers["transfer-encoding"]) == "chunked" then
    local parts = {}
    -- Each pass consumes one chunk; a stalled server ends it through the deadline.
    while true do
      local s = need_text(self, "\r\n", deadline)
      if not s then
        return nil, "incomplete chunked body"
      end
      local size = tonumber(sub(self.buf, 1, s - 1):match("^%x+"), 16)
      if not size then
        return nil, "bad chunk size"
      end
      if not need(self, s + 1 + size + 2, deadline) then
        return nil, "incomplete chunk"
      end
      parts[#parts + 1] = sub(self.buf, s + 2, s + 1 + size)
      self.buf = sub(self.buf, s + size + 4)
      if size == 0 then
        return status, headers, concat(parts)
      end
    end
  end
  local cl = tonumber(headers["content-length"])
  if cl then
    if not need(self, cl, deadline) then
      return nil, "incomplete body"
    end
    local body = sub(self.buf, 1, cl)
    self.buf = sub(self.buf, cl + 1)
    return status, headers, body
  end
  self:closed_by_peer(deadline - uv.now())
  local body = self.buf
  self.buf = ""
  return status, headers, body
end

function Conn:close()
  close_handle(self.tcp)
end

-- One request on a fresh connection: status, headers, body (raises when no answer comes).
-- opts: method, path, headers (name -> value), body, host, timeout_ms.
function async.http(port, opts)
  opts = opts or {}
  local method, host = opts.method or "GET", opts.host or "127.0.0.1"
  local lines = { method .. " " .. (opts.path or "/") .. " HTTP/1.1" }
  local has = {}
  for name, value in pairs(opts.headers or {}) do
    has[lower(name)] = true
    lines[#lines + 1] = name .. ": " .. value
  end
  if not has.host then
    lines[#lines + 1] = "Host: " .. (find(host, ":", 1, true) and "[" .. host .. "]" or host)
      .. ":" .. port
  end
  local body = opts.body or ""
  if (#body > 0 or method == "POST" or method == "PUT") and not has["content-length"]
    and not has["transfer-encoding"] then
    lines[#lines + 1] = "Content-Length: " .. #body
  end
  local conn = async.connect(port, host)
  conn:send(concat(lines, "\r\n") .. "\r\n\r\n" .. body)
  local status, headers, rbody = conn:read_response{ head = method == "HEAD",
    timeout_ms = opts.timeout_ms }
  conn:close()
  if not status then
    error("async.http " .. method .. " " .. (opts.path or "/") .. ": " .. headers, 2)
  end
  return status, headers, rbody
end

-- Sends raw bytes on a fresh connection; returns what was received and whether the server
-- closed. Reads until the server closes or opts.timeout_ms (default 2000) passes; with
-- opts.wait_close == false it returns as soon as the first bytes arrive.
function async.raw(port, bytes, opts)
  opts = opts or {}
  local conn = async.connect(port, opts.host)
  conn:send(bytes)
  local timeout = opts.timeout_ms or 2000
  if opts.wait_close == false then
    if conn.buf == "" then
      conn:wait_data(timeout)
    end
  else
    conn:closed_by_peer(timeout)
  end
  conn:close()
  return conn.buf, conn.eof
end

return async
