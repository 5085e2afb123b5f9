-- The stats endpoint in the engine's native path (src/lp_lua_stats.c): a GET of the manager's
-- stats handler is answered in C, without entering Lua, with the bytes the Lua handler writes for
-- the same request (but for the Date line and the uptime): JSON, Prometheus, a page of the
-- categories, the dashboard page, CORS; the requests it leaves to Lua (errors, HEAD, a query it
-- does not decode) get the Lua handler's answers.
local async = require "support.async"
local fixture = require "support.fixture"
local cjson = require "cjson"

local with_server = fixture.with_server

local function setup(manager, srv)
  srv:route("GET", "/stats", manager.stats_handler)
  srv:route("OPTIONS", "/stats", manager.stats_handler)
  srv:route("HEAD", "/stats", manager.stats_handler)
  -- a wrapper that changes the query: the request is no longer as received, Lua answers it
  srv:route("GET", "/lua-stats", function(req, res)
    req:set_query("unused", nil)
    return manager.stats_handler(req, res)
  end)
  -- a wrapper that hands the request back as it came: C answers it
  srv:route("GET", "/wrapper-stats", function(req, res) return manager.stats_handler(req, res) end)
  srv:route("GET", "/s&t<a>ts", manager.stats_handler)
  srv:route("GET", "/events", manager.subscription_handler)
  srv:route("GET", "/lua-events", function(req, res)
    req:set_query("unused", nil)
    return manager.subscription_handler(req, res)
  end)
  srv:route("GET", "/sse", manager.sse_handler)
  srv:route("GET", "/lua-sse", function(req, res)
    req:set_query("unused", nil)
    return manager.sse_handler(req, res)
  end)
  srv:route("*", "/publish", manager.publish_handler)
end

-- One request, the whole raw answer (head and Content-Length body).
local function raw(port, request)
  local conn = async.connect(port)
  conn:send(request)
  local all = ""
  local ok = async.wait_for(function()
    all = all .. conn.buf
    conn.buf = ""
    local he = all:find("\r\n\r\n", 1, true)
    if he then
      local n = tonumber(all:sub(1, he):match("\r\nContent%-Length: (%d+)\r\n")) or 0
      if request:find("^HEAD") or #all >= he + 3 + n then return true end
    end
    conn:wait_data(200)
    return false
  end, 5000)
  conn:close()
  assert(ok, "no whole answer to " .. request .. ": " .. all)
  return all
end

local function get(port, target, headers)
  return raw(port, ("GET %s HTTP/1.1\r\nHost: x\r\n%s\r\n"):format(target, headers or ""))
end

-- The answer with the Date line, the uptime and the Content-Length its digits change left out.
local function normal(answer)
  return (answer:gsub("Date: [^\r]*\r\n", "Date: -\r\n"):gsub("Content%-Length: %d+\r\n", "Content-Length: -\r\n")
    :gsub('"uptime_seconds":[%d.]+', '"uptime_seconds":-'):gsub("\nlongpoll_uptime_seconds [%d.]+\n", "\nlongpoll_uptime_seconds -\n"))
end

local function body_of(answer)
  return answer:sub(answer:find("\r\n\r\n", 1, true) + 4)
end

-- The same request to the native path and to the Lua one: the same answer; returns it.
local function same_answer(t, target, headers)
  local before = t.srv:fast_answers()
  local c = get(t.port, "/stats" .. target, headers)
  assert.equals(before + 1, t.srv:fast_answers(), "the native path answered " .. target)
  local lua = get(t.port, "/lua-stats" .. target, headers)
  assert.equals(before + 1, t.srv:fast_answers(), "Lua answered " .. target)
  -- the dashboard page names the path it was asked at
  assert.equals((normal(lua):gsub('data%-stats%-url="/lua%-stats"', 'data-stats-url="/stats"')), normal(c))
  local n = tonumber(c:match("\r\nContent%-Length: (%d+)\r\n"))
  assert.equals(n, #body_of(c))
  return c
end

local function post(port, body, headers)
  return raw(port, ("POST /publish HTTP/1.1\r\nContent-Length: %d\r\n%s\r\n%s"):format(#body, headers or "", body))
end

describe("the stats endpoint in the engine's native path", function()
  it("answers JSON and Prometheus in C with the Lua handler's bytes, counting every kind of waiter", function()
    with_server({ stats_categories = true }, function(t)
      -- every figure the answer holds has something to count: events, idempotency keys (a
      -- replay and a conflict), long polls and streams in C and in Lua
      for i = 1, 3 do assert(t.manager:publish("cat" .. i, { n = i })) end
      assert.matches("^HTTP/1.1 200", post(t.port, '{"category":"k","data":1}', "Idempotency-Key: a\r\n"))
      assert.matches("Idempotent%-Replayed: true", post(t.port, '{"category":"k","data":1}', "Idempotency-Key: a\r\n"))
      assert.matches("^HTTP/1.1 422", post(t.port, '{"category":"k","data":2}', "Idempotency-Key: a\r\n"))
      local held = {}
      for _, path in ipairs { "/events", "/lua-events" } do
        local conn = async.connect(t.port)
        conn:send("GET " .. path .. "?category=w&timeout=30 HTTP/1.1\r\n\r\n")
        held[#held + 1] = conn
      end
      for _, path in ipairs { "/sse", "/lua-sse" } do
        local conn = async.connect(t.port)
        conn:send("GET " .. path .. "?category=s HTTP/1.1\r\n\r\n")
        held[#held + 1] = conn
      end
      assert(async.wait_for(function()
        local s = t.manager:stats()
        return s.timeouts_pending == 2 and s.sse_streams == 2
      end, 5000))

      local c = same_answer(t, "")
      local s = cjson.decode(body_of(c))
      assert.same({ 2, 2, 4, 1, 1, 1 }, { s.long_polls, s.sse_streams, s.waiting, s.idempotency_keys,
        s.idempotency_replays, s.idempotency_conflicts })
      assert.equals(4, s.published)
      assert.matches("\r\nVary: Accept\r\n", c)
      assert.matches("\r\nContent%-Type: application/json\r\n", c)

      local p = same_answer(t, "", "Accept: text/plain\r\n")
      assert.matches("\r\nContent%-Type: text/plain; version=0.0.4; charset=utf%-8\r\n", p)
      assert.truthy(body_of(p):find("\nlongpoll_long_polls 2\n", 1, true))
      assert.truthy(body_of(p):find("\nlongpoll_sse_streams 2\n", 1, true))
      assert.equals(normal(p), normal(same_answer(t, "?format=prometheus", "Accept: application/json\r\n")))
      -- JSON wins over text/plain; OpenMetrics asks for Prometheus
      same_answer(t, "", "Accept: text/plain, application/json\r\n")
      same_answer(t, "", "Accept: application/openmetrics-text\r\n")

      -- a page of the categories, largest first, in both formats
      local page = same_answer(t, "?categories=1&limit=2&offset=1")
      local by = cjson.decode(body_of(page))
      assert.same({ 1, 2 }, { by.categories_offset, by.categories_limit })
      local n = 0
      for _ in pairs(by.by_category) do n = n + 1 end
      assert.equals(2, n)
      same_answer(t, "?categories=true&format=prometheus")
      same_answer(t, "?categories=0&limit=bad") -- no page asked: the limit is not looked at
      -- a wrapper that hands the request back unchanged is answered in C too
      local before = t.srv:fast_answers()
      assert.equals(normal(c), normal(get(t.port, "/wrapper-stats")))
      assert.equals(before + 1, t.srv:fast_answers())
      for _, conn in ipairs(held) do conn:close() end
    end, { setup = setup })
  end)

  it("serves the dashboard page to browsers, its stats URL escaped", function()
    with_server({}, function(t)
      local c = same_answer(t, "", "Accept: text/html\r\n")
      assert.matches("\r\nContent%-Type: text/html; charset=utf%-8\r\n", c)
      assert.matches("\r\nContent%-Security%-Policy: ", c)
      assert.truthy(body_of(c):find('data-stats-url="/stats"', 1, true))
      local before = t.srv:fast_answers()
      local odd = get(t.port, "/s&t<a>ts", "Accept: text/html\r\n")
      assert.equals(before + 1, t.srv:fast_answers())
      assert.truthy(body_of(odd):find('data-stats-url="/s&amp;t&lt;a&gt;ts"', 1, true))
      assert.equals(require("longpoll.dashboard").page("/s&t<a>ts"), body_of(odd))
    end, { setup = setup })
  end)

  it("leaves errors, HEAD and encoded queries to the Lua handler", function()
    with_server({}, function(t)
      local before = t.srv:fast_answers()
      local bad = get(t.port, "/stats?format=xml")
      assert.matches("^HTTP/1.1 400", bad)
      assert.equals('{"error":"Invalid \'format\' arg: must be json or prometheus."}', body_of(bad))
      local secret = get(t.port, "/stats?categories=1")
      assert.matches("^HTTP/1.1 403", secret) -- stats_categories is off: names can be secrets
      local encoded = get(t.port, "/stats?for%6Dat=prometheus")
      assert.matches("\r\nContent%-Type: text/plain", encoded) -- decoded by Lua: it is ?format=
      assert.matches("^HTTP/1.1 200", raw(t.port, "HEAD /stats HTTP/1.1\r\n\r\n"))
      assert.equals(before, t.srv:fast_answers())
      -- after shutdown the Lua handler says so
      t.manager:shutdown()
      assert.matches("^HTTP/1.1 503", get(t.port, "/stats"))
      assert.equals(before, t.srv:fast_answers())
    end, { setup = setup })
  end)

  it("writes the CORS policy's lines and merges its Vary with Accept", function()
    local cors = { origins = { "https://app.example" }, credentials = true }
    with_server({ cors = cors }, function(t)
      local c = same_answer(t, "", "Origin: https://app.example\r\n")
      assert.matches("\r\nVary: Origin, Accept\r\n", c)
      assert.matches("\r\nAccess%-Control%-Allow%-Origin: https://app.example\r\n", c)
      same_answer(t, "", "Origin: https://other.example\r\n")
      same_answer(t, "", "Accept: text/html\r\nOrigin: https://app.example\r\n")
      local pre = raw(t.port, "OPTIONS /stats HTTP/1.1\r\nOrigin: https://app.example\r\n"
        .. "Access-Control-Request-Method: GET\r\n\r\n")
      assert.matches("^HTTP/1.1 204", pre)
    end, { setup = setup })
    with_server({ cors = { origins = "*" } }, function(t)
      local c = same_answer(t, "", "Origin: https://any.example\r\n")
      assert.matches("\r\nVary: Accept\r\n", c)
      assert.matches("\r\nAccess%-Control%-Allow%-Origin: %*\r\n", c)
    end, { setup = setup })
  end)
end)
