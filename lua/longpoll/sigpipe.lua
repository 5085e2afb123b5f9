-- Writing to a socket the peer has reset raises SIGPIPE, whose default action ends the process;
-- libuv leaves that to the application. While anyone holds this guard, one process-wide signal
-- handle catches it, so the write fails with EPIPE and only that connection is dropped.
local uv = require "luv"

local M = {}

local handle, holders = nil, 0

-- Takes the guard (every hold needs one release).
function M.hold()
  holders = holders + 1
  if not handle then
    handle = uv.new_signal()
    handle:start("sigpipe", function() end)
    handle:unref()
  end
end

-- Gives the guard back; the last release closes the handle. Returns true when it is being
-- closed: on_closed (optional) runs once it is.
function M.release(on_closed)
  holders = holders - 1
  if holders == 0 and handle then
    handle:close(on_closed)
    handle = nil
    return true
  end
  return false
end

return M
