-- Incremental HTTP/1.x request parser, sans-I/O: bytes go in with push(), parse() hands back a
-- complete request, nil ("need more bytes") or nil, status, message (malformed; close after).
--
--   local p = parser.new{ max_header_bytes = 16384, max_body_bytes = 1048576, max_url_bytes = 8192 }
--   p:push(bytes)
--   local req, status, message = p:parse()
--   -- req = { method, target, version = "1.1"|"1.0", headers = { lower-name = value },
--   --         body, keep_alive, expect_continue }
--   -- while only the body is missing, p.head holds the request parsed so far (for 100-continue).
local parser = {}

local find, sub, lower, concat = string.find, string.sub, string.lower, table.concat
local tonumber, math_tointeger = tonumber, math.tointeger

local HEAD, BODY, CHUNK_SIZE, CHUNK_DATA, CHUNK_END, TRAILER = 1, 2, 3, 4, 5, 6

-- Longest chunk-size line (size plus extensions) accepted; real clients send a few bytes.
local MAX_CHUNK_LINE = 1024

local Parser = {}
Parser.__index = Parser

function parser.new(limits)
  return setmetatable({
    limits = limits,
    buf = "",
    pos = 1, -- first unconsumed byte of buf
    scan = 1, -- where the search for the end of the head resumes
    state = HEAD,
    head = nil, -- request whose body is being read
    parts = nil, -- body pieces collected so far
    remaining = 0, -- bytes still missing from the body or current chunk
    body_len = 0,
  }, Parser)
end

-- Appends received bytes. Consumed bytes are dropped here, not on every parse, so pipelined
-- requests already in the buffer are parsed without copying.
function Parser:push(data)
  local buf, pos = self.buf, self.pos
  if pos > #buf then
    -- Body bytes that only complete a Content-Length body go straight to the parts list.
    if self.state == BODY and #data < self.remaining then
      local parts = self.parts
      parts[#parts + 1] = data
      self.remaining = self.remaining - #data
      self.buf, self.pos, self.scan = "", 1, 1
      return
    end
    self.buf, self.scan = data, self.scan - pos + 1
  elseif pos > 1 then
    self.buf, self.scan = sub(buf, pos) .. data, self.scan - pos + 1
  else
    self.buf = buf .. data
  end
  self.pos = 1
  if self.scan < 1 then
    self.scan = 1
  end
end

-- Bytes received but not yet turned into a request (a started head, or pipelined requests).
function Parser:buffered()
  return #self.buf - self.pos + 1
end

-- True while a request has started but is not complete.
function Parser:in_progress()
  return self.state ~= HEAD or self.pos <= #self.buf
end

local function fail(self, status, message)
  self.buf, self.pos, self.scan, self.parts, self.head, self.state = "", 1, 1, nil, nil, HEAD
  return nil, status, message
end

local function finish(self, body)
  local req = self.head
  req.body = body
  self.head, self.parts, self.state, self.body_len = nil, nil, HEAD, 0
  if self.pos > #self.buf then
    self.buf, self.pos = "", 1
  end
  self.scan = self.pos
  return req
end

local TOKEN = "^[%w!#$%%&'*+.^_`|~-]+$"
local CONTROL = "[%z\1-\8\11\12\14-\31\127]"

local function parse_head(self)
  local buf, pos, limits = self.buf, self.pos, self.limits
  -- RFC 9112 2.2: empty lines before a request line are ignored (some clients send one after
  -- a POST body).
  local _, skip = find(buf, "^[\r\n]+", pos)
  if skip then
    pos = skip + 1
    self.pos = pos
  end
  local scan = self.scan
  if scan < pos then
    scan = pos
  end
  local hs, he = find(buf, "\n\r?\n", scan)
  if not hs then
    local n = #buf - pos + 1
    -- "DELETE " + " HTTP/1.1\r\n" is the slack beyond the URL itself.
    if n > limits.max_url_bytes + 20 and not find(buf, "\n", pos, true) then
      return fail(self, 414, "request line too long")
    end
    if n > limits.max_header_bytes then
      return fail(self, 431, "request header too large")
    end
    -- The terminator is at most 3 bytes long, so only its last 2 bytes need another look.
    self.scan = #buf - 1
    return nil
  end
  local head = sub(buf, pos, he)
  self.pos = he + 1

  local ls, le, method, target, major, minor = find(head, "^(%S+) (%S+) HTTP/(%d+)%.(%d+)\r?\n")
  if not ls then
    local line = find(head, "\n", 1, true)
    if line - 1 > limits.max_url_bytes + 20 then
      return fail(self, 414, "request line too long")
    end
    return fail(self, 400, "malformed request line")
  end
  if #target > limits.max_url_bytes then
    return fail(self, 414, "request target too long")
  end
  if #head > limits.max_header_bytes then
    return fail(self, 431, "request header too large")
  end
  if find(head, CONTROL) or find(head, "\r[^\n]") then
    return fail(self, 400, "control character in request head")
  end
  if not find(method, TOKEN) then
    return fail(self, 400, "malformed method")
  end
  local version
  if major == "1" and minor == "1" then
    version = "1.1"
  elseif major == "1" and minor == "0" then
    version = "1.0"
  else
    return fail(self, 505, "HTTP version not supported")
  end

  local headers = {}
  local p = le + 1
  -- Each pass consumes one line of a head that ends with an empty line: bounded by #head.
  while true do
    local s, e, name, value = find(head, "^([^:\r\n]+):[ \t]*([^\r\n]-)[ \t]*\r?\n", p)
    if not s then
      if find(head, "^\r?\n", p) then
        break
      end
      return fail(self, 400, "malformed header line")
    end
    if not find(name, TOKEN) then
      return fail(self, 400, "malformed header name")
    end
    name = lower(name)
    local old = headers[name]
    if old == nil then
      headers[name] = value
    elseif name == "content-length" then
      if old ~= value then
        return fail(self, 400, "conflicting Content-Length")
      end
    else
      headers[name] = old .. ", " .. value
    end
    p = e + 1
  end

  local connection = headers.connection
  local keep_alive
  if connection then
    connection = lower(connection)
    if find(connection, "close", 1, true) then
      keep_alive = false
    else
      keep_alive = version == "1.1" or find(connection, "keep-alive", 1, true) ~= nil
    end
  else
    keep_alive = version == "1.1"
  end
  local expect = headers.expect
  local req = {
    method = method,
    target = target,
    version = version,
    headers = headers,
    keep_alive = keep_alive,
    expect_continue = expect ~= nil and version == "1.1" and lower(expect) == "100-continue",
  }
  self.head = req

  local te, cl = headers["transfer-encoding"], headers["content-length"]
  if te then
    if cl then
      return fail(self, 400, "both Content-Length and Transfer-Encoding")
    end
    if lower(te) ~= "chunked" then
      return fail(self, 400, "unsupported Transfer-Encoding")
    end
    self.state, self.parts, self.body_len = CHUNK_SIZE, {}, 0
    return true
  end
  if cl then
    if not find(cl, "^%d+$") then
      return fail(self, 400, "invalid Content-Length")
    end
    local n = #cl <= 15 and math_tointeger(tonumber(cl))
    if not n or n > limits.max_body_bytes then
      return fail(self, 413, "request body too large")
    end
    if n > 0 then
      self.state, self.parts, self.remaining = BODY, {}, n
      return true
    end
  end
  return finish(self, "")
end

-- Takes up to self.remaining bytes of the buffer into parts; true when nothing is missing.
local function take(self)
  local buf, pos, need = self.buf, self.pos, self.remaining
  local avail = #buf - pos + 1
  local parts = self.parts
  if avail >= need then
    parts[#parts + 1] = sub(buf, pos, pos + need - 1)
    self.pos, self.remaining = pos + need, 0
    return true
  end
  if avail > 0 then
    parts[#parts + 1] = pos == 1 and buf or sub(buf, pos)
    self.remaining = need - avail
    self.buf, self.pos = "", 1
  end
  return false
end

function Parser:parse()
  -- Each pass either consumes bytes or returns, so the loop is bounded by the buffer size.
  while true do
    local state = self.state
    if state == HEAD then
      local r, status, message = parse_head(self)
      if r ~= true then
        return r, status, message
      end
    elseif state == BODY then
      if not take(self) then
        return nil
      end
      return finish(self, concat(self.parts))
    elseif state == CHUNK_SIZE then
      local buf, pos = self.buf, self.pos
      local nl = find(buf, "\n", pos, true)
      if not nl then
        if #buf - pos + 1 > MAX_CHUNK_LINE then
          return fail(self, 400, "chunk size line too long")
        end
        return nil
      end
      local _, _, hex, rest = find(sub(buf, pos, nl - 1), "^(%x+)[ \t]*(.-)\r?$")
      if not hex or (rest ~= "" and sub(rest, 1, 1) ~= ";") or nl - pos > MAX_CHUNK_LINE then
        return fail(self, 400, "malformed chunk size")
      end
      local size = #hex <= 15 and tonumber(hex, 16)
      if not size or self.body_len + size > self.limits.max_body_bytes then
        return fail(self, 413, "request body too large")
      end
      self.pos = nl + 1
      if size == 0 then
        self.state = TRAILER
      else
        self.body_len = self.body_len + size
        self.state, self.remaining = CHUNK_DATA, size
      end
    elseif state == CHUNK_DATA then
      if not take(self) then
        return nil
      end
      self.state = CHUNK_END
    elseif state == CHUNK_END then
      local buf, pos = self.buf, self.pos
      local _, e = find(buf, "^\r?\n", pos)
      if e then
        self.pos, self.state = e + 1, CHUNK_SIZE
      elseif #buf - pos + 1 >= 2 or (pos <= #buf and sub(buf, pos, pos) ~= "\r") then
        return fail(self, 400, "missing CRLF after chunk data")
      else
        return nil
      end
    else -- TRAILER: trailer fields are read and ignored.
      local buf, pos = self.buf, self.pos
      local _, e = find(buf, "^\r?\n", pos)
      if not e then
        _, e = find(buf, "\n\r?\n", pos)
      end
      if not e then
        if #buf - pos + 1 > self.limits.max_header_bytes then
          return fail(self, 431, "trailer too large")
        end
        return nil
      end
      self.pos = e + 1
      return finish(self, concat(self.parts))
    end
  end
end

return parser
