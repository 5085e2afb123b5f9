-- The response object handlers answer through: send() for a whole body, write_head/write/finish
-- for streams. It may be answered long after the handler returned (long poll); the connection
-- (longpoll.server) is told through conn:write(), conn:response_done() and conn:abort().
local cjson = require "cjson"
local util = require "longpoll.http.util"

local find, lower, format, tostring, type = string.find, string.lower, string.format, tostring, type
local encode, status_text, http_date = cjson.encode, util.status_text, util.http_date

local response = {}

-- A streaming client that lets this much pile up unread is cut off rather than buffered forever.
local MAX_STREAM_BACKLOG = 8 * 1024 * 1024

local Response = {}
Response.__index = Response

-- conn: the connection (longpoll.server); req: the request, or nil for errors found while parsing
-- (those always close the connection).
function response.new(conn, req)
  return setmetatable({ _conn = conn, _req = req, sent = false }, Response)
end

-- Headers are a flat list { lname, name, value, ... }: a handful per response, set once each,
-- so a linear search is cheaper than a hash table and keeps their order and spelling.
function Response:set_header(name, value)
  value = tostring(value)
  if not find(name, "^[%w!#$%%&'*+.^_`|~-]+$") then
    error("invalid header name: " .. tostring(name), 2)
  end
  if find(value, "[\r\n%z]") then
    error("invalid header value for " .. name, 2)
  end
  local lname = lower(name)
  local h = self._h
  if not h then
    self._h = { lname, name, value }
    return
  end
  for i = 1, #h, 3 do
    if h[i] == lname then
      h[i + 1], h[i + 2] = name, value
      return
    end
  end
  h[#h + 1], h[#h + 2], h[#h + 3] = lname, name, value
end

function Response:get_header(name)
  local h = self._h
  if h then
    local lname = lower(name)
    for i = 1, #h, 3 do
      if h[i] == lname then
        return h[i + 2]
      end
    end
  end
  return nil
end

-- fn() runs once if the client goes away before the response is complete.
function Response:on_close(fn)
  self._on_close = fn
end

function Response:is_open()
  return not self._conn.closed
end

local status_lines = setmetatable({}, {
  __index = function(t, status)
    local line = "HTTP/1.1 " .. status .. " " .. (status_text[status] or "Unknown") .. "\r\n"
    t[status] = line
    return line
  end,
})

-- Whether the connection stays open after this response, given the request and the handler's
-- own "Connection: close".
local function check_status(status)
  if math.type(status) ~= "integer" or status < 100 or status > 999 then
    error("invalid HTTP status: " .. tostring(status), 3)
  end
end

local function keep_alive(self)
  local req = self._req
  if not req or not req.keep_alive or not self._conn:may_keep_alive() then
    return false
  end
  local c = self:get_header("connection")
  return not (c and find(lower(c), "close", 1, true))
end

-- framing: "Content-Length: n\r\n" or "Transfer-Encoding: chunked\r\n" or "".
local function build_head(self, status, framing, keep)
  local lines = ""
  local h = self._h
  if h then
    for i = 1, #h, 3 do
      local lname = h[i]
      if lname ~= "content-length" and lname ~= "transfer-encoding" and lname ~= "connection" then
        lines = lines .. h[i + 1] .. ": " .. h[i + 2] .. "\r\n"
      end
    end
  end
  local req = self._req
  local connection
  if keep then
    connection = req.version == "1.0" and "Connection: keep-alive\r\n" or ""
  else
    connection = "Connection: close\r\n"
  end
  return status_lines[status] .. lines .. framing .. "Date: " .. http_date() .. "\r\n"
    .. connection .. "\r\n"
end

-- Answers with a whole body: a string, or a table sent as JSON. Returns true, or nil, message
-- ("already sent", "closed").
function Response:send(status, body)
  check_status(status)
  if self.sent then
    return nil, "already sent"
  end
  local conn = self._conn
  if conn.closed then
    return nil, "closed"
  end
  local bt = type(body)
  if bt == "table" then
    body = encode(body)
    if not self:get_header("content-type") then
      self:set_header("Content-Type", "application/json")
    end
  elseif body == nil then
    body = ""
  elseif bt ~= "string" then
    error("response body must be a string or a table", 2)
  end
  self.sent, self._done = true, true
  local req = self._req
  local keep = keep_alive(self)
  local no_body = status < 200 or status == 204 or status == 304
  local framing = ""
  if not no_body then
    framing = "Content-Length: " .. #body .. "\r\n"
    if #body > 0 and not self:get_header("content-type") then
      self:set_header("Content-Type", "text/plain; charset=utf-8")
    end
  end
  local head = build_head(self, status, framing, keep)
  if no_body or #body == 0 or (req and req.method == "HEAD") then
    conn:write(head)
  else
    conn:write({ head, body })
  end
  conn:response_done(self, keep)
  return true
end

-- Starts a streamed response of unknown length: chunked on HTTP/1.1; on HTTP/1.0 the end of the
-- body is the end of the connection.
function Response:write_head(status)
  check_status(status)
  if self.sent then
    return nil, "already sent"
  end
  local conn = self._conn
  if conn.closed then
    return nil, "closed"
  end
  self.sent = true
  local req = self._req
  local chunked = req.version == "1.1"
  self._chunked = chunked
  self._keep = chunked and keep_alive(self)
  self._head_only = req.method == "HEAD"
  conn:write(build_head(self, status, chunked and "Transfer-Encoding: chunked\r\n" or "",
    self._keep))
  return true
end

function Response:write(chunk)
  if not self.sent then
    return nil, "write_head not called"
  end
  if self._done then
    return nil, "finished"
  end
  local conn = self._conn
  if conn.closed then
    return nil, "closed"
  end
  if #chunk == 0 or self._head_only then
    return true
  end
  if conn:backlog() > MAX_STREAM_BACKLOG then
    conn:abort()
    return nil, "client too slow"
  end
  if self._chunked then
    conn:write({ format("%x\r\n", #chunk), chunk, "\r\n" })
  else
    conn:write(chunk)
  end
  return true
end

function Response:finish()
  if not self.sent then
    return nil, "write_head not called"
  end
  if self._done then
    return nil, "finished"
  end
  self._done = true
  local conn = self._conn
  if conn.closed then
    return nil, "closed"
  end
  if self._chunked and not self._head_only then
    conn:write("0\r\n\r\n")
  end
  conn:response_done(self, self._keep)
  return true
end

return response
