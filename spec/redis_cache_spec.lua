-- The Redis engine's node-local cache (engine/redis/cache.lua): catch-ups answered from the
-- events a node received over pub/sub, with the bytes and the "missed" flag Redis gives, and
-- never with something Redis does not hold: cases where the cache and Redis could disagree (a
-- node behind the client, a lost message, Redis losing its data, TTL) go to Redis.
local async = require "support.async"
local redis = require "support.redis"
local engines = require "support.redis_engines"
local cjson = require "cjson"

local wait_until = async.wait_or_fail

if not redis.available() then
  describe("Redis cache", function() pending("redis-server is not installed") end)
  return
end

-- An engine on url; extra: more `redis` keys; o: more options (buffer of 3 by default).
local function new_node(url, extra, o)
  local keys = { url = url }
  for k, v in pairs(extra or {}) do keys[k] = v end
  local opts = { max_event_buffer_size = 3 }
  for k, v in pairs(o or {}) do opts[k] = v end
  return engines.start(keys, opts)
end

local rs, close_node, caught_up = engines.figures, engines.close, engines.caught_up

local function publish(node, category, data_json)
  return assert(engines.publish(node, category, data_json))
end

-- A catch-up: "events", body | "waiting", handle, event (set with the body when it comes). An
-- answer from the cache comes at once; one read from Redis is waited for (no time bound but the
-- failure deadline).
local function catch_up(node, categories, since, last_id)
  local got = async.event()
  local handle = assert(node.engine:subscribe({ categories = categories, since = since, last_id = last_id },
    function(body) got:set(body) end))
  wait_until("the catch-up's read to settle", function() return got.is_set or rs(node).fetches_in_flight == 0 end)
  if got.is_set then return "events", (got:wait(0)) end
  return "waiting", handle, got
end

local function ids(body)
  local out = {}
  for i, e in ipairs(cjson.decode(body).events) do out[i] = e.id end
  return out
end

-- Two nodes A and B with options oa and ob, both online, then fn(A, B); both closed after.
local function with_pair(url, oa, ob, fn)
  async.run(function()
    local A, B = new_node(url, nil, oa), new_node(url, nil, ob)
    wait_until("online", function() return rs(A).online and rs(B).online end)
    local ok, err = pcall(fn, A, B)
    close_node(A)
    close_node(B)
    if not ok then error(err, 0) end
  end, 20000)
end

-- nodes: A publishes, B has the cache, C has none (its answers are Redis's).
local function with_nodes(url, fn, extras)
  async.run(function()
    local nodes = { new_node(url), new_node(url, (extras or {}).B), new_node(url, { cache = false }) }
    wait_until("nodes online", function()
      for _, n in ipairs(nodes) do if not rs(n).online then return false end end
      return true
    end)
    local ok, err = pcall(fn, nodes[1], nodes[2], nodes[3])
    for _, n in ipairs(nodes) do close_node(n) end
    if not ok then error(err, 0) end
  end, 20000)
end

describe("Redis cache", function()
  local R
  setup(function() R = redis.start() end)
  teardown(function() R:stop() end)
  before_each(function() R:cli("FLUSHALL") end)

  it("answers catch-ups from memory with Redis's bytes and missed flag", function()
    with_nodes(R.url, function(A, B, C)
      local e = {}
      for i = 1, 5 do e[i] = publish(A, "c", tostring(i)) end -- buffer 3: e1, e2 dropped
      caught_up(B, A)
      caught_up(C, A)
      local hits = rs(B).cache_hits
      for _, cursor in ipairs { { 0 }, { e[3].timestamp, e[3].id }, { e[4].timestamp - 1 }, { -1 } } do
        local kind_b, body_b = catch_up(B, { "c" }, cursor[1], cursor[2])
        local kind_c, body_c = catch_up(C, { "c" }, cursor[1], cursor[2])
        assert.equals("events", kind_b)
        assert.equals(kind_c, kind_b)
        assert.equals(body_c, body_b) -- the same bytes, "missed" included
      end
      assert.equals(hits + 4, rs(B).cache_hits)
      assert.is_true(cjson.decode((select(2, catch_up(B, { "c" }, 0)))).missed)
      -- nothing after the cursor: it waits without a read, and the next event wakes it
      local kind, handle, got = catch_up(B, { "c" }, e[5].timestamp, e[5].id)
      assert.equals("waiting", kind)
      assert.truthy(handle)
      assert.equals(0, rs(B).fetches_in_flight)
      local e6 = publish(A, "c", "6")
      assert.same({ e6.id }, ids(got:wait(3000)))
    end)
  end)

  it("fills itself from a read of Redis when it started after the events", function()
    with_nodes(R.url, function(A, _, C)
      local e1, e2 = publish(A, "w", "1"), publish(A, "w", "2")
      local B = new_node(R.url) -- starts after e1, e2: its cache begins later
      wait_until("B online", function() return rs(B).online end)
      local ok, err = pcall(function()
        publish(A, "other", "x") -- B's newest message is after e1 and e2
        caught_up(B, A)
        local _, first = catch_up(B, { "w" }, 0)
        assert.same({ e1.id, e2.id }, ids(first))
        assert.equals(1, rs(B).cache_warmed) -- that answer came from Redis and filled the cache
        local hits = rs(B).cache_hits
        local _, again = catch_up(B, { "w" }, 0)
        assert.equals(first, again)
        assert.equals(hits + 1, rs(B).cache_hits)
        local _, ref = catch_up(C, { "w" }, 0)
        assert.equals(ref, again)
      end)
      close_node(B)
      if not ok then error(err, 0) end
    end)
  end)

  it("asks Redis when the client saw more than the node received (a slow link), and hands out nothing twice", function()
    local t = redis.transport()
    with_nodes(R.url, function(A, B)
      publish(A, "s", "0")
      caught_up(B, A)
      t.hold() -- B's pub/sub is slow: e1 and e2 wait in it
      local e1 = publish(A, "s", "1")
      local e2 = publish(A, "s", "2")
      -- a client that got e1 and e2 on A continues on B
      local misses = rs(B).cache_misses
      local kind, _, got = catch_up(B, { "s" }, e2.timestamp, e2.id)
      assert.equals("waiting", kind)
      assert.equals(misses + 1, rs(B).cache_misses) -- read from Redis, not answered from memory
      t.release() -- e1 and e2 reach B now: old news for this client
      async.sleep(50)
      assert.is_false(got.is_set)
      local e3 = publish(A, "s", "3")
      assert.same({ e3.id }, ids(got:wait(3000)))
      -- and a cursor before them is answered from memory once B has them
      caught_up(B, A)
      local _, body = catch_up(B, { "s" }, e1.timestamp, e1.id)
      assert.same({ e2.id, e3.id }, ids(body))
    end, { B = { transport = t.option } })
  end)

  it("is dropped after a lost message, and the catch-up after it comes from Redis", function()
    local t = redis.transport()
    with_nodes(R.url, function(A, B)
      local e1 = publish(A, "g", "1")
      caught_up(B, A)
      t.hold()
      local e2 = publish(A, "g", "2")
      local e3 = publish(A, "g", "3")
      wait_until("both messages held", function() return #t.held == 2 end)
      t.drop(1) -- e2's message is lost
      t.release()
      caught_up(B, A)
      assert.equals(1, rs(B).gaps)
      assert.truthy(rs(B).cache_resets >= 1)
      local _, body = catch_up(B, { "g" }, e1.timestamp, e1.id)
      assert.same({ e2.id, e3.id }, ids(body)) -- e2 is not in B's memory: Redis answered
    end, { B = { transport = t.option } })
  end)

  it("notices a lost first message after its sync (the gap counts from the sync's mark)", function()
    local t = redis.transport()
    with_nodes(R.url, function(A, B)
      t.hold() -- B is synced with nothing received yet: its next message is the mark's seq + 1
      local e1 = publish(A, "f", "1")
      local e2 = publish(A, "f", "2")
      wait_until("both messages held", function() return #t.held == 2 end)
      t.drop(1) -- e1's message is lost
      t.release()
      caught_up(B, A)
      assert.equals(1, rs(B).gaps)
      local _, body = catch_up(B, { "f" }, 0)
      assert.same({ e1.id, e2.id }, ids(body)) -- e1 is not in B's memory: Redis answered
    end, { B = { transport = t.option } })
  end)

  it("never answers with events Redis lost (a restart without data)", function()
    with_nodes(R.url, function(A, B)
      local e1 = publish(A, "r", "1")
      caught_up(B, A)
      assert.same({ e1.id }, ids((select(2, catch_up(B, { "r" }, 0)))))
      R:cli("FLUSHALL") -- Redis forgets everything: a new epoch
      local e2 = publish(A, "r", "2")
      caught_up(B, A)
      assert.same({ e2.id }, ids((select(2, catch_up(B, { "r" }, 0)))))
    end)
  end)

  it("keeps at most max_categories categories; the others are read from Redis", function()
    with_pair(R.url, nil, { max_categories = 2 }, function(A, B)
      local e = {}
      for i = 1, 3 do e[i] = publish(A, "k" .. i, tostring(i)) end
      caught_up(B, A)
      assert.equals(2, rs(B).cache_categories)
      local misses = rs(B).cache_misses
      for i = 1, 3 do assert.same({ e[i].id }, ids((select(2, catch_up(B, { "k" .. i }, 0))))) end
      assert.equals(misses + 1, rs(B).cache_misses) -- k3 came from Redis
    end)
  end)

  it("stays off with a TTL (expiry is Redis's clock, not the node's)", function()
    local ttl = { event_ttl_seconds = 0.3 }
    with_pair(R.url, ttl, ttl, function(A, B)
      assert.is_nil(rs(B).cache_valid)
      publish(A, "t", "1")
      caught_up(B, A)
      wait_until("Redis to trim it", function() return catch_up(B, { "t" }, 0) == "waiting" end, 3000)
      assert.equals("waiting", (catch_up(B, { "t" }, 0))) -- B serves nothing Redis trimmed
    end)
  end)
end)
