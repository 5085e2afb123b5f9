#!/usr/bin/env lua5.4
-- The Redis engine's catch-up alone, in this process (no HTTP, no manager): N catch-ups of one
-- buffered event through engine:subscribe, answered by the node's local cache, and the same with
-- cache = false (each a read from Redis, 8 in flight, as 8 keep-alive clients would). Prints one
-- JSON line per case. usage: lua5.4 bench/redis_inprocess.lua [N]
local root = arg[0]:match("^(.*)/bench/[^/]*$") or "."
package.path = root .. "/lua/?.lua;" .. root .. "/lua/?/init.lua;" .. root .. "/spec/?.lua;" .. package.path
package.cpath = root .. "/build/?.so;" .. package.cpath

local uv = require "luv"
local async = require "support.async"
local redis = require "support.redis"
local engines = require "support.redis_engines"

local N = math.tointeger(tonumber(arg[1] or "")) or 20000
local R = redis.start()

local function run_case(name, node)
  local done, answered, inflight = async.event(), 0, 0
  local started = 0
  local function next_one()
    while inflight < 8 and started < N do
      started = started + 1
      inflight = inflight + 1
      assert(node.engine:subscribe({ categories = { "c" }, since = 0 }, function()
        answered = answered + 1
        inflight = inflight - 1
        if answered == N then done:set(true) end
      end))
    end
  end
  uv.update_time()
  local t0 = uv.hrtime()
  -- answers from the cache come back inside subscribe: refill from a check timer too
  local check = uv.new_check()
  check:start(next_one)
  next_one()
  assert(done:wait(120000), name .. ": not all answered")
  check:stop()
  check:close()
  local secs = (uv.hrtime() - t0) / 1e9
  io.stdout:write(('{"case":"%s","catchups":%d,"seconds":%.3f,"per_s":%.0f,"cache_hits":%d}\n'):format(
    name, N, secs, N / secs, engines.figures(node).cache_hits or 0))
end

local ok, err = pcall(async.run, function()
  local A = engines.start({ url = R.url })
  local B = engines.start({ url = R.url })
  local C = engines.start({ url = R.url, cache = false })
  async.wait_or_fail("online", function()
    return engines.figures(A).online and engines.figures(B).online and engines.figures(C).online
  end)
  assert(engines.publish(A, "c", '"catch-up-event-payload"'))
  engines.caught_up(B, A)
  run_case("local cache", B)
  run_case("read from Redis", C)
  for _, n in ipairs { A, B, C } do engines.close(n) end
end, 300000)
R:stop()
if not ok then
  io.stderr:write(tostring(err), "\n")
  os.exit(1)
end
