-- The Redis engine: several longpoll servers share categories through Redis. Events live in
-- Redis streams (engine/redis/scripts.lua), every node keeps one pub/sub connection per Redis
-- that wakes its own waiting subscribers, and a local C store only indexes who waits on what.
-- It implements the engine interface (docs/architecture.md, "The engine interface"); the parts
-- are in engine/redis/: shard (one Redis), link (its connections, Sentinel), waiters (cursors,
-- reads, delivery), marks (timeout timestamps), position (Redis's sequence as this node knows
-- it), cache (the node's copy of the stream), scripts, config, connection.
-- docs/scaling.md tells the whole story.
local core = require "longpoll.core"
local config = require "longpoll.engine.redis.config"
local Position = require "longpoll.engine.redis.position"
local Shard = require "longpoll.engine.redis.shard"
local idempotency = require "longpoll.idempotency"
local category_rules = require "longpoll.category_rules"

local Engine = {}
Engine.__index = Engine

local M = {}

local function noop() end

-- Per-category rules: the limits of this many categories are kept; past it the cache starts
-- afresh (category_options is then asked again).
local LIMITS_CACHE_SIZE = 10000

-- The per-category limits function of the shards (nil without rules): the resolver's answer,
-- cached per category, so rules are matched once per category and not per publish.
local function cached_limits(options, log)
  local resolve = category_rules.resolver(options, log)
  if not resolve then return nil end
  local cache, cached = {}, 0
  return function(category)
    local l = cache[category]
    if l then return l end
    if cached >= LIMITS_CACHE_SIZE then cache, cached = {}, 0 end
    l = resolve(category)
    cache[category] = l
    cached = cached + 1
    return l
  end
end

-- require("longpoll.engine.redis").new(options, host) -> engine | nil, message
-- options: the manager's checked options with options.redis and options.ttl_ms;
-- host = { log = function(level, message, fields), on_event = function(event) (optional) }.
-- Blocks at most connect_timeout_ms to check Redis once.
function M.new(options, host)
  local log = host.log or noop
  local on_event = host.on_event
  local self = setmetatable({ log = log, closed = false, shards = {},
    -- idempotent publish: the keys live in Redis (the publish script); this node only knows
    -- which of its own publishes are in flight
    idempotency = { window_ms = idempotency.window_ms(options, options.ttl_ms),
      max_keys = options.idempotency_max_keys or idempotency.DEFAULT_MAX_KEYS,
      in_flight = {}, in_flight_count = 0, replays = 0, conflicts = 0 },
    published = 0, -- this node's events Redis stored (stats, the dashboard)
  }, Engine)
  self.store = core.new_store {
    max_event_buffer_size = 1,
    max_category_bytes = options.max_category_bytes,
    max_categories = options.max_categories,
    max_waiting_per_category = options.max_waiting_per_category,
  }
  local host_event = noop
  if on_event then
    host_event = function(ev)
      local event = { id = ev.id, timestamp = ev.ts, category = ev.category, data_json = ev.data_json, json = ev.json }
      local ok, herr = pcall(on_event, event)
      if not ok then log("error", "on_event failed", { error = tostring(herr) }) end
    end
  end
  local limits_of = cached_limits(options, log)
  local node_id = Position.epoch_candidate()
  for i, cfg in ipairs(config.resolve(options.redis)) do
    local shard, err = Shard.new {
      cfg = cfg, prefix = cfg.prefix, node_id = node_id, store = self.store, ttl_ms = options.ttl_ms or 0,
      max_event_buffer_size = options.max_event_buffer_size, max_category_bytes = options.max_category_bytes,
      max_categories = options.max_categories, max_waiting_per_category = options.max_waiting_per_category,
      limits_of = limits_of, log = log, on_event = host_event,
    }
    if not shard then
      for _, s in ipairs(self.shards) do s:close(noop) end
      self.store:close()
      return nil, err
    end
    self.shards[i] = shard
  end
  return self
end

-- The part of a category that picks its shard: the text inside its first {...} when there is
-- such a non-empty tag (as Redis Cluster's hash tags: "{room7}.chat" and "{room7}.typing" live
-- together), otherwise the whole name.
local function hash_tag(category)
  local tag = category:match("^[^{]*{([^}]+)}")
  return tag or category
end

-- FNV-1a, 32 bits: stable across nodes and versions.
local function fnv1a(s)
  local h = 2166136261
  for i = 1, #s do
    h = ((h ~ s:byte(i)) * 16777619) & 0xffffffff
  end
  return h
end

-- The shard (1..n) of a category among n.
function M.shard_index(category, n)
  return fnv1a(hash_tag(category)) % n + 1
end

-- The shard that holds category.
function Engine:_shard_of(category)
  local shards = self.shards
  if #shards == 1 then return shards[1] end
  return shards[M.shard_index(category, #shards)]
end

-- The one shard that holds every category of the list, or nil, message.
function Engine:_shard_of_all(categories)
  local shard = self:_shard_of(categories[1])
  for i = 2, #categories do
    if self:_shard_of(categories[i]) ~= shard then
      return nil, ("categories %q and %q live on different Redis shards: subscribe to them separately,"
        .. " or give them one hash tag ({tag})"):format(categories[1], categories[i])
    end
  end
  return shard
end

-- engine:publish(category, data_json, callback[, data[, opts]]) -> true | nil, message, code
-- data: the publisher's Lua value, handed back as event.data.
-- opts.idempotency_key (with opts.fingerprint): the key is looked up and set in the publish
-- script, atomically with the event (any node sees it); callback(nil, message, code, prior)
-- for a key seen before (EREPLAY with prior = { id =, timestamp = }, EKEYMISMATCH), and
-- EKEYBUSY at once while this node's own publish with the key is in flight.
function Engine:publish(category, data_json, callback, data, opts)
  if self.closed then return nil, "manager is shut down", "ECLOSED" end
  if not core.utf8_valid(category) then return nil, "category is not valid UTF-8", "EINVAL" end
  local shard = self:_shard_of(category)
  if not shard:can_publish() then return nil, "Redis is unavailable", "EUNAVAILABLE" end
  local idem = self.idempotency
  local key = opts and opts.idempotency_key
  local key_args
  if key then
    if idem.in_flight[key] then return nil, idempotency.BUSY_MESSAGE, idempotency.BUSY end
    key_args = { key = key, fingerprint = opts.fingerprint, window_ms = idem.window_ms, max_keys = idem.max_keys }
    idem.in_flight[key] = true
    idem.in_flight_count = idem.in_flight_count + 1
  end
  local id = core.uuid()
  local ok, err = shard:publish(category, data_json, id, function(epoch, ts, seq)
    if key then
      idem.in_flight[key] = nil
      idem.in_flight_count = idem.in_flight_count - 1
    end
    if epoch == nil and type(seq) == "table" then -- the key was seen before
      local code = seq.code
      if code == idempotency.REPLAY then idem.replays = idem.replays + 1 else idem.conflicts = idem.conflicts + 1 end
      return callback(nil, idempotency.message(code), code, seq)
    end
    if not epoch then
      self.log("warn", "publish failed", { category = category, error = ts })
      return callback(nil, "publish failed: " .. ts, "EUNAVAILABLE")
    end
    self.log("debug", "published", { category = category, id = id, seq = seq, epoch = epoch })
    self.published = self.published + 1
    callback({ id = id, timestamp = ts, category = category, data_json = data_json,
      json = core.event_json(ts, category, data_json, id), data = data })
  end, key_args)
  if not ok then
    if key then
      idem.in_flight[key] = nil
      idem.in_flight_count = idem.in_flight_count - 1
    end
    return nil, err, "EUNAVAILABLE"
  end
  return true
end

-- Checks a cursor; returns since, last_id (lower case) or nil, message.
local function check_cursor(since, last_id, need_since)
  if since ~= nil and math.type(since) ~= "integer" then return nil, "since_time must be an integer" end
  if need_since and since == nil then return nil, "since_time must be an integer" end
  if last_id ~= nil then
    if since == nil or not core.is_uuid(last_id) then return nil, "last_id must be a UUID" end
    last_id = last_id:lower()
  end
  return true, last_id
end

local function category_list(categories)
  if type(categories) == "string" then return { categories } end
  if type(categories) ~= "table" or #categories == 0 then return nil end
  return categories
end

function Engine:_add(fields, categories)
  if self.closed then return nil, "manager is shut down", "ECLOSED" end
  local list = category_list(categories)
  if not list then return nil, "categories must be a category or a list of them", "EINVAL" end
  local shard, serr = self:_shard_of_all(list)
  if not shard then return nil, serr, "EINVAL" end
  fields.categories = list
  local id, err, code = shard:add(fields)
  if not id then return nil, err, code end
  return id * #self.shards + (self:_index_of(shard) - 1)
end

function Engine:_index_of(shard)
  for i, s in ipairs(self.shards) do
    if s == shard then return i end
  end
end

-- The shard of a handle, and the waiter's id there.
function Engine:_locate(handle)
  if math.type(handle) ~= "integer" or handle < 0 then return nil end
  local n = #self.shards
  return self.shards[handle % n + 1], handle // n
end

-- engine:subscribe(sub, on_answer) -> handle | nil, message, code
function Engine:subscribe(sub, on_answer)
  local ok, last_id = check_cursor(sub.since, sub.last_id)
  if not ok then return nil, last_id, "EINVAL" end
  return self:_add({ since = sub.since, last_id = last_id, on_answer = on_answer }, sub.categories)
end

-- engine:cancel(handle) -> true if it was still waiting
function Engine:cancel(handle)
  local shard, id = self:_locate(handle)
  return shard ~= nil and shard:cancel(id)
end

-- engine:expire(handle, on_timeout): the long poll's time is up. Ends the wait, then exactly one
-- of on_answer(body) (events that were on their way: a read in flight, or events published
-- before the mark reaching this node) or on_timeout(ts) runs, now or later. ts: no event
-- published later gets ts or less, and the waiter got every event up to it (Redis away: a
-- waiter whose read is still owed gets its own cursor's time, so continuing skips nothing);
-- nil when the engine closed first.
function Engine:expire(handle, on_timeout)
  local shard, id = self:_locate(handle)
  if not shard or not shard:expire(id, on_timeout) then
    return on_timeout(self.shards[1]:known_time())
  end
end

-- engine:timeout_mark(callback) -> true | nil, message: callback(ts) (or callback(nil,
-- message)), ts a timestamp no event published later reaches, handed out once every event
-- published before it reached this node.
function Engine:timeout_mark(callback)
  if self.closed then return nil, "manager is shut down" end
  local shards = self.shards
  if #shards == 1 then
    shards[1]:timeout_mark(callback)
    return true
  end
  -- several Redis: the largest of their marks, then every one raised past it (a second mark
  -- with that floor), so no later event of any shard reaches it
  local function on_all(round, done)
    local left, best, failed = #shards, nil, nil
    for _, s in ipairs(shards) do
      round(s, function(T, err)
        if not T then failed = failed or err or "no mark" elseif not best or T > best then best = T end
        left = left - 1
        if left == 0 then done(best, failed) end
      end)
    end
  end
  on_all(function(s, cb) s:timeout_mark(cb) end, function(T, err)
    if err then return callback(nil, err) end
    on_all(function(s, cb)
      s:raise_floor(T)
      s:timeout_mark(cb)
    end, function(_, err2)
      if err2 then return callback(nil, err2) end
      callback(T)
    end)
  end)
  return true
end


-- engine:follow(categories, since, last_id, on_events) -> handle | nil, message
function Engine:follow(categories, since, last_id, on_events)
  local ok, lid = check_cursor(since, last_id)
  if not ok then return nil, lid end
  return self:_add({ since = since, last_id = lid, on_events = on_events, follow = true }, categories)
end

-- engine:unfollow(handle) -> true if it was live
function Engine:unfollow(handle)
  return self:cancel(handle)
end

-- The node-local cache (a core.new_cache) for the HTTP engine's native handler
-- (core.native_cached_subscription), which answers from it the catch-ups subscribe would answer
-- from it with events; nil without a cache, or with several Redis shards (a category's shard is
-- chosen here, in Lua).
function Engine:core_cache()
  local shards = self.shards
  if #shards ~= 1 then return nil end
  return shards[1]:core_cache()
end

-- The C publisher of the one Redis shard (core.redis_publisher), for the HTTP engine's native
-- publish handler (core.native_redis_publish); nil without one or with several shards.
function Engine:core_publisher()
  local shards = self.shards
  if #shards ~= 1 then return nil end
  return shards[1]:core_publisher()
end

-- The C store that indexes this node's own waiters (longpoll.core), for the HTTP engine: its
-- polls parked on the cache share max_waiting_per_category with these waiters.
function Engine:core_waiting_store()
  return self.store
end

-- engine:stats(with_categories) -> table: the waiter index's figures and each Redis's.
function Engine:stats(with_categories)
  local s = self.store_closed and { closed = true } or self.store:stats(with_categories)
  local shards = {}
  local online = true
  local delivered, keys, published = 0, 0, self.published
  for i, shard in ipairs(self.shards) do
    shards[i] = shard:stats()
    online = online and shards[i].online
    delivered = delivered + shards[i].delivered
    keys = keys + shards[i].idempotency_keys
    published = published + shards[i].published_in_c
    if not self.closed then shard:refresh_key_count() end
  end
  -- this node's figures: its own stored publishes, the events it handed to its subscribers
  s.published, s.delivered = published, delivered
  -- the polls the HTTP engine parked on the node-local cache wait too
  if #shards == 1 and not self.store_closed then s.waiting = s.waiting + (shards[1].cache_parked or 0) end
  s.redis = #shards == 1 and shards[1] or shards
  s.redis_online = online
  local idem = self.idempotency
  s.idempotency_in_flight, s.idempotency_replays, s.idempotency_conflicts =
    idem.in_flight_count, idem.replays, idem.conflicts
  -- the keys live in Redis: their count as Redis answered the previous stats call
  s.idempotency_keys = keys
  return s
end

-- engine:close(done): ends follows and connections, then done().
function Engine:close(done)
  done = done or noop
  if self.closed then return done() end
  self.closed = true
  local left = #self.shards
  for _, shard in ipairs(self.shards) do
    shard:close(function()
      left = left - 1
      if left == 0 then
        self.store:close()
        self.store_closed = true
        done()
      end
    end)
  end
end

return M
