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

-- The calls below run inside async.run: each waits on the loop, bounded by a generous
-- failure deadline (an ASan build on a loaded machine is many times slower).
local DEADLINE_MS = 60000

local function shutdown(manager)
  local ev = async.event()
  manager:shutdown_with_timeout(DEADLINE_MS / 1000, function(ok, err) ev:set(ok, err) end)
  local ok, err = ev:wait(DEADLINE_MS + 5000)
  assert(ok, "shutdown: " .. tostring(err))
end

local function flush(addon)
  local ev = async.event()
  addon:flush(function(err) ev:set(err == nil, err) end)
  local ok, err = ev:wait(DEADLINE_MS)
  assert(ok, "flush: " .. tostring(err))
end

local function compact(addon)
  local ev = async.event()
  addon:compact(function(err) ev:set(err == nil, err) end)
  local ok, err = ev:wait(DEADLINE_MS)
  assert(ok, "compact: " .. tostring(err))
end

local wait_for = async.wait_for

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
        l[3], -- duplicate (the same timestamp, so never out of order)
        early, -- out of order
        "", l[4],
        l[4]:sub(1, 40), -- torn: no newline
      }, "\n"))

      local logs = {}
      local a2 = assert(file_addon{ path = path, logger = function(level, msg, fields)
        logs[#logs + 1] = { level = level, msg = msg, fields = fields }
      end })
      local m2 = assert(longpoll.start{ add_on = a2 })
      local st = a2:stats()
      assert.same({ corrupt = 3, torn = 1, out_of_order = 1, duplicate = 1, implausible_time = 0 }, st.skipped)
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
      -- no answer cap: the fetch below reads the ~4 MB back in one answer
      local m2 = assert(longpoll.start{ add_on = a2, max_answer_bytes = 0 })
      assert.same({ corrupt = 0, torn = 0, out_of_order = 0, duplicate = 0, implausible_time = 0 }, a2:stats().skipped)
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

  it("compacts away events past their TTL, by the clock it is given", function()
    async.run(function()
      local now = 1700000000000
      local clock = function() return now end
      local a = assert(file_addon{ path = path, event_ttl_seconds = 0.6, compact_slack = 1000, clock = clock })
      for _ in a.on_start() do error("a new file holds no events") end
      local function event(category, i)
        local id = core.uuid()
        return { id = id, timestamp = now, category = category,
          json = ('{"timestamp":%d,"category":"%s","data":%d,"id":"%s"}'):format(now, category, i, id) }
      end
      local young = {}
      for i = 1, 5 do a.on_publish(event("old", i)) end
      flush(a)
      now = now + 600 -- exactly the TTL: the old ones are gone
      for i = 1, 3 do
        local e = event("new", i)
        young[i] = e.id
        a.on_publish(e)
      end
      flush(a)
      assert.equals(8, a:stats().lines_in_file) -- within the slack: no compaction yet
      compact(a)
      assert.same(young, ids_in_file(path))
      assert.equals(3, a:stats().live_events)
      local closed = async.event()
      a.on_shutdown(function() closed:set(true) end)
      assert(closed:wait(DEADLINE_MS))
      -- a restart 599 ms later restores those three; one at 600 ms none
      now = now + 599
      local function restore(at)
        now = at
        local r = assert(file_addon{ path = path, event_ttl_seconds = 0.6, clock = clock, compact_slack = 1000 })
        local got = {}
        for e in r.on_start() do got[#got + 1] = e.id end
        local done = async.event()
        r.on_shutdown(function() done:set(true) end)
        assert(done:wait(DEADLINE_MS))
        return got
      end
      assert.same(young, restore(now))
      assert.same({}, restore(now + 1))
    end, 20000)
  end)

  it("takes the manager's clock when it has none of its own", function()
    async.run(function()
      local now = now_ms() + 10 * 86400 * 1000 -- ten days ahead: the wall clock would keep them all
      local a = assert(file_addon{ path = path, compact_slack = 1000 })
      local m = assert(longpoll.start{ add_on = a, clock = function() return now end, event_ttl_seconds = 1 })
      for i = 1, 3 do assert(m:publish("c", i)) end
      flush(a)
      now = now + 1000
      compact(a)
      assert.equals(0, a:stats().live_events)
      assert.equals(0, #lines_of(path))
      shutdown(m)
    end, 20000)
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
      for round = 1, 2 do
        local t0 = uv.now()
        for i = 1, 3 do assert(m:publish("c", round * 10 + i)) end
        -- published, not written: the batch waits for the interval
        assert.equals(3, a:stats().pending_events)
        assert.equals(3 * (round - 1), #lines_of(path))
        assert(wait_for(function() return a:stats().flushes == round end, DEADLINE_MS))
        -- the timer fired no earlier than the interval (a busy machine only makes it later)
        assert.is_true(uv.now() - t0 >= 300, "written after " .. (uv.now() - t0) .. " ms")
        assert.equals(3 * round, #lines_of(path))
        assert.equals(0, a:stats().pending_events)
      end
      shutdown(m)
    end, DEADLINE_MS + 10000)
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
        assert(wait_for(function() return calls == 2 end, DEADLINE_MS))
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

  it("loses at most what was still pending when the process is killed", function()
    -- The child publishes in batches of 1000 and reports, after each, how many it published
    -- and how many its writer reported written; it is killed once 20000 are on disk. What
    -- is restored is a clean prefix that holds everything reported written, and what is
    -- lost is at most the largest backlog the child reported plus the batch in flight.
    local child = [[
      local uv = require "luv"
      local addon = assert(require("longpoll.addons").file{ path = os.getenv("LP_CRASH_PATH"),
        flush_interval_ms = 20, max_event_buffer_size = 10000000, logger = false })
      local m = assert(require("longpoll").start{ add_on = addon, max_event_buffer_size = 10000000 })
      local n = 0
      local idle = uv.new_idle()
      idle:start(function()
        for _ = 1, 1000 do n = n + 1; m:publish("crash", n) end
        io.stdout:write(("published %d written %d\n"):format(n, addon:stats().events_written))
        io.stdout:flush()
        if n >= 2000000 then idle:stop() end -- bounded, whatever happens to the parent
      end)
      uv.run()
    ]]
    async.run(function()
      local out = uv.new_pipe(false)
      local exited, eof = async.event(), async.event()
      local env = {
        "LUA_PATH=./lua/?.lua;./lua/?/init.lua;;",
        "LUA_CPATH=" .. (os.getenv("LONGPOLL_CPATH") or "./build/?.so") .. ";;",
        "LP_CRASH_PATH=" .. path, "PATH=" .. (os.getenv("PATH") or "/usr/bin:/bin"),
      }
      for _, name in ipairs { "LD_PRELOAD", "ASAN_OPTIONS", "UBSAN_OPTIONS" } do
        if os.getenv(name) then env[#env + 1] = name .. "=" .. os.getenv(name) end
      end
      local proc = assert(uv.spawn("lua5.4", { args = { "-e", child }, stdio = { nil, out, 2 }, env = env,
        cwd = uv.cwd() }, function(code, signal) exited:set(code, signal) end))
      local buf, published, written, max_backlog = "", 0, 0, 0
      out:read_start(function(err, data)
        if err or not data then return eof:set(true) end
        buf = buf .. data
        for p, w in buf:gmatch("published (%d+) written (%d+)\n") do
          published, written = tonumber(p), tonumber(w)
          max_backlog = math.max(max_backlog, published - written)
        end
        buf = buf:match("[^\n]*$")
      end)
      assert(wait_for(function() return written >= 20000 end, DEADLINE_MS), "the child wrote 20000 events")
      proc:kill("sigkill")
      local _, signal = exited:wait(DEADLINE_MS)
      assert.equals(9, signal)
      eof:wait(DEADLINE_MS)
      out:close()
      proc:close()

      local a = assert(file_addon{ path = path, max_event_buffer_size = 10000000, logger = quiet })
      local m = assert(longpoll.start{ add_on = a, max_event_buffer_size = 10000000 })
      local events = fetch(m, "crash", 0)
      local restored = #events
      for i, e in ipairs(events) do -- a contiguous prefix, no duplicates
        if e.data ~= i then error(("restored event %d holds %s"):format(i, tostring(e.data))) end
      end
      shutdown(m)
      local lost = math.max(0, published - restored)
      print(("crash: published %d (last report), written %d (last report), restored %d, lost %d,"
        .. " largest backlog reported %d, torn lines %d"):format(published, written, restored, lost, max_backlog,
        a:stats().skipped.torn))
      assert.is_true(restored >= written, "everything reported written was restored")
      assert.is_true(lost <= max_backlog + 1000, "lost more than the largest pending backlog")
    end, 4 * DEADLINE_MS)
  end)

  it("restores past lines stamped implausibly far in the future, which never pin the clock", function()
    async.run(function()
      local m1 = assert(longpoll.start{ add_on = assert(file_addon{ path = path }) })
      local a1, b1 = assert(m1:publish("c", 1)), assert(m1:publish("c", 2))
      shutdown(m1)
      local l = lines_of(path)
      local function stamped(ts)
        return l[1]:gsub('"timestamp":%d+', '"timestamp":' .. ts):gsub('"id":"[^"]+"', '"id":"' .. core.uuid() .. '"')
      end
      write_all(path, table.concat({ l[1], stamped("9223372036854775807"), stamped(now_ms() + 2 * 3600 * 1000),
        stamped("-5"), l[2], "" }, "\n"))
      local a2 = assert(file_addon{ path = path, logger = quiet })
      local m2 = assert(longpoll.start{ add_on = a2 })
      assert.equals(3, a2:stats().skipped.implausible_time)
      assert.same({ a1.id, b1.id }, ids(fetch(m2, "c", 0)))
      local fresh = assert(m2:publish("c", 3))
      assert.is_true(fresh.timestamp < now_ms() + 60000, "the clock was not pinned in the future")
      shutdown(m2)
    end, 20000)
  end)

  it("recreates the file when it is deleted while running, and says so", function()
    async.run(function()
      local logs = {}
      local a = assert(file_addon{ path = path, flush_interval_ms = 60000, logger = function(level, msg)
        logs[#logs + 1] = level .. ": " .. msg
      end })
      local m = assert(longpoll.start{ add_on = a })
      assert(m:publish("c", 1))
      flush(a)
      assert.equals(1, #lines_of(path))
      assert(os.remove(path))
      local later = assert(m:publish("c", 2))
      flush(a)
      assert.same({ later.id }, ids_in_file(path))
      assert.equals(1, a:stats().recreated)
      assert.matches("error: file add%-on: the file was deleted while running; recreated it", logs[#logs])
      shutdown(m)
      local m2 = assert(longpoll.start{ add_on = assert(file_addon{ path = path }) })
      assert.same({ later.id }, ids(fetch(m2, "c", 0)))
      shutdown(m2)
    end, 20000)
  end)

  it("takes a lock: a second add-on on the same file refuses to start, clearly", function()
    async.run(function()
      local m1 = assert(longpoll.start{ add_on = assert(file_addon{ path = path }) })
      local m2, err = longpoll.start{ add_on = assert(file_addon{ path = path }) }
      assert.is_nil(m2)
      assert.matches("in use by another process", err)
      assert.matches("events%.log%.lock", err)
      assert(m1:publish("c", 1))
      shutdown(m1)
      -- released at shutdown: the next one starts
      local m3 = assert(longpoll.start{ add_on = assert(file_addon{ path = path }) })
      assert.equals(1, #fetch(m3, "c", 0))
      shutdown(m3)
    end, 20000)
  end)

  describe("on a full disk (a small tmpfs)", function()
    local mnt
    local skip_reason
    before_each(function()
      mnt = dir .. "/mnt"
      assert(uv.fs_mkdir(mnt, tonumber("755", 8)))
      local ok = os.execute("mount -t tmpfs -o size=64k tmpfs '" .. mnt .. "' 2>/dev/null")
      if not ok then skip_reason = "cannot mount a tmpfs here (needs root): full-disk specs skipped" end
    end)
    after_each(function()
      if not skip_reason then os.execute("umount '" .. mnt .. "'") end
    end)

    -- Fills the tmpfs with a filler file of about `bytes` (all the space when nil).
    local function fill(name, bytes)
      local f = assert(io.open(mnt .. "/" .. name, "wb"))
      local chunk = ("f"):rep(1024)
      for _ = 1, (bytes or 1048576) // 1024 do
        if not f:write(chunk) or not f:flush() then break end
      end
      f:close()
    end

    it("counts and logs failed writes, keeps events in memory, and loses none once space is back", function()
      if skip_reason then return pending(skip_reason) end
      async.run(function()
        local file = mnt .. "/events.log"
        fill("filler", 40 * 1024)
        local errors = {}
        local a = assert(file_addon{ path = file, flush_interval_ms = 10, logger = function(level, msg)
          if level == "error" then errors[#errors + 1] = msg end
        end })
        local m = assert(longpoll.start{ add_on = a })
        local sent, failed = {}, false
        for i = 1, 200 do
          sent[#sent + 1] = assert(m:publish("c", { i = i, pad = ("p"):rep(1000) })).id
          local ev = async.event()
          a:flush(function(err) ev:set(true, err) end)
          local _, err = ev:wait(DEADLINE_MS)
          if err then
            failed = true
            break
          end
        end
        assert.is_true(failed, "the disk never filled")
        local healthy, why = a:healthy()
        assert.is_false(healthy)
        assert.matches("ENOSPC", why)
        assert.is_true(a:stats().write_errors >= 1)
        assert.matches("write failed", errors[1])
        for i = 1, 3 do sent[#sent + 1] = assert(m:publish("c", { after = i })).id end
        assert(os.remove(mnt .. "/filler")) -- space is back: the retries get through
        assert(wait_for(function() return a:healthy() and a:stats().pending_events == 0 end, DEADLINE_MS))
        shutdown(m)
        -- every event is in the file once; the fragment of the short write is a line a
        -- restore skips
        local readable, fragments = {}, 0
        for _, line in ipairs(lines_of(file)) do
          local ok, e = pcall(cjson.decode, line)
          if ok then readable[#readable + 1] = e.id else fragments = fragments + 1 end
        end
        assert.same(sent, readable)
        assert.is_true(fragments <= 1)
        assert.equals(0, a:stats().lost_events)
        local m2 = assert(longpoll.start{ add_on = assert(file_addon{ path = file, logger = quiet }) })
        assert.same(sent, ids(fetch(m2, "c", 0)))
        shutdown(m2)
      end, 2 * DEADLINE_MS)
    end)

    it("restarts over the torn last line a full disk left, with a clean prefix", function()
      if skip_reason then return pending(skip_reason) end
      async.run(function()
        local file = mnt .. "/events.log"
        local a = assert(file_addon{ path = file, flush_interval_ms = 10, logger = quiet })
        local m = assert(longpoll.start{ add_on = a })
        local sent = {}
        for i = 1, 30 do sent[i] = assert(m:publish("c", { i = i, pad = ("p"):rep(700) })).id end
        flush(a)
        fill("filler") -- every byte left
        for i = 31, 60 do sent[i] = assert(m:publish("c", { i = i, pad = ("p"):rep(700) })).id end
        local ev = async.event()
        a:flush(function(err) ev:set(true, err) end)
        local _, err = ev:wait(DEADLINE_MS)
        assert.matches("ENOSPC", tostring(err))
        shutdown(m) -- the unwritten events are lost, counted and logged
        assert.is_true(a:stats().lost_events > 0)
        -- the disk is still full: the restart must work all the same
        local a2 = assert(file_addon{ path = file, logger = quiet })
        local m2 = assert(longpoll.start{ add_on = a2 })
        local restored = ids(fetch(m2, "c", 0))
        assert.is_true(#restored >= 30)
        for i, id in ipairs(restored) do assert.equals(sent[i], id) end
        shutdown(m2)
      end, 2 * DEADLINE_MS)
    end)
  end)
end)
