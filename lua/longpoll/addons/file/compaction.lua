-- Compaction of the file add-on's file: copies the live events' lines to path..".compact",
-- fsyncs it and renames it over the file. Asynchronous; the writer runs it as one of its
-- jobs, so no append runs meanwhile (events published meanwhile wait in its batch).
local uv = require "luv"
local fs = require "longpoll.addons.file.fs"
local restore = require "longpoll.addons.file.restore"

local concat, find, sub = table.concat, string.find, string.sub
local call = fs.call

local READ_CHUNK = 256 * 1024 -- the old file is read in pieces of this size

local M = {}

-- M.run(job, done): job = { path, size (bytes of the file to read), live (Live index),
-- now (epoch ms), fsync (fsync the directory after the rename) }. On success done(nil,
-- { fd = the new file's fd, open for appending at its end, lines = kept lines, bytes =
-- their size }); on failure done(err) and the file is left as it was.
function M.run(job, done)
  local path, live, now = job.path, job.live, job.now
  local tmp = path .. ".compact"
  local rfd, wfd
  local offset, kept, kept_bytes, carry, emitted = 0, 0, 0, {}, {}

  local function fail(err)
    -- close, then unlink, then report: a later compaction must not race this unlink
    local function unlink() call(function() done(err) end, uv.fs_unlink, tmp) end
    local function close_w()
      if wfd then call(unlink, uv.fs_close, wfd) else unlink() end
    end
    if rfd then call(close_w, uv.fs_close, rfd) else close_w() end
  end

  local function keep(line)
    local id = restore.line_id(line)
    if not id or emitted[id] or not live:holds(id, now) then return false end
    emitted[id] = true
    return true
  end

  -- Returns the kept lines of a chunk; a line cut by the chunk's end waits in `carry`.
  local function sift(chunk)
    local out, pos = {}, 1
    for _ = 1, #chunk + 1 do
      local nl = find(chunk, "\n", pos, true)
      if not nl then
        if pos <= #chunk then carry[#carry + 1] = sub(chunk, pos) end
        break
      end
      local line
      if #carry > 0 then
        carry[#carry + 1] = sub(chunk, pos, nl - 1)
        line, carry = concat(carry), {}
      else
        line = sub(chunk, pos, nl - 1)
      end
      if keep(line) then
        out[#out + 1] = line
        out[#out + 1] = "\n"
        kept = kept + 1
      end
      pos = nl + 1
    end
    return concat(out)
  end

  local function seal()
    call(function(ferr)
      if ferr then return fail(ferr) end
      call(function(rerr)
        if rerr then return fail(rerr) end
        local result = { fd = wfd, lines = kept, bytes = kept_bytes }
        local function finish() call(function() done(nil, result) end, uv.fs_close, rfd) end
        if not job.fsync then return finish() end
        -- the rename itself must survive a power loss, or later appends would be lost
        call(function(derr, dfd)
          if derr then return finish() end
          call(function() call(finish, uv.fs_close, dfd) end, uv.fs_fsync, dfd)
        end, uv.fs_open, fs.dirname(path), "r", 0)
      end, uv.fs_rename, tmp, path)
    end, uv.fs_fsync, wfd)
  end

  local function read_next()
    if offset >= job.size then return seal() end
    call(function(err, chunk)
      if err then return fail(err) end
      if chunk == nil or #chunk == 0 then return fail("the file is shorter than written") end
      offset = offset + #chunk
      local text = sift(chunk)
      if #text == 0 then return read_next() end
      fs.write_fully(wfd, text, function(werr, n)
        if werr then return fail(werr) end
        kept_bytes = kept_bytes + n
        read_next()
      end)
    end, uv.fs_read, rfd, math.min(READ_CHUNK, job.size - offset), offset)
  end

  call(function(err, fd)
    if err then return fail(err) end
    rfd = fd
    call(function(werr, fd2)
      if werr then return fail(werr) end
      wfd = fd2
      read_next()
    end, uv.fs_open, tmp, "w", fs.FILE_MODE)
  end, uv.fs_open, path, "r", 0)
end

return M
