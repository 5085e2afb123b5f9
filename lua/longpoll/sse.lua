-- Server-Sent Events: one long-lived text/event-stream response per subscriber, fed by
-- manager:follow (the engine's follow, in memory or Redis) from the (timestamp, id) cursor, so
-- a reconnect with Last-Event-ID resumes exactly where the stream stopped, on any node.
local uv = require "luv"
local core = require "longpoll.core"
local answers = require "longpoll.answers"
local subscription = require "longpoll.subscription"
local Timeouts = require "longpoll.timeouts"

local find, gsub, concat = string.find, string.gsub, table.concat

local M = {}

-- Milliseconds a browser waits before reconnecting a dropped stream (the `retry:` field).
M.RETRY_MS = 3000

local HEARTBEAT = ": heartbeat\n\n"
local MISSED = 'event: missed\ndata: {"missed":true}\n\n'

M.cursor_string = subscription.cursor_string
M.parse_cursor = subscription.parse_cursor

-- One SSE message for an event ({json=, timestamp=, id=} from the engine). JSON whitespace may
-- hold line breaks (data is kept as published); each line becomes its own data: field, which
-- the client joins with "\n". Built once per event: the engines hand every stream the same
-- item table, so the message is kept on it and 10,000 streams write one string.
local function event_message(e)
  local message = e.sse_message
  if message then return message end
  local data = e.json
  if find(data, "[\r\n]") then
    data = gsub(gsub(gsub(data, "\r\n", "\n"), "\r", "\n"), "\n", "\ndata: ")
  end
  message = "id: " .. e.timestamp .. "_" .. e.id .. "\ndata: " .. data .. "\n\n"
  e.sse_message = message
  return message
end

---------------------------------------------------------------------------------------------
-- The hub: every open stream of one manager, and the one heartbeat timer they share.

local Hub = {}
Hub.__index = Hub

function M.new(manager)
  return setmetatable({
    manager = manager,
    streams = {}, -- stream -> true while open
    starting = {}, -- stream -> true while its "from now on" time is being asked for
    open = core.new_gauge(), -- how many streams are open (read by the native stats handler)
    heartbeat_ms = manager.options.sse_heartbeat_seconds * 1000,
    timer = nil,
  }, Hub)
end

local function start_timer(self)
  if self.timer then return end
  self.timer = uv.new_timer()
  self.timer:start(self.heartbeat_ms, self.heartbeat_ms, function() self:heartbeat() end)
  -- open connections keep the loop alive; the timer alone must not
  self.timer:unref()
end

local function stop_timer(self)
  if self.timer then
    Timeouts.close_handle(self.timer)
    self.timer = nil
  end
end

-- Drops a stream: its follow ends at once; the response is left to the caller.
local function forget(self, stream)
  if stream.closed then return end
  stream.closed = true
  if stream.handle then
    self.manager:unfollow(stream.handle)
    stream.handle = nil
  end
  if self.streams[stream] then
    self.streams[stream] = nil
    self.open:add(-1)
    if self.open:get() == 0 then stop_timer(self) end
  end
end

-- How many streams are open, and the gauge that says it (core.new_gauge, for a reader in C).
function Hub:count()
  return self.open:get()
end

function Hub:gauge()
  return self.open
end

-- Writes a comment line to every stream, so proxies keep them open and dead peers show up.
function Hub:heartbeat()
  local list = {}
  for stream in pairs(self.streams) do list[#list + 1] = stream end
  for i = 1, #list do
    local stream = list[i]
    if not stream.closed and not stream.res:write(HEARTBEAT) then forget(self, stream) end
  end
end

-- Ends every stream cleanly (manager shutdown): the follows go, each response is finished.
function Hub:close()
  local list = {}
  for stream in pairs(self.streams) do list[#list + 1] = stream end
  for i = 1, #list do
    local stream = list[i]
    forget(self, stream)
    stream.res:finish()
  end
  local starting = self.starting
  self.starting = {}
  for stream in pairs(starting) do
    stream.closed = true
    answers.send_error(stream.res, 503, "manager is shut down")
  end
  stop_timer(self)
end

-- Writes a batch of events the engine handed out (before the head is out: kept for it).
local function write_batch(self, stream, list, missed)
  if stream.closed then return end
  local out = stream.pending or {}
  if missed then out[#out + 1] = MISSED end
  for i = 1, #list do out[#out + 1] = event_message(list[i]) end
  if not stream.open then
    stream.pending = out
    return
  end
  stream.pending = nil
  if #out > 0 and not stream.res:write(concat(out)) then forget(self, stream) end
end

-- Follows from the stream's cursor and starts the response; start_ts: the "from now on" time.
local function open_stream(self, stream, start_ts)
  local res = stream.res
  local handle, err = self.manager:follow(stream.categories, stream.since, stream.last_id, function(list, missed_or_why)
    if list then return write_batch(self, stream, list, missed_or_why) end
    -- the engine ended it: end the stream, the browser reconnects with its last id
    if stream.closed then return end
    self.manager:log("warn", "sse stream ended", { error = missed_or_why })
    forget(self, stream)
    stream.res:finish()
  end)
  if not handle then
    stream.closed = true
    return answers.send_error(res, 503, "cannot wait: " .. tostring(err))
  end
  stream.handle = handle
  self.streams[stream] = true
  self.open:add(1)
  start_timer(self)
  answers.start_stream(res)
  local preamble = "retry: " .. M.RETRY_MS .. "\n"
  if start_ts then preamble = preamble .. "id: " .. M.cursor_string(start_ts) .. "\n" end
  stream.open = true
  if not res:write(preamble .. "\n") then return forget(self, stream) end
  -- events the follow handed out before the head was written
  if stream.pending then write_batch(self, stream, {}, false) end
end

-- The SSE handler, as hub:handle(req, res).
function Hub:handle(req, res)
  local manager = self.manager
  if manager.closed then return answers.send_error(res, 503, "manager is shut down") end
  local sub, err = subscription.parse(req, manager.options, "stream")
  if not sub then
    manager:log("warn", "bad sse request", { error = err })
    return answers.send_error(res, 400, err)
  end
  if req.method == "HEAD" then
    answers.start_stream(res)
    return res:finish()
  end
  local stream = { categories = sub.categories, since = sub.since, last_id = sub.last_id, res = res }
  res:on_close(function()
    self.starting[stream] = nil
    forget(self, stream)
  end)
  if stream.since ~= nil then return open_stream(self, stream) end
  -- "from now on": a time that no later event reaches (as for a timeout answer), so the
  -- starting id resumes exactly, on any node
  self.starting[stream] = true
  manager:start_mark(function(ts)
    if not self.starting[stream] then return end -- the client left, or shutdown answered it
    self.starting[stream] = nil
    -- without a time (Redis away): from the node's position, without a starting id
    stream.since = ts
    open_stream(self, stream, ts)
  end)
end

return M
