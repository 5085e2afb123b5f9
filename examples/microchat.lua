-- A chat room server, after golongpoll's microchat example: a few rooms, one category each,
-- display names instead of logins. The handlers are wrapped to accept only the known rooms and
-- well-formed messages. Run (from the repository root, after `make`):
--   lua5.4 examples/microchat.lua     then open http://127.0.0.1:8101/ in two browsers
package.path = "./lua/?.lua;./lua/?/init.lua;" .. package.path
package.cpath = "./build/?.so;" .. package.cpath

local uv = require "luv"
local cjson = require "cjson"
local longpoll = require "longpoll"

local ROOMS = { news = true, sports = true, politics = true, humor = true }
local MAX_NAME, MAX_TEXT = 40, 500

-- Subscriptions only to rooms that exist (every category= of the request).
local function rooms_only(handler)
  return function(req, res)
    for _, room in ipairs(req:query_all("category")) do
      if not ROOMS[room] then return res:send(404, { error = "no such room" }) end
    end
    return handler(req, res)
  end
end

-- Publishes only { name = string, text = string } to a room that exists.
local function chat_messages_only(handler)
  return function(req, res)
    local ok, body = pcall(cjson.decode, req.body)
    if not ok or type(body) ~= "table" then return res:send(400, { error = "body must be a JSON object" }) end
    if not ROOMS[body.category] then return res:send(404, { error = "no such room" }) end
    local m = body.data
    if type(m) ~= "table" or type(m.name) ~= "string" or type(m.text) ~= "string"
      or #m.name < 1 or #m.name > MAX_NAME or #m.text < 1 or #m.text > MAX_TEXT then
      return res:send(400, { error = ("a message is {name (1-%d bytes), text (1-%d bytes)}"):format(MAX_NAME, MAX_TEXT) })
    end
    return handler(req, res)
  end
end

local manager = assert(longpoll.start { max_event_buffer_size = 1000 }) -- chats kept per room
local server = assert(longpoll.server.new { host = "127.0.0.1", port = tonumber(os.getenv("PORT") or 8101) })
server:route("GET", "/events", rooms_only(manager.subscription_handler))
server:route("POST", "/post", chat_messages_only(manager.publish_handler))
server:static("/js/", "lua/longpoll/js")
server:static("/", "examples/microchat")
local port = assert(server:listen())
print(("listening on http://127.0.0.1:%d/"):format(port))
io.stdout:flush()
uv.run()
