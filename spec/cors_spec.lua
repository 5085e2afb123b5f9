-- CORS (option `cors`): the option's checks, the headers on answers to allowed origins, and
-- preflight OPTIONS requests, with real requests on every handler.
local uv = require "luv"
local async = require "support.async"
local fixture = require "support.fixture"
local longpoll = require "longpoll"
local cjson = require "cjson"

local A, B, EVIL = "https://a.example", "http://localhost:8080", "https://evil.example"

-- Mounted as an application would: the GET handlers also for OPTIONS (preflight).
local function setup(manager, srv)
  for path, handler in pairs { ["/events"] = manager.subscription_handler, ["/sse"] = manager.sse_handler,
    ["/stats"] = manager.stats_handler } do
    srv:route("GET", path, handler)
    srv:route("OPTIONS", path, handler)
  end
  srv:route("*", "/publish", manager.publish_handler)
end

local function with_server(options, fn)
  return fixture.with_server(options, fn, { setup = setup })
end

local function request(port, method, path, headers, body)
  return async.http(port, { method = method, path = path, headers = headers, body = body })
end

local function preflight(port, path, origin, method, extra)
  local h = { Origin = origin, ["Access-Control-Request-Method"] = method or "GET" }
  for k, v in pairs(extra or {}) do h[k] = v end
  return request(port, "OPTIONS", path, h)
end

describe("cors option", function()
  it("is checked with precise messages", function()
    local cases = {
      { "yes", 'option \'cors\' must be a table like { origins = { "https://a.example" } } or { origins = "*" }' },
      { {}, 'option \'cors\' needs the field \'origins\': "*" or a list of origins like "https://a.example"' },
      { { origins = {} }, 'option \'cors\' field \'origins\' must be "*" or a non-empty list of origins like "https://a.example"' },
      { { origins = "https://a.example" }, 'option \'cors\' field \'origins\' must be "*" or a non-empty list of origins like "https://a.example"' },
      { { origins = { A, "https://b.example/" } },
        'option \'cors\' field \'origins\' entry 2 ("https://b.example/") is not an origin: scheme://host[:port], without path or trailing slash' },
      { { origins = { "a.example" } },
        'option \'cors\' field \'origins\' entry 1 ("a.example") is not an origin: scheme://host[:port], without path or trailing slash' },
      { { origins = { 5 } },
        "option 'cors' field 'origins' entry 1 (number) is not an origin: scheme://host[:port], without path or trailing slash" },
      { { origins = { A, x = 1 } }, "option 'cors' field 'origins' must be a list (no other keys)" },
      { { origins = "*", allow_headers = "X-Token" }, "option 'cors' field 'allow_headers' must be a list of header names" },
      { { origins = "*", allow_headers = { "Content-Type", "bad header" } }, "option 'cors' field 'allow_headers' entry 2 is not a header name" },
      { { origins = "*", max_age = -1 }, "option 'cors' field 'max_age' must be an integer number of seconds, 0 to 86400" },
      { { origins = "*", max_age = 1.5 }, "option 'cors' field 'max_age' must be an integer number of seconds, 0 to 86400" },
      { { origins = "*", credentials = "yes" }, "option 'cors' field 'credentials' must be a boolean" },
      { { origins = "*", credentials = true }, 'option \'cors\' cannot allow credentials for origins = "*": list the origins instead' },
      { { origins = "*", origin = A }, "option 'cors' has an unknown field 'origin' (known: origins, allow_headers, max_age, credentials)" },
    }
    for _, c in ipairs(cases) do
      assert.same({ nil, c[2] }, { longpoll.start { cors = c[1] } })
    end
    for _, good in ipairs {
      { origins = "*" },
      { origins = { A, B }, allow_headers = { "Content-Type", "X-Token" }, max_age = 0, credentials = true },
    } do
      local m = assert(longpoll.start { cors = good })
      m:shutdown()
    end
  end)
end)

describe("cors", function()
  it("echoes an allowed origin with Vary: Origin on every handler's answers", function()
    with_server({ cors = { origins = { A, B } } }, function(t)
      t.manager:publish("c", 1)
      for _, origin in ipairs { A, B } do
        local o = { Origin = origin }
        local checks = {
          { request(t.port, "GET", "/events?category=c&timeout=1&since_time=0", o) },
          { request(t.port, "POST", "/publish", o, '{"category":"c","data":2}') },
          { request(t.port, "GET", "/stats", o) },
          { request(t.port, "HEAD", "/sse?category=c", o) },
        }
        for i, r in ipairs(checks) do
          assert.equals(200, r[1], i)
          assert.equals(origin, r[2]["access-control-allow-origin"], i)
          assert.truthy(r[2]["vary"]:find("Origin", 1, true), i)
          assert.is_nil(r[2]["access-control-allow-credentials"], i)
        end
      end
      -- the stats answer varies by Accept as well
      local _, h = request(t.port, "GET", "/stats", { Origin = A })
      assert.equals("Origin, Accept", h["vary"])
      -- the origin is compared without regard to case, and echoed as sent
      local _, up = request(t.port, "GET", "/stats", { Origin = "HTTPS://A.EXAMPLE" })
      assert.equals("HTTPS://A.EXAMPLE", up["access-control-allow-origin"])
    end)
  end)

  it("adds nothing but Vary for other origins or none, and answers are otherwise unchanged", function()
    with_server({ cors = { origins = { A } } }, function(t)
      t.manager:publish("c", 1)
      for _, h in ipairs { { Origin = EVIL }, {} } do
        local status, headers, body = request(t.port, "GET", "/events?category=c&timeout=1&since_time=0", h)
        assert.equals(200, status)
        assert.is_nil(headers["access-control-allow-origin"])
        assert.equals("Origin", headers["vary"])
        assert.equals(1, cjson.decode(body).events[1].data)
        assert.equals("application/json", headers["content-type"])
        assert.equals("no-cache, no-store, must-revalidate", headers["cache-control"])
      end
    end)
  end)

  it("puts the headers on a long poll answered later and on an SSE stream", function()
    with_server({ cors = { origins = { A } } }, function(t)
      local poll = async.spawn(function()
        local status, h, body = request(t.port, "GET", "/events?category=late&timeout=10", { Origin = A })
        assert.equals(200, status)
        assert.equals(A, h["access-control-allow-origin"])
        assert.equals("later", cjson.decode(body).events[1].data)
      end)
      local conn = async.connect(t.port)
      conn:send("GET /sse?category=late HTTP/1.1\r\nHost: x\r\nOrigin: " .. A .. "\r\n\r\n")
      local deadline = uv.now() + 3000
      while not conn.buf:find("\r\n\r\n", 1, true) and uv.now() < deadline do conn:wait_data(100) end
      assert.truthy(conn.buf:find("Access-Control-Allow-Origin: " .. A .. "\r\n", 1, true))
      assert.truthy(conn.buf:find("Content-Type: text/event-stream\r\n", 1, true))
      async.sleep(100)
      t.manager:publish("late", "later")
      async.wait_all({ poll })
      conn:close()
    end)
  end)

  it("answers preflight requests with 204 and the allowed methods, headers and max age", function()
    with_server({ cors = { origins = { A } } }, function(t)
      for path, methods in pairs { ["/events"] = "GET, HEAD, OPTIONS", ["/sse"] = "GET, HEAD, OPTIONS",
        ["/stats"] = "GET, HEAD, OPTIONS", ["/publish"] = "POST, OPTIONS" } do
        local status, h, body = preflight(t.port, path, A, path == "/publish" and "POST" or "GET",
          { ["Access-Control-Request-Headers"] = "content-type" })
        assert.equals(204, status, path)
        assert.equals("", body)
        assert.equals(A, h["access-control-allow-origin"], path)
        assert.equals(methods, h["access-control-allow-methods"], path)
        assert.equals("Content-Type, Last-Event-ID, Idempotency-Key", h["access-control-allow-headers"], path)
        assert.equals("600", h["access-control-max-age"], path)
        assert.equals("Origin", h["vary"], path)
        assert.is_nil(h["content-length"])
      end
      assert.equals(0, t.manager:stats().waiting) -- a preflight never subscribes
    end)
    with_server({ cors = { origins = { A }, allow_headers = { "X-Token" }, max_age = 30, credentials = true } }, function(t)
      local status, h = preflight(t.port, "/publish", A, "POST")
      assert.equals(204, status)
      assert.equals("X-Token", h["access-control-allow-headers"])
      assert.equals("30", h["access-control-max-age"])
      assert.equals("true", h["access-control-allow-credentials"])
      local _, gh = request(t.port, "GET", "/stats", { Origin = A })
      assert.equals("true", gh["access-control-allow-credentials"])
    end)
  end)

  it("keeps the publish handler's 405 for other methods, plain OPTIONS and other origins' preflights", function()
    with_server({ cors = { origins = { A } } }, function(t)
      local cases = {
        { "GET", { Origin = A } }, { "PUT", {} }, { "DELETE", { Origin = A } }, { "OPTIONS", {} },
        { "OPTIONS", { Origin = A } }, -- no Access-Control-Request-Method: not a preflight
        { "OPTIONS", { Origin = EVIL, ["Access-Control-Request-Method"] = "POST" } },
      }
      for i, c in ipairs(cases) do
        local status, h, body = request(t.port, c[1], "/publish", c[2])
        assert.equals(405, status, i)
        assert.equals("POST", h["allow"], i)
        assert.same({ error = "Invalid HTTP Method. Only POST allowed." }, cjson.decode(body), i)
      end
      -- the GET handlers answer non-preflight OPTIONS as the server would without CORS
      local status, h = request(t.port, "OPTIONS", "/events", { Origin = EVIL, ["Access-Control-Request-Method"] = "GET" })
      assert.equals(405, status)
      assert.equals("GET, HEAD", h["allow"])
      assert.is_nil(h["access-control-allow-origin"])
    end)
  end)

  it("allows any origin with \"*\", without Vary", function()
    with_server({ cors = { origins = "*" } }, function(t)
      local _, h = request(t.port, "GET", "/stats", { Origin = EVIL })
      assert.equals("*", h["access-control-allow-origin"])
      assert.equals("Accept", h["vary"])
      local _, none = request(t.port, "GET", "/stats")
      assert.equals("*", none["access-control-allow-origin"])
      local status, ph = preflight(t.port, "/publish", EVIL, "POST")
      assert.equals(204, status)
      assert.equals("*", ph["access-control-allow-origin"])
      assert.equals("POST, OPTIONS", ph["access-control-allow-methods"])
    end)
  end)

  it("changes nothing when the option is not set", function()
    with_server({}, function(t)
      for _, path in ipairs { "/events?category=c&timeout=1", "/stats" } do
        local _, h = request(t.port, "GET", path, { Origin = A })
        assert.is_nil(h["access-control-allow-origin"])
      end
      -- the handlers mounted for OPTIONS are not wrapped: the publish handler says 405
      local status, h = preflight(t.port, "/publish", A, "POST")
      assert.equals(405, status)
      assert.equals("POST", h["allow"])
    end)
  end)
end)
