-- The Redis engine through the engine interface alone (docs/architecture.md): two engines
-- ("nodes") on one private redis-server, no manager, no HTTP. What the manager relies on:
-- publish's one contract, subscribe / cancel, the timeout mark's promise, follow, on_event in
-- Redis's order, stats and close.
local uv = require "luv"
local async = require "support.async"
local redis = require "support.redis"
local engines = require "support.redis_engines"
local options = require "longpoll.options"
local core = require "longpoll.core"
local cjson = require "cjson"

local wait_until = async.wait_or_fail

if not redis.available() then
  describe("Redis engine interface", function() pending("redis-server is not installed") end)
  return
end

local function open_handles()
  local n = 0
  uv.walk(function(h) if not async.owns(h) and not h:is_closing() then n = n + 1 end end)
  return n
end

-- An engine on url; node.events lists what on_event got. extra: more `redis` keys, and buffer.
local function new_node(url, extra)
  local keys = { url = url }
  for k, v in pairs(extra or {}) do if k ~= "buffer" then keys[k] = v end end
  return engines.start(keys, { max_event_buffer_size = (extra or {}).buffer or 250 })
end

local function online(node) return engines.figures(node).online end
local close_node = engines.close

-- extras[i]: more `redis` keys for node i.
local function with_nodes(url, n, fn, extras)
  async.run(function()
    local before = open_handles()
    local nodes = {}
    for i = 1, n do nodes[i] = new_node(url, (extras or {})[i]) end
    wait_until("nodes online", function()
      for _, node in ipairs(nodes) do if not online(node) then return false end end
      return true
    end)
    local ok, err = pcall(fn, nodes)
    for _, node in ipairs(nodes) do close_node(node) end
    if not ok then error(err, 0) end
    async.sleep(20)
    assert.equals(before, open_handles())
  end, 20000)
end

local function publish(node, category, data_json)
  return assert(engines.publish(node, category, data_json))
end

local function ids_of(body)
  local out = {}
  for i, e in ipairs(cjson.decode(body).events) do out[i] = e.id end
  return out
end

describe("Redis engine interface", function()
  local R
  setup(function() R = redis.start() end)
  teardown(function() R:stop() end)
  before_each(function() R:cli("FLUSHALL") end)

  it("refuses to start without Redis, with a message naming the address", function()
    local port = redis.free_port()
    local o = assert(options.check { redis = { url = ("redis://127.0.0.1:%d/0"):format(port), connect_timeout_ms = 500 } })
    o.ttl_ms = 0
    local engine, err = require("longpoll.engine.redis").new(o, { log = function() end, on_event = function() end })
    assert.is_nil(engine)
    assert.matches("cannot use Redis at 127.0.0.1:" .. port, err, 1, true)
  end)

  it("publishes with one contract and wakes a subscriber on the other node", function()
    with_nodes(R.url, 2, function(nodes)
      local A, B = nodes[1], nodes[2]
      local answer = async.event()
      local handle = assert(B.engine:subscribe({ categories = { "news" } }, function(body) answer:set(body) end))
      local e = publish(A, "news", '{"n":1}')
      assert.truthy(core.is_uuid(e.id))
      assert.equals("integer", math.type(e.timestamp))
      assert.equals("news", e.category)
      assert.equals('{"n":1}', e.data_json)
      assert.equals(('{"timestamp":%d,"category":"news","data":{"n":1},"id":"%s"}'):format(e.timestamp, e.id), e.json)
      assert.equals('{"events":[' .. e.json .. "]}", answer:wait(3000))
      assert.is_false(B.engine:cancel(handle)) -- answered already
      -- every node's on_event got it, with the same bytes
      wait_until("both nodes to see it", function() return #A.events == 1 and #B.events == 1 end)
      for _, node in ipairs(nodes) do
        local got = node.events[1]
        assert.same({ e.id, e.timestamp, e.category, e.data_json, e.json },
          { got.id, got.timestamp, got.category, got.data_json, got.json })
      end
      -- refused synchronously: the callback is not called
      local called = false
      local ok, err, code = A.engine:publish("bad\255", "1", function() called = true end)
      assert.same({ nil, "category is not valid UTF-8", "EINVAL" }, { ok, err, code })
      assert.is_false(called)
    end)
  end)

  it("answers a cursor from Redis and lets a waiting subscriber be cancelled", function()
    with_nodes(R.url, 2, function(nodes)
      local A, B = nodes[1], nodes[2]
      local e1, e2 = publish(A, "c", "1"), publish(A, "c", "2")
      -- B answers from what it received (its local cache): let it receive them first
      wait_until("B to receive them", function() return #B.events == 2 end)
      local answer = async.event()
      assert(B.engine:subscribe({ categories = { "c" }, since = 0 }, function(body) answer:set(body) end))
      assert.same({ e1.id, e2.id }, ids_of(answer:wait(3000)))
      answer = async.event()
      assert(B.engine:subscribe({ categories = { "c" }, since = e1.timestamp, last_id = e1.id:upper() },
        function(body) answer:set(body) end))
      assert.same({ e2.id }, ids_of(answer:wait(3000)))
      -- nothing after the cursor: it waits until cancelled, and is never answered
      local answered = false
      local handle = assert(B.engine:subscribe({ categories = { "c", "d" }, since = e2.timestamp, last_id = e2.id },
        function() answered = true end))
      wait_until("its read to return", function() return B.engine:stats().redis.fetches_in_flight == 0 end)
      assert.equals(1, B.engine:stats().redis.waiters)
      assert.is_true(B.engine:cancel(handle))
      assert.is_false(B.engine:cancel(handle))
      publish(A, "d", "3")
      wait_until("B to see it", function() return #B.events == 3 end)
      assert.is_false(answered)
      assert.equals(0, B.engine:stats().redis.waiters)
      assert.same({ nil, "last_id must be a UUID", "EINVAL" },
        { B.engine:subscribe({ categories = { "c" }, since = 1, last_id = "x" }, function() end) })
    end)
  end)

  it("gives a timeout mark only after the events before it reached the waiter", function()
    local t = redis.transport()
    with_nodes(R.url, 2, function(nodes)
      local A, B = nodes[1], nodes[2]
      local answer = async.event()
      local handle = assert(B.engine:subscribe({ categories = { "m" } }, function(body) answer:set(body) end))
      t.hold() -- B's pub/sub link is slow: e1 and the marker wait in it
      local e1 = publish(A, "m", "1")
      local timed_out = false
      B.engine:expire(handle, function() timed_out = true end)
      wait_until("e1 and the marker to be held", function() return #t.held == 2 end)
      async.sleep(20)
      assert.is_false(answer.is_set or timed_out) -- the marker has not come yet
      t.release()
      assert.same({ e1.id }, ids_of(answer:wait(3000)))
      async.sleep(20)
      assert.is_false(timed_out) -- e1 answered it: exactly one of the two
      -- a waiter with nothing on its way times out, with a time no later event reaches
      local quiet = async.event()
      local h2 = assert(B.engine:subscribe({ categories = { "m" } }, function() quiet:set("events") end))
      B.engine:expire(h2, function(ts) quiet:set("timeout", ts) end)
      local kind, ts = quiet:wait(3000)
      assert.equals("timeout", kind)
      assert.is_false(B.engine:cancel(h2)) -- its wait ended
      -- a plain mark: the same promise
      local plain = async.event()
      assert.is_true(B.engine:timeout_mark(function(T) plain:set(T) end))
      local T = plain:wait(3000)
      assert.truthy(T >= e1.timestamp and ts >= e1.timestamp)
      assert.truthy(publish(A, "m", "2").timestamp > T)
    end, { [2] = { transport = t.option } })
  end)

  it("follows a stream: every batch after the cursor, each event once, in order", function()
    with_nodes(R.url, 2, function(nodes)
      local A, B = nodes[1], nodes[2]
      local e0 = publish(A, "f", "0")
      local batches = {}
      local handle = assert(B.engine:follow({ "f" }, 0, nil, function(list, missed)
        batches[#batches + 1] = { list = list, missed = missed }
      end))
      wait_until("the catch-up", function() return #batches == 1 end)
      local e1, e2 = publish(A, "f", "1"), publish(A, "f", "2")
      local got = {}
      wait_until("both events", function()
        got = {}
        for _, b in ipairs(batches) do for _, item in ipairs(b.list) do got[#got + 1] = item end end
        return #got == 3
      end)
      for i, e in ipairs({ e0, e1, e2 }) do
        assert.same({ json = e.json, timestamp = e.timestamp, id = e.id, category = "f", data_json = e.data_json },
          got[i])
      end
      assert.is_false(batches[1].missed)
      assert.is_true(B.engine:unfollow(handle))
      assert.is_false(B.engine:unfollow(handle))
      publish(A, "f", "3")
      wait_until("B to see it", function() return #B.events == 4 end)
      assert.equals(3, #got)
      -- a follow still live at close learns it once
      local ended = async.event()
      assert(B.engine:follow({ "f" }, nil, nil, function(list, why) if not list then ended:set(why) end end))
      close_node(B)
      assert.equals("manager is shut down", ended:wait(1000))
      nodes[2] = new_node(R.url) -- with_nodes closes it
      wait_until("the new node online", function() return online(nodes[2]) end)
    end)
  end)

  it("reads again after a lost pub/sub message (a gap) and counts it", function()
    local t = redis.transport()
    with_nodes(R.url, 2, function(nodes)
      local A, B = nodes[1], nodes[2]
      publish(A, "g", "0")
      wait_until("B to see it", function() return B.engine:stats().redis.pubsub_seq ~= nil end)
      local batches = {}
      assert(B.engine:follow({ "g" }, nil, nil, function(list) batches[#batches + 1] = list end))
      t.hold()
      local e1, e2 = publish(A, "g", "1"), publish(A, "g", "2")
      wait_until("both messages held", function() return #t.held == 2 end)
      t.drop(1) -- e1's message is lost
      t.release()
      local got = {}
      wait_until("the read to fill the gap", function()
        got = {}
        for _, list in ipairs(batches) do for _, item in ipairs(list) do got[#got + 1] = item.id end end
        return #got >= 2
      end)
      assert.same({ e1.id, e2.id }, got)
      assert.equals(1, B.engine:stats().redis.gaps)
    end, { [2] = { transport = t.option } })
  end)
end)

describe("longpoll serve's Redis flags", function()
  local cli = require "longpoll.cli"

  it("map to the redis option, and wrong combinations are refused clearly", function()
    assert.is_nil(cli.redis_option({}))
    assert.same({ url = "redis://h:1/0", prefix = "p:" }, cli.redis_option({ redis = "redis://h:1/0", ["redis-prefix"] = "p:" }))
    assert.same({ sentinels = { "a:1", "b:2" }, master_name = "m", wait_replicas = 1 },
      cli.redis_option({ ["redis-sentinel"] = "a:1,b:2", ["redis-master"] = "m", ["redis-wait"] = 1 }))
    assert.same({ shards = { "redis://a:1", "redis://b:2" }, cache = false },
      cli.redis_option({ ["redis-shards"] = "redis://a:1,redis://b:2", ["redis-no-cache"] = true }))
    assert.same({ nil, "--redis-sentinel and --redis-master go together" },
      { cli.redis_option({ ["redis-sentinel"] = "a:1" }) })
    assert.same({ nil, "--redis-wait needs --redis, --redis-sentinel or --redis-shards" },
      { cli.redis_option({ ["redis-wait"] = 1 }) })
    -- and the option's own checks name the key
    local config = require "longpoll.engine.redis.config"
    assert.equals("key 'sentinels' has a bad address \"nohost\" (host:port)", config.check({ sentinels = { "nohost" },
      master_name = "m" }))
    assert.equals("needs both 'sentinels' and 'master_name'", config.check({ sentinels = { "a:1" } }))
    assert.equals("cannot have both 'shards' and 'sentinels'",
      config.check({ shards = { "redis://a:1" }, sentinels = { "a:1" }, master_name = "m" }))
    assert.equals("key 'wait_timeout_ms' must be below 'command_timeout_ms'",
      config.check({ wait_replicas = 1, wait_timeout_ms = 6000 }))
  end)
end)
