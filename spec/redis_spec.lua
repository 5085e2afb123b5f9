-- The Redis engine (option `redis`): the hiredis binding, the connection, and
-- several managers ("nodes") sharing categories through one private
-- redis-server, end to end over HTTP. Each node has its own connections, as
-- separate processes would; scripts/test-redis-cluster runs real processes.
local uv = require "luv"
local cjson = require "cjson"
local async = require "support.async"
local redis = require "support.redis"
local nodes_fixture = require "support.nodes"
local longpoll = require "longpoll"
local core = require "longpoll.core"
local hiredis = require "longpoll.hiredis"
local scripts = require "longpoll.engine.redis.scripts"
local Connection = require "longpoll.engine.redis.connection"

local redis_option = nodes_fixture.redis_option

local wait_until = async.wait_or_fail

local rs = nodes_fixture.redis_stats

-- Waits until node B received over pub/sub every event node A knows of. A node answers
-- catch-ups from its local cache of what it received, so an event published on A a moment ago
-- may reach B's subscribers on their next poll; tests that read on B right after publishing on
-- A wait for that first.
local function caught_up(B, A)
  wait_until("the other node to receive the events", function()
    return rs(B).epoch == rs(A).epoch and (rs(B).pubsub_seq or -1) >= rs(A).seq
  end)
end

local function open_handles()
  local n = 0
  uv.walk(function(h) if not async.owns(h) and not h:is_closing() then n = n + 1 end end)
  return n
end

-- Runs fn(nodes) with n nodes (spec/support/nodes.lua) on the Redis at url, all online first.
local function with_nodes(url, n, options, fn, timeout_ms)
  return nodes_fixture.with(url, n, options, fn, timeout_ms)
end

local function q(category, extra)
  local query = { { "category", category }, { "timeout", "5" } }
  for _, kv in ipairs(extra or {}) do query[#query + 1] = kv end
  return query
end

local function ids(body)
  local out = {}
  for i, e in ipairs(body.events or {}) do out[i] = e.id end
  return out
end

if not redis.available() then
  describe("Redis engine", function()
    pending("redis-server is not installed")
  end)
  return
end

describe("longpoll.hiredis", function()
  it("turns bytes into replies, across partial reads", function()
    local r = hiredis.reader()
    local replies = assert(r:feed("+OK\r\n:-12\r\n$-1\r\n*3\r\n$3\r\nfoo\r\n-ERR bad\r\n*-1\r\n$5\r\nhel"))
    assert.equals(4, replies.n)
    assert.equals("OK", replies[1])
    assert.equals(-12, replies[2])
    assert.equals(hiredis.null, replies[3])
    assert.same({ "foo", { error = "ERR bad" }, hiredis.null }, replies[4])
    assert.same({ n = 0 }, r:feed("lo"))
    local more = assert(r:feed("\r\n$0\r\n\r\n"))
    assert.same({ "hello", "", n = 2 }, more)
    local nul = assert(r:feed("$3\r\na\0b\r\n"))
    assert.equals("a\0b", nul[1])
    assert.same({ nil, 'Protocol error, got "!" as reply type byte' }, { r:feed("!\r\n") })
    r:close()
    r:close() -- twice is harmless
  end)

  it("formats commands, binary-safe, numbers as text", function()
    assert.equals("*3\r\n$3\r\nSET\r\n$3\r\nk\0x\r\n$2\r\n12\r\n", hiredis.format { "SET", "k\0x", 12 })
    assert.has_error(function() hiredis.format {} end)
    assert.has_error(function() hiredis.format { "GET", {} } end)
  end)

  it("reports a refused blocking connection as nil, message", function()
    local conn, err = hiredis.connect("127.0.0.1", redis.free_port(), 500)
    assert.is_nil(conn)
    assert.matches("cannot connect", err)
  end)
end)

describe("option 'redis'", function()
  it("names what is wrong", function()
    local cases = {
      [{ redis = 5 }] = "option 'redis' must be a table",
      [{ redis = { bogus = 1 } }] = "option 'redis' has an unknown key 'bogus'",
      [{ redis = { url = "http://x" } }] = "option 'redis' key 'url' must look like redis://",
      [{ redis = { url = "redis://h:70000" } }] = "option 'redis' key 'url' has a bad port \"70000\"",
      [{ redis = { url = "redis://h/x" } }] = "option 'redis' key 'url' has a bad database number",
      [{ redis = { url = "redis://" } }] = "option 'redis' key 'url' has no host",
      [{ redis = { prefix = "" } }] = "option 'redis' key 'prefix' must be a string of 1 to 256 bytes",
      [{ redis = { command_timeout_ms = 0 } }] = "option 'redis' key 'command_timeout_ms' must be between",
      [{ redis = { reconnect_min_ms = 10, reconnect_max_ms = 5 } }] = "must not exceed",
      [{ redis = {}, delete_event_after_first_retrieval = true }] =
        "option 'delete_event_after_first_retrieval' cannot be used with 'redis'",
      [{ redis = {}, max_buffered_bytes = 1000 }] = "option 'max_buffered_bytes' cannot be used with 'redis'",
      [{ redis = {}, add_on = { on_start = function() end } }] = "add-on 1 has on_start",
    }
    for opts, expected in pairs(cases) do
      local m, err = longpoll.start(opts)
      assert.is_nil(m)
      assert.truthy(err:find(expected, 1, true), ("%q does not contain %q"):format(err, expected))
    end
  end)

  it("makes start fail with a message when Redis does not answer", function()
    local port = redis.free_port()
    local t0 = uv.hrtime()
    local m, err = longpoll.start { redis = { url = ("redis://127.0.0.1:%d"):format(port), connect_timeout_ms = 300 } }
    assert.is_nil(m)
    assert.equals(("cannot use Redis at 127.0.0.1:%d: cannot connect: Connection refused"):format(port), err)
    assert.truthy((uv.hrtime() - t0) / 1e6 < 5000) -- failure deadline: refused, not hung
  end)
end)

describe("Redis connection", function()
  local R
  setup(function() R = redis.start() end)
  teardown(function() R:stop() end)

  it("pipelines many commands and matches replies in order", function()
    async.run(function()
      local conn = Connection.new({ host = "127.0.0.1", port = R.port, db = 0, connect_timeout_ms = 1000,
        command_timeout_ms = 2000 })
      local ready = async.event()
      conn:connect({ { "SELECT", 3 } }, function(replies) ready:set(replies) end)
      assert.same({ "OK" }, ready:wait(2000))
      local got, done = {}, async.event()
      for i = 1, 2000 do
        assert(conn:command({ "ECHO", i }, function(reply)
          got[#got + 1] = tonumber(reply)
          if #got == 2000 then done:set() end
        end))
        if i == 1 then assert.equals(1, conn:in_flight()) end
      end
      assert(done:wait(5000))
      for i = 1, 2000 do assert.equals(i, got[i]) end
      local err_done = async.event()
      conn:command({ "NOSUCHCOMMAND" }, function(reply, err) err_done:set(reply == nil and err) end)
      assert.matches("^ERR unknown command", err_done:wait(2000))
      conn:close()
      assert.same({ nil, "Redis connection closed" }, { conn:command({ "PING" }, function() end) })
    end)
  end)

  it("fails the commands in flight when Redis goes away, then reports the loss once", function()
    local R2 = redis.start()
    async.run(function()
      local lost = {}
      local conn = Connection.new({ host = "127.0.0.1", port = R2.port, db = 0, connect_timeout_ms = 1000,
        command_timeout_ms = 5000 }, nil, function(err) lost[#lost + 1] = err end)
      local ready = async.event()
      conn:connect(nil, function() ready:set() end)
      assert(ready:wait(2000))
      local failed = async.event()
      conn:command({ "BLPOP", "nothing", "10" }, function(reply, err, is_lost) failed:set(reply == nil and err, is_lost) end)
      async.sleep(50)
      R2:kill()
      local err, is_lost = failed:wait(3000)
      assert.matches("Redis connection lost", err)
      assert.is_true(is_lost)
      wait_until("the loss", function() return #lost == 1 end)
      async.sleep(50)
      assert.equals(1, #lost)
    end)
    R2:stop()
  end)
end)

describe("Redis engine", function()
  local R
  setup(function() R = redis.start() end)
  teardown(function() R:stop() end)
  before_each(function() R:cli("FLUSHALL") end)

  it("builds the event JSON byte for byte as the in-memory core does", function()
    local category = 'news/é "quoted" \\ \t ünïcode'
    local data_json = '{"n":9007199254740993,"s":"a\\u0000b","l":[1,2.5,true,null]}'
    local memory = assert(longpoll.start {})
    local e_mem = assert(memory:publish_json(category, data_json))
    memory:shutdown()
    with_nodes(R.url, 2, {}, function(nodes)
      local function shape(ev, json)
        json = json or ev.json
        local at = assert(json:find(ev.id, 1, true))
        json = json:sub(1, at - 1) .. "ID" .. json:sub(at + #ev.id)
        return (json:gsub('"timestamp":%d+', '"timestamp":T'))
      end
      local done = async.event()
      assert.is_true(nodes[1].manager:publish_json(category, data_json, function(ev) done:set(ev) end))
      local e = assert(done:wait(3000))
      assert.equals(shape(e_mem), shape(e))
      assert.equals("integer", math.type(e.timestamp))
      assert.truthy(core.is_uuid(e.id))
      assert.equals(category, e.category)
      assert.equals(data_json, e.data_json)
      assert.equals("a\0b", e.data.s) -- data decoded on first use
      -- over HTTP too, and node 2 hands out exactly those bytes
      assert.equals(200, (nodes[1].publish_http(category, data_json)))
      caught_up(nodes[2], nodes[1])
      local _, body, raw = nodes[2].get(q(category, { { "since_time", 0 } }))
      assert.equals(2, #body.events)
      local second = raw:sub(#'{"events":[' + #e.json + 2, -3)
      assert.equals('{"events":[' .. e.json .. "," .. second .. "]}", raw)
      assert.equals(shape(e_mem), shape({ id = body.events[2].id }, second))
    end)
  end)

  it("wakes a subscriber waiting on another node", function()
    with_nodes(R.url, 2, {}, function(nodes)
      local got
      local t = async.spawn(function() got = select(2, nodes[2].get(q("news"))) end)
      wait_until("the subscriber to wait", function() return rs(nodes[2]).waiters == 1 end)
      local status, body = nodes[1].publish_http("news", '"hello"')
      assert.equals(200, status)
      assert.same({ success = true }, body)
      async.wait_all { t }
      assert.equals(1, #got.events)
      assert.equals("hello", got.events[1].data)
      assert.equals("news", got.events[1].category)
      assert.equals(0, rs(nodes[2]).waiters)
    end)
  end)

  it("answers catch-up requests on any node from Redis, with golongpoll's cursor", function()
    with_nodes(R.url, 2, {}, function(nodes)
      -- every event lands in one millisecond: the clock's last timestamp is ahead of now
      local sec = tonumber(R:cli("TIME"):match("^(%d+)"))
      local ahead = sec * 1000 + 60000
      R:cli(("HSET longpoll:clock last %d"):format(ahead))
      local e = {}
      for i = 1, 4 do e[i] = assert(nodes[1].publish("c", i)) end
      for i = 1, 4 do assert.equals(ahead, e[i].timestamp) end -- max(now, last issued)
      local B = nodes[2]
      caught_up(B, nodes[1])
      local _, body = B.get(q("c", { { "since_time", ahead }, { "last_id", e[2].id } }))
      assert.same({ e[3].id, e[4].id }, ids(body))
      _, body = B.get(q("c", { { "since_time", ahead }, { "last_id", e[2].id:upper() } }))
      assert.same({ e[3].id, e[4].id }, ids(body))
      _, body = B.get(q("c", { { "since_time", ahead - 1 } }))
      assert.same({ e[1].id, e[2].id, e[3].id, e[4].id }, ids(body))
      -- a last_id no longer buffered: every event of that millisecond is newer
      _, body = B.get(q("c", { { "since_time", ahead }, { "last_id", core.uuid() } }))
      assert.equals(4, #body.events)
      assert.is_nil(body.missed)
      _, body = B.get(q("c", { { "since_time", -5 } }))
      assert.equals(4, #body.events)
      -- nothing after the cursor: the request waits, and a later publish answers it
      local got
      local t = async.spawn(function()
        got = select(2, B.get(q("c", { { "since_time", ahead }, { "last_id", e[4].id } })))
      end)
      wait_until("the subscriber to wait", function() return rs(B).waiters == 1 end)
      local e5 = assert(nodes[1].publish("c", 5))
      async.wait_all { t }
      assert.same({ e5.id }, ids(got))
      -- several categories: one order for all, last_id from either of them
      local o1 = assert(nodes[1].publish("other", "x"))
      caught_up(B, nodes[1])
      _, body = B.get({ { "category", "c" }, { "category", "other" }, { "timeout", "5" },
        { "since_time", ahead }, { "last_id", e[3].id } })
      assert.same({ e[4].id, e5.id, o1.id }, ids(body))
    end)
  end)

  it("keeps max_event_buffer_size in Redis and reports missed events", function()
    with_nodes(R.url, 2, { max_event_buffer_size = 3 }, function(nodes)
      local e = {}
      for i = 1, 5 do e[i] = assert(nodes[i % 2 + 1].publish("b", i)) end
      assert.equals("3", R:cli("XLEN longpoll:s:b"))
      local _, body = nodes[2].get(q("b", { { "since_time", 0 } }))
      assert.same({ e[3].id, e[4].id, e[5].id }, ids(body))
      assert.is_true(body.missed)
      -- the newest dropped event was seen: nothing missed
      _, body = nodes[1].get(q("b", { { "since_time", e[2].timestamp }, { "last_id", e[2].id } }))
      assert.same({ e[3].id, e[4].id, e[5].id }, ids(body))
      assert.is_nil(body.missed)
      _, body = nodes[1].get(q("b", { { "since_time", e[3].timestamp }, { "last_id", e[3].id } }))
      assert.same({ e[4].id, e[5].id }, ids(body))
      assert.is_nil(body.missed)
    end)
  end)

  it("keeps event_ttl_seconds in Redis: trimmed, never served, keys expire", function()
    -- TTL 2 s, e2 published 1.2 s after e1: the checks below run while e1 is expired and e2 is
    -- not, found by polling (the window is 1.2 s wide, not a guess at how fast the machine is)
    with_nodes(R.url, 2, { event_ttl_seconds = 2 }, function(nodes)
      local e1 = assert(nodes[1].publish("t", 1))
      local pttl = tonumber(R:cli("PTTL longpoll:s:t"))
      assert.truthy(pttl > 0 and pttl <= 2000, "PTTL " .. pttl)
      local _, body = nodes[2].get(q("t", { { "since_time", 0 } }))
      assert.same({ e1.id }, ids(body))
      wait_until("1.2 s of Redis time", function()
        local sec, usec = R:cli("TIME"):match("(%d+)\n(%d+)")
        return tonumber(sec) * 1000 + tonumber(usec) // 1000 >= e1.timestamp + 1200
      end, 10000)
      local e2 = assert(nodes[1].publish("t", 2))
      wait_until("e1 to expire", function()
        _, body = nodes[2].get(q("t", { { "since_time", 0 } }))
        return body.events and body.events[1].id ~= e1.id
      end, 10000)
      assert.same({ e2.id }, ids(body))
      assert.is_true(body.missed)
      assert.equals("1", R:cli("XLEN longpoll:s:t"))
      -- e2 expires too, and with it the keys; a poll then times out
      wait_until("the keys to expire", function() return R:cli("EXISTS longpoll:s:t longpoll:d:t") == "0" end, 10000)
      local status, timeout_body = nodes[2].get({ { "category", "t" }, { "timeout", "1" }, { "since_time", 0 } })
      assert.equals(200, status)
      assert.is_string(timeout_body.timeout)
    end)
  end)

  it("never loses an event published while a catch-up read is in flight", function()
    -- the read path: B's local cache off, so its catch-ups are read from Redis
    with_nodes(R.url, 2, { redis = redis_option(R.url, { cache = false }) }, function(nodes)
      local A, B = nodes[1], nodes[2]
      local e0 = assert(A.publish("race", 0))
      -- B's reads answer late: the event below is published after B's read ran in Redis,
      -- and reaches B by pub/sub while the read is still in flight
      B.transport.fetch_delay_ms = 300
      local got
      local t = async.spawn(function()
        got = select(2, B.get(q("race", { { "since_time", e0.timestamp }, { "last_id", e0.id } })))
      end)
      wait_until("B's read to have run in Redis", function() return B.transport.delayed_replies == 1 end)
      local e1 = assert(A.publish("race", 1))
      assert.equals(1, B.transport.delayed_replies) -- B has not seen the read's answer yet
      async.wait_all { t }
      assert.same({ e1.id }, ids(got))
      B.transport.fetch_delay_ms = nil
    end)
  end)

  it("never hands out an event twice when its pub/sub message arrives after a read returned it", function()
    with_nodes(R.url, 2, { redis = redis_option(R.url, { cache = false }) }, function(nodes)
      local A, B = nodes[1], nodes[2]
      local e0 = assert(A.publish("late", 0))
      wait_until("B to see e0", function() return rs(B).seq >= 1 and rs(B).pubsub_seq ~= nil end)
      B.transport.hold() -- a slow pub/sub link
      local e1 = assert(A.publish("late", 1))
      local _, body = B.get(q("late", { { "since_time", e0.timestamp }, { "last_id", e0.id } }))
      assert.same({ e1.id }, ids(body)) -- from the stream
      local got
      local t = async.spawn(function()
        got = select(2, B.get(q("late", { { "since_time", e1.timestamp }, { "last_id", e1.id } })))
      end)
      wait_until("the subscriber to wait", function() return rs(B).waiters == 1 and rs(B).fetches_in_flight == 0 end)
      async.sleep(20)
      B.transport.release() -- e1's message arrives now: old news for this subscriber
      async.sleep(50)
      assert.equals(1, rs(B).waiters)
      local e2 = assert(A.publish("late", 2))
      async.wait_all { t }
      assert.same({ e2.id }, ids(got))
    end)
  end)

  it("reads the stream again when the pub/sub sequence has a gap", function()
    with_nodes(R.url, 2, {}, function(nodes)
      local A, B = nodes[1], nodes[2]
      assert(A.publish("gap", 0))
      wait_until("B to see it", function() return rs(B).pubsub_seq ~= nil end)
      -- a waiter of the engine's (Lua) without a cursor: it starts at the node's position (the
      -- HTTP engine parks such a poll on the cache instead; a gap answers it with a timeout,
      -- spec/redis_fast_path_spec.lua)
      local answered = async.event()
      assert(B.engine:subscribe({ categories = { "gap" } }, function(body) answered:set(body) end))
      wait_until("the subscriber to wait", function() return rs(B).waiters == 1 end)
      -- an event whose message is lost: published on a channel nobody listens to
      local conn = assert(hiredis.connect("127.0.0.1", R.port, 1000))
      local silent_id = core.uuid()
      local reply = conn:command({ "EVAL", scripts.publish, 3, "longpoll:clock", "longpoll:s:gap", "longpoll:d:gap",
        "gap", '"silent"', silent_id, 250, 0, "nowhere", "0", "0" })
      conn:close()
      assert.is_table(reply)
      local e2 = assert(A.publish("gap", 2))
      assert.same({ silent_id, e2.id }, ids(cjson.decode(answered:wait(5000))))
      assert.equals(1, rs(B).gaps)
    end)
  end)

  it("answers a timeout with a timestamp from Redis that no later event reaches", function()
    with_nodes(R.url, 2, {}, function(nodes)
      local status, body = nodes[2].get({ { "category", "quiet" }, { "timeout", "1" } })
      assert.equals(200, status)
      assert.equals("no events before timeout", body.timeout)
      local e = assert(nodes[1].publish("quiet", 1))
      assert.truthy(e.timestamp > body.timestamp)
      assert.equals(("%d"):format(body.timestamp + 1), R:cli("HGET longpoll:clock min_next"))
    end)
  end)

  it("calls watchers and add-ons with event objects", function()
    local seen = {}
    with_nodes(R.url, 2, { add_on = { on_publish = function(ev) seen[#seen + 1] = ev end } }, function(nodes)
      local watched = async.event()
      local id = assert(nodes[2].manager:watch({ "w1", "w2" }, function(ev) watched:set(ev) end))
      local other = assert(nodes[2].manager:watch("w1", function() end))
      assert.is_true(nodes[2].manager:unwatch(other))
      assert.is_false(nodes[2].manager:unwatch(other))
      local e = assert(nodes[1].publish("w2", { big = 9007199254740993, list = { 1, 2 } }))
      local ev = assert(watched:wait(3000))
      assert.equals(e.id, ev.id)
      assert.equals("w2", ev.category)
      assert.equals(e.timestamp, ev.timestamp)
      assert.equals(e.data_json, ev.data_json)
      assert.same({ 1, 2 }, ev.data.list)
      assert.is_false(nodes[2].manager:unwatch(id)) -- a watch fires once
      wait_until("both add-ons", function() return #seen == 2 end)
      assert.equals(e.json, seen[1].json)
      assert.equals(e.json, seen[2].json)
    end)
  end)

  it("offers the manager a cursor read that waits (subscribe through the engine interface)", function()
    with_nodes(R.url, 2, {}, function(nodes)
      local A, B = nodes[1], nodes[2]
      local e1 = assert(A.publish("wa", 1))
      local e2 = assert(A.publish("wa", 2))
      caught_up(B, A)
      local first = async.event()
      assert(B.engine:subscribe({ categories = { "wa" }, since = 0 }, function(body) first:set(body) end))
      assert.equals('{"events":[' .. e1.json .. "," .. e2.json .. "]}", first:wait(3000))
      local next_one = async.event()
      assert(B.engine:subscribe({ categories = { "wa" }, since = e2.timestamp, last_id = e2.id },
        function(body) next_one:set(body) end))
      wait_until("the read to return", function() return rs(B).fetches_in_flight == 0 end)
      async.sleep(20)
      assert.is_false(next_one.is_set)
      local e3 = assert(A.publish("wa", 3))
      assert.equals('{"events":[' .. e3.json .. "]}", next_one:wait(3000))
      assert.same({ nil, "last_id must be a UUID", "EINVAL" },
        { B.engine:subscribe({ categories = { "wa" }, since = 0, last_id = "x" }, function() end) })
    end)
  end)

  it("follows Redis losing its data (a new epoch): waiters still get events, timestamps never go back", function()
    with_nodes(R.url, 2, {}, function(nodes)
      local A, B = nodes[1], nodes[2]
      local sec = tonumber(R:cli("TIME"):match("^(%d+)"))
      R:cli(("HSET longpoll:clock last %d"):format(sec * 1000 + 5000))
      local e0 = assert(A.publish("epoch", 0))
      wait_until("B to see it", function() return rs(B).pubsub_seq ~= nil end)
      local epoch = rs(B).epoch
      local answered = async.event() -- a Lua waiter of the engine's, as above
      assert(B.engine:subscribe({ categories = { "epoch" } }, function(body) answered:set(body) end))
      wait_until("the subscriber to wait", function() return rs(B).waiters == 1 end)
      R:cli("FLUSHALL")
      local e1 = assert(A.publish("epoch", 1))
      assert.same({ e1.id }, ids(cjson.decode(answered:wait(5000))))
      assert.truthy(e1.timestamp >= e0.timestamp)
      assert.are_not.equal(epoch, rs(B).epoch)
    end)
  end)

  it("falls back to EVAL when Redis forgot its scripts", function()
    with_nodes(R.url, 2, {}, function(nodes)
      assert(nodes[1].publish("nos", 1))
      R:cli("SCRIPT FLUSH")
      local e = assert(nodes[1].publish("nos", 2))
      local _, body = nodes[2].get(q("nos", { { "since_time", e.timestamp - 1 } }))
      assert.same({ e.id }, ids(body))
    end)
  end)

  it("gives up on a Redis that stops answering, and comes back when it answers again", function()
    local opts = { redis = redis_option(R.url, { command_timeout_ms = 300, connect_timeout_ms = 300 }) }
    with_nodes(R.url, 2, opts, function(nodes)
      local A, B = nodes[1], nodes[2]
      R:cli("CLIENT PAUSE 3000 ALL")
      local t0 = uv.now()
      local e, err = A.publish("hang", 1)
      assert.is_nil(e)
      assert.matches("publish failed: Redis connection lost: no reply within 300 ms", err)
      -- a failure deadline only: the answer came from the 300 ms command timeout, not from the
      -- end of the 3 s pause
      assert.truthy(uv.now() - t0 < 2500)
      wait_until("both nodes back", function() return rs(A).online and rs(B).online end, 5000)
      local e2 = assert(A.publish("hang", 2))
      local _, body = B.get(q("hang", { { "since_time", 0 } }))
      -- the first publish may have been applied when Redis woke up: never twice, never after e2
      assert.equals(e2.id, body.events[#body.events].id)
      assert.truthy(#body.events <= 2)
    end)
  end)

  it("shuts down cleanly: waiting subscribers answered, nothing left open", function()
    async.run(function()
      local before = open_handles()
      local node = nodes_fixture.start(R.url)
      wait_until("online", function() return rs(node).online end)
      local got
      local t = async.spawn(function() got = select(2, node.get(q("bye"))) end)
      wait_until("the subscriber to wait", function() return rs(node).waiters == 1 end)
      nodes_fixture.stop(node)
      async.wait_all { t }
      assert.equals("no events before timeout", got.timeout)
      async.sleep(20)
      assert.equals(before, open_handles())
    end)
  end)
end)

describe("Redis engine when Redis fails", function()
  it("answers 503 and timeouts while Redis is down, then serves again by itself", function()
    local R = redis.start { persist = true }
    local ok, err = pcall(with_nodes, R.url, 2, {}, function(nodes)
      local A, B = nodes[1], nodes[2]
      local e1 = assert(A.publish("f", 1))
      local waited, waited_at
      local t = async.spawn(function()
        waited = select(2, B.get({ { "category", "f" }, { "timeout", "2" }, { "since_time", e1.timestamp },
          { "last_id", e1.id } }))
        waited_at = uv.now()
      end)
      wait_until("the subscriber to wait", function() return rs(B).waiters == 1 and rs(B).fetches_in_flight == 0 end)
      local killed_at = uv.now()
      R:kill()
      wait_until("A to notice", function() return not rs(A).command_connected end)
      local status, body, h = A.publish_http("f", "2")
      assert.equals(503, status)
      assert.equals("application/json", h["content-type"])
      assert.equals("Redis is unavailable", body.error)
      local queued, perr = A.manager:publish("f", 3)
      assert.is_nil(queued)
      assert.equals("Redis is unavailable", perr)
      -- the waiting subscriber gets its normal timeout answer, not a hang
      async.wait_all { t }
      assert.equals("no events before timeout", waited.timeout)
      assert.truthy(waited.timestamp >= e1.timestamp)
      assert.truthy(waited_at - killed_at < 2500)
      -- a subscriber arriving while Redis is down waits, and is answered by a timeout too
      local status2, body2 = B.get({ { "category", "f" }, { "timeout", "1" }, { "since_time", e1.timestamp },
        { "last_id", e1.id } })
      assert.equals(200, status2)
      assert.equals(e1.timestamp, body2.timestamp)
      R:start()
      wait_until("both nodes online again", function() return rs(A).online and rs(B).online end, 5000)
      local e2 = assert(A.publish("f", 2))
      assert.truthy(e2.timestamp > waited.timestamp)
      -- continuing like golongpoll's client (since_time = the timeout's timestamp, same last_id)
      local since = ("%d"):format(waited.timestamp)
      local _, caught = B.get(q("f", { { "since_time", since }, { "last_id", e1.id } }))
      assert.same({ e2.id }, ids(caught))
      local _, all = B.get(q("f", { { "since_time", 0 } }))
      assert.same({ e1.id, e2.id }, ids(all)) -- kept by Redis's append-only file
    end, 30000)
    R:stop()
    if not ok then error(err, 0) end
  end)

  it("serves a subscriber that waited through the outage once Redis is back", function()
    local R = redis.start { persist = true }
    local ok, err = pcall(with_nodes, R.url, 2, {}, function(nodes)
      local A, B = nodes[1], nodes[2]
      local e1 = assert(A.publish("g", 1))
      R:kill()
      wait_until("B to notice", function() return not rs(B).online end)
      local got
      local t = async.spawn(function()
        got = select(2, B.get(q("g", { { "since_time", e1.timestamp }, { "last_id", e1.id } })))
      end)
      async.sleep(100)
      R:start()
      wait_until("A online", function() return rs(A).online end, 5000)
      local e2 = assert(A.publish("g", 2))
      async.wait_all { t }
      assert.same({ e2.id }, ids(got))
    end, 30000)
    R:stop()
    if not ok then error(err, 0) end
  end)
end)
