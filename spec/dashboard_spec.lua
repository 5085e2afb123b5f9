-- The live dashboard (issue 17, part 3) over real sockets, in memory and in Redis mode: what the
-- stats endpoint answers to a browser and to everyone else, the figures the page turns into
-- rates; and bin/longpoll's flags of issue 17 (--dashboard, --category-rule,
-- --idempotency-window) as a black box. tests/browser/dashboard.test.mjs runs the page itself.
local async = require "support.async"
local process = require "support.process"
local redis = require "support.redis"
local longpoll = require "longpoll"
local server = require "longpoll.server"
local dashboard = require "longpoll.dashboard"
local cjson = require "cjson"

local wait_until = async.wait_or_fail
local HTML = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8" -- Chromium's

local modes = { { name = "memory" } }
if redis.available() then
  modes[2] = { name = "Redis" }
else
  describe("dashboard in Redis mode", function() pending("redis-server is not installed") end)
end

for _, mode in ipairs(modes) do
  describe("the dashboard (" .. mode.name .. ")", function()
    local R
    setup(function() if mode.name == "Redis" then R = redis.start() end end)
    teardown(function() if R then R:stop() end end)

    it("is what a browser gets at /stats; JSON and Prometheus clients are unaffected", function()
      async.run(function()
        local o = { stats_categories = true }
        if R then o.redis = { url = R.url, connect_timeout_ms = 1000 } end
        local m = assert(longpoll.start(o))
        if R then wait_until("online", function() return m:stats().redis_online end) end
        local srv = assert(server.new { host = "127.0.0.1", port = 0 })
        srv:route("GET", "/events", m.subscription_handler)
        srv:route("*", "/publish", m.publish_handler)
        srv:route("GET", "/stats", m.stats_handler)
        srv:route("GET", "/dash", dashboard.handler("/stats"))
        local port = assert(srv:listen())
        local function stats()
          local _, _, body = async.http(port, { path = "/stats?format=json&categories=1&limit=10",
            headers = { Accept = "application/json" } })
          return cjson.decode(body)
        end

        local status, h, body = async.http(port, { path = "/stats", headers = { Accept = HTML } })
        assert.equals(200, status)
        assert.equals(dashboard.CONTENT_TYPE, h["content-type"])
        assert.matches("default%-src 'none'", h["content-security-policy"])
        assert.matches("Accept", h.vary)
        assert.truthy(body:find('data-stats-url="/stats"', 1, true))
        assert.truthy(body:find("<canvas id=\"chart-events\"", 1, true))
        assert.is_true(#body < 16 * 1024, "a few KB: " .. #body)
        assert.is_nil(body:find("https?://")) -- nothing fetched from elsewhere
        local _, _, same = async.http(port, { path = "/dash", headers = { Accept = "*/*" } })
        assert.equals(body, same)
        assert.equals(405, (async.http(port, { method = "POST", path = "/dash", body = "" })))
        -- everyone else: JSON (curl's */*, ?format=json even from a browser), Prometheus
        local _, jh = async.http(port, { path = "/stats", headers = { Accept = "*/*" } })
        assert.equals("application/json", jh["content-type"])
        local _, fh = async.http(port, { path = "/stats?format=json", headers = { Accept = HTML } })
        assert.equals("application/json", fh["content-type"])
        local _, ph, pbody = async.http(port, { path = "/stats", headers = { Accept = "text/plain" } })
        assert.matches("^text/plain", ph["content-type"])
        assert.matches("longpoll_published_events_total", pbody)

        -- the figures the page turns into events/s, deliveries/s, waiting and the busiest list
        local before = stats()
        local poll = async.spawn(function()
          async.http(port, { path = "/events?category=hot&timeout=10" })
        end)
        wait_until("a waiting subscriber", function() return stats().waiting == 1 end)
        for i = 1, 5 do
          local pstatus = async.http(port, { method = "POST", path = "/publish",
            body = '{"category":"hot","data":' .. i .. "}" })
          assert.equals(200, pstatus)
        end
        async.wait_all { poll }
        local after
        wait_until("5 published, 1 delivered", function()
          after = stats()
          return after.published - before.published == 5 and after.delivered - before.delivered >= 1
        end)
        -- in milliseconds (stats.json's %.3f): the steps above may all fit in one
        assert.is_true(after.uptime_seconds >= before.uptime_seconds)
        assert.equals(0, after.waiting)
        if not R then assert.equals(5, after.by_category.hot.events) end

        m:shutdown()
        local closed = async.event()
        srv:close(function() closed:set(true) end)
        assert(closed:wait(5000))
      end, 20000)
    end)
  end)
end

describe("dashboard.page", function()
  it("escapes the stats URL it embeds", function()
    local page = dashboard.page('/a"b<c>&\'')
    assert.truthy(page:find('data-stats-url="/a&quot;b&lt;c&gt;&amp;&#39;"', 1, true))
  end)
end)

describe("bin/longpoll and issue 17's flags", function()
  local function run_cli(args)
    local out
    async.run(function()
      local child = process.start(args, { wait_port = false })
      out = { code = child:wait(5000), out = child.out, err = child.err }
    end)
    return out
  end

  it("documents them in --help", function()
    local r = run_cli { "bin/longpoll", "serve", "--help" }
    assert.equals(0, r.code)
    for _, flag in ipairs { "--dashboard PATH", "--category-rule RULE", "--idempotency-window S",
      "--idempotency-max-keys N", "'chat/*:buffer=50,ttl=600'" } do
      assert.truthy(r.out:find(flag, 1, true), flag)
    end
  end)

  it("refuses a bad rule or dashboard path at start, with a clear message", function()
    local r = run_cli { "bin/longpoll", "serve", "--port", "0", "--category-rule", "chat/*:size=5" }
    assert.equals(2, r.code)
    assert.matches("%-%-category%-rule 'chat/%*:size=5': unknown setting 'size=5'", r.err)
    r = run_cli { "bin/longpoll", "serve", "--port", "0", "--dashboard", "dash" }
    assert.equals(2, r.code)
    assert.matches("%-%-dashboard must start with '/'", r.err)
    r = run_cli { "bin/longpoll", "serve", "--port", "0", "--redis", "redis://127.0.0.1:1/0",
      "--category-rule", "p/*:delete-after-first" }
    assert.equals(2, r.code)
    assert.matches("cannot be used with 'redis'", r.err)
  end)

  it("serves with rules, idempotency and the dashboard", function()
    async.run(function()
      local child = process.start { "bin/longpoll", "serve", "--port", "0", "--category-rule", "chat/*:buffer=2",
        "--category-rule", "once:delete-after-first", "--idempotency-window", "60", "--dashboard", "/dashboard" }
      local function publish(category, n, key)
        local status, h, body = async.http(child.port, { method = "POST", path = "/publish",
          headers = key and { ["Idempotency-Key"] = key } or nil,
          body = '{"category":"' .. category .. '","data":' .. n .. "}" })
        return status, body, h
      end
      local function count(category)
        local _, _, body = async.http(child.port, { path = "/events?timeout=1&since_time=0&category=" .. category })
        return #(cjson.decode(body).events or {})
      end
      for n = 1, 4 do
        assert.equals(200, (publish("chat/x", n)))
        assert.equals(200, (publish("other", n)))
      end
      assert.equals(2, count("chat/x"))
      assert.equals(4, count("other"))
      publish("once", 1)
      assert.equals(1, count("once"))
      assert.equals(0, count("once"))
      local s1, b1 = publish("k", 1, "key-1")
      local s2, b2, h2 = publish("k", 1, "key-1")
      assert.equals(200, s1)
      assert.equals(200, s2)
      assert.equals(b1, b2)
      assert.equals("true", h2["idempotent-replayed"])
      local status, h = async.http(child.port, { path = "/dashboard" })
      assert.equals(200, status)
      assert.matches("^text/html", h["content-type"])
      assert.equals(0, (child:stop("sigterm")))
    end, 20000)
  end)
end)
