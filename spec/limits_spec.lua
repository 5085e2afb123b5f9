-- Resource caps of the manager, each with a clear error, in Lua and over HTTP.
local async = require "support.async"
local fixture = require "support.fixture"
local longpoll = require "longpoll"
local cjson = require "cjson"

describe("resource caps", function()
  it("max_categories refuses new categories", function()
    local m = assert(longpoll.start { max_categories = 2 })
    assert(m:publish("a", 1))
    assert(m:publish("b", 1))
    assert.same({ nil, "too many categories (max_categories)", "ECATEGORIES" }, { m:publish("c", 1) })
    assert(m:publish("a", 2))
    m:shutdown()
  end)

  it("max_buffered_bytes evicts from the largest categories and refuses one event over it", function()
    local m = assert(longpoll.start { max_buffered_bytes = 4000 })
    local small = assert(m:publish("small", "s"))
    for i = 1, 40 do assert(m:publish("large", ("x"):rep(200) .. i)) end
    local s = m:stats()
    assert.truthy(s.event_bytes <= 4000, s.event_bytes)
    assert.truthy(s.dropped > 0)
    local body = m.engine.store:fetch("small", 0, nil, small.timestamp + 1)
    assert.equals(small.id, cjson.decode(body).events[1].id)
    local ok, err, code = m:publish("small", ("y"):rep(5000))
    assert.is_nil(ok)
    assert.equals("event is larger than max_buffered_bytes", err)
    assert.equals("ETOOBIG", code)
    m:shutdown()
  end)

  it("answers over HTTP with 503 and 413 and a JSON error", function()
    fixture.with_server({ max_categories = 1, max_waiting_per_category = 1, max_buffered_bytes = 1000 }, function(t)
      assert.equals(200, (t.publish("one", "1")))
      local status, body = t.publish("two", "1")
      assert.equals(503, status)
      assert.equals("too many categories (max_categories)", body.error)
      status, body = t.publish("one", '"' .. ("z"):rep(2000) .. '"')
      assert.equals(413, status)
      assert.matches("max_buffered_bytes", body.error)
      local first = async.spawn(function()
        local _, b = t.get({ { "category", "one" }, { "timeout", "2" } })
        assert.equals("no events before timeout", b.timeout)
      end)
      async.wait_for(function() return t.manager:stats().waiting == 1 end)
      local s2, b2 = t.get({ { "category", "one" }, { "timeout", "2" } })
      assert.equals(503, s2)
      assert.matches("max_waiting_per_category", b2.error)
      async.wait_all { first }
    end)
  end)
end)
