-- The file persistence add-on (longpoll.addons.file) with real files and a real manager:
-- restarts, damaged files, big events, compaction, batching, fsync, add-on lists, a crash.
local uv = require "luv"
local cjson = require "cjson"
local async = require "support.async"
local longpoll = require "longpoll"
local core = require "longpoll.core"
local file_addon = require("longpoll.addons").file
local now_ms = require("longpoll.manager").now_ms

local function read_all(path)
  local f = io.open(path, "rb")
  if not f then return nil end
  local s = f:read("a")
  f:close()
  return s
end

local function write_all(path, s)
  local f = assert(io.open(path, "wb"))
  f:write(s)
  f:close()
end

-- The file's lines, without their newlines (a torn last line included).
local function lines_of(path)
  local s, out = read_all(path) or "", {}
  for line in s:gmatch("[^\n]+") do out[#out + 1] = line end
  return out
end

local function fetch(manager, category, since, last_id)
  local body = manager.engine.store:fetch(category, since or 0, last_id, now_ms())
  return body and cjson.decode(body).events or {}
end

local function ids(events)
  local out = {}
  for i, e in ipairs(events) do out[i] = e.id end
  return out
end

local function ids_in_file(path)
  local out = {}
  for i, line in ipairs(lines_of(path)) do out[i] = cjson.decode(line).id end
  return out
end

-- The calls below run inside async.run: each waits on the loop, bounded.
local function shutdown(manager)
  local ev = async.event()
  manager:shutdown_with_timeout(5, function(ok, err) ev:set(ok, err) end)
  local ok, err = ev:wait(6000)
  assert(ok, "shutdown: " .. tostring(err))
end

local function flush(addon)
  local ev = async.event()
  addon:flush(function(err) ev:set(err == nil, err) end)
  local ok, err = ev:wait(5000)
  assert(ok, "flush: " .. tostring(err))
end

local function compact(addon)
  local ev = async.event()
  addon:compact(function(err) ev:set(err == nil, err) end)
  local ok, err = ev:wait(5000)
  assert(ok, "compact: " .. tostring(err))
end

-- Waits until cond() holds; false after timeout_ms.
local function wait_for(cond, timeout_ms)
  local deadline = uv.now() + timeout_ms
  for _ = 1, timeout_ms // 5 + 1 do
    if cond() then return true end
    if uv.now() >= deadline then break end
    async.sleep(5)
  end
  return cond()
end

local function quiet() end

describe("longpoll.addons.file", function()
  local dir, path

  before_each(function()
    dir = assert(uv.fs_mkdtemp("/tmp/longpoll-file-spec-XXXXXX"))
    path = dir .. "/events.log"
  end)

  after_each(function()
    os.execute("chmod -R u+w '" .. dir .. "' 2>/dev/null; rm -rf '" .. dir .. "'")
  end)

  it("checks its options", function()
    assert.is_nil(file_addon{})
    assert.is_nil(file_addon{ path = "" })
    local a, err = file_addon{ path = path, flush_interval_ms = -1 }
    assert.is_nil(a)
    assert.matches("flush_interval_ms", err)
    assert.matches("unknown option 'colour'", select(2, file_addon{ path = path, colour = 1 }))
    assert.matches("fsync", select(2, file_addon{ path = path, fsync = "yes" }))
    assert.matches("compact_ratio", select(2, file_addon{ path = path, compact_ratio = 0.5 }))
    assert.matches("event_ttl_seconds", select(2, file_addon{ path = path, event_ttl_seconds = 0 }))
    assert.is_table(file_addon.new{ path = path, event_ttl_seconds = longpoll.FOREVER })
  end)

  it("restores events and the cursor across a restart", function()
    async.run(function()
      local a1 = assert(file_addon{ path = path, flush_interval_ms = 20 })
      local m1 = assert(longpoll.start{ add_on = a1 })
      local news = {}
      for i = 1, 5 do
        news[i] = assert(m1:publish("news", { n = i }))
        if i == 2 then assert(m1:publish("other", "x")) end
      end
      assert(m1:publish_json("other", '{"big":123456789012345678901234567890,"f":1.10}'))
      shutdown(m1)

      local lines = lines_of(path)
      assert.equals(7, #lines)
      assert.equals(news[1].json, lines[1]) -- the line is the event's JSON text
      local first = cjson.decode(lines[1])
      assert.same({ "category", "data", "id", "timestamp" }, (function()
        local keys = {}
        for k in pairs(first) do keys[#keys + 1] = k end
        table.sort(keys)
        return keys
      end)())

      local a2 = assert(file_addon{ path = path })
      local m2 = assert(longpoll.start{ add_on = a2 })
      assert.equals(7, a2:stats().restored)
      -- a client that saw news[3] gets exactly news[4] and news[5]
      local later = fetch(m2, "news", news[3].timestamp, news[3].id)
      assert.same({ news[4].id, news[5].id }, ids(later))
      local all = fetch(m2, "news", 0)
      assert.equals(5, #all)
      for i, e in ipairs(all) do
        assert.equals(news[i].id, e.id)
        assert.equals(news[i].timestamp, e.timestamp)
        assert.same({ n = i }, e.data)
      end
      -- data text is kept as written: every digit
      local body = m2.engine.store:fetch("other", 0, nil, now_ms())
      assert.truthy(body:find('"data":{"big":123456789012345678901234567890,"f":1.10}', 1, true))
      -- publishing goes on after the restored events
      local fresh = assert(m2:publish("news", { n = 6 }))
      assert.same({ fresh.id }, ids(fetch(m2, "news", news[5].timestamp, news[5].id)))
      shutdown(m2)
      assert.equals(8, #lines_of(path))
    end, 10000)
  end)

  it("keeps a line per event when data_json holds newlines", function()
    async.run(function()
      local a1 = assert(file_addon{ path = path })
      local m1 = assert(longpoll.start{ add_on = a1 })
      assert(m1:publish_json("c", '{\n"a": [1,\n2]\n}'))
      assert(m1:publish("c", "line\nbreak"))
      shutdown(m1)
      assert.equals(2, #lines_of(path))
      local m2 = assert(longpoll.start{ add_on = assert(file_addon{ path = path }) })
      local all = fetch(m2, "c", 0)
      assert.same({ a = { 1, 2 } }, all[1].data)
      assert.equals("line\nbreak", all[2].data)
      shutdown(m2)
    end, 10000)
  end)

  it("skips a torn last line and corrupt lines, counts them and warns", function()
    async.run(function()
      local m1 = assert(longpoll.start{ add_on = assert(file_addon{ path = path }) })
      local sent = {}
      for i = 1, 4 do sent[i] = assert(m1:publish("c", i)) end
      shutdown(m1)
      local l = lines_of(path)
      local bad_id = l[2]:gsub('"id":"[^"]+"', '"id":"not-a-uuid"')
      local early = l[3]:gsub('"timestamp":%d+', '"timestamp":1'):gsub('"id":"[^"]+"', '"id":"' .. core.uuid() .. '"')
      write_all(path, table.concat({
        l[1], "this is not JSON", l[2],
        '{"timestamp":5,"category":"c"}', -- no data, no id
        bad_id, l[3],
        early, -- out of order
        l[2], -- duplicate
        "", l[4],
        l[4]:sub(1, 40), -- torn: no newline
      }, "\n"))

      local logs = {}
      local a2 = assert(file_addon{ path = path, logger = function(level, msg, fields)
        logs[#logs + 1] = { level = level, msg = msg, fields = fields }
      end })
      local m2 = assert(longpoll.start{ add_on = a2 })
      local st = a2:stats()
      assert.same({ corrupt = 3, torn = 1, out_of_order = 1, duplicate = 1 }, st.skipped)
      assert.equals(4, st.restored)
      assert.equals(1, #logs)
      assert.equals("warn", logs[1].level)
      assert.equals(3, logs[1].fields.corrupt)
      assert.equals(1, logs[1].fields.torn)
      assert.same(ids(sent), ids(fetch(m2, "c", 0)))
      -- the damaged file was replaced by a clean one
      assert.same(ids(sent), ids_in_file(path))
      assert(m2:publish("c", 5))
      shutdown(m2)
      assert.equals(5, #lines_of(path))
    end, 10000)
  end)

  it("round-trips events of 1 MB and more", function()
    async.run(function()
      local m1 = assert(longpoll.start{ add_on = assert(file_addon{ path = path }) })
      local one = string.rep("0123456789abcdef", 65536) -- 1 MiB
      local many = {}
      for i = 1, 300000 do many[i] = i * 1000003 end -- a 3 MB array
      assert(m1:publish("big", one))
      assert(m1:publish("big", { list = many }))
      assert(m1:publish("big", "small"))
      shutdown(m1)
      local lines = lines_of(path)
      assert.equals(3, #lines)
      assert.is_true(#lines[1] > 1048576 and #lines[2] > 2000000)
      local a2 = assert(file_addon{ path = path })
      local m2 = assert(longpoll.start{ add_on = a2 })
      assert.same({ corrupt = 0, torn = 0, out_of_order = 0, duplicate = 0 }, a2:stats().skipped)
      local all = fetch(m2, "big", 0)
      assert.equals(3, #all)
      assert.equals(one, all[1].data)
      assert.same(many, all[2].data.list)
      assert.equals("small", all[3].data)
      shutdown(m2)
    end, 20000)
  end)

  it("compacts the file to the events the buffers still hold", function()
    async.run(function()
      local a = assert(file_addon{ path = path, flush_interval_ms = 5, max_event_buffer_size = 5, compact_slack = 0 })
      local m = assert(longpoll.start{ add_on = a, max_event_buffer_size = 5 })
      local biggest = 0
      for batch = 1, 8 do
        for i = 1, 10 do assert(m:publish("a", { batch = batch, i = i, pad = string.rep("p", 200) })) end
        if batch % 3 == 0 then assert(m:publish("b", batch)) end
        flush(a)
        biggest = math.max(biggest, #(read_all(path)))
      end
      flush(a)
      assert.is_true(a:stats().compactions >= 1, "compaction ran by itself")
      -- never more than twice the live events (7) plus one batch in the file
      assert.is_true(a:stats().lines_in_file <= 2 * 7 + 11)
      compact(a)
      local live = {}
      for _, id in ipairs(ids(fetch(m, "a", 0))) do live[#live + 1] = id end
      for _, id in ipairs(ids(fetch(m, "b", 0))) do live[#live + 1] = id end
      assert.equals(7, #live)
      local in_file = ids_in_file(path)
      table.sort(live)
      table.sort(in_file)
      assert.same(live, in_file)
      assert.is_true(#read_all(path) < biggest)
      assert.is_nil(read_all(path .. ".compact"))
      shutdown(m)
    end, 15000)
  end)

  it("compacts away events past their TTL", function()
    async.run(function()
      local a = assert(file_addon{ path = path, event_ttl_seconds = 0.3, compact_slack = 1000 })
      local m = assert(longpoll.start{ add_on = a, event_ttl_seconds = 0.3 })
      for i = 1, 5 do assert(m:publish("old", i)) end
      flush(a)
      async.sleep(400)
      local young = {}
      for i = 1, 3 do young[i] = assert(m:publish("new", i)).id end
      flush(a)
      assert.equals(8, a:stats().lines_in_file) -- within the slack: no compaction yet
      compact(a)
      assert.same(young, ids_in_file(path))
      assert.equals(3, a:stats().live_events)
      shutdown(m)
      -- and a restart restores just those
      local m2 = assert(longpoll.start{ add_on = assert(file_addon{ path = path }), event_ttl_seconds = 0.3 })
      assert.same(young, ids(fetch(m2, "new", 0)))
      shutdown(m2)
    end, 10000)
  end)

  it("loses nothing published while a compaction is under way", function()
    async.run(function()
      local a = assert(file_addon{ path = path, flush_interval_ms = 1, max_event_buffer_size = 5, compact_slack = 1000000 })
      local m = assert(longpoll.start{ add_on = a, max_event_buffer_size = 5 })
      local pad = string.rep("z", 10000)
      for i = 1, 300 do assert(m:publish("a", { i = i, pad = pad })) end -- a 3 MB file
      flush(a)
      local done = async.event()
      a:compact(function(err) done:set(err == nil, err) end)
      local during = {}
      for i = 1, 50 do
        during[#during + 1] = assert(m:publish("b" .. (i % 3), i)).id
        if i % 10 == 0 then async.sleep(1) end
      end
      assert(done:wait(5000))
      flush(a)
      shutdown(m)
      local m2 = assert(longpoll.start{ add_on = assert(file_addon{ path = path, max_event_buffer_size = 5 }),
        max_event_buffer_size = 5 })
      local restored = {}
      for _, c in ipairs { "b1", "b2", "b0" } do
        for _, id in ipairs(ids(fetch(m2, c, 0))) do restored[id] = true end
      end
      local expected = 0
      for i = 36, 50 do -- the newest 5 of each "b" category
        expected = expected + 1
        assert.is_true(restored[during[i]], "event " .. i .. " published during compaction")
      end
      assert.equals(15, expected)
      assert.equals(5, #fetch(m2, "a", 0))
      shutdown(m2)
    end, 15000)
  end)

  it("refuses a missing directory", function()
    local m, err = longpoll.start{ add_on = assert(file_addon{ path = dir .. "/missing/events.log" }) }
    assert.is_nil(m)
    assert.matches("add%-on 1: on_start failed", err)
    assert.matches("missing", err)
  end)

  it("refuses a directory it cannot write", function()
    local ro = dir .. "/read-only"
    assert(uv.fs_mkdir(ro, tonumber("555", 8)))
    local probe = uv.fs_open(ro .. "/probe", "w", tonumber("644", 8))
    local target = ro .. "/events.log"
    if probe then
      -- running as root: permissions are not enforced, so use a "directory" that is a file
      uv.fs_close(probe)
      write_all(dir .. "/plain.txt", "not a directory\n")
      target = dir .. "/plain.txt/events.log"
    end
    local m, err = longpoll.start{ add_on = assert(file_addon{ path = target }) }
    assert.is_nil(m)
    assert.matches("add%-on 1: on_start failed", err)
  end)

  it("batches appends: nothing written before the interval, everything after", function()
    async.run(function()
      local a = assert(file_addon{ path = path, flush_interval_ms = 300 })
      local m = assert(longpoll.start{ add_on = a })
      local t0 = uv.now()
      for i = 1, 3 do assert(m:publish("c", i)) end
      async.sleep(100)
      assert.equals("", read_all(path))
      assert.equals(3, a:stats().pending_events)
      assert(wait_for(function() return #lines_of(path) == 3 end, 2000))
      assert.is_true(uv.now() - t0 >= 290)
      assert(wait_for(function() return a:stats().flushes == 1 end, 2000))
      for i = 4, 5 do assert(m:publish("c", i)) end
      async.sleep(100)
      assert.equals(3, #lines_of(path))
      assert(wait_for(function() return #lines_of(path) == 5 end, 2000))
      assert(wait_for(function() return a:stats().flushes == 2 end, 2000))
      shutdown(m)
    end, 10000)
  end)

  it("writes what is pending at shutdown and leaves no handle open", function()
    local function open_handles()
      local n = 0
      uv.walk(function(h) if not async.owns(h) and not h:is_closing() then n = n + 1 end end)
      return n
    end
    async.run(function()
      local before = open_handles()
      local a = assert(file_addon{ path = path, flush_interval_ms = 60000 })
      local m = assert(longpoll.start{ add_on = a })
      for i = 1, 10 do assert(m:publish("c", i)) end
      assert.equals("", read_all(path))
      shutdown(m)
      assert.equals(10, #lines_of(path))
      assert.is_false(a:stats().open)
      async.sleep(10)
      assert.equals(before, open_handles())
    end, 10000)
  end)

  it("takes the buffer size from the manager's options passed to on_start, and max_live_events", function()
    async.run(function()
      local m1 = assert(longpoll.start{ add_on = assert(file_addon{ path = path }) })
      local sent = {}
      for i = 1, 10 do sent[i] = assert(m1:publish("c", i)).id end
      shutdown(m1)
      local function restore(options, manager_options)
        local a = assert(file_addon(options))
        local got = {}
        for e in a.on_start(manager_options) do got[#got + 1] = e.id end
        local closed = async.event()
        a.on_shutdown(function() closed:set(true) end)
        assert(closed:wait(5000))
        return got
      end
      assert.same({ sent[8], sent[9], sent[10] }, restore({ path = path }, { max_event_buffer_size = 3 }))
      assert.same({ sent[9], sent[10] }, restore({ path = path, max_live_events = 2, compact_slack = 0 }))
      -- with no slack, the last restore rewrote the file to the live events
      assert.same({ sent[9], sent[10] }, ids_in_file(path))
    end, 10000)
  end)

  it("fsyncs each flush when asked, and only then", function()
    async.run(function()
      local calls = 0
      local real = uv.fs_fsync
      uv.fs_fsync = function(...)
        calls = calls + 1
        return real(...)
      end
      local ok, err = pcall(function()
        local plain = assert(file_addon{ path = path, flush_interval_ms = 5 })
        local m1 = assert(longpoll.start{ add_on = plain })
        assert(m1:publish("c", 1))
        flush(plain)
        shutdown(m1)
        assert.equals(0, calls)

        local synced = assert(file_addon{ path = path, flush_interval_ms = 5, fsync = true })
        local m2 = assert(longpoll.start{ add_on = synced })
        assert(m2:publish("c", 2))
        flush(synced)
        assert.equals(1, calls)
        assert(m2:publish("c", 3))
        assert(wait_for(function() return calls == 2 end, 2000))
        shutdown(m2)
        assert.equals(3, #lines_of(path))
      end)
      uv.fs_fsync = real
      assert(ok, err)
    end, 10000)
  end)

  it("works in a list of add-ons: both files and a plain add-on see every event", function()
    async.run(function()
      local seen = {}
      local recorder = { on_publish = function(e) seen[#seen + 1] = e.id end }
      local a1 = assert(file_addon{ path = path })
      local a2 = assert(file_addon{ path = dir .. "/second.log" })
      local m = assert(longpoll.start{ add_on = { a1, recorder, a2 } })
      local sent = {}
      for i = 1, 3 do sent[i] = assert(m:publish("c", i)).id end
      shutdown(m)
      assert.same(sent, seen)
      assert.same(sent, ids_in_file(path))
      assert.same(sent, ids_in_file(dir .. "/second.log"))
    end, 10000)
  end)

  it("keeps working when another add-on's hooks raise", function()
    async.run(function()
      local errors = {}
      local bad = {
        on_publish = function() error("boom") end,
        on_shutdown = function() error("bang") end,
      }
      local a = assert(file_addon{ path = path, logger = quiet })
      local m = assert(longpoll.start{ add_on = { bad, a }, logger = function(level, msg, fields)
        if level == "error" then errors[#errors + 1] = msg .. " " .. tostring(fields and fields.error) end
      end })
      local sent = {}
      for i = 1, 3 do sent[i] = assert(m:publish("c", i)).id end
      shutdown(m)
      assert.same(sent, ids_in_file(path))
      assert.equals(4, #errors)
      assert.matches("boom", errors[1])
      assert.matches("bang", errors[4])
    end, 10000)
  end)

  it("loses at most about one flush interval when the process is killed", function()
    local child = [[
      local uv = require "luv"
      local addon = assert(require("longpoll.addons").file{ path = os.getenv("LP_CRASH_PATH"),
        flush_interval_ms = 100, max_event_buffer_size = 10000000, logger = false })
      local m = assert(require("longpoll").start{ add_on = addon, max_event_buffer_size = 10000000 })
      local n, written, t0 = 0, -1, uv.hrtime()
      local idle = uv.new_idle()
      idle:start(function()
        for _ = 1, 1000 do n = n + 1; m:publish("crash", n) end
        local w = addon:stats().events_written
        local out = ("published %d %d\n"):format(n, (uv.hrtime() - t0) // 1000000)
        if w ~= written then written = w; out = out .. ("written %d\n"):format(w) end
        io.stdout:write(out)
        io.stdout:flush()
      end)
      uv.run()
    ]]
    async.run(function()
      local out = uv.new_pipe(false)
      local exited, eof = async.event(), async.event()
      local env = {
        "LUA_PATH=./lua/?.lua;./lua/?/init.lua;;", "LUA_CPATH=./build/?.so;;",
        "LP_CRASH_PATH=" .. path, "PATH=" .. (os.getenv("PATH") or "/usr/bin:/bin"),
      }
      local proc = assert(uv.spawn("lua5.4", { args = { "-e", child }, stdio = { nil, out, 2 }, env = env,
        cwd = uv.cwd() }, function(code, signal) exited:set(code, signal) end))
      local buf, published, written, reports = "", 0, 0, {}
      out:read_start(function(err, data)
        if err or not data then return eof:set(true) end
        buf = buf .. data
        for line in buf:gmatch("([^\n]*)\n") do
          local n, ms = line:match("^published (%d+) (%d+)$")
          if n then
            published = tonumber(n)
            reports[#reports + 1] = { n = published, ms = tonumber(ms) }
          end
          local w = line:match("^written (%d+)$")
          if w then written = tonumber(w) end
        end
        buf = buf:match("[^\n]*$")
      end)
      async.sleep(1500)
      proc:kill("sigkill")
      local _, signal = exited:wait(5000)
      assert.equals(9, signal)
      eof:wait(2000)
      out:close()
      proc:close()
      assert.is_true(published > 0 and written > 0, "the child published and flushed")

      local a = assert(file_addon{ path = path, max_event_buffer_size = 10000000, logger = quiet })
      local m = assert(longpoll.start{ add_on = a, max_event_buffer_size = 10000000 })
      local events = fetch(m, "crash", 0)
      local restored = #events
      for i, e in ipairs(events) do -- a contiguous prefix, no duplicates
        if e.data ~= i then error(("restored event %d holds %s"):format(i, tostring(e.data))) end
      end
      shutdown(m)

      -- how many of the last ms of publishing were lost, by the child's own clock
      local last, restored_at = reports[#reports], 0
      for _, r in ipairs(reports) do
        if r.n <= restored then restored_at = r.ms end
      end
      local lost_ms = last.ms - restored_at
      local per_interval = math.ceil(last.n / math.max(1, last.ms) * 100)
      local lost = math.max(0, published - restored)
      print(("crash: published %d (per child's stdout), restored %d, lost %d"
        .. " = the last %d ms of publishing (100 ms interval ~ %d events; last reported written %d; torn lines %d)")
        :format(published, restored, lost, lost_ms, per_interval, written, a:stats().skipped.torn))
      assert.is_true(restored >= written, "everything reported written was restored")
      -- at most one interval of batching plus the write in flight (measured: 0 to 90 ms);
      -- the margin is for GC pauses and a busy machine, which stretch both
      assert.is_true(lost_ms <= 200, "lost more than a flush interval's worth")
    end, 30000)
  end)
end)
