-- bench/bare_luv.lua: the ceiling of a luv server in this process model, for bench/run: every
-- request (its head, and a Content-Length body when there is one) gets the same prebuilt
-- catch-up answer, with nothing parsed beyond what framing needs, no routing, no store. What a
-- libuv server written in Lua costs per request at the least; the catch-up rows are read
-- against it ("how far from the bare-luv ceiling").
--   lua5.4 bench/bare_luv.lua PORT
local uv = require "luv"

local port = assert(math.tointeger(tonumber(arg[1])), "usage: bare_luv.lua PORT")
local BODY = '{"events":[{"timestamp":1700000000000,"category":"c","data":1,'
  .. '"id":"00000000-0000-4000-8000-000000000000"}]}'
local ANSWER = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: " .. #BODY .. "\r\n\r\n" .. BODY

local find, sub, lower, tonumber_ = string.find, string.sub, string.lower, tonumber

local listener = uv.new_tcp()
assert(listener:bind("127.0.0.1", port))
assert(listener:listen(1024, function(err)
  assert(not err, err)
  local client = uv.new_tcp()
  listener:accept(client)
  client:nodelay(true)
  local pending = ""
  client:read_start(function(rerr, data)
    if rerr or not data then
      client:close()
      return
    end
    pending = pending .. data
    local answers = 0
    while true do
      local head_end = find(pending, "\r\n\r\n", 1, true)
      if not head_end then break end
      local length = tonumber_(lower(sub(pending, 1, head_end)):match("\ncontent%-length:%s*(%d+)")) or 0
      if #pending < head_end + 3 + length then break end
      pending = sub(pending, head_end + 4 + length)
      answers = answers + 1
    end
    if answers > 0 then client:write(string.rep(ANSWER, answers)) end
  end)
end))
print(("listening on http://127.0.0.1:%d/"):format(port))
io.stdout:flush()
local signal = uv.new_signal()
signal:start("sigterm", function()
  signal:close()
  listener:close()
  uv.stop()
end)
uv.run()
