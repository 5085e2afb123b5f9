-- File-system helpers of the file add-on: asynchronous luv calls with one callback style,
-- writes that finish short writes, and the directory of a path.
local uv = require "luv"

local sub = string.sub

local M = {}

M.FILE_MODE = tonumber("644", 8)

-- Starts an asynchronous luv fs call fn(...) with callback cb; a request luv
-- refuses at once (it then returns nil, err and never calls back) reports to cb too.
function M.call(cb, fn, ...)
  local args = table.pack(...)
  args.n = args.n + 1
  args[args.n] = cb
  local req, err = fn(table.unpack(args, 1, args.n))
  if req == nil and err ~= nil then cb(err) end
end

-- Writes all of `data` at fd's current position (or its end, for O_APPEND),
-- continuing after short writes; done(err, bytes_written).
function M.write_fully(fd, data, done)
  local written = 0
  local function step(err, n)
    if err then return done(err, written) end
    if n == 0 then return done("write made no progress", written) end
    written = written + n
    if written >= #data then return done(nil, written) end
    M.call(step, uv.fs_write, fd, sub(data, written + 1), -1)
  end
  M.call(step, uv.fs_write, fd, data, -1)
end

function M.dirname(path)
  local dir = path:match("^(.*)/[^/]*$")
  if dir == nil then return "." end
  if dir == "" then return "/" end
  return dir
end

-- fsyncs a directory now (after a rename in it), ignoring failures: best effort.
function M.sync_dir_now(dir)
  local dfd = uv.fs_open(dir, "r", 0)
  if dfd then
    uv.fs_fsync(dfd)
    uv.fs_close(dfd)
  end
end

return M
