-- Mounting the handlers inside an application's own routing, the way
-- golongpoll's README shows gin: the app owns the routes, longpoll answers two
-- of them. Run: lua5.4 examples/router.lua, then open http://127.0.0.1:8101/
package.path = "./lua/?.lua;./lua/?/init.lua;" .. package.path
package.cpath = "./build/?.so;" .. package.cpath

local uv = require "luv"
local longpoll = require "longpoll"

local manager = assert(longpoll.start { max_event_buffer_size = 50 })

-- The application's own router: method + path patterns -> handlers.
local routes = {
  { "GET", "^/$", function(_, res)
    res:set_header("Content-Type", "text/plain; charset=utf-8")
    res:send(200, "try /api/v1/rooms/lobby/events?timeout=30 and POST /api/v1/rooms/lobby/messages\n")
  end },
  -- category from the path, mapped onto the query the handler reads
  { "GET", "^/api/v1/rooms/([%w_-]+)/events$", function(req, res, room)
    req:set_query("category", "room:" .. room)
    return manager.subscription_handler(req, res)
  end },
  { "POST", "^/api/v1/rooms/([%w_-]+)/messages$", function(req, res, room)
    if #req.body == 0 or #req.body > 2000 then return res:send(400, { error = "message must be 1-2000 bytes" }) end
    local event, err = manager:publish("room:" .. room, { text = req.body })
    if not event then return res:send(400, { error = err }) end
    return res:send(200, { id = event.id, timestamp = event.timestamp })
  end },
}

local function app(req, res)
  for _, r in ipairs(routes) do
    local captures = { req.path:match(r[2]) }
    if captures[1] then
      if req.method ~= r[1] then return res:send(405, { error = "method not allowed" }) end
      return r[3](req, res, table.unpack(captures))
    end
  end
  return res:send(404, { error = "no such route" })
end

local server = assert(longpoll.server.new { host = "127.0.0.1", port = tonumber(os.getenv("PORT") or 8101) })
server:fallback(app)
local port = assert(server:listen())
print(("listening on http://127.0.0.1:%d/"):format(port))
io.stdout:flush()
uv.run()
