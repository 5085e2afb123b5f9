-- bench/wrapped_server.lua: the server `longpoll serve` runs, with its long-poll route behind a
-- Lua wrapper that checks a token header before calling manager.subscription_handler, as an
-- application would. bench/run measures catch-up through it (the wrapper always runs in Lua;
-- the handler it calls is the manager's).
--   lua5.4 bench/wrapped_server.lua PORT
local root = arg[0]:match("^(.*)/bench/[^/]*$") or "."
package.path = root .. "/lua/?.lua;" .. root .. "/lua/?/init.lua;" .. package.path
package.cpath = root .. "/build/?.so;" .. package.cpath

local uv = require "luv"
local longpoll = require "longpoll"
local server = require "longpoll.server"

local port = assert(math.tointeger(tonumber(arg[1])), "usage: wrapped_server.lua PORT")
local manager = assert(longpoll.start { max_event_buffer_size = 250 })
local srv = assert(server.new { host = "127.0.0.1", port = port })
local TOKEN = "Bearer bench-token"
srv:route("GET", "/events", function(req, res)
  if req.headers.authorization ~= TOKEN then
    return res:send(401, { error = "missing or wrong token" })
  end
  return manager.subscription_handler(req, res)
end)
srv:route("*", "/publish", manager.publish_handler)
assert(srv:listen())
print(("listening on http://127.0.0.1:%d/"):format(port))
io.stdout:flush()
local signal = uv.new_signal()
signal:start("sigterm", function()
  signal:close()
  manager:shutdown(function() srv:close() end)
end)
uv.run()
