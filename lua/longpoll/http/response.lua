-- The response object handlers answer through: send() for a whole body, write_head/write/finish
-- for streams. It may be answered long after the handler returned (long poll); the connection
-- (the C engine's handle, see longpoll.server) is told through conn:write(), conn:done(keep),
-- conn:attach(res) (for on_close) and conn:abort().
local cjson = require "cjson"
local util = require "longpoll.http.util"

local find, lower, format, tostring, type = string.find, string.lower, string.format, tostring, type
local concat, os_time = table.concat, os.time
local encode, status_text, http_date = cjson.encode, util.status_text, util.http_date

local response = {}

local Response = {}
Response.__index = Response

-- conn: the connection's handle (core.http_server); req: the request, or nil for errors found while parsing
-- (those always close the connection).
function response.new(conn, req)
  return setmetatable({ _conn = conn, _req = req, sent = false }, Response)
end

local function check_header(name, value, level)
  if type(name) ~= "string" or not find(name, "^[%w!#$%%&'*+.^_`|~-]+$") then
    error("invalid header name: " .. tostring(name), level + 1)
  end
  if find(value, "[\r\n%z]") then
    error("invalid header value for " .. name, level + 1)
  end
end

-- Headers are a flat list { lname, name, value, ... }: a handful per response, set once each,
-- so a linear search is cheaper than a hash table and keeps their order and spelling.
function Response:set_header(name, value)
  value = tostring(value)
  check_header(name, value, 2)
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
  local block = self._block
  return block and block.values[lower(name)]
end

-- fn() runs once if the client goes away before the response is complete.
function Response:on_close(fn)
  self._on_close = fn
  self._conn:attach(self)
end

function Response:is_open()
  return self._conn:is_open()
end

-- True once the whole response was written (send, send_block, send_shared or finish).
function Response:is_finished()
  return self._done == true
end

-- Called by the server when the client of this response went away: the on_close function
-- runs, once, unless the response was already complete.
function Response:client_gone()
  local fn = self._on_close
  if not fn or self._done then return true end
  self._on_close = nil
  return xpcall(fn, debug.traceback)
end

local status_lines = setmetatable({}, {
  __index = function(t, status)
    local line = "HTTP/1.1 " .. status .. " " .. (status_text[status] or "Unknown") .. "\r\n"
    t[status] = line
    return line
  end,
})

-- The Date line changes once a second; formatting it per response would be wasted work.
local date_second, date_text = -1, ""
local function date_line()
  local now = os_time()
  if now ~= date_second then
    date_second, date_text = now, "Date: " .. http_date(now) .. "\r\n"
  end
  return date_text
end

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
-- The Connection header line an answer needs ("" for HTTP/1.1 keep-alive, the default).
local function connection_line(req, keep)
  if not keep then
    return "Connection: close\r\n"
  end
  return req.version == "1.0" and "Connection: keep-alive\r\n" or ""
end

-- The connection a response may still be sent on, or nil, message.
local function open_conn(self)
  if self.sent then
    return nil, "already sent"
  end
  local conn = self._conn
  if not conn:is_open() then
    return nil, "closed"
  end
  return conn
end

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
  return status_lines[status] .. lines .. framing .. date_line() .. connection_line(self._req, keep) .. "\r\n"
end

-- Answers with a whole body: a string, or a table sent as JSON. Returns true, or nil, message
-- ("already sent", "closed").
function Response:send(status, body)
  check_status(status)
  local conn, err = open_conn(self)
  if not conn then
    return nil, err
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
  conn:done(keep)
  return true
end

-- A constant block of headers, checked once: list = { { name, value }, ... }. Answers that
-- always carry the same headers (the manager's JSON answers) write it as it is with
-- res:send_block, instead of setting each header on each response.
function response.header_block(list)
  local lines, values = {}, {}
  for i = 1, #list do
    local name, value = list[i][1], tostring(list[i][2])
    check_header(name, value, 2)
    local lname = lower(name)
    if lname == "content-length" or lname == "transfer-encoding" or lname == "connection" or values[lname] then
      error("header_block: " .. name .. " cannot be in a block", 2)
    end
    values[lname] = value
    lines[i] = name .. ": " .. value .. "\r\n"
  end
  return { text = concat(lines), values = values, list = list }
end

-- Beyond this size a body is written after its head rather than copied behind it.
local COPY_BODY_MAX = 16384

-- "Content-Length: n\r\n" for the short lengths seen (formatting a number costs more).
local LENGTH_LINES_MAX = 4096
local length_lines = setmetatable({}, {
  __index = function(t, n)
    local line = "Content-Length: " .. n .. "\r\n"
    t[n] = line
    return line
  end,
})

-- send() for a string body and the headers of a block (see response.header_block): one string,
-- one write. A response that has headers of its own (set by a wrapper: CORS, say) gets the
-- block's headers set over them and goes through send(), as does a status without a body.
function Response:send_block(status, block, body)
  local status_line = rawget(status_lines, status)
  if not status_line then
    check_status(status)
    status_line = status_lines[status]
  end
  local req = self._req
  if self._h or not req or type(body) ~= "string" or status < 200 or status == 204 or status == 304 then
    local list = block.list
    for i = 1, #list do
      self:set_header(list[i][1], list[i][2])
    end
    return self:send(status, body)
  end
  local conn, err = open_conn(self)
  if not conn then
    return nil, err
  end
  self.sent, self._done, self._block = true, true, block
  local keep = req.keep_alive and conn:may_keep_alive()
  local connection = connection_line(req, keep)
  local n = #body
  if n > COPY_BODY_MAX then
    local head = status_line .. block.text .. "Content-Length: " .. n .. "\r\n" .. date_line() .. connection
      .. "\r\n"
    conn:write(req.method == "HEAD" and head or { head, body })
  else
    if req.method == "HEAD" then
      body = ""
    end
    local length = n < LENGTH_LINES_MAX and length_lines[n] or "Content-Length: " .. n .. "\r\n"
    conn:write(status_line .. block.text .. length .. date_line() .. connection .. "\r\n" .. body)
  end
  conn:done(keep)
  return true
end

-- One answer for many responses (a publish waking its subscribers): status line, block,
-- Content-Length, Date and body, for a keep-alive HTTP/1.1 response (see send_shared).
function response.shared_answer(status, block, body)
  check_status(status)
  return status_lines[status] .. block.text .. "Content-Length: " .. #body .. "\r\n" .. date_line() .. "\r\n"
    .. body
end

-- Writes an answer made by response.shared_answer with that block, when it fits this response
-- as it is: no headers of its own, a keep-alive HTTP/1.1 GET. Returns false (nothing sent)
-- otherwise; the caller then uses send_block.
function Response:send_shared(answer, block)
  local req, conn = self._req, self._conn
  if self._h or self.sent or not conn:is_open() or not req or not req.keep_alive or req.version ~= "1.1"
    or req.method == "HEAD" or not conn:may_keep_alive() then
    return false
  end
  self.sent, self._done, self._block = true, true, block
  conn:write(answer)
  conn:done(true)
  return true
end

-- Starts a streamed response. Without a length: chunked on HTTP/1.1, and on HTTP/1.0 the end of
-- the body is the end of the connection. With one (a file): Content-Length, and exactly that
-- many bytes must be written before finish().
function Response:write_head(status, length)
  check_status(status)
  if length ~= nil and (math.type(length) ~= "integer" or length < 0) then
    error("write_head: length must be a non-negative integer", 2)
  end
  local conn, err = open_conn(self)
  if not conn then
    return nil, err
  end
  self.sent = true
  local req = self._req
  local framing
  if length then
    self._left = length
    self._keep = keep_alive(self)
    framing = "Content-Length: " .. length .. "\r\n"
  else
    local chunked = req.version == "1.1"
    self._chunked = chunked
    self._keep = chunked and keep_alive(self)
    framing = chunked and "Transfer-Encoding: chunked\r\n" or ""
  end
  self._head_only = req.method == "HEAD"
  conn:write(build_head(self, status, framing, self._keep))
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
  if not conn:is_open() then
    return nil, "closed"
  end
  if #chunk == 0 or self._head_only then
    return true
  end
  local left = self._left
  if left then
    if #chunk > left then
      return nil, "longer than the announced length"
    end
    self._left = left - #chunk
  end
  -- a client that lets the engine's output budget pile up unread is cut off: nil, message
  if self._chunked then
    return conn:write({ format("%x\r\n", #chunk), chunk, "\r\n" })
  end
  return conn:write(chunk)
end

-- Hands the request being dispatched back to a native handler (longpoll.http.native) when this
-- response and req are as the engine received them (no header set, nothing sent, no set_query):
-- true when the engine answered it in C (200), false when the Lua handler must. A wrapper that
-- ends by calling the manager's handler so costs one Lua call, not the handler's Lua.
-- block: the header block of the native answer (response.header_block), which get_header then
-- sees as after send_block.
function Response:native(handler, req, block)
  if self.sent or self._h or req ~= self._req or not req:as_received() then
    return false
  end
  if not self._conn:native(handler) then
    return false
  end
  self.sent, self._done, self._block = true, true, block
  return true
end

-- fn() runs once at most `below` bytes (default 0) of this connection's output wait to be
-- written (at once when that is so already): a producer (a file) writes its next piece then.
-- It never runs once the client is gone (on_close does).
function Response:on_drain(fn, below)
  self._conn:on_drain(fn, below)
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
  if not conn:is_open() then
    return nil, "closed"
  end
  if self._left and self._left > 0 and not self._head_only then
    conn:abort() -- fewer bytes than announced: the client must not take this as the whole body
    return nil, "shorter than the announced length"
  end
  if self._chunked and not self._head_only then
    conn:write("0\r\n\r\n")
  end
  conn:done(self._keep)
  return true
end

return response
