-- The link to one Redis: a command connection (scripts, by SHA) and a pub/sub connection, each
-- reconnected with backoff when lost. It is "online" once both are up and the owner's sync ran.
-- With Sentinel, each connection first asks the sentinels where the master is and checks that
-- what it reached is a master (ROLE); a third connection, to a sentinel, listens for
-- +switch-master and makes both reconnect at once.
-- The owner learns what happens through handlers; a test transport (options.redis.transport)
-- may sit between Redis and the owner (hold pub/sub messages, slow down script replies).
local uv = require "luv"
local hiredis = require "longpoll.hiredis"
local sigpipe = require "longpoll.sigpipe"
local Connection = require "longpoll.engine.redis.connection"
local scripts = require "longpoll.engine.redis.scripts"

local Link = {}
Link.__index = Link

local M = {}

local function close_handle(h)
  if h and not h:is_closing() then h:close() end
end

local function pass_message(payload, deliver) deliver(payload) end
local function pass_reply(_, reply, err, deliver) deliver(reply, err) end

-- cfg: the resolved `redis` option (host, port, ...), channels: what the pub/sub connection
-- subscribes to, log(level, message, fields).
-- handlers = {
--   message = function(payload),      -- a pub/sub message, in Redis's order
--   ready = function(),               -- both connections are up: sync, then link:set_online()
--   pubsub_lost = function(reason),   -- messages may have been missed
--   offline = function(reason),       -- no longer online
-- }
function M.new(cfg, channels, log, handlers)
  local transport = cfg.transport or {}
  local self = setmetatable({
    cfg = cfg, channels = channels, log = log, handlers = handlers,
    on_message = transport.message or pass_message, on_reply = transport.reply or pass_reply,
    shas = {}, online = false, cmd_ready = false, sub_ready = false, sub_confirmed = 0,
    attempts = { cmd = 0, sub = 0, watch = 0 }, asking = {}, syncs = 0, switches = 0, stopped = false,
  }, Link)
  self.timers = { cmd = uv.new_timer(), sub = uv.new_timer() }
  if cfg.sentinels then self.timers.watch = uv.new_timer() end
  for _, t in pairs(self.timers) do t:unref() end
  sigpipe.hold() -- a write to a Redis that just died must not end the process
  return self
end

-- Connection options for a sentinel (no password or database of the master's).
function M.sentinel_opts(cfg, s)
  return { host = s.host, port = s.port, db = 0, connect_timeout_ms = cfg.connect_timeout_ms,
    command_timeout_ms = cfg.command_timeout_ms }
end

function Link:_backoff(kind)
  local n = self.attempts[kind]
  self.attempts[kind] = n + 1
  local base = math.min(self.cfg.reconnect_max_ms, self.cfg.reconnect_min_ms * 2 ^ math.min(n, 20))
  return math.floor(base * (0.5 + math.random() * 0.5))
end

function Link:_set_offline(reason)
  if self.online then
    self.online = false
    self.log("warn", "Redis unavailable", { error = reason })
    self.handlers.offline(reason)
  end
end

-- The connection options for the master at host:port.
function Link:_opts_at(host, port)
  local o = {}
  for k, v in pairs(self.cfg) do o[k] = v end
  o.host, o.port = host, port
  return o
end

-- Asks the sentinels, one after the other, where the master is: callback(host, port) or
-- callback(nil, message). Without sentinels: the configured address.
function Link:_resolve(callback)
  local cfg = self.cfg
  if not cfg.sentinels then return callback(cfg.host, cfg.port) end
  local list, n, first = cfg.sentinels, #cfg.sentinels, self.sentinel_at or 1
  local errors = {}
  local function try(k)
    if self.stopped then return end
    if k > n then
      return callback(nil, ("no sentinel knows master '%s': %s"):format(cfg.master_name, table.concat(errors, "; ")))
    end
    local i = (first + k - 2) % n + 1
    local s = list[i]
    local conn
    conn = Connection.new(M.sentinel_opts(cfg, s), nil, function(err)
      self.asking[conn] = nil
      errors[#errors + 1] = ("%s:%d: %s"):format(s.host, s.port, err)
      try(k + 1)
    end)
    self.asking[conn] = true
    conn:connect({ { "SENTINEL", "get-master-addr-by-name", cfg.master_name } }, function(replies)
      self.asking[conn] = nil
      conn:close()
      local addr = replies[1]
      if type(addr) ~= "table" or not addr[1] then
        errors[#errors + 1] = ("%s:%d: unknown master"):format(s.host, s.port)
        return try(k + 1)
      end
      self.sentinel_at = i
      callback(addr[1], math.tointeger(tonumber(addr[2])))
    end)
  end
  try(1)
end

-- Connects a connection to the master: handshake (argv list) after a ROLE check when Sentinel
-- is used. on_ready(replies) with the handshake's replies; failures go to on_lost.
function Link:_open(kind, on_push, on_lost, handshake, on_ready)
  self:_resolve(function(host, port)
    if self.stopped then return end
    if not host then
      on_lost(port)
      return
    end
    local checked = {}
    local role = self.cfg.sentinels ~= nil
    if role then checked[1] = { "ROLE" } end
    for _, c in ipairs(handshake or {}) do checked[#checked + 1] = c end
    local conn
    conn = Connection.new(self:_opts_at(host, port), on_push, function(err) on_lost(err, conn) end)
    self[kind] = conn
    self.address = host .. ":" .. port
    conn:connect(checked, function(replies)
      if role then
        local r = replies[1]
        local role_name = type(r) == "table" and r[1] or r
        if role_name ~= "master" then
          return conn:abort(("%s:%d is not a master (ROLE says %s)"):format(host, port, tostring(role_name)))
        end
        table.remove(replies, 1)
      end
      on_ready(conn, replies)
    end)
  end)
end

function Link:_connect_cmd()
  if self.stopped then return end
  local handshake = {}
  for i, name in ipairs(scripts.NAMES) do handshake[i] = { "SCRIPT", "LOAD", scripts[name] } end
  self.cmd_pending = true
  self:_open("cmd", nil, function(err, conn)
    if conn and self.cmd ~= conn then return end
    self.cmd, self.cmd_ready, self.cmd_pending = nil, false, false
    self:_set_offline(err)
    self.log("warn", "Redis command connection lost", { error = err })
    self.timers.cmd:start(self:_backoff("cmd"), 0, function() self:_connect_cmd() end)
  end, handshake, function(conn, shas)
    if self.cmd ~= conn then return end
    for i, name in ipairs(scripts.NAMES) do self.shas[name] = shas[i] end
    self.cmd_ready, self.cmd_pending = true, false
    self.attempts.cmd = 0
    self:_maybe_ready()
  end)
end

function Link:_on_push(reply)
  if type(reply) ~= "table" then return end
  local kind = reply[1]
  if kind == "message" then
    return self.on_message(reply[3], self.handlers.message)
  elseif kind == "subscribe" then
    self.sub_confirmed = self.sub_confirmed + 1
    if self.sub_confirmed == #self.channels then
      self.sub_ready = true
      self.log("info", "Redis pub/sub subscribed", {})
      self:_maybe_ready()
    end
  end
end

function Link:_connect_sub()
  if self.stopped then return end
  self.sub_confirmed = 0
  self:_open("sub", function(reply) self:_on_push(reply) end, function(err, conn)
    if conn and self.sub ~= conn then return end
    self.sub, self.sub_ready = nil, false
    self:_set_offline(err)
    self.log("warn", "Redis pub/sub connection lost", { error = err })
    self.handlers.pubsub_lost(err)
    self.timers.sub:start(self:_backoff("sub"), 0, function() self:_connect_sub() end)
  end, nil, function(conn)
    if self.sub ~= conn then return end
    self.attempts.sub = 0
    local argv = { "SUBSCRIBE" }
    for i, c in ipairs(self.channels) do argv[i + 1] = c end
    conn:send(argv)
  end)
end

---------------------------------------------------------------------------------------------
-- Sentinel: +switch-master

-- Reconnects both connections now (the master moved).
function Link:_switch(reason)
  self.log("warn", "Redis master switched: reconnecting", { reason = reason })
  self.attempts.cmd, self.attempts.sub = 0, 0
  self.switches = self.switches + 1
  if self.cmd then self.cmd:abort(reason) end
  if self.sub then self.sub:abort(reason) end
  -- connections waiting for their backoff go at once
  for kind, timer in pairs(self.timers) do
    if timer:is_active() then
      timer:stop()
      timer:start(0, 0, function()
          if kind == "cmd" then self:_connect_cmd() elseif kind == "sub" then self:_connect_sub() end
      end)
    end
  end
end

function Link:_watch_sentinels()
  if self.stopped then return end
  local cfg = self.cfg
  local n = #cfg.sentinels
  self.watch_at = (self.watch_at or 0) % n + 1
  local s = cfg.sentinels[self.watch_at]
  local conn
  conn = Connection.new(M.sentinel_opts(cfg, s), function(reply)
    if type(reply) ~= "table" or reply[1] ~= "message" then return end
    local name, old_host, old_port, host, port = tostring(reply[3]):match("^(%S+) (%S+) (%S+) (%S+) (%S+)$")
    if name == cfg.master_name then
      self:_switch(("+switch-master %s:%s -> %s:%s"):format(old_host, old_port, host, port))
    end
  end, function(err)
    if self.watcher ~= conn then return end
    self.watcher = nil
    self.log("warn", "Sentinel connection lost", { sentinel = s.host .. ":" .. s.port, error = err })
    self.timers.watch:start(self:_backoff("watch"), 0, function() self:_watch_sentinels() end)
  end)
  self.watcher = conn
  conn:connect(nil, function()
    self.attempts.watch = 0
    conn:send({ "SUBSCRIBE", "+switch-master" })
  end)
end

function Link:_maybe_ready()
  if self.cmd_ready and self.sub_ready and not self.online then self.handlers.ready() end
end

-- Both connections up and the owner synced: serve.
function Link:set_online()
  if self.online or not (self.cmd_ready and self.sub_ready) then return end
  self.online = true
  self.syncs = self.syncs + 1
end

-- Connects both connections on the loop.
function Link:start()
  if self.cfg.sentinels then self:_watch_sentinels() end
  self:_connect_cmd()
  self:_connect_sub()
end

-- Whether both connections are up and synced.
function Link:is_online()
  return self.online
end

-- The IP and port of the master the command connection reached (nil without one).
function Link:master_address()
  if not self.cmd then return nil end
  return self.cmd:peer()
end

-- The SHA of script `name` as the master loaded it (nil before the command connection is up).
function Link:script_sha(name)
  return self.shas[name]
end

-- Whether scripts can be sent now.
function Link:can_send()
  return self.cmd ~= nil and self.cmd_ready
end

-- Runs script `name` by SHA (by its text when Redis lost it): callback(reply) or
-- callback(nil, message[, lost]). Returns true, or nil, message (callback never called).
function Link:script(name, keys, args, callback)
  local cmd = self.cmd
  if not (cmd and self.cmd_ready) then return nil, "Redis is unavailable" end
  local argv = { "EVALSHA", self.shas[name], #keys }
  for i = 1, #keys do argv[#argv + 1] = keys[i] end
  for i = 1, #args do argv[#argv + 1] = args[i] end
  local on_reply = self.on_reply
  local function deliver(reply, err, lost) on_reply(name, reply, err, function(r, e) callback(r, e, lost) end) end
  return cmd:command(argv, function(reply, err, lost)
    if err and not lost and err:find("^NOSCRIPT") then
      argv[1], argv[2] = "EVAL", scripts[name]
      local ok, cerr = cmd:command(argv, deliver)
      if not ok then deliver(nil, cerr, true) end
      return
    end
    deliver(reply, err, lost)
  end)
end

-- Sends one command on the command connection: callback(reply) or callback(nil, message[, lost]).
-- Returns true, or nil, message (callback never called).
function Link:command(argv, callback)
  if not (self.cmd and self.cmd_ready) then return nil, "Redis is unavailable" end
  return self.cmd:command(argv, callback)
end

-- Drops the pub/sub connection (it looks open but does not deliver) and reconnects it.
function Link:restart_pubsub(reason)
  if self.sub then self.sub:abort(reason) end
end

function Link:stats()
  return { online = self.online, syncs = self.syncs, command_connected = self.cmd_ready,
    pubsub_connected = self.sub_ready, address = self.address, switches = self.switches }
end

-- Closes connections and timers; commands in flight get (nil, "Redis connection closed").
function Link:close()
  if self.stopped then return end
  self.stopped = true
  for _, kind in ipairs({ "cmd", "sub", "watcher" }) do
    if self[kind] then self[kind]:close() end
  end
  for conn in pairs(self.asking) do conn:close() end
  self.cmd, self.sub, self.watcher, self.cmd_ready, self.sub_ready, self.online = nil, nil, nil, false, false, false
  for _, t in pairs(self.timers) do close_handle(t) end
  sigpipe.release()
end

-- One blocking round trip before serving: is Redis there, recent enough, and where is its
-- sequence. Runs the mark script (args: its ARGV) on clock_key; returns its reply or nil, message.
-- Asks the sentinels (blocking) where the master is: host, port or nil, message.
local function ask_sentinels(cfg)
  local errors = {}
  for _, s in ipairs(cfg.sentinels) do
    local conn, err = hiredis.connect(s.host, s.port, cfg.connect_timeout_ms)
    if conn then
      local reply, cerr = conn:command({ "SENTINEL", "get-master-addr-by-name", cfg.master_name })
      conn:close()
      if type(reply) == "table" and reply[1] and not reply.error then
        return reply[1], math.tointeger(tonumber(reply[2]))
      end
      err = cerr or (type(reply) == "table" and reply.error) or "unknown master"
    end
    errors[#errors + 1] = ("%s:%d: %s"):format(s.host, s.port, tostring(err))
  end
  return nil, ("no sentinel knows master '%s': %s"):format(cfg.master_name, table.concat(errors, "; "))
end

function M.probe(cfg, clock_key, args)
  local host, port = cfg.host, cfg.port
  if cfg.sentinels then
    host, port = ask_sentinels(cfg)
    if not host then return nil, port end
  end
  local conn, err = hiredis.connect(host, port, cfg.connect_timeout_ms)
  if not conn then return nil, err end
  local function call(argv)
    local reply, cerr = conn:command(argv)
    if not reply then return nil, cerr end
    if type(reply) == "table" and reply.error then return nil, reply.error end
    return reply
  end
  local reply
  if cfg.password then
    reply, err = call(cfg.user and { "AUTH", cfg.user, cfg.password } or { "AUTH", cfg.password })
    if not reply then conn:close() return nil, "Redis refused AUTH: " .. err end
  end
  if cfg.db ~= 0 then
    reply, err = call({ "SELECT", cfg.db })
    if not reply then conn:close() return nil, "Redis refused SELECT: " .. err end
  end
  if cfg.sentinels then
    reply, err = call({ "ROLE" })
    if not reply or reply[1] ~= "master" then
      conn:close()
      return nil, ("%s:%d is not a master: %s"):format(host, port, tostring(err or reply[1]))
    end
  end
  reply, err = call({ "INFO", "server" })
  if not reply then conn:close() return nil, "Redis INFO failed: " .. err end
  local major, minor = tostring(reply):match("redis_version:(%d+)%.(%d+)")
  major, minor = tonumber(major), tonumber(minor)
  if not major or major < 6 or (major == 6 and minor < 2) then
    conn:close()
    return nil, ("Redis 6.2 or later is needed (this one says %s.%s)"):format(tostring(major), tostring(minor))
  end
  local argv = { "EVAL", scripts.mark, 1, clock_key }
  for i = 1, #args do argv[#argv + 1] = args[i] end
  reply, err = call(argv)
  conn:close()
  if not reply then return nil, "Redis script failed: " .. err end
  return reply
end

return M
