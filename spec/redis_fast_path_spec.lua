-- The HTTP engine's native long-poll path in Redis mode (core.native_cached_subscription): a
-- catch-up the node-local cache covers with events is answered in C from that cache, with the
-- bytes the Lua handler writes; everything else (nothing after the cursor, a cursor the cache
-- cannot vouch for, events in two categories, errors, wrappers) goes to Lua and the engine.
local async = require "support.async"
local fixture = require "support.fixture"
local redis = require "support.redis"
local nodes_fixture = require "support.nodes"
local cjson = require "cjson"

local with_server = fixture.with_server
local wait_until = async.wait_or_fail

if not redis.available() then
  describe("Redis native long-poll path", function() pending("redis-server is not installed") end)
  return
end

local function exchange(port, request)
  local conn = async.connect(port)
  conn:send(request)
  local status, h, body = conn:read_response { head = request:find("^HEAD") ~= nil }
  conn:close()
  return status, h, body
end

local function get(port, path, q, version)
  return exchange(port, ("GET %s%s HTTP/%s\r\nHost: x\r\n\r\n"):format(path, q, version or "1.1"))
end

local function routes(manager, srv)
  srv:route("GET", "/events", manager.subscription_handler)
  -- a wrapper that changes the query: the request is no longer as received, Lua answers it
  srv:route("GET", "/lua", function(req, res)
    req:set_query("unused", nil)
    return manager.subscription_handler(req, res)
  end)
  srv:route("GET", "/wrapper", function(req, res) return manager.subscription_handler(req, res) end)
  srv:route("*", "/publish", manager.publish_handler)
end

-- Publishes each { category, data } through the manager and waits until the node received
-- every one over pub/sub (its cache holds them then). Returns the events.
local function publish_all(t, list)
  wait_until("the node online", function() return t.manager.engine:stats().redis_online end)
  local events = {}
  for i, p in ipairs(list) do
    local done = async.event()
    assert(t.manager:publish(p[1], p[2], function(event, err) done:set(event or false, err) end))
    events[i] = assert(done:wait(5000))
  end
  wait_until("the node to receive its events", function()
    local r = t.manager.engine:stats().redis
    return (r.pubsub_seq or -1) >= r.seq
  end)
  return events
end

local function cache_stats(t)
  return t.manager.engine:stats().redis
end

describe("Redis native long-poll path", function()
  local R
  setup(function() R = redis.start() end)
  teardown(function() R:stop() end)
  before_each(function() R:cli("FLUSHALL") end)

  local function options(extra)
    local o = { redis = nodes_fixture.redis_option(R.url), max_event_buffer_size = 3 }
    for k, v in pairs(extra or {}) do o[k] = v end
    return o
  end

  it("answers catch-ups the cache covers in C, with the bytes the Lua handler writes", function()
    with_server(options(), function(t)
      local ev = publish_all(t, { { "a", { n = 1 } }, { "b", { n = 2 } }, { "a", { n = 3 } }, { "a", { n = 4 } },
        { "a", { n = 5 } } })
      local cases = {
        "?category=a&timeout=5&since_time=0", -- 3 of 4 kept: missed
        "?timeout=%2B3&category=%61&since_time=%2B0", -- escapes, '+', decoded like Lua's
        ("?category=a&timeout=5&since_time=%d&last_id=%s"):format(ev[3].timestamp, ev[3].id:upper()),
        "?category=b&category=c&timeout=5&since_time=0", -- events in one of two categories
      }
      for _, q in ipairs(cases) do
        for _, version in ipairs { "1.1", "1.0" } do
          local before, hits = t.srv:fast_answers(), cache_stats(t).cache_hits
          local s1, h1, b1 = get(t.port, "/events", q, version)
          assert.equals(before + 1, t.srv:fast_answers(), q) -- answered without Lua
          local s2, h2, b2 = get(t.port, "/lua", q, version)
          assert.equals(before + 1, t.srv:fast_answers(), q) -- a changed request: Lua's (the cache's too)
          local s3, _, b3 = get(t.port, "/wrapper", q, version)
          assert.equals(before + 2, t.srv:fast_answers(), q) -- a plain wrapper hands it back
          assert.equals(hits + 3, cache_stats(t).cache_hits, q)
          assert.equals(200, s1, q)
          assert.same({ s1, b1 }, { s2, b2 })
          assert.same({ s1, b1 }, { s3, b3 })
          h1.date, h2.date = nil, nil
          assert.same(h2, h1)
        end
      end
      local first = cjson.decode((select(3, get(t.port, "/events", cases[1]))))
      assert.is_true(first.missed)
      assert.same({ 3, 4, 5 }, { first.events[1].data.n, first.events[2].data.n, first.events[3].data.n })
    end, { setup = routes })
  end)

  it("leaves to Lua what the cache cannot answer with events, and answers the same", function()
    with_server(options(), function(t)
      local ev = publish_all(t, { { "a", 1 }, { "b", 2 }, { "a", 3 } })
      local before = t.srv:fast_answers()
      -- events in two categories: their order is Redis's (a read), not the cache's
      local status, _, body = get(t.port, "/events", "?category=a&category=b&timeout=5&since_time=0")
      assert.equals(200, status)
      local got = cjson.decode(body).events
      assert.same({ 1, 2, 3 }, { got[1].data, got[2].data, got[3].data })
      -- a cursor after the node's newest event: the client saw more than the node has
      status, _, body = get(t.port, "/events", ("?category=a&timeout=1&since_time=%d"):format(ev[3].timestamp + 1000))
      assert.equals(200, status)
      assert.equals("no events before timeout", cjson.decode(body).timeout)
      -- nothing after the cursor: the poll waits (parked in C, on the cache), and a publish wakes it
      local waiting = async.connect(t.port)
      waiting:send(("GET /events?category=a&timeout=20&since_time=%d&last_id=%s HTTP/1.1\r\n\r\n")
        :format(ev[3].timestamp, ev[3].id))
      wait_until("the poll to wait", function() return t.manager:stats().waiting == 1 end)
      assert.equals(1, cache_stats(t).cache_parked)
      publish_all(t, { { "a", 4 } })
      local ws, _, wbody = waiting:read_response()
      waiting:close()
      assert.equals(200, ws)
      assert.equals(4, cjson.decode(wbody).events[1].data)
      before = before + 1 -- answered in C
      -- errors get the Lua handler's messages
      _, _, body = get(t.port, "/events", "?category=a&timeout=5&since_time=0&last_id=nope")
      assert.equals("Param 'last_id' was not a valid UUID.", cjson.decode(body).error)
      assert.equals(before, t.srv:fast_answers())
      -- HEAD is Lua's
      local hs, h = exchange(t.port, "HEAD /events?category=a&timeout=5&since_time=0 HTTP/1.1\r\n\r\n")
      assert.equals(200, hs)
      assert.is_true(tonumber(h["content-length"]) > 0)
      assert.equals(before, t.srv:fast_answers())
      -- the cache covers it again: C
      assert.equals(200, (get(t.port, "/events", "?category=a&timeout=5&since_time=0")))
      assert.equals(before + 1, t.srv:fast_answers())
      -- after shutdown the Lua handler answers (503), not the C path
      t.manager:shutdown()
      assert.equals(503, (get(t.port, "/events", "?category=a&timeout=5&since_time=0")))
      assert.equals(before + 1, t.srv:fast_answers())
    end, { setup = routes })
  end)

  it("answers from Redis, not from the cache, after a lost pub/sub message", function()
    local tr = redis.transport()
    with_server(options { redis = nodes_fixture.redis_option(R.url, { transport = tr.option }) }, function(t)
      publish_all(t, { { "a", 1 } })
      assert.equals(200, (get(t.port, "/events", "?category=a&timeout=5&since_time=0")))
      assert.equals(1, t.srv:fast_answers())
      -- the next two messages: the first is lost, so the node sees a gap and drops its cache
      tr.hold()
      for _, data in ipairs { 2, 3 } do
        local done = async.event()
        assert(t.manager:publish("a", data, function(event) done:set(event) end))
        assert(done:wait(5000))
      end
      wait_until("both messages held", function() return #tr.held == 2 end)
      tr.drop(1)
      tr.release()
      wait_until("the gap to drop the cache", function() return cache_stats(t).gaps == 1 end)
      -- the new cache starts at the message after the gap: older cursors are Redis's
      local status, _, body = get(t.port, "/events", "?category=a&timeout=5&since_time=0")
      assert.equals(200, status)
      local got = cjson.decode(body).events
      assert.same({ 1, 2, 3 }, { got[1].data, got[2].data, got[3].data })
      assert.equals(1, t.srv:fast_answers())
      -- the new cache vouches for what is stamped after the message that followed the gap:
      -- an event of a later millisecond, asked for from that message's, comes from C again
      wait_until("a later millisecond", function() return require("longpoll.manager").now_ms() > got[3].timestamp end)
      publish_all(t, { { "a", 4 } })
      status, _, body = get(t.port, "/events", ("?category=a&timeout=5&since_time=%d"):format(got[3].timestamp))
      assert.equals(200, status)
      assert.equals(4, cjson.decode(body).events[1].data)
      assert.equals(2, t.srv:fast_answers())
    end, { setup = routes })
  end)

  it("is not used without the cache, and writes the CORS policy's headers", function()
    with_server(options { redis = nodes_fixture.redis_option(R.url, { cache = false }) }, function(t)
      publish_all(t, { { "a", 1 } })
      assert.equals(200, (get(t.port, "/events", "?category=a&timeout=5&since_time=0")))
      assert.equals(0, t.srv:fast_answers())
      assert.is_nil(t.manager.engine:core_cache())
    end, { setup = routes })
    R:cli("FLUSHALL") -- a fresh Redis: the next node's cache covers every cursor
    with_server(options { cors = { origins = { "http://x" }, credentials = true } }, function(t)
      publish_all(t, { { "a", 1 } })
      local q = "/events?category=a&timeout=5&since_time=0 HTTP/1.1\r\nOrigin: http://x\r\n\r\n"
      local s1, h1, b1 = exchange(t.port, "GET " .. q)
      assert.equals(1, t.srv:fast_answers()) -- the C path writes the policy's headers
      local s2, h2, b2 = exchange(t.port, "GET /lua" .. q:sub(#"/events" + 1))
      assert.equals(1, t.srv:fast_answers())
      assert.equals(200, s1)
      assert.equals("http://x", h1["access-control-allow-origin"])
      assert.same({ s2, b2 }, { s1, b1 })
      h1.date, h2.date = nil, nil
      assert.same(h2, h1)
    end, { setup = routes })
  end)
end)

describe("Redis native long-poll path: polls parked in C on the cache", function()
  local R
  setup(function() R = redis.start() end)
  teardown(function() R:stop() end)
  before_each(function() R:cli("FLUSHALL") end)

  local rs = nodes_fixture.redis_stats

  -- /lua on the node: the manager's handler behind a wrapper that changes the query, so the
  -- Lua path (a Lua waiter, a Lua timeout) answers it
  local function lua_route(node)
    node.srv:route("GET", "/lua", function(req, res)
      req:set_query("unused", nil)
      return node.manager.subscription_handler(req, res)
    end)
  end

  -- Waits until node received every event the other published (over pub/sub).
  local function caught_up(node, other)
    wait_until("the node to receive the events", function() return (rs(node).pubsub_seq or -1) >= rs(other).seq end)
  end

  local function poll(node, path, q)
    local conn = async.connect(node.port)
    conn:send(("GET %s%s HTTP/1.1\r\nHost: x\r\n\r\n"):format(path, q))
    return conn
  end

  local function response(conn)
    local status, h, body = conn:read_response()
    conn:close()
    h.date = nil
    return status, h, body
  end

  local function cursor(category, ev, timeout)
    return ("?category=%s&timeout=%d&since_time=%d&last_id=%s"):format(category, timeout or 20, ev.timestamp, ev.id)
  end

  it("wakes parked polls from an event published on another node, with the Lua path's bytes", function()
    nodes_fixture.with(R.url, 2, {}, function(nodes)
      local A, B = nodes[1], nodes[2]
      lua_route(B)
      local e1 = assert(A.publish("a", { n = 1 }))
      caught_up(B, A)
      local q = cursor("a", e1)
      local c_poll, lua_poll = poll(B, "/events", q), poll(B, "/lua", q)
      local two = poll(B, "/events", ("?category=b&category=a&timeout=20&since_time=%d&last_id=%s")
        :format(e1.timestamp, e1.id))
      wait_until("the polls to wait", function() return rs(B).waiters == 3 end)
      local st = rs(B)
      assert.equals(2, st.cache_parked) -- /events (one category and two); /lua waits in Lua
      assert.equals(2, B.manager:stats().timeouts_pending - B.manager.timeouts:count())
      assert.equals(3, B.manager:stats().waiting)
      local fast, delivered = B.srv:fast_answers(), st.delivered
      local e2 = assert(A.publish("a", { n = 2 }))
      local s1, h1, b1 = response(c_poll)
      local s2, h2, b2 = response(lua_poll)
      local s3, _, b3 = response(two)
      assert.equals(200, s1)
      assert.same({ s1, h1, b1 }, { s2, h2, b2 }) -- byte for byte
      assert.same({ s1, b1 }, { s3, b3 })
      assert.same({ e2.id }, { cjson.decode(b1).events[1].id })
      assert.equals(fast + 2, B.srv:fast_answers())
      st = rs(B)
      assert.equals(0, st.cache_parked)
      assert.equals(2, st.cache_woken)
      assert.equals(delivered + 3, st.delivered)
      assert.equals(0, st.waiters)
    end)
  end)

  it("parks polls without since_time from the node's position, woken with the Lua path's bytes", function()
    nodes_fixture.with(R.url, 2, {}, function(nodes)
      local A, B = nodes[1], nodes[2]
      lua_route(B)
      local e1 = assert(A.publish("a", { n = 1 }))
      caught_up(B, A)
      local q = "?category=a&timeout=20"
      local c_poll, lua_poll = poll(B, "/events", q), poll(B, "/lua", q)
      wait_until("the polls to wait", function() return rs(B).waiters == 2 end)
      assert.equals(1, rs(B).cache_parked) -- /events in C; /lua waits in Lua
      local fast = B.srv:fast_answers()
      local e2 = assert(A.publish("a", { n = 2 }))
      local s1, h1, b1 = response(c_poll)
      local s2, h2, b2 = response(lua_poll)
      assert.same({ s1, h1, b1 }, { s2, h2, b2 }) -- byte for byte
      assert.same({ e2.id }, { cjson.decode(b1).events[1].id }) -- e1 came before: not theirs
      assert.equals(fast + 1, B.srv:fast_answers())
      assert.truthy(e1.id ~= e2.id)
      -- its timeout: a Redis mark, as for the Lua waiter
      c_poll, lua_poll = poll(B, "/events", "?category=a&timeout=1"), poll(B, "/lua", "?category=a&timeout=1")
      wait_until("the polls to wait", function() return rs(B).waiters == 2 end)
      s1, h1, b1 = response(c_poll)
      s2, h2, b2 = response(lua_poll)
      assert.same({ 200, 200, h2 }, { s1, s2, h1 })
      local t1, t2 = cjson.decode(b1), cjson.decode(b2)
      assert.same({ "no events before timeout", "no events before timeout" }, { t1.timeout, t2.timeout })
      assert.truthy(t1.timestamp >= e2.timestamp)
    end)
  end)

  it("answers a parked poll's timeout with a Redis mark, as the Lua path does", function()
    nodes_fixture.with(R.url, 2, {}, function(nodes)
      local A, B = nodes[1], nodes[2]
      lua_route(B)
      local e1 = assert(A.publish("a", 1))
      caught_up(B, A)
      local q = cursor("a", e1, 1)
      local c_poll, lua_poll = poll(B, "/events", q), poll(B, "/lua", q)
      wait_until("the polls to wait", function() return rs(B).waiters == 2 end)
      assert.equals(1, rs(B).cache_parked)
      local s1, h1, b1 = response(c_poll)
      local s2, h2, b2 = response(lua_poll)
      assert.same({ 200, 200, h2 }, { s1, s2, h1 })
      local t1, t2 = cjson.decode(b1), cjson.decode(b2)
      assert.equals("no events before timeout", t1.timeout)
      assert.same(b1, ('{"timeout":"no events before timeout","timestamp":%d}'):format(t1.timestamp))
      assert.equals(t2.timeout, t1.timeout)
      -- a mark: Redis's time a second after the cursor, not the cursor's
      assert.truthy(t1.timestamp >= e1.timestamp + 900)
      local e2 = assert(A.publish("a", 2))
      assert.truthy(e2.timestamp > t1.timestamp)
      -- continuing from it, as golongpoll's client does, skips nothing
      local _, got = B.get({ { "category", "a" }, { "timeout", "5" }, { "since_time", ("%d"):format(t1.timestamp) },
        { "last_id", e1.id } })
      assert.same({ e2.id }, { got.events[1].id })
      assert.equals(0, rs(B).cache_parked)
      assert.equals(0, B.manager:stats().timeouts_pending)
    end)
  end)

  it("answers with the event that precedes the timeout's marker on pub/sub, not the timeout", function()
    nodes_fixture.with(R.url, 2, {}, function(nodes)
      local A, B = nodes[1], nodes[2]
      local e1 = assert(A.publish("a", 1))
      caught_up(B, A)
      local c_poll = poll(B, "/events", cursor("a", e1, 1))
      wait_until("the poll to wait", function() return rs(B).cache_parked == 1 end)
      B.transport.hold()
      local e2 = assert(A.publish("a", 2))
      -- the poll's time is up: its mark's marker comes after e2 on B's pub/sub connection
      wait_until("e2 and the marker held", function() return #B.transport.held == 2 end, 5000)
      assert.equals(1, rs(B).cache_parked)
      B.transport.release()
      local status, _, body = response(c_poll)
      assert.equals(200, status)
      assert.same({ e2.id }, { cjson.decode(body).events[1].id })
      assert.equals(0, rs(B).cache_parked)
    end)
  end)

  it("answers parked polls when the cache is dropped, and the next poll reads what they missed", function()
    nodes_fixture.with(R.url, 2, {}, function(nodes)
      local A, B = nodes[1], nodes[2]
      local e1 = assert(A.publish("a", 1))
      caught_up(B, A)
      local c_poll = poll(B, "/events", cursor("a", e1))
      local now_poll = poll(B, "/events", "?category=a&timeout=20") -- no cursor: from B's position
      wait_until("the polls to wait", function() return rs(B).cache_parked == 2 end)
      -- B loses the first of the next two messages: a gap, the cache is dropped
      B.transport.hold()
      local e2, e3 = assert(A.publish("a", 2)), assert(A.publish("a", 3))
      wait_until("both messages held", function() return #B.transport.held == 2 end)
      B.transport.drop(1)
      B.transport.release()
      local status, _, body = response(c_poll)
      assert.equals(200, status)
      local t1 = cjson.decode(body)
      assert.equals("no events before timeout", t1.timeout)
      assert.truthy(t1.timestamp >= e1.timestamp - 1 and t1.timestamp < e2.timestamp)
      status, _, body = response(now_poll)
      assert.equals(200, status)
      local t2 = cjson.decode(body)
      assert.equals("no events before timeout", t2.timeout)
      assert.truthy(t2.timestamp < e2.timestamp)
      local st = rs(B)
      assert.equals(2, st.cache_ended)
      assert.equals(0, st.cache_parked)
      local _, got = B.get({ { "category", "a" }, { "timeout", "5" }, { "since_time", ("%d"):format(t1.timestamp) },
        { "last_id", e1.id } })
      assert.same({ e2.id, e3.id }, { got.events[1].id, got.events[2] and got.events[2].id })
      -- the poll that had no cursor goes on from its timestamp: it misses neither (it may get e1,
      -- the event at the node's position when it came, again: at least once at that millisecond)
      _, got = B.get({ { "category", "a" }, { "timeout", "5" }, { "since_time", ("%d"):format(t2.timestamp) } })
      local seen = {}
      for _, e in ipairs(got.events) do seen[#seen + 1] = e.id end
      assert.same({ e2.id, e3.id }, { seen[#seen - 1], seen[#seen] })
    end)
  end)

  it("counts the parked polls and the Lua waiters under one max_waiting_per_category", function()
    nodes_fixture.with(R.url, 1, { max_waiting_per_category = 2 }, function(nodes)
      local A = nodes[1]
      lua_route(A)
      local e1 = assert(A.publish("a", 1))
      caught_up(A, A)
      local q = cursor("a", e1)
      -- one poll parked in C, one waiting in Lua: the category is full
      local parked, lua_wait = poll(A, "/events", q), poll(A, "/lua", q)
      wait_until("both polls to wait", function() return rs(A).waiters == 2 end)
      assert.equals(1, rs(A).cache_parked)
      -- a third poll is refused by either path, with the Lua handler's answer
      for _, path in ipairs { "/events", "/lua" } do
        local status, _, body = response(poll(A, path, q))
        assert.equals(503, status, path)
        assert.matches("max_waiting_per_category", cjson.decode(body).error, 1, true)
      end
      assert.same({ 1, 2 }, { rs(A).cache_parked, rs(A).waiters })
      -- a place freed is a place taken: the parked poll's client leaves, another parks
      parked:close()
      wait_until("the poll to be forgotten", function() return rs(A).cache_parked == 0 end)
      local again = poll(A, "/events", q)
      wait_until("the new poll to park", function() return rs(A).cache_parked == 1 end)
      local e2 = assert(A.publish("a", 2))
      for _, conn in ipairs { again, lua_wait } do
        local status, _, body = response(conn)
        assert.equals(200, status)
        assert.equals(e2.id, cjson.decode(body).events[1].id)
      end
    end)
  end)

  it("forgets a parked poll whose client left, and answers the others at shutdown", function()
    nodes_fixture.with(R.url, 1, {}, function(nodes)
      local A = nodes[1]
      local e1 = assert(A.publish("a", 1))
      caught_up(A, A)
      local gone = poll(A, "/events", cursor("a", e1))
      wait_until("the poll to wait", function() return rs(A).cache_parked == 1 end)
      gone:close()
      wait_until("the poll to be forgotten", function() return rs(A).cache_parked == 0 end)
      assert.equals(0, A.manager:stats().timeouts_pending)
      local fast = A.srv:fast_answers()
      assert(A.publish("a", 2))
      assert.equals(fast, A.srv:fast_answers())
      assert.equals(0, rs(A).cache_woken)
      -- at shutdown a parked poll gets the timeout answer, its timestamp a Redis mark
      local e3 = assert(A.publish("a", 3))
      caught_up(A, A)
      local waiting = poll(A, "/events", cursor("a", e3))
      wait_until("the poll to wait", function() return rs(A).cache_parked == 1 end)
      wait_until("a later millisecond", function() return require("longpoll.manager").now_ms() > e3.timestamp + 20 end)
      local stopped = async.event()
      A.manager:shutdown(function() stopped:set(true) end)
      local status, _, body = response(waiting)
      assert.equals(200, status)
      local t1 = cjson.decode(body)
      assert.equals("no events before timeout", t1.timeout)
      assert.truthy(t1.timestamp > e3.timestamp + 20) -- Redis's time now, not the poll's floor
      assert(stopped:wait(5000))
    end)
  end)
end)
