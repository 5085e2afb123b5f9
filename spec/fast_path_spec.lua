-- The lean answer paths: the manager's JSON answers written as one prebuilt block, one answer
-- string shared by every plain subscriber a publish wakes, and each other subscriber still
-- answered with its own framing and headers.
local async = require "support.async"
local fixture = require "support.fixture"
local cjson = require "cjson"

local with_server = fixture.with_server

local NO_CACHE = {
  ["content-type"] = "application/json",
  ["cache-control"] = "no-cache, no-store, must-revalidate",
  pragma = "no-cache",
  expires = "0",
  ["x-content-type-options"] = "nosniff",
}

local function check_no_cache(h)
  for name, value in pairs(NO_CACHE) do assert.equals(value, h[name], name) end
  assert.matches("^%a%a%a, %d%d %a%a%a %d%d%d%d %d%d:%d%d:%d%d GMT$", h.date)
end

-- A wrapper as an application writes one: a header of its own, and an attempt at one of the
-- manager's headers, which the manager's value replaces (as set_header always did).
local function wrapped(handler)
  return function(req, res)
    res:set_header("X-Wrapped", "yes")
    res:set_header("Cache-Control", "max-age=60")
    return handler(req, res)
  end
end

local function setup(manager, srv)
  srv:route("GET", "/events", manager.subscription_handler)
  srv:route("GET", "/wrapped", wrapped(manager.subscription_handler))
  srv:route("*", "/publish", manager.publish_handler)
end

local function subscribe(port, request)
  local conn = async.connect(port)
  conn:send(request)
  return conn
end

describe("answers", function()
  it("wake every kind of subscriber with its own framing from one publish", function()
    with_server({}, function(t)
      local q = "?category=fan&timeout=20"
      local plain = subscribe(t.port, "GET /events" .. q .. " HTTP/1.1\r\nHost: x\r\n\r\n")
      local old = subscribe(t.port, "GET /events" .. q .. " HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
      local closing = subscribe(t.port, "GET /events" .. q .. " HTTP/1.1\r\nConnection: close\r\n\r\n")
      local head = subscribe(t.port, "HEAD /events" .. q .. " HTTP/1.1\r\nHost: x\r\n\r\n")
      local wrap = subscribe(t.port, "GET /wrapped" .. q .. " HTTP/1.1\r\nHost: x\r\n\r\n")
      assert(async.wait_for(function() return t.manager:stats().waiting == 5 end, 5000))
      local event = assert(t.manager:publish("fan", { n = 1 }))

      local status, h, body = plain:read_response()
      assert.equals(200, status)
      check_no_cache(h)
      assert.is_nil(h.connection)
      assert.equals(#body, tonumber(h["content-length"]))
      assert.equals(event.id, cjson.decode(body).events[1].id)

      local s2, h2, body2 = old:read_response()
      assert.equals(200, s2)
      assert.equals("keep-alive", h2.connection)
      assert.equals(body, body2)

      local s3, h3, body3 = closing:read_response()
      assert.equals(200, s3)
      assert.equals("close", h3.connection)
      assert.equals(body, body3)
      assert.is_true(closing:closed_by_peer(2000))

      local s4, h4, body4 = head:read_response { head = true }
      assert.equals(200, s4)
      assert.equals(#body, tonumber(h4["content-length"]))
      assert.equals("", body4)

      local s5, h5, body5 = wrap:read_response()
      assert.equals(200, s5)
      check_no_cache(h5)
      assert.equals("yes", h5["x-wrapped"])
      assert.equals(body, body5)

      -- the keep-alive connections serve their next request
      for _, conn in ipairs { plain, old, wrap } do
        conn:send("GET /events?category=fan&timeout=5&since_time=0 HTTP/1.1\r\nHost: x\r\n\r\n")
        local s, _, b = conn:read_response()
        assert.equals(200, s)
        assert.equals(event.id, cjson.decode(b).events[1].id)
      end
      for _, conn in ipairs { plain, old, closing, head, wrap } do conn:close() end
    end, { setup = setup })
  end)

  it("keep a wrapper's headers on immediate answers, and get_header sees the block", function()
    local seen
    with_server({}, function(t)
      t.manager:publish("now", 1)
      local status, h, body = async.http(t.port, { path = "/wrapped?category=now&timeout=5&since_time=0" })
      assert.equals(200, status)
      check_no_cache(h)
      assert.equals("yes", h["x-wrapped"])
      assert.equals(1, cjson.decode(body).events[1].data)
      status, h = async.http(t.port, { path = "/peek?category=now&timeout=5&since_time=0" })
      assert.equals(200, status)
      check_no_cache(h)
      assert.same({ "application/json", "nosniff", nil }, seen)
    end, { setup = function(manager, srv)
      setup(manager, srv)
      srv:route("GET", "/peek", function(req, res)
        manager.subscription_handler(req, res)
        seen = { res:get_header("content-type"), res:get_header("X-Content-Type-Options"),
          res:get_header("X-Other") }
      end)
    end })
  end)

  it("leave no parser on a connection whose long poll was answered", function()
    with_server({}, function(t)
      local conn = subscribe(t.port, "GET /events?category=idle&timeout=20 HTTP/1.1\r\nHost: x\r\n\r\n")
      assert(async.wait_for(function() return t.manager:stats().waiting == 1 end, 5000))
      local info = t.srv:connections()[1]
      assert.equals("answering", info.phase)
      assert.equals(0, info.memory) -- the parser's buffers go while the long poll waits
      t.manager:publish("idle", 1)
      assert.equals(200, (conn:read_response()))
      info = t.srv:connections()[1]
      assert.equals("reading", info.phase)
      assert.equals(0, info.memory) -- and are not made again until bytes arrive
      conn:send("GET /events?category=idle&timeout=5&since_time=0 HTTP/1.1\r\nHost: x\r\n\r\n")
      assert.equals(200, (conn:read_response()))
      conn:close()
    end)
  end)
end)

describe("the engine's native long-poll path", function()
  -- Requests written raw and read back raw: the answer bytes of the C path and of the Lua path
  -- must be the same but for the Date line.
  local function exchange(port, request)
    local conn = async.connect(port)
    conn:send(request)
    local status, h, body = conn:read_response { head = request:find("^HEAD") ~= nil }
    conn:close()
    return status, h, body
  end

  local function native_setup(manager, srv)
    srv:route("GET", "/events", manager.subscription_handler)
    -- a wrapper that changes the query: the request is no longer as received, Lua answers it
    srv:route("GET", "/lua", function(req, res)
      req:set_query("unused", nil)
      return manager.subscription_handler(req, res)
    end)
    srv:route("GET", "/wrapper", function(req, res) return manager.subscription_handler(req, res) end)
    srv:route("GET", "/later", function(req, res) -- the handler called on a later loop turn
      local timer = require("luv").new_timer()
      timer:start(10, 0, function()
        timer:close()
        manager.subscription_handler(req, res)
      end)
    end)
    srv:route("GET", "/guarded", function(req, res)
      if req.headers.authorization ~= "Bearer t" then return res:send(401, { error = "token" }) end
      return manager.subscription_handler(req, res)
    end)
    srv:route("*", "/publish", manager.publish_handler)
    srv:route("*", "/lua-publish", function(req, res) return manager.publish_handler(req, res) end)
  end

  local function post(port, path, body)
    return exchange(port, ("POST %s HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s"):format(path, #body, body))
  end

  it("stores publishes that wake nobody in C, with the bytes the Lua handler writes", function()
    with_server({}, function(t)
      local before = t.srv:fast_answers()
      local s1, h1, b1 = post(t.port, "/publish", '{"category":"p","data":{"n":1}}')
      assert.equals(before + 1, t.srv:fast_answers())
      local s2, h2, b2 = post(t.port, "/lua-publish", '{"category":"p","data":{"n":2}}')
      assert.equals(before + 1, t.srv:fast_answers())
      assert.same({ 200, '{"success":true}' }, { s1, b1 })
      assert.same({ s2, b2 }, { s1, b1 })
      check_no_cache(h1)
      h1.date, h2.date = nil, nil
      assert.same(h2, h1)
      local _, _, body = exchange(t.port, "GET /lua?category=p&timeout=5&since_time=0 HTTP/1.1\r\n\r\n")
      local events = cjson.decode(body).events
      assert.same({ 1, 2 }, { events[1].data.n, events[2].data.n })
      assert.equals(2, t.manager:stats().published)
      -- a poll waiting in C (parked) is woken by a publish stored in C: publish and answer in C
      local parked = async.connect(t.port)
      parked:send("GET /events?category=w&timeout=20 HTTP/1.1\r\n\r\n")
      assert(async.wait_for(function() return t.manager:stats().waiting == 1 end, 5000))
      assert.equals(1, t.manager:stats().timeouts_pending) -- a long poll, counted
      before = t.srv:fast_answers()
      assert.equals(200, (post(t.port, "/publish", '{"category":"w","data":"hi"}')))
      assert.equals(before + 2, t.srv:fast_answers())
      local status, ph, pbody = parked:read_response()
      assert.equals(200, status)
      assert.equals("hi", cjson.decode(pbody).events[1].data)
      parked:close()
      -- a Lua waiter on the category (a changed request waits in Lua): the publish is Lua's, and
      -- the parked poll beside it gets the same bytes as the Lua one
      parked = async.connect(t.port)
      parked:send("GET /events?category=w&timeout=20 HTTP/1.1\r\n\r\n")
      local waiting = async.connect(t.port)
      waiting:send("GET /lua?category=w&timeout=20 HTTP/1.1\r\n\r\n")
      assert(async.wait_for(function() return t.manager:stats().waiting == 2 end, 5000))
      before = t.srv:fast_answers()
      assert.equals(200, (post(t.port, "/publish", '{"category":"w","data":"again"}')))
      assert.equals(before + 1, t.srv:fast_answers()) -- the parked poll's answer, written in C
      local cs, ch, cb = parked:read_response()
      local lws, lh, lwb = waiting:read_response()
      assert.same({ 200, 200 }, { cs, lws })
      assert.equals("again", cjson.decode(cb).events[1].data)
      assert.equals(lwb, cb)
      check_no_cache(ch)
      ch.date, lh.date, ph.date = nil, nil, nil
      assert.same(lh, ch)
      ph["content-length"], ch["content-length"] = nil, nil -- another event
      assert.same(ph, ch)
      parked:close()
      waiting:close()
      before = t.srv:fast_answers()
      -- bad bodies get the Lua handler's messages
      for _, bad in ipairs { "{", '{"data":1}', '{"category":"p"}', '{"category":"","data":1}', '{"category":"p","data":null}' } do
        local bs, _, bb = post(t.port, "/publish", bad)
        local ls, _, lb = post(t.port, "/lua-publish", bad)
        assert.same({ ls, lb }, { bs, bb }, bad)
        assert.equals(400, bs, bad)
      end
      assert.equals(before, t.srv:fast_answers())
      t.manager:shutdown()
      assert.equals(503, (post(t.port, "/publish", '{"category":"p","data":3}')))
      assert.equals(before, t.srv:fast_answers())
    end, { setup = native_setup })
  end)

  it("leaves publishes to Lua when an add-on must hear of them", function()
    local heard = {}
    with_server({ add_on = { on_publish = function(e) heard[#heard + 1] = e.data end } }, function(t)
      assert.equals(200, (post(t.port, "/publish", '{"category":"p","data":7}')))
      assert.same({ 7 }, heard)
      assert.equals(0, t.srv:fast_answers())
    end, { setup = native_setup })
  end)

  it("answers catch-up polls in C with the bytes the Lua handler writes", function()
    with_server({}, function(t)
      for i = 1, 5 do assert(t.manager:publish(i % 2 == 0 and "a" or "b", { n = i })) end
      local cases = {
        "?category=a&timeout=5&since_time=0",
        "?category=a&category=b&timeout=5&since_time=0",
        "?timeout=%2B3&category=%61&since_time=%2B0", -- escapes, '+', decoded like Lua's
        "?category=b&timeout=5&since_time=0&since_time=99999999999999",
      }
      for _, q in ipairs(cases) do
        for _, version in ipairs { "1.1", "1.0" } do
          local before = t.srv:fast_answers()
          local s1, h1, b1 = exchange(t.port, "GET /events" .. q .. " HTTP/" .. version .. "\r\nHost: x\r\n\r\n")
          assert.equals(before + 1, t.srv:fast_answers(), q) -- answered without Lua
          local s2, h2, b2 = exchange(t.port, "GET /lua" .. q .. " HTTP/" .. version .. "\r\nHost: x\r\n\r\n")
          assert.equals(before + 1, t.srv:fast_answers(), q) -- a changed request: Lua's
          local s3, _, b3 = exchange(t.port, "GET /wrapper" .. q .. " HTTP/" .. version .. "\r\nHost: x\r\n\r\n")
          assert.equals(before + 2, t.srv:fast_answers(), q) -- a plain wrapper hands it back
          assert.same({ s1, b1 }, { s3, b3 })
          assert.equals(200, s1)
          assert.same({ s2, b2 }, { s1, b1 })
          check_no_cache(h1)
          h1.date, h2.date = nil, nil
          assert.same(h2, h1)
        end
      end
      -- the cursor: after the last event of "a", nothing: the poll waits, parked in C, and times
      -- out with the bytes of the Lua handler's timeout answer
      local list = cjson.decode((select(3, exchange(t.port, "GET /events?category=a&timeout=5&since_time=0 HTTP/1.1\r\n\r\n")))).events
      local last = list[#list]
      local before = t.srv:fast_answers()
      local q = ("?category=a&timeout=1&since_time=%d&last_id=%s"):format(last.timestamp, last.id:upper())
      local status, h1, body = exchange(t.port, "GET /events" .. q .. " HTTP/1.1\r\n\r\n")
      assert.equals(200, status)
      local answer = cjson.decode(body)
      assert.equals("no events before timeout", answer.timeout)
      assert.is_true(answer.timestamp >= last.timestamp)
      assert.equals(before + 1, t.srv:fast_answers())
      local ls, h2, lbody = exchange(t.port, "GET /lua" .. q .. " HTTP/1.1\r\n\r\n")
      assert.equals(200, ls)
      assert.equals(body:gsub("%d+}$", ""), lbody:gsub("%d+}$", ""))
      assert.is_true(cjson.decode(lbody).timestamp >= answer.timestamp)
      h1.date, h2.date = nil, nil
      assert.same(h2, h1)
      assert.equals(0, t.manager:stats().waiting)
    end, { setup = native_setup })
  end)

  it("leaves errors, waiting polls, HEAD and wrappers to Lua, with their own answers", function()
    with_server({}, function(t)
      assert(t.manager:publish("a", 1))
      local before = t.srv:fast_answers()
      local bad = {
        ["?category=a&since_time=0"] = "Invalid or missing 'timeout' arg.  Must be 1-110.",
        ["?category=a&timeout=0&since_time=0"] = "Invalid or missing 'timeout' arg.  Must be 1-110.",
        ["?timeout=5&since_time=0"] = "Invalid subscription category, must be 1-1024 characters long.",
        ["?category=a&timeout=5&since_time=x"] = "Invalid 'since_time' arg.",
        ["?category=a&timeout=5&since_time=0&last_id=nope"] = "Param 'last_id' was not a valid UUID.",
        ["?category=%FF&timeout=5&since_time=0"] = "Invalid subscription category, must be valid UTF-8.",
      }
      for q, message in pairs(bad) do
        local _, _, body = exchange(t.port, "GET /events" .. q .. " HTTP/1.1\r\n\r\n")
        assert.equals(message, cjson.decode(body).error, q)
      end
      assert.equals(400, (exchange(t.port, "GET /events?category=a&timeout=5&since_time=0&x=%zz HTTP/1.1\r\n\r\n")))
      local status, h = exchange(t.port, "HEAD /events?category=a&timeout=5&since_time=0 HTTP/1.1\r\n\r\n")
      assert.equals(200, status)
      assert.is_true(tonumber(h["content-length"]) > 0)
      assert.equals(401, (exchange(t.port, "GET /guarded?category=a&timeout=5&since_time=0 HTTP/1.1\r\n\r\n")))
      assert.equals(before, t.srv:fast_answers()) -- the wrapper always runs
      assert.equals(200, (exchange(t.port, "GET /guarded?category=a&timeout=5&since_time=0 HTTP/1.1\r\nAuthorization: Bearer t\r\n\r\n")))
      assert.equals(before + 1, t.srv:fast_answers()) -- and hands the request back to C
      before = t.srv:fast_answers()
      local ls, _, lb = exchange(t.port, "GET /later?category=a&timeout=5&since_time=0 HTTP/1.1\r\n\r\n")
      assert.equals(200, ls)
      assert.equals(1, cjson.decode(lb).events[1].data)
      assert.equals(before, t.srv:fast_answers()) -- too late for the received bytes: Lua's
      -- pipelined catch-ups keep their order, answered in C one after the other
      local conn = async.connect(t.port)
      assert(t.manager:publish("b", 2))
      conn:send("GET /events?category=a&timeout=5&since_time=0 HTTP/1.1\r\n\r\n"
        .. "GET /events?category=b&timeout=5&since_time=0 HTTP/1.1\r\n\r\n"
        .. "GET /events?category=a&timeout=5&since_time=0 HTTP/1.1\r\n\r\n")
      local got = {}
      for i = 1, 3 do
        local _, _, body = conn:read_response()
        got[i] = cjson.decode(body).events[1].category
      end
      conn:close()
      assert.same({ "a", "b", "a" }, got)
      assert.equals(before + 3, t.srv:fast_answers())
      -- after shutdown the Lua handler answers (503), not the C path
      t.manager:shutdown()
      status = exchange(t.port, "GET /events?category=a&timeout=5&since_time=0 HTTP/1.1\r\n\r\n")
      assert.equals(503, status)
      assert.equals(before + 3, t.srv:fast_answers())
    end, { setup = native_setup })
  end)

  it("is not used by a manager with its own clock", function()
    local now = 1000000
    with_server({ clock = function() return now end }, function(t)
      assert(t.manager:publish("a", 1))
      assert.equals(200, (exchange(t.port, "GET /events?category=a&timeout=5&since_time=0 HTTP/1.1\r\n\r\n")))
      assert.equals(0, t.srv:fast_answers()) -- the C path reads the wall clock: not for an injected one
    end, { setup = native_setup })
  end)

  -- With the `cors` option the handlers are wrapped by the policy; the C path writes the same
  -- headers (longpoll.cors Policy:native) and answers allowed preflights.
  local function cors_setup(manager, srv)
    for _, m in ipairs { "GET", "OPTIONS" } do
      srv:route(m, "/events", manager.subscription_handler)
      srv:route(m, "/lua", function(req, res) return manager.subscription_handler(req, res) end)
    end
    srv:route("*", "/publish", manager.publish_handler)
    srv:route("*", "/lua-publish", function(req, res) return manager.publish_handler(req, res) end)
  end

  local function same_answers(t, request_of, want_status, fast)
    local before = t.srv:fast_answers()
    local s1, h1, b1 = exchange(t.port, request_of("/events", "/publish"))
    assert.equals(before + (fast and 1 or 0), t.srv:fast_answers(), request_of("/events", "/publish"))
    local s2, h2, b2 = exchange(t.port, request_of("/lua", "/lua-publish"))
    assert.equals(before + (fast and 1 or 0), t.srv:fast_answers())
    assert.equals(want_status, s1)
    assert.same({ s2, b2 }, { s1, b1 })
    h1.date, h2.date = nil, nil
    assert.same(h2, h1)
    return h1
  end

  for _, policy in ipairs {
    { origins = "*" },
    { origins = { "https://a.example", "http://B.example:8080" }, credentials = true, max_age = 60 },
  } do
    it("writes the CORS policy's headers in C: origins " .. tostring(policy.origins[1] or policy.origins), function()
      with_server({ cors = policy }, function(t)
        for i = 1, 3 do assert(t.manager:publish("a", i)) end
        for _, origin in ipairs { "https://a.example", "http://b.EXAMPLE:8080", "https://evil.example", false } do
          local o = origin and ("Origin: " .. origin .. "\r\n") or ""
          local h = same_answers(t, function(path)
            return "GET " .. path .. "?category=a&timeout=5&since_time=0 HTTP/1.1\r\nHost: x\r\n" .. o .. "\r\n"
          end, 200, true)
          local listed = origin and origin ~= "https://evil.example"
          if policy.origins == "*" then
            assert.equals("*", h["access-control-allow-origin"])
          else
            assert.equals("Origin", h.vary)
            assert.equals(listed and origin or nil, h["access-control-allow-origin"])
            assert.equals(listed and "true" or nil, h["access-control-allow-credentials"])
          end
          -- preflights: allowed ones are answered in C, the others by the Lua wrapper
          local allowed = origin and (policy.origins == "*" or listed)
          h = same_answers(t, function(path)
            return "OPTIONS " .. path .. " HTTP/1.1\r\nHost: x\r\n" .. o
              .. "Access-Control-Request-Method: GET\r\n\r\n"
          end, allowed and 204 or 405, allowed)
          if allowed then
            assert.equals("GET, HEAD, OPTIONS", h["access-control-allow-methods"])
            assert.equals(tostring(policy.max_age or 600), h["access-control-max-age"])
          end
          h = same_answers(t, function(_, publish)
            local body = '{"category":"p","data":1}'
            return ("POST %s HTTP/1.1\r\nHost: x\r\n%sContent-Length: %d\r\n\r\n%s"):format(publish, o, #body, body)
          end, 200, true)
          assert.equals(policy.origins == "*" and "*" or (listed and origin or nil), h["access-control-allow-origin"])
        end
        -- a poll parked in C keeps its request's headers for the answer a publish gives it
        local parked = async.connect(t.port)
        parked:send("GET /events?category=w&timeout=20 HTTP/1.1\r\nOrigin: https://a.example\r\n\r\n")
        assert(async.wait_for(function() return t.manager.native:parked() == 1 end, 5000))
        assert(t.manager:publish("w", "x"))
        local status, h, body = parked:read_response()
        parked:close()
        assert.equals(200, status)
        assert.equals("x", cjson.decode(body).events[1].data)
        assert.equals(policy.origins == "*" and "*" or "https://a.example", h["access-control-allow-origin"])
        assert.equals("Idempotent-Replayed", h["access-control-expose-headers"])
      end, { setup = cors_setup })
    end)
  end
end)

describe("SSE streams in the engine's native path", function()
  -- The bytes of a stream served in C and of the same stream served by the Lua hub (a wrapper
  -- that changes the query, so the request is no longer as received) must be the same but for
  -- the Date line and, for a stream "from now on", the time in its starting id.
  local function sse_setup(manager, srv)
    srv:route("GET", "/sse", manager.sse_handler)
    srv:route("GET", "/lua-sse", function(req, res)
      req:set_query("unused", nil)
      return manager.sse_handler(req, res)
    end)
    srv:route("GET", "/wrapper-sse", function(req, res) return manager.sse_handler(req, res) end)
  end

  local function open(port, path, query, version, headers)
    local conn = async.connect(port)
    conn:send(("GET %s%s HTTP/%s\r\nHost: x\r\n%s\r\n"):format(path, query, version or "1.1", headers or ""))
    conn.all = ""
    return conn
  end

  -- Reads until the stream holds text (plain); returns everything read so far.
  local function read_until(conn, text)
    local ok = async.wait_for(function()
      conn.all = conn.all .. conn.buf
      conn.buf = ""
      if conn.all:find(text, 1, true) then return true end
      conn:wait_data(200)
      return false
    end, 5000)
    assert(ok, "never got " .. text .. " in " .. conn.all)
    return conn.all
  end

  local function normal(bytes)
    return (bytes:gsub("Date: [^\r]*\r\n", "Date: -\r\n"):gsub("id: %d+\n\n", "id: (start)\n\n"))
  end

  local function same_streams(t, query, version, headers, wait_text, after)
    local before = t.srv:fast_answers()
    local c = open(t.port, "/sse", query, version, headers)
    local l = open(t.port, "/lua-sse", query, version, headers)
    local w = open(t.port, "/wrapper-sse", query, version, headers)
    for _, conn in ipairs { c, l, w } do read_until(conn, wait_text) end
    assert.truthy(async.wait_for(function() return t.manager:stats().sse_streams == 3 end, 5000))
    assert.equals(before + 2, t.srv:fast_answers()) -- /sse and the plain wrapper, in C
    assert.equals(2, t.manager.native_sse:streams())
    local live = after and after()
    if live then
      for _, conn in ipairs { c, l, w } do read_until(conn, live) end
    end
    assert.equals(normal(l.all), normal(c.all))
    assert.equals(normal(c.all), normal(w.all))
    for _, conn in ipairs { c, l, w } do conn:close() end
    assert.truthy(async.wait_for(function() return t.manager:stats().sse_streams == 0 end, 5000))
    return c.all
  end

  it("writes catch-ups, live events, missed notices and line breaks with the Lua hub's bytes", function()
    with_server({ max_event_buffer_size = 3 }, function(t)
      local events = {}
      for i = 1, 5 do events[i] = assert(t.manager:publish("a", { n = i })) end
      local function id_of(e) return e.timestamp .. "_" .. e.id end
      for _, version in ipairs { "1.1", "1.0" } do
        -- missed (5 published, 3 kept), then a live event whose JSON holds line breaks
        local bytes = same_streams(t, "?category=a&since_time=0", version, "", id_of(events[5]), function()
          local e = assert(t.manager:publish_json("a", '{\r\n "x": 1,\n "y": "z"\r}'))
          return id_of(e)
        end)
        assert.truthy(bytes:find("event: missed\ndata: {\"missed\":true}\n\n", 1, true))
        assert.truthy(bytes:find("\ndata:  \"x\": 1,\ndata:  \"y\": \"z\"\ndata: }", 1, true))
        if version == "1.1" then
          assert.truthy(bytes:find("Transfer-Encoding: chunked\r\n", 1, true))
        else
          assert.truthy(bytes:find("Connection: close\r\n", 1, true))
          assert.falsy(bytes:find("Transfer-Encoding", 1, true))
        end
        events[#events + 1] = assert(t.manager:publish("a", "next"))
      end
      -- Last-Event-ID (header, then the query's last_event_id), several categories, escapes
      local last = events[#events]
      local e2 = assert(t.manager:publish("b", "in b"))
      same_streams(t, "?category=%61&category=b", "1.1", "Last-Event-ID: " .. id_of(events[4]) .. "\r\n", id_of(e2))
      same_streams(t, "?category=a&category=b&last_event_id=" .. id_of(last), "1.1", "", id_of(e2))
      -- from now on: the starting id, then live events
      same_streams(t, "?category=c", "1.1", "", "retry: 3000\nid: ", function()
        return id_of(assert(t.manager:publish("c", "live")))
      end)
    end, { setup = sse_setup })
  end)

  it("ends C streams with the last chunk on shutdown, and leaves HEAD and errors to Lua", function()
    with_server({}, function(t)
      local before = t.srv:fast_answers()
      local status = async.http(t.port, { path = "/sse?category=a&last_event_id=x" })
      assert.equals(400, status)
      status = async.http(t.port, { method = "HEAD", path = "/sse?category=a" })
      assert.equals(200, status)
      assert.equals(before, t.srv:fast_answers())
      local c = open(t.port, "/sse", "?category=s", "1.1", "")
      read_until(c, "retry: 3000\nid: ")
      assert.equals(1, t.manager.native_sse:streams())
      t.manager:shutdown()
      assert.truthy(read_until(c, "\r\n0\r\n\r\n"))
      assert.equals(0, t.manager.native_sse:streams())
      c:close()
    end, { setup = sse_setup })
  end)

  it("is not used by a manager with its own clock", function()
    with_server({ clock = function() return 1000 end }, function(t)
      local c = open(t.port, "/sse", "?category=a", "1.1", "")
      read_until(c, "retry: 3000\nid: 1000\n\n")
      assert.is_nil(t.manager.native_sse)
      assert.equals(1, t.manager:stats().sse_streams)
      c:close()
    end, { setup = sse_setup })
  end)
end)
