-- The HTTP engine's native publish path in Redis mode (core.native_redis_publish): a publish is
-- sent to Redis from C (the engine's script call, on the publisher's own connection), pipelined,
-- and answered in C with the bytes the Lua handler writes; errors too. What C does not take (a bad
-- body, an Idempotency-Key, a wrapper) goes to Lua and is answered as before.
local async = require "support.async"
local fixture = require "support.fixture"
local redis = require "support.redis"
local nodes_fixture = require "support.nodes"

local with_server = fixture.with_server
local wait_until = async.wait_or_fail

if not redis.available() then
  describe("Redis native publish path", function() pending("redis-server is not installed") end)
  return
end

local function exchange(port, request)
  local conn = async.connect(port)
  conn:send(request)
  local status, h, body = conn:read_response()
  conn:close()
  return status, h, body
end

local function post(port, path, body, version, headers)
  return exchange(port, ("POST %s HTTP/%s\r\nHost: x\r\n%sContent-Length: %d\r\n\r\n%s")
    :format(path, version or "1.1", headers or "", #body, body))
end

local function routes(manager, srv)
  srv:route("*", "/publish", manager.publish_handler)
  -- a wrapper is never looked up: the Lua handler answers what it hands on
  srv:route("*", "/lua", function(req, res) return manager.publish_handler(req, res) end)
  srv:route("GET", "/events", manager.subscription_handler)
end

-- The events Redis holds for category, oldest first: { id =, data = } each.
local function stream(R, category)
  local conn = assert(require("longpoll.hiredis").connect("127.0.0.1", R.port, 2000))
  local entries = assert(conn:command({ "XRANGE", "longpoll:s:" .. category, "-", "+" }))
  conn:close()
  local events = {}
  for i, e in ipairs(entries) do events[i] = { id = e[2][2], data = e[2][4] } end
  return events
end

local function online(t)
  wait_until("the node online", function() return t.manager.engine:stats().redis_online end)
  wait_until("the publisher connected", function()
    return t.manager.engine:core_publisher():stats().connected
  end)
end

describe("Redis native publish path", function()
  local R
  setup(function() R = redis.start() end)
  teardown(function() R:stop() end)
  before_each(function() R:cli("FLUSHALL") end)

  local function options(extra)
    local o = { redis = nodes_fixture.redis_option(R.url) }
    for k, v in pairs(extra or {}) do o[k] = v end
    return o
  end

  it("publishes in C with the bytes the Lua handler writes, and Redis stores the same event", function()
    with_server(options(), function(t)
      online(t)
      local n = 0
      for _, version in ipairs { "1.1", "1.0" } do
        for _, body in ipairs { '{"category":"a","data":{"n":1}}', '{ "data" : [1, 2.50, "x\\u00e9"], "category" : "\\u0061" }' } do
          local before = t.srv:fast_answers()
          local s1, h1, b1 = post(t.port, "/publish", body, version)
          assert.equals(before + 1, t.srv:fast_answers(), body) -- answered in C
          local s2, h2, b2 = post(t.port, "/lua", body, version)
          assert.equals(before + 1, t.srv:fast_answers(), body) -- the wrapper: Lua
          assert.equals(200, s1)
          assert.same({ s1, b1 }, { s2, b2 })
          h1.date, h2.date = nil, nil
          assert.same(h2, h1)
          n = n + 2
        end
      end
      -- both paths stored the same data, in order, under event ids of their own
      local events = stream(R, "a")
      assert.equals(n, #events)
      assert.equals('{"n":1}', events[1].data)
      assert.equals(events[1].data, events[2].data)
      assert.equals(events[3].data, events[4].data)
      assert.are_not.equal(events[1].id, events[2].id)
      -- the node counts its publishes, C's too, and its subscribers get them through pub/sub
      assert.equals(n, t.manager:stats().published)
      assert.equals(n / 2, t.manager.engine:core_publisher():stats().published)
      local status, got = t.get({ { "category", "a" }, { "timeout", "5" }, { "since_time", "0" } })
      assert.equals(200, status)
      assert.equals(n, #got.events)
      assert.same({ n = 1 }, got.events[1].data)
    end, { setup = routes })
  end)

  it("connects to the address the engine's link resolved a host name to", function()
    local url = R.url:gsub("127%.0%.0%.1", "localhost")
    with_server(options { redis = nodes_fixture.redis_option(url) }, function(t)
      online(t)
      assert.equals(200, (post(t.port, "/publish", '{"category":"a","data":1}')))
      assert.equals(1, t.srv:fast_answers())
    end, { setup = routes })
  end)

  it("leaves bad bodies, Idempotency-Keys and wrappers to Lua, which answers as before", function()
    with_server(options(), function(t)
      online(t)
      local before = t.srv:fast_answers()
      for _, body in ipairs { "{", '{"category":"a"}', '{"data":1}', '{"category":"","data":1}',
        '{"category":"a","data":null}', '{"category":"\\ud800","data":1}', "" } do
        local s1, _, b1 = post(t.port, "/publish", body)
        local s2, _, b2 = post(t.port, "/lua", body)
        assert.equals(400, s1, body)
        assert.same({ s2, b2 }, { s1, b1 })
      end
      local key = "Idempotency-Key: k1\r\n"
      local s1, h1, b1 = post(t.port, "/publish", '{"category":"a","data":1}', "1.1", key)
      local s2, h2, b2 = post(t.port, "/publish", '{"category":"a","data":1}', "1.1", key)
      assert.equals(200, s1)
      assert.same({ s1, b1 }, { s2, b2 })
      assert.is_nil(h1["idempotent-replayed"])
      assert.equals("true", h2["idempotent-replayed"])
      assert.equals(before, t.srv:fast_answers())
      assert.equals(1, #stream(R, "a"))
    end, { setup = routes })
  end)

  it("pipelines publishes of many connections and answers each connection's in order", function()
    with_server(options(), function(t)
      online(t)
      local conns, per = 8, 25
      local done = {}
      for c = 1, conns do
        done[c] = async.event()
        async.spawn(function()
          local conn = async.connect(t.port)
          -- every request of the connection in one write: HTTP pipelining
          local reqs = {}
          for i = 1, per do
            local body = ('{"category":"p%d","data":%d}'):format(c, i)
            reqs[i] = ("POST /publish HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"):format(#body, body)
          end
          conn:send(table.concat(reqs))
          local ok = 0
          for _ = 1, per do
            local status, _, body = conn:read_response()
            if status == 200 and body == '{"success":true}' then ok = ok + 1 end
          end
          conn:close()
          done[c]:set(ok)
        end)
      end
      for c = 1, conns do assert.equals(per, done[c]:wait(10000)) end
      assert.equals(conns * per, t.manager.engine:core_publisher():stats().published)
      for c = 1, conns do
        local events = stream(R, "p" .. c)
        assert.equals(per, #events)
        for i = 1, per do assert.equals(tostring(i), events[i].data) end
      end
    end, { setup = routes })
  end)

  it("sends the script by its text when Redis lost it (NOSCRIPT)", function()
    with_server(options(), function(t)
      online(t)
      R:cli("SCRIPT FLUSH")
      local before = t.srv:fast_answers()
      local status, _, body = post(t.port, "/publish", '{"category":"a","data":1}')
      assert.equals(200, status)
      assert.equals('{"success":true}', body)
      assert.equals(before + 1, t.srv:fast_answers())
      -- EVAL loaded it again: the next goes by SHA
      assert.equals(200, (post(t.port, "/publish", '{"category":"a","data":2}')))
      assert.equals(2, #stream(R, "a"))
    end, { setup = routes })
  end)

  it("answers every publish in flight with the Lua handler's error when the connection is lost", function()
    local failed = {}
    local o = options { redis = nodes_fixture.redis_option(R.url, { command_timeout_ms = 300 }),
      logger = { level = "warn", sink = function(_, message, fields)
        if message == "publish failed" then failed[#failed + 1] = fields end
      end } }
    with_server(o, function(t)
      online(t)
      -- Redis stops answering: the publishes wait, then the connection counts as lost; first
      -- with C's publishes alone in flight (the Lua connections wait for nothing), then Lua's
      local function paused(paths)
        R:cli("CLIENT PAUSE 1500 WRITE") -- reads (the engine's own) go on
        local answers = {}
        for i, path in ipairs(paths) do
          answers[i] = async.event()
          async.spawn(function() answers[i]:set(post(t.port, path, '{"category":"a","data":1}')) end)
        end
        local bodies = {}
        for i = 1, #paths do
          local status, _, body = answers[i]:wait(10000)
          assert.equals(503, status)
          bodies[i] = body
        end
        R:cli("CLIENT UNPAUSE")
        return bodies
      end
      local bodies = paused { "/publish", "/publish" }
      assert.equals('{"error":"publish failed: Redis connection lost: no reply within 300 ms"}', bodies[1])
      assert.equals(bodies[1], bodies[2])
      assert.is_true(t.manager.engine:stats().redis.command_connected) -- C's own check, not Lua's
      -- each is logged as the engine logs a failed publish
      assert.same({ category = "a", error = "Redis connection lost: no reply within 300 ms" }, failed[1])
      assert.equals(2, #failed)
      online(t)
      assert.same({ bodies[1] }, paused { "/lua" })
      assert.same(failed[1], failed[3]) -- the Lua path's line
      -- it connects again, and publishes go through C again
      wait_until("the pause to end", function() return R:cli("PING") == "PONG" end)
      wait_until("C to publish again", function()
        local before = t.srv:fast_answers()
        local status = post(t.port, "/publish", '{"category":"a","data":2}')
        return status == 200 and t.srv:fast_answers() == before + 1
      end, 10000)
    end, { setup = routes })
  end)

  it("leaves publishes to Lua while Redis is down: the same 503", function()
    local R2 = redis.start()
    with_server(options { redis = nodes_fixture.redis_option(R2.url, { reconnect_max_ms = 50 }) }, function(t)
      online(t)
      R2:kill()
      wait_until("the publisher to notice", function()
        post(t.port, "/publish", '{"category":"a","data":1}')
        return not t.manager.engine:core_publisher():stats().connected
      end)
      local before = t.srv:fast_answers()
      local s1, _, b1 = post(t.port, "/publish", '{"category":"a","data":1}')
      local s2, _, b2 = post(t.port, "/lua", '{"category":"a","data":1}')
      assert.equals(503, s1)
      assert.same({ s1, b1 }, { s2, b2 })
      assert.equals(before, t.srv:fast_answers())
    end, { setup = routes })
    R2:stop()
  end)

  it("drops the answer of a client that left, and goes on", function()
    with_server(options(), function(t)
      online(t)
      R:cli("CLIENT PAUSE 300 WRITE")
      local conn = async.connect(t.port)
      local body = '{"category":"a","data":1}'
      conn:send(("POST /publish HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s"):format(#body, body))
      wait_until("the publish in flight", function()
        return t.manager.engine:core_publisher():stats().in_flight == 1
      end)
      conn:close()
      wait_until("its reply", function() return t.manager.engine:core_publisher():stats().in_flight == 0 end)
      assert.equals(200, (post(t.port, "/publish", body)))
      assert.equals(2, #stream(R, "a"))
    end, { setup = routes })
  end)

  it("leaves a publish on a connection above max_connections to Lua, which refuses it as before", function()
    local server_opts = { host = "127.0.0.1", port = 0, max_connections = 1, reserve_connections = 2 }
    with_server(options(), function(t)
      online(t)
      -- a waiting poll fills max_connections
      local poll = async.connect(t.port)
      poll:send("GET /events?category=w&timeout=20 HTTP/1.1\r\n\r\n")
      wait_until("the poll to wait", function() return t.srv:connection_count() == 1 end)
      local s1, _, b1 = post(t.port, "/publish", '{"category":"a","data":1}')
      local s2, _, b2 = post(t.port, "/lua", '{"category":"a","data":1}')
      assert.equals(503, s1)
      assert.same({ s1, b1 }, { s2, b2 })
      assert.equals('{"error":"too many connections"}', b1)
      assert.equals(0, t.manager.engine:core_publisher():stats().published)
      poll:close()
    end, { setup = routes, server = server_opts })
  end)

  it("logs a malformed event message on the events channel and goes on", function()
    local errors = {}
    local o = options { logger = function(level, message) if level == "error" then errors[#errors + 1] = message end end }
    with_server(o, function(t)
      wait_until("the node online", function() return t.manager.engine:stats().redis_online end)
      R:cli("PUBLISH longpoll:events 'E e 1 2 99\nshort'")
      wait_until("the error logged", function() return #errors == 1 end)
      assert.equals("bad event message from Redis", errors[1])
      local done = async.event()
      assert(t.manager:publish("a", 1, function(event) done:set(event) end))
      assert(done:wait(5000))
      local status, got = t.get({ { "category", "a" }, { "timeout", "5" }, { "since_time", "0" } })
      assert.equals(200, status)
      assert.equals(1, got.events[1].data)
    end, { setup = routes })
  end)

  it("is not used with an add-on, a debug logger, per-category rules or WAIT", function()
    local cases = {
      { add_on = { on_publish = function() end } },
      { logger = function() end },
      { category_options = function() return { max_event_buffer_size = 5 } end },
      { redis = nodes_fixture.redis_option(R.url, { wait_replicas = 1, wait_timeout_ms = 100 }) },
    }
    for _, extra in ipairs(cases) do
      with_server(options(extra), function(t)
        wait_until("the node online", function() return t.manager.engine:stats().redis_online end)
        assert.is_nil(t.manager.native_publish)
        post(t.port, "/publish", '{"category":"a","data":1}')
        assert.equals(0, t.srv:fast_answers())
      end, { setup = routes })
    end
  end)
end)
