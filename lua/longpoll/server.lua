-- HTTP/1.1 server: routes and the fallback, in Lua; the connections themselves (accept, read,
-- parse, keep-alive, pipelining, limits, deadlines, writes) are the C engine on luv's loop
-- (core.http_server, src/lp_lua_server.c + src/lp_conn.c), which serves static mounts itself
-- (src/lp_lua_static.c), hands every other whole request to dispatch() below and takes the
-- answer back through the response object.
require "luv" -- the engine runs on luv's loop: luv must be loaded first
local core = require "longpoll.core"
local request = require "longpoll.http.request"
local response = require "longpoll.http.response"
local native = require "longpoll.http.native"

local find, sub, concat, sort = string.find, string.sub, table.concat, table.sort
local xpcall, traceback, pairs, type, tostring = xpcall, debug.traceback, pairs, type, tostring

local server = {}

local DEFAULTS = {
  host = "127.0.0.1",
  port = 0,
  max_header_bytes = 16384,
  max_body_bytes = 1048576,
  max_url_bytes = 8192,
  header_timeout_ms = 10000,
  keepalive_timeout_ms = 75000,
  max_connections = false, -- sized from the open-file limit (see default_caps)
  reserve_connections = false,
}

-- After our FIN, unread client bytes would make the kernel answer with RST, which can destroy the
-- response still in flight (an early 413, say); so they are read and dropped for this long,
-- counted from the moment the whole answer was written.
local LINGER_MS = 2000
-- Pipelined requests stop being answered while this much output waits for a slow reader.
local HIGH_WATER = 1024 * 1024
-- A write while this much output is still queued cuts the connection: it bounds what one client
-- that never reads can pin, whatever the kind of answer (long polls, streams, files).
local OUTPUT_BUDGET = 8 * 1024 * 1024
-- File descriptors kept out of the connection caps: the listener, the loop, log and persistence
-- files, Redis links, static files being sent.
local FD_SLACK = 128

local Server = {}
Server.__index = Server

local function log(srv, level, message, fields)
  local logger = srv.logger
  if logger then
    -- A failing logger must not take the event loop down with it.
    pcall(logger, level, message, fields)
  end
end

---------------------------------------------------------------------------------------------
-- Server

-- max_connections, reserve_connections: connections that may wait (long polls, streams), and
-- those above them that are served only when their answer is immediate (publishes, /stats,
-- catch-up polls), so waiting subscribers can never lock publishers out. Both come from the
-- open-file limit (raised to its hard limit first) unless given.
local function default_caps(max, reserve)
  local nofile = core.raise_nofile_limit() or 1024
  local usable = math.max(32, nofile - FD_SLACK)
  if not reserve then
    reserve = math.max(16, math.min(1024, (max or usable) // 10))
    if max then -- a cap given near the limit leaves the reserve what file descriptors remain
      reserve = math.min(reserve, math.max(0, usable - max))
    end
  end
  if not max then
    max = math.max(16, usable - reserve)
  end
  return max, reserve
end

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
    if v == false then -- computed below
      v = nil
    elseif k == "host" then
      if type(v) ~= "string" or v == "" then
        return nil, "option 'host' must be an IP address string"
      end
    elseif math.type(v) ~= "integer" then
      return nil, "option '" .. k .. "' must be an integer"
    elseif k == "port" then
      if v < 0 or v > 65535 then
        return nil, "option 'port' must be 0-65535"
      end
    elseif v < 1 and not (k == "reserve_connections" and v == 0) then
      return nil, "option '" .. k .. "' must be positive"
    end
    o[k] = v
  end
  if options.logger ~= nil and type(options.logger) ~= "function" then
    return nil, "option 'logger' must be a function"
  end
  o.logger = options.logger
  o.max_connections, o.reserve_connections = default_caps(o.max_connections, o.reserve_connections)
  return o
end

-- Runs the handler of one whole request (from the C engine). conn: the connection's handle.
local function dispatch(srv, conn, parsed)
  local req, err = request.new(parsed)
  local res = response.new(conn, req or parsed)
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
      elseif not res:is_finished() then
        conn:abort() -- a stream broken halfway cannot be completed
      end
    end
  elseif allow then
    res:set_header("Allow", allow)
    res:send(405, { error = "method not allowed" })
  else
    res:send(404, { error = "not found" })
  end
end

-- The client of a pending response left (or was cut off): its on_close runs once.
local function gone(srv, res)
  local ok, err = res:client_gone()
  if not ok then
    log(srv, "error", "on_close callback failed", { error = err })
  end
end

function server.new(options)
  local o, err = check_options(options)
  if not o then
    return nil, err
  end
  local srv = setmetatable({
    host = o.host,
    port = o.port,
    max_connections = o.max_connections,
    reserve_connections = o.reserve_connections,
    logger = o.logger,
    _routes = {}, -- path -> { methods = { METHOD = handler }, allow = "GET, HEAD" }
  }, Server)
  srv._engine = core.http_server({
    host = o.host,
    port = o.port,
    max_header_bytes = o.max_header_bytes,
    max_body_bytes = o.max_body_bytes,
    max_url_bytes = o.max_url_bytes,
    header_timeout_ms = o.header_timeout_ms,
    keepalive_timeout_ms = o.keepalive_timeout_ms,
    linger_ms = LINGER_MS,
    high_water = HIGH_WATER,
    output_budget = OUTPUT_BUDGET,
    max_connections = o.max_connections,
    reserve_connections = o.reserve_connections,
    dispatch = function(conn, parsed)
      dispatch(srv, conn, parsed)
    end,
    gone = function(res)
      gone(srv, res)
    end,
    log = function(level, message, fields)
      log(srv, level, message, fields)
    end,
  })
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
    self._engine:route_path(path) -- routes come before static mounts
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
  -- a GET or POST to a handler the engine can run itself (longpoll.http.native) is tried in C
  -- first, and so is an OPTIONS preflight to one under a CORS policy
  local methods = route.methods
  self._engine:native_route("GET", path, native.descriptor(methods.GET or methods["*"]))
  self._engine:native_route("POST", path, native.descriptor(methods.POST or methods["*"]))
  self._engine:native_route("OPTIONS", path, native.descriptor(methods.OPTIONS or methods["*"]))
end

-- options: { follow_symlinks = true } serves symlinks whose target is outside dir (refused by
-- default). The engine serves the mount in C (src/lp_lua_static.c): its requests never enter Lua.
function Server:static(prefix, dir, options)
  if type(prefix) ~= "string" or sub(prefix, 1, 1) ~= "/" then
    error("static: prefix must start with '/'", 2)
  end
  if type(dir) ~= "string" or dir == "" then
    error("static: dir must be a directory path", 2)
  end
  if options ~= nil and type(options) ~= "table" then
    error("static: options must be a table", 2)
  end
  if sub(prefix, -1) ~= "/" then
    prefix = prefix .. "/"
  end
  dir = dir:gsub("(.)/+$", "%1")
  self._engine:static_mount(prefix, dir, options ~= nil and options.follow_symlinks == true)
end

-- handler, or nil, allow (known path, other method), or nil (unknown path). Static mounts are
-- the engine's: their requests never reach Lua.
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

function Server:listen()
  local port, err = self._engine:listen()
  if not port then
    return nil, err
  end
  self.port = port
  log(self, "info", "listening", { host = self.host, port = port })
  return port
end

-- Connections counted against the caps (those refused with 503 are not).
function Server:connection_count()
  return self._engine:connection_count()
end

-- How many requests the engine answered itself, without entering Lua (longpoll.http.native).
function Server:fast_answers()
  return self._engine:fast_answers()
end

-- What each open connection is doing: { { id, phase = "reading"|"answering"|"closing",
-- paused, queued (output bytes not yet taken by the socket), buffered (received bytes not yet
-- part of a request), memory (parser bytes held), reserve }, ... }.
function Server:connections()
  return self._engine:connections()
end

-- Stops accepting and closes idle connections now; a connection whose response is in progress
-- closes once that response is written. callback() runs when every handle is closed.
function Server:close(callback)
  self._engine:close(callback)
end

return server
