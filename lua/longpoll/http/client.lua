-- A small HTTP/1.1 client connection on luv for longpoll.client: one request at a time,
-- keep-alive reuse, Content-Length / chunked / until-close bodies, a deadline per request,
-- and cancellation by closing (no callback runs after close()).
local uv = require "luv"

local find, sub, lower, match, format, concat = string.find, string.sub, string.lower, string.match,
  string.format, table.concat
local tonumber, tostring, setmetatable = tonumber, tostring, setmetatable

local http_client = {}

local MAX_HEAD_BYTES = 65536
local DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024

-- Splits "http://host[:port][/path][?query]" into { host, port, target, authority };
-- nil, message for anything else (https, credentials in the URL, a bad port).
function http_client.parse_url(url)
  if type(url) ~= "string" then
    return nil, "must be a string"
  end
  local rest = match(url, "^[hH][tT][tT][pP]://(.*)$")
  if not rest then
    if find(url, "^%a[%w+.-]*://") then
      return nil, "only http:// URLs are supported"
    end
    return nil, "must be an absolute http:// URL"
  end
  rest = match(rest, "^([^#]*)")
  local authority, target = match(rest, "^([^/?]*)(.*)$")
  if find(authority, "@", 1, true) then
    return nil, "credentials in the URL are not supported (use basic_auth)"
  end
  local host, port
  if sub(authority, 1, 1) == "[" then
    host, port = match(authority, "^%[([%x:.]+)%]:?(%d*)$")
  else
    host, port = match(authority, "^([^:]+):?(%d*)$")
  end
  if not host or host == "" then
    return nil, "has no valid host"
  end
  if port == "" then
    port = 80
  else
    port = tonumber(port)
    if not port or port < 1 or port > 65535 then
      return nil, "has an invalid port"
    end
  end
  if find(target, "[%s%z]") then
    return nil, "contains spaces or control characters"
  end
  if target == "" then
    target = "/"
  elseif sub(target, 1, 1) == "?" then
    target = "/" .. target
  end
  return { host = host, port = port, target = target, authority = authority }
end

---------------------------------------------------------------------------------------------
-- Response parsing

-- Parses a response head; returns { status, headers, version } or nil, message.
local function parse_head(head)
  local _, e, minor, status = find(head, "^HTTP/1%.(%d) (%d%d%d)[^\r\n]*\r\n")
  if not status then
    return nil, "malformed status line"
  end
  local headers = {}
  for name, value in string.gmatch(sub(head, e + 1), "([^:\r\n]+):[ \t]*([^\r\n]-)[ \t]*\r\n") do
    name = lower(name)
    local old = headers[name]
    headers[name] = old and (old .. ", " .. value) or value
  end
  return { status = tonumber(status), headers = headers, minor = tonumber(minor) }
end

local function wants_keep_alive(res)
  local connection = lower(res.headers.connection or "")
  if find(connection, "close", 1, true) then
    return false
  end
  return res.minor >= 1 or find(connection, "keep-alive", 1, true) ~= nil
end

---------------------------------------------------------------------------------------------
-- Connection

local Connection = {}
Connection.__index = Connection

-- http_client.connection{ host, port, max_body_bytes } -> connection (no socket yet).
function http_client.connection(options)
  return setmetatable({
    host = options.host,
    port = options.port,
    max_body_bytes = options.max_body_bytes or DEFAULT_MAX_BODY_BYTES,
    tcp = nil, -- the socket, while open
    alive = false, -- the socket is connected and idle between requests
    current = nil, -- the exchange in flight
    timer = nil,
    closed = false,
  }, Connection)
end

function Connection:busy()
  return self.current ~= nil
end

function Connection:drop_socket()
  local tcp = self.tcp
  self.tcp, self.alive = nil, false
  if tcp and not tcp:is_closing() then
    tcp:close()
  end
end

-- Ends the exchange: stops its deadline and calls its callback (once).
function Connection:finish(ex, res, err)
  if self.current ~= ex then
    return
  end
  self.current = nil
  if self.timer then
    self.timer:stop()
  end
  if not res then
    self:drop_socket()
  end
  ex.callback(res, err)
end

-- A reused keep-alive socket may have been closed by the server just before we wrote; a GET
-- that got no byte back is then sent again, once, on a fresh socket.
function Connection:retry_or_fail(ex, err)
  if ex.reused and ex.received == 0 and ex.request.method == "GET" then
    ex.reused = false
    self:drop_socket()
    return self:open(ex)
  end
  self:finish(ex, nil, err)
end

local function body_done(self, ex, body)
  local res = ex.response
  res.body = body
  local keep = ex.keep
  self.current = nil
  if self.timer then
    self.timer:stop()
  end
  if keep and self.tcp then
    self.alive = true
    self.tcp:unref() -- an idle keep-alive socket must not keep the loop running
  else
    self:drop_socket()
  end
  ex.callback(res)
end

-- Consumes what the chunked body holds so far; true when the last chunk was read.
local function read_chunks(self, ex)
  local buf, pos = ex.buf, ex.pos
  -- Each pass consumes one whole chunk or returns for more data.
  while true do
    local s, e = find(buf, "\r\n", pos, true)
    if not s then
      if #buf - pos > 1024 then
        return nil, "malformed chunk size"
      end
      break
    end
    local size = tonumber(match(sub(buf, pos, s - 1), "^%x+"), 16)
    if not size then
      return nil, "malformed chunk size"
    end
    if size == 0 then
      -- optional trailer lines, then an empty line
      local te = find(buf, "\r\n\r\n", s, true)
      if te then
        ex.pos = te + 4
        return true
      end
      break
    end
    if #buf < e + size + 2 then
      break
    end
    ex.chunks[#ex.chunks + 1] = sub(buf, e + 1, e + size)
    ex.size = ex.size + size
    if ex.size > self.max_body_bytes then
      return nil, "response body too large"
    end
    pos = e + size + 3
  end
  ex.buf, ex.pos = sub(buf, pos), 1
  return false
end

function Connection:feed(ex, data)
  ex.received = ex.received + #data
  if not ex.response then
    ex.buf = ex.buf .. data
    local s, e = find(ex.buf, "\r\n\r\n", 1, true)
    if not s then
      if #ex.buf > MAX_HEAD_BYTES then
        return self:finish(ex, nil, "response head too large")
      end
      return
    end
    local res, err = parse_head(sub(ex.buf, 1, e))
    if not res then
      return self:finish(ex, nil, err)
    end
    data = sub(ex.buf, e + 1)
    ex.buf = ""
    if res.status < 200 then
      -- 100 Continue and friends: the real answer follows
      if data ~= "" then
        ex.received = ex.received - #data
        return self:feed(ex, data)
      end
      return
    end
    ex.response = res
    ex.keep = wants_keep_alive(res)
    local te = lower(res.headers["transfer-encoding"] or "")
    if ex.request.method == "HEAD" or res.status == 204 or res.status == 304 then
      return body_done(self, ex, "")
    elseif te ~= "" then
      if not find(te, "chunked%s*$") then
        return self:finish(ex, nil, "unsupported transfer-encoding: " .. te)
      end
      ex.chunked, ex.buf, ex.pos = true, "", 1
    elseif res.headers["content-length"] then
      local cl = match(res.headers["content-length"], "^%d+$") and tonumber(res.headers["content-length"])
      if not cl then
        return self:finish(ex, nil, "invalid content-length")
      end
      if cl > self.max_body_bytes then
        return self:finish(ex, nil, "response body too large")
      end
      ex.length = cl
    else
      ex.keep = false -- the body ends when the server closes
    end
    if data == "" and ex.length ~= 0 then
      return
    end
  end
  if ex.chunked then
    ex.buf = ex.buf .. data
    local done, err = read_chunks(self, ex)
    if err then
      return self:finish(ex, nil, err)
    elseif done then
      return body_done(self, ex, concat(ex.chunks))
    end
    return
  end
  if data ~= "" then
    ex.chunks[#ex.chunks + 1] = data
    ex.size = ex.size + #data
  end
  if ex.length then
    if ex.size >= ex.length then
      local body = concat(ex.chunks)
      -- Bytes past the body would be a pipelined answer we never asked for.
      if #body > ex.length then
        ex.keep = false
        body = sub(body, 1, ex.length)
      end
      return body_done(self, ex, body)
    end
  elseif ex.size > self.max_body_bytes then
    return self:finish(ex, nil, "response body too large")
  end
end

function Connection:on_eof(ex, err)
  if ex.response and not ex.length and not ex.chunked and not err then
    return body_done(self, ex, concat(ex.chunks)) -- a body delimited by the close
  end
  local reason = err or "connection closed by server"
  if ex.response then
    reason = "connection closed in the middle of the response"
  end
  return self:retry_or_fail(ex, reason)
end

function Connection:start_reading(tcp)
  tcp:read_start(function(err, data)
    if self.tcp ~= tcp then
      return
    end
    local ex = self.current
    if not ex then
      -- idle: the server closed (or sent garbage); forget the socket
      return self:drop_socket()
    end
    if err then
      return self:on_eof(ex, tostring(err))
    elseif data then
      return self:feed(ex, data)
    end
    return self:on_eof(ex, nil)
  end)
end

function Connection:send(ex)
  local tcp = self.tcp
  tcp:ref()
  self.alive = false
  ex.received, ex.buf, ex.chunks, ex.size = 0, "", {}, 0
  ex.response, ex.length, ex.chunked = nil, nil, nil
  local ok, err = tcp:write(ex.bytes, function(werr)
    if werr and self.tcp == tcp and self.current == ex then
      self:retry_or_fail(ex, "write failed: " .. tostring(werr))
    end
  end)
  if not ok then
    self:retry_or_fail(ex, "write failed: " .. tostring(err))
  end
end

local function is_ip_literal(host)
  return match(host, "^%d+%.%d+%.%d+%.%d+$") ~= nil or find(host, ":", 1, true) ~= nil
end

function Connection:connect_to(ex, ip)
  local tcp = uv.new_tcp()
  self.tcp = tcp
  local ok, err = tcp:connect(ip, self.port, function(cerr)
    if self.tcp ~= tcp or self.current ~= ex then
      return
    end
    if cerr then
      return self:finish(ex, nil, format("cannot connect to %s:%d: %s", self.host, self.port, cerr))
    end
    tcp:nodelay(true)
    self:start_reading(tcp)
    self:send(ex)
  end)
  if not ok then
    self:finish(ex, nil, format("cannot connect to %s:%d: %s", self.host, self.port, tostring(err)))
  end
end

function Connection:open(ex)
  if is_ip_literal(self.host) then
    return self:connect_to(ex, self.host)
  end
  uv.getaddrinfo(self.host, nil, { socktype = "stream" }, function(err, addrs)
    if self.closed or self.current ~= ex then
      return
    end
    if err or not addrs or not addrs[1] then
      return self:finish(ex, nil, format("cannot resolve %s: %s", self.host, tostring(err or "no address")))
    end
    self:connect_to(ex, addrs[1].addr)
  end)
end

-- Sends one request: request = { method, target, headers = { {name, value}, ... }, body,
-- timeout_ms }. callback(response) with response = { status, headers (lower-case names),
-- body }, or callback(nil, message). Raises when a request is already in flight.
function Connection:request(request, callback)
  if self.closed then
    error("http client connection is closed", 2)
  end
  if self.current then
    error("http client connection is busy", 2)
  end
  local lines = { request.method .. " " .. request.target .. " HTTP/1.1" }
  local port_part = self.port == 80 and "" or (":" .. self.port)
  local host = find(self.host, ":", 1, true) and ("[" .. self.host .. "]") or self.host
  lines[#lines + 1] = "Host: " .. host .. port_part
  local headers = request.headers or {}
  for i = 1, #headers do
    lines[#lines + 1] = headers[i][1] .. ": " .. headers[i][2]
  end
  local body = request.body
  if body or request.method == "POST" or request.method == "PUT" then
    lines[#lines + 1] = "Content-Length: " .. #(body or "")
  end
  local ex = {
    request = request,
    callback = callback,
    bytes = concat(lines, "\r\n") .. "\r\n\r\n" .. (body or ""),
    reused = false,
    received = 0,
  }
  self.current = ex
  if request.timeout_ms then
    self.timer = self.timer or uv.new_timer()
    self.timer:start(request.timeout_ms, 0, function()
      self:finish(ex, nil, format("no answer within %d ms", request.timeout_ms))
    end)
  end
  if self.tcp and self.alive then
    ex.reused = true
    self:send(ex)
  else
    self:drop_socket()
    self:open(ex)
  end
end

-- Cancels the request in flight (its callback never runs) and closes the socket. The
-- connection can be used again unless `final` is true.
function Connection:close(final)
  self.current = nil
  self:drop_socket()
  if self.timer then
    self.timer:stop()
  end
  if final then
    self.closed = true
    if self.timer and not self.timer:is_closing() then
      self.timer:close()
    end
    self.timer = nil
  end
end

return http_client
