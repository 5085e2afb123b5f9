-- Server-Sent Events (manager.sse_handler) over raw sockets: the stream is parsed here the way
-- a browser's EventSource parses it (chunked framing, then SSE lines and messages).
local uv = require "luv"
local async = require "support.async"
local fixture = require "support.fixture"
local sse_client = require "support.sse_client"
local core = require "longpoll.core"
local sse = require "longpoll.sse"
local cjson = require "cjson"


local with_server = fixture.with_server

---------------------------------------------------------------------------------------------
local function open_stream(port, query, headers, path)
  return sse_client.open(port, query, headers, { path = path })
end

local function decoded(m)
  return cjson.decode(m.data)
end

local function wait_until(cond, timeout_ms) return async.wait_for(cond, timeout_ms or 3000) end

-- The uv timers open now, but the test harness's own.
local function timers()
  local n = 0
  uv.walk(function(h) if h:get_type() == "timer" and not async.owns(h) then n = n + 1 end end)
  return n
end

---------------------------------------------------------------------------------------------

describe("sse handler", function()
  it("streams with event-stream and no-cache headers, a retry line and a starting id", function()
    with_server({}, function(t)
      local s = open_stream(t.port, { { "category", "a" } })
      assert.equals(200, s.status)
      assert.equals("text/event-stream", s.headers["content-type"])
      assert.equals("no-cache, no-store, must-revalidate", s.headers["cache-control"])
      assert.equals("no-cache", s.headers["pragma"])
      assert.equals("0", s.headers["expires"])
      assert.equals("no", s.headers["x-accel-buffering"])
      assert.equals("chunked", s.headers["transfer-encoding"])
      assert.truthy(s:wait_for(function(st) return #st.messages >= 1 end))
      local first = s.messages[1]
      assert.equals(tostring(sse.RETRY_MS), first.retry)
      assert.matches("^%d+$", first.id) -- a time-only cursor: "from now on"
      assert.is_nil(first.data)
      s:close()
    end)
  end)

  it("sends each event as id <timestamp>_<id> and data <event json>, exactly as published", function()
    with_server({}, function(t)
      local s = open_stream(t.port, { { "category", "a" } })
      s:wait_for(function(st) return #st.messages >= 1 end)
      t.publish("a", '{"big":123456789012345678901234567890,"s":"é ✓ \\u0000"}')
      local e2 = t.manager:publish("a", "two")
      local got = s:next_events(2)
      local _, lp = t.get({ { "category", "a" }, { "timeout", "1" }, { "since_time", "0" } })
      local events = t.manager.engine.store:fetch_events("a", 0, nil, 0)
      assert.equals(2, #events)
      assert.equals(events[1].json, got[1].data)
      assert.equals(e2.json, got[2].data)
      assert.matches("123456789012345678901234567890", got[1].data, 1, true)
      assert.equals(math.tointeger(lp.events[1].timestamp) .. "_" .. lp.events[1].id, got[1].id)
      assert.equals(e2.timestamp .. "_" .. e2.id, got[2].id)
      assert.is_nil(got[1].event) -- default "message" events
      s:close()
    end)
  end)

  it("keeps data with line breaks intact across data: lines", function()
    with_server({}, function(t)
      local s = open_stream(t.port, { { "category", "nl" } })
      s:wait_for(function(st) return #st.messages >= 1 end)
      local e = assert(t.manager:publish_json("nl", '{\n  "a": 1,\r\n  "b": "x"\r}'))
      local got = s:next_events(1)[1]
      assert.equals((e.json:gsub("\r\n", "\n"):gsub("\r", "\n")), got.data)
      assert.same({ a = 1, b = "x" }, decoded(got).data)
      s:close()
    end)
  end)

  it("streams several categories merged in publish order, and no others", function()
    with_server({}, function(t)
      local s = open_stream(t.port, { { "category", "x" }, { "category", "y" } })
      s:wait_for(function(st) return #st.messages >= 1 end)
      local want = {}
      -- categories interleave: x, y, z, x, ...
      for i = 1, 30 do
        local cat = ({ "x", "y", "z" })[i % 3 + 1]
        local e = t.manager:publish(cat, i)
        if cat ~= "z" then want[#want + 1] = e.id end
      end
      local got = s:next_events(#want)
      for i, m in ipairs(got) do assert.equals(want[i], decoded(m).id) end
      assert.is_false(s:wait_for(function(st) return #st.messages > st.read end, 200))
      s:close()
    end)
  end)

  it("sends buffered events after since_time (+ last_id) first, then live ones", function()
    with_server({}, function(t)
      for i = 1, 4 do assert(t.manager.engine.store:restore("ms", tostring(i), core.uuid(), 1000)) end
      local all = cjson.decode((t.manager.engine.store:fetch("ms", 0, nil, 2000))).events
      local s = open_stream(t.port, { { "category", "ms" }, { "since_time", "1000" }, { "last_id", all[2].id } })
      local got = s:next_events(2)
      assert.same({ 3, 4 }, { decoded(got[1]).data, decoded(got[2]).data })
      assert.equals("1000_" .. all[4].id, got[2].id)
      t.manager:publish("ms", 5)
      assert.equals(5, decoded(s:next_events(1)[1]).data)
      s:close()
      local s0 = open_stream(t.port, { { "category", "ms" }, { "since_time", "0" } })
      assert.equals(5, #s0:next_events(5))
      s0:close()
    end)
  end)

  it("resumes right after Last-Event-ID (header or last_event_id arg), without gaps or repeats", function()
    with_server({}, function(t)
      local ids = {}
      for i = 1, 5 do ids[i] = t.manager:publish("r", i) end
      local cursor = sse.cursor_string(ids[2].timestamp, ids[2].id)
      local s = open_stream(t.port, { { "category", "r" } }, { ["Last-Event-ID"] = cursor })
      local got = s:next_events(3)
      assert.same({ 3, 4, 5 }, { decoded(got[1]).data, decoded(got[2]).data, decoded(got[3]).data })
      s:close()
      local q = open_stream(t.port, { { "category", "r" }, { "last_event_id", cursor } })
      assert.equals(3, decoded(q:next_events(1)[1]).data)
      q:close()
      -- the header wins over the query arg
      local both = open_stream(t.port, { { "category", "r" }, { "last_event_id", cursor } },
        { ["Last-Event-ID"] = sse.cursor_string(ids[4].timestamp, ids[4].id) })
      assert.equals(5, decoded(both:next_events(1)[1]).data)
      both:close()
    end)
  end)

  it("lets a stream that saw no event resume from its starting id", function()
    with_server({}, function(t)
      t.manager:publish("q", "before")
      local s = open_stream(t.port, { { "category", "q" } })
      s:wait_for(function(st) return #st.messages >= 1 end)
      local start_id = s.messages[1].id
      s:close()
      t.manager:publish("q", "while away 1")
      t.manager:publish("q", "while away 2")
      local again = open_stream(t.port, { { "category", "q" } }, { ["Last-Event-ID"] = start_id })
      local got = again:next_events(2)
      assert.same({ "while away 1", "while away 2" }, { decoded(got[1]).data, decoded(got[2]).data })
      again:close()
    end)
  end)

  it("walks a long interleaved stream across reconnects exactly once, in order", function()
    with_server({}, function(t)
      local published = {}
      local publisher = async.spawn(function()
        for i = 1, 120 do
          local cat = ({ "p", "q", "noise" })[i % 3 + 1]
          local e = t.manager:publish(cat, i)
          if cat ~= "noise" then published[#published + 1] = e.id end
          if i % 7 == 0 then async.sleep(5) end
        end
      end)
      local seen, last, passes = {}, nil, 0
      local query = { { "category", "p" }, { "category", "q" }, { "since_time", "0" } }
      -- Every pass reads a few events on a fresh connection, then resumes after the last one.
      for _ = 1, 100 do
        if publisher.done and #seen >= #published then break end
        passes = passes + 1
        local s = open_stream(t.port, query, last and { ["Last-Event-ID"] = last } or nil)
        local n = 0
        s:wait_for(function(st)
          while st.read < #st.messages and n < 7 do
            st.read = st.read + 1
            local m = st.messages[st.read]
            if m.data then
              seen[#seen + 1] = decoded(m).id
              last = m.id
              n = n + 1
            end
          end
          return n >= 7
        end, 150)
        s:close()
      end
      assert.truthy(passes > 5)
      async.wait_all({ publisher })
      assert.same(published, seen)
    end, { timeout_ms = 30000 })
  end)

  it("says event: missed when the buffer dropped events after the cursor", function()
    with_server({ max_event_buffer_size = 2 }, function(t)
      for i = 1, 4 do t.manager:publish("m", i) end
      local s = open_stream(t.port, { { "category", "m" }, { "since_time", "0" } })
      local got = s:next_events(3)
      assert.equals("missed", got[1].event)
      assert.same({ missed = true }, decoded(got[1]))
      assert.same({ 3, 4 }, { decoded(got[2]).data, decoded(got[3]).data })
      s:close()
    end)
  end)

  it("delivers a live event even when a long poll took it from the buffer (delete after first)", function()
    with_server({ delete_event_after_first_retrieval = true }, function(t)
      local s = open_stream(t.port, { { "category", "d" } })
      s:wait_for(function(st) return #st.messages >= 1 end)
      local poll = async.spawn(function()
        local _, body = t.get({ { "category", "d" }, { "timeout", "5" } })
        assert.equals("both", body.events[1].data)
      end)
      assert.truthy(wait_until(function() return t.manager:stats().waiting == 2 end))
      t.manager:publish("d", "both")
      assert.equals("both", decoded(s:next_events(1)[1]).data)
      async.wait_all({ poll })
      s:close()
    end)
  end)

  it("sends an event at once even when since_time is in the future (clock ahead)", function()
    with_server({}, function(t)
      local s = open_stream(t.port, { { "category", "f" }, { "since_time", tostring(math.tointeger(2 ^ 50)) } })
      s:wait_for(function(st) return #st.messages >= 1 end)
      t.manager:publish("f", "now")
      t.manager:publish("f", "and then")
      local got = s:next_events(2)
      assert.same({ "now", "and then" }, { decoded(got[1]).data, decoded(got[2]).data })
      s:close()
    end)
  end)

  it("sends heartbeat comments to every stream from the server's timer (C path), adding none", function()
    with_server({ sse_heartbeat_seconds = 1 }, function(t)
      local before = timers()
      local streams = {}
      for i = 1, 5 do streams[i] = open_stream(t.port, { { "category", "hb" .. i } }) end
      assert.truthy(wait_until(function() return t.manager:stats().sse_streams == 5 end))
      assert.equals(5, t.manager.native_sse:streams()) -- served in C
      assert.equals(0, t.manager.sse:count())
      for i = 1, 5 do
        assert.truthy(streams[i]:wait_for(function(st) return st.comments >= 2 end, 3500))
      end
      assert.equals(before, timers())
      for i = 1, 5 do streams[i]:close() end
      assert.truthy(wait_until(function() return t.manager:stats().sse_streams == 0 end))
    end, { timeout_ms = 20000 })
  end)

  it("sends heartbeat comments to every Lua stream from one shared timer (a wrapped handler)", function()
    with_server({ sse_heartbeat_seconds = 1 }, function(t)
      local before = timers()
      local streams = {}
      for i = 1, 5 do streams[i] = open_stream(t.port, { { "category", "hb" .. i } }, nil, "/lua-sse") end
      assert.truthy(wait_until(function() return t.manager.sse:count() == 5 end))
      assert.is_true(timers() - before <= 1)
      local hub_timer = t.manager.sse.timer
      assert.truthy(hub_timer)
      for i = 1, 5 do
        assert.truthy(streams[i]:wait_for(function(st) return st.comments >= 2 end, 3500))
      end
      assert.equals(hub_timer, t.manager.sse.timer)
      for i = 1, 5 do streams[i]:close() end
      assert.truthy(wait_until(function() return t.manager.sse:count() == 0 end))
      assert.is_nil(t.manager.sse.timer) -- no streams, no timer
    end, { timeout_ms = 20000, setup = function(manager, srv)
      -- a wrapper that sets a header: the response is no longer as received, so Lua serves it
      srv:route("GET", "/lua-sse", function(req, res)
        res:set_header("X-Wrapped", "1")
        return manager.sse_handler(req, res)
      end)
    end })
  end)

  it("forgets a stream whose client disconnects, at once", function()
    with_server({}, function(t)
      local s = open_stream(t.port, { { "category", "g" }, { "category", "h" } })
      s:wait_for(function(st) return #st.messages >= 1 end)
      assert.equals(1, t.manager:stats().waiting)
      assert.equals(1, t.manager:stats().sse_streams)
      s:close()
      assert.truthy(wait_until(function() return t.manager:stats().waiting == 0 end, 1000))
      assert.equals(0, t.manager:stats().sse_streams)
      assert.truthy(t.manager:publish("g", "nobody listens"))
      local by = t.manager:stats(true).by_category
      assert.equals(0, by.g.waiting)
    end)
  end)

  it("survives writing to a client that vanished before the server read its EOF", function()
    with_server({}, function(t)
      local s = open_stream(t.port, { { "category", "v" } })
      s:wait_for(function(st) return #st.messages >= 1 end)
      s:close()
      -- no loop turn in between: the server still thinks the stream is open
      for i = 1, 5 do assert.truthy(t.manager:publish("v", i)) end
      assert.truthy(wait_until(function() return t.manager:stats().sse_streams == 0 end, 2000))
      local again = open_stream(t.port, { { "category", "v" }, { "since_time", "0" } })
      assert.equals(5, #again:next_events(5))
      again:close()
    end)
  end)

  it("cuts off a stream whose client never reads, and keeps serving the others", function()
    with_server({ max_event_buffer_size = 5 }, function(t)
      local reader = open_stream(t.port, { { "category", "big" } })
      reader:wait_for(function(st) return #st.messages >= 1 end)
      local stuck = async.connect(t.port)
      stuck.tcp:read_stop() -- never reads a byte
      assert(stuck:send("GET /sse?category=big HTTP/1.1\r\nHost: x\r\n\r\n"))
      assert.truthy(wait_until(function() return t.manager:stats().sse_streams == 2 end))
      local data = '"' .. ("d"):rep(100000) .. '"'
      -- 30 MB for the stuck stream if nothing capped it (the output budget is 8 MB)
      for i = 1, 300 do
        assert(t.manager:publish_json("big", data))
        if i % 10 == 0 then reader:next_events(10, 10000) end -- the reader keeps up
        if t.manager:stats().sse_streams == 1 then break end
      end
      assert.truthy(wait_until(function() return t.manager:stats().sse_streams == 1 end, 5000), "cut off")
      assert(t.manager:publish("big", "still served"))
      local got
      assert.truthy(reader:wait_for(function(st)
        for i = st.read + 1, #st.messages do
          if st.messages[i].data and decoded(st.messages[i]).data == "still served" then got = true end
        end
        return got
      end, 10000))
      stuck:close()
      reader:close()
    end, { timeout_ms = 60000 })
  end)

  it("ends streams cleanly on manager shutdown", function()
    with_server({}, function(t)
      local a = open_stream(t.port, { { "category", "s" } })
      local b = open_stream(t.port, { { "category", "s" }, { "category", "u" } })
      a:wait_for(function(st) return #st.messages >= 1 end)
      b:wait_for(function(st) return #st.messages >= 1 end)
      t.manager:shutdown()
      assert.truthy(a:wait_for(function(st) return st.ended end, 2000))
      assert.truthy(b:wait_for(function(st) return st.ended end, 2000))
      local after = open_stream(t.port, { { "category", "s" } })
      assert.equals(503, after.status)
      assert.matches("shut down", cjson.decode(after.body).error)
      a:close()
      b:close()
      after:close()
    end)
  end)

  it("answers bad requests with 400 and a JSON error", function()
    with_server({ max_categories_per_subscription = 2 }, function(t)
      local bad_id = "Invalid 'Last-Event-ID': must be an id this server sent (<timestamp>_<id>)."
      local cases = {
        { {}, nil, "Invalid subscription category, must be 1-1024 characters long." },
        { { { "category", "" } }, nil, "Invalid subscription category, must be 1-1024 characters long." },
        { { { "category", "a" }, { "category", "b" }, { "category", "c" } }, nil, "Too many categories: at most 2 per subscription." },
        { { { "category", "a" }, { "since_time", "x" } }, nil, "Invalid 'since_time' arg." },
        { { { "category", "a" }, { "last_id", core.uuid() } }, nil, "Must provide 'since_time' arg when providing 'last_id'." },
        { { { "category", "a" }, { "since_time", "1" }, { "last_id", "nope" } }, nil, "Param 'last_id' was not a valid UUID." },
        { { { "category", "a" } }, { ["Last-Event-ID"] = "12_notauuid" }, bad_id },
        { { { "category", "a" }, { "last_event_id", "abc" } }, nil, "Invalid 'Last-Event-ID': must be an id this server sent (<timestamp>_<id>)." },
      }
      for _, c in ipairs(cases) do
        local s = open_stream(t.port, c[1], c[2])
        assert.equals(400, s.status)
        assert.equals("application/json", s.headers["content-type"])
        assert.same({ error = c[3] }, cjson.decode(s.body))
        s:close()
      end
      assert.equals(0, t.manager:stats().sse_streams)
    end)
  end)

  it("answers 503 before the stream starts when it cannot wait (max_waiting_per_category)", function()
    with_server({ max_waiting_per_category = 1 }, function(t)
      local first = open_stream(t.port, { { "category", "full" } })
      assert.equals(200, first.status)
      local second = open_stream(t.port, { { "category", "full" } })
      assert.equals(503, second.status)
      assert.equals("application/json", second.headers["content-type"])
      assert.matches("^cannot wait: ", cjson.decode(second.body).error)
      assert.equals(1, t.manager:stats().sse_streams)
      first:close()
      second:close()
    end)
  end)

  it("answers HEAD with the stream's headers and no stream", function()
    with_server({}, function(t)
      local status, h = async.http(t.port, { method = "HEAD", path = "/sse?category=a" })
      assert.equals(200, status)
      assert.equals("text/event-stream", h["content-type"])
      assert.equals(0, t.manager:stats().sse_streams)
    end)
  end)
end)

describe("sse helpers", function()
  it("get events from the core as a list of texts, whatever the data holds", function()
    local tricky = { '"}]},{\\"x"', "[{\"id\":\"a\"},{\"timestamp\":1}]", '{"a":["]","}"]}', '"\\\\"',
      "12.5e3" }
    local store = core.new_store { max_event_buffer_size = 10 }
    local jsons, ids = {}, {}
    for i, d in ipairs(tricky) do
      jsons[i], ids[i] = assert(store:publish("c", d, 1000 + i))
    end
    local events, count, missed = store:fetch_events("c", 0, nil, 2000)
    assert.equals(#tricky, count)
    assert.is_false(missed)
    for i, e in ipairs(events) do
      assert.same({ jsons[i], ids[i], 1000 + i }, { e.json, e.id, e.timestamp })
    end
    for _ = 1, 8 do store:publish("c", "1", 3000) end
    events, count, missed = store:fetch_events("c", 0, nil, 4000)
    assert.is_true(missed)
    assert.equals(10, count)
    assert.equals(10, #events)
  end)

  it("parses cursors", function()
    local id = core.uuid()
    assert.same({ 12, id }, { sse.parse_cursor("12_" .. id) })
    assert.same({ 12 }, { sse.parse_cursor("12") })
    assert.same({ -5 }, { sse.parse_cursor("-5") })
    assert.is_nil(sse.parse_cursor("12_x"))
    assert.is_nil(sse.parse_cursor("x"))
    assert.is_nil(sse.parse_cursor(""))
    assert.equals("7_" .. id, sse.cursor_string(7, id))
    assert.equals("7", sse.cursor_string(7))
  end)
end)
