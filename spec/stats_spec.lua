-- The stats endpoint (manager.stats_handler): JSON and Prometheus over HTTP; and the standalone
-- server (bin/longpoll serve) with its /sse and /stats mounts and its new flags.
local uv = require "luv"
local async = require "support.async"
local fixture = require "support.fixture"
local stats = require "longpoll.stats"
local cli = require "longpoll.cli"
local cjson = require "cjson"

local with_server = fixture.with_server

local function wait_until(cond, timeout_ms) return async.wait_for(cond, timeout_ms or 3000) end

local function get_stats(port, path, headers)
  local status, h, body = async.http(port, { path = path or "/stats", headers = headers })
  return status, h, body
end

local function json_stats(port, path)
  local status, h, body = get_stats(port, path)
  assert.equals(200, status)
  assert.equals("application/json", h["content-type"])
  return cjson.decode(body), h
end

-- Parses the exposition format: { samples = { ["name{labels}"] = number }, help = {}, type = {} }.
local function parse_prometheus(text)
  local out = { samples = {}, help = {}, type = {}, order = {} }
  for line in text:gmatch("([^\n]*)\n") do
    local name, help = line:match("^# HELP (%S+) (.+)$")
    if name then
      out.help[name] = help
    else
      local tname, kind = line:match("^# TYPE (%S+) (%S+)$")
      if tname then
        out.type[tname] = kind
        out.order[#out.order + 1] = tname
      else
        local key, value = line:match("^(.-) (%S+)$")
        assert(key, "bad sample line: " .. line)
        out.samples[key] = tonumber(value)
      end
    end
  end
  return out
end

-- A raw SSE stream request; returns the connection once the response head arrived.
local function open_sse(port, categories)
  local conn = async.connect(port)
  local q = {}
  for _, c in ipairs(categories) do q[#q + 1] = { "category", c } end
  conn:send("GET " .. fixture.url("/sse", q) .. " HTTP/1.1\r\nHost: x\r\n\r\n")
  local deadline = uv.now() + 3000
  while not conn.buf:find("\r\n\r\n", 1, true) do assert(conn:wait_data(deadline - uv.now())) end
  return conn
end

describe("stats handler", function()
  it("answers JSON with the manager's figures, no caching, and Vary: Accept", function()
    with_server({ max_event_buffer_size = 2 }, function(t)
      for i = 1, 3 do t.manager:publish("a", i) end
      t.manager:publish("b", "x")
      local poll = async.spawn(function() t.get({ { "category", "w" }, { "timeout", "10" } }) end)
      local stream = open_sse(t.port, { "s1", "s2" })
      assert.truthy(wait_until(function() return t.manager:stats().waiting == 2 end))
      local s, h = json_stats(t.port)
      assert.equals("no-cache, no-store, must-revalidate", h["cache-control"])
      assert.equals("Accept", h["vary"])
      assert.equals(5, s.categories) -- a and b with events; w, s1 and s2 with waiting subscribers
      assert.equals(3, s.events)
      assert.truthy(s.event_bytes > 0)
      assert.equals(2, s.waiting)
      assert.equals(1, s.long_polls)
      assert.equals(1, s.sse_streams)
      assert.equals(4, s.published)
      assert.equals(1, s.dropped)
      assert.equals(0, s.delivered)
      assert.equals(t.manager:stats().last_timestamp, s.last_timestamp)
      assert.truthy(s.uptime_seconds >= 0 and s.uptime_seconds < 60)
      assert.is_nil(s.by_category)
      t.manager:publish("w", "done")
      async.wait_all({ poll })
      stream:close()
    end)
  end)

  it("gives per-category details with ?categories=1 when stats_categories is on", function()
    with_server({ stats_categories = true }, function(t)
      local odd = 'quote " back \\ line\nbreak é'
      t.manager:publish("a", 1)
      t.manager:publish("a", 2)
      t.manager:publish(odd, true)
      local s = json_stats(t.port, "/stats?categories=1")
      assert.same({ "a", odd }, (function()
        local names = {}
        for name in pairs(s.by_category) do names[#names + 1] = name end
        table.sort(names)
        return names
      end)())
      assert.equals(2, s.by_category.a.events)
      assert.equals(0, s.by_category.a.waiting)
      assert.equals(1, s.by_category[odd].events)
      local full = t.manager:stats(true).by_category
      assert.equals(full.a.bytes, s.by_category.a.bytes)
      assert.is_nil(json_stats(t.port, "/stats?categories=0").by_category)
    end)
  end)

  it("never lists category names unless stats_categories is on (names can be secrets)", function()
    with_server({}, function(t)
      t.manager:publish("secret-room-4f1c", 1)
      for _, path in ipairs { "/stats?categories=1", "/stats?format=prometheus&categories=1" } do
        local status, _, body = get_stats(t.port, path)
        assert.equals(403, status)
        assert.matches("stats_categories", cjson.decode(body).error)
        assert.is_nil(body:find("secret-room", 1, true))
      end
      local _, _, plain = get_stats(t.port, "/stats")
      assert.is_nil(plain:find("secret-room", 1, true))
    end)
  end)

  it("lists categories a bounded page at a time, largest first", function()
    with_server({ stats_categories = true }, function(t)
      for i = 1, 250 do t.manager:publish(("c%03d"):format(i), ("x"):rep(i)) end
      local s = json_stats(t.port, "/stats?categories=1")
      assert.equals(250, s.categories)
      local n = 0
      for _ in pairs(s.by_category) do n = n + 1 end
      assert.equals(100, n) -- the default page
      assert.equals(100, s.categories_limit)
      assert.equals(0, s.categories_offset)
      assert.truthy(s.by_category.c250 and s.by_category.c151 and not s.by_category.c150)
      -- the JSON keeps the ranking: the largest first
      local _, _, body = get_stats(t.port, "/stats?categories=1&limit=3&offset=10")
      local first = body:find('"c240"', 1, true)
      assert.truthy(first and first < body:find('"c239"', 1, true) and body:find('"c239"', 1, true) < body:find('"c238"', 1, true))
      assert.is_nil(body:find('"c241"', 1, true))
      assert.is_nil(body:find('"c237"', 1, true))
      local last = json_stats(t.port, "/stats?categories=1&limit=1000&offset=200")
      n = 0
      for _ in pairs(last.by_category) do n = n + 1 end
      assert.equals(50, n)
      for _, bad in ipairs { "limit=0", "limit=1001", "limit=x", "offset=-1" } do
        local status, _, b = get_stats(t.port, "/stats?categories=1&" .. bad)
        assert.equals(400, status, bad)
        assert.matches("Invalid", cjson.decode(b).error)
      end
    end)
  end)

  it("answers ?categories=1 over 20,000 categories with one page, not all of them", function()
    with_server({ stats_categories = true }, function(t)
      for i = 1, 20000 do t.manager:publish("k" .. i, i) end
      uv.update_time() -- the loop's clock stood still while this ran: timers count from now
      local status, _, body = get_stats(t.port, "/stats?categories=1&limit=1000")
      assert.equals(200, status)
      assert.is_true(#body < 100000, "the answer holds one page (" .. #body .. " bytes)")
      local s = cjson.decode(body)
      assert.equals(20000, s.categories)
    end)
  end)

  it("counts each event handed out once per subscriber, long poll or SSE", function()
    with_server({}, function(t)
      local stream = open_sse(t.port, { "d" })
      t.manager:publish("d", 1)
      t.manager:publish("d", 2)
      t.get({ { "category", "d" }, { "timeout", "1" }, { "since_time", "0" } })
      local s = json_stats(t.port)
      assert.equals(2 + 2, s.delivered)
      stream:close()
    end)
  end)

  it("answers the Prometheus text format for Accept: text/plain or ?format=prometheus", function()
    with_server({ max_event_buffer_size = 1, stats_categories = true }, function(t)
      local odd = 'q"uo\\te\nnl'
      t.manager:publish("a", 1)
      t.manager:publish("a", 2)
      t.manager:publish(odd, 3)
      local scraper = "application/openmetrics-text;version=1.0.0;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
      for _, req in ipairs {
        { "/stats", { Accept = "text/plain" } },
        { "/stats?format=prometheus", nil },
        { "/stats", { Accept = scraper } },
      } do
        local status, h, body = get_stats(t.port, req[1], req[2])
        assert.equals(200, status)
        assert.equals(stats.PROMETHEUS_TYPE, h["content-type"])
        local p = parse_prometheus(body)
        for _, name in ipairs { "longpoll_categories", "longpoll_buffered_events", "longpoll_buffered_bytes",
          "longpoll_waiting_subscribers", "longpoll_long_polls", "longpoll_sse_streams", "longpoll_uptime_seconds",
          "longpoll_last_event_timestamp_milliseconds" } do
          assert.equals("gauge", p.type[name], name)
          assert.truthy(p.help[name], name)
          assert.truthy(p.samples[name], name)
        end
        for _, name in ipairs { "longpoll_published_events_total", "longpoll_delivered_events_total",
          "longpoll_dropped_events_total" } do
          assert.equals("counter", p.type[name], name)
        end
        for name in pairs(p.type) do assert.matches("^longpoll_", name) end
        assert.equals(3, p.samples.longpoll_published_events_total)
        assert.equals(1, p.samples.longpoll_dropped_events_total)
        assert.equals(2, p.samples.longpoll_buffered_events)
      end
      local _, _, body = get_stats(t.port, "/stats?format=prometheus&categories=1")
      local p = parse_prometheus(body)
      assert.equals(1, p.samples['longpoll_category_buffered_events{category="a"}'])
      assert.equals(1, p.samples['longpoll_category_buffered_events{category="q\\"uo\\\\te\\nnl"}'])
      assert.equals("gauge", p.type.longpoll_category_waiting_subscribers)
      assert.truthy(p.samples['longpoll_category_buffered_bytes{category="a"}'] > 0)
      -- JSON stays the default for an Accept that names JSON; browsers get the dashboard (issue 17),
      -- which polls the JSON (spec/dashboard_spec.lua)
      local _, jh = get_stats(t.port, "/stats", { Accept = "application/json, text/plain" })
      assert.equals("application/json", jh["content-type"])
      local _, hh = get_stats(t.port, "/stats", { Accept = "text/html,application/xhtml+xml,*/*;q=0.8" })
      assert.equals("text/html; charset=utf-8", hh["content-type"])
      local _, h = get_stats(t.port, "/stats?format=json", { Accept = "text/plain" })
      assert.equals("application/json", h["content-type"])
    end)
  end)

  it("escapes label values", function()
    local odd = 'a"b\\c\nd'
    local text = stats.prometheus { uptime_seconds = 0, categories_offset = 0, categories_limit = 2,
      by_category_order = { odd, "plain ✓" },
      by_category = { [odd] = { events = 1, bytes = 2, waiting = 3 }, ["plain ✓"] = { events = 0, bytes = 0, waiting = 0 } } }
    assert.truthy(text:find('longpoll_category_buffered_events{category="a\\"b\\\\c\\nd"} 1\n', 1, true), text)
    assert.truthy(text:find('longpoll_category_waiting_subscribers{category="plain ✓"} 0\n', 1, true), text)
  end)

  it("refuses an unknown format, answers HEAD, and says 503 after shutdown", function()
    with_server({}, function(t)
      local status, _, body = get_stats(t.port, "/stats?format=xml")
      assert.equals(400, status)
      assert.same({ error = "Invalid 'format' arg: must be json or prometheus." }, cjson.decode(body))
      local hs, hh, hb = async.http(t.port, { method = "HEAD", path = "/stats" })
      assert.equals(200, hs)
      assert.equals("application/json", hh["content-type"])
      assert.equals("", hb)
      t.manager:shutdown()
      local s2, _, b2 = get_stats(t.port)
      assert.equals(503, s2)
      assert.matches("shut down", cjson.decode(b2).error)
    end)
  end)
end)

---------------------------------------------------------------------------------------------
-- The standalone server, as a child process.

local ROOT = uv.cwd()

-- Starts `lua5.4 bin/longpoll serve --port 0 ...`; returns { port, exited (event), pid, ... }.
local function spawn_serve(args)
  local stdout, stderr = uv.new_pipe(false), uv.new_pipe(false)
  local proc = { out = "", err = "", exited = async.event(), started = async.event() }
  local argv = { ROOT .. "/bin/longpoll", "serve", "--port", "0" }
  for _, a in ipairs(args or {}) do argv[#argv + 1] = a end
  local handle, pid = uv.spawn("lua5.4", { args = argv, stdio = { nil, stdout, stderr }, cwd = ROOT },
    function(code, signal)
      proc.exited:set(code, signal)
      proc.started:set(nil)
    end)
  assert(handle, pid)
  proc.handle, proc.pid, proc.pipes = handle, pid, { stdout, stderr }
  stdout:read_start(function(_, data)
    if data then
      proc.out = proc.out .. data
      local port = proc.out:match("longpoll listening on http://127%.0%.0%.1:(%d+)/\n")
      if port then proc.started:set(tonumber(port)) end
    end
  end)
  stderr:read_start(function(_, data)
    if data then proc.err = proc.err .. data end
  end)
  proc.port = proc.started:wait(10000)
  return proc
end

-- One SIGTERM only: a second one during the graceful shutdown ends the process at once.
local function sigterm(proc)
  if not proc.killed then
    proc.killed = true
    proc.handle:kill("sigterm")
  end
end

local function stop(proc)
  if not proc.exited.is_set then sigterm(proc) end
  local code, signal = proc.exited:wait(10000)
  for _, p in ipairs(proc.pipes) do if not p:is_closing() then p:close() end end
  if not proc.handle:is_closing() then proc.handle:close() end
  return code, signal
end

describe("bin/longpoll serve", function()
  it("parses --cors as a repeatable flag and the new paths", function()
    local flags = assert(cli.parse({ "serve", "--cors", "https://a.example", "--cors=https://b.example",
      "--sse-path", "", "--stats-path=/metrics" }, 2))
    assert.same({ "https://a.example", "https://b.example" }, flags.cors)
    assert.equals("", flags["sse-path"])
    assert.equals("/metrics", flags["stats-path"])
    assert.equals("*", cli.cors_origins({ "https://a.example", "*" }))
    assert.same({ "https://a.example" }, cli.cors_origins({ "https://a.example" }))
    assert.same({ nil, "flag --cors needs a value" }, { cli.parse({ "--cors" }) })
  end)

  it("mounts /sse and /stats by default, answers CORS with --cors, and exits 0 on SIGTERM", function()
    async.run(function()
      local proc = spawn_serve({ "--cors", "https://app.example", "--cors", "https://other.example" })
      local ok, err = pcall(function()
        assert.truthy(proc.port, "no start-up line; stderr: " .. proc.err)
        local port = proc.port
        local conn = open_sse(port, { "cli" })
        assert.matches("^HTTP/1.1 200", conn.buf)
        assert.truthy(conn.buf:find("Content-Type: text/event-stream", 1, true))
        local status = async.http(port, { method = "POST", path = "/publish",
          body = '{"category":"cli","data":{"n":1}}' })
        assert.equals(200, status)
        local deadline = uv.now() + 3000
        while not conn.buf:find('"data":{"n":1}', 1, true) and uv.now() < deadline do conn:wait_data(100) end
        assert.truthy(conn.buf:find('"data":{"n":1}', 1, true))
        local s = json_stats(port)
        assert.equals(1, s.published)
        assert.equals(1, s.sse_streams)
        local ps, ph = get_stats(port, "/stats", { Accept = "text/plain" })
        assert.equals(200, ps)
        assert.equals(stats.PROMETHEUS_TYPE, ph["content-type"])
        for _, path in ipairs { "/events", "/publish", "/sse", "/stats" } do
          local cs, ch = async.http(port, { method = "OPTIONS", path = path, headers = {
            Origin = "https://other.example", ["Access-Control-Request-Method"] = "GET" } })
          assert.equals(204, cs, path)
          assert.equals("https://other.example", ch["access-control-allow-origin"], path)
        end
        local _, gh = async.http(port, { path = "/stats", headers = { Origin = "https://app.example" } })
        assert.equals("https://app.example", gh["access-control-allow-origin"])
        local _, nh = async.http(port, { path = "/stats", headers = { Origin = "https://evil.example" } })
        assert.is_nil(nh["access-control-allow-origin"])
        -- shutdown ends the open stream cleanly (the terminating chunk)
        sigterm(proc)
        deadline = uv.now() + 5000
        while not conn.buf:find("\r\n0\r\n\r\n", 1, true) and uv.now() < deadline do conn:wait_data(100) end
        assert.truthy(conn.buf:find("\r\n0\r\n\r\n", 1, true))
        conn:close()
      end)
      local code, signal = stop(proc)
      if not ok then error(err, 0) end
      assert.equals(0, code)
      assert.equals(0, signal)
    end, 30000)
  end)

  it("turns /sse and /stats off with empty paths and mounts them elsewhere", function()
    async.run(function()
      local proc = spawn_serve({ "--sse-path", "", "--stats-path", "/metrics" })
      local ok, err = pcall(function()
        assert.truthy(proc.port, "no start-up line; stderr: " .. proc.err)
        assert.equals(404, (async.http(proc.port, { path = "/sse?category=a" })))
        assert.equals(404, (async.http(proc.port, { path = "/stats" })))
        assert.equals(200, (async.http(proc.port, { path = "/metrics" })))
        -- no CORS unless asked
        local _, h = async.http(proc.port, { path = "/metrics", headers = { Origin = "https://a.example" } })
        assert.is_nil(h["access-control-allow-origin"])
        assert.equals(405, (async.http(proc.port, { method = "OPTIONS", path = "/events" })))
      end)
      local code = stop(proc)
      if not ok then error(err, 0) end
      assert.equals(0, code)
    end, 30000)
  end)

  it("refuses a bad --cors origin with the option's message", function()
    async.run(function()
      local proc = spawn_serve({ "--cors", "https://a.example/" })
      local code = stop(proc)
      assert.is_nil(proc.port)
      assert.equals(2, code)
      assert.matches("option 'cors' field 'origins' entry 1 %(\"https://a.example/\"%) is not an origin", proc.err)
    end, 30000)
  end)
end)
