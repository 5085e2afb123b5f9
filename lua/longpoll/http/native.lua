-- Handlers the HTTP engine may run itself, in C, for the requests it can answer without Lua
-- (OpenResty's model: Lua runs only where an application hooked something). A module that owns
-- such a handler (the manager: its long-poll handler, answered from the store, or parked in C
-- until a publish or its timeout answers it) registers the function with what the engine needs; server:route looks the function
-- up. A wrapper around the handler is another function: it is never looked up, so the wrapper
-- (a token check, say) always runs, in Lua, and calls the handler itself.
local native = {}

local descriptors = setmetatable({}, { __mode = "k" }) -- handler -> native handler (core)

-- handler: the Lua function; descriptor: made by core.native_subscription.
function native.register(handler, descriptor)
  descriptors[handler] = descriptor
end

-- The native handler registered for a Lua function, or nil.
function native.descriptor(handler)
  return descriptors[handler]
end

return native
