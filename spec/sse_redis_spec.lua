-- Server-Sent Events in Redis mode: two managers ("nodes") on one private redis-server, each
-- behind its own HTTP server, streams read over raw sockets the way EventSource reads them.
-- Events are published on one node and streamed, resumed and caught up on the other.
local async = require "support.async"
local redis = require "support.redis"
local nodes_fixture = require "support.nodes"
local sse = require "longpoll.sse"
local cjson = require "cjson"


local wait_until = async.wait_or_fail

local rs = nodes_fixture.redis_stats

local function data_of(list)
  local out = {}
  for i, m in ipairs(list) do out[i] = cjson.decode(m.data).data end
  return out
end

-- Runs fn(A, B): two nodes (spec/support/nodes.lua) on the Redis at url, online first.
local function with_nodes(url, options, fn, timeout_ms)
  return nodes_fixture.with(url, 2, options, function(list) fn(list[1], list[2]) end, timeout_ms or 15000)
end

local function cursor_of(e) return sse.cursor_string(e.timestamp, e.id) end

if not redis.available() then
  describe("SSE with Redis", function() pending("redis-server is not installed") end)
  return
end

describe("SSE with Redis", function()
  local R
  setup(function() R = redis.start { persist = true } end)
  teardown(function() R:stop() end)
  before_each(function()
    if not R:running() then R:start() end
    R:cli("FLUSHALL")
  end)

  it("streams events published on another node, as id <timestamp>_<uuid> and the event JSON", function()
    with_nodes(R.url, {}, function(A, B)
      local s = B.stream({ { "category", "x" }, { "category", "y" } })
      assert.equals(200, s.status)
      assert.equals("text/event-stream", s.headers["content-type"])
      assert.truthy(s:wait_for(function(st) return #st.messages >= 1 end))
      assert.equals(tostring(sse.RETRY_MS), s.messages[1].retry)
      assert.matches("^%d+$", s.messages[1].id) -- "from now on", a time from Redis
      local want = {}
      for i = 1, 9 do
        local cat = ({ "x", "y", "z" })[i % 3 + 1]
        local e = assert((i % 2 == 0 and A or B).publish(cat, i))
        if cat ~= "z" then want[#want + 1] = e end
      end
      local nl = A.publish_json("x", '{\n  "a": 1,\r\n  "b": "x"\r}')
      want[#want + 1] = nl
      local got = s:next_events(#want)
      for i, m in ipairs(got) do
        assert.equals(cursor_of(want[i]), m.id)
        assert.equals((want[i].json:gsub("\r\n", "\n"):gsub("\r", "\n")), m.data)
        assert.is_nil(m.event)
      end
      assert.is_false(s:more_within(150))
      s:close()
    end)
  end)

  it("resumes from Last-Event-ID, last_event_id or since_time (+ last_id) on any node", function()
    with_nodes(R.url, {}, function(A, B)
      local e = {}
      for i = 1, 5 do e[i] = assert(A.publish("r", i)) end
      local s = B.stream({ { "category", "r" }, { "since_time", "0" } })
      local first = s:next_events(2)
      assert.same({ 1, 2 }, data_of(first))
      s:close()
      -- a browser reconnecting to the other node sends the last id it saw
      local a = A.stream({ { "category", "r" } }, { ["Last-Event-ID"] = first[2].id })
      assert.same({ 3, 4, 5 }, data_of(a:next_events(3)))
      local e6 = assert(B.publish("r", 6))
      assert.same({ 6 }, data_of(a:next_events(1)))
      assert.is_false(a:more_within(100))
      a:close()
      local q = B.stream({ { "category", "r" }, { "last_event_id", cursor_of(e[4]) } })
      assert.same({ 5, 6 }, data_of(q:next_events(2)))
      q:close()
      local by_time = A.stream({ { "category", "r" }, { "since_time", tostring(e[3].timestamp) }, { "last_id", e[3].id } })
      assert.same({ 4, 5, 6 }, data_of(by_time:next_events(3)))
      by_time:close()
      local both = B.stream({ { "category", "r" }, { "last_event_id", cursor_of(e[1]) } },
        { ["Last-Event-ID"] = cursor_of(e6) })
      assert.is_false(both:more_within(100)) -- the header wins: nothing after e6
      both:close()
      -- since_time ahead of Redis's clock: a live event is still sent (as to a long poll)
      local ahead = B.stream({ { "category", "r" }, { "since_time", tostring(math.tointeger(2 ^ 50)) } })
      ahead:wait_for(function(st) return #st.messages >= 1 end)
      wait_until("its read to return", function() return rs(B).fetches_in_flight == 0 end)
      assert(A.publish("r", 7))
      assert.same({ 7 }, data_of(ahead:next_events(1)))
      ahead:close()
    end)
  end)

  it("lets a stream that saw no event resume from its starting id, on the other node", function()
    with_nodes(R.url, {}, function(A, B)
      -- Redis's clock ahead of time: every event gets the same timestamp until time catches up
      local sec = tonumber(R:cli("TIME"):match("^(%d+)"))
      R:cli(("HSET longpoll:clock last %d"):format(sec * 1000 + 5000))
      local before = assert(A.publish("q", "before"))
      local s = B.stream({ { "category", "q" } })
      s:wait_for(function(st) return #st.messages >= 1 end)
      local start_id = s.messages[1].id
      s:close()
      wait_until("B to forget it", function() return rs(B).waiters == 0 end)
      local e1 = assert(A.publish("q", "while away 1"))
      assert(B.publish("q", "while away 2"))
      assert.equals(before.timestamp + 1, e1.timestamp) -- the starting time is between them
      local again = A.stream({ { "category", "q" } }, { ["Last-Event-ID"] = start_id })
      assert.same({ "while away 1", "while away 2" }, data_of(again:next_events(2)))
      assert.is_false(again:more_within(100))
      again:close()
    end)
  end)

  it("walks a long interleaved stream across reconnects and nodes exactly once, in order", function()
    with_nodes(R.url, { max_event_buffer_size = 1000 }, function(A, B)
      local function publisher(node, from)
        return async.spawn(function()
          for i = from, 120, 2 do
            assert(node.publish(({ "p", "q", "noise" })[i % 3 + 1], i))
            if i % 7 == 0 then async.sleep(3) end
          end
        end)
      end
      local publishers = { publisher(A, 1), publisher(B, 2) }
      local seen, last, passes = {}, nil, 0
      local query = { { "category", "p" }, { "category", "q" }, { "since_time", "0" } }
      -- every pass reads a few events on the other node, then resumes after the last one
      for _ = 1, 100 do
        if publishers[1].done and publishers[2].done and #seen >= 80 then break end
        passes = passes + 1
        local node = passes % 2 == 0 and A or B
        local s = node.stream(query, last and { ["Last-Event-ID"] = last } or nil)
        local n = 0
        s:wait_for(function(st)
          while st.read < #st.messages and n < 7 do
            st.read = st.read + 1
            local m = st.messages[st.read]
            if m.data then
              seen[#seen + 1] = cjson.decode(m.data).id
              last = m.id
              n = n + 1
            end
          end
          return n >= 7
        end, 150)
        s:close()
      end
      async.wait_all(publishers)
      assert.truthy(passes > 10)
      -- Redis's order, as a long poll reads it
      local _, _, body = async.http(A.port, { path = "/events?category=p&category=q&since_time=0&timeout=1" })
      local want = {}
      for i, e in ipairs(cjson.decode(body).events) do want[i] = e.id end
      assert.equals(80, #want)
      assert.same(want, seen)
    end, 25000)
  end)

  it("says event: missed when Redis dropped events after the cursor", function()
    with_nodes(R.url, { max_event_buffer_size = 2 }, function(A, B)
      local first = assert(A.publish("m", 1))
      for i = 2, 4 do assert(A.publish("m", i)) end
      local s = B.stream({ { "category", "m" } }, { ["Last-Event-ID"] = cursor_of(first) })
      local got = s:next_events(3)
      assert.equals("missed", got[1].event)
      assert.same({ missed = true }, cjson.decode(got[1].data))
      assert.same({ 3, 4 }, data_of({ got[2], got[3] }))
      assert(A.publish("m", 5))
      local live = s:next_events(1)[1]
      assert.is_nil(live.event)
      assert.equals(5, cjson.decode(live.data).data)
      s:close()
    end)
  end)

  it("sends what arrives during the catch-up read after it, and nothing twice after a late message or a gap", function()
    with_nodes(R.url, {}, function(A, B)
      local e1 = assert(A.publish("c", 1))
      B.transport.fetch_delay_ms = 150
      local s1 = B.stream({ { "category", "c" } }, { ["Last-Event-ID"] = sse.cursor_string(e1.timestamp - 1) })
      wait_until("the read to answer", function() return B.transport.delayed_replies == 1 end)
      assert(A.publish("c", 2)) -- after the read ran in Redis, before B handles its answer
      assert.same({ 1, 2 }, data_of(s1:next_events(2)))
      B.transport.fetch_delay_ms = nil
      -- an event whose pub/sub message comes after a read returned it
      B.transport.hold()
      local e3 = assert(A.publish("c", 3))
      local s2 = B.stream({ { "category", "c" } }, { ["Last-Event-ID"] = cursor_of(e1) })
      assert.same({ 2, 3 }, data_of(s2:next_events(2)))
      B.transport.release()
      assert.same({ 3 }, data_of(s1:next_events(1)))
      -- a gap in the pub/sub sequence: both streams read again from their cursors
      B.transport.hold()
      assert(A.publish("c", 4))
      local e5 = assert(A.publish("c", 5))
      wait_until("both messages at B", function() return #B.transport.held == 2 end)
      B.transport.drop(1)
      local gaps = rs(B).gaps
      B.transport.release()
      assert.equals(gaps + 1, rs(B).gaps)
      assert.same({ 4, 5 }, data_of(s1:next_events(2)))
      assert.same({ 4, 5 }, data_of(s2:next_events(2)))
      assert.is_false(s1:more_within(100))
      assert.is_false(s2:more_within(1))
      assert.equals(cursor_of(e5), s2.messages[#s2.messages].id)
      assert.equals(cursor_of(e3), s1.messages[4].id)
      s1:close()
      s2:close()
      -- a gap while a stream's read is in flight: it reads again once that read is answered
      B.transport.fetch_delay_ms = 100
      local s3 = B.stream({ { "category", "d" } }, { ["Last-Event-ID"] = cursor_of(e5) })
      wait_until("the read to answer", function() return B.transport.delayed_replies == 1 end)
      B.transport.hold()
      assert(A.publish("d", 6))
      assert(A.publish("d", 7))
      wait_until("both messages at B", function() return #B.transport.held == 2 end)
      B.transport.drop(1)
      B.transport.release()
      assert.same({ 6, 7 }, data_of(s3:next_events(2)))
      assert.is_false(s3:more_within(250))
      s3:close()
    end)
  end)

  it("sends heartbeats, and forgets a stream whose client disconnects at once", function()
    with_nodes(R.url, {}, function(A, B)
      local s = B.stream({ { "category", "g" }, { "category", "h" } })
      assert.truthy(s:wait_for(function(st) return st.comments >= 1 end, 2500))
      assert.equals(1, rs(B).waiters)
      assert.equals(1, B.manager.sse:count())
      s:close()
      wait_until("B to forget it", function() return rs(B).waiters == 0 end, 1000)
      assert.equals(0, B.manager.sse:count())
      assert.equals(0, B.manager:stats().waiting)
      assert.is_nil(B.manager.sse.timer)
      assert(A.publish("g", "nobody listens"))
    end)
  end)

  it("answers HEAD and bad requests before any stream, as in memory", function()
    with_nodes(R.url, {}, function(_, B)
      local status, h = async.http(B.port, { method = "HEAD", path = "/sse?category=a" })
      assert.equals(200, status)
      assert.equals("text/event-stream", h["content-type"])
      local bad = B.stream({ { "category", "a" } }, { ["Last-Event-ID"] = "12_notauuid" })
      assert.equals(400, bad.status)
      assert.same({ error = "Invalid 'Last-Event-ID': must be an id this server sent (<timestamp>_<id>)." },
        cjson.decode(bad.body))
      bad:close()
      assert.equals(0, B.manager.sse:count())
      assert.equals(0, rs(B).waiters)
    end)
  end)

  it("ends streams cleanly on shutdown, also one still waiting for its starting time", function()
    with_nodes(R.url, {}, function(A, B)
      local s = B.stream({ { "category", "s" }, { "last_event_id", "0" } })
      s:wait_for(function(st) return #st.messages >= 1 end)
      R:cli("CLIENT PAUSE 400 ALL")
      local starting
      local t = async.spawn(function() starting = B.stream({ { "category", "s" } }) end)
      wait_until("a stream to ask Redis", function() return next(B.manager.sse.starting) ~= nil end)
      local stopped = async.event()
      B.manager:shutdown(function() stopped:set(true) end)
      assert(stopped:wait(3000))
      async.wait_all { t }
      assert.truthy(s:wait_for(function(st) return st.ended end, 2000))
      assert.equals(503, starting.status)
      assert.same({ error = "manager is shut down" }, cjson.decode(starting.body))
      assert.equals(0, rs(B).waiters)
      s:close()
      starting:close()
      wait_until("Redis to answer again", function() return A.publish("s", "after") ~= nil end)
    end)
  end)

  it("keeps streams open through a Redis restart, then sends what they missed, none twice", function()
    with_nodes(R.url, {}, function(A, B)
      local s = B.stream({ { "category", "k" } })
      s:wait_for(function(st) return #st.messages >= 1 end)
      local e1 = assert(A.publish("k", 1))
      assert.same({ 1 }, data_of(s:next_events(1)))
      -- B's pub/sub is slow: it has not seen 2 and 3 when Redis dies
      B.transport.hold()
      assert(A.publish("k", 2))
      assert(A.publish("k", 3))
      R:kill()
      wait_until("both nodes to notice", function() return not rs(A).online and not rs(B).online end)
      assert.is_nil((A.publish("k", "refused")))
      -- the stream stays open, heartbeats go on; a stream opened now is accepted and waits
      local comments = s.comments
      assert.truthy(s:wait_for(function(st) return st.comments > comments end, 2500))
      assert.is_false(s.ended)
      local late = B.stream({ { "category", "k" } }, { ["Last-Event-ID"] = cursor_of(e1) })
      assert.equals(200, late.status)
      local fresh = A.stream({ { "category", "k" } }) -- no cursor, no Redis: no starting id
      assert.truthy(fresh:wait_for(function(st) return #st.messages >= 1 end))
      assert.is_nil(fresh.messages[1].id)
      R:start()
      wait_until("both nodes online again", function() return rs(A).online and rs(B).online end)
      assert.same({ 2, 3 }, data_of(s:next_events(2)))
      assert.same({ 2, 3 }, data_of(late:next_events(2)))
      B.transport.release() -- the old messages come late: nothing twice
      assert(B.publish("k", 4))
      assert.same({ 4 }, data_of(s:next_events(1)))
      assert.same({ 4 }, data_of(late:next_events(1)))
      assert.same({ 4 }, data_of(fresh:next_events(1)))
      assert.is_false(s:more_within(150))
      assert.is_false(late:more_within(1))
      assert.is_false(fresh:more_within(1))
      s:close()
      late:close()
      fresh:close()
    end, 20000)
  end)
end)
