-- Deadlines for thousands of waiting subscribers on one luv timer. Waits
-- with the same length (whole seconds) expire in arrival order, so one FIFO
-- per length is a priority queue with O(1) insert; cancelled entries are
-- skipped lazily when they reach the front. How many are pending is a gauge in C
-- (core.new_gauge), which the native stats handler reads without entering Lua.
local uv = require "luv"
local core = require "longpoll.core"

local Timeouts = {}
Timeouts.__index = Timeouts

-- on_expire(key) is called for every key whose deadline passed and that was
-- not cancelled. The timer is unref'd: it never keeps the loop alive alone.
function Timeouts.new(on_expire)
  local self = setmetatable({
    queues = {},        -- length_ms -> { keys = {}, deadlines = {}, head = 1, tail = 0 }
    live = {},          -- key -> deadline while pending
    pending = core.new_gauge(), -- how many keys are pending
    on_expire = on_expire,
    timer = uv.new_timer(),
    armed_at = nil,     -- deadline the timer is set for
  }, Timeouts)
  self.timer:unref()
  return self
end

function Timeouts:_arm(deadline)
  if self.armed_at and self.armed_at <= deadline then return end
  self.armed_at = deadline
  local delay = deadline - uv.now()
  if delay < 0 then delay = 0 end
  self.timer:start(delay, 0, function() self:_fire() end)
end

-- Adds key with a deadline length_ms from now. A key is any value that is
-- unique among pending entries (a subscription handle).
function Timeouts:add(key, length_ms)
  local q = self.queues[length_ms]
  if not q then
    q = { keys = {}, deadlines = {}, head = 1, tail = 0 }
    self.queues[length_ms] = q
  end
  local deadline = uv.now() + length_ms
  q.tail = q.tail + 1
  q.keys[q.tail], q.deadlines[q.tail] = key, deadline
  self.live[key] = deadline
  self.pending:add(1)
  self:_arm(deadline)
end

function Timeouts:cancel(key)
  if self.live[key] then
    self.live[key] = nil
    self.pending:add(-1)
  end
end

-- How many keys are pending.
function Timeouts:count()
  return self.pending:get()
end

-- The gauge of the pending keys (core.new_gauge), for a reader in C.
function Timeouts:gauge()
  return self.pending
end

function Timeouts:_fire()
  self.armed_at = nil
  local now = uv.now()
  local next_deadline
  local expired = {}
  for length, q in pairs(self.queues) do
    local keys, deadlines = q.keys, q.deadlines
    local i = q.head
    while i <= q.tail do
      local key, deadline = keys[i], deadlines[i]
      if self.live[key] ~= deadline then
        keys[i], deadlines[i] = nil, nil -- cancelled, or re-added with another deadline
      elseif deadline <= now then
        keys[i], deadlines[i] = nil, nil
        self.live[key] = nil
        self.pending:add(-1)
        expired[#expired + 1] = key
      else
        if not next_deadline or deadline < next_deadline then next_deadline = deadline end
        break
      end
      i = i + 1
    end
    q.head = i
    if q.head > q.tail then self.queues[length] = nil end
  end
  if next_deadline then self:_arm(next_deadline) end
  -- callbacks run last: they may add or cancel entries
  for _, key in ipairs(expired) do self.on_expire(key) end
end

-- Closes a luv handle from inside the loop. Closing it directly and then
-- leaving the process without running the loop crashes luv 1.44 at exit
-- (its close callback runs on a collected handle); an unref'd handle that is
-- still open at exit is harmless.
function Timeouts.close_handle(handle)
  if handle:is_closing() then return end
  handle:unref()
  if handle.stop then handle:stop() end
  local closer = uv.new_timer()
  closer:start(0, 0, function()
    if not handle:is_closing() then handle:close() end
    closer:close()
  end)
end

function Timeouts:close()
  Timeouts.close_handle(self.timer)
  self.queues, self.live = {}, {}
  self.pending:set(0)
end

return Timeouts
