-- Events in publish order, everywhere: a publish pipelined behind a long poll on one keep-alive
-- connection runs after the publish that answered the poll, never inside it, so add-ons (the
-- file add-on above all) see events in the store's order and a restart finds every event.
local uv = require "luv"
local async = require "support.async"
local longpoll = require "longpoll"
local server = require "longpoll.server"
local file_addon = require "longpoll.addons.file"
local redis = require "support.redis"
local cjson = require "cjson"

local wait_until = async.wait_or_fail

-- As many waiting subscribers as this process's descriptor limit allows (two descriptors
-- each: client and server side), at most 2,000.
local function waiter_count()
  local p = io.popen("ulimit -n")
  local limit = tonumber(p:read("a")) or 1024
  p:close()
  return math.max(10, math.min(2000, (limit - 200) // 2))
end

local function publish_body(category, data)
  return '{"category":' .. cjson.encode(category) .. ',"data":' .. cjson.encode(data) .. "}"
end

local function post(body)
  return ("POST /publish HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s")
    :format(#body, body)
end

local POLL = "GET /events?category=c&timeout=60 HTTP/1.1\r\nHost: t\r\n\r\n"

-- Runs the scenario on a started manager: n polls wait on category c, one more poll has a
-- publish of event 2 pipelined behind it on its connection, another client publishes event 1.
-- Returns what the add-ons saw, in order, once both events reached them.
local function pipelined_publish_behind_poll(m, n, seen)
  local srv = assert(server.new { host = "127.0.0.1", port = 0 })
  srv:route("GET", "/events", m.subscription_handler)
  srv:route("POST", "/publish", m.publish_handler)
  local port = assert(srv:listen())
  local others = {}
  for i = 1, n do
    others[i] = async.connect(port)
    assert(others[i]:send(POLL))
  end
  wait_until(n .. " waiting polls", function() return m:stats().waiting == n end, 60000)
  local pipelined = async.connect(port)
  assert(pipelined:send(POLL .. post(publish_body("c", 2))))
  wait_until("the pipelined poll to wait", function() return m:stats().waiting == n + 1 end, 10000)

  local status = async.http(port, { method = "POST", path = "/publish", body = publish_body("c", 1) })
  assert.equals(200, status)

  -- the pipelined connection: its poll got event 1, then its own publish was answered
  local s1, _, b1 = pipelined:read_response({ timeout_ms = 20000 })
  assert.equals(200, s1)
  assert.equals(1, cjson.decode(b1).events[1].data)
  local s2, _, b2 = pipelined:read_response({ timeout_ms = 20000 })
  assert.equals(200, s2)
  assert.same({ success = true }, cjson.decode(b2))
  wait_until("both events at the add-ons", function() return #seen == 2 end, 10000)
  for i = 1, n do others[i]:close() end
  pipelined:close()

  local stopped = async.event()
  m:shutdown(function() stopped:set(true) end)
  assert(stopped:wait(20000), "shutdown")
  local closed = async.event()
  srv:close(function() closed:set(true) end)
  assert(closed:wait(20000), "server close")
end

describe("event order", function()
  local dir, path
  before_each(function()
    dir = assert(uv.fs_mkdtemp("/tmp/longpoll-order-spec-XXXXXX"))
    path = dir .. "/events.log"
  end)
  after_each(function()
    os.remove(path)
    os.execute("rm -rf '" .. dir .. "'")
  end)

  it("a publish pipelined behind a waiting poll reaches add-ons and the file after the one that woke it", function()
    local n = waiter_count()
    async.run(function()
      local seen = {} -- what add-ons saw, in order
      local recorder = { on_publish = function(e) seen[#seen + 1] = e.data end }
      local m = assert(longpoll.start { add_on = { assert(file_addon { path = path, flush_interval_ms = 0 }), recorder } })
      pipelined_publish_behind_poll(m, n, seen)
      assert.same({ 1, 2 }, seen)

      -- a clean restart finds both events, in order
      local again = assert(longpoll.start { add_on = assert(file_addon { path = path }) })
      local restored = {}
      local h = again:follow("c", 0, nil, function(list)
        for _, e in ipairs(list or {}) do restored[#restored + 1] = cjson.decode(e.json).data end
      end)
      assert.truthy(h)
      assert.same({ 1, 2 }, restored)
      local done = async.event()
      again:shutdown(function() done:set(true) end)
      assert(done:wait(20000))
    end, 120000)
  end)

  it("with Redis: add-ons see the two events in Redis's order, and Redis holds both in order", function()
    if not redis.available() then
      pending("redis-server is not installed")
      return
    end
    local R = redis.start()
    local n = waiter_count()
    local ok, err = pcall(async.run, function()
      local seen = {}
      local recorder = { on_publish = function(e) seen[#seen + 1] = e.data end }
      local m = assert(longpoll.start { add_on = recorder, redis = { url = R.url } })
      pipelined_publish_behind_poll(m, n, seen)
      assert.same({ 1, 2 }, seen)
      -- a new node reads both back from Redis, in order
      local again = assert(longpoll.start { redis = { url = R.url } })
      local restored = {}
      assert(again:follow("c", 0, nil, function(list)
        for _, e in ipairs(list or {}) do restored[#restored + 1] = cjson.decode(e.json).data end
      end))
      wait_until("the read from Redis", function() return #restored == 2 end, 10000)
      assert.same({ 1, 2 }, restored)
      local done = async.event()
      again:shutdown(function() done:set(true) end)
      assert(done:wait(20000))
    end, 120000)
    R:stop()
    if not ok then error(err, 0) end
  end)
end)
