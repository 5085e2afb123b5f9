-- Unit tests of the sans-I/O request parser: framing, incremental feeding, limits, rejections.
local parser = require "longpoll.http.parser"

local LIMITS = { max_header_bytes = 1024, max_body_bytes = 100, max_url_bytes = 64 }

local function parse_all(bytes, step)
  local p = parser.new(LIMITS)
  local out = {}
  step = step or #bytes
  for i = 1, #bytes, step do
    p:push(bytes:sub(i, i + step - 1))
    -- Each pass returns a request or stops: bounded by the requests in the input.
    while true do
      local req, status, message = p:parse()
      if req then
        out[#out + 1] = req
      elseif status then
        return out, status, message
      else
        break
      end
    end
  end
  return out, nil, p
end

local function parse_one(bytes, step)
  local reqs, status, message = parse_all(bytes, step)
  return reqs[1], status, message
end

describe("http parser", function()
  it("parses a GET request in one piece", function()
    local req = parse_one("GET /a?b=1 HTTP/1.1\r\nHost: x\r\nX-Long-Name: v a l \r\n\r\n")
    assert.same("GET", req.method)
    assert.same("/a?b=1", req.target)
    assert.same("1.1", req.version)
    assert.same({ host = "x", ["x-long-name"] = "v a l" }, req.headers)
    assert.same("", req.body)
    assert.is_true(req.keep_alive)
  end)

  it("gives the same result when fed one byte at a time", function()
    local bytes = "POST /p HTTP/1.1\r\nContent-Length: 5\r\nA: 1\r\n\r\nhelloGET /n HTTP/1.0\r\n\r\n"
    for _, step in ipairs{ 1, 2, 3, 7, #bytes } do
      local reqs, status = parse_all(bytes, step)
      assert.is_nil(status)
      assert.same(2, #reqs)
      assert.same("hello", reqs[1].body)
      assert.same("/n", reqs[2].target)
      assert.same("1.0", reqs[2].version)
      assert.is_false(reqs[2].keep_alive)
    end
  end)

  it("asks for more bytes while the head or body is incomplete", function()
    local p = parser.new(LIMITS)
    p:push("POST / HTTP/1.1\r\nContent-Length: 4\r\nExpect: 100-continue\r\n")
    assert.is_nil(p:parse())
    assert.is_nil(p.head)
    assert.is_true(p:in_progress())
    p:push("\r\nab")
    assert.is_nil(p:parse())
    assert.is_true(p.head.expect_continue)
    p:push("cd")
    assert.same("abcd", p:parse().body)
    assert.is_false(p:in_progress())
  end)

  it("de-chunks chunked bodies with extensions and trailers", function()
    local bytes = "POST / HTTP/1.1\r\nTransfer-Encoding: Chunked\r\n\r\n"
      .. "5;name=v\r\nhello\r\n1\r\n \r\nA\r\n0123456789\r\n0\r\nX-Trailer: 1\r\n\r\n"
      .. "GET /next HTTP/1.1\r\n\r\n"
    for _, step in ipairs{ 1, 5, #bytes } do
      local reqs, status = parse_all(bytes, step)
      assert.is_nil(status)
      assert.same("hello 0123456789", reqs[1].body)
      assert.same("/next", reqs[2].target)
    end
  end)

  it("ignores empty lines before a request and accepts bare LF line ends", function()
    local req = parse_one("\r\n\r\nGET / HTTP/1.1\nHost: x\n\n")
    assert.same("x", req.headers.host)
  end)

  it("joins repeated headers and lower-cases names", function()
    local req = parse_one("GET / HTTP/1.1\r\nAccept: a\r\nACCEPT: b\r\n\r\n")
    assert.same("a, b", req.headers.accept)
  end)

  it("works out keep-alive from version and Connection", function()
    assert.is_false(parse_one("GET / HTTP/1.1\r\nConnection: Close\r\n\r\n").keep_alive)
    assert.is_true(parse_one("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n").keep_alive)
    assert.is_false(parse_one("GET / HTTP/1.0\r\n\r\n").keep_alive)
  end)

  it("accepts identical duplicate Content-Length", function()
    local req = parse_one("POST / HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok")
    assert.same("ok", req.body)
  end)

  it("enforces limits: 414, 431, 413", function()
    local long = "/" .. ("u"):rep(100)
    assert.same(414, select(2, parse_one("GET " .. long .. " HTTP/1.1\r\n\r\n")))
    -- The request line alone is enough to refuse, before the head ends.
    assert.same(414, select(2, parse_one("GET " .. long .. long)))
    local big = "GET / HTTP/1.1\r\nX: " .. ("h"):rep(1100) .. "\r\n\r\n"
    assert.same(431, select(2, parse_one(big)))
    assert.same(431, select(2, parse_one(big:sub(1, 1060))))
    assert.same(413, select(2, parse_one("POST / HTTP/1.1\r\nContent-Length: 101\r\n\r\n")))
    assert.same(413, select(2, parse_one("POST / HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n")))
    local chunked = "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
    assert.same(413, select(2, parse_one(chunked .. "40\r\n" .. ("x"):rep(64) .. "\r\n40\r\n")))
    local ok = parse_one(chunked .. "40\r\n" .. ("x"):rep(64) .. "\r\n24\r\n" .. ("y"):rep(36) .. "\r\n0\r\n\r\n")
    assert.same(100, #ok.body)
  end)

  it("answers other versions with 505", function()
    assert.same(505, select(2, parse_one("GET / HTTP/2.0\r\n\r\n")))
    assert.same(505, select(2, parse_one("GET / HTTP/1.2\r\n\r\n")))
  end)

  local malformed = {
    ["no version"] = "GET /\r\n\r\n",
    ["lower-case protocol"] = "GET / http/1.1\r\n\r\n",
    ["two spaces"] = "GET  / HTTP/1.1\r\n\r\n",
    ["bad method"] = "G(T / HTTP/1.1\r\n\r\n",
    ["header without colon"] = "GET / HTTP/1.1\r\nHost x\r\n\r\n",
    ["space before colon"] = "GET / HTTP/1.1\r\nHost : x\r\n\r\n",
    ["obsolete line folding"] = "GET / HTTP/1.1\r\nA: b\r\n c\r\n\r\n",
    ["NUL in a header"] = "GET / HTTP/1.1\r\nA: b\0c\r\n\r\n",
    ["control byte in target"] = "GET /\1 HTTP/1.1\r\n\r\n",
    ["bare CR"] = "GET / HTTP/1.1\r\nA: b\rc\r\n\r\n",
    ["Content-Length and Transfer-Encoding"] =
      "POST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
    ["non-numeric Content-Length"] = "POST / HTTP/1.1\r\nContent-Length: 1x\r\n\r\n",
    ["negative Content-Length"] = "POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
    ["conflicting Content-Length"] = "POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
    ["unsupported Transfer-Encoding"] = "POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
    ["bad chunk size"] = "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    ["chunk without CRLF"] = "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nab\r\n",
  }
  for name, bytes in pairs(malformed) do
    it("rejects a malformed request with 400: " .. name, function()
      local req, status, message = parse_one(bytes)
      assert.is_nil(req)
      assert.same(400, status)
      assert.is_string(message)
    end)
  end
end)
