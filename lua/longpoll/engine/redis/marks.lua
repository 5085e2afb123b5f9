-- Timeout marks: a timestamp T from Redis that no event published later reaches, handed out
-- only once this node has seen every event published before it. The mark script publishes a
-- marker on the node's own channel, on the same pub/sub connection as the events, so when the
-- marker arrives every earlier event has been dispatched. Requests in one loop turn share one
-- script call.
local uv = require "luv"
local Position = require "longpoll.engine.redis.position"

local Marks = {}
Marks.__index = Marks

local M = {}

-- How long a node waits for its own marker after Redis answered the mark.
M.MARKER_WAIT_MS = 2000

local function close_handle(h)
  if h and not h:is_closing() then h:close() end
end

-- link, position: of the Redis; clock_key; channel: the node's own channel; log.
function M.new(link, position, clock_key, channel, log)
  local self = setmetatable({
    link = link, position = position, clock_key = clock_key, channel = channel, log = log,
    pending = {}, batch = {}, seq = 0, closed = false,
  }, Marks)
  self.flush_timer = uv.new_timer()
  self.flush_timer:unref()
  return self
end

local function settle(log, batch, T, err)
  if batch.timer then close_handle(batch.timer) end
  for _, cb in ipairs(batch.callbacks) do
    local ok, e = pcall(cb, T, err)
    if not ok then log("error", "engine callback failed", { error = tostring(e) }) end
  end
end

-- Asks for a mark: callback(T) once the marker came back, or callback(nil, message).
function Marks:request(callback)
  if self.closed then return callback(nil, "Redis engine is closed") end
  if not self.link:is_online() then return callback(nil, "Redis is unavailable") end
  local batch = self.batch
  batch[#batch + 1] = callback
  if #batch == 1 then self.flush_timer:start(0, 0, function() self:_send() end) end
end

function Marks:_send()
  local callbacks = self.batch
  if #callbacks == 0 then return end
  self.batch = {}
  self.seq = self.seq + 1
  local token = ("%d"):format(self.seq)
  local batch = { callbacks = callbacks }
  self.pending[token] = batch
  local ok, serr = self.link:script("mark", { self.clock_key },
    { self.position:floor_arg(), self.channel, token, Position.epoch_candidate() }, function(_, err)
      if self.pending[token] ~= batch then return end -- settled already
      if err then
        self.pending[token] = nil
        self.log("warn", "timeout mark failed", { error = err })
        return settle(self.log, batch, nil, "timeout mark failed: " .. err)
      end
      -- the marker should follow at once on the pub/sub connection; if it does not, that
      -- connection is broken even if it looks open
      batch.timer = uv.new_timer()
      batch.timer:start(M.MARKER_WAIT_MS, 0, function()
        if self.pending[token] ~= batch then return end
        self.pending[token] = nil
        self.log("warn", "pub/sub marker overdue: reconnecting pub/sub", { token = token })
        settle(self.log, batch, nil, "pub/sub marker overdue")
        self.link:restart_pubsub("marker overdue")
      end)
    end)
  if not ok then
    self.pending[token] = nil
    settle(self.log, batch, nil, serr)
  end
end

-- The marker "M token epoch seq last T" arrived.
function Marks:on_marker(token, epoch, seq, last, T)
  self.position:observe(epoch, last, seq)
  self.position:handed_out(T)
  local batch = self.pending[token]
  if not batch then return end
  self.pending[token] = nil
  settle(self.log, batch, T)
end

-- Settles every mark in flight with an error (the pub/sub connection was lost).
function Marks:fail_all(why)
  local pending = self.pending
  self.pending = {}
  for _, batch in pairs(pending) do settle(self.log, batch, nil, why) end
end

-- Sends what is batched (shutdown), then refuses new requests.
function Marks:flush()
  self:_send()
end

-- Whether marks are in flight.
function Marks:busy()
  return next(self.pending) ~= nil or #self.batch > 0
end

function Marks:close(why)
  if self.closed then return end
  self.closed = true
  local batch = self.batch
  self.batch = {}
  if #batch > 0 then settle(self.log, { callbacks = batch }, nil, why) end
  self:fail_all(why)
  close_handle(self.flush_timer)
end

return M
