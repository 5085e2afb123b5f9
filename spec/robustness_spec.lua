-- Hostile and broken clients over real sockets on 127.0.0.1: each case checks the answer the
-- server gives AND that it keeps serving a well-behaved client during and after. docs/robustness.md
-- lists every case in a table (input -> answer -> proof others were served).
local uv = require "luv"
local cjson = require "cjson"
local async = require "support.async"
local fixture = require "support.fixture"
local process = require "support.process"

-- ROBUSTNESS_VERBOSE=1 prints the measured figures docs/robustness.md quotes.
local function report(fmt, ...)
  if os.getenv("ROBUSTNESS_VERBOSE") then io.stderr:write(string.format(fmt, ...), "\n") end
end

local SUBSCRIBE_HEAD = "GET /events?category=%s&timeout=%d&since_time=0 HTTP/1.1\r\nHost: t\r\n\r\n"

-- The server's view of one connection (see server:connections()), nil once it is closed.
local function connection_info(t, id)
  for _, conn in ipairs(t.srv:connections()) do
    if conn.id == id then return conn end
  end
end

-- The id of a connection the server paused (its output backed up), once there is one.
local function paused_connection(t)
  local found
  async.wait_for(function()
    for _, conn in ipairs(t.srv:connections()) do
      if conn.paused then found = conn.id end
    end
    return found ~= nil
  end, 3000)
  return found
end

-- A well-behaved client: publishes to a fresh category and reads the event back.
local served = 0
local function serving(t, label)
  served = served + 1
  local category = "healthy-" .. served
  local status = t.publish(category, tostring(served))
  assert.equals(200, status, label)
  local s2, b2 = t.get({ { "category", category }, { "timeout", "2" }, { "since_time", "0" } })
  assert.equals(200, s2, label)
  assert.equals(served, type(b2) == "table" and b2.events and b2.events[1].data, label)
end

local function status_of(bytes)
  return tonumber(bytes:match("^HTTP/1%.1 (%d%d%d)"))
end

local function body_of(bytes)
  local body = bytes:match("\r\n\r\n(.*)$")
  local ok, decoded = pcall(cjson.decode, body or "")
  return ok and decoded or body
end

-- Sends raw bytes on a fresh connection: status, decoded body, closed by the server.
local function raw(t, bytes, timeout_ms)
  local got, closed = async.raw(t.port, bytes, { timeout_ms = timeout_ms or 3000 })
  return status_of(got), body_of(got), closed, got
end

-- Waits until the server has forgotten every connection but `keep` (it counts live ones).
local function settled(t, keep)
  return async.wait_for(function() return t.srv:connection_count() <= (keep or 0) end, 3000)
end

describe("robustness: bad input over a real socket", function()
  it("truncated head, then close: forgotten silently, others served during and after", function()
    fixture.with_server({}, function(t)
      for _, cut in ipairs { "GET /events?category=a&ti", "GET /events?category=a&timeout=1 HTTP/1.1\r\nHo",
        "POST /publish HTTP/1.1\r\nContent-Length: 30\r\n" } do
        local c = async.connect(t.port)
        assert(c:send(cut))
        serving(t, "during: " .. cut)
        assert.is_true(settled(t, 1)) -- the healthy clients are gone, the cut one stays
        c:close()
        assert.is_true(settled(t), "connection forgotten")
        assert.equals("", c.buf) -- no answer to a request that never completed
        serving(t, "after: " .. cut)
      end
    end)
  end)

  it("body shorter than Content-Length, then close: nothing published, others served", function()
    fixture.with_server({}, function(t)
      local published = t.manager:stats().published
      local c = async.connect(t.port)
      local body = '{"category":"cut","data":"0123456789"}'
      assert(c:send("POST /publish HTTP/1.1\r\nHost: t\r\nContent-Length: " .. (#body + 50) .. "\r\n\r\n" .. body))
      serving(t, "during")
      c:close()
      assert.is_true(settled(t))
      assert.equals("", c.buf)
      assert.equals(published + 1, t.manager:stats().published) -- only the healthy client's event
      serving(t, "after")
    end)
  end)

  it("garbage bytes: 400 (or 414/431 when no line ends) and close", function()
    fixture.with_server({}, function(t)
      -- a fixed pseudo-random byte stream (an LCG), so failures reproduce
      local seed, bytes = 12345, {}
      for i = 1, 4096 do
        seed = (seed * 1103515245 + 12345) % 2147483648
        bytes[i] = string.char(seed >> 16 & 255)
      end
      local garbage = table.concat(bytes)
      local cases = {
        { garbage .. "\r\n\r\n", { [400] = true, [414] = true } },
        { "\22\3\1\2\0\1\0\1\252\3\3" .. garbage:sub(1, 200) .. "\r\n\r\n", { [400] = true } }, -- a TLS hello
        { ("\0"):rep(20000), { [414] = true, [431] = true } },
        { "GET\r\n\r\n", { [400] = true } },
        { "GET / HTTP/9.9\r\n\r\n", { [505] = true } },
        { "G@T / HTTP/1.1\r\n\r\n", { [400] = true } },
        { "GET / HTTP/1.1\r\nno colon here\r\n\r\n", { [400] = true } },
        { "GET / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n", { [400] = true } },
        { "POST /publish HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", { [400] = true } },
        { "POST /publish HTTP/1.1\r\nContent-Length: -1\r\n\r\n", { [400] = true } },
      }
      local hold = async.connect(t.port)
      assert(hold:send(garbage:sub(1, 100))) -- garbage that never ends its line, left open
      for i, case in ipairs(cases) do
        local status, body, closed = raw(t, case[1])
        assert.is_true(case[2][status] == true, "case " .. i .. ": status " .. tostring(status))
        assert.is_true(closed, "case " .. i .. " closed")
        assert.equals("string", type(body) == "table" and type(body.error), "case " .. i .. " JSON error")
        serving(t, "case " .. i)
      end
      hold:close()
      assert.is_true(settled(t))
      serving(t, "after")
    end)
  end)

  it("huge headers: one 1 MB line and 5,000 small ones get 431; 1,000 small ones are fine", function()
    fixture.with_server({}, function(t)
      local status, _, closed = raw(t, "GET /events?category=a&timeout=1 HTTP/1.1\r\nX-Big: " .. ("a"):rep(1024 * 1024) .. "\r\n\r\n")
      assert.equals(431, status)
      assert.is_true(closed)
      serving(t, "after one huge line")
      status, _, closed = raw(t, "GET /events?category=a&timeout=1 HTTP/1.1\r\n" .. ("X-A: 1\r\n"):rep(5000) .. "\r\n")
      assert.equals(431, status)
      assert.is_true(closed)
      serving(t, "after 5,000 headers")
      -- within max_header_bytes (16 KiB): 1,000 repeated and 1,000 distinct names are parsed
      local distinct = {}
      for i = 1, 1000 do distinct[i] = "X-" .. i .. ": v\r\n" end
      for _, headers in ipairs { ("X-A: 1\r\n"):rep(1000), table.concat(distinct) } do
        local c = async.connect(t.port)
        assert(c:send("GET /events?category=many&timeout=1&since_time=0 HTTP/1.1\r\n" .. headers .. "\r\n"))
        local s, _, body = c:read_response()
        c:close()
        assert.equals(200, s)
        assert.equals("no events before timeout", cjson.decode(body).timeout)
      end
      -- a head that never ends, sent in pieces, is cut at the limit too
      local c = async.connect(t.port)
      assert(c:send("GET /events?category=a&timeout=1 HTTP/1.1\r\n"))
      for _ = 1, 40 do
        if not c:send("X-Drip: " .. ("b"):rep(1000) .. "\r\n") or c.buf ~= "" then break end
      end
      assert.is_true(c:closed_by_peer(2000))
      assert.equals(431, status_of(c.buf))
      c:close()
      serving(t, "after")
    end)
  end)

  it("huge bodies: Content-Length over the limit and a chunked body growing past it get 413", function()
    fixture.with_server({}, function(t)
      local c = async.connect(t.port)
      assert(c:send("POST /publish HTTP/1.1\r\nContent-Length: 10737418240\r\n\r\n" .. ("x"):rep(65536)))
      local status, _, body = c:read_response()
      assert.equals(413, status)
      assert.equals("request body too large", cjson.decode(body).error)
      assert.is_true(c:closed_by_peer(3000))
      c:close()
      serving(t, "after Content-Length")
      c = async.connect(t.port)
      assert(c:send("POST /publish HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"))
      local chunk = ("10000\r\n" .. ("y"):rep(65536) .. "\r\n")
      local sent = 0
      for _ = 1, 40 do -- 2.5 MB at most; the limit is 1 MiB
        serving(t, "during chunked body")
        if c.buf ~= "" or not c:send(chunk) then break end
        sent = sent + 65536
      end
      assert.is_true(c:closed_by_peer(3000))
      assert.equals(413, status_of(c.buf))
      assert.is_true(sent >= 1048576 - 65536 and sent <= 1048576 + 2 * 65536, "cut near 1 MiB, at " .. sent)
      c:close()
      serving(t, "after chunked body")
    end)
  end)

  it("invalid percent-encoding in path and query: 400 and close", function()
    fixture.with_server({}, function(t)
      for _, target in ipairs { "/events?category=%zz&timeout=1", "/events?category=a%&timeout=1", "/events?category=%4&timeout=1",
        "/events?category=a&timeout=%", "/events?%zz=1&category=a&timeout=1", "/ev%zzents?category=a&timeout=1", "/events%",
        "/publish%4" } do
        -- the request's framing is intact, so the connection stays usable for the next one
        local c = async.connect(t.port)
        assert(c:send("GET " .. target .. " HTTP/1.1\r\nHost: t\r\n\r\n"))
        local status, _, body = c:read_response()
        assert.equals(400, status, target)
        assert.matches("percent%-encoding", cjson.decode(body).error)
        assert(c:send("GET /events?category=pct&timeout=1&since_time=0 HTTP/1.1\r\nHost: t\r\n\r\n"))
        status, _, body = c:read_response()
        assert.equals(200, status, target)
        assert.equals("no events before timeout", cjson.decode(body).timeout)
        c:close()
      end
      serving(t, "after")
      -- the same bytes correctly escaped are just a category
      local status, body = t.get({ { "category", "%zz" }, { "timeout", "1" }, { "since_time", "0" } })
      assert.equals(200, status)
      assert.equals("no events before timeout", body.timeout)
    end)
  end)

  it("NUL bytes: raw in path, query or header is 400; %00 in a category is just a byte", function()
    fixture.with_server({}, function(t)
      for _, req in ipairs {
        "GET /eve\0nts?category=a&timeout=1 HTTP/1.1\r\n\r\n",
        "GET /events?category=a\0b&timeout=1 HTTP/1.1\r\n\r\n",
        "GET /events?category=a&timeout=1 HTTP/1.1\r\nX-A: a\0b\r\n\r\n",
        "GET /events?category=a&timeout=1 HTTP/1.1\r\nX\0A: ab\r\n\r\n",
      } do
        local status, body, closed = raw(t, req)
        assert.equals(400, status, req)
        assert.equals("control character in request head", body.error)
        assert.is_true(closed)
      end
      serving(t, "after raw NULs")
      local status, body = raw(t, "GET /events%00?category=a&timeout=1 HTTP/1.1\r\n\r\n")
      assert.equals(404, status) -- a decoded NUL in the path is just a path that has no route
      assert.equals("not found", body.error)
      -- "a\0b" round-trips: published with a JSON escape, subscribed with %00, answered escaped
      status = t.publish("a\0b", '"nul"')
      assert.equals(200, status)
      local s, _, raw_body = async.http(t.port, { path = "/events?category=a%00b&timeout=1&since_time=0" })
      assert.equals(200, s)
      assert.matches('"category":"a\\u0000b"', raw_body, 1, true)
      assert.equals("a\0b", cjson.decode(raw_body).events[1].category)
      serving(t, "after")
    end)
  end)

  it("invalid UTF-8 in categories: subscribe answers the error, publish 400", function()
    fixture.with_server({}, function(t)
      for _, bad in ipairs { "%FF%FE", "a%C0%AF", "%ED%A0%80", "%F4%90%80%80", "%E2%82", "%80" } do
        local s, _, body = async.http(t.port, { path = "/events?category=" .. bad .. "&timeout=1" })
        assert.equals(200, s) -- golongpoll answers subscribe errors with 200
        assert.equals("Invalid subscription category, must be valid UTF-8.", cjson.decode(body).error, bad)
      end
      for _, bad in ipairs { "\255\254", "a\192\175", "\237\160\128", "\244\144\128\128", "\226\130" } do
        local s, _, body = async.http(t.port, { method = "POST", path = "/publish",
          body = '{"category":"' .. bad .. '","data":1}' })
        assert.equals(400, s)
        assert.is_string(cjson.decode(body).error)
        s = async.http(t.port, { method = "POST", path = "/publish", body = '{"category":"ok","data":"' .. bad .. '"}' })
        assert.equals(400, s)
      end
      -- escapes that decode to invalid UTF-8 (lone surrogates) are refused too
      for _, esc in ipairs { "\\ud800", "\\udfff", "a\\ud800b" } do
        local s = async.http(t.port, { method = "POST", path = "/publish", body = '{"category":"' .. esc .. '","data":1}' })
        assert.equals(400, s, esc)
      end
      assert.equals(0, t.manager:stats().published)
      serving(t, "after")
    end)
  end)

  it("deeply nested JSON (100,000 levels): 400 without a crash", function()
    fixture.with_server({}, function(t)
      local healthy = 0
      local deep = {
        ("["):rep(100000) .. ("]"):rep(100000),
        ('{"a":'):rep(100000) .. "1" .. ("}"):rep(100000),
        ("["):rep(100000), -- never closed
        ("[1,"):rep(100000) .. "1" .. ("]"):rep(100000),
      }
      for i, data in ipairs(deep) do
        local s, _, body = async.http(t.port, { method = "POST", path = "/publish",
          body = '{"category":"deep","data":' .. data .. "}" })
        assert.equals(400, s, "case " .. i)
        assert.is_string(cjson.decode(body).error)
        serving(t, "after case " .. i)
        healthy = healthy + 1
      end
      -- the body itself nested deeply, category never reached
      local s = async.http(t.port, { method = "POST", path = "/publish", body = ("["):rep(300000) })
      assert.equals(400, s)
      -- 500 levels are within the limit and come back as published
      local ok = ("["):rep(500) .. ("]"):rep(500)
      assert.equals(200, (t.publish("deep", ok)))
      local _, _, got = async.http(t.port, { path = "/events?category=deep&timeout=1&since_time=0" })
      assert.matches('"data":' .. ok, got, 1, true)
      assert.equals(healthy + 1, t.manager:stats().published) -- no deep event got in
    end)
  end)

  it("numbers out of range in since_time and timeout, and in published data", function()
    fixture.with_server({ max_longpoll_timeout_seconds = 2 }, function(t)
      local event = assert(t.manager:publish("n", "x"))
      local function sub(query)
        local s, _, body = async.http(t.port, { path = "/events?category=n&" .. query, timeout_ms = 5000 })
        assert.equals(200, s, query)
        return cjson.decode(body)
      end
      local bad_timeout = "Invalid or missing 'timeout' arg.  Must be 1-2."
      for _, v in ipairs { "1e400", "-0", "0", "-1", "99999999999999999999999", "1.5", "0x1", "inf", "nan", "1 ", " 1", "" } do
        assert.equals(bad_timeout, sub("timeout=" .. fixture.escape(v)).error, v)
      end
      assert.equals("no events before timeout", sub("timeout=%2B1").timeout) -- "+1": Go's Atoi takes it
      assert.equals("no events before timeout", sub("timeout=0001").timeout)
      -- (an empty since_time counts as absent, as in golongpoll: see handlers_spec)
      for _, v in ipairs { "99999999999999999999999", "9223372036854775808", "-99999999999999999999", "1e400", "1.5",
        "0x10", "-", "nan", "-9223372036854775809" } do
        assert.equals("Invalid 'since_time' arg.", sub("timeout=1&since_time=" .. fixture.escape(v)).error, v)
      end
      -- the int64 extremes are valid cursors: everything, or nothing yet
      assert.equals(event.id, sub("timeout=1&since_time=-9223372036854775808").events[1].id)
      assert.equals(event.id, sub("timeout=1&since_time=-0").events[1].id)
      assert.equals("no events before timeout", sub("timeout=1&since_time=9223372036854775807").timeout)
      assert.equals("no events before timeout",
        sub("timeout=1&since_time=9223372036854775807&last_id=" .. event.id).timeout)
      -- data numbers come back byte for byte, whatever their range
      for _, num in ipairs { "1e400", "-0", "99999999999999999999999", "-1E-400", "123456789012345678901234567890.5" } do
        assert.equals(200, (t.publish("num", num)), num)
      end
      local _, _, raw_body = async.http(t.port, { path = "/events?category=num&timeout=1&since_time=0" })
      local i = 0
      for data in raw_body:gmatch('"data":([^,}]+)') do
        i = i + 1
        assert.equals(({ "1e400", "-0", "99999999999999999999999", "-1E-400", "123456789012345678901234567890.5" })[i], data)
      end
      assert.equals(5, i)
      for _, num in ipairs { "+1", "01", ".5", "1.", "1e", "-", "NaN", "Infinity", "0x10" } do
        assert.equals(400, (t.publish("num", num)), num)
      end
      serving(t, "after")
    end)
  end)

  it("thousands of query parameters: parsed within max_url_bytes, 414 beyond", function()
    fixture.with_server({}, function(t)
      local filler = ("x=1&"):rep(2000) -- 8,000 bytes
      local s, _, body = async.http(t.port, { path = "/events?" .. filler .. "category=q&timeout=1&since_time=0" })
      assert.equals(200, s)
      assert.equals("no events before timeout", cjson.decode(body).timeout)
      -- 700 categories: refused by max_categories_per_subscription, not by a slow loop
      s, _, body = async.http(t.port, { path = "/events?" .. ("category=q&"):rep(700) .. "timeout=1" })
      assert.equals(200, s)
      assert.matches("Too many categories", cjson.decode(body).error)
      -- 4,000 empty pairs and 3,000 keys without '='
      s = async.http(t.port, { path = "/events?" .. ("&"):rep(4000) .. "category=q&timeout=1&since_time=0" })
      assert.equals(200, s)
      s = async.http(t.port, { path = "/events?" .. ("k&"):rep(3000) .. "category=q&timeout=1&since_time=0" })
      assert.equals(200, s)
      local status, _, closed = raw(t, "GET /events?" .. ("x=1&"):rep(5000) .. "category=q&timeout=1 HTTP/1.1\r\n\r\n")
      assert.equals(414, status)
      assert.is_true(closed)
      serving(t, "after")
    end)
  end)

  it("slow-drip clients: a head dripping one byte every 100 ms gets 408 at header_timeout_ms", function()
    -- header_timeout_ms is 1 s here: the head is ~150 bytes, so a drip that got 408 before its
    -- end was cut by the deadline on the whole head, however slowly this machine runs
    fixture.with_server({}, function(t)
      local request = "GET /events?category=drip&timeout=1 HTTP/1.1\r\nHost: t\r\nX-Slow: " .. ("z"):rep(100) .. "\r\n\r\n"
      local drips = {}
      for d = 1, 3 do
        drips[d] = async.spawn(function()
          local c = async.connect(t.port)
          local started = uv.now()
          local sent = 0
          for i = 1, #request do -- bounded: 408 comes long before the end
            if c.eof or c.buf ~= "" then break end
            if not c:send(request:sub(i, i)) then break end
            sent = i
            async.sleep(100)
          end
          assert.is_true(c:closed_by_peer(2000))
          assert.equals(408, status_of(c.buf))
          local took = uv.now() - started
          assert.is_true(took >= 990 and took < 10000, "408 after " .. took .. " ms")
          assert.is_true(sent < 60, "bytes sent before 408: " .. sent)
          c:close()
        end)
      end
      async.sleep(150)
      serving(t, "during")
      async.wait_all(drips)
      -- a drip that never starts a head (nothing sent) is closed silently at the same bound
      local c = async.connect(t.port)
      assert.is_true(c:closed_by_peer(10000))
      assert.equals("", c.buf)
      c:close()
      serving(t, "after")
    end, { server = { host = "127.0.0.1", port = 0, header_timeout_ms = 1000 } })
  end)

  it("slow-drip clients: a body that stops arriving gets 408 header_timeout_ms after its last byte", function()
    fixture.with_server({}, function(t)
      local before = t.manager:stats().published
      local c = async.connect(t.port)
      assert(c:send("POST /publish HTTP/1.1\r\nContent-Length: 100\r\n\r\n"))
      -- like nginx's client_body_timeout the bound is between two reads, not on the whole body:
      -- a byte every 100 ms keeps the request alive (max_body_bytes and max_connections bound it);
      -- the 1.5 s deadline leaves a slow machine 1.4 s of slack between two drips
      local stalled
      for _ = 1, 10 do
        assert(c:send("x"))
        stalled = uv.now()
        async.sleep(100)
      end
      assert.equals("", c.buf)
      serving(t, "during")
      assert.is_true(c:closed_by_peer(2000))
      local took = uv.now() - stalled
      assert.equals(408, status_of(c.buf))
      assert.is_true(took >= 1400 and took < 10000, "408 " .. took .. " ms after the last byte")
      c:close()
      assert.equals(before + 1, t.manager:stats().published) -- only the healthy client's event
      serving(t, "after")
    end, { server = { host = "127.0.0.1", port = 0, header_timeout_ms = 1500 } })
  end)

  it("clients that never read: pipelined subscribes with ~1 MB answers stay capped, then cut", function()
    fixture.with_server({}, function(t)
      local data = ("d"):rep(4000)
      for _ = 1, 250 do assert(t.manager:publish("big", data)) end -- every answer is ~1 MB
      collectgarbage()
      collectgarbage()
      local before = collectgarbage("count")
      local c = async.connect(t.port)
      c.tcp:read_stop() -- never reads a byte
      -- 200 MB of answers if nothing capped them
      assert(c:send(SUBSCRIBE_HEAD:format("big", 1):rep(200)))
      local server_conn = paused_connection(t)
      assert.truthy(server_conn, "the server paused the non-reading connection")
      async.sleep(300)
      local queued = connection_info(t, server_conn).queued
      assert.is_true(queued <= 3 * 1024 * 1024, "queued " .. queued)
      collectgarbage()
      local grown_kb = collectgarbage("count") - before
      assert.is_true(grown_kb < 8 * 1024, "Lua memory grew by " .. grown_kb .. " KB")
      report("one non-reader, 200 pipelined ~1 MB answers: %d bytes queued, Lua memory +%.0f KB", queued, grown_kb)
      serving(t, "during")
      -- more pipelined requests than max_header_bytes + max_body_bytes: cut off
      for _ = 1, 20 do -- 140 KB a pass
        if not c:send(SUBSCRIBE_HEAD:format("big", 1):rep(2000)) then break end
        if not connection_info(t, server_conn) then break end
      end
      assert.is_true(async.wait_for(function() return connection_info(t, server_conn) == nil end, 3000), "cut off")
      c:close()
      assert.is_true(settled(t))
      local after_kb
      -- the queued answers are released once the handle's close callback ran (a loop turn or two)
      async.wait_for(function()
        collectgarbage()
        after_kb = collectgarbage("count") - before
        return after_kb < 1024
      end, 2000)
      assert.is_true(after_kb < 1024, "Lua memory after the cut: +" .. after_kb .. " KB")
      report("after the cut: Lua memory +%.0f KB", after_kb)
      serving(t, "after")
    end, { timeout_ms = 30000 })
  end)

  it("clients that never read: cut after a keep-alive period with their output paused", function()
    fixture.with_server({}, function(t)
      local data = ("d"):rep(4000)
      for _ = 1, 250 do assert(t.manager:publish("big", data)) end -- every answer is ~1 MB
      local c = async.connect(t.port)
      c.tcp:read_stop() -- never reads a byte, never sends more
      assert(c:send(SUBSCRIBE_HEAD:format("big", 1):rep(20)))
      local server_conn = paused_connection(t)
      assert.truthy(server_conn, "the server paused the non-reading connection")
      local paused_at = uv.now()
      assert.is_true(async.wait_for(function() return connection_info(t, server_conn) == nil end, 10000), "cut off")
      local took = uv.now() - paused_at
      -- a failure deadline: cut at the keep-alive bound (500 ms), not held forever
      assert.is_true(took < 10000, "cut " .. took .. " ms after the pause")
      report("a paused non-reader was cut %d ms after its output stalled (keep-alive 500 ms)", took)
      c:close()
      serving(t, "after")
    end, { server = { host = "127.0.0.1", port = 0, keepalive_timeout_ms = 500 }, timeout_ms = 20000 })
  end)

  it("clients that reset (RST) with megabytes of answers queued: dropped alone, the rest served", function()
    fixture.with_server({}, function(t)
      local data = ("r"):rep(4000)
      for _ = 1, 250 do assert(t.manager:publish("big", data)) end
      for round = 1, 5 do
        -- a bare handle (not async's): it is closed here, by close_reset
        local tcp = uv.new_tcp()
        local connected = async.event()
        tcp:connect("127.0.0.1", t.port, function(err) connected:set(err == nil) end)
        local ok = connected:wait(2000)
        if ok then
          tcp:write(SUBSCRIBE_HEAD:format("big", 1):rep(20)) -- never read: 20 MB of answers
          async.sleep(50)
        end
        -- RST instead of FIN: the server's next write fails (EPIPE/ECONNRESET), never the process
        local reset = async.event()
        tcp:close_reset(function() reset:set() end)
        assert.is_true(ok == true and reset:wait(2000) == true, "round " .. round)
        serving(t, "after reset " .. round)
      end
      assert.is_true(settled(t))
    end, { timeout_ms = 30000 })
  end)

  it("clients that never read: 20 of them at once keep the server's memory bounded", function()
    fixture.with_server({}, function(t)
      local data = ("e"):rep(4000)
      for _ = 1, 250 do assert(t.manager:publish("big", data)) end
      collectgarbage()
      collectgarbage()
      local before = collectgarbage("count")
      local clients = {}
      for i = 1, 20 do
        clients[i] = async.connect(t.port)
        clients[i].tcp:read_stop()
        assert(clients[i]:send(SUBSCRIBE_HEAD:format("big", 1):rep(50)))
      end
      local queued
      assert.is_true(async.wait_for(function()
        local paused = 0
        queued = 0
        for _, conn in ipairs(t.srv:connections()) do
          if conn.paused then paused = paused + 1 end
          queued = queued + conn.queued
        end
        return paused == 20
      end, 5000), "all 20 paused")
      -- uncapped: 1 GB; capped: about 1 MiB + one answer each, held by the C engine
      assert.is_true(queued < 20 * 3 * 1024 * 1024, "queued " .. queued)
      report("20 non-readers x 50 pipelined ~1 MB answers: %.1f MB queued in all", queued / 1048576)
      serving(t, "during")
      collectgarbage()
      local grown_mb = (collectgarbage("count") - before) / 1024
      -- uncapped: 20 x 50 answers of 1 MB = 1 GB; capped: about 1 MiB + one answer each
      assert.is_true(grown_mb < 20 * 3, "Lua memory grew by " .. grown_mb .. " MB")
      report("20 non-readers x 50 pipelined ~1 MB answers: Lua memory +%.1f MB", grown_mb)
      for i = 1, 20 do clients[i]:close() end
      assert.is_true(settled(t))
      local after_mb
      async.wait_for(function()
        collectgarbage()
        after_mb = (collectgarbage("count") - before) / 1024
        return after_mb < 1
      end, 2000)
      assert.is_true(after_mb < 1, "memory returned: +" .. after_mb .. " MB")
      report("after they left: Lua memory +%.2f MB", after_mb)
      serving(t, "after")
    end, { timeout_ms = 30000 })
  end)

  it("a connection flood over max_connections: 503 then close; the holders are still served", function()
    fixture.with_server({}, function(t)
      local holders = {}
      for i = 1, 16 do
        holders[i] = async.spawn(function()
          local s, body = t.get({ { "category", "hold" }, { "timeout", "10" } })
          assert.equals(200, s)
          assert.equals("held", body.events[1].data)
        end)
      end
      assert.is_true(async.wait_for(function() return t.manager:stats().waiting == 16 end, 3000))
      local flood = {}
      for i = 1, 200 do
        flood[i] = async.spawn(function()
          local got, closed = async.raw(t.port, SUBSCRIBE_HEAD:format("x", 1), { timeout_ms = 4000 })
          assert.equals(503, status_of(got), got)
          assert.equals("too many connections", body_of(got).error)
          assert.is_true(closed)
        end)
      end
      async.wait_all(flood)
      assert.equals(16, t.srv:connection_count())
      assert(t.manager:publish("hold", "held")) -- in process: every connection slot is taken
      async.wait_all(holders)
      assert.is_true(settled(t))
      serving(t, "after")
    end, { server = { host = "127.0.0.1", port = 0, max_connections = 16 }, timeout_ms = 30000 })
  end)
end)

describe("robustness: graceful shutdown of bin/longpoll", function()
  local function rss_kb(pid)
    local f = io.open("/proc/" .. pid .. "/status")
    local kb = f and tonumber(f:read("a"):match("VmRSS:%s*(%d+)"))
    if f then f:close() end
    return kb
  end

  it("SIGTERM: waiting polls get the timeout answer, a publisher in flight, new connections refused, exit 0", function()
    async.run(function()
      local child = process.start { "bin/longpoll", "serve", "--port", "0", "--max-timeout", "60" }
      local port = child.port
      assert.is_number(rss_kb(child.pid))
      local big = '"' .. ("b"):rep(60000) .. '"'
      for _ = 1, 40 do
        assert.equals(200, (async.http(port, { method = "POST", path = "/publish", body = '{"category":"big","data":' .. big .. "}" })))
      end
      -- six single-category polls and one on two categories, all waiting
      local polls = {}
      for i = 1, 7 do
        polls[i] = async.spawn(function()
          local path = i == 7 and "/events?category=m1&category=m2&timeout=60" or ("/events?category=w" .. i .. "&timeout=60")
          local s, _, body = async.http(port, { path = path, timeout_ms = 10000 })
          assert.equals(200, s)
          assert.equals("no events before timeout", cjson.decode(body).timeout)
          assert.matches('^{"timeout":"no events before timeout","timestamp":%d+}$', body)
        end)
      end
      assert.is_true(async.wait_for(function()
        local _, _, body = async.http(port, { path = "/stats" })
        return cjson.decode(body).waiting == 7
      end, 20000))
      -- a client that never reads: ~2.4 MB of answers queued behind a closed window
      local stuck = async.connect(port)
      stuck.tcp:read_stop()
      assert(stuck:send(SUBSCRIBE_HEAD:format("big", 1):rep(10)))
      -- a publish whose body is only half sent
      local half = async.connect(port)
      assert(half:send("POST /publish HTTP/1.1\r\nContent-Length: 60\r\n\r\n" .. '{"category":"p","data":'))
      -- publishers in flight: a loop posting until the server goes away. A request still unread
      -- in the kernel when the listener closes meets a connection closed with no answer (as with
      -- Go's Server.Shutdown): never published, since a publish is answered in the same turn.
      local statuses = { ok = 0, refused = 0, unavailable = 0, dropped = 0, other = {} }
      local stop_publishing = false
      local publisher = async.spawn(function()
        for i = 1, 1000 do
          if stop_publishing then break end
          local ok, s = pcall(async.http, port, { method = "POST", path = "/publish", body = '{"category":"p","data":' .. i .. "}",
            timeout_ms = 3000 })
          if ok and s == 200 then
            statuses.ok = statuses.ok + 1
          elseif ok and s == 503 then
            statuses.unavailable = statuses.unavailable + 1
          elseif not ok and tostring(s):find("ECONNREFUSED", 1, true) then
            statuses.refused = statuses.refused + 1
            break
          elseif not ok and (tostring(s):find("no complete response head (got 0 bytes)", 1, true)
            or tostring(s):find("ECONNRESET", 1, true)) then -- reset: it sat in the closed listener's backlog
            statuses.dropped = statuses.dropped + 1
          else
            statuses.other[#statuses.other + 1] = tostring(s)
          end
          async.sleep(5)
        end
      end)
      -- SIGTERM once the publisher is under way (a condition, not a guess at the machine's speed)
      async.wait_or_fail("a first publish to go through", function() return statuses.ok > 0 end, 20000)
      local signalled = uv.now()
      child.handle:kill("sigterm")
      async.wait_all(polls)
      -- the half-sent publish is closed without an answer: nothing half-parsed gets published
      assert.is_true(half:closed_by_peer(3000))
      assert.equals("", half.buf)
      -- the listener is gone while the process still drains the non-reading client
      local ok, err = pcall(async.connect, port)
      assert.is_false(ok)
      assert.matches("ECONNREFUSED", tostring(err))
      assert.is_nil(child.code, "still draining when the new connection was refused")
      local code, signal = child:wait(20000)
      local took = uv.now() - signalled
      stop_publishing = true
      async.wait_all { publisher }
      assert.equals(0, code)
      assert.equals(0, signal)
      assert.is_true(took < 15000, "exited " .. took .. " ms after SIGTERM") -- a failure deadline
      report("SIGTERM: exit 0 after %d ms; publishes: %d ok, %d 503, %d closed unanswered, %d refused", took, statuses.ok,
        statuses.unavailable, statuses.dropped, statuses.refused)
      assert.is_true(statuses.ok > 0, "some publishes went through")
      assert.same({}, statuses.other, table.concat(statuses.other, "; "))
      assert.is_true(statuses.dropped <= 1, "dropped unanswered: " .. statuses.dropped)
      stuck:close()
      half:close()
    end, 30000)
  end)
end)

-- golongpoll parses since_time with Go's strconv.ParseInt(s, 10, 64): a leading '+' is taken,
-- anything outside int64 refused.
describe("robustness: open files", function()
  it("raises the soft RLIMIT_NOFILE to the hard limit and sizes the connection caps from it", function()
    async.run(function()
      local child = process.start({ "bin/longpoll", "serve", "--port", "0" }, { shell = "ulimit -Sn 256;" })
      local f = assert(io.open("/proc/" .. child.pid .. "/limits"))
      local soft, hard = f:read("a"):match("Max open files%s+(%d+)%s+(%d+)")
      f:close()
      assert.equals(hard, soft)
      -- 300 connections at once (over the old soft limit of 256): every one is answered
      local conns = {}
      for i = 1, 300 do conns[i] = async.connect(child.port) end
      for i = 1, 300 do
        assert(conns[i]:send("GET /stats HTTP/1.1\r\nHost: x\r\n\r\n"))
      end
      for i = 1, 300 do
        assert.equals(200, (conns[i]:read_response()), "connection " .. i)
        conns[i]:close()
      end
      assert.equals(0, (child:stop()))
    end, 30000)
  end)
end)

describe("robustness: logging never blocks the loop", function()
  it("writes one message repeated request after request at most 10 times a second, then counts", function()
    local lines = {}
    local logger = require("longpoll.log").new { level = "info", sink = function(_, message, fields)
      lines[#lines + 1] = { message, fields and fields.suppressed }
    end }
    local second = os.time()
    for _ = 1, 500 do logger("warn", "too many connections") end
    logger("warn", "another message")
    if os.time() == second then -- all in one second (else the count restarted: nothing to check)
      assert.equals(11, #lines)
      assert.same({ "another message" }, { lines[11][1] })
    end
    -- the next second: the first line says how many were left out
    async.run(function() async.wait_for(function() return os.time() > second + 1 end, 3000) end)
    local before = #lines
    logger("warn", "too many connections")
    assert.equals(before + 1, #lines)
    assert.is_true(lines[#lines][2] >= 1, "suppressed count")
  end)

  it("keeps serving with stderr a pipe nobody reads, and rate-limits repeated warnings", function()
    async.run(function()
      local child = process.start({ "bin/longpoll", "serve", "--port", "0", "--log-level", "debug" },
        { stderr_unread = true })
      -- every publish logs a debug line of ~16 KB; repeated lines are limited to 10 a second, so
      -- 2.5 s of publishing writes ~400 KB: several times what a pipe holds
      local data = cjson.encode(("x"):rep(16000))
      local started, n = uv.now(), 0
      while uv.now() - started < 2500 and n < 20000 do
        n = n + 1
        local status = async.http(child.port, { method = "POST", path = "/publish", timeout_ms = 10000,
          body = '{"category":"logged","data":' .. data .. "}" })
        assert.equals(200, status, "publish " .. n)
      end
      -- and as many bad publishes (one warning each): the server still answers at once
      for i = 1, 400 do
        local status = async.http(child.port, { method = "POST", path = "/publish", body = "{", timeout_ms = 10000 })
        assert.equals(400, status, "bad publish " .. i)
      end
      local status = async.http(child.port, { path = "/stats", timeout_ms = 5000 })
      assert.equals(200, status)
      local code = child:stop()
      assert.equals(0, code)
    end, 60000)
  end)
end)

describe("since_time parsing matches golongpoll's ParseInt", function()
  it("takes a leading '+' and refuses values below -2^63", function()
    fixture.with_server({}, function(t)
      local function sub(since)
        local s, _, body = async.http(t.port, { path = "/events?category=k&timeout=1&since_time=" .. since })
        assert.equals(200, s)
        return cjson.decode(body)
      end
      assert.equals("no events before timeout", sub("%2B5").timeout, "since_time=+5")
      assert.equals("Invalid 'since_time' arg.", sub("-9223372036854775809").error, "since_time=-2^63-1")
    end)
  end)
end)
