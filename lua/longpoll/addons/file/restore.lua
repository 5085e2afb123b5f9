-- Reading the file add-on's file at start (synchronous: nothing is served yet): parsing
-- lines, skipping damaged ones with a count, and rewriting the file clean.
local uv = require "luv"
local core = require "longpoll.core"
local cjson = require "cjson"
local fs = require "longpoll.addons.file.fs"

local concat, find, sub = table.concat, string.find, string.sub

local M = {}

local ID_SUFFIX = ',"id":"' -- a canonical line ends with ,"id":"<36-char uuid>"}
M.ID_SUFFIX = ID_SUFFIX
M.SUFFIX_LEN = #ID_SUFFIX + 36 + 2
local SUFFIX_LEN = M.SUFFIX_LEN
local WRITE_CHUNK = 1024 * 1024 -- the start-up rewrite writes about this much at a time
local ANY_CATEGORY_BYTES = 1 << 30 -- the store, not the file, decides how long a category may be
-- A line stamped further ahead of the clock than this was not written by us (or the clock
-- jumped back by more): restoring it would pin every later timestamp there and defeat the TTL.
M.MAX_FUTURE_MS = 3600 * 1000
local TIME_MAX = 253402300799999 -- the end of year 9999 in epoch ms (LP_TIME_MAX of the core)

-- The kinds of skipped lines, as counted in stats().skipped.
M.SKIP_KINDS = { "corrupt", "torn", "out_of_order", "duplicate", "implausible_time" }

function M.canonical_line(ev)
  return ('{"timestamp":%d,"category":%s,"data":%s,"id":"%s"}'):format(ev.timestamp,
    core.json_string(ev.category), ev.data_json, ev.id)
end

-- The id of a canonical line, or nil for anything else (a fragment of a failed write).
function M.line_id(line)
  if #line <= SUFFIX_LEN or sub(line, -SUFFIX_LEN, -SUFFIX_LEN + #ID_SUFFIX - 1) ~= ID_SUFFIX then return nil end
  return sub(line, -38, -3)
end

-- Parses one line (without its newline). Returns the event and whether the line
-- is canonical (what the store writes: timestamp first, id last), or nil, reason.
-- data_json is the exact text of "data" in the line (core.parse_publish ignores
-- the other keys and returns it untouched), so numbers keep every digit.
local function parse_line(line, max_category_bytes)
  local ok, err = core.json_check(line)
  if not ok then return nil, "not JSON (" .. err .. ")" end
  local category, data_json = core.parse_publish(line, max_category_bytes)
  if not category then return nil, "no valid category or data" end
  local ts = line:match('^{"timestamp":(%-?%d+),')
  local id = #line > SUFFIX_LEN and sub(line, -SUFFIX_LEN):match('^,"id":"(.*)"}$')
  local canonical = ts ~= nil and id ~= nil
  if not canonical then
    -- written by someone else (other key order, spaces): let cjson find the fields
    local okd, obj = pcall(cjson.decode, line)
    if not okd or type(obj) ~= "table" then return nil, "cjson cannot read it" end
    ts, id = obj.timestamp, obj.id
  end
  ts = (type(ts) == "string" or type(ts) == "number") and math.tointeger(tonumber(ts))
  if not ts then return nil, "timestamp is not an integer" end
  if type(id) ~= "string" or not core.is_uuid(id) then return nil, "id is not a UUID" end
  if not core.utf8_valid(category) then return nil, "category is not UTF-8" end
  local lower = id:lower()
  if lower ~= id then canonical = false end
  return { id = lower, timestamp = ts, category = category, data_json = data_json }, canonical
end

-- Reads every line of an open file. Returns a table: entries ({event, line, live}) in
-- order, the number of lines, whether the file should be rewritten (dirty), and torn_at:
-- the byte offset where a torn last line starts (nil when the file ends with a newline).
-- live: a Live index the kept events are added to; now: the clock (epoch ms).
local function read_lines(f, max_category_bytes, live, now, counts)
  local entries, seen = {}, {}
  local last_ts, line_no, dirty, offset, torn_at = math.mininteger, 0, false, 0, nil
  local function skip(kind, why)
    counts[kind] = counts[kind] + 1
    counts.first_problem = counts.first_problem or ("line %d: %s"):format(line_no, why)
    dirty = true
  end
  -- "L" keeps the newline, so a torn last line shows; no length limit
  for line in f:lines("L") do
    line_no = line_no + 1
    local start = offset
    offset = offset + #line
    if line:byte(-1) ~= 10 then
      skip("torn", "torn last line (no newline)")
      torn_at = start
    else
      line = sub(line, 1, -2)
      if not find(line, "%S") then
        dirty = true -- blank: harmless, dropped by the rewrite
      else
        local ev, canonical = parse_line(line, max_category_bytes or ANY_CATEGORY_BYTES)
        if not ev then
          skip("corrupt", canonical)
        elseif ev.timestamp < 0 or ev.timestamp > TIME_MAX or ev.timestamp > now + M.MAX_FUTURE_MS then
          skip("implausible_time", ("timestamp %d is not a time up to an hour from now"):format(ev.timestamp))
        elseif ev.timestamp < last_ts then
          skip("out_of_order", "timestamp older than the line before")
        elseif seen[ev.id] then
          skip("duplicate", "id already seen")
        else
          seen[ev.id] = true
          last_ts = ev.timestamp
          if not canonical then
            line, dirty = M.canonical_line(ev), true
          end
          if live.ttl_ms > 0 and now - ev.timestamp >= live.ttl_ms then
            counts.expired = counts.expired + 1
          else
            entries[#entries + 1] = { event = ev, line = line, live = live:add(ev.id, ev.timestamp, ev.category) }
          end
        end
      end
    end
  end
  local kept = {}
  for i = 1, #entries do
    if not entries[i].live.dead then kept[#kept + 1] = entries[i] end
  end
  return { entries = kept, lines = line_no, dirty = dirty, torn_at = torn_at }
end

-- M.read(path, options) -> result table (see read_lines) plus counts of skipped lines.
-- options: live (a Live index), now (epoch ms), max_category_bytes. Raises on I/O errors.
function M.read(path, options)
  local counts = { expired = 0 }
  for _, k in ipairs(M.SKIP_KINDS) do counts[k] = 0 end
  local f, oerr = io.open(path, "rb")
  if not f then error("cannot read " .. tostring(oerr), 0) end
  local ok, result = pcall(read_lines, f, options.max_category_bytes, options.live, options.now, counts)
  f:close()
  if not ok then error("cannot read " .. path .. ": " .. tostring(result), 0) end
  result.counts = counts
  return result
end

local function check(ok, err, what)
  if ok == nil then error(what .. ": " .. tostring(err), 0) end
  return ok
end

-- Cuts a torn last line off (at byte offset torn_at): needs no free space, so it works on a
-- full disk, where a rewrite cannot. Returns true or nil, message.
function M.truncate(path, torn_at)
  local fd, err = uv.fs_open(path, "r+", 0)
  if not fd then return nil, err end
  local ok, terr = uv.fs_ftruncate(fd, torn_at)
  uv.fs_close(fd)
  if not ok then return nil, terr end
  return true
end

-- Replaces the file with `entries`' lines: write a sibling, fsync it, rename it over.
-- Raises on failure (the file is then left as it was).
function M.rewrite(path, entries, fsync_dir)
  local tmp = path .. ".compact"
  local fd, oerr = uv.fs_open(tmp, "w", fs.FILE_MODE)
  check(fd, oerr, "cannot create " .. tmp)
  local ok, err = pcall(function()
    local function write(s)
      local off = 0
      for _ = 1, #s do -- every pass writes at least one byte
        local n, werr = uv.fs_write(fd, off == 0 and s or sub(s, off + 1), -1)
        check(n, werr, "cannot write " .. tmp)
        if n == 0 then error("cannot write " .. tmp .. ": no progress", 0) end
        off = off + n
        if off >= #s then return end
      end
    end
    local buf, size = {}, 0
    for i = 1, #entries do
      local line = entries[i].line
      buf[#buf + 1] = line
      buf[#buf + 1] = "\n"
      size = size + #line + 1
      if size >= WRITE_CHUNK then
        write(concat(buf))
        buf, size = {}, 0
      end
    end
    if #buf > 0 then write(concat(buf)) end
    local fok, ferr = uv.fs_fsync(fd)
    check(fok, ferr, "cannot fsync " .. tmp)
  end)
  uv.fs_close(fd)
  if not ok then
    uv.fs_unlink(tmp)
    error(err, 0)
  end
  local rok, rerr = uv.fs_rename(tmp, path)
  if not rok then
    uv.fs_unlink(tmp)
    error("cannot rename " .. tmp .. ": " .. tostring(rerr), 0)
  end
  if fsync_dir then fs.sync_dir_now(fs.dirname(path)) end
end

return M
