-- The node-local cache of one Redis's stream: every node receives every event over pub/sub, in
-- Redis's order, so it keeps the recent events of each category in a C store and answers a
-- catch-up from memory when it knows that it holds everything Redis would answer.
--
-- What it knows: from a base position on (set when pub/sub is known to deliver everything: the
-- sync after (re)connecting, or the message after a gap), every event reached it. So for every
-- category the cache holds each event stamped `hold_from` or later, where `hold_from` is the
-- base's timestamp + 1, or earlier for a category warmed by a read from Redis (a read of one
-- category that found no drop after its cursor, made when the cache had nothing of it). A
-- cursor (since_time, last_id) is answered from here when the events it asks for all lie in
-- that range; the buffer rule is the same as Redis's (the newest max_event_buffer_size), so the
-- "missed" flag agrees too. And the node must not be behind the client: the client's cursor
-- must come before the last message this node received (or be that message's millisecond with
-- a last_id the node has seen in it), else the node may lack what the client saw on another
-- node. Anything else goes to Redis.
--
-- Dropped (reset) when pub/sub was lost, on a gap, on a new epoch (Redis lost its data); the
-- next sync or message sets a new base. Only without TTL (the nodes' clocks would decide
-- expiry, and they are not Redis's).
local core = require "longpoll.core"
local Position = require "longpoll.engine.redis.position"

local after = Position.after

local Cache = {}
Cache.__index = Cache

local M = {}

-- store_options: for each category's core store (max_event_buffer_size, max_category_bytes);
-- max_categories: how many categories it keeps at most (0: no limit; the others go to Redis).
function M.new(store_options, log, max_categories)
  return setmetatable({ store_options = store_options, log = log, max_categories = max_categories or 0,
    entries = {}, valid = false,
    hits = 0, waits = 0, misses = 0, warmed = 0, resets = 0, categories = 0 }, Cache)
end

local function before_or_same(a, b) -- position a is not after position b (same epoch)
  return a.epoch == b.epoch and not after(b, a)
end

-- Drops everything; the cache answers nothing until start().
function Cache:reset(why)
  for _, e in pairs(self.entries) do
    if e.store then e.store:close() end
  end
  self.entries, self.categories, self.valid, self.base = {}, 0, false, nil
  if why then
    self.resets = self.resets + 1
    self.log("info", "local cache dropped", { reason = why })
  end
end

-- From position pos ({epoch, ts, seq}) on, every event reaches the cache.
function Cache:start(pos)
  self:reset()
  self.valid = true
  self.base = { epoch = pos.epoch, ts = pos.ts, seq = pos.seq }
  self.last = self.base
  self.last_ms_ids = {} -- ids of the messages stamped last.ts
  -- a Redis that never held an event (in this epoch): everything ever published reaches it
  self.base_from = pos.seq == 0 and math.mininteger or pos.ts + 1
end

function Cache:_entry(category, hold_from, last)
  if self.max_categories > 0 and self.categories >= self.max_categories then
    -- full: this category is answered by Redis until the next reset
    self.entries[category] = { full = true, hold_from = math.maxinteger, last = last }
    return nil
  end
  local store, err = core.new_store(self.store_options)
  if not store then
    self.log("warn", "local cache: no store", { error = err })
    return nil
  end
  local e = { store = store, hold_from = hold_from, last = last }
  self.entries[category] = e
  self.categories = self.categories + 1
  return e
end

-- An event from pub/sub, in Redis's order: ev = { epoch, ts, seq, category, id, data_json }.
function Cache:add(ev)
  if not self.valid then return end
  if after(self.last, ev) then
    if ev.ts > self.last.ts then self.last_ms_ids = {} end
    self.last = { epoch = ev.epoch, ts = ev.ts, seq = ev.seq }
  end
  if ev.ts == self.last.ts then self.last_ms_ids[ev.id] = true end
  local e = self.entries[ev.category]
  if e and (e.full or not after(e.last, ev)) then return end -- not kept, or a read put it here already
  e = e or self:_entry(ev.category, self.base_from, self.base)
  if not e then return end
  local ok, err = e.store:restore(ev.category, ev.data_json, ev.id, ev.ts)
  if not ok then
    -- a category the cache cannot hold: it goes to Redis until the next reset
    self.log("warn", "local cache: event refused", { category = ev.category, error = err })
    e.hold_from = math.maxinteger
  end
  e.last = { epoch = ev.epoch, ts = ev.ts, seq = ev.seq }
end

-- Whether the cache holds every event the cursor asks for in category.
function Cache:_covers(category, since, last_id)
  local e = self.entries[category]
  local hold_from = e and e.hold_from or self.base_from
  -- with last_id, events stamped since itself may be asked for; without, those after it
  if last_id or hold_from == math.mininteger then return since >= hold_from end
  return since >= hold_from - 1
end

-- The answer to a catch-up from the cache: "events", body | "wait", cursor (nothing after the
-- cursor: wait from cursor, a position) | nil (ask Redis).
function Cache:answer(categories, since, last_id)
  if not self.valid or since == nil then return nil end
  local last = self.last
  if since > last.ts or (since == last.ts and not (last_id and self.last_ms_ids[last_id])) then
    self.misses = self.misses + 1 -- the client may have seen more than this node has yet
    return nil
  end
  for i = 1, #categories do
    if not self:_covers(categories[i], since, last_id) then
      self.misses = self.misses + 1
      return nil
    end
  end
  local cursor = self.last
  local with_events
  for i = 1, #categories do
    local e = self.entries[categories[i]]
    if e then
      if after(cursor, e.last) then cursor = e.last end
      local body, count = e.store:fetch(categories[i], since, last_id, 0)
      if body then
        if with_events then -- events in two categories: their one order is Redis's to tell
          self.misses = self.misses + 1
          return nil
        end
        with_events = body
      elseif type(count) == "string" then
        return nil
      end
    end
  end
  if with_events then
    self.hits = self.hits + 1
    return "events", with_events
  end
  self.waits = self.waits + 1
  return "wait", { epoch = cursor.epoch, ts = cursor.ts, seq = cursor.seq }
end

-- A read of one category from Redis answered: cursor (since, last_id), its events (oldest first,
-- { ts, id, data_json }), missed, and the position pos Redis was at. When the cache has nothing
-- of the category yet, it now holds what Redis holds after the cursor.
function Cache:warm(category, since, events, missed, pos)
  if not self.valid or missed or self.entries[category] or not before_or_same(self.base, pos) then return end
  local e = self:_entry(category, since < 0 and math.mininteger or since + 1, pos)
  if not e then return end
  for _, ev in ipairs(events) do
    local ok = e.store:restore(category, ev.data_json, ev.id, ev.ts)
    if not ok then
      e.hold_from = math.maxinteger
      break
    end
  end
  self.warmed = self.warmed + 1
end

function Cache:stats()
  return { cache_valid = self.valid, cache_categories = self.categories, cache_hits = self.hits,
    cache_waits = self.waits, cache_misses = self.misses, cache_warmed = self.warmed, cache_resets = self.resets }
end

function Cache:close()
  self:reset()
end

return M
