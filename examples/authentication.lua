-- Wrapping the handlers, as Go apps wrap golongpoll's: HTTP basic auth on
-- subscribe, a header token on publish, and a list of categories a publisher
-- may use. Run: lua5.4 examples/authentication.lua
--   curl -u alice:wonderland 'http://127.0.0.1:8101/events?category=public&timeout=30'
--   curl -H 'X-Token: s3cret' -d '{"category":"public","data":1}' http://127.0.0.1:8101/publish
package.path = "./lua/?.lua;./lua/?/init.lua;" .. package.path
package.cpath = "./build/?.so;" .. package.cpath

local uv = require "luv"
local cjson = require "cjson"
local longpoll = require "longpoll"

local USERS = { alice = "wonderland", bob = "builder" }
local PUBLISH_TOKEN = os.getenv("PUBLISH_TOKEN") or "s3cret"
local PUBLISHABLE = { public = true, chat = true }

-- 401 with a challenge unless the request carries a known user and password.
local function require_basic_auth(handler)
  return function(req, res)
    local user, password = req:basic_auth()
    if not user or USERS[user] ~= password then
      res:set_header("WWW-Authenticate", 'Basic realm="longpoll", charset="UTF-8"')
      return res:send(401, { error = "authentication required" })
    end
    return handler(req, res)
  end
end

-- 403 unless the X-Token header matches.
local function require_token(handler)
  return function(req, res)
    if req.headers["x-token"] ~= PUBLISH_TOKEN then
      return res:send(403, { error = "missing or wrong X-Token" })
    end
    return handler(req, res)
  end
end

-- 403 for categories this application does not let clients publish to.
local function only_categories(allowed, handler)
  return function(req, res)
    local ok, body = pcall(cjson.decode, req.body)
    local category = ok and type(body) == "table" and body.category
    if type(category) == "string" and not allowed[category] then
      return res:send(403, { error = "publishing to this category is not allowed" })
    end
    return handler(req, res) -- malformed bodies get the handler's own 400
  end
end

local manager = assert(longpoll.start {})
local server = assert(longpoll.server.new { host = "127.0.0.1", port = tonumber(os.getenv("PORT") or 8101) })
server:route("GET", "/events", require_basic_auth(manager.subscription_handler))
server:route("POST", "/publish", require_token(only_categories(PUBLISHABLE, manager.publish_handler)))
local port = assert(server:listen())
print(("listening on http://127.0.0.1:%d/"):format(port))
io.stdout:flush()
uv.run()
