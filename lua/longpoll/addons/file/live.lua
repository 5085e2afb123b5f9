-- The file add-on's index of live events: which events the store still holds, as far as
-- the file can tell (at most max_event_buffer_size per category, none past the TTL, at
-- most max_events in all). Compaction keeps exactly these lines.
local Live = {}
Live.__index = Live

local function new_queue() return { first = 1, last = 0, n = 0 } end

-- Live.new(buffer_size, ttl_ms (0: forever), max_events|nil)
function Live.new(buffer_size, ttl_ms, max_events)
  return setmetatable({
    buffer_size = buffer_size, ttl_ms = ttl_ms, max_events = max_events,
    by_id = {}, count = 0,
    order = new_queue(), dead_in_order = 0, -- every entry in publish order, dead ones until popped
    categories = {}, -- category -> queue of its live entries, oldest first
  }, Live)
end

-- The oldest live entry (dropping dead ones from the head of the order).
local function oldest(self)
  local o = self.order
  for _ = o.first, o.last do
    local e = o[o.first]
    if not e.dead then return e end
    o[o.first] = nil
    o.first = o.first + 1
    self.dead_in_order = self.dead_in_order - 1
  end
end

-- Kills e, which is always the oldest live entry of its category: evicted by
-- the buffer size, or the oldest of all (TTL, max_events).
local function kill(self, e)
  e.dead = true
  self.by_id[e.id] = nil
  self.count = self.count - 1
  self.dead_in_order = self.dead_in_order + 1
  local q = self.categories[e.category]
  q[q.first] = nil
  q.first = q.first + 1
  q.n = q.n - 1
  if q.n == 0 then self.categories[e.category] = nil end
end

local function rebuild_order(self)
  local o, fresh = self.order, new_queue()
  for i = o.first, o.last do
    local e = o[i]
    if not e.dead then
      fresh.last = fresh.last + 1
      fresh[fresh.last] = e
    end
  end
  self.order, self.dead_in_order = fresh, 0
end

-- Adds an event; returns its entry (entry.dead turns true once it is no longer live).
function Live:add(id, ts, category)
  if self.by_id[id] then return self.by_id[id] end
  local e = { id = id, ts = ts, category = category }
  self.by_id[id] = e
  self.count = self.count + 1
  local o = self.order
  o.last = o.last + 1
  o[o.last] = e
  local q = self.categories[category]
  if not q then
    q = new_queue()
    self.categories[category] = q
  end
  q.last = q.last + 1
  q[q.last] = e
  q.n = q.n + 1
  if q.n > self.buffer_size then kill(self, q[q.first]) end
  if self.max_events and self.count > self.max_events then kill(self, oldest(self)) end
  -- evictions leave dead entries inside the order; sweep them before they outnumber the living
  if self.dead_in_order > self.count + 1024 then rebuild_order(self) end
  return e
end

-- Drops the entries past the TTL at time now (epoch ms).
function Live:expire(now)
  if self.ttl_ms == 0 then return end
  for _ = 1, self.count do
    local e = oldest(self)
    if not e or now - e.ts < self.ttl_ms then return end
    kill(self, e)
  end
end

function Live:holds(id, now)
  local e = self.by_id[id]
  return e ~= nil and (self.ttl_ms == 0 or now - e.ts < self.ttl_ms)
end

return Live
