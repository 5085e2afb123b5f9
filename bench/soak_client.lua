#!/usr/bin/env lua5.4
-- Soak driver: starts `bin/longpoll serve` (optionally under a wrapper such as valgrind), drives
-- it with publishers at a fixed rate and churning subscribers, proves that the well-behaved
-- subscribers saw every event once and in order, and samples the server's RSS and open fds.
-- Used by scripts/soak and scripts/valgrind-server; docs/robustness.md has the figures.
--
--   lua5.4 bench/soak_client.lua [--seconds N | --minutes N] [--rate EVENTS_PER_S] [--sample S]
--     [--warmup S] [--subscribers N] [--churn N] [--max-growth PCT] [--wrap "CMD ARGS"]
--     [--start-timeout S] [--server-env NAME=VALUE]... [--no-rss-check]
-- Exit status: 0 when nothing was lost, repeated or leaked; 1 otherwise; 2 on bad usage.
package.path = "./lua/?.lua;./lua/?/init.lua;./spec/?.lua;" .. package.path
package.cpath = "./build/?.so;" .. package.cpath

local uv = require "luv"
local cjson = require "cjson"
local async = require "support.async"

local format, concat = string.format, table.concat

---------------------------------------------------------------------------------------------
-- Options

local o = {
  seconds = 600, rate = 300, sample = 10, warmup = nil, subscribers = 6, churn = 32,
  max_growth = 10, wrap = nil, start_timeout = 10, server_env = {}, rss_check = true,
}
do
  local i = 1
  local function value()
    i = i + 1
    if arg[i] == nil then
      io.stderr:write("soak: ", arg[i - 1], " needs a value\n")
      os.exit(2)
    end
    return arg[i]
  end
  while i <= #arg do
    local a = arg[i]
    if a == "--seconds" then o.seconds = tonumber(value())
    elseif a == "--minutes" then o.seconds = tonumber(value()) * 60
    elseif a == "--rate" then o.rate = tonumber(value())
    elseif a == "--sample" then o.sample = tonumber(value())
    elseif a == "--warmup" then o.warmup = tonumber(value())
    elseif a == "--subscribers" then o.subscribers = math.tointeger(tonumber(value()))
    elseif a == "--churn" then o.churn = math.tointeger(tonumber(value()))
    elseif a == "--max-growth" then o.max_growth = tonumber(value())
    elseif a == "--wrap" then o.wrap = value()
    elseif a == "--start-timeout" then o.start_timeout = tonumber(value())
    elseif a == "--server-env" then o.server_env[#o.server_env + 1] = value()
    elseif a == "--no-rss-check" then o.rss_check = false
    else
      io.stderr:write("soak: unknown argument '", a, "'\n")
      os.exit(2)
    end
    i = i + 1
  end
  if not (o.seconds and o.seconds > 0 and o.rate and o.rate > 0 and o.sample and o.sample > 0
    and o.subscribers and o.subscribers >= 1 and o.churn and o.churn >= 0) then
    io.stderr:write("soak: bad arguments\n")
    os.exit(2)
  end
  -- warm-up: a minute on a long run, a tenth of a short one (at least one sample)
  o.warmup = o.warmup or math.max(o.sample, math.min(60, o.seconds / 10))
end

local BUSY = { "soak-1", "soak-2", "soak-3", "soak-4", "soak-5", "soak-6" } -- share the rate
local SLOW = { "soak-7", "soak-8" } -- one event every 2 s, alternating: subscribers time out
local PUBLISHERS = 3 -- each owns two busy categories, so per-category order is publish order
local SLOW_PERIOD_MS = 2000

local function log(fmt, ...)
  io.stdout:write(format(fmt, ...), "\n")
  io.stdout:flush()
end

---------------------------------------------------------------------------------------------
-- The server process

local server = { out = "", err = "" }

local function split_words(s)
  local words = {}
  for w in s:gmatch("%S+") do words[#words + 1] = w end
  return words
end

local function start_server()
  local argv = o.wrap and split_words(o.wrap) or {}
  for _, a in ipairs { "lua5.4", "bin/longpoll", "serve", "--port", "0", "--buffer-size", "250", "--max-timeout", "60" } do
    argv[#argv + 1] = a
  end
  local cmd = table.remove(argv, 1)
  local env = { "PATH=" .. (os.getenv("PATH") or "/usr/bin:/bin") }
  for _, e in ipairs(o.server_env) do env[#env + 1] = e end
  local stdout, stderr = uv.new_pipe(false), uv.new_pipe(false)
  server.exited = async.event()
  local started = async.event()
  local handle, pid = uv.spawn(cmd, { args = argv, stdio = { nil, stdout, stderr }, env = env },
    function(code, signal)
      server.code, server.signal = code, signal
      server.exited:set(code, signal)
    end)
  if not handle then error("cannot start " .. cmd .. ": " .. tostring(pid)) end
  server.handle, server.pid = handle, pid
  stdout:read_start(function(_, data)
    if data then
      server.out = server.out .. data
      local port = server.out:match("listening on http://[^\n]-:(%d+)/")
      if port and not server.port then
        server.port = tonumber(port)
        started:set()
      end
    elseif not stdout:is_closing() then
      stdout:close()
    end
  end)
  stderr:read_start(function(_, data)
    if data then
      if #server.err < 65536 then server.err = server.err .. data end
    elseif not stderr:is_closing() then
      stderr:close()
    end
  end)
  server.pipes = { stdout, stderr }
  if not started:wait(o.start_timeout * 1000) then
    handle:kill("sigkill")
    error("server did not start within " .. o.start_timeout .. " s: " .. server.err)
  end
end

local function stop_server(timeout_ms)
  if server.code == nil then server.handle:kill("sigterm") end
  local code, signal = server.exited:wait(timeout_ms)
  if code == nil then
    server.handle:kill("sigkill")
    code, signal = server.exited:wait(5000)
    server.killed = true
  end
  async.wait_for(function() return server.pipes[1]:is_closing() and server.pipes[2]:is_closing() end, 2000)
  for _, p in ipairs(server.pipes) do if not p:is_closing() then p:close() end end
  if not server.handle:is_closing() then server.handle:close() end
  return code, signal
end

local function proc_rss_kb()
  local f = io.open("/proc/" .. server.pid .. "/status")
  if not f then return nil end
  local kb = tonumber(f:read("a"):match("VmRSS:%s*(%d+)"))
  f:close()
  return kb
end

local function proc_fds()
  local p = io.popen("ls /proc/" .. server.pid .. "/fd 2>/dev/null | wc -l")
  local n = p and tonumber(p:read("a"))
  if p then p:close() end
  return n
end

local function proc_cpu_s()
  local f = io.open("/proc/" .. server.pid .. "/stat")
  if not f then return nil end
  local stat = f:read("a")
  f:close()
  -- fields after the command name (which may hold spaces): utime is the 12th, stime the 13th
  local rest = stat:match("%) (.*)$")
  local fields = split_words(rest or "")
  local ticks = (tonumber(fields[12]) or 0) + (tonumber(fields[13]) or 0)
  return ticks / 100
end

---------------------------------------------------------------------------------------------
-- HTTP over keep-alive connections (spec/support/async.lua does the socket work)

local counts = {
  published = 0, publish_errors = 0, polls = 0, delivered = 0, lost = 0, dup = 0, missed = 0, timeouts = 0,
  sub_errors = 0, disconnects = 0, short_polls = 0, catchups = 0, catchup_bad = 0, churn_errors = 0,
  reconnects = 0,
}
local errors_seen = {} -- first few error messages, for the report

local function note_error(what, err)
  if #errors_seen < 10 then errors_seen[#errors_seen + 1] = what .. ": " .. tostring(err) end
end

local Client = {}
Client.__index = Client

local function new_client()
  return setmetatable({}, Client)
end

function Client:close()
  if self.conn then
    self.conn:close()
    self.conn = nil
  end
end

-- One request on the kept connection (reconnecting first when needed).
-- Returns status, body or nil, message.
function Client:request(method, path, body, timeout_ms)
  if not self.conn or self.conn.eof then
    self:close()
    local ok, conn = pcall(async.connect, server.port)
    if not ok then return nil, conn end
    self.conn = conn
    counts.reconnects = counts.reconnects + 1
  end
  local req = method .. " " .. path .. " HTTP/1.1\r\nHost: 127.0.0.1\r\n"
  if body then
    req = req .. "Content-Type: application/json\r\nContent-Length: " .. #body .. "\r\n\r\n" .. body
  else
    req = req .. "\r\n"
  end
  local sent, serr = self.conn:send(req)
  if not sent then
    self:close()
    return nil, "send: " .. tostring(serr)
  end
  local status, headers, rbody = self.conn:read_response { timeout_ms = timeout_ms or 10000 }
  if not status then
    self:close()
    return nil, headers
  end
  if headers.connection == "close" then self:close() end
  return status, rbody
end

---------------------------------------------------------------------------------------------
-- Actors

local running = true -- subscribers and churn
local publishing = true
local final_seq = {} -- category -> last sequence number published (and acknowledged)
local checked = {} -- well-behaved subscribers

local function query(categories)
  local parts = {}
  for _, c in ipairs(categories) do parts[#parts + 1] = "category=" .. c end
  return concat(parts, "&")
end

-- A well-behaved subscriber: continues with the cursor of the last event it received
-- (style "cursor"), or, like golongpoll's Go client, with the timeout answer's timestamp.
local function subscriber(categories, style, timeout_s)
  local me = { categories = categories, seen = {}, style = style }
  for _, c in ipairs(categories) do me.seen[c] = 0 end
  checked[#checked + 1] = me
  local client = new_client()
  local since, last_id = 0, nil
  local q = query(categories)
  while running do
    local path = "/events?" .. q .. "&timeout=" .. timeout_s .. "&since_time=" .. format("%d", since)
      .. (last_id and ("&last_id=" .. last_id) or "")
    local status, body = client:request("GET", path, nil, (timeout_s + 10) * 1000)
    if not running then break end
    counts.polls = counts.polls + 1
    local ok, answer = pcall(cjson.decode, status == 200 and body or "")
    if not ok or type(answer) ~= "table" then
      counts.sub_errors = counts.sub_errors + 1
      note_error("subscriber", status and (status .. " " .. tostring(body)) or body)
      async.sleep(100)
    elseif answer.events then
      if answer.missed then counts.missed = counts.missed + 1 end
      for _, e in ipairs(answer.events) do
        local n = math.tointeger(e.data.n)
        local last = me.seen[e.category]
        if last == nil or n == nil then
          counts.sub_errors = counts.sub_errors + 1
          note_error("subscriber", "unexpected event " .. cjson.encode(e))
        elseif n <= last then
          counts.dup = counts.dup + 1
        else
          counts.lost = counts.lost + (n - last - 1)
          me.seen[e.category] = n
          counts.delivered = counts.delivered + 1
        end
        since, last_id = math.tointeger(e.timestamp), e.id
      end
    elseif answer.timeout then
      counts.timeouts = counts.timeouts + 1
      if style == "go" then since, last_id = math.tointeger(answer.timestamp), nil end
    else
      counts.sub_errors = counts.sub_errors + 1
      note_error("subscriber", body)
      async.sleep(100)
    end
  end
  client:close()
end

-- Publishes its categories round-robin at a fixed rate (catching up after a slow answer).
local function publisher(categories, rate, period_ms)
  local client = new_client()
  local started, sent, next_cat = uv.now(), 0, 1
  while publishing do
    local due = period_ms and math.floor((uv.now() - started) / period_ms) + 1
      or math.floor((uv.now() - started) * rate / 1000)
    if sent >= due then
      async.sleep(period_ms and 50 or 5)
    else
      local c = categories[next_cat]
      next_cat = next_cat % #categories + 1
      local n = (final_seq[c] or 0) + 1
      local status, body = client:request("POST", "/publish", format('{"category":"%s","data":{"n":%d}}', c, n))
      sent = sent + 1
      if status == 200 then
        final_seq[c] = n
        counts.published = counts.published + 1
      else
        counts.publish_errors = counts.publish_errors + 1
        note_error("publish", status and (status .. " " .. tostring(body)) or body)
        async.sleep(100)
      end
      if sent % 500 == 0 then client:close() end -- connection churn
    end
  end
  client:close()
end

-- Churn: subscribes on a fresh connection and leaves mid-wait (sometimes after a half request,
-- sometimes with an answer it never reads).
local function disconnector(k)
  local rnd = k * 7919
  local function random(n)
    rnd = (rnd * 1103515245 + 12345) % 2147483648
    return rnd % n
  end
  while running do
    local ok, conn = pcall(async.connect, server.port)
    if ok then
      local kind = random(10)
      local req
      if kind == 0 then
        req = "GET /events?category=soak-7&timeout=30 HTTP/1.1\r\nHo" -- cut mid-head
      elseif kind == 1 then
        req = "GET /events?category=" .. BUSY[random(#BUSY) + 1] .. "&timeout=1&since_time=0 HTTP/1.1\r\n\r\n" -- unread
      else
        req = "GET /events?category=" .. (kind < 6 and SLOW[random(2) + 1] or ("quiet-" .. random(50)))
          .. "&timeout=30 HTTP/1.1\r\n\r\n"
      end
      conn:send(req)
      async.sleep(10 + random(400))
      conn:close()
      counts.disconnects = counts.disconnects + 1
    else
      counts.churn_errors = counts.churn_errors + 1
      note_error("disconnector", conn)
      async.sleep(200)
    end
  end
end

-- Churn: one-second polls on categories nobody publishes to; every tenth on a new connection.
local function short_poller(k)
  local client = new_client()
  local polls = 0
  while running do
    local status, body = client:request("GET", "/events?category=quiet-" .. k .. "&timeout=1", nil, 11000)
    if not running then break end
    polls = polls + 1
    if status == 200 and body:find('"timeout"', 1, true) then
      counts.short_polls = counts.short_polls + 1
    else
      counts.churn_errors = counts.churn_errors + 1
      note_error("short poll", status and (status .. " " .. tostring(body)) or body)
      async.sleep(100)
    end
    if polls % 10 == 0 then client:close() end
  end
  client:close()
end

-- Churn: reads a whole buffer (up to 250 events) on a fresh connection every second and checks
-- that it is contiguous and in order.
local function catchup_reader(k)
  while running do
    local client = new_client()
    local c = BUSY[k % #BUSY + 1]
    local status, body = client:request("GET", "/events?category=" .. c .. "&timeout=1&since_time=0", nil, 11000)
    client:close()
    if not running then break end
    local ok, answer = pcall(cjson.decode, status == 200 and body or "")
    if ok and type(answer) == "table" and (answer.events or answer.timeout) then
      counts.catchups = counts.catchups + 1
      local prev
      for _, e in ipairs(answer.events or {}) do
        local n = math.tointeger(e.data.n)
        if prev and n ~= prev + 1 then counts.catchup_bad = counts.catchup_bad + 1 end
        prev = n
      end
    else
      counts.churn_errors = counts.churn_errors + 1
      note_error("catch-up", status and (status .. " " .. tostring(body)) or body)
    end
    async.sleep(1000)
  end
end

---------------------------------------------------------------------------------------------
-- Sampling

local samples = {}

local function stats()
  local ok, status, _, body = pcall(async.http, server.port, { path = "/stats", timeout_ms = 10000 })
  if ok and status == 200 then
    local dok, s = pcall(cjson.decode, body)
    if dok then return s end
  end
  return nil
end

local function int(v)
  return tostring(math.tointeger(v) or v)
end

local function sample(t0, label)
  -- /proc first: the /stats request's own connection is not counted
  local row = { t = (uv.now() - t0) / 1000, rss = proc_rss_kb(), fds = proc_fds(), cpu = proc_cpu_s() }
  local s = stats() or {}
  row.waiting, row.published, row.events = s.waiting, s.published, s.events
  samples[#samples + 1] = row
  log("[%5.0fs]%s rss %6.1f MB  fds %4s  cpu %6.1fs  waiting %4s  buffered %5s  published %7d  delivered %8d"
    .. "  lost %d  dup %d  missed %d  timeouts %d  disconnects %d  errors %d",
    row.t, label or "", (row.rss or 0) / 1024, tostring(row.fds), row.cpu or 0, int(s.waiting),
    int(s.events), counts.published, counts.delivered, counts.lost, counts.dup, counts.missed, counts.timeouts,
    counts.disconnects, counts.sub_errors + counts.publish_errors + counts.churn_errors)
  return row
end

local function mean(list, key)
  local sum = 0
  for _, r in ipairs(list) do sum = sum + (r[key] or 0) end
  return #list > 0 and sum / #list or 0
end

-- least-squares slope of key over t, per minute
local function slope_per_min(list, key)
  local n = #list
  if n < 2 then return 0 end
  local mt, mv = mean(list, "t"), mean(list, key)
  local num, den = 0, 0
  for _, r in ipairs(list) do
    num = num + (r.t - mt) * ((r[key] or 0) - mv)
    den = den + (r.t - mt) ^ 2
  end
  return den > 0 and num / den * 60 or 0
end

---------------------------------------------------------------------------------------------
-- Main

local result = 1

local function main()
  start_server()
  log("soak: server pid %d on 127.0.0.1:%d%s; %d s, %d events/s over %d busy categories, 2 slow ones",
    server.pid, server.port, o.wrap and (" under `" .. o.wrap .. "`") or "", o.seconds, o.rate, #BUSY)
  async.sleep(200)
  local t0 = uv.now()
  local base = sample(t0, " base")
  local tasks = {}
  local function spawn(fn, ...)
    local args = table.pack(...)
    tasks[#tasks + 1] = async.spawn(function() fn(table.unpack(args, 1, args.n)) end)
  end
  -- well-behaved subscribers: o.subscribers per category, half of each style, timeouts 1-5 s
  local timeouts = { 1, 2, 5 }
  local all = {}
  for _, c in ipairs(BUSY) do all[#all + 1] = c end
  for _, c in ipairs(SLOW) do all[#all + 1] = c end
  local n = 0
  for _, c in ipairs(all) do
    for k = 1, o.subscribers do
      n = n + 1
      spawn(subscriber, { c }, k % 2 == 0 and "go" or "cursor", timeouts[n % #timeouts + 1])
    end
  end
  -- and a few on several categories at once (an extension; one cursor across them)
  spawn(subscriber, { "soak-1", "soak-7" }, "cursor", 2)
  spawn(subscriber, { "soak-7", "soak-8" }, "cursor", 1)
  spawn(subscriber, { "soak-2", "soak-3", "soak-8" }, "go", 5)
  for k = 1, o.churn do spawn(disconnector, k) end
  for k = 1, math.max(1, o.churn // 2) do spawn(short_poller, k) end
  for k = 1, math.max(1, o.churn // 4) do spawn(catchup_reader, k) end
  async.sleep(500) -- every subscriber is waiting with since_time=0 before the first event
  local pubs = {}
  for p = 1, PUBLISHERS do
    local mine = {}
    for i = p, #BUSY, PUBLISHERS do mine[#mine + 1] = BUSY[i] end
    pubs[#pubs + 1] = async.spawn(function() publisher(mine, o.rate / PUBLISHERS) end)
  end
  pubs[#pubs + 1] = async.spawn(function() publisher(SLOW, nil, SLOW_PERIOD_MS) end)

  local warm -- samples after warm-up
  local load_end = t0 + o.seconds * 1000
  local next_sample = t0 + o.sample * 1000
  while uv.now() < load_end do
    async.sleep(math.max(1, math.min(next_sample, load_end) - uv.now()))
    if uv.now() >= next_sample then
      local row = sample(t0)
      next_sample = next_sample + o.sample * 1000
      if row.t >= o.warmup then
        warm = warm or {}
        warm[#warm + 1] = row
      end
      if server.code ~= nil then
        log("soak: the server exited (%s, signal %s)", tostring(server.code), tostring(server.signal))
        break
      end
    end
  end
  local under_load = sample(t0, " end ")

  -- Stop publishing, let the well-behaved subscribers catch up, then stop everyone.
  publishing = false
  async.wait_for(function()
    for _, p in ipairs(pubs) do if not p.done then return false end end
    return true
  end, 15000)
  local caught_up = async.wait_for(function()
    for _, me in ipairs(checked) do
      for c, seen in pairs(me.seen) do
        if seen < (final_seq[c] or 0) then return false end
      end
    end
    return true
  end, 15000)
  local expected, unseen = 0, 0
  for _, me in ipairs(checked) do
    for c, seen in pairs(me.seen) do
      expected = expected + (final_seq[c] or 0)
      unseen = unseen + math.max(0, (final_seq[c] or 0) - seen)
    end
  end
  running = false
  async.wait_for(function()
    for _, t in ipairs(tasks) do if not t.done then return false end end
    return true
  end, 20000)
  local drained = async.wait_for(function()
    local fds = proc_fds()
    return fds ~= nil and base.fds ~= nil and fds <= base.fds
  end, 10000)
  local s_after = stats() or {}
  local after = sample(t0, " idle ")
  local code, signal = stop_server(o.wrap and 60000 or 10000)

  -- Report
  local failures = {}
  local function check(ok, what)
    if not ok then failures[#failures + 1] = what end
  end
  local warm_head, warm_tail = {}, {}
  if warm then
    for i = 1, math.min(3, #warm) do warm_head[#warm_head + 1] = warm[i] end
    for i = math.max(1, #warm - 2), #warm do warm_tail[#warm_tail + 1] = warm[i] end
  end
  local rss_warm, rss_end = mean(warm_head, "rss"), mean(warm_tail, "rss")
  local growth = rss_warm > 0 and (rss_end - rss_warm) / rss_warm * 100 or 0
  local fds_max = 0
  for _, r in ipairs(samples) do fds_max = math.max(fds_max, r.fds or 0) end
  log("")
  log("soak report (%d s of load, %d events/s)", o.seconds, o.rate)
  log("  events published     %d (errors %d); per category: %s", counts.published, counts.publish_errors,
    (function()
      local parts = {}
      for _, c in ipairs(all) do parts[#parts + 1] = c:sub(6) .. "=" .. tostring(final_seq[c] or 0) end
      return concat(parts, " ")
    end)())
  log("  checked deliveries   %d of %d expected, %d subscribers, %d polls; lost %d, duplicated %d, missed-flag %d, not seen at end %d",
    counts.delivered, expected, #checked, counts.polls, counts.lost, counts.dup, counts.missed, unseen)
  log("  timeouts answered    %d (checked) + %d (short polls)", counts.timeouts, counts.short_polls)
  log("  churn                %d disconnects mid-wait, %d catch-up reads (%d out of order), %d reconnects",
    counts.disconnects, counts.catchups, counts.catchup_bad, counts.reconnects)
  log("  errors               subscribers %d, publishers %d, churn %d", counts.sub_errors, counts.publish_errors,
    counts.churn_errors)
  for _, e in ipairs(errors_seen) do log("    %s", e) end
  log("  server RSS           base %.1f MB, after warm-up %.1f MB, end of load %.1f MB (%+.1f%%), slope %+.0f kB/min, idle %.1f MB",
    (base.rss or 0) / 1024, rss_warm / 1024, rss_end / 1024, growth, warm and slope_per_min(warm, "rss") or 0,
    (after.rss or 0) / 1024)
  log("  server fds           base %s, max %d under load, end of load %s, idle %s; waiting after: %s",
    tostring(base.fds), fds_max, tostring(under_load.fds), tostring(after.fds), int(s_after.waiting))
  log("  server CPU           %.1f s over %d s", after.cpu or 0, o.seconds)
  log("  server exit          code %s, signal %s%s", tostring(code), tostring(signal), server.killed and " (killed)" or "")
  check(counts.published > 0, "nothing was published")
  check(counts.lost == 0 and unseen == 0, "events lost")
  check(counts.dup == 0, "events delivered twice")
  check(counts.missed == 0, "answers flagged missed")
  check(counts.catchup_bad == 0, "a catch-up read was out of order")
  check(counts.sub_errors == 0 and counts.publish_errors == 0 and counts.churn_errors == 0, "request errors")
  check(caught_up, "subscribers did not catch up within 15 s")
  check(drained, "the server's fds did not return to the base count")
  check(s_after.waiting == 0, "waiting subscriptions left after every client left")
  if o.rss_check then
    check(warm ~= nil and #warm >= 2, "run too short to compare RSS after warm-up")
    check(growth <= o.max_growth, format("RSS grew %.1f%% after warm-up (max %g%%)", growth, o.max_growth))
  end
  check(code == 0 and not server.killed, "server exit code " .. tostring(code))
  if #failures == 0 then
    log("soak: PASS")
    result = 0
  else
    log("soak: FAIL: %s", concat(failures, "; "))
    if server.err ~= "" then log("server stderr (first 2 KB):\n%s", server.err:sub(1, 2048)) end
  end
end

local ok, err = pcall(async.run, main, (o.seconds + 180) * 1000)
if not ok then
  io.stderr:write("soak: ", tostring(err), "\n")
  if server.handle and server.code == nil then server.handle:kill("sigkill") end
  os.exit(1)
end
os.exit(result)
