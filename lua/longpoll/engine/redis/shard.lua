-- One Redis (one master) as the engine uses it: its link, its Position in Redis's sequence, its
-- timeout marks and its waiters, and what its pub/sub messages mean. Every category lives in
-- exactly one shard; with one Redis there is one shard.
local uv = require "luv"
local core = require "longpoll.core"
local Cache = require "longpoll.engine.redis.cache"
local Link = require "longpoll.engine.redis.link"
local Marks = require "longpoll.engine.redis.marks"
local Position = require "longpoll.engine.redis.position"
local scripts = require "longpoll.engine.redis.scripts"
local Waiters = require "longpoll.engine.redis.waiters"

local tointeger = math.tointeger
local redis_event = core.redis_event

local Shard = {}
Shard.__index = Shard

local M = {}

-- How long close waits for reads and marks in flight.
local CLOSE_WAIT_MS = 1000

local function int(s) return tointeger(tonumber(s)) end

-- opts = {
--   cfg = the resolved `redis` option for this Redis, prefix = its key prefix (with any hash tag),
--   node_id, store (the waiter index, shared by shards), ttl_ms, max_event_buffer_size,
--   limits_of = nil or function(category) -> { max_event_buffer_size =, event_ttl_ms = } (rules),
--   log = function(level, message, fields), on_event = function(ev) (every event, Redis's order),
-- }
-- Checks Redis once (blocking); returns the shard, or nil, message.
function M.new(opts)
  local prefix, cfg, log = opts.prefix, opts.cfg, opts.log
  local self = setmetatable({
    cfg = cfg, log = log, on_event = opts.on_event, ttl_ms = opts.ttl_ms,
    max_event_buffer_size = opts.max_event_buffer_size, limits_of = opts.limits_of,
    clock_key = prefix .. "clock", channel = prefix .. "events", node_channel = prefix .. "node:" .. opts.node_id,
    gaps = 0, unreplicated = 0,
  }, Shard)
  self.keys = {
    clock = self.clock_key,
    stream = function(category) return prefix .. "s:" .. category end,
    dropped = function(category) return prefix .. "d:" .. category end,
    -- idempotent publish: a key's record, and the index of keys by expiry (bounds their count)
    idempotency = function(key) return prefix .. "k:" .. key end,
    idempotency_index = prefix .. "keys",
  }
  -- the local cache keeps one buffer size and no TTL: off with a TTL or per-category rules
  if opts.ttl_ms == 0 and cfg.cache and not opts.limits_of then
    self.cache = Cache.new({ max_event_buffer_size = opts.max_event_buffer_size,
      max_category_bytes = opts.max_category_bytes, max_waiting_per_category = opts.max_waiting_per_category },
      log, opts.max_categories)
  end
  self.position = Position.new(log, function()
    if not self.cache then return end
    self.cache:reset("Redis has a new epoch")
    self.cache_from_next_message = true -- every later message reaches it: it starts there
  end, function(floor)
    if self.publisher then self.publisher:raise_floor(floor) end
  end)
  local reply, err = Link.probe(cfg, self.clock_key, { "0", "", "", Position.epoch_candidate() })
  if not reply then
    local where = cfg.sentinels and ("master '%s' (Sentinel)"):format(cfg.master_name)
      or ("%s:%d"):format(cfg.host, cfg.port)
    return nil, ("cannot use Redis at %s: %s"):format(where, err)
  end
  self.position:observe(reply[1], int(reply[2]), int(reply[3]))
  self.position:handed_out(int(reply[4]))
  -- HTTP publishes sent to Redis from C (core.redis_publisher): the call Shard:publish makes,
  -- so not with per-category rules, WAIT, or a test transport between Redis and the engine
  if not opts.limits_of and cfg.wait_replicas == 0 and not cfg.transport then
    self.publisher = core.redis_publisher { prefix = prefix, script = scripts.publish,
      max_event_buffer_size = opts.max_event_buffer_size, ttl_ms = opts.ttl_ms,
      connect_timeout_ms = cfg.connect_timeout_ms, command_timeout_ms = cfg.command_timeout_ms,
      user = cfg.user, password = cfg.password, db = cfg.db, log = log }
    self.publisher:raise_floor(self.position:current_floor())
  end
  self.link = Link.new(cfg, { self.channel, self.node_channel }, log, {
    message = function(payload) self:_on_message(payload) end,
    ready = function() self:_sync() end,
    pubsub_lost = function(why)
      self.msg_seq, self.sync_seq = nil, nil
      if self.cache then
        self.cache:reset("pub/sub lost")
        self.cache_from_next_message = false -- the next sync starts it
      end
      self.waiters:all_owe_a_read()
      self.marks:fail_all(why)
    end,
    -- the C publisher's connection goes too (a failover may have moved the master): publishes
    -- take the Lua path until the next sync tells it where the master is
    offline = function(why)
      if self.publisher then self.publisher:disconnect(why) end
    end,
  })
  self.marks = Marks.new(self.link, self.position, self.clock_key, self.node_channel, log)
  self.waiters = Waiters.new { store = opts.store, link = self.link, position = self.position, marks = self.marks,
    cache = self.cache, keys = self.keys, ttl_ms = opts.ttl_ms, limits_of = opts.limits_of, log = log,
    max_waiting_per_category = opts.max_waiting_per_category }
  self.link:start()
  return self
end

-- Both connections are up: a mark (its timestamps never go below what the node handed out),
-- then a read for every waiter that may have missed events.
function Shard:_sync()
  if self.syncing then return end
  self.syncing = true
  local ok = self.link:script("mark", { self.clock_key }, { self.position:floor_arg(), "", "", Position.epoch_candidate() },
    function(reply, err)
      self.syncing = false
      if err then return end -- the lost connection retries
      self.position:observe(reply[1], int(reply[2]), int(reply[3]))
      self.position:handed_out(int(reply[4]))
      self.link:set_online()
      if not self.link:is_online() then return end
      -- pub/sub was subscribed before this mark ran: every later event reaches the cache, and
      -- the next message's seq follows the mark's (a lost first message is a gap too)
      local seq = int(reply[3])
      self.sync_epoch, self.sync_seq = reply[1], seq
      if self.cache then self.cache:start({ epoch = reply[1], ts = int(reply[2]), seq = seq }) end
      self.log("info", "Redis available", { epoch = self.position.epoch, seq = self.position.seq })
      if self.publisher then
        local ip, port = self.link:master_address()
        if ip then self.publisher:connect(ip, port, self.link:script_sha("publish")) end
      end
      self.waiters:fetch_owed()
    end)
  if not ok then self.syncing = false end
end

---------------------------------------------------------------------------------------------
-- Pub/sub

function Shard:_on_event_message(ev)
  -- a gap in the one sequence: this node missed messages, so every waiter reads (the sequence
  -- goes on from the last message, or from the sync's mark when that is later)
  local prev = self.msg_epoch == ev.epoch and self.msg_seq or nil
  if self.sync_epoch == ev.epoch and self.sync_seq and (not prev or self.sync_seq > prev) then prev = self.sync_seq end
  if prev and ev.seq > prev + 1 then
    self.log("warn", "pub/sub gap: reading missed events from Redis", { expected = prev + 1, got = ev.seq })
    self.gaps = self.gaps + 1
    if self.cache then
      self.cache:reset("pub/sub gap")
      self.cache_from_next_message = true
    end
    self.waiters:all_owe_a_read()
    self.waiters:fetch_owed()
  end
  if self.msg_epoch ~= ev.epoch or not self.msg_seq or ev.seq > self.msg_seq then
    self.msg_epoch, self.msg_seq = ev.epoch, ev.seq
  end
  self.position:observe(ev.epoch, ev.ts, ev.seq)
  if self.cache then
    if self.cache_from_next_message and self.link:is_online() then
      -- messages are contiguous from here on: the cache holds what comes after the one before
      self.cache_from_next_message = false
      self.cache:start({ epoch = ev.epoch, ts = ev.ts, seq = ev.seq - 1 })
    end
    self.cache:add(ev)
  end
  self.waiters:on_event(ev)
  self.on_event(ev)
end

function Shard:_on_message(payload)
  local kind = payload:sub(1, 2)
  if kind == "E " then
    local epoch, seq, ts, category, id, data_json, json = redis_event(payload)
    if not epoch then return self.log("error", "bad event message from Redis", {}) end
    return self:_on_event_message({
      epoch = epoch, seq = seq, ts = ts, category = category, id = id, data_json = data_json, json = json,
    })
  elseif kind == "M " then
    local token, epoch, seq, last, T = payload:match("^M (%S+) (%S+) (%d+) (%d+) (%d+)$")
    if token then return self.marks:on_marker(token, epoch, int(seq), int(last), int(T)) end
  end
end

---------------------------------------------------------------------------------------------
-- Publish

-- Stores one event: callback(epoch, ts, seq) or callback(nil, message). With wait_replicas, only
-- once WAIT confirmed that many replicas have it. Returns true, or nil, message when Redis cannot
-- be asked now (callback never called). idem: nil, or { key =, fingerprint =, window_ms =,
-- max_keys = } of an idempotent publish; a key Redis knows gives callback(nil, nil, outcome)
-- with outcome = { code = "EREPLAY", id =, timestamp = } or { code = "EKEYMISMATCH" }.
function Shard:publish(category, data_json, id, callback, idem)
  local size, ttl = self.max_event_buffer_size, self.ttl_ms
  if self.limits_of then -- per-category rules: XADD MAXLEN and the MINID trim take the category's
    local limits = self.limits_of(category)
    size, ttl = limits.max_event_buffer_size, limits.event_ttl_ms
  end
  local args = { category, data_json, id, size, ttl, self.channel,
    Position.epoch_candidate(), self.position:floor_arg() }
  local keys = { self.clock_key, self.keys.stream(category), self.keys.dropped(category) }
  if idem then
    keys[4], keys[5] = self.keys.idempotency(idem.key), self.keys.idempotency_index
    args[9], args[10], args[11], args[12], args[13] = idem.key, idem.fingerprint, ("%d"):format(idem.window_ms),
      ("%d"):format(idem.max_keys), self.keys.idempotency("")
  end
  local replicas, wait_ms = self.cfg.wait_replicas, self.cfg.wait_timeout_ms
  return self.link:script("publish", keys, args,
    function(reply, err)
      if err then return callback(nil, err) end
      if reply[1] == "replay" then
        return callback(nil, nil, { code = "EREPLAY", id = reply[2], timestamp = int(reply[3]) })
      elseif reply[1] == "mismatch" then
        return callback(nil, nil, { code = "EKEYMISMATCH" })
      end
      local ts, seq = int(reply[2]), int(reply[3])
      self.position:observe(reply[1], ts, seq)
      if replicas == 0 then return callback(reply[1], ts, seq) end
      -- WAIT covers every write this connection made before it, the event's included
      local ok, werr = self.link:command({ "WAIT", replicas, wait_ms }, function(n, e)
        if e then return callback(nil, "WAIT failed: " .. e) end
        if n < replicas then
          self.unreplicated = self.unreplicated + 1
          return callback(nil, ("only %d of %d replicas confirmed the event within %d ms"):format(n, replicas, wait_ms))
        end
        callback(reply[1], ts, seq)
      end)
      if not ok then callback(nil, "WAIT failed: " .. werr) end
    end)
end

---------------------------------------------------------------------------------------------
-- Waiters and marks (see waiters.lua and marks.lua)

function Shard:add(fields) return self.waiters:add(fields) end
function Shard:cancel(id) return self.waiters:cancel(id) end

-- A plain mark: callback(T) or callback(nil, message).
function Shard:timeout_mark(callback)
  return self.marks:request(callback)
end

-- Long poll id's time is up (see Engine:expire); false when id is no waiting long poll.
function Shard:expire(id, on_timeout)
  return self.waiters:expire(id, on_timeout)
end

-- The newest timestamp this node knows Redis issued.
function Shard:known_time()
  return self.position:known_time()
end

-- Later timestamps of this Redis go above T (a mark handed out from several shards).
function Shard:raise_floor(T)
  self.position:handed_out(T)
end

-- The C cache of this Redis's stream (Cache:core_cache), or nil without a cache.
function Shard:core_cache()
  return self.cache and self.cache:core_cache()
end

-- The C publisher of this Redis's HTTP publishes (core.redis_publisher), or nil.
function Shard:core_publisher()
  return self.publisher
end

function Shard:can_publish()
  return self.link:can_send()
end

function Shard:stats()
  local s = self.link:stats()
  local w = self.waiters:stats()
  s.waiters, s.fetches_in_flight, s.delivered = w.waiters, w.fetches_in_flight, w.delivered
  s.epoch, s.seq, s.last_timestamp, s.gaps = self.position.epoch, self.position.seq, self.position.ts, self.gaps
  s.pubsub_seq = self.msg_seq
  if self.cache then
    for k, v in pairs(self.cache:stats()) do s[k] = v end
    -- the polls parked on the cache (in C, by the HTTP engine) are this node's subscribers too
    s.waiters, s.delivered = s.waiters + s.cache_parked, s.delivered + s.cache_woken
  end
  s.unreplicated = self.unreplicated
  s.published_in_c = self.publisher and self.publisher:stats().published or 0
  s.idempotency_keys = self.idempotency_keys or 0
  return s
end

-- Asks Redis how many Idempotency-Keys it keeps (ZCARD of their index), for the next stats:
-- stats are synchronous, so they report the count of the previous ask.
function Shard:refresh_key_count()
  if self.counting_keys or not self.link:can_send() then return end
  self.counting_keys = true
  local ok = self.link:command({ "ZCARD", self.keys.idempotency_index }, function(n)
    self.counting_keys = false
    if math.type(n) == "integer" then self.idempotency_keys = n end
  end)
  if not ok then self.counting_keys = false end
end

-- Waits (briefly) for reads and marks in flight, ends the waiters left, closes the link, then
-- done().
function Shard:close(done)
  self.marks:flush()
  local waited = 0
  local timer = uv.new_timer()
  timer:start(0, 10, function()
    waited = waited + 10
    local busy = self.marks:busy() or self.waiters:stats().fetches_in_flight > 0
    if busy and waited < CLOSE_WAIT_MS and self.link:is_online() then return end
    timer:close()
    self.marks:close("Redis engine is closed")
    if self.cache then self.cache:close() end
    if self.publisher then self.publisher:close() end
    self.waiters:close("manager is shut down")
    self.link:close()
    done()
  end)
end

return M
