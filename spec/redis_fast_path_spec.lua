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
