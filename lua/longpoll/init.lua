-- longpoll: HTTP long-poll pub-sub for Lua, wire-compatible with golongpoll.
--   local longpoll = require "longpoll"
--   local manager = assert(longpoll.start{ max_event_buffer_size = 250 })
local manager = require "longpoll.manager"

local longpoll = {
  _NAME = "longpoll",
  _VERSION = "longpoll 0.1.0",
  FOREVER = manager.FOREVER,
  start = manager.start,
}

-- Optional parts load on first use, so `require "longpoll"` stays cheap.
local LAZY = {
  server = "longpoll.server",
  client = "longpoll.client",
  addons = "longpoll.addons",
  core = "longpoll.core",
}

return setmetatable(longpoll, {
  __index = function(t, k)
    local name = LAZY[k]
    if not name then return nil end
    local mod = require(name)
    rawset(t, k, mod)
    return mod
  end,
})
