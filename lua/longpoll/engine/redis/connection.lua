-- One connection to Redis on luv's loop. Commands are pipelined: each is
-- queued for writing and its callback queued; the commands of one loop turn go
-- out in one write (publishes that arrive together cost one system call), made
-- before the loop next waits. Replies (parsed by hiredis) are
-- matched to callbacks in order. Replies no command waits for (pub/sub
-- messages) go to on_push. A connection is used once: after it fails, the
-- owner makes a new one (the engine reconnects with backoff).
local uv = require "luv"
local hiredis = require "longpoll.hiredis"

local format = hiredis.format

local Connection = {}
Connection.__index = Connection

local M = {}

-- opts: host, port, user, password, db, connect_timeout_ms, command_timeout_ms.
-- on_push(reply): a reply no command waits for.
-- on_lost(message): called once when the connection fails (never after close()).
function M.new(opts, on_push, on_lost)
  local self = setmetatable({
    opts = opts, on_push = on_push, on_lost = on_lost,
    queue = {}, head = 1, tail = 0, -- callbacks of the commands in flight, oldest at head
    out = {}, -- commands not written yet, in order
    ready = false, closed = false,
  }, Connection)
  self.flush_fn = function() self:_flush() end
  self.on_written = function(err)
    if err then self:abort("write error: " .. tostring(err)) end
  end
  return self
end

local function close_handle(h)
  if h and not h:is_closing() then h:close() end
end

-- Closes the handles; then on_lost (if given) runs, and every command in
-- flight learns the connection is gone, oldest first, so their callbacks
-- already see the owner's new state.
function Connection:_release(on_lost, message)
  self.ready = false
  if self.tcp then self.tcp:read_stop() end
  close_handle(self.tcp)
  close_handle(self.timer)
  close_handle(self.flusher)
  self.out = {}
  if self.reader then self.reader:close() end
  local queue, head, tail = self.queue, self.head, self.tail
  self.queue, self.head, self.tail = {}, 1, 0
  if on_lost then on_lost(message) end
  for i = head, tail do
    local entry = queue[i]
    if entry.cb then entry.cb(nil, self.lost_reason or "Redis connection closed", true) end
  end
end

-- Gives up on the connection (it failed, or the owner found it broken): releases it and tells
-- the owner once, through on_lost.
function Connection:abort(message)
  if self.closed then return end
  self.closed = true
  self.lost_reason = "Redis connection lost: " .. message
  self:_release(self.on_lost, message)
end

-- Closes the connection; commands in flight get (nil, "Redis connection closed").
function Connection:close()
  if self.closed then return end
  self.closed = true
  self:_release()
end

function Connection:_on_read(err, data)
  if self.closed then return end
  if err then return self:abort("read error: " .. tostring(err)) end
  if not data then return self:abort("Redis closed the connection") end
  local replies, perr = self.reader:feed(data)
  if not replies then return self:abort("protocol error: " .. tostring(perr)) end
  for i = 1, replies.n do
    local reply = replies[i]
    if self.head <= self.tail then
      local entry = self.queue[self.head]
      self.queue[self.head] = nil
      self.head = self.head + 1
      if type(reply) == "table" and reply.error then
        entry.cb(nil, reply.error)
      else
        entry.cb(reply)
      end
    elseif self.on_push then
      self.on_push(reply)
    else
      return self:abort("a reply nobody asked for")
    end
    if self.closed then return end -- a callback closed it
  end
end

function Connection:_write(bytes)
  local out = self.out
  out[#out + 1] = bytes
  if #out > 1 then return end
  local flusher = self.flusher
  if not flusher then
    -- an idle handle: while it is active the loop does not wait for I/O before running it
    flusher = uv.new_idle()
    flusher:unref()
    self.flusher = flusher
  end
  flusher:start(self.flush_fn)
end

-- Writes what this turn queued, in one write.
function Connection:_flush()
  self.flusher:stop()
  local out = self.out
  if #out == 0 or self.closed then return end
  self.out = {}
  local ok, err = self.tcp:write(#out == 1 and out[1] or out, self.on_written)
  if not ok then self:abort("write error: " .. tostring(err)) end
end

function Connection:_unusable()
  return self.lost_reason or (self.closed and "Redis connection closed") or "Redis is not connected"
end

-- Sends a command (an array of strings and numbers); callback(reply) or
-- callback(nil, message[, lost]) follows, lost being true when the connection
-- failed. Returns true, or nil, message when the connection is not usable
-- (the callback is then never called).
function Connection:command(argv, callback)
  if self.closed or not self.tcp then return nil, self:_unusable() end
  self:_write(format(argv))
  self.tail = self.tail + 1
  self.queue[self.tail] = { cb = callback, at = uv.now() }
  return true
end

-- Sends a command whose replies arrive through on_push (SUBSCRIBE).
function Connection:send(argv)
  if self.closed or not self.tcp then return nil, self:_unusable() end
  self:_write(format(argv))
  return true
end

-- The address (IP, port) the connection went to, once it started connecting.
function Connection:peer()
  return self.ip, self.opts.port
end

-- How many commands wait for their reply.
function Connection:in_flight()
  return self.tail - self.head + 1
end

-- A reply overdue by command_timeout_ms means Redis hangs or the network
-- dropped us silently: give up on the connection.
function Connection:_check_overdue()
  local entry = self.queue[self.head]
  if entry and uv.now() - entry.at > self.opts.command_timeout_ms then
    self:abort(("no reply within %d ms"):format(self.opts.command_timeout_ms))
  end
end

local function is_ip(host)
  return host:match("^%d+%.%d+%.%d+%.%d+$") or host:find(":", 1, true)
end

-- Connects, then sends AUTH and SELECT as needed and the commands of
-- handshake (a list of argv), pipelined. on_ready(replies) follows with the
-- handshake's replies once all succeeded; any failure goes to on_lost.
function Connection:connect(handshake, on_ready)
  local o = self.opts
  self.timer = uv.new_timer()
  self.timer:unref()
  self.timer:start(o.connect_timeout_ms, 0, function()
    self:abort(("cannot connect to %s:%d within %d ms"):format(o.host, o.port, o.connect_timeout_ms))
  end)
  self.reader = hiredis.reader()
  local function on_connected(err)
    if self.closed then return end
    if err then return self:abort(("cannot connect to %s:%d: %s"):format(o.host, o.port, tostring(err))) end
    self.tcp:nodelay(true)
    self.tcp:keepalive(true, 10)
    self.tcp:read_start(function(rerr, data) self:_on_read(rerr, data) end)
    local cmds = {}
    if o.password then cmds[#cmds + 1] = o.user and { "AUTH", o.user, o.password } or { "AUTH", o.password } end
    if o.db ~= 0 then cmds[#cmds + 1] = { "SELECT", o.db } end
    local first = #cmds + 1
    for _, c in ipairs(handshake or {}) do cmds[#cmds + 1] = c end
    local replies, left = {}, #cmds
    local function done()
      self.ready = true
      local period = math.max(20, math.min(1000, o.command_timeout_ms // 4))
      self.timer:stop()
      self.timer:start(period, period, function() self:_check_overdue() end)
      on_ready(replies)
    end
    if left == 0 then return done() end
    for i, c in ipairs(cmds) do
      self:command(c, function(reply, cerr)
        if self.closed then return end
        if cerr then return self:abort(("%s failed: %s"):format(c[1], cerr)) end
        if i >= first then replies[i - first + 1] = reply end
        left = left - 1
        if left == 0 then done() end
      end)
    end
  end
  local function start(ip)
    if self.closed then return end
    self.ip = ip
    self.tcp = uv.new_tcp()
    self.tcp:unref()
    local ok, started, err = pcall(self.tcp.connect, self.tcp, ip, o.port, on_connected)
    if not ok or not started then
      self:abort(("cannot connect to %s:%d: %s"):format(o.host, o.port, tostring(ok and err or started)))
    end
  end
  if is_ip(o.host) then
    start(o.host)
  else
    uv.getaddrinfo(o.host, nil, { socktype = "stream" }, function(err, addrs)
      if self.closed then return end
      if err or not addrs or not addrs[1] then
        return self:abort(("cannot resolve %s: %s"):format(o.host, tostring(err or "no address")))
      end
      start(addrs[1].addr)
    end)
  end
end

return M
