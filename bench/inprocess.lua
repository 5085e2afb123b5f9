-- In-process throughput, no HTTP: manager:publish into 1,000 categories with
-- and without waiting subscribers (manager:watch), and the binding alone
-- (store:publish / store:wait). One JSON line per case on stdout.
--   lua5.4 bench/inprocess.lua [events]   (default 200,000 per case)
local root = (arg and arg[0] or ""):match("^(.*)/bench/[^/]*$") or "."
package.path = root .. "/lua/?.lua;" .. root .. "/lua/?/init.lua;" .. package.path
package.cpath = root .. "/build/?.so;" .. package.cpath

local uv = require "luv"
local longpoll = require "longpoll"

local N = math.tointeger(tonumber(arg[1] or "")) or 200000
local NCATS = 1000
local cats = {}
for i = 1, NCATS do cats[i] = "cat-" .. i end

local function report(case, fields, events, seconds)
  local parts = { ('"case":"%s"'):format(case) }
  for k, v in pairs(fields) do parts[#parts + 1] = ('"%s":%s'):format(k, v) end
  parts[#parts + 1] = ('"events":%d,"seconds":%.3f,"events_per_s":%.0f'):format(events, seconds, events / seconds)
  io.write("{", table.concat(parts, ","), "}\n")
  io.flush()
end

local function timed(fn)
  collectgarbage()
  local t0 = uv.hrtime()
  fn()
  return (uv.hrtime() - t0) / 1e9
end

-- manager:publish, nobody waiting
do
  local m = assert(longpoll.start { max_event_buffer_size = 250 })
  local data = "benchmark-event-payload-0123456789"
  local secs = timed(function()
    for i = 1, N do assert(m:publish(cats[i % NCATS + 1], data)) end
  end)
  report("manager_publish", { categories = NCATS, watchers_per_category = 0 }, N, secs)
  m:shutdown()
end

-- the same with an Idempotency-Key per publish (issue 17): each key looked up and remembered
-- (past idempotency_max_keys the oldest are evicted), and with per-category rules (the C store
-- asks them once per new category, never per publish)
do
  local m = assert(longpoll.start { max_event_buffer_size = 250 })
  local data = "benchmark-event-payload-0123456789"
  local keys = {}
  for i = 1, N do keys[i] = "key-" .. i end
  local secs = timed(function()
    for i = 1, N do assert(m:publish(cats[i % NCATS + 1], data, { idempotency_key = keys[i] })) end
  end)
  report("manager_publish_idempotent", { categories = NCATS, keys = N }, N, secs)
  m:shutdown()
  m = assert(longpoll.start { max_event_buffer_size = 250, category_rules = {
    { prefix = "cat-1", max_event_buffer_size = 50, event_ttl_seconds = 600 },
    { match = "^cat%-2", max_event_buffer_size = 20 },
    { prefix = "cat-3", event_ttl_seconds = 60 } } })
  secs = timed(function()
    for i = 1, N do assert(m:publish(cats[i % NCATS + 1], data)) end
  end)
  report("manager_publish_category_rules", { categories = NCATS, rules = 3 }, N, secs)
  m:shutdown()
end

-- manager:publish with `w` watchers per category, each watching again when called
for _, w in ipairs { 1, 10 } do
  local m = assert(longpoll.start { max_event_buffer_size = 250 })
  local data = "benchmark-event-payload-0123456789"
  local calls = 0
  local function watch(category)
    local function on_event()
      calls = calls + 1
      assert(m:watch(category, on_event))
    end
    assert(m:watch(category, on_event))
  end
  for i = 1, NCATS do
    for _ = 1, w do watch(cats[i]) end
  end
  local n = N // w
  local secs = timed(function()
    for i = 1, n do assert(m:publish(cats[i % NCATS + 1], data)) end
  end)
  assert(calls == n * w, "every watcher called once per event")
  report("manager_publish", { categories = NCATS, watchers_per_category = w, deliveries = calls }, n, secs)
  m:shutdown()
end

-- The binding alone: store:publish of ready JSON, and a store:wait per woken handle
for _, w in ipairs { 0, 1 } do
  local store = require("longpoll.core").new_store { max_event_buffer_size = 250 }
  for i = 1, NCATS do
    for _ = 1, w do assert(store:wait(cats[i])) end
  end
  local data_json = '"benchmark-event-payload-0123456789"'
  local now = 1700000000000
  local secs = timed(function()
    for i = 1, N do
      local cat = cats[i % NCATS + 1]
      local json, _, _, woken = store:publish(cat, data_json, now + i // 1000)
      assert(json)
      for _ = 1, #woken do store:wait(cat) end
    end
  end)
  report("store_publish", { categories = NCATS, waiters_per_category = w }, N, secs)
  store:close()
end
