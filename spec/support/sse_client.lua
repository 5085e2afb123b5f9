-- Test helper: a raw-socket Server-Sent Events client (chunked transfer decoded by hand, so
-- tests see exactly what the server wrote).
local uv = require "luv"
local async = require "support.async"
local fixture = require "support.fixture"

local concat = table.concat

local M = {}

-- An SSE client: messages are { id = , event = , data = , retry = } for each dispatched block
-- (blocks with only id or retry included), comments counted apart.

local Stream = {}
Stream.__index = Stream

function M.open(port, query, headers, opts)
  opts = opts or {}
  local conn = async.connect(port)
  local lines = { (opts.method or "GET") .. " " .. fixture.url(opts.path or "/sse", query) .. " HTTP/1.1",
    "Host: 127.0.0.1" }
  for k, v in pairs(headers or {}) do lines[#lines + 1] = k .. ": " .. v end
  conn:send(concat(lines, "\r\n") .. "\r\n\r\n")
  local deadline = uv.now() + 5000
  while not conn.buf:find("\r\n\r\n", 1, true) do
    assert(conn:wait_data(deadline - uv.now()), "no response head")
  end
  local he = select(2, conn.buf:find("\r\n\r\n", 1, true))
  local head = conn.buf:sub(1, he)
  conn.buf = conn.buf:sub(he + 1)
  local status = tonumber(head:match("^HTTP/1%.%d (%d+)"))
  local h = {}
  for name, value in head:gmatch("\r\n([^:\r\n]+):[ \t]*([^\r\n]*)") do h[name:lower()] = value end
  local s = setmetatable({ conn = conn, status = status, headers = h, text = "", messages = {},
    read = 0, comments = 0, ended = false, block = {} }, Stream)
  if status ~= 200 or h["content-type"] ~= "text/event-stream" then
    -- an error answer: read its body
    local cl = tonumber(h["content-length"] or 0)
    while #conn.buf < cl do assert(conn:wait_data(deadline - uv.now())) end
    s.body = conn.buf:sub(1, cl)
    s.ended = true
  end
  return s
end

-- Decodes complete chunks from the socket buffer, then complete lines into messages.
function Stream:_parse()
  local conn = self.conn
  while not self.ended do
    local e = conn.buf:find("\r\n", 1, true)
    if not e then break end
    local size = tonumber(conn.buf:sub(1, e - 1), 16)
    if #conn.buf < e + 1 + size + 2 then break end
    self.text = self.text .. conn.buf:sub(e + 2, e + 1 + size)
    conn.buf = conn.buf:sub(e + size + 4)
    if size == 0 then self.ended = true end
  end
  while true do
    local s, e = self.text:find("\r\n", 1, true)
    if not s then s, e = self.text:find("[\r\n]") end
    -- a lone \r at the end might be the start of \r\n
    if not s or (self.text:sub(s, e) == "\r" and e == #self.text and not self.ended) then break end
    local line = self.text:sub(1, s - 1)
    self.text = self.text:sub(e + 1)
    local b = self.block
    if line == "" then
      if next(b) then
        self.messages[#self.messages + 1] = b
        self.block = {}
      end
    elseif line:sub(1, 1) == ":" then
      self.comments = self.comments + 1
    else
      local field, value = line:match("^([^:]*):? ?(.*)$")
      if field == "data" then
        b.data = b.data and (b.data .. "\n" .. value) or value
      elseif field == "id" or field == "event" or field == "retry" then
        b[field] = value
      end
    end
  end
end

-- Waits until cond(self) holds; false on timeout or end of stream.
function Stream:wait_for(cond, timeout_ms)
  local deadline = uv.now() + (timeout_ms or 5000)
  self:_parse()
  while not cond(self) do
    if self.ended or self.conn.eof then return false end
    local left = deadline - uv.now()
    if left <= 0 or not self.conn:wait_data(left) then
      self:_parse()
      return cond(self)
    end
    self:_parse()
  end
  return true
end

-- The next n messages that carry data (events, missed), skipping id-only/retry-only blocks.
function Stream:next_events(n, timeout_ms)
  local out = {}
  local ok = self:wait_for(function(st)
    while #out < n and st.read < #st.messages do
      st.read = st.read + 1
      local m = st.messages[st.read]
      if m.data then out[#out + 1] = m end
    end
    return #out >= n
  end, timeout_ms)
  assert(ok, ("expected %d events, got %d"):format(n, #out))
  return out
end

function Stream:close()
  self.conn:close()
end

-- True when a message with data arrives within ms (it is left unread).
function Stream:more_within(ms)
  return self:wait_for(function(st)
    for i = st.read + 1, #st.messages do if st.messages[i].data then return true end end
    return false
  end, ms)
end

return M
