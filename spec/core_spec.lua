-- The C core through its Lua binding, with fake time: the store rules of the
-- wire contract as Lua users and the manager see them.
local core = require "longpoll.core"
local cjson = require "cjson"

local function events_of(body)
  if not body then return {} end
  return cjson.decode(body).events
end

describe("longpoll.core store", function()
  local store
  before_each(function() store = core.new_store { max_event_buffer_size = 3 } end)
  after_each(function() store:close() end)

  it("publishes events with UUID v4 ids and the given time", function()
    local json, id, ts, woken, buffered = store:publish("news", '"hi"', 1000)
    assert.equals(1000, ts)
    assert.truthy(id:match("^%x%x%x%x%x%x%x%x%-%x%x%x%x%-4%x%x%x%-[89ab]%x%x%x%-%x%x%x%x%x%x%x%x%x%x%x%x$"))
    assert.equals(id, id:lower())
    assert.same({}, woken)
    assert.is_true(buffered)
    assert.same({ timestamp = 1000, category = "news", data = "hi", id = id }, cjson.decode(json))
  end)

  it("answers in order, strictly after since_time, and with missed when events were dropped", function()
    local ids = {}
    for i = 1, 5 do ids[i] = select(2, store:publish("c", tostring(i), 100 + i)) end
    local body, count, missed = store:fetch("c", 0, nil, 200)
    assert.equals(3, count)
    assert.is_true(missed)
    local ev = events_of(body)
    assert.same({ 3, 4, 5 }, { ev[1].data, ev[2].data, ev[3].data })
    assert.equals(ids[3], ev[1].id)
    assert.is_true(cjson.decode(body).missed)
    body, count, missed = store:fetch("c", 104, nil, 200)
    assert.equals(5, events_of(body)[1].data)
    assert.equals(1, count)
    assert.is_false(missed)
    assert.is_nil((store:fetch("c", 105, nil, 200)))
  end)

  it("walks several events of one millisecond with last_id, in either case", function()
    local ids = {}
    for i = 1, 3 do ids[i] = select(2, store:publish("c", tostring(i), 500)) end
    local body = store:fetch("c", 500, ids[1]:upper(), 600)
    assert.same({ 2, 3 }, { events_of(body)[1].data, events_of(body)[2].data })
    assert.is_nil((store:fetch("c", 500, ids[3], 600)))
    assert.same({ nil, "last_id is not a UUID" }, { store:fetch("c", 500, "nope", 600) })
  end)

  it("wakes waiting subscriptions and cancels them", function()
    local h1 = assert(store:wait("a"))
    local h2 = assert(store:wait({ "a", "b" }))
    local h3 = assert(store:wait("b"))
    assert.is_true(store:cancel(h3))
    assert.is_false(store:cancel(h3))
    local _, _, _, woken = store:publish("a", "1", 10)
    table.sort(woken)
    local expect = { h1, h2 }
    table.sort(expect)
    assert.same(expect, woken)
    local _, _, _, woken_b = store:publish("b", "1", 11)
    assert.same({}, woken_b)
    assert.equals(0, store:stats().waiting)
  end)

  it("keeps timestamps from going back and after a timeout mark", function()
    local _, _, t1 = store:publish("c", "1", 5000)
    local _, _, t2 = store:publish("c", "1", 1000)
    assert.equals(5000, t1)
    assert.equals(5000, t2)
    local mark = store:mark_time(10)
    assert.equals(5000, mark)
    local _, _, t3 = store:publish("c", "1", 10)
    assert.equals(5001, t3)
  end)

  it("expires events by TTL and frees categories", function()
    local s = core.new_store { max_event_buffer_size = 10, event_ttl_ms = 100 }
    s:publish("a", "1", 1000)
    s:publish("b", "1", 1050)
    assert.equals(1, s:expire(1100))
    assert.equals(1, s:stats().categories)
    assert.equals(1, s:expire(1150))
    assert.same(0, s:stats().categories)
    assert.same(0, s:stats().event_bytes)
    s:close()
  end)

  it("rejects bad categories with a message", function()
    assert.same({ nil, "category is not valid UTF-8", "EUTF8" }, { store:publish("\255", "1", 1) })
    local ok, msg = store:publish("", "1", 1)
    assert.is_nil(ok)
    assert.matches("invalid category", msg)
    assert.is_nil((store:publish(("x"):rep(1025), "1", 1)))
    assert.is_truthy(store:publish(("x"):rep(1024), "1", 1))
  end)

  it("restores events keeping ids and refusing disorder", function()
    local id = core.uuid()
    assert.truthy(store:restore("r", '{"a":1}', id, 700))
    assert.same({ nil, "event is older than the events already stored", "EORDER" },
      { store:restore("r", "1", core.uuid(), 600) })
    assert.equals(id, events_of((store:fetch("r", 0, nil, 800)))[1].id)
  end)

  it("raises for misuse and is safe to close twice", function()
    assert.has_error(function() store:publish(1) end)
    assert.has_error(function() core.new_store { max_event_buffer_size = 0 } end)
    local s = core.new_store {}
    s:close()
    s:close()
    assert.has_error(function() s:publish("a", "1", 1) end)
  end)
end)

describe("longpoll.core JSON", function()
  it("parses publish bodies keeping data digits", function()
    local cat, data = core.parse_publish('{"category":"a b","data":123456789012345678901234567890}')
    assert.equals("a b", cat)
    assert.equals("123456789012345678901234567890", data)
  end)

  it("gives the contract's errors", function()
    assert.matches("^Invalid POST body json", select(2, core.parse_publish("{")))
    assert.matches("^Invalid POST body json", select(2, core.parse_publish('{"category":"a","data":1} x')))
    assert.matches("'category'", select(2, core.parse_publish('{"data":1}')))
    assert.matches("'category'", select(2, core.parse_publish('{"category":"","data":1}')))
    assert.matches("'category'", select(2, core.parse_publish('{"category":5,"data":1}')))
    assert.matches("'data'", select(2, core.parse_publish('{"category":"a"}')))
    assert.matches("'data'", select(2, core.parse_publish('{"category":"a","data":null}')))
  end)

  it("encodes Lua values exactly", function()
    assert.equals("[9007199254740993,0.1,true]", core.json_encode({ 9007199254740993, 0.1, true }))
    assert.equals("9223372036854775807", core.json_encode(math.maxinteger))
    assert.same({ nil, "string is not valid UTF-8" }, { core.json_encode("\255") })
    local t = {}
    t.t = t
    assert.is_nil((core.json_encode(t)))
    assert.is_nil((core.json_encode(0 / 0)))
  end)
end)
