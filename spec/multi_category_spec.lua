-- Several categories in one long-poll subscription (repeated category= args), over HTTP.
local async = require "support.async"
local fixture = require "support.fixture"
local core = require "longpoll.core"
local cjson = require "cjson"

local with_server = fixture.with_server

local function query(categories, extra)
  local q = {}
  for _, c in ipairs(categories) do q[#q + 1] = { "category", c } end
  for _, kv in ipairs(extra or {}) do q[#q + 1] = kv end
  return q
end

local function wait_until(cond, timeout_ms) return async.wait_for(cond, timeout_ms or 3000) end

describe("multi-category subscription", function()
  it("answers buffered events of any of its categories, oldest first, and no others", function()
    with_server({}, function(t)
      local want = {}
      for i, cat in ipairs { "a", "b", "c", "a", "b", "b", "c", "a" } do
        local e = assert(t.manager:publish(cat, i))
        if cat ~= "c" then want[#want + 1] = { id = e.id, category = cat, data = i } end
      end
      local status, body = t.get(query({ "a", "b" }, { { "timeout", "1" }, { "since_time", "0" } }))
      assert.equals(200, status)
      assert.equals(#want, #body.events)
      for i, e in ipairs(body.events) do
        assert.same(want[i], { id = e.id, category = e.category, data = e.data })
        if i > 1 then assert.truthy(e.timestamp >= body.events[i - 1].timestamp) end
      end
      -- the same category twice is the same subscription
      local _, dup = t.get(query({ "a", "a" }, { { "timeout", "1" }, { "since_time", "0" } }))
      assert.equals(3, #dup.events)
    end)
  end)

  it("walks the merged stream with one cursor, without gaps or repeats, while publishers interleave", function()
    with_server({ max_event_buffer_size = 1000 }, function(t)
      local publishers = {}
      -- three publishers over HTTP, each on its own category, plus one on a category nobody reads
      for p, cat in ipairs { "red", "green", "blue", "noise" } do
        publishers[p] = async.spawn(function()
          for i = 1, 25 do
            local status = t.publish(cat, ('{"p":%d,"i":%d}'):format(p, i))
            assert.equals(200, status)
            if i % 5 == p then async.sleep(3) end
          end
        end)
      end
      local all_done = function()
        for _, task in ipairs(publishers) do if not task.done then return false end end
        return true
      end
      local seen, seen_ids = {}, {}
      local since, last_id = "0", nil
      local polls = 0
      -- Every poll continues from the last event received; bounded by count.
      for _ = 1, 500 do
        local extra = { { "timeout", "1" }, { "since_time", since } }
        if last_id then extra[#extra + 1] = { "last_id", last_id } end
        local _, body = t.get(query({ "red", "green", "blue" }, extra))
        polls = polls + 1
        if body.events then
          for _, e in ipairs(body.events) do
            assert.is_nil(seen_ids[e.id], "repeated event")
            seen_ids[e.id] = true
            seen[#seen + 1] = e
          end
          local last = body.events[#body.events]
          since, last_id = ("%d"):format(last.timestamp), last.id
        else
          assert.equals("no events before timeout", body.timeout)
          if all_done() then break end
        end
        if all_done() and #seen == 75 then break end
      end
      async.wait_all(publishers)
      assert.truthy(polls > 3)
      assert.equals(75, #seen)
      -- the order is publish order: the store's own merged order, per publisher ascending
      local store_order = cjson.decode((t.manager.engine.store:fetch({ "red", "green", "blue" }, 0, nil, 0))).events
      for i, e in ipairs(seen) do assert.equals(store_order[i].id, e.id) end
      local next_i = { 1, 1, 1 }
      for _, e in ipairs(seen) do
        assert.equals(next_i[e.data.p], e.data.i)
        next_i[e.data.p] = next_i[e.data.p] + 1
      end
    end, { timeout_ms = 30000 })
  end)

  it("walks events of one millisecond across categories with since_time and last_id", function()
    with_server({}, function(t)
      local cats = { "x", "y", "x", "z", "y", "x" }
      for i, c in ipairs(cats) do assert(t.manager.engine.store:restore(c, tostring(i), core.uuid(), 5000)) end
      local all = cjson.decode((t.manager.engine.store:fetch({ "x", "y", "z" }, 0, nil, 6000))).events
      assert.equals(6, #all)
      -- resume after the third event (an "x") while subscribed to x and y only
      local _, body = t.get(query({ "x", "y" }, { { "timeout", "1" }, { "since_time", "5000" }, { "last_id", all[3].id } }))
      assert.same({ 5, 6 }, { math.tointeger(body.events[1].data), math.tointeger(body.events[2].data) })
      -- a last_id this subscription cannot have seen (a "z" event) loses nothing: the whole
      -- millisecond is answered again
      local _, after_z = t.get(query({ "x", "y" }, { { "timeout", "1" }, { "since_time", "5000" }, { "last_id", all[4].id } }))
      assert.same({ 1, 2, 3, 5, 6 }, (function()
        local d = {}
        for i, e in ipairs(after_z.events) do d[i] = math.tointeger(e.data) end
        return d
      end)())
    end)
  end)

  it("says missed when any of the categories dropped events after the cursor", function()
    with_server({ max_event_buffer_size = 2 }, function(t)
      t.manager:publish("keep", 0)
      for i = 1, 4 do t.manager:publish("drop", i) end
      local _, body = t.get(query({ "keep", "drop" }, { { "timeout", "1" }, { "since_time", "0" } }))
      assert.is_true(body.missed)
      assert.same({ 0, 3, 4 }, { body.events[1].data, body.events[2].data, body.events[3].data })
    end)
  end)

  it("refuses more categories than max_categories_per_subscription", function()
    with_server({}, function(t)
      local cats = {}
      for i = 1, 17 do cats[i] = "c" .. i end
      local status, body = t.get(query(cats, { { "timeout", "1" } }))
      assert.equals(200, status)
      assert.same({ error = "Too many categories: at most 16 per subscription." }, body)
      cats[17] = nil
      local _, ok = t.get(query(cats, { { "timeout", "1" } }))
      assert.equals("no events before timeout", ok.timeout)
    end)
    with_server({ max_categories_per_subscription = 2, subscribe_error_status = 400 }, function(t)
      local status, body = t.get(query({ "a", "b", "c" }, { { "timeout", "1" } }))
      assert.equals(400, status)
      assert.same({ error = "Too many categories: at most 2 per subscription." }, body)
      local _, bad = t.get(query({ "a", "" }, { { "timeout", "1" } }))
      assert.same({ error = "Invalid subscription category, must be 1-1024 characters long." }, bad)
    end)
  end)

  it("wakes a waiting subscriber for an event of any of its categories", function()
    with_server({}, function(t)
      for _, cat in ipairs { "one", "two", "three" } do
        local task = async.spawn(function()
          local _, body = t.get(query({ "one", "two", "three" }, { { "timeout", "10" } }))
          assert.equals(1, #body.events)
          assert.equals(cat, body.events[1].category)
        end)
        assert.truthy(wait_until(function() return t.manager:stats().waiting == 1 end))
        t.manager:publish("other", "not this")
        t.publish(cat, '"wake"')
        async.wait_all({ task })
        assert.equals(0, t.manager:stats().waiting)
      end
    end)
  end)

  it("forgets a waiting multi-category subscriber that disconnects, at once", function()
    with_server({}, function(t)
      local conn = async.connect(t.port)
      conn:send("GET " .. fixture.url("/events", query({ "m1", "m2" }, { { "timeout", "30" } }))
        .. " HTTP/1.1\r\nHost: x\r\n\r\n")
      local other = async.spawn(function()
        local _, body = t.get(query({ "m2" }, { { "timeout", "10" } }))
        assert.equals("still here", body.events[1].data)
      end)
      assert.truthy(wait_until(function() return t.manager:stats().waiting == 2 end))
      local by = t.manager:stats(true).by_category
      assert.same({ 1, 2 }, { by.m1.waiting, by.m2.waiting })
      conn:close()
      assert.truthy(wait_until(function() return t.manager:stats().waiting == 1 end, 1000))
      by = t.manager:stats(true).by_category
      assert.same({ 0, 1 }, { by.m1 and by.m1.waiting or 0, by.m2.waiting })
      t.manager:publish("m1", "nobody")
      t.manager:publish("m2", "still here")
      async.wait_all({ other })
      assert.equals(0, t.manager:stats().waiting)
    end)
  end)
end)
