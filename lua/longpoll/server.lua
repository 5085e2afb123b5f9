-- HTTP/1.1 server on luv: listening, keep-alive connections, routing, static files, limits and
-- timeouts. Parsing lives in longpoll.http.parser; req/res objects in longpoll.http.*.
local uv = require "luv"
local sigpipe = require "longpoll.sigpipe"
local parser = require "longpoll.http.parser"
local request = require "longpoll.http.request"
local response = require "longpoll.http.response"
local util = require "longpoll.http.util"

local find, sub, gmatch, concat, sort = string.find, string.sub, string.gmatch, table.concat,
  table.sort
local xpcall, traceback, pairs, type, tostring = xpcall, debug.traceback, pairs, type, tostring
local uv_now = uv.now

local server = {}

local DEFAULTS = {
  host = "127.0.0.1",
  port = 0,
  max_header_bytes = 16384,
  max_body_bytes = 1048576,
  max_url_bytes = 8192,
  header_timeout_ms = 10000,
  keepalive_timeout_ms = 75000,
  max_connections = 10000,
}

-- What a connection's deadline (in srv._timed) means when it passes.
local IDLE = 1 -- waiting for a request: close silently
local HEADER = 2 -- a head has started but is incomplete: 408
local BODY = 3 -- no body bytes for header_timeout_ms: 408
local LINGER = 4 -- we sent FIN and drain the client's leftovers: close

-- After our FIN, unread client bytes would make the kernel answer with RST, which can destroy the
-- response still in flight (an early 413, say); so we read and drop them for a while first.
local LINGER_MS = 2000
-- Pipelined requests stop being answered while this much output waits for a slow reader.
local WRITE_HIGH_WATER = 1024 * 1024
local BACKLOG = 1024
local CONTINUE = "HTTP/1.1 100 Continue\r\n\r\n"

local Server = {}
Server.__index = Server

local Conn = {}
Conn.__index = Conn

local function log(srv, level, message, fields)
  local logger = srv.logger
  if logger then
    -- A failing logger must not take the event loop down with it.
    pcall(logger, level, message, fields)
  end
end

---------------------------------------------------------------------------------------------
-- Connections

function Conn:deadline(kind, at)
  self.dl_kind = kind
  self.srv._timed[self] = at
end

function Conn:may_keep_alive()
  return not self.srv._closing
end

function Conn:backlog()
  return self.tcp:get_write_queue_size()
end

-- Writes at once when nothing is queued (uv_try_write: no write request, no callback and no
-- epoll_ctl for write interest afterwards); what the socket does not take now is queued.
-- data: a string or a list of strings.
function Conn:write(data)
  if self.closed then
    return
  end
  local tcp = self.tcp
  local n = tcp:try_write(data)
  if not n then -- EAGAIN, or an error the queued write meets again
    self.queued = true
    tcp:write(data)
  elseif type(data) == "string" then
    if n < #data then
      self.queued = true
      tcp:write(sub(data, n + 1))
    end
  else
    local total = 0
    for i = 1, #data do
      total = total + #data[i]
    end
    if n < total then
      self.queued = true
      tcp:write(sub(concat(data), n + 1))
    end
  end
end

-- Stops being a live connection: no more writes, and the pending response (if any) learns
-- that its client is gone.
function Conn:detach()
  self.closed = true
  local srv = self.srv
  if self.counted then
    self.counted = false
    srv._count = srv._count - 1
  end
  local p = self.parser or self.spare_parser
  if p then
    p:close() -- its buffers go now, not when the collector finds it
  end
  self.parser, self.spare_parser = nil, nil
  local res = self.res
  self.res = nil
  if res and not res._done and res._on_close then
    local ok, err = xpcall(res._on_close, traceback)
    if not ok then
      log(srv, "error", "on_close callback failed", { error = err })
    end
  end
end

function Conn:close_handle()
  if self.handle_closed then
    return
  end
  self.handle_closed = true
  local srv = self.srv
  srv._timed[self] = nil
  srv._conns[self] = nil
  self.tcp:close(srv._on_handle_closed)
end

-- Immediate close: the client is gone or misbehaves; queued output is dropped.
function Conn:abort()
  if not self.closed then
    self:detach()
  end
  self:close_handle()
end

local function on_shutdown(conn)
  conn.shut = true
  if conn.peer_eof or conn.srv._closing then
    conn:close_handle()
  end
end

-- Graceful close: queued output is flushed, then FIN; the handle closes when the client closes
-- its side or the linger time passes.
function Conn:shutdown()
  if self.closed then
    return
  end
  self:detach()
  self.lingering = true
  self:deadline(LINGER, uv_now() + LINGER_MS)
  if not self.tcp:shutdown(function() on_shutdown(self) end) then
    self:close_handle()
  end
end

local function resume_pending(self)
  local queue = self._resume
  self._resume = {}
  self._resume_idle:stop()
  for i = 1, #queue do
    local conn = queue[i]
    if not conn.closed and not conn.res and not conn.paused and not conn.busy then
      conn:process()
    end
  end
end

-- Queues a connection whose pending response just finished, to parse its next buffered
-- request once the current call stack (a publish waking many subscribers) has returned.
local function resume_later(self, conn)
  if not self._resume_idle then
    return -- closed: connections finish with their current response
  end
  local queue = self._resume
  queue[#queue + 1] = conn
  if #queue == 1 then
    self._resume_idle:start(function()
      resume_pending(self)
    end)
  end
end

-- Called by the response once it is complete.
function Conn:response_done(res, keep)
  if self.res == res then
    self.res = nil
  end
  if not keep then
    return self:shutdown()
  end
  -- Inside process() the loop picks up the next request itself. A later send (a long poll
  -- answered by a publish) restarts it, but never from inside that send: a pipelined request
  -- run there would run inside the publish that woke this connection, and its own publish
  -- would reach add-ons and streams before the first one's. It runs on the next loop turn.
  if not self.busy then
    resume_later(self.srv, self)
  end
end

-- Answers a request that could not be parsed (or timed out) and closes.
function Conn:fail(status, message)
  if not self.closed then
    response.new(self, nil):send(status, { error = message })
  end
end

function Conn:on_read(err, data)
  if err then
    return self:abort() -- reset or similar: nothing more can be written either
  end
  if not data then
    if self.lingering then
      self.peer_eof = true
      if self.shut then
        self:close_handle()
      end
    elseif self.res then
      -- The client left while its answer was pending: forget it now (long-poll subscribers).
      self:abort()
    else
      self.peer_eof = true
      self:shutdown()
    end
    return
  end
  if self.closed then
    return -- lingering: drop what the client still sends
  end
  local p = self.parser
  if not p then
    -- the connection's parser, put aside while a long poll waited (or a new one)
    p = self.spare_parser or parser.new(self.srv.limits)
    self.parser, self.spare_parser = p, nil
  end
  p:push(data)
  if self.res or self.paused then
    -- Requests pipelined behind a pending response wait in the buffer; more than one maximal
    -- request of them is abuse.
    local limits = self.srv.limits
    if p:buffered() > limits.max_header_bytes + limits.max_body_bytes then
      self:abort()
    end
    return
  end
  self:process()
end

local function on_drained(conn)
  conn.paused = false
  if not conn.closed and not conn.res then
    conn:process()
  end
end

-- Parses and dispatches buffered requests, strictly one at a time: the next request is not
-- touched while a response is pending, so pipelined answers keep their order.
function Conn:process()
  local p, srv = self.parser, self.srv
  if not p then
    -- Nothing was received since the last request (a parser is made when bytes arrive).
    self:deadline(IDLE, uv_now() + srv.keepalive_timeout_ms)
    return
  end
  self.busy = true
  -- Every pass dispatches a request taken from the buffer or leaves: bounded by its size.
  while not self.closed and not self.res do
    -- self.queued: some output did not fit in the socket at once (see Conn:write).
    if self.queued then
      local backlog = self.tcp:get_write_queue_size()
      if backlog > WRITE_HIGH_WATER then
        -- Writes complete in order, so an empty write's callback means the backlog is gone.
        self.paused = true
        self.tcp:write("", function() on_drained(self) end)
        -- a client that does not read for a whole keep-alive period holds its queued output
        -- no longer: without this, 10,000 such clients could pin gigabytes
        self:deadline(IDLE, uv_now() + srv.keepalive_timeout_ms)
        break
      end
      self.queued = backlog > 0
    end
    local req, status, message = p:parse()
    if req then
      self:dispatch(req)
      if status == 0 then
        -- Nothing is buffered behind it: wait for the next request (unless this one waits).
        if not self.closed and not self.res then
          self:deadline(IDLE, uv_now() + srv.keepalive_timeout_ms)
        end
        break
      end
    elseif status then
      self:fail(status, message)
    else
      local now = uv_now()
      local head = p.head
      if head then
        if head.expect_continue and not self.continued then
          self.continued = true
          self:write(CONTINUE)
        end
        self:deadline(BODY, now + srv.header_timeout_ms)
      elseif p:buffered() > 0 then
        if self.dl_kind ~= HEADER then
          self:deadline(HEADER, now + srv.header_timeout_ms)
        end
      else
        self:deadline(IDLE, now + srv.keepalive_timeout_ms)
      end
      break
    end
  end
  self.busy = false
end

function Conn:dispatch(parsed)
  local srv = self.srv
  srv._timed[self] = nil
  self.dl_kind, self.continued = nil, false
  local req, err = request.new(parsed, self.remote_addr)
  local res = response.new(self, req or parsed)
  self.res = res
  if not req then
    res:send(400, { error = err })
    return
  end
  local handler, allow = srv:find_handler(req)
  if handler then
    local ok, herr = xpcall(handler, traceback, req, res)
    if not ok then
      log(srv, "error", "handler error", { method = req.method, path = req.path, error = herr })
      if not res.sent then
        res:send(500, { error = "internal server error" })
      elseif not res._done then
        self:abort() -- a stream broken halfway cannot be completed
      end
    end
  elseif allow then
    res:set_header("Allow", allow)
    res:send(405, { error = "method not allowed" })
  else
    res:send(404, { error = "not found" })
  end
  -- A long poll may wait for minutes: an empty parser need not keep buffers while it does.
  -- It is put aside (not dropped: a parser per request would cost an allocation and a
  -- finalizer each), and with no parser, process() knows nothing was received since.
  local p = self.parser
  if self.res == res and p and not p:in_progress() then
    p:close()
    self.parser, self.spare_parser = nil, p
  end
end

---------------------------------------------------------------------------------------------
-- Static files

local function close_fd(fd)
  uv.fs_close(fd, function() end)
end

-- Reads a whole regular file with async uv.fs calls; done(data) or done(nil, status).
local function read_file(path, done)
  uv.fs_open(path, "r", 0, function(oerr, fd)
    if oerr then
      return done(nil, find(oerr, "^ENOENT") and 404 or find(oerr, "^ENOTDIR") and 404 or 500)
    end
    uv.fs_fstat(fd, function(serr, stat)
      if serr or stat.type ~= "file" then
        close_fd(fd)
        return done(nil, serr and 500 or 404)
      end
      local parts, got, size = {}, 0, stat.size
      local function step()
        -- Each read returns at least one byte or ends the loop, so it is bounded by the size.
        if got >= size then
          close_fd(fd)
          return done(concat(parts), nil, stat)
        end
        uv.fs_read(fd, size - got, got, function(rerr, chunk)
          if rerr or not chunk or #chunk == 0 then
            close_fd(fd)
            return done(nil, 500)
          end
          parts[#parts + 1] = chunk
          got = got + #chunk
          step()
        end)
      end
      step()
    end)
  end)
end

local function serve_static(mount, req, res)
  local rel = sub(req.path, #mount.prefix + 1)
  -- req.path is already percent-decoded, so "%2e%2e", "%00" and "%5c" are caught here too.
  if find(rel, "%z") or find(rel, "\\", 1, true) then
    return res:send(400, { error = "invalid path" })
  end
  for segment in gmatch(rel, "[^/]+") do
    if sub(segment, 1, 1) == "." then -- "..", "." and hidden files
      return res:send(404, { error = "not found" })
    end
  end
  if rel == "" or sub(rel, -1) == "/" then
    rel = rel .. "index.html"
  end
  local path = mount.dir .. "/" .. rel
  read_file(path, function(data, status, stat)
    if not data then
      return res:send(status, { error = status == 404 and "not found" or "cannot read file" })
    end
    res:set_header("Content-Type", util.mime_type(path))
    res:set_header("Last-Modified", util.http_date(stat.mtime.sec))
    res:send(200, data)
  end)
end

---------------------------------------------------------------------------------------------
-- Server

local function check_options(options)
  if options ~= nil and type(options) ~= "table" then
    return nil, "options must be a table"
  end
  options = options or {}
  for k in pairs(options) do
    if DEFAULTS[k] == nil and k ~= "logger" then
      return nil, "unknown option '" .. tostring(k) .. "'"
    end
  end
  local o = {}
  for k, default in pairs(DEFAULTS) do
    local v = options[k]
    if v == nil then
      v = default
    end
    if k == "host" then
      if type(v) ~= "string" or v == "" then
        return nil, "option 'host' must be an IP address string"
      end
    elseif math.type(v) ~= "integer" then
      return nil, "option '" .. k .. "' must be an integer"
    elseif k == "port" then
      if v < 0 or v > 65535 then
        return nil, "option 'port' must be 0-65535"
      end
    elseif v < 1 then
      return nil, "option '" .. k .. "' must be positive"
    end
    o[k] = v
  end
  if options.logger ~= nil and type(options.logger) ~= "function" then
    return nil, "option 'logger' must be a function"
  end
  o.logger = options.logger
  return o
end

function server.new(options)
  local o, err = check_options(options)
  if not o then
    return nil, err
  end
  local srv = setmetatable({
    host = o.host,
    port = o.port,
    limits = {
      max_header_bytes = o.max_header_bytes,
      max_body_bytes = o.max_body_bytes,
      max_url_bytes = o.max_url_bytes,
    },
    header_timeout_ms = o.header_timeout_ms,
    keepalive_timeout_ms = o.keepalive_timeout_ms,
    max_connections = o.max_connections,
    logger = o.logger,
    _routes = {}, -- path -> { methods = { METHOD = handler }, allow = "GET, HEAD" }
    _statics = {}, -- { prefix, dir, handler }, longest prefix first
    _conns = {}, -- conn -> true, every accepted connection whose handle is open
    _timed = {}, -- conn -> deadline (uv.now() ms); only connections that have one
    _count = 0, -- live connections counted against max_connections
    _handles = 0, -- open uv handles (listener, sweep timer, connections)
    _closing = false,
    _resume = {}, -- connections whose next request waits for the next loop turn
  }, Server)
  srv._on_handle_closed = function()
    srv._handles = srv._handles - 1
    srv:maybe_closed()
  end
  return srv
end

function Server:route(method, path, handler)
  if type(method) ~= "string" or not (method == "*" or find(method, "^[%w!#$%%&'*+.^_`|~-]+$")) then
    error("route: invalid method", 2)
  end
  if type(path) ~= "string" or sub(path, 1, 1) ~= "/" then
    error("route: path must start with '/'", 2)
  end
  if type(handler) ~= "function" then
    error("route: handler must be a function", 2)
  end
  local route = self._routes[path]
  if not route then
    route = { methods = {} }
    self._routes[path] = route
  end
  route.methods[method] = handler
  local allow = {}
  for m in pairs(route.methods) do
    if m ~= "*" then
      allow[#allow + 1] = m
    end
  end
  if route.methods.GET and not route.methods.HEAD then
    allow[#allow + 1] = "HEAD"
  end
  sort(allow)
  route.allow = concat(allow, ", ")
end

function Server:static(prefix, dir)
  if type(prefix) ~= "string" or sub(prefix, 1, 1) ~= "/" then
    error("static: prefix must start with '/'", 2)
  end
  if type(dir) ~= "string" or dir == "" then
    error("static: dir must be a directory path", 2)
  end
  if sub(prefix, -1) ~= "/" then
    prefix = prefix .. "/"
  end
  dir = dir:gsub("(.)/+$", "%1")
  local mount = { prefix = prefix, dir = dir }
  mount.handler = function(req, res)
    return serve_static(mount, req, res)
  end
  local statics = self._statics
  statics[#statics + 1] = mount
  sort(statics, function(a, b)
    return #a.prefix > #b.prefix
  end)
end

-- handler, or nil, allow (known path, other method), or nil (unknown path).
function Server:find_handler(req)
  local path, method = req.path, req.method
  local route = self._routes[path]
  if route then
    local methods = route.methods
    local h = methods[method] or (method == "HEAD" and methods.GET) or methods["*"]
    if h then
      return h
    end
    return nil, route.allow
  end
  local statics = self._statics
  for i = 1, #statics do
    local mount = statics[i]
    if sub(path, 1, #mount.prefix) == mount.prefix then
      if method ~= "GET" and method ~= "HEAD" then
        return nil, "GET, HEAD"
      end
      return mount.handler
    end
  end
  return self._fallback
end

-- Handler for requests no route or static mount matches: an application's
-- own router (patterns, path parameters) goes here.
function Server:fallback(handler)
  if type(handler) ~= "function" then
    error("fallback: handler must be a function", 2)
  end
  self._fallback = handler
end

function Server:accept(err)
  if err then
    log(self, "warn", "accept failed", { error = err })
    return
  end
  if self._closing then
    return
  end
  local tcp = uv.new_tcp()
  local ok, aerr = self._tcp:accept(tcp)
  if not ok then
    tcp:close()
    log(self, "warn", "accept failed", { error = aerr })
    return
  end
  self._handles = self._handles + 1
  local conn = setmetatable({ srv = self, tcp = tcp, closed = false }, Conn)
  self._conns[conn] = true
  tcp:read_start(function(rerr, data)
    conn:on_read(rerr, data)
  end)
  if self._count >= self.max_connections then
    log(self, "warn", "too many connections", { max_connections = self.max_connections })
    conn:fail(503, "too many connections")
    return
  end
  self._count = self._count + 1
  conn.counted = true
  tcp:nodelay(true)
  local peer = tcp:getpeername()
  if peer then
    conn.remote_addr = peer.family == "inet6" and ("[" .. peer.ip .. "]:" .. peer.port)
      or (peer.ip .. ":" .. peer.port)
  end
  conn.parser = parser.new(self.limits)
  -- A fresh connection that sends nothing is closed silently after header_timeout_ms.
  conn:deadline(IDLE, uv_now() + self.header_timeout_ms)
end

function Server:sweep()
  local now, expired = uv_now(), nil
  for conn, at in pairs(self._timed) do
    if now >= at then
      expired = expired or {}
      expired[#expired + 1] = conn
    end
  end
  if not expired then
    return
  end
  -- Acting after the traversal: closing a connection adds and removes _timed entries.
  for i = 1, #expired do
    local conn = expired[i]
    local kind = conn.dl_kind
    self._timed[conn] = nil
    if kind == LINGER then
      conn:close_handle()
    elseif kind == IDLE then
      conn:abort()
    else
      conn:fail(408, "request timeout")
    end
  end
end

-- While any server listens, the process-wide SIGPIPE guard (longpoll.sigpipe) is held, so a
-- write to a socket the peer has reset fails with EPIPE and only that connection is dropped.

function Server:listen()
  if self._tcp then
    return nil, "already listening"
  end
  if self._closing then
    return nil, "server closed"
  end
  local tcp = uv.new_tcp()
  local ok, err = tcp:bind(self.host, self.port)
  if ok then
    ok, err = tcp:listen(BACKLOG, function(aerr)
      self:accept(aerr)
    end)
  end
  if not ok then
    tcp:close()
    return nil, "cannot listen on " .. self.host .. ":" .. self.port .. ": " .. tostring(err)
  end
  self._tcp = tcp
  self._handles = self._handles + 1
  self.port = tcp:getsockname().port
  -- One timer for all deadlines; its period scales with the shortest timeout so short test
  -- timeouts stay accurate, and it is unref'd so it never keeps the loop alive by itself.
  local shortest = math.min(self.header_timeout_ms, self.keepalive_timeout_ms)
  local period = math.max(10, math.min(1000, shortest // 4))
  local timer = uv.new_timer()
  timer:start(period, period, function()
    self:sweep()
  end)
  timer:unref()
  self._timer = timer
  self._handles = self._handles + 1
  self._resume_idle = uv.new_idle()
  self._handles = self._handles + 1
  sigpipe.hold()
  self._holds_sigpipe = true
  log(self, "info", "listening", { host = self.host, port = self.port })
  return self.port
end

function Server:connection_count()
  return self._count
end

function Server:maybe_closed()
  if not self._closing then
    return
  end
  -- The sweep timer outlives the connections (it cuts those whose output is never read, see
  -- close()); it goes once it is the last handle.
  local timer = self._timer
  if timer and self._handles == 1 then
    self._timer = nil
    timer:close(self._on_handle_closed)
    return
  end
  if self._handles == 0 and self._holds_sigpipe then
    self._holds_sigpipe = false
    if sigpipe.release(function() self:maybe_closed() end) then
      return
    end
  end
  local cb = self._close_cb
  if self._handles == 0 and cb then
    self._close_cb = nil
    cb()
  end
end

-- Stops accepting and closes idle connections now; a connection whose response is in progress
-- closes once that response is written. callback() runs when every handle is closed.
function Server:close(callback)
  self._closing = true
  self._close_cb = callback or self._close_cb
  if self._tcp then
    self._tcp:close(self._on_handle_closed)
    self._tcp = nil
  end
  if self._resume_idle then
    -- a closing server keeps no connection alive: nothing is resumed any more
    self._resume = {}
    self._resume_idle:close(self._on_handle_closed)
    self._resume_idle = nil
  end
  -- The sweep timer keeps running: a connection closed below lingers at most LINGER_MS, even
  -- when its client never reads the output still queued (which would hold the close forever).
  local conns = {}
  for conn in pairs(self._conns) do
    conns[#conns + 1] = conn
  end
  for i = 1, #conns do
    local conn = conns[i]
    if conn.lingering then
      if conn.shut then
        conn:close_handle()
      end
    elseif not conn.res then
      conn:shutdown() -- flushes a response that may still be queued
    end
  end
  self:maybe_closed()
end

return server
