-- Per-category rules (issue 17, part 2): buffer size, TTL and delete-after-first chosen by the
-- category's name, over real sockets, in memory (the C store) and in Redis mode.
local async = require "support.async"
local redis = require "support.redis"
local longpoll = require "longpoll"
local server = require "longpoll.server"
local rules_mod = require "longpoll.category_rules"
local cjson = require "cjson"

local wait_until = async.wait_or_fail

local FAST = { reconnect_min_ms = 20, reconnect_max_ms = 200, command_timeout_ms = 2000, connect_timeout_ms = 1000 }

local function start_node(options, url)
  local o = {}
  for k, v in pairs(options or {}) do o[k] = v end
  if url then
    o.redis = { url = url }
    for k, v in pairs(FAST) do o.redis[k] = v end
  end
  local m = assert(longpoll.start(o))
  local srv = assert(server.new { host = "127.0.0.1", port = 0 })
  srv:route("GET", "/events", m.subscription_handler)
  srv:route("*", "/publish", m.publish_handler)
  local node = { manager = m, srv = srv, port = assert(srv:listen()) }
  function node.publish(category, n)
    local body = '{"category":' .. cjson.encode(category) .. ',"data":{"n":' .. n .. "}}"
    local status = async.http(node.port, { method = "POST", path = "/publish", body = body })
    assert.equals(200, status)
  end
  -- the n of every buffered event of category
  function node.buffered(category)
    local _, _, body = async.http(node.port, { path = "/events?timeout=1&since_time=0&category="
      .. category:gsub("/", "%%2F") })
    local out = {}
    for i, e in ipairs(cjson.decode(body).events or {}) do out[i] = e.data.n end
    return out
  end
  if url then wait_until("node online", function() return m:stats().redis_online end) end
  return node
end

local function stop_node(node)
  local stopped = async.event()
  node.manager:shutdown(function() stopped:set(true) end)
  assert(stopped:wait(5000), "manager did not shut down")
  local closed = async.event()
  node.srv:close(function() closed:set(true) end)
  assert(closed:wait(5000), "server did not close")
end

local function range(a, b)
  local t = {}
  for i = a, b do t[#t + 1] = i end
  return t
end

describe("category_rules option checks", function()
  local function start_error(options)
    local m, err = longpoll.start(options)
    assert.is_nil(m)
    return err
  end

  it("fails at start with a message naming the rule and the field", function()
    assert.matches("option 'category_rules' must be a list",
      start_error { category_rules = { prefix = "chat/", max_event_buffer_size = 5 } })
    assert.matches("rule 1: needs exactly one of 'prefix' and 'match'",
      start_error { category_rules = { { max_event_buffer_size = 5 } } })
    assert.matches("rule 2: needs exactly one of 'prefix' and 'match'",
      start_error { category_rules = { { prefix = "a", max_event_buffer_size = 5 },
        { prefix = "b", match = "c", max_event_buffer_size = 5 } } })
    assert.matches("rule 1: 'match' is not a valid Lua pattern: .*malformed",
      start_error { category_rules = { { match = "[a", max_event_buffer_size = 5 } } })
    assert.matches("rule 1: unknown field 'buffer'",
      start_error { category_rules = { { prefix = "a", buffer = 5 } } })
    assert.matches("rule 1: 'max_event_buffer_size' must be an integer between 1",
      start_error { category_rules = { { prefix = "a", max_event_buffer_size = 0 } } })
    assert.matches("rule 1: 'event_ttl_seconds' must be a positive number",
      start_error { category_rules = { { prefix = "a", event_ttl_seconds = -5 } } })
    assert.matches("rule 1: sets nothing", start_error { category_rules = { { prefix = "a" } } })
    assert.matches("option 'category_options' must be a function", start_error { category_options = 5 })
  end)

  it("refuses delete-after-first rules with redis", function()
    local err = start_error { redis = { url = "redis://127.0.0.1:1/0" },
      category_rules = { { prefix = "p/", delete_event_after_first_retrieval = true } } }
    assert.matches("rule 1: 'delete_event_after_first_retrieval' cannot be used with 'redis'", err)
  end)

  it("parses --category-rule", function()
    assert.same({ prefix = "chat/", max_event_buffer_size = 50, event_ttl_seconds = 600 },
      rules_mod.parse_cli("chat/*:buffer=50,ttl=600"))
    assert.same({ prefix = "presence/", max_event_buffer_size = 1, delete_event_after_first_retrieval = true },
      rules_mod.parse_cli("presence/*:buffer=1,delete-after-first"))
    assert.same({ match = "^news%.today$", event_ttl_seconds = longpoll.FOREVER },
      rules_mod.parse_cli("news.today:ttl=forever"))
    local function err(text)
      local r, e = rules_mod.parse_cli(text)
      assert.is_nil(r)
      return e
    end
    assert.matches("needs CATEGORY:SETTINGS", err("chat/*"))
    assert.matches("unknown setting 'size=5'", err("chat/*:size=5"))
    assert.matches("buffer needs a whole number", err("chat/*:buffer=0"))
    assert.matches("ttl needs a positive number", err("chat/*:ttl=-1"))
    assert.matches("'%*' only at the end", err("ch*t/*:buffer=2"))
    assert.matches("prefix before '%*' is empty", err("*:buffer=2"))
  end)
end)

local modes = { { name = "memory" } }
if redis.available() then
  modes[2] = { name = "Redis" }
else
  describe("category rules in Redis mode", function() pending("redis-server is not installed") end)
end

for _, mode in ipairs(modes) do
  describe("category rules (" .. mode.name .. ")", function()
    local R
    setup(function() if mode.name == "Redis" then R = redis.start() end end)
    teardown(function() if R then R:stop() end end)

    local function with_node(options, fn)
      async.run(function()
        if R then R:cli("FLUSHALL") end
        local node = start_node(options, R and R.url)
        local ok, err = pcall(fn, node)
        stop_node(node)
        if not ok then error(err, 0) end
      end, 30000)
    end

    it("keeps each category's buffer size, the first matching rule winning, the global size otherwise", function()
      with_node({ max_event_buffer_size = 5, category_rules = {
        { prefix = "chat/", max_event_buffer_size = 3 },
        { match = "^chat/big", max_event_buffer_size = 100 }, -- never reached: chat/ matches first
        { match = "^ro+m%d$", max_event_buffer_size = 2 },
      } }, function(node)
        for n = 1, 8 do
          for _, c in ipairs { "chat/a", "chat/big", "room7", "other" } do node.publish(c, n) end
        end
        assert.same({ 6, 7, 8 }, node.buffered("chat/a"))
        assert.same({ 6, 7, 8 }, node.buffered("chat/big"))
        assert.same({ 7, 8 }, node.buffered("room7"))
        assert.same(range(4, 8), node.buffered("other"))
        if R then -- XADD MAXLEN per category
          assert.equals("3", R:cli("XLEN longpoll:s:chat/a"))
          assert.equals("5", R:cli("XLEN longpoll:s:other"))
        end
      end)
    end)

    it("asks category_options once per new category, rules first", function()
      local asked = {}
      with_node({ max_event_buffer_size = 10,
        category_rules = { { prefix = "fixed/", max_event_buffer_size = 1 } },
        category_options = function(category)
          asked[category] = (asked[category] or 0) + 1
          if category:match("^small") then return { max_event_buffer_size = 2 } end
          if category == "bad" then return { max_event_buffer_size = "two" } end
          if category == "boom" then error("no rule for you") end
        end,
      }, function(node)
        for n = 1, 20 do
          for _, c in ipairs { "small1", "plain", "fixed/x", "bad", "boom" } do node.publish(c, n) end
        end
        assert.same({ 19, 20 }, node.buffered("small1"))
        assert.same(range(11, 20), node.buffered("plain"))
        assert.same({ 20 }, node.buffered("fixed/x"))
        assert.same(range(11, 20), node.buffered("bad")) -- a bad answer: the global options
        assert.same(range(11, 20), node.buffered("boom"))
        assert.same({ small1 = 1, plain = 1, bad = 1, boom = 1 }, asked)
      end)
    end)

    it("expires each category's events after its own TTL", function()
      local now = 1700000000000
      local clock = not R and function() return now end or nil
      with_node({ clock = clock, purge_interval_seconds = 0.05, event_ttl_seconds = 3600,
        category_rules = { { prefix = "short/", event_ttl_seconds = 0.5 },
          { prefix = "forever/", event_ttl_seconds = longpoll.FOREVER } } }, function(node)
        for n = 1, 3 do
          for _, c in ipairs { "short/a", "long", "forever/x" } do node.publish(c, n) end
        end
        assert.same({ 1, 2, 3 }, node.buffered("short/a"))
        if clock then
          now = now + 600
        end
        wait_until("short/a's events expired", function() return #node.buffered("short/a") == 0 end, 10000)
        assert.same({ 1, 2, 3 }, node.buffered("long"))
        assert.same({ 1, 2, 3 }, node.buffered("forever/x"))
        if clock then
          -- past the global hour: "long" goes, "forever/x" stays
          now = now + 3600 * 1000
          assert.same({}, node.buffered("long"))
          assert.same({ 1, 2, 3 }, node.buffered("forever/x"))
        else
          local pttl = tonumber(R:cli("PTTL longpoll:s:long"))
          assert.is_true(pttl > 3000000, "long keeps the global TTL: " .. pttl)
          assert.equals("-1", R:cli("PTTL longpoll:s:forever/x"))
        end
      end)
    end)

    if mode.name == "memory" then
      it("deletes a matching category's events after the first retrieval, and only there", function()
        with_node({ category_rules = { { match = "^presence/", delete_event_after_first_retrieval = true } } },
          function(node)
            node.publish("presence/ann", 1)
            node.publish("feed", 1)
            assert.same({ 1 }, node.buffered("presence/ann"))
            assert.same({}, node.buffered("presence/ann"))
            assert.same({ 1 }, node.buffered("feed"))
            assert.same({ 1 }, node.buffered("feed"))
          end)
      end)

      it("a category_options that calls into the manager gets the global options, logged", function()
        local logged = {}
        local m
        m = assert(longpoll.start { max_event_buffer_size = 3,
          logger = function(level, message, fields) logged[#logged + 1] = { level, message, fields } end,
          category_options = function()
            m:publish("elsewhere", 1) -- the store is busy making `category`
            return { max_event_buffer_size = 1 }
          end })
        for n = 1, 5 do assert(m:publish("c", n)) end
        assert.equals(3, m:stats(true).by_category.c.events)
        local found = false
        for _, l in ipairs(logged) do
          if l[2] == "category_options failed" and tostring(l[3].error):match("store is busy") then found = true end
        end
        assert.is_true(found)
        m:shutdown()
      end)
    end
  end)
end
