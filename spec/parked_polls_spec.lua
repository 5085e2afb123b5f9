-- Long polls parked in C: a poll to the manager's own handler with nothing to answer yet waits
-- on its store subscription inside the HTTP engine (src/lp_lua_server.c park), and is answered
-- there by a publish (from Lua or HTTP), by its timeout, or forgotten when its client leaves.
-- What a client sees must be what the Lua path gives; these specs check the rules around it.
local async = require "support.async"
local fixture = require "support.fixture"
local cjson = require "cjson"
local core = require "longpoll.core"

local with_server = fixture.with_server

local function setup(manager, srv)
  srv:route("GET", "/events", manager.subscription_handler)
  srv:route("GET", "/wrapper", function(req, res) return manager.subscription_handler(req, res) end)
  srv:route("GET", "/watched", function(req, res) -- a wrapper that wants to hear the client leave
    res:on_close(function() end)
    return manager.subscription_handler(req, res)
  end)
  srv:route("*", "/publish", manager.publish_handler)
  srv:route("GET", "/sse", manager.sse_handler)
end

local function poll(port, query, extra)
  local conn = async.connect(port)
  conn:send("GET " .. query .. " HTTP/1.1\r\nHost: x\r\n" .. (extra or "") .. "\r\n")
  return conn
end

local function parked(t, n)
  assert(async.wait_for(function() return t.manager:stats().timeouts_pending == n end, 5000),
    "expected " .. n .. " waiting long polls")
end

local function events_of(conn)
  local status, _, body = conn:read_response()
  assert.equals(200, status)
  return cjson.decode(body).events
end

describe("long polls parked in C", function()
  it("are woken by a publish from Lua and from HTTP, each category of a poll", function()
    with_server({}, function(t)
      local before = t.srv:fast_answers()
      local a = poll(t.port, "/events?category=a&timeout=20")
      local ab = poll(t.port, "/events?category=x&category=b&timeout=20")
      local wrapped = poll(t.port, "/wrapper?category=b&timeout=20") -- handed back, parked too
      parked(t, 3)
      assert.equals(before, t.srv:fast_answers()) -- nothing answered yet
      assert(t.manager:publish("b", { n = 1 })) -- Lua: the store's binding answers them in C
      assert.equals(1, events_of(ab)[1].data.n)
      assert.equals(1, events_of(wrapped)[1].data.n)
      assert.equals(before + 2, t.srv:fast_answers())
      parked(t, 1)
      assert.equals(200, (t.publish("a", '{"n":2}')))
      local got = events_of(a)
      assert.equals(2, got[1].data.n)
      assert.equals("a", got[1].category)
      assert.equals(0, t.manager:stats().waiting)
      a:close()
      ab:close()
      wrapped:close()
    end, { setup = setup })
  end)

  it("continue with their cursor: every event once, in order, over one connection", function()
    with_server({}, function(t)
      local conn = async.connect(t.port)
      local since, last_id, seen = 0, nil, {}
      local published = 0
      for _ = 1, 30 do
        local q = ("/events?category=c&timeout=20&since_time=%d"):format(since)
          .. (last_id and ("&last_id=" .. last_id) or "")
        conn:send("GET " .. q .. " HTTP/1.1\r\nHost: x\r\n\r\n")
        if #seen == published then -- caught up: the poll parks; two events, one wakes it
          parked(t, 1)
          published = published + 1
          assert(t.manager:publish("c", published))
          published = published + 1
          assert.equals(200, (t.publish("c", tostring(published))))
        end
        for _, e in ipairs(events_of(conn)) do
          seen[#seen + 1] = e.data
          since, last_id = e.timestamp, e.id
        end
      end
      conn:close()
      local want = {}
      for i = 1, #seen do want[i] = i end
      assert.same(want, seen)
      assert.is_true(#seen >= 20)
    end, { setup = setup })
  end)

  it("time out with the timeout answer, and a pipelined request waits behind them", function()
    with_server({}, function(t)
      local before_ts = t.manager:publish("t", 1) and t.manager:stats().last_timestamp
      local conn = async.connect(t.port)
      conn:send("GET /events?category=t&timeout=1 HTTP/1.1\r\nHost: x\r\n\r\n"
        .. "GET /events?category=t&timeout=5&since_time=0 HTTP/1.1\r\nHost: x\r\n\r\n")
      local status, _, body = conn:read_response()
      assert.equals(200, status)
      local answer = cjson.decode(body)
      assert.equals("no events before timeout", answer.timeout)
      assert.is_true(answer.timestamp >= before_ts)
      assert.equals(1, events_of(conn)[1].data) -- the pipelined one, after
      conn:close()
      assert.equals(0, t.manager:stats().waiting)
    end, { setup = setup })
  end)

  it("are forgotten when their client leaves, and answer nothing", function()
    with_server({}, function(t)
      local gone = poll(t.port, "/events?category=g&timeout=20")
      local stays = poll(t.port, "/events?category=g&timeout=20")
      parked(t, 2)
      gone:close()
      parked(t, 1)
      assert.equals(1, t.manager:stats().waiting)
      local before = t.srv:fast_answers()
      assert(t.manager:publish("g", "x"))
      assert.equals("x", events_of(stays)[1].data)
      assert.equals(before + 1, t.srv:fast_answers())
      stays:close()
    end, { setup = setup })
  end)

  it("get the timeout answer when the manager shuts down", function()
    with_server({}, function(t)
      local conn = poll(t.port, "/events?category=s&timeout=60")
      parked(t, 1)
      local done = false
      t.manager:shutdown(function() done = true end)
      local status, _, body = conn:read_response()
      assert.equals(200, status)
      assert.equals("no events before timeout", cjson.decode(body).timeout)
      assert(async.wait_for(function() return done end, 5000))
      conn:close()
    end, { setup = setup })
  end)

  it("share a publish with Lua waiters in the store's order", function()
    with_server({}, function(t)
      local c = poll(t.port, "/events?category=m&timeout=20")
      local watched = poll(t.port, "/watched?category=m&timeout=20") -- waits in Lua
      local sse = async.connect(t.port)
      sse:send("GET /sse?category=m HTTP/1.1\r\nHost: x\r\n\r\n")
      assert(async.wait_for(function() return t.manager:stats().waiting == 3 end, 5000))
      assert.equals(1, t.manager.native:parked())
      assert.equals(200, (t.publish("m", '"one"')))
      assert.equals("one", events_of(c)[1].data)
      assert.equals("one", events_of(watched)[1].data)
      c:close()
      watched:close()
      sse:close()
    end, { setup = setup })
  end)

  it("take delete-after-first events, which then leave the buffer", function()
    with_server({ delete_event_after_first_retrieval = true }, function(t)
      local c = poll(t.port, "/events?category=d&timeout=20")
      parked(t, 1)
      assert.equals(200, (t.publish("d", "1")))
      assert.equals(1, events_of(c)[1].data)
      c:close()
      assert.equals(0, t.manager:stats().events)
    end, { setup = setup })
  end)

  it("are not made beyond max_waiting_per_category: the Lua handler refuses", function()
    with_server({ max_waiting_per_category = 1 }, function(t)
      local first = poll(t.port, "/events?category=w&timeout=20")
      parked(t, 1)
      local status, body = t.get({ { "category", "w" }, { "timeout", "20" } })
      assert.is_true(status >= 400)
      assert.is_string(body.error)
      first:close()
    end, { setup = setup })
  end)
end)

describe("a store closed under a parked poll", function()
  it("answers it 503, never leaves it hanging", function()
    async.run(function()
      local server = require "longpoll.server"
      local answers = require "longpoll.answers"
      local store = core.new_store { max_event_buffer_size = 10 }
      local native = core.native_subscription(store, { max_category_bytes = 1024,
        max_categories_per_subscription = 4, max_longpoll_timeout_seconds = 110, header_block = answers.JSON.text })
      local srv = assert(server.new { host = "127.0.0.1", port = 0 })
      local function handler(_, res) res:send(500, { error = "not native" }) end
      require("longpoll.http.native").register(handler, native)
      srv:route("GET", "/events", handler)
      local port = assert(srv:listen())
      local conn = poll(port, "/events?category=a&timeout=20")
      assert(async.wait_for(function() return native:parked() == 1 end, 5000))
      store:close()
      local status, _, body = conn:read_response()
      assert.equals(503, status)
      assert.equals("manager is shut down", cjson.decode(body).error)
      assert.equals(0, native:parked())
      conn:close()
      local closed = async.event()
      srv:close(function() closed:set(true) end)
      assert(closed:wait(5000))
    end)
  end)
end)
