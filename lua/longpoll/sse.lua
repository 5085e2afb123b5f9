-- Server-Sent Events on the manager's buffers: one long-lived text/event-stream response per
-- subscriber, fed by manager:watch and the store's (timestamp, id) cursor (in Redis mode by the
-- engine's follow), so a reconnect with Last-Event-ID resumes exactly where the stream stopped.
local uv = require "luv"
local core = require "longpoll.core"
local Timeouts = require "longpoll.timeouts"

local find, sub, byte, match, gsub, concat = string.find, string.sub, string.byte, string.match,
  string.gsub, table.concat

local M = {}

-- Milliseconds a browser waits before reconnecting a dropped stream (the `retry:` field).
M.RETRY_MS = 3000

local STREAM_HEADERS = {
  { "Content-Type", "text/event-stream" },
  { "Cache-Control", "no-cache, no-store, must-revalidate" },
  { "Pragma", "no-cache" },
  { "Expires", "0" },
  { "X-Content-Type-Options", "nosniff" },
  -- nginx buffers proxied answers by default, which would hold events back
  { "X-Accel-Buffering", "no" },
}

local HEARTBEAT = ": heartbeat\n\n"
local MISSED = 'event: missed\ndata: {"missed":true}\n\n'
local EVENTS_PREFIX = '{"events":['

local function now_ms()
  local sec, usec = uv.gettimeofday()
  return sec * 1000 + usec // 1000
end

local QUOTE, BACKSLASH, LBRACE, LBRACKET = 34, 92, 123, 91

-- Splits a fetch answer ({"events":[E1,E2,...]...}) into the events' JSON texts without
-- decoding them: data is returned as published, every digit and character kept.
function M.split_events(body)
  local out = {}
  local depth, start = 0, nil
  local i = #EVENTS_PREFIX + 1
  -- Each pass moves past one structural character or one string, so it ends at the array's ']'.
  while true do
    local s = find(body, '[{}%[%]"]', i)
    if not s then break end
    local c = byte(body, s)
    if c == QUOTE then
      local j = s + 1
      while true do
        local q = find(body, '["\\]', j)
        if not q then return out end
        if byte(body, q) == BACKSLASH then
          j = q + 2
        else
          i = q + 1
          break
        end
      end
    elseif c == LBRACE or c == LBRACKET then
      if depth == 0 then start = s end
      depth = depth + 1
      i = s + 1
    else -- "}" or "]"
      if depth == 0 then break end -- the end of the events array
      depth = depth - 1
      if depth == 0 then out[#out + 1] = sub(body, start, s) end
      i = s + 1
    end
  end
  return out
end

-- The SSE id of an event: "<timestamp>_<id>", enough to resume right after it.
function M.cursor_string(timestamp, id)
  return id and (("%d_%s"):format(timestamp, id)) or ("%d"):format(timestamp)
end

-- Parses "<timestamp>_<uuid>" or "<timestamp>" into since, last_id; nil when malformed.
function M.parse_cursor(s)
  if type(s) ~= "string" then return nil end
  local ts, id = match(s, "^(%-?%d+)_(.+)$")
  if not ts then ts = match(s, "^(%-?%d+)$") end
  local since = ts and math.tointeger(tonumber(ts))
  if not since then return nil end
  if id and not core.is_uuid(id) then return nil end
  return since, id
end

-- One SSE message for an event's JSON text. JSON whitespace may hold line breaks (data is kept
-- as published); each line becomes its own data: field, which the client joins with "\n".
local function event_message(json)
  local ts = match(json, '^{"timestamp":(%-?%d+)')
  local id = match(json, '"id":"([^"]+)"}$')
  local data = json
  if find(json, "[\r\n]") then
    data = gsub(gsub(gsub(json, "\r\n", "\n"), "\r", "\n"), "\n", "\ndata: ")
  end
  return "id: " .. ts .. "_" .. id .. "\ndata: " .. data .. "\n\n", math.tointeger(tonumber(ts)), id
end

local function send_error(res, status, message)
  res:set_header("Content-Type", "application/json")
  res:set_header("Cache-Control", "no-cache, no-store, must-revalidate")
  res:set_header("Pragma", "no-cache")
  res:set_header("Expires", "0")
  res:set_header("X-Content-Type-Options", "nosniff")
  return res:send(status, '{"error":' .. core.json_string(message) .. "}")
end

---------------------------------------------------------------------------------------------
-- The hub: every open stream of one manager, and the one heartbeat timer they share.

local Hub = {}
Hub.__index = Hub

function M.new(manager)
  return setmetatable({
    manager = manager,
    streams = {}, -- stream -> true while open
    starting = {}, -- Redis mode: stream -> true while its starting time is asked of Redis
    count = 0,
    -- woken events that the fetch after the wake handed out again: the store counted them as
    -- delivered twice (once for the wake), and the stats endpoint takes them off
    refetched = 0,
    heartbeat_ms = manager.options.sse_heartbeat_seconds * 1000,
    timer = nil,
  }, Hub)
end

function Hub:_start_timer()
  if self.timer then return end
  self.timer = uv.new_timer()
  self.timer:start(self.heartbeat_ms, self.heartbeat_ms, function() self:_heartbeat() end)
  -- open connections keep the loop alive; the timer alone must not
  self.timer:unref()
end

function Hub:_stop_timer()
  if self.timer then
    Timeouts.close_handle(self.timer)
    self.timer = nil
  end
end

function Hub:_heartbeat()
  local list = {}
  for stream in pairs(self.streams) do list[#list + 1] = stream end
  for i = 1, #list do
    local stream = list[i]
    if not stream.closed and not stream.res:write(HEARTBEAT) then self:_forget(stream) end
  end
end

-- Drops a stream: its watch is cancelled at once; the response is left to the caller.
function Hub:_forget(stream)
  if stream.closed then return end
  stream.closed = true
  if stream.handle then
    self.manager:unwatch(stream.handle)
    stream.handle = nil
  end
  if self.streams[stream] then
    self.streams[stream] = nil
    self.count = self.count - 1
    if self.count == 0 then self:_stop_timer() end
  end
end

-- Ends every stream cleanly (manager shutdown): the watches go, each response is finished.
function Hub:close()
  local list = {}
  for stream in pairs(self.streams) do list[#list + 1] = stream end
  for i = 1, #list do
    local stream = list[i]
    self:_forget(stream)
    stream.res:finish()
  end
  local starting = self.starting
  self.starting = {}
  for stream in pairs(starting) do
    stream.closed = true
    send_error(stream.res, 503, "manager is shut down")
  end
  self:_stop_timer()
end

-- Fetches what follows the stream's cursor and writes it; woken is the event that woke the
-- stream (it is not buffered when delete_event_after_first_retrieval handed it out already).
-- Then watches again (unless still watching). Everything here runs without yielding, so no publish can fall between
-- the fetch and the new watch.
function Hub:_pump(stream, woken)
  local manager = self.manager
  local out = {}
  local body, count, missed = manager.store:fetch(stream.categories, stream.since, stream.last_id,
    now_ms())
  if body == nil and count == nil then
    -- cannot happen for checked categories; end the stream rather than loop
    self:_forget(stream)
    stream.res:finish()
    return
  end
  if missed then out[#out + 1] = MISSED end
  if body then
    local events = M.split_events(body)
    for i = 1, #events do
      local message, ts, id = event_message(events[i])
      out[#out + 1] = message
      stream.since, stream.last_id = ts, id
      if woken and id == woken.id then self.refetched = self.refetched + 1 end
    end
  end
  -- the woken event is newer than anything sent: the watch began after the last fetch
  if woken and woken.id ~= stream.last_id then
    out[#out + 1] = (event_message(woken.json))
    stream.since, stream.last_id = woken.timestamp, woken.id
  end
  if #out > 0 and not stream.res:write(concat(out)) then
    self:_forget(stream)
    return
  end
  if stream.closed or stream.handle then return end
  local handle, err = manager:watch(stream.categories, stream.on_event)
  if not handle then
    manager:_log("warn", "sse stream ended: cannot watch", { error = err })
    self:_forget(stream)
    stream.res:finish()
    return
  end
  stream.handle = handle
end

-- Reads categories and the starting cursor from the request. Returns a table or nil, message.
-- The cursor comes from Last-Event-ID (a browser's reconnect), else last_event_id, else
-- since_time (+ last_id); with none the stream starts at the present.
function Hub:_parse(req)
  local o = self.manager.options
  local categories = req:query_all("category")
  local bad_category = ("Invalid subscription category, must be 1-%d characters long."):format(o.max_category_bytes)
  if #categories == 0 then return nil, bad_category end
  if #categories > o.max_categories_per_subscription then
    return nil, ("Too many categories: at most %d per subscription."):format(o.max_categories_per_subscription)
  end
  for _, c in ipairs(categories) do
    if #c == 0 or #c > o.max_category_bytes then return nil, bad_category end
    if not core.utf8_valid(c) then return nil, "Invalid subscription category, must be valid UTF-8." end
  end
  local sub_ = { categories = #categories == 1 and categories[1] or categories }
  local header_id = req.headers["last-event-id"]
  local resume = (header_id ~= nil and header_id ~= "") and header_id or req.query.last_event_id
  if resume ~= nil then
    local since, last_id = M.parse_cursor(resume)
    if not since then
      return nil, "Invalid 'Last-Event-ID': must be an id this server sent (<timestamp>_<id>)."
    end
    sub_.since, sub_.last_id = since, last_id
    return sub_
  end
  local since = req.query.since_time
  if since ~= nil then
    since = match(since, "^%-?%d+$") and math.tointeger(tonumber(since))
    if not since then return nil, "Invalid 'since_time' arg." end
  end
  local last_id = req.query.last_id
  if last_id ~= nil then
    if since == nil then return nil, "Must provide 'since_time' arg when providing 'last_id'." end
    if not core.is_uuid(last_id) then return nil, "Param 'last_id' was not a valid UUID." end
  end
  sub_.since, sub_.last_id = since, last_id
  return sub_
end

---------------------------------------------------------------------------------------------
-- Redis mode: the events live in Redis, and the engine's follow feeds a stream: one read from
-- its cursor on whichever node the client reached, then live events by pub/sub, each once, the
-- engine keeping the cursor; after a pub/sub gap or an outage it reads again from there. While
-- Redis is away a stream stays open (heartbeats go on) and gets what was missed once it is back.

-- Writes a batch of events the engine handed out.
function Hub:_write_batch(stream, jsons, missed)
  if stream.closed then return end
  local out = {}
  if missed then out[1] = MISSED end
  for i = 1, #jsons do
    local message, ts, id = event_message(jsons[i])
    out[#out + 1] = message
    stream.since, stream.last_id = ts, id
  end
  if not stream.res:write(concat(out)) then self:_forget(stream) end
end

-- Follows from the stream's cursor and starts the response; start_id: the "from now on" time.
function Hub:_open_followed(stream, start_id)
  local res = stream.res
  local handle, err = self.manager.engine:follow(stream.categories, stream.since, stream.last_id,
    function(jsons, missed_or_why)
      if jsons then return self:_write_batch(stream, jsons, missed_or_why) end
      -- the engine gave up on it: end the stream, the browser reconnects with its last id
      if stream.closed then return end
      self.manager:_log("warn", "sse stream ended", { error = missed_or_why })
      self:_forget(stream)
      stream.res:finish()
    end)
  if not handle then
    stream.closed = true
    return send_error(res, 503, "cannot wait: " .. tostring(err))
  end
  stream.handle = handle
  self.streams[stream] = true
  self.count = self.count + 1
  self:_start_timer()
  for i = 1, #STREAM_HEADERS do res:set_header(STREAM_HEADERS[i][1], STREAM_HEADERS[i][2]) end
  res:write_head(200)
  local preamble = "retry: " .. M.RETRY_MS .. "\n"
  if start_id then preamble = preamble .. "id: " .. M.cursor_string(start_id) .. "\n" end
  if not res:write(preamble .. "\n") then self:_forget(stream) end
end

function Hub:_handle_redis(stream, res)
  stream.res = res
  res:on_close(function()
    self.starting[stream] = nil
    self:_forget(stream)
  end)
  if stream.since ~= nil then return self:_open_followed(stream) end
  -- "from now on": Redis issues a time that no later event reaches (as for a timeout answer),
  -- so the starting id resumes exactly, on any node
  self.starting[stream] = true
  local ok = self.manager.engine:mark_time(function(T)
    if not self.starting[stream] then return end -- the client left, or shutdown answered it
    self.starting[stream] = nil
    stream.since = T
    self:_open_followed(stream, T)
  end)
  if not ok then
    -- no Redis now: from the node's position, without a starting id (none would be exact)
    self.starting[stream] = nil
    self:_open_followed(stream)
  end
end

-- The SSE handler: function(req, res).
function Hub:handle(req, res)
  local manager = self.manager
  if manager.closed then return send_error(res, 503, "manager is shut down") end
  local stream, err = self:_parse(req)
  if not stream then
    manager:_log("warn", "bad sse request", { error = err })
    return send_error(res, 400, err)
  end
  if req.method == "HEAD" then
    for i = 1, #STREAM_HEADERS do res:set_header(STREAM_HEADERS[i][1], STREAM_HEADERS[i][2]) end
    res:write_head(200)
    return res:finish()
  end
  if manager.engine then return self:_handle_redis(stream, res) end
  local preamble = "retry: " .. M.RETRY_MS .. "\n"
  if stream.since == nil then
    -- "from now on"; the id lets a browser that reconnects before any event resume from here
    stream.since = manager.store:mark_time(now_ms())
    preamble = preamble .. "id: " .. M.cursor_string(stream.since) .. "\n"
  end
  stream.res = res
  stream.on_event = function(event)
    stream.handle = nil
    if not stream.closed then self:_pump(stream, event) end
  end
  local handle, werr = manager:watch(stream.categories, stream.on_event)
  if not handle then return send_error(res, 503, "cannot wait: " .. tostring(werr)) end
  stream.handle = handle
  self.streams[stream] = true
  self.count = self.count + 1
  self:_start_timer()
  res:on_close(function() self:_forget(stream) end)
  for i = 1, #STREAM_HEADERS do res:set_header(STREAM_HEADERS[i][1], STREAM_HEADERS[i][2]) end
  res:write_head(200)
  if not res:write(preamble .. "\n") then return self:_forget(stream) end
  -- events already buffered after the cursor go out at once; the watch stays as it is
  self:_pump(stream, nil)
end

-- Attaches the hub to a manager; returns the handler, a plain function(req, res).
function M.attach(manager)
  local hub = M.new(manager)
  manager.sse = hub
  return function(req, res) return hub:handle(req, res) end
end

return M
