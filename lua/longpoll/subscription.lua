-- Reads a subscription from a request: categories, the (since_time, last_id) cursor and, for a
-- long poll, the timeout. One parser for long polls and SSE streams, with golongpoll's messages.
local core = require "longpoll.core"

local match = string.match

local M = {}

-- As Go's strconv.ParseInt(s, 10, 64): an optional sign, digits, within int64 (Lua reads a
-- decimal integer out of range as a float, which is refused here).
local function parse_int64(s)
  local n = match(s, "^[+-]?%d+$") and tonumber(s)
  return math.type(n) == "integer" and n or nil
end

-- The SSE id of an event: "<timestamp>_<id>", enough to resume right after it.
function M.cursor_string(timestamp, id)
  return id and (("%d_%s"):format(timestamp, id)) or ("%d"):format(timestamp)
end

-- Parses "<timestamp>_<uuid>" or "<timestamp>" into since, last_id; nil when malformed.
function M.parse_cursor(s)
  if type(s) ~= "string" then return nil end
  local ts, id = match(s, "^([+-]?%d+)_(.+)$")
  if not ts then ts = s end
  local since = parse_int64(ts)
  if not since then return nil end
  if id and not core.is_uuid(id) then return nil end
  return since, id
end

local function check_categories(categories, o)
  local bad = ("Invalid subscription category, must be 1-%d characters long."):format(o.max_category_bytes)
  if #categories == 0 then return nil, bad end
  if #categories > o.max_categories_per_subscription then
    return nil, ("Too many categories: at most %d per subscription."):format(o.max_categories_per_subscription)
  end
  for _, c in ipairs(categories) do
    if #c == 0 or #c > o.max_category_bytes then return nil, bad end
    if not core.utf8_valid(c) then return nil, "Invalid subscription category, must be valid UTF-8." end
  end
  return true
end

-- The query's cursor. An empty value counts as absent, as in golongpoll (its JS client sends
-- `last_id=`).
local function query_cursor(req)
  local since = req.query.since_time
  if since == "" then since = nil end
  if since ~= nil then
    since = parse_int64(since)
    if not since then return nil, "Invalid 'since_time' arg." end
  end
  local last_id = req.query.last_id
  if last_id == "" then last_id = nil end
  if last_id ~= nil then
    if since == nil then return nil, "Must provide 'since_time' arg when providing 'last_id'." end
    if not core.is_uuid(last_id) then return nil, "Param 'last_id' was not a valid UUID." end
  end
  return { since = since, last_id = last_id and last_id:lower() }
end

-- subscription.parse(req, options, kind) -> { categories = {...}, since =, last_id =,
--   timeout_ms = } | nil, message.
-- kind "poll": a long poll, `timeout` (1..max_longpoll_timeout_seconds) required.
-- kind "stream": an SSE stream; the cursor comes from Last-Event-ID (a browser's reconnect),
-- else last_event_id, else since_time (+ last_id); with none the stream starts at the present.
function M.parse(req, o, kind)
  local sub = {}
  if kind == "poll" then
    local timeout = req.query.timeout
    timeout = timeout and tonumber(match(timeout, "^%+?(%d+)$"))
    if not timeout or timeout < 1 or timeout > o.max_longpoll_timeout_seconds then
      return nil, ("Invalid or missing 'timeout' arg.  Must be 1-%d."):format(o.max_longpoll_timeout_seconds)
    end
    sub.timeout_ms = timeout * 1000
  end
  local categories = req:query_all("category")
  local ok, err = check_categories(categories, o)
  if not ok then return nil, err end
  sub.categories = categories
  if kind == "stream" then
    local header_id = req.headers["last-event-id"]
    local resume = (header_id ~= nil and header_id ~= "") and header_id or req.query.last_event_id
    if resume ~= nil and resume ~= "" then
      local since, last_id = M.parse_cursor(resume)
      if not since then
        return nil, "Invalid 'Last-Event-ID': must be an id this server sent (<timestamp>_<id>)."
      end
      sub.since, sub.last_id = since, last_id and last_id:lower()
      return sub
    end
  end
  local cursor, cerr = query_cursor(req)
  if not cursor then return nil, cerr end
  sub.since, sub.last_id = cursor.since, cursor.last_id
  return sub
end

return M
