-- The server of the browser tests (tests/browser/run.mjs): the manager's handlers, the test
-- pages, the browser client, and /control/* routes that let a test see waiting polls and take
-- the HTTP server down and up again while the manager (its buffer) stays.
--   lua5.4 tests/browser/server.lua [--extra-static PREFIX DIR]...
-- Prints "listening PORT" once ready; exits on SIGTERM, SIGINT or when stdin closes.
local root = arg[0]:match("^(.*)/tests/browser/[^/]*$") or "."
package.path = root .. "/lua/?.lua;" .. root .. "/lua/?/init.lua;" .. package.path
package.cpath = root .. "/build/?.so;" .. package.cpath

local uv = require "luv"
local cjson = require "cjson"
local longpoll = require "longpoll"
local server_mod = require "longpoll.server"

local extra_static = {}
do
  local i = 1
  while i <= #arg do
    if arg[i] == "--extra-static" and arg[i + 2] then
      extra_static[#extra_static + 1] = { arg[i + 1], arg[i + 2] }
      i = i + 3
    else
      io.stderr:write("usage: server.lua [--extra-static PREFIX DIR]...\n")
      os.exit(2)
    end
  end
end

local manager = assert(longpoll.start { max_longpoll_timeout_seconds = 30 })
local port = 0
local srv
local auth_log = {} -- what the guarded routes saw, for /control/auth-log

local function json(res, status, value)
  res:set_header("Content-Type", "application/json")
  res:set_header("Cache-Control", "no-store")
  res:send(status, cjson.encode(value))
end

-- Basic auth "alice:s3cret" plus "X-Token: t0ken" in front of a handler.
local function guarded(handler)
  return function(req, res)
    local user, password = req:basic_auth()
    auth_log[#auth_log + 1] = { method = req.method, user = user or cjson.null,
      token = req.headers["x-token"] or cjson.null }
    if user ~= "alice" or password ~= "s3cret" or req.headers["x-token"] ~= "t0ken" then
      return json(res, 401, { error = "unauthorized" })
    end
    return handler(req, res)
  end
end

-- /flaky/publish: the first request of each Idempotency-Key is stored, then answered 503 (as a
-- failing-over Redis could); later ones go to the publish handler (a replay). The keys seen
-- are in /control/flaky-log.
local flaky_keys, flaky_seen = {}, {}
local function flaky_publish(req, res)
  local key = req.headers["idempotency-key"]
  flaky_keys[#flaky_keys + 1] = key or cjson.null
  if key and not flaky_seen[key] then
    flaky_seen[key] = true
    local body = cjson.decode(req.body)
    assert(manager:publish(body.category, body.data, { idempotency_key = key }))
    return json(res, 503, { error = "stored, but the answer says otherwise" })
  end
  return manager.publish_handler(req, res)
end

local serve
local stopping = false

-- Closes the HTTP server (waiting polls get their answer first), publishes the events of
-- `publish` (category, count) from Lua while it is down, and listens again after down_ms.
local function restart(down_ms, category, count)
  local old = srv
  srv = nil
  old:close(function()
    for i = 1, count do
      manager:publish(category, { n = i, while_down = true })
    end
    local timer = uv.new_timer()
    timer:start(down_ms, 0, function()
      timer:close()
      serve()
    end)
  end)
end

local function control(req, res)
  local path = req.path
  if path == "/control/waiting" then
    local stats = manager:stats(true)
    local c = stats.by_category and stats.by_category[req.query.category or ""]
    return json(res, 200, { waiting = c and c.waiting or 0 })
  elseif path == "/control/restart" then
    local down_ms = math.tointeger(tonumber(req.query.down_ms or "1000")) or 1000
    local count = math.tointeger(tonumber(req.query.count or "0")) or 0
    json(res, 200, { restarting = true })
    -- after this answer is on its way
    local timer = uv.new_timer()
    timer:start(10, 0, function()
      timer:close()
      restart(down_ms, req.query.category or "restart", count)
    end)
    return
  elseif path == "/control/flaky-log" then
    local out = flaky_keys
    flaky_keys = {}
    return json(res, 200, { keys = out })
  elseif path == "/control/auth-log" then
    local out = auth_log
    auth_log = {}
    return json(res, 200, { requests = out })
  end
  return json(res, 404, { error = "no such control" })
end

function serve()
  if stopping then return end
  srv = assert(server_mod.new { port = port, keepalive_timeout_ms = 5000 })
  srv:route("GET", "/events", manager.subscription_handler)
  srv:route("*", "/publish", manager.publish_handler)
  srv:route("GET", "/auth/events", guarded(manager.subscription_handler))
  srv:route("*", "/auth/publish", guarded(manager.publish_handler))
  srv:route("*", "/flaky/publish", flaky_publish)
  for _, p in ipairs { "/control/waiting", "/control/restart", "/control/auth-log", "/control/flaky-log" } do
    srv:route("*", p, control)
  end
  srv:static("/js/", root .. "/lua/longpoll/js")
  for _, s in ipairs(extra_static) do
    srv:static(s[1], s[2])
  end
  srv:static("/", root .. "/tests/browser/pages")
  local p, err = srv:listen()
  if not p then
    io.stderr:write("cannot listen: ", tostring(err), "\n")
    os.exit(1)
  end
  if port == 0 then
    port = p
    io.stdout:write("listening ", p, "\n")
    io.stdout:flush()
  end
end

local handles = {}
local function stop()
  if stopping then return end
  stopping = true
  -- whatever still holds the loop after 2 s is not worth waiting for
  local bail = uv.new_timer()
  bail:start(2000, 0, function() os.exit(0) end)
  bail:unref()
  for _, h in ipairs(handles) do
    if not h:is_closing() then h:close() end
  end
  manager:shutdown()
  if srv then srv:close(function() end) end
end
for _, name in ipairs { "sigint", "sigterm" } do
  local s = uv.new_signal()
  s:start(name, stop)
  handles[#handles + 1] = s
end
-- the test runner holds our stdin: when it goes away, so do we
local stdin = uv.new_pipe(false)
stdin:open(0)
stdin:read_start(function(err, data)
  if err or not data then stop() end
end)
handles[#handles + 1] = stdin

serve()
uv.run()
