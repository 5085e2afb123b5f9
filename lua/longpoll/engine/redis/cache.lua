-- The node-local cache of one Redis's stream: every node receives every event over pub/sub, in
-- Redis's order, so it keeps the recent events of each category and answers a catch-up from
-- memory when it knows that it holds everything Redis would answer. The events and the rule
-- (which cursors it covers: a base position, hold_from per category, a node not behind the
-- client, one category with events, Redis's buffer rule so "missed" agrees, no TTL) are in C,
-- src/lp_cache.[ch] (core.new_cache); the HTTP engine answers catch-up polls from the same C
-- cache without entering Lua, and parks on it the polls with nothing after their cursor, which
-- Cache:add's event wakes in C (core.native_cached_subscription, see Cache:core_cache). This
-- wrapper logs and speaks the engine's positions ({ epoch, ts, seq } tables).
--
-- Dropped (reset) when pub/sub was lost, on a gap, on a new epoch (Redis lost its data); the
-- next sync or message sets a new base. Only without TTL (the nodes' clocks would decide
-- expiry, and they are not Redis's).
local core = require "longpoll.core"

-- The most categories one catch-up asks the C cache about (a subscription's cap); more go to Redis.
local MAX_CATEGORIES = 64

local Cache = {}
Cache.__index = Cache

local M = {}

-- store_options: max_event_buffer_size, max_category_bytes (each category's buffer),
-- max_waiting_per_category (the polls the HTTP engine parks on the cache, per category);
-- max_categories: how many categories it keeps at most (0: no limit; the others go to Redis).
function M.new(store_options, log, max_categories)
  return setmetatable({ log = log, c = core.new_cache {
    max_event_buffer_size = store_options.max_event_buffer_size,
    max_category_bytes = store_options.max_category_bytes,
    max_waiting_per_category = store_options.max_waiting_per_category or 0,
    max_categories = max_categories or 0,
  } }, Cache)
end

-- Drops everything; the cache answers nothing until start(). why: logged and counted.
function Cache:reset(why)
  self.c:reset(why ~= nil)
  if why then self.log("info", "local cache dropped", { reason = why }) end
end

-- From position pos ({epoch, ts, seq}) on, every event reaches the cache.
function Cache:start(pos)
  local ok, err = self.c:start(pos.epoch, pos.ts, pos.seq)
  if not ok then self.log("warn", "local cache not started", { error = err }) end
end

-- An event from pub/sub, in Redis's order: ev = { epoch, ts, seq, category, id, data_json }.
function Cache:add(ev)
  local ok, err = self.c:add(ev.epoch, ev.ts, ev.seq, ev.category, ev.id, ev.data_json)
  -- a category the cache cannot hold goes to Redis until the next reset
  if not ok then self.log("warn", "local cache: event refused", { category = ev.category, error = err }) end
end

-- How many polls the HTTP engine parks on category now (max_waiting_per_category counts them
-- with the engine's own waiters).
function Cache:parked_in(category)
  return self.c:parked_in(category)
end

-- The answer to a catch-up from the cache: "events", body | "wait", cursor (nothing after the
-- cursor: wait from cursor, a position) | nil (ask Redis).
function Cache:answer(categories, since, last_id)
  if since == nil or #categories > MAX_CATEGORIES then return nil end
  local kind, x, ts, seq = self.c:answer(categories, since, last_id)
  if kind == "wait" then return "wait", { epoch = x, ts = ts, seq = seq } end
  return kind, x
end

-- A read of one category from Redis answered: cursor (since, last_id), its events (oldest first,
-- { ts, id, data_json }), missed, and the position pos Redis was at. When the cache has nothing
-- of the category yet, it now holds what Redis holds after the cursor.
function Cache:warm(category, since, events, missed, pos)
  self.c:warm(category, since, events, missed, pos.epoch, pos.ts, pos.seq)
end

function Cache:stats()
  return self.c:stats()
end

-- The C cache (longpoll.core), for the HTTP engine's native handler, which answers from it what
-- answer() would answer with events, and parks on it the polls answer() would make wait (a
-- reset, close included, answers them).
function Cache:core_cache()
  return self.c
end

function Cache:close()
  self.c:reset(false)
end

return M
