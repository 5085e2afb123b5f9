-- longpoll.client against a real server on a real socket: order and exactly-once delivery,
-- restarts, auth and headers, stop, publish, the iterator, and option checks.
local uv = require "luv"
local async = require "support.async"
local fixture = require "support.fixture"
local longpoll = require "longpoll"
local server = require "longpoll.server"
local client = require "longpoll.client"

local with_server = fixture.with_server

-- Waits (yielding to the loop) until pred() is true; fails the test after timeout_ms.
local wait_until = async.wait_or_fail

local function urls(port)
  local base = "http://127.0.0.1:" .. port
  return base .. "/events", base .. "/publish"
end

-- A client whose events land in `seen`; returns client, seen, failures.
local function collecting_client(port, options)
  local sub, pub = urls(port)
  local o = { subscribe_url = sub, publish_url = pub, category = "news" }
  for k, v in pairs(options or {}) do o[k] = v end
  local failures = {}
  local user_on_failure = o.on_failure
  o.on_failure = function(err)
    failures[#failures + 1] = err
    if user_on_failure then return user_on_failure(err) end
    return true
  end
  local c = assert(client.new(o))
  local seen = {}
  return c, seen, failures, function(since)
    c:start(since, function(event) seen[#seen + 1] = event end)
  end
end

local function ids(list)
  local out = {}
  for i, e in ipairs(list) do out[i] = e.id end
  return out
end

-- Publishes through the client's callback API and waits for the answer.
local function publish(c, category, data)
  local done = async.event()
  c:publish(category, data, function(ok, err) done:set(ok, err) end)
  return done:wait(5000)
end

-- Mounts the manager's handlers behind a wrapper that records every request.
local function recording(log)
  return function(manager, srv)
    srv:route("GET", "/events", function(req, res)
      log[#log + 1] = req
      return manager.subscription_handler(req, res)
    end)
    srv:route("*", "/publish", function(req, res)
      log[#log + 1] = req
      return manager.publish_handler(req, res)
    end)
  end
end

local function waiting(manager)
  return manager:stats().waiting > 0
end

describe("longpoll.client", function()
  it("delivers every event once, in order, across poll timeouts", function()
    local requests = {}
    with_server({}, function(t)
      local c, seen, failures, start = collecting_client(t.port, { poll_timeout_seconds = 1 })
      start(nil)
      local published = {}
      for round = 1, 3 do
        wait_until("a waiting poll", function() return waiting(t.manager) end)
        published[#published + 1] = t.manager:publish("news", "event " .. round)
        t.manager:publish("other", "not for us")
        wait_until("event " .. round, function() return #seen == round end)
        -- the next poll times out before the next event: wait for the poll that continues from
        -- a timeout answer's timestamp
        wait_until("a poll after a timeout", function()
          for i = #requests, 1, -1 do
            local since = tonumber(requests[i].query.since_time)
            if since and since > seen[round].timestamp then return true end
          end
          return false
        end, 10000)
      end
      c:stop()
      assert.same(ids(published), ids(seen))
      assert.same({}, failures)
      assert.equals("event 3", seen[3].data)
      assert.equals("news", seen[3].category)
      assert.equals("integer", math.type(seen[3].timestamp))
      -- after a timeout answer the client continues from its timestamp and keeps last_id
      local after_timeout
      for i = 2, #requests do
        local q = requests[i].query
        if q.since_time and tonumber(q.since_time) > seen[1].timestamp and q.last_id == seen[1].id then
          after_timeout = q
        end
      end
      assert.truthy(after_timeout, "no poll continued from a timeout answer's timestamp")
      assert.matches("^%d+$", after_timeout.since_time)
      -- every poll went over one kept-alive connection
      local peers = {}
      for _, req in ipairs(requests) do peers[req.remote_addr] = true end
      assert.equals(1, #(function() local l = {} for p in pairs(peers) do l[#l + 1] = p end return l end)())
    end, { setup = recording(requests) })
  end)

  it("sees each of 200 events published in a burst exactly once, in order", function()
    with_server({}, function(t)
      local c, seen, failures, start = collecting_client(t.port, { poll_timeout_seconds = 2 })
      start(nil)
      wait_until("a waiting poll", function() return waiting(t.manager) end)
      local published = {}
      -- bursts of varying size with loop turns between them, so answers carry 1..n events
      -- and several events share a millisecond (the case last_id exists for)
      local n = 0
      while n < 200 do
        for _ = 1, (n % 7) + 1 do
          if n == 200 then break end
          n = n + 1
          published[n] = t.manager:publish("news", { seq = n })
        end
        async.sleep(n % 3)
      end
      wait_until("200 events", function() return #seen >= 200 end)
      async.sleep(100) -- a duplicate would arrive now
      c:stop()
      assert.equals(200, #seen)
      assert.same(ids(published), ids(seen))
      for i, e in ipairs(seen) do assert.equals(i, e.data.seq) end
      assert.same({}, failures)
    end)
  end)

  it("publishes 200 events of its own while polling and sees them in order", function()
    with_server({}, function(t)
      local c, seen, failures, start = collecting_client(t.port, { poll_timeout_seconds = 2 })
      start(nil)
      wait_until("a waiting poll", function() return waiting(t.manager) end)
      local answered = 0
      for i = 1, 200 do
        c:publish("news", i, function(ok, err)
          assert(ok, err)
          answered = answered + 1
        end)
      end
      wait_until("200 publish answers", function() return answered == 200 end)
      wait_until("200 events", function() return #seen >= 200 end)
      async.sleep(100)
      c:stop()
      assert.equals(200, #seen)
      for i, e in ipairs(seen) do assert.equals(i, e.data) end
      assert.same({}, failures)
    end)
  end)

  it("resumes without gaps when the server is stopped and started on the same port", function()
    -- The manager (and so its buffer) is kept; only the HTTP server goes away and comes back,
    -- which is what a restart with persistence looks like to a client.
    async.run(function()
      local manager = assert(longpoll.start {})
      local function serve(port)
        local srv = assert(server.new { port = port })
        srv:route("GET", "/events", manager.subscription_handler)
        srv:route("*", "/publish", manager.publish_handler)
        return srv, assert(srv:listen())
      end
      local srv, port = serve(0)
      local c, seen, failures, start = collecting_client(port,
        { poll_timeout_seconds = 1, reattempt_wait_seconds = 0.1 })
      start(nil)
      local published = {}
      wait_until("a waiting poll", function() return waiting(manager) end)
      for i = 1, 3 do published[i] = manager:publish("news", i) end
      wait_until("3 events", function() return #seen == 3 end)
      -- down: close waits for the pending poll (its timeout answer), then every socket is gone
      local closed = async.event()
      srv:close(function() closed:set() end)
      assert(closed:wait(5000))
      for i = 4, 8 do published[i] = manager:publish("news", i) end
      wait_until("failed attempts while down", function() return #failures >= 2 end)
      assert.matches("connect", failures[1])
      srv = serve(port)
      wait_until("8 events", function() return #seen == 8 end)
      published[9] = manager:publish("news", 9)
      wait_until("9 events", function() return #seen == 9 end)
      c:stop()
      assert.same(ids(published), ids(seen))
      manager:shutdown()
      closed = async.event()
      srv:close(function() closed:set() end)
      assert(closed:wait(5000))
    end, 20000)
  end)

  it("resumes from a restarted manager that restored the buffer (a process restart)", function()
    -- Two managers: the second restores the first one's events through an add-on, as a
    -- persisting add-on does after a restart; the client must go on from its cursor.
    async.run(function()
      local kept = {}
      local recorder = { on_publish = function(e)
        kept[#kept + 1] = { id = e.id, timestamp = e.timestamp, category = e.category, data_json = e.data_json }
      end }
      local first = assert(longpoll.start { add_on = recorder })
      local srv = assert(server.new { port = 0 })
      srv:route("GET", "/events", first.subscription_handler)
      local port = assert(srv:listen())
      local c, seen, _, start = collecting_client(port, { poll_timeout_seconds = 1, reattempt_wait_seconds = 0.1 })
      start(0)
      local published = {}
      for i = 1, 3 do published[i] = first:publish("news", i) end
      wait_until("3 events", function() return #seen == 3 end)
      wait_until("a waiting poll", function() return waiting(first) end)
      first:shutdown()
      local closed = async.event()
      srv:close(function() closed:set() end)
      assert(closed:wait(5000))
      -- the new process: restore, publish more, serve on the same port
      local second = assert(longpoll.start { add_on = { on_start = function()
        local i = 0
        return function() i = i + 1 return kept[i] end
      end } })
      for i = 4, 6 do published[i] = second:publish("news", i) end
      srv = assert(server.new { port = port })
      srv:route("GET", "/events", second.subscription_handler)
      assert(srv:listen())
      wait_until("6 events", function() return #seen == 6 end)
      c:stop()
      assert.same(ids(published), ids(seen))
      for i = 2, 6 do assert.is_true(seen[i].timestamp >= seen[i - 1].timestamp) end
      second:shutdown()
      closed = async.event()
      srv:close(function() closed:set() end)
      assert(closed:wait(5000))
    end, 20000)
  end)

  it("sends basic auth and extra headers on polls and publishes", function()
    local requests = {}
    local function guard(handler)
      return function(req, res)
        requests[#requests + 1] = req
        local user, password = req:basic_auth()
        if user ~= "alice" or password ~= "s3cr:et" or req.headers["x-token"] ~= "t0ken" then
          return res:send(401, { error = "unauthorized" })
        end
        return handler(req, res)
      end
    end
    with_server({}, function(t)
      local c, seen, failures, start = collecting_client(t.port, {
        basic_auth = { "alice", "s3cr:et" }, headers = { ["X-Token"] = "t0ken", ["X-Other"] = "1" },
      })
      start(nil)
      wait_until("a waiting poll", function() return waiting(t.manager) end)
      assert.same({ true }, { publish(c, "news", "hello") })
      wait_until("the event", function() return #seen == 1 end)
      c:stop()
      assert.equals("hello", seen[1].data)
      assert.same({}, failures)
      assert.equals("GET", requests[1].method)
      assert.equals("1", requests[1].headers["x-other"])
      local methods = {}
      for _, r in ipairs(requests) do methods[r.method] = true end
      assert.is_true(methods.POST)

      -- a wrong password: the failure reaches on_failure, and returning false stops the client
      local bad, bad_seen, bad_failures, bad_start = collecting_client(t.port, {
        basic_auth = { user = "alice", password = "wrong" }, headers = { { "X-Token", "t0ken" } },
        reattempt_wait_seconds = 0.05, on_failure = function() return false end,
      })
      bad_start(nil)
      wait_until("the client to stop", function() return not bad:is_running() end)
      assert.same({ "HTTP response code: 401" }, bad_failures)
      assert.same({}, bad_seen)
      local ok, err = publish(bad, "news", "x")
      assert.is_false(ok)
      assert.equals("HTTP response code: 401: unauthorized", err)
    end, { setup = function(manager, srv)
      srv:route("GET", "/events", guard(manager.subscription_handler))
      srv:route("*", "/publish", guard(manager.publish_handler))
    end })
  end)

  it("stops at once during a poll: connection closed, no callback afterwards", function()
    with_server({}, function(t)
      local before = {}
      uv.walk(function(h) before[h] = true end)
      local c, seen, failures, start = collecting_client(t.port, { reattempt_wait_seconds = 0.05 })
      start(nil)
      wait_until("a waiting poll", function() return waiting(t.manager) end)
      c:stop()
      assert.is_false(c:is_running())
      -- the server sees the close and forgets the subscriber
      wait_until("the server to drop the poll", function() return not waiting(t.manager) end, 2000)
      t.manager:publish("news", "too late")
      async.sleep(200)
      assert.same({}, seen)
      assert.same({}, failures)
      c:stop() -- twice is harmless
      -- nothing of the client is left open
      wait_until("client handles to close", function()
        local extra = 0
        uv.walk(function(h)
          if not before[h] and not async.owns(h) and not h:is_closing() then extra = extra + 1 end
        end)
        return extra == 0
      end, 2000)
      assert.has_error(function() c:start(nil, function() end) end)
    end)
  end)

  it("stops from inside on_event without delivering the rest of the answer", function()
    with_server({}, function(t)
      for i = 1, 5 do t.manager:publish("news", i) end
      local c = assert(client.new { subscribe_url = urls(t.port), category = "news" })
      local seen = {}
      c:start(0, function(e)
        seen[#seen + 1] = e.data
        if e.data == 2 then c:stop() end
      end)
      wait_until("the stop", function() return not c:is_running() end)
      async.sleep(100)
      assert.same({ 1, 2 }, seen)
      local since, last_id = c:cursor()
      assert.equals("integer", math.type(since))
      assert.equals("string", type(last_id))
    end)
  end)

  it("retries after failures, and on_failure returning false stops it", function()
    async.run(function()
      -- a port with nothing listening
      local probe = uv.new_tcp()
      probe:bind("127.0.0.1", 0)
      local port = probe:getsockname().port
      probe:close()
      local calls = 0
      local c, _, failures, start = collecting_client(port, {
        reattempt_wait_seconds = 0.02,
        on_failure = function() calls = calls + 1 return calls < 3 end,
      })
      start(nil)
      wait_until("the stop", function() return not c:is_running() end)
      assert.equals(3, #failures)
      assert.matches("^Error connecting to http://127%.0%.0%.1:%d+/events: cannot connect", failures[1])
    end)
  end)

  it("reports API errors, and on_event errors stop the client", function()
    with_server({ max_longpoll_timeout_seconds = 5 }, function(t)
      local c, _, failures, start = collecting_client(t.port, {
        poll_timeout_seconds = 6, on_failure = function() return false end,
      })
      start(nil)
      wait_until("the stop", function() return not c:is_running() end)
      assert.same({ "Longpoll API error message: Invalid or missing 'timeout' arg.  Must be 1-5." }, failures)

      local boom = assert(client.new { subscribe_url = urls(t.port), category = "news", poll_timeout_seconds = 5 })
      local stderr = io.stderr
      io.stderr = { write = function() end } -- luacheck: ignore
      boom:start(0, function() error("boom") end)
      t.manager:publish("news", 1)
      wait_until("the stop", function() return not boom:is_running() end)
      io.stderr = stderr -- luacheck: ignore
      assert.matches("boom", boom.error)
    end)
  end)

  it("reports 'missed' when the buffer dropped events after its cursor", function()
    with_server({ max_event_buffer_size = 3 }, function(t)
      local first = t.manager:publish("news", 0)
      for i = 1, 5 do t.manager:publish("news", i) end
      local missed = {}
      local c, seen, _, start = collecting_client(t.port, { on_missed = function(e, since, last_id)
        missed[#missed + 1] = { e.data, since, last_id }
      end })
      start { since_time = first.timestamp, last_id = first.id }
      wait_until("3 events", function() return #seen == 3 end)
      c:stop()
      assert.same({ { 3, first.timestamp, first.id } }, missed)
      assert.same({ 3, 4, 5 }, { seen[1].data, seen[2].data, seen[3].data })
    end)
  end)

  it("subscribes to several categories with repeated category arguments", function()
    local requests = {}
    with_server({}, function(t)
      local c, seen, _, start = collecting_client(t.port, { category = { "a", "b c/d" } })
      start(0)
      t.manager:publish("a", 1)
      t.manager:publish("z", 2)
      t.manager:publish("b c/d", 3)
      wait_until("2 events", function() return #seen == 2 end)
      c:stop()
      assert.same({ 1, 3 }, { seen[1].data, seen[2].data })
      assert.same({ "a", "b c/d" }, requests[1]:query_all("category"))
    end, { setup = recording(requests) })
  end)

  it("publishes any JSON value, integers exactly", function()
    with_server({}, function(t)
      local c = assert(client.new { publish_url = select(2, urls(t.port)), category = "x" })
      local values = { "text ü", 42, 2.5, true, { 1, 2, 3 }, { nested = { big = math.maxinteger } } }
      for _, v in ipairs(values) do assert.same({ true }, { publish(c, "data", v) }) end
      local _, body = t.get({ { "category", "data" }, { "timeout", "1" }, { "since_time", "0" } })
      assert.equals(#values, #body.events)
      local status, _, raw = async.http(t.port, { path = "/events?category=data&timeout=1&since_time=0" })
      assert.equals(200, status)
      assert.truthy(raw:find('"big":9223372036854775807', 1, true))
      assert.same({ false, "data must not be nil" }, { publish(c, "data", nil) })
      assert.same({ false, "category must be 1-1024 bytes long" }, { publish(c, ("x"):rep(1025), 1) })
      local no_pub = assert(client.new { subscribe_url = urls(t.port), category = "x" })
      local ok, err = publish(no_pub, "x", 1)
      assert.is_false(ok)
      assert.matches("publish_url", err)
      local wrong = assert(client.new { publish_url = "http://127.0.0.1:" .. t.port .. "/nope", category = "x" })
      assert.same({ false, "HTTP response code: 404: not found" }, { publish(wrong, "x", 1) })
      c:stop()
      wrong:stop()
    end)
  end)

  it("works as an iterator in a coroutine; leaving the loop stops the client", function()
    with_server({}, function(t)
      local c = assert(client.new { subscribe_url = urls(t.port), category = "it" })
      local got, finished = {}, async.event()
      coroutine.wrap(function()
        for event in c:events(0) do
          got[#got + 1] = event.data
          if event.data == 3 then break end
        end
        finished:set()
      end)()
      for i = 1, 5 do
        t.manager:publish("it", i)
        async.sleep(10)
      end
      assert(finished:wait(3000))
      assert.same({ 1, 2, 3 }, got)
      assert.is_false(c:is_running())

      -- a coroutine that dies of an error inside the loop body stops its client
      local dying = assert(client.new { subscribe_url = urls(t.port), category = "it" })
      local stderr, written = io.stderr, {}
      io.stderr = { write = function(_, ...) written[#written + 1] = table.concat({ ... }) end } -- luacheck: ignore
      coroutine.wrap(function()
        for event in dying:events(0) do
          if event.data == 2 then error("body failed") end
        end
      end)()
      wait_until("the stop", function() return not dying:is_running() end)
      io.stderr = stderr -- luacheck: ignore
      assert.matches("body failed", table.concat(written))
    end)
  end)

  it("works as an iterator in the main thread, running the loop itself", function()
    -- no async.run here: the iterator drives uv.run, and the server runs in the same loop
    local manager = assert(longpoll.start {})
    local srv = assert(server.new { port = 0 })
    srv:route("GET", "/events", manager.subscription_handler)
    srv:route("*", "/publish", manager.publish_handler)
    local port = assert(srv:listen())
    local sub, pub = urls(port)
    local c = assert(client.new { subscribe_url = sub, publish_url = pub, category = "main" })
    assert.same({ true }, { c:publish("main", "sync publish") }) -- waits by running the loop
    local n = 0
    local timer = uv.new_timer()
    timer:start(20, 20, function()
      n = n + 1
      manager:publish("main", n)
    end)
    local got = {}
    for event in c:events(0) do
      got[#got + 1] = event.data
      if #got == 4 then break end
    end
    timer:close()
    assert.same({ "sync publish", 1, 2, 3 }, got)
    assert.is_false(c:is_running())
    manager:shutdown()
    local closed = false
    srv:close(function() closed = true end)
    -- bounded: the server's handles close within a few loop turns
    for _ = 1, 1000 do
      if closed then break end
      uv.run("once")
    end
    assert.is_true(closed)
  end)

  it("reads chunked and close-delimited answers and retries a GET on a stale connection", function()
    local http_client = require "longpoll.http.client"
    async.run(function()
      -- a raw server: answer i goes out on the connection that reads request i
      local answers = {
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\nX-T: 1\r\n\r\n",
        "HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc",
        false, -- close without answering: the client must send the request again
        "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nretry",
        "HTTP/1.0 200 OK\r\n\r\nuntil close",
      }
      local served, connections = 0, 0
      local listener = uv.new_tcp()
      listener:bind("127.0.0.1", 0)
      listener:listen(16, function()
        local sock = uv.new_tcp()
        listener:accept(sock)
        connections = connections + 1
        local buf = ""
        sock:read_start(function(err, data)
          if err or not data then return sock:close() end
          buf = buf .. data
          -- every complete request head gets the next answer
          while buf:find("\r\n\r\n", 1, true) do
            buf = buf:sub(select(2, buf:find("\r\n\r\n", 1, true)) + 1)
            served = served + 1
            local answer = answers[served]
            if not answer then return sock:close() end
            sock:write(answer)
            if served == 5 then sock:shutdown(function() sock:close() end) end
          end
        end)
      end)
      local conn = http_client.connection { host = "127.0.0.1", port = listener:getsockname().port }
      local function get()
        local done = async.event()
        conn:request({ method = "GET", target = "/x", timeout_ms = 2000 }, function(res, err) done:set(res or false, err) end)
        local res, err = done:wait(3000)
        assert(res, err)
        return res
      end
      local r1 = get()
      assert.equals("hello world", r1.body)
      assert.equals("chunked", r1.headers["transfer-encoding"])
      assert.equals("abc", get().body)
      assert.equals(1, connections)
      assert.equals("retry", get().body) -- request 3 was dropped, 4 is the retry
      assert.equals(2, connections)
      assert.equals("until close", get().body)
      conn:close(true)
      listener:close()
    end)
  end)

  it("checks its options like golongpoll's NewClient", function()
    local url = "http://127.0.0.1:1/events"
    local bad_category = "option 'category' must be a string of 1 to 1024 bytes, or a list of them"
    local cases = {
      { nil, "options must be a table" },
      { { subscribe_url = url }, bad_category },
      { { subscribe_url = url, category = "" }, bad_category },
      { { subscribe_url = url, category = ("x"):rep(1025) }, bad_category },
      { { subscribe_url = url, category = {} }, "option 'category' must not be an empty list" },
      { { subscribe_url = url, category = { "a", "" } }, bad_category },
      { { category = "a" },
        "at least one of the options 'subscribe_url' and 'publish_url' must be given" },
      { { category = "a", subscribe_url = "", publish_url = "" },
        "at least one of the options 'subscribe_url' and 'publish_url' must be given" },
      { { category = "a", subscribe_url = "https://example.org/events" }, "option 'subscribe_url' only http:// URLs are supported" },
      { { category = "a", subscribe_url = "/events" }, "option 'subscribe_url' must be an absolute http:// URL" },
      { { category = "a", publish_url = "http://u:p@127.0.0.1/p" },
        "option 'publish_url' credentials in the URL are not supported (use basic_auth)" },
      { { category = "a", publish_url = "http://127.0.0.1:99999/p" }, "option 'publish_url' has an invalid port" },
      { { category = "a", subscribe_url = url, basic_auth = { "user" } }, "option 'basic_auth' needs both a user and a password, or neither" },
      { { category = "a", subscribe_url = url, basic_auth = { password = "p" } },
        "option 'basic_auth' needs both a user and a password, or neither" },
      { { category = "a", subscribe_url = url, basic_auth = "u:p" }, "option 'basic_auth' must be { user, password }" },
      { { category = "a", subscribe_url = url, poll_timeout_seconds = 0 },
        "option 'poll_timeout_seconds' must be a whole number of seconds of at least 1" },
      { { category = "a", subscribe_url = url, poll_timeout_seconds = 1.5 },
        "option 'poll_timeout_seconds' must be a whole number of seconds of at least 1" },
      { { category = "a", subscribe_url = url, reattempt_wait_seconds = -1 },
        "option 'reattempt_wait_seconds' must be a number of seconds of at least 0" },
      { { category = "a", subscribe_url = url, success_wait_seconds = "1" },
        "option 'success_wait_seconds' must be a number of seconds of at least 0" },
      { { category = "a", subscribe_url = url, headers = { ["Bad Name"] = "x" } }, 'option \'headers\': invalid header name "Bad Name"' },
      { { category = "a", subscribe_url = url, headers = { X = "a\r\nInjected: 1" } },
        "option 'headers': the value of 'X' must be a string without line breaks" },
      { { category = "a", subscribe_url = url, on_failure = true }, "option 'on_failure' must be a function" },
      { { category = "a", subscribe_url = url, on_missed = "x" }, "option 'on_missed' must be a function" },
      { { category = "a", subscribe_url = url, pollTimeoutSeconds = 5 }, "unknown option 'pollTimeoutSeconds'" },
    }
    for _, case in ipairs(cases) do
      local c, err = client.new(case[1])
      assert.is_nil(c)
      assert.equals(case[2], err)
    end
    -- defaults, and the forms that are accepted
    local c = assert(client.new { subscribe_url = "http://localhost:8101/events?x=1", category = "a",
      basic_auth = { "", "" }, headers = { { "X-A", "1" }, { "X-A", "2" } } })
    assert.equals(45, c.options.poll_timeout_seconds)
    assert.equals(30, c.options.reattempt_wait_seconds)
    assert.equals(0, c.options.success_wait_seconds)
    assert.is_nil(c.options.authorization)
    assert.matches("^/events%?x=1&category=a&timeout=45$", c:subscribe_target())
    assert.is_truthy(longpoll.client.new { publish_url = "http://[::1]:8101/publish", category = "a" })
    assert.has_error(function() c:start(nil, nil) end)
    assert.has_error(function() c:start(-5, function() end) end)
  end)
end)
