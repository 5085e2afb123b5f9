-- The wire contract (../shared/docs/http-api.md), end to end over real sockets.
local async = require "support.async"
local fixture = require "support.fixture"
local core = require "longpoll.core"
local cjson = require "cjson"

local with_server = fixture.with_server

local function later(ms, fn)
  return async.spawn(function() async.sleep(ms) fn() end)
end

describe("subscription handler", function()
  it("answers bad requests with golongpoll's error shape and HTTP 200", function()
    with_server({ max_longpoll_timeout_seconds = 30 }, function(t)
      local cases = {
        { {}, "Invalid or missing 'timeout' arg.  Must be 1-30." },
        { { { "category", "a" }, { "timeout", "0" } }, "Invalid or missing 'timeout' arg.  Must be 1-30." },
        { { { "category", "a" }, { "timeout", "31" } }, "Invalid or missing 'timeout' arg.  Must be 1-30." },
        { { { "category", "a" }, { "timeout", "1.5" } }, "Invalid or missing 'timeout' arg.  Must be 1-30." },
        { { { "timeout", "5" } }, "Invalid subscription category, must be 1-1024 characters long." },
        { { { "category", "" }, { "timeout", "5" } }, "Invalid subscription category, must be 1-1024 characters long." },
        { { { "category", ("x"):rep(1025) }, { "timeout", "5" } }, "Invalid subscription category, must be 1-1024 characters long." },
        { { { "category", "a" }, { "timeout", "5" }, { "since_time", "abc" } }, "Invalid 'since_time' arg." },
        { { { "category", "a" }, { "timeout", "5" }, { "last_id", core.uuid() } }, "Must provide 'since_time' arg when providing 'last_id'." },
        { { { "category", "a" }, { "timeout", "5" }, { "since_time", "1" }, { "last_id", "x" } }, "Param 'last_id' was not a valid UUID." },
      }
      for _, c in ipairs(cases) do
        local status, body, headers = t.get(c[1])
        assert.equals(200, status)
        assert.same({ error = c[2] }, body)
        assert.equals("application/json", headers["content-type"])
      end
    end)
  end)

  it("treats empty since_time and last_id as absent, as golongpoll does", function()
    with_server({}, function(t)
      local e = t.manager:publish("empty", 1)
      local _, body = t.get({ { "category", "empty" }, { "timeout", "1" }, { "since_time", "0" }, { "last_id", "" } })
      assert.equals(e.id, body.events[1].id)
      local _, waited = t.get({ { "category", "empty" }, { "timeout", "1" }, { "since_time", "" } })
      assert.equals("no events before timeout", waited.timeout)
    end)
  end)

  it("uses HTTP 400 for errors when the application opts in", function()
    with_server({ subscribe_error_status = 400 }, function(t)
      local status, body = t.get({ { "category", "a" } })
      assert.equals(400, status)
      assert.matches("timeout", body.error)
    end)
  end)

  it("answers buffered events at once, oldest first, with no-cache headers", function()
    with_server({}, function(t)
      local e1 = t.manager:publish("news", "first")
      local e2 = t.manager:publish("news", { n = 2 })
      t.manager:publish("other", 1)
      local status, body, h = t.get({ { "category", "news" }, { "timeout", "5" }, { "since_time", "0" } })
      assert.equals(200, status)
      assert.same({ events = {
        { timestamp = e1.timestamp, category = "news", data = "first", id = e1.id },
        { timestamp = e2.timestamp, category = "news", data = { n = 2 }, id = e2.id },
      } }, body)
      assert.equals("application/json", h["content-type"])
      assert.equals("no-cache, no-store, must-revalidate", h["cache-control"])
      assert.equals("no-cache", h["pragma"])
      assert.equals("0", h["expires"])
      assert.equals("nosniff", h["x-content-type-options"])
    end)
  end)

  it("holds a request until an event of its category is published", function()
    with_server({}, function(t)
      local published
      later(200, function()
        t.manager:publish("other", "not this")
        published = t.manager:publish("news", "this one")
      end)
      local _, body = t.get({ { "category", "news" }, { "timeout", "10" } })
      assert.equals(1, #body.events)
      assert.equals(published.id, body.events[1].id)
    end)
  end)

  it("answers a waiting client at once even when its since_time is in the future", function()
    with_server({}, function(t)
      later(100, function() t.publish("c", '"x"') end)
      local _, body = t.get({ { "category", "c" }, { "timeout", "10" }, { "since_time", tostring(math.tointeger(2 ^ 50)) } })
      assert.equals("x", body.events[1].data)
    end)
  end)

  it("times out with a timestamp no later event goes below", function()
    with_server({}, function(t)
      local status, body = t.get({ { "category", "quiet" }, { "timeout", "1" } })
      assert.equals(200, status)
      assert.equals("no events before timeout", body.timeout)
      assert.equals(math.floor(body.timestamp), body.timestamp)
      local e = t.manager:publish("quiet", 1)
      assert.truthy(e.timestamp > body.timestamp)
      local _, again = t.get({ { "category", "quiet" }, { "timeout", "1" }, { "since_time", tostring(math.tointeger(body.timestamp)) } })
      assert.equals(e.id, again.events[1].id)
    end)
  end)

  it("walks events of one millisecond with since_time and last_id", function()
    with_server({}, function(t)
      for i = 1, 4 do assert(t.manager.engine.store:restore("ms", tostring(i), core.uuid(), 1000)) end
      local all = cjson.decode((t.manager.engine.store:fetch("ms", 0, nil, 2000))).events
      local _, body = t.get({ { "category", "ms" }, { "timeout", "1" }, { "since_time", "1000" }, { "last_id", all[2].id } })
      assert.same({ 3, 4 }, { body.events[1].data, body.events[2].data })
      local _, none = t.get({ { "category", "ms" }, { "timeout", "1" }, { "since_time", "1000" }, { "last_id", all[4].id } })
      assert.equals("no events before timeout", none.timeout)
    end)
  end)

  it("says missed when the buffer dropped events after the cursor", function()
    with_server({ max_event_buffer_size = 2 }, function(t)
      for i = 1, 4 do t.manager:publish("m", i) end
      local _, body = t.get({ { "category", "m" }, { "timeout", "1" }, { "since_time", "0" } })
      assert.is_true(body.missed)
      assert.same({ 3, 4 }, { body.events[1].data, body.events[2].data })
    end)
  end)

  it("takes categories with spaces, slashes and UTF-8", function()
    with_server({}, function(t)
      local cat = "a b/c+d é ✓"
      local e = assert(t.manager:publish(cat, true))
      local _, body = t.get({ { "category", cat }, { "timeout", "1" }, { "since_time", "0" } })
      assert.equals(cat, body.events[1].category)
      assert.equals(e.id, body.events[1].id)
    end)
  end)

  it("forgets a waiting client that disconnects, at once", function()
    with_server({}, function(t)
      local conn = async.connect(t.port)
      conn:send("GET " .. fixture.url("/events", { { "category", "gone" }, { "timeout", "30" } }) .. " HTTP/1.1\r\nHost: x\r\n\r\n")
      local other = async.spawn(function()
        local _, body = t.get({ { "category", "gone" }, { "timeout", "10" } })
        assert.equals("still here", body.events[1].data)
      end)
      async.wait_for(function() return t.manager:stats().waiting == 2 end)
      assert.equals(2, t.manager:stats().waiting)
      conn:close()
      async.wait_for(function() return t.manager:stats().waiting == 1 end)
      assert.equals(1, t.manager:stats().waiting)
      t.manager:publish("gone", "still here")
      async.wait_all({ other })
      assert.equals(0, t.manager:stats().waiting)
    end)
  end)

  it("answers hundreds of concurrent subscribers with one publish", function()
    with_server({}, function(t)
      local n = 300
      local got = 0
      local tasks = {}
      for i = 1, n do
        tasks[i] = async.spawn(function()
          local _, body = t.get({ { "category", "crowd" }, { "timeout", "20" } })
          if body.events and body.events[1].data == "go" then got = got + 1 end
        end)
      end
      async.wait_for(function() return t.manager:stats().waiting == n end, 10000)
      assert.equals(n, t.manager:stats().waiting)
      t.manager:publish("crowd", "go")
      async.wait_all(tasks)
      assert.equals(n, got)
    end, { timeout_ms = 30000 })
  end)

  it("hands an event to one retrieval only with delete_event_after_first_retrieval", function()
    with_server({ delete_event_after_first_retrieval = true }, function(t)
      t.manager:publish("d", 1)
      local _, first = t.get({ { "category", "d" }, { "timeout", "1" }, { "since_time", "0" } })
      assert.equals(1, first.events[1].data)
      local _, second = t.get({ { "category", "d" }, { "timeout", "1" }, { "since_time", "0" } })
      assert.equals("no events before timeout", second.timeout)
    end)
  end)

  it("answers waiting subscribers with the timeout answer on shutdown", function()
    with_server({}, function(t)
      later(200, function() t.manager:shutdown() end)
      local _, body = t.get({ { "category", "s" }, { "timeout", "30" } })
      assert.equals("no events before timeout", body.timeout)
      local status, after = t.get({ { "category", "s" }, { "timeout", "30" } })
      assert.equals(503, status)
      assert.matches("shut down", after.error)
    end)
  end)
end)

describe("publish handler", function()
  it("publishes and answers success", function()
    with_server({}, function(t)
      local status, body, h = t.publish("p", '{"deep":[1,2,{"x":null}]}')
      assert.equals(200, status)
      assert.same({ success = true }, body)
      assert.equals("application/json", h["content-type"])
      local _, got = t.get({ { "category", "p" }, { "timeout", "1" }, { "since_time", "0" } })
      assert.same({ deep = { 1, 2, { x = cjson.null } } }, got.events[1].data)
    end)
  end)

  it("keeps every digit of big numbers", function()
    with_server({}, function(t)
      assert.equals(200, (t.publish("big", "123456789012345678901234567890")))
      local _, _, raw = async.http(t.port, { path = "/events?category=big&timeout=1&since_time=0" })
      assert.truthy(raw:find('"data":123456789012345678901234567890', 1, true))
    end)
  end)

  it("refuses bad bodies with 400 and a JSON error", function()
    with_server({}, function(t)
      local bad = {
        "not json", '{"category":"a","data":1} trailing', "[1,2]", '"str"',
        '{"data":1}', '{"category":"","data":1}', '{"category":5,"data":1}',
        '{"category":"' .. ("x"):rep(1025) .. '","data":1}', '{"category":"a"}', '{"category":"a","data":null}',
        "", '{"category":"a","data":' .. ("["):rep(100000) .. ("]"):rep(100000) .. "}",
      }
      for _, b in ipairs(bad) do
        local status, _, body = async.http(t.port, { method = "POST", path = "/publish", body = b })
        assert.equals(400, status, b:sub(1, 60))
        assert.is_string(cjson.decode(body).error)
      end
      assert.equals(0, t.manager:stats().events)
    end)
  end)

  it("answers other methods with 405 and Allow: POST", function()
    with_server({}, function(t)
      for _, method in ipairs { "GET", "PUT", "DELETE" } do
        local status, h, body = async.http(t.port, { method = method, path = "/publish" })
        assert.equals(405, status)
        assert.equals("POST", h["allow"])
        assert.is_string(cjson.decode(body).error)
      end
    end)
  end)

  it("answers bodies over the limit with 413", function()
    with_server({}, function(t)
      local big = '{"category":"a","data":"' .. ("x"):rep(2000) .. '"}'
      local status, _, body = async.http(t.port, { method = "POST", path = "/publish", body = big })
      assert.equals(413, status)
      assert.is_string(cjson.decode(body).error)
    end, { server = { host = "127.0.0.1", port = 0, max_body_bytes = 1000 } })
  end)
end)
