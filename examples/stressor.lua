-- A server to watch, and a command-line publisher to load it, after golongpoll's stressor.
-- Run (from the repository root, after `make`), in two shells:
--   lua5.4 examples/stressor.lua serve      then open http://127.0.0.1:8101/?category=stress
--   lua5.4 examples/stressor.lua publish --count 1000 --url http://127.0.0.1:8101/publish
-- publish flags: --count N (1000), --delay-ms MS between publishes of one client (0),
--   --category C (stress), --url URL (http://127.0.0.1:8101/publish), --clients K (1, in parallel).
-- serve flags: --port N (or PORT=N; 8101), --buffer-size N (1000 events kept per category).
package.path = "./lua/?.lua;./lua/?/init.lua;" .. package.path
package.cpath = "./build/?.so;" .. package.cpath

local uv = require "luv"
local longpoll = require "longpoll"

local USAGE = [[
usage: lua5.4 examples/stressor.lua serve [--port N] [--buffer-size N]
       lua5.4 examples/stressor.lua publish [--count N] [--delay-ms MS] [--category C]
                                            [--url URL] [--clients K]
]]

local function usage(message)
  io.stderr:write("stressor: ", message, "\n", USAGE)
  os.exit(2)
end

-- --name value pairs into a table, checked against defaults (numbers stay numbers).
local function parse_flags(args, defaults)
  local out = {}
  for k, v in pairs(defaults) do out[k] = v end
  local i = 2
  while i <= #args do
    local name = args[i]:match("^%-%-([%w-]+)$")
    if not name or defaults[name] == nil then usage("unknown flag '" .. args[i] .. "'") end
    local value = args[i + 1]
    if value == nil then usage("flag --" .. name .. " needs a value") end
    if math.type(defaults[name]) == "integer" then
      value = value:match("^%d+$") and math.tointeger(tonumber(value))
      if not value then usage("flag --" .. name .. " needs a whole number") end
    end
    out[name] = value
    i = i + 2
  end
  return out
end

local function now_ms()
  local sec, usec = uv.gettimeofday()
  return sec * 1000 + usec // 1000
end

local function serve(flags)
  local manager = assert(longpoll.start { max_event_buffer_size = flags["buffer-size"] })
  local server = assert(longpoll.server.new { host = "127.0.0.1", port = flags.port })
  server:route("GET", "/events", manager.subscription_handler)
  server:route("POST", "/publish", manager.publish_handler)
  server:route("GET", "/stats", manager.stats_handler)
  server:static("/js/", "lua/longpoll/js")
  server:static("/", "examples/demo") -- the demo page, told what to watch by ?category=
  local port = assert(server:listen())
  io.stdout:write(("listening on http://127.0.0.1:%d/\nwatch: http://127.0.0.1:%d/?category=stress\n"):format(port, port))
  io.stdout:flush()
  uv.run()
end

-- Each client publishes its share in turn (one keep-alive connection each), waiting
-- --delay-ms after each answer; the clients run side by side.
local function publish(flags)
  local total, clients = flags.count, math.max(1, flags.clients)
  local started, sent, done_ok, failed, last_error = now_ms(), 0, 0, 0, nil
  local step = math.max(1, total // 10)
  for _ = 1, math.min(clients, math.max(total, 1)) do
    local c, err = longpoll.client.new { publish_url = flags.url, category = flags.category }
    if not c then usage(err) end
    local timer = uv.new_timer()
    local function next_one()
      if sent >= total then
        timer:close()
        return
      end
      sent = sent + 1
      local n = sent
      c:publish(flags.category, { n = n, text = "event #" .. n, sent_at = now_ms() }, function(ok, perr)
        if ok then done_ok = done_ok + 1 else failed, last_error = failed + 1, perr end
        local finished = done_ok + failed
        if finished % step == 0 or finished == total then
          print(("%d/%d published%s"):format(finished, total, failed > 0 and (", " .. failed .. " failed") or ""))
          io.stdout:flush()
        end
        if flags["delay-ms"] > 0 then timer:start(flags["delay-ms"], 0, next_one) else next_one() end
      end)
    end
    next_one()
  end
  uv.run()
  local seconds = math.max(1, now_ms() - started) / 1000
  print(("published %d of %d events to %q at %s in %.2f s (%.0f/s); %d failed"):format(
    done_ok, total, flags.category, flags.url, seconds, done_ok / seconds, failed))
  if last_error then io.stderr:write("last error: ", last_error, "\n") end
  os.exit(failed == 0 and 0 or 1)
end

local command = arg[1]
if command == "serve" then
  serve(parse_flags(arg, { port = math.tointeger(tonumber(os.getenv("PORT") or 8101)), ["buffer-size"] = 1000 }))
elseif command == "publish" then
  publish(parse_flags(arg, { count = 1000, ["delay-ms"] = 0, category = "stress",
    url = "http://127.0.0.1:8101/publish", clients = 1 }))
else
  usage(command and ("unknown command '" .. command .. "'") or "missing command")
end
