-- The manager from Lua, without HTTP: options, publish, add-on hooks, shutdown.
local uv = require "luv"
local longpoll = require "longpoll"
local core = require "longpoll.core"
local cjson = require "cjson"

local function run_loop_for(ms)
  local t = uv.new_timer()
  t:start(ms, 0, function() t:close() end)
  uv.run()
end

describe("longpoll.start", function()
  it("has a version", function()
    assert.matches("^longpoll %d+%.%d+%.%d+$", longpoll._VERSION)
  end)

  it("names the bad option", function()
    local cases = {
      [{ bogus = 1 }] = "unknown option 'bogus'",
      [{ max_event_buffer_size = 0 }] = "option 'max_event_buffer_size'",
      [{ max_event_buffer_size = 1.5 }] = "option 'max_event_buffer_size' must be an integer",
      [{ max_longpoll_timeout_seconds = "10" }] = "option 'max_longpoll_timeout_seconds'",
      [{ event_ttl_seconds = 0 }] = "option 'event_ttl_seconds'",
      [{ delete_event_after_first_retrieval = "yes" }] = "option 'delete_event_after_first_retrieval'",
      [{ add_on = 5 }] = "option 'add_on'",
      [{ add_on = { on_publish = 1 } }] = "option 'add_on'",
      [{ logger = 3 }] = "option 'logger'",
      [{ subscribe_error_status = 500 }] = "option 'subscribe_error_status'",
    }
    for opts, expected in pairs(cases) do
      local m, err = longpoll.start(opts)
      assert.is_nil(m)
      assert.truthy(err:find(expected, 1, true), ("%q does not contain %q"):format(err, expected))
    end
    assert.same({ nil, "options must be a table" }, { longpoll.start(5) })
  end)
end)

describe("manager:publish", function()
  local m
  before_each(function() m = assert(longpoll.start { max_event_buffer_size = 2 }) end)
  after_each(function() m:shutdown() end)

  it("returns the event", function()
    local e = assert(m:publish("news", { headline = "x", n = 2 ^ 53 + 1 }))
    assert.truthy(core.is_uuid(e.id))
    assert.equals("news", e.category)
    assert.equals(math.type(e.timestamp), "integer")
    assert.same({ headline = "x", n = 2 ^ 53 + 1 }, e.data)
    local body = m.engine.store:fetch("news", 0, nil, e.timestamp + 1)
    assert.truthy(body:find('"n":9007199254740992', 1, true))
    assert.equals(e.id, cjson.decode(body).events[1].id)
  end)

  it("keeps every digit of integers", function()
    local e = assert(m:publish("n", 9007199254740993))
    assert.truthy(e.json:find('"data":9007199254740993', 1, true))
  end)

  it("refuses bad input with a message", function()
    assert.same({ nil, "data must not be nil" }, { m:publish("a", nil) })
    assert.matches("category must be", select(2, m:publish("", 1)))
    assert.matches("category must be", select(2, m:publish(("x"):rep(1025), 1)))
    assert.matches("category must be", select(2, m:publish(5, 1)))
    assert.matches("cannot be encoded", select(2, m:publish("a", function() end)))
    assert.matches("cannot be encoded", select(2, m:publish("a", 0 / 0)))
    assert.matches("not JSON", select(2, m:publish_json("a", "{")))
    assert.matches("null", select(2, m:publish_json("a", " null ")))
    assert.truthy(m:publish_json("a", "[1, 2]"))
  end)

  it("keeps managers independent", function()
    local other = assert(longpoll.start {})
    m:publish("shared", 1)
    assert.is_nil((other.engine.store:fetch("shared", 0, nil, 2 ^ 50)))
    assert.equals(1, m:stats().events)
    assert.equals(0, other:stats().events)
    other:shutdown()
  end)
end)

describe("manager add-ons", function()
  it("sees every published event once, in order, and failing hooks do not break publishing", function()
    local seen = {}
    local recorder = { on_publish = function(e) seen[#seen + 1] = e.data end }
    local broken = { on_publish = function() error("boom") end }
    local logged = {}
    local m = assert(longpoll.start {
      add_on = { broken, recorder },
      logger = function(level, msg, fields) logged[#logged + 1] = { level, msg, fields } end,
    })
    for i = 1, 5 do assert(m:publish("c", i)) end
    assert.same({ 1, 2, 3, 4, 5 }, seen)
    local errors = 0
    for _, l in ipairs(logged) do if l[1] == "error" then errors = errors + 1 end end
    assert.equals(5, errors)
    m:shutdown()
  end)

  it("restores stored events before serving, skipping expired ones", function()
    local now = require("longpoll.manager").now_ms()
    local ids = { core.uuid(), core.uuid(), core.uuid() }
    local stored = {
      { id = ids[1], timestamp = now - 60000, category = "c", data_json = '"old"' },
      { id = ids[2], timestamp = now - 1000, category = "c", data_json = '"kept"' },
      { id = ids[3], timestamp = now - 500, category = "c", data = { x = 1 } },
    }
    local m = assert(longpoll.start {
      event_ttl_seconds = 30,
      add_on = { on_start = function() local i = 0 return function() i = i + 1 return stored[i] end end },
    })
    local body = assert(m.engine.store:fetch("c", 0, nil, now))
    local events = cjson.decode(body).events
    assert.equals(2, #events)
    assert.equals(ids[2], events[1].id)
    assert.same({ x = 1 }, events[2].data)
    local e = m:publish("c", "new")
    assert.truthy(e.timestamp >= now - 500)
    m:shutdown()
  end)

  it("follows an injected clock: timestamps, TTL expiry and timeout marks move with it", function()
    local now = 5000000
    local m = assert(longpoll.start { event_ttl_seconds = 10, clock = function() return now end })
    local e1 = assert(m:publish("c", 1))
    assert.equals(5000000, e1.timestamp)
    now = now + 9999
    local e2 = assert(m:publish("c", 2))
    assert.equals(5009999, e2.timestamp)
    local function ids()
      local out = {}
      local list = m:follow("c", 0, nil, function(batch)
        for _, e in ipairs(batch or {}) do out[#out + 1] = e.id end
      end)
      m:unfollow(list)
      return out
    end
    assert.same({ e1.id, e2.id }, ids())
    now = now + 1 -- e1 is 10 s old now: gone, without waiting a millisecond
    assert.same({ e2.id }, ids())
    local mark
    m:start_mark(function(ts) mark = ts end)
    assert.equals(5010000, mark)
    m:shutdown()
  end)

  it("refuses stored events out of order", function()
    local stored = {
      { id = core.uuid(), timestamp = 2000, category = "c", data_json = "1" },
      { id = core.uuid(), timestamp = 1000, category = "c", data_json = "2" },
    }
    local m, err = longpoll.start {
      add_on = { on_start = function() local i = 0 return function() i = i + 1 return stored[i] end end },
    }
    assert.is_nil(m)
    assert.matches("refused: event is older", err)
  end)

  it("gives on_start the options and restores an event held by two add-ons once", function()
    local id = core.uuid()
    local seen_options
    local function keeper()
      return { on_start = function(options)
        seen_options = options
        local done = false
        return function()
          if done then return nil end
          done = true
          return { id = id, timestamp = 1000, category = "c", data_json = "1" }
        end
      end }
    end
    local m = assert(longpoll.start { max_event_buffer_size = 7, add_on = { keeper(), keeper() } })
    assert.equals(7, seen_options.max_event_buffer_size)
    assert.has_error(function() seen_options.max_event_buffer_size = 1 end)
    assert.equals(1, m:stats().events)
    m:shutdown()
  end)

  it("shuts down the add-ons that started when a later one fails", function()
    local closed = false
    local good = { on_start = function() return nil end, on_shutdown = function() closed = true end }
    local bad = { on_start = function() error("no disk") end }
    local m, err = longpoll.start { add_on = { good, bad } }
    assert.is_nil(m)
    assert.matches("add%-on 2: on_start failed: .*no disk", err)
    assert.is_true(closed)
  end)

  it("reports an on_start failure from start", function()
    local m, err = longpoll.start { add_on = { on_start = function() error("disk on fire") end } }
    assert.is_nil(m)
    assert.matches("disk on fire", err)
  end)
end)

describe("manager:shutdown", function()
  it("is harmless twice, stops publishing and calls on_shutdown", function()
    local before = {} -- handles other specs may legitimately keep (e.g. a listening server's)
    uv.walk(function(h) before[h] = true end)
    local calls = 0
    local m = assert(longpoll.start { event_ttl_seconds = 10, add_on = { on_shutdown = function() calls = calls + 1 end } })
    assert.truthy(m:shutdown())
    assert.truthy(m:shutdown())
    assert.equals(1, calls)
    assert.same({ nil, "manager is shut down" }, { m:publish("a", 1) })
    run_loop_for(10)
    local open = {}
    uv.walk(function(h) if not h:is_closing() and not before[h] then open[#open + 1] = tostring(h) end end)
    assert.same({}, open)
  end)

  it("waits for asynchronous add-ons, up to a timeout", function()
    local m = assert(longpoll.start { add_on = { on_shutdown = function(done) local _ = done end } })
    local result
    m:shutdown_with_timeout(0.05, function(ok, err) result = { ok, err } end)
    run_loop_for(200)
    assert.same({ false, "shutdown timeout exceeded" }, result)

    local m2 = assert(longpoll.start {
      add_on = { on_shutdown = function(done)
        local t = uv.new_timer()
        t:start(10, 0, function() t:close() done() end)
      end },
    })
    local result2
    m2:shutdown_with_timeout(5, function(ok, err) result2 = { ok, err } end)
    run_loop_for(100)
    assert.same({ true }, result2)
  end)
end)

describe("manager:watch", function()
  it("calls back once for the next event of any watched category", function()
    local m = assert(longpoll.start {})
    local got = {}
    local h = assert(m:watch({ "a", "b" }, function(e) got[#got + 1] = e.category .. ":" .. tostring(e.data) end))
    m:publish("c", 0)
    m:publish("b", 1)
    m:publish("a", 2)
    assert.same({ "b:1" }, got)
    assert.is_false(m:unwatch(h))
    local h2 = assert(m:watch("a", function() got[#got + 1] = "never" end))
    assert.is_true(m:unwatch(h2))
    m:publish("a", 3)
    assert.same({ "b:1" }, got)
    assert.equals(0, m:stats().waiting)
    m:shutdown()
  end)
end)
