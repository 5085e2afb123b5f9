-- Runs `longpoll serve` under the sampling profiler (bench/lprof.c) and, when
-- the server stops (SIGTERM), writes where its CPU time went, by Lua function
-- (self and inclusive) and by line:
--   lua5.4 bench/profile.lua REPORT_FILE serve --port 8101 --quiet ...
-- Build the profiler first: make -C bench.
local root = (arg and arg[0] or ""):match("^(.*)/bench/[^/]*$") or "."
package.path = root .. "/lua/?.lua;" .. root .. "/lua/?/init.lua;" .. package.path
package.cpath = root .. "/bench/build/?.so;" .. root .. "/build/?.so;" .. package.cpath

local out_path = assert(arg[1], "usage: profile.lua REPORT_FILE serve [flags]")
local args = table.move(arg, 2, #arg, 1, {})

local lprof = require "lprof"
local cli = require "longpoll.cli"

lprof.start(tonumber(os.getenv("LPROF_HZ") or "") or 2000)
local rc = cli.main(args)
local samples = lprof.stop()

local total = 0
local self_fn, self_line, incl = {}, {}, {}
local function add(t, k, n) t[k] = (t[k] or 0) + n end
for stack, n in pairs(samples) do
  total = total + n
  local line, frames = stack:match("^(.-)|(.*)$")
  add(self_line, line, n)
  local seen = {}
  local first = true
  for frame in frames:gmatch("[^;]+") do
    if first then add(self_fn, frame, n) first = false end
    if not seen[frame] then seen[frame] = true add(incl, frame, n) end
  end
end

local function top(t, k)
  local list = {}
  for name, n in pairs(t) do list[#list + 1] = { name, n } end
  table.sort(list, function(a, b) return a[2] > b[2] end)
  local lines = {}
  for i = 1, math.min(k, #list) do
    lines[#lines + 1] = ("%6.1f%%  %s"):format(100 * list[i][2] / total, list[i][1])
  end
  return table.concat(lines, "\n")
end

local f = assert(io.open(out_path, "w"))
f:write(("samples: %d (CPU time, user + system)\n\n"):format(total))
f:write("== inclusive, by function ==\n", top(incl, 40), "\n\n")
f:write("== self, by function ==\n", top(self_fn, 30), "\n\n")
f:write("== self, by line ==\n", top(self_line, 40), "\n")
f:close()
os.exit(rc)
