-- The quickstart: a long-poll pub-sub server in a few lines.
-- Run: lua5.4 examples/basic.lua   (from the repository root, after `make`)
-- Then: curl 'http://127.0.0.1:8101/events?category=news&timeout=30' and, in another shell,
--       curl -d '{"category":"news","data":"hello"}' http://127.0.0.1:8101/publish
package.path = "./lua/?.lua;./lua/?/init.lua;" .. package.path
package.cpath = "./build/?.so;" .. package.cpath

local uv = require "luv"
local longpoll = require "longpoll"

local manager = assert(longpoll.start { max_event_buffer_size = 100, event_ttl_seconds = 3600 })
local server = assert(longpoll.server.new { host = "127.0.0.1", port = tonumber(os.getenv("PORT") or 8101) })
server:route("GET", "/events", manager.subscription_handler)
server:route("POST", "/publish", manager.publish_handler)
local port = assert(server:listen())
print(("listening on http://127.0.0.1:%d/"):format(port))
io.stdout:flush()

-- Publishing from Lua needs no network: a clock event every 10 seconds.
local clock = uv.new_timer()
clock:start(10000, 10000, function() manager:publish("clock", { time = os.time() }) end)

uv.run()
