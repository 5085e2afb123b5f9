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

-- Out of memory in the core is the server's trouble, not the client's: 503 (retryable), never
-- 400, never a crash, and the server goes on serving. Memory runs out for real: the server runs
-- under `ulimit -v` (address space), and one big publish needs more than is left.
describe("out of memory", function()
  local process = require "support.process"
  local asan = (os.getenv("LD_PRELOAD") or ""):find("asan") or (os.getenv("LONGPOLL_CPATH") or ""):find("asan")

  local function publish(port, category, data_json)
    local status, _, body = async.http(port, { method = "POST", path = "/publish",
      body = '{"category":"' .. category .. '","data":' .. data_json .. "}", timeout_ms = 20000 })
    return status, body ~= "" and cjson.decode(body) or nil
  end

  if asan then
    pending("skipped under ASan: its shadow memory cannot run under ulimit -v")
    return
  end

  it("answers a publish the core has no memory for with 503 and keeps serving", function()
    async.run(function()
      local child = process.start({ "bin/longpoll", "serve", "--port", "0", "--max-memory", "0",
        "--max-body-bytes", "100000000" }, { shell = "ulimit -v 250000;" })
      local statuses, out_of_memory = {}, 0
      for _, mb in ipairs { 30, 40, 50, 40 } do
        local status, body = publish(child.port, "big", '"' .. ("x"):rep(mb * 1048576) .. '"')
        statuses[#statuses + 1] = mb .. " MB: " .. status
        assert.is_true(status ~= 400, "a 400 for " .. mb .. " MB: " .. tostring(body and body.error))
        if status == 503 then
          assert.equals("out of memory", body.error)
          out_of_memory = out_of_memory + 1
        end
        collectgarbage()
        -- the server is still up and serves small events between the big ones
        assert.equals(200, (publish(child.port, "small", tostring(mb))))
      end
      assert.is_true(out_of_memory > 0, "no publish ran out of memory: " .. table.concat(statuses, ", "))
      local _, _, got = async.http(child.port, { path = "/events?category=small&timeout=1&since_time=0" })
      assert.equals(4, #cjson.decode(got).events)
      assert.equals(0, (child:stop("sigterm")))
    end, 60000)
  end)
end)
