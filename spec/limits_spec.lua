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
  it("max_answer_bytes cuts one huge answer between events; the cursor gets the rest, none lost", function()
    -- the attack of issue 16: one small request asking for 16 categories x 20 events of 20 KB
    fixture.with_server({ max_answer_bytes = 100000 }, function(t)
      local query = { { "timeout", "1" } }
      local published = {}
      for c = 1, 16 do
        query[#query + 1] = { "category", "c" .. c }
        for i = 1, 20 do
          local e = assert(t.manager:publish("c" .. c, ("z"):rep(20000) .. c .. "/" .. i))
          published[#published + 1] = e.id
        end
      end
      local seen, answers, since, last_id = {}, 0, "0", nil
      while #seen < #published and answers < 400 do -- bounded: 320 events, at least one per answer
        local q = { table.unpack(query) }
        q[#q + 1] = { "since_time", since }
        if last_id then q[#q + 1] = { "last_id", last_id } end
        local status, body, _ = t.get(q)
        assert.equals(200, status)
        assert.is_table(body.events, "no events in answer " .. answers)
        answers = answers + 1
        local bytes = 0
        for _, e in ipairs(body.events) do
          seen[#seen + 1] = e.id
          bytes = bytes + #cjson.encode(e)
        end
        -- under the cap (one event always goes; each is ~20 KB)
        assert.is_true(#body.events == 1 or bytes <= 100000 + 1000, "answer of " .. bytes .. " bytes")
        local last = body.events[#body.events]
        since, last_id = ("%d"):format(last.timestamp), last.id
      end
      assert.same(published, seen) -- every event once, in publish order
      assert.is_true(answers >= 64, "answers: " .. answers) -- 6.4 MB in answers of ~100 KB
    end, { timeout_ms = 60000 })
  end)
end)
