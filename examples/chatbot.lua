-- A chat page plus a bot written with the Lua client (longpoll.client), after golongpoll's
-- chatbot example: the page publishes to "to-chatbot", the bot answers on "from-chatbot".
-- Run (from the repository root, after `make`):  lua5.4 examples/chatbot.lua
--   then open http://127.0.0.1:8101/ and ask about tacos, coffee, cats or the time.
-- Or let the bot join another server (say `make run`'s demo, watching "to-chatbot,from-chatbot"):
--   lua5.4 examples/chatbot.lua --join http://127.0.0.1:8101
package.path = "./lua/?.lua;./lua/?/init.lua;" .. package.path
package.cpath = "./build/?.so;" .. package.cpath

local uv = require "luv"
local longpoll = require "longpoll"

local CANNED = {
  "Mmhmm...", "Oh, interesting.", "Go on...", "You're telling me!", "Ha! That's funny!",
  "True, true. Very true.", "I'm listening.", "Oh... I see.", "For sure!", "Totally.",
}
local next_canned = 0

-- The bot's whole brain: a few keywords, then canned answers in turn.
local function reply_to(text)
  local t = text:lower()
  if t:find("taco", 1, true) then return "I. LOVE. TACOS!!!" end
  if t:find("coffee", 1, true) then return "Need. M O R E. Coffee!" end
  if t:find("cat", 1, true) then return "BARK! BARK! Go away, cat!" end
  if t:find("time", 1, true) then return "It is " .. os.date("%H:%M:%S") .. " here." end
  if t:find("help", 1, true) then return "Ask me about tacos, coffee, cats or the time." end
  next_canned = next_canned % #CANNED + 1
  return CANNED[next_canned]
end

local function now_ms()
  local sec, usec = uv.gettimeofday()
  return sec * 1000 + usec // 1000
end

-- Subscribes to "to-chatbot" on base_url over HTTP and publishes each answer to "from-chatbot".
local function start_bot(base_url)
  local bot = assert(longpoll.client.new {
    subscribe_url = base_url .. "/events",
    publish_url = base_url .. "/publish",
    category = "to-chatbot",
    reattempt_wait_seconds = 1,
    on_failure = function(err)
      io.stderr:write("chatbot: ", err, " (retrying)\n")
      return true
    end,
  })
  -- From now on, by this clock: a message sent before the first poll arrives is still answered.
  bot:start(now_ms(), function(event)
    local text = type(event.data) == "table" and event.data.text or event.data
    if type(text) ~= "string" then return end
    bot:publish("from-chatbot", { from = "chatbot", text = reply_to(text), re = text }, function(ok, err)
      if not ok then io.stderr:write("chatbot: could not answer: ", err, "\n") end
    end)
  end)
  return bot
end

if arg[1] == "--join" then
  local url = assert(arg[2], "usage: lua5.4 examples/chatbot.lua [--join http://HOST:PORT]"):gsub("/+$", "")
  start_bot(url)
  print("chatbot joined " .. url .. ' (categories "to-chatbot" and "from-chatbot")')
  io.stdout:flush()
  uv.run()
  return
end

local manager = assert(longpoll.start { max_event_buffer_size = 100 })
local server = assert(longpoll.server.new { host = "127.0.0.1", port = tonumber(os.getenv("PORT") or 8101) })
server:route("GET", "/events", manager.subscription_handler)
server:route("POST", "/publish", manager.publish_handler)
server:static("/js/", "lua/longpoll/js") -- the browser client
server:static("/", "examples/chatbot")   -- the page
local port = assert(server:listen())
start_bot("http://127.0.0.1:" .. port)
print(("listening on http://127.0.0.1:%d/"):format(port))
io.stdout:flush()
uv.run()
