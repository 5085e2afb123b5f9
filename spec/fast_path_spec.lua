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
