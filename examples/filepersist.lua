-- Events that survive a restart: the file add-on (longpoll.addons.file) appends every event to
-- FILE and restores them on start. The page is the demo's (examples/demo).
-- Run (from the repository root, after `make`):  lua5.4 examples/filepersist.lua
--   open http://127.0.0.1:8101/, publish, stop with Ctrl-C, run it again: the events are back.
--   FILE=/path/events.log lua5.4 examples/filepersist.lua   keeps them elsewhere.
package.path = "./lua/?.lua;./lua/?/init.lua;" .. package.path
package.cpath = "./build/?.so;" .. package.cpath

local uv = require "luv"
local longpoll = require "longpoll"

local FILE = os.getenv("FILE") or "/tmp/longpoll-filepersist.jsonl"
local BUFFER = 500 -- events kept per category, in memory and in the file

local persist = assert(longpoll.addons.file {
  path = FILE,
  flush_interval_ms = 200, -- a crash (kill -9) loses at most the last 200 ms
  max_event_buffer_size = BUFFER,
})
local manager = assert(longpoll.start { max_event_buffer_size = BUFFER, add_on = persist })
local server = assert(longpoll.server.new { host = "127.0.0.1", port = tonumber(os.getenv("PORT") or 8101) })
server:route("GET", "/events", manager.subscription_handler)
server:route("POST", "/publish", manager.publish_handler)
server:route("GET", "/stats", manager.stats_handler)
server:static("/js/", "lua/longpoll/js")
server:static("/", "examples/demo")
local port = assert(server:listen())
print(("listening on http://127.0.0.1:%d/ (events in %s, %d restored)"):format(port, FILE, persist:stats().restored))
io.stdout:flush()

-- Ctrl-C or SIGTERM: answer waiting polls, write what is pending, then leave.
local signals = {}
local function stop()
  for _, s in ipairs(signals) do if not s:is_closing() then s:close() end end
  manager:shutdown(function()
    server:close(function() print("events written to " .. FILE) end)
  end)
end
for _, name in ipairs { "sigint", "sigterm" } do
  local s = uv.new_signal()
  s:start(name, stop)
  signals[#signals + 1] = s
end

uv.run()
