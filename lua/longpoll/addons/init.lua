-- The add-ons shipped with longpoll, each loaded on first use:
--   local addons = require "longpoll.addons"
--   local manager = assert(longpoll.start{ add_on = assert(addons.file{ path = "events.log" }) })
local LAZY = {
  file = "longpoll.addons.file",
}

return setmetatable({ _NAME = "longpoll.addons" }, {
  __index = function(t, k)
    local name = LAZY[k]
    if not name then return nil end
    local mod = require(name)
    rawset(t, k, mod)
    return mod
  end,
})
