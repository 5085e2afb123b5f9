-- One process per persist file: an exclusive flock on FILE.lock, held while the add-on
-- runs. A lock file beside the data file, because compaction renames a new file over the
-- data file (a lock on the old one would go with it). The kernel releases the lock when the
-- process ends, even by SIGKILL, so a crash never leaves a stale lock behind.
local uv = require "luv"
local core = require "longpoll.core"
local fs = require "longpoll.addons.file.fs"

local M = {}

-- Returns the lock (pass it to release) or nil, message.
function M.acquire(path)
  local lock_path = path .. ".lock"
  local fd, err = uv.fs_open(lock_path, "a", fs.FILE_MODE)
  if not fd then return nil, "cannot open the lock file " .. lock_path .. ": " .. tostring(err) end
  local ok, lerr, kind = core.lock_file(fd)
  if not ok then
    uv.fs_close(fd)
    if kind == "EWOULDBLOCK" then
      return nil, ("%s is in use by another process (it holds the lock %s): one server per persist file")
        :format(path, lock_path)
    end
    return nil, "cannot lock " .. lock_path .. ": " .. tostring(lerr)
  end
  return { fd = fd, path = lock_path }
end

-- Releases a lock (closing its descriptor); the lock file stays, as removing it could race
-- with a process that just opened it.
function M.release(lock, cb)
  if not lock or not lock.fd then
    if cb then cb() end
    return
  end
  local fd = lock.fd
  lock.fd = nil
  if cb then fs.call(function() cb() end, uv.fs_close, fd) else uv.fs_close(fd) end
end

return M
