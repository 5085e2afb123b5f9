-- Static files for longpoll.server's static mounts: regular files only, opened non-blocking,
-- streamed in pieces as the client reads them (never read whole into memory), single byte
-- ranges (206/416), and no way out of the mounted directory: no "..", no hidden files, and by
-- default no symlink whose target lies outside it.
local uv = require "luv"
local util = require "longpoll.http.util"

local find, sub, gmatch, match = string.find, string.sub, string.gmatch, string.match
local tointeger = math.tointeger

local static = {}

-- Files up to this size go out in one read; larger ones in pieces of this size.
local PIECE = 65536
-- The next piece is read once at most this much output waits for the client.
local LOW_WATER = 4 * PIECE
-- A path segment longer than this cannot name a file (NAME_MAX): 404 without asking the disk.
local NAME_MAX = 255
local O_RDONLY_NONBLOCK = uv.constants.O_RDONLY | uv.constants.O_NONBLOCK

local function close_fd(fd)
  uv.fs_close(fd, function() end)
end

-- What a failed lookup means for the client.
local function lookup_status(err)
  if find(err, "^ENOENT") or find(err, "^ENOTDIR") or find(err, "^ENAMETOOLONG") or find(err, "^ELOOP") then
    return 404, "not found"
  end
  if find(err, "^EACCES") or find(err, "^EPERM") then
    return 403, "forbidden"
  end
  return 500, "cannot read file"
end

-- first, last (inclusive) of a single "bytes=" range; false when it cannot be satisfied (416);
-- nil when there is none or it is not one we serve (several ranges, malformed): the whole file.
local function byte_range(header, size)
  if not header then
    return nil
  end
  local a, b = match(header, "^%s*bytes%s*=%s*(%d*)%s*%-%s*(%d*)%s*$")
  if not a or (a == "" and b == "") or #a > 15 or #b > 15 then
    return nil
  end
  if a == "" then -- the last b bytes
    local n = tointeger(tonumber(b))
    if n == 0 or size == 0 then
      return false
    end
    return math.max(0, size - n), size - 1
  end
  local first = tointeger(tonumber(a))
  local last = b ~= "" and tointeger(tonumber(b)) or size - 1
  if b ~= "" and last < first then
    return nil
  end
  if first >= size then
    return false
  end
  return first, math.min(last, size - 1)
end

-- Writes bytes [offset, offset + left) of fd as the client takes them, then finishes.
local function stream(res, fd, offset, left)
  local closed = false
  res:on_close(function()
    closed = true -- the read in flight sees it and closes the file
  end)
  local step
  step = function()
    if closed then
      return close_fd(fd)
    end
    if left == 0 then
      close_fd(fd)
      return res:finish()
    end
    uv.fs_read(fd, math.min(PIECE, left), offset, function(err, chunk)
      if closed or err or not chunk or #chunk == 0 then
        close_fd(fd)
        if not closed then
          res:finish() -- the file shrank or failed: finish() cuts the connection (short body)
        end
        return
      end
      offset, left = offset + #chunk, left - #chunk
      if not res:write(chunk) then
        closed = true
        return close_fd(fd)
      end
      res:on_drain(step, LOW_WATER)
    end)
  end
  step()
end

local function send_file(res, req, path, fd, stat)
  local size = stat.size
  res:set_header("Content-Type", util.mime_type(path))
  res:set_header("Last-Modified", util.http_date(stat.mtime.sec))
  res:set_header("Accept-Ranges", "bytes")
  local first, last = byte_range(req.headers.range, size)
  local status = 200
  if first == false then
    close_fd(fd)
    res:set_header("Content-Range", "bytes */" .. size)
    return res:send(416, { error = "range not satisfiable" })
  elseif first then
    status = 206
    res:set_header("Content-Range", "bytes " .. first .. "-" .. last .. "/" .. size)
  else
    first, last = 0, size - 1
  end
  local length = last - first + 1
  res:write_head(status, length)
  if req.method == "HEAD" or length == 0 then
    close_fd(fd)
    return res:finish()
  end
  stream(res, fd, first, length)
end

-- The checks that need no disk: nil, or status, message.
local function refuse_path(rel)
  -- req.path is already percent-decoded, so "%2e%2e", "%00" and "%5c" are caught here too.
  if find(rel, "%z") or find(rel, "\\", 1, true) then
    return 400, "invalid path"
  end
  for segment in gmatch(rel, "[^/]+") do
    if sub(segment, 1, 1) == "." or #segment > NAME_MAX then -- "..", ".", hidden files
      return 404, "not found"
    end
  end
end

-- Answers req from the mount { prefix, dir, real (dir resolved), follow_symlinks }.
function static.serve(mount, req, res)
  local rel = sub(req.path, #mount.prefix + 1)
  local status, message = refuse_path(rel)
  if status then
    return res:send(status, { error = message })
  end
  if rel == "" or sub(rel, -1) == "/" then
    rel = rel .. "index.html"
  end
  local path = mount.dir .. "/" .. rel
  uv.fs_realpath(path, function(rerr, real)
    if rerr then
      return res:send(lookup_status(rerr))
    end
    local root = mount.real or uv.fs_realpath(mount.dir) -- once: a directory made after the mount
    mount.real = root
    if not mount.follow_symlinks and not (root and sub(real, 1, #root + 1) == root .. "/") then
      return res:send(404, { error = "not found" }) -- a symlink out of the directory
    end
    -- stat first: opening a FIFO (or a device) could block a thread of the pool for good
    uv.fs_stat(real, function(serr, st)
      if serr then
        return res:send(lookup_status(serr))
      end
      if st.type ~= "file" then
        return res:send(404, { error = "not found" })
      end
      uv.fs_open(real, O_RDONLY_NONBLOCK, 0, function(oerr, fd)
        if oerr then
          return res:send(lookup_status(oerr))
        end
        uv.fs_fstat(fd, function(ferr, stat)
          -- checked again on the open file: the name may point elsewhere by now
          if ferr or stat.type ~= "file" then
            close_fd(fd)
            return res:send(404, { error = "not found" })
          end
          if not res:is_open() then
            return close_fd(fd)
          end
          send_file(res, req, path, fd, stat)
        end)
      end)
    end)
  end)
end

-- A mount for server:static: dir resolved once (the directory itself may be a symlink).
function static.mount(prefix, dir, options)
  local mount = { prefix = prefix, dir = dir, follow_symlinks = options and options.follow_symlinks == true }
  mount.real = uv.fs_realpath(dir) -- nil when it does not exist (yet): every file is then 404
  return mount
end

return static
