-- The link to one Redis: a command connection (scripts, by SHA) and a pub/sub connection, each
-- reconnected with backoff when lost. It is "online" once both are up and the owner's sync ran.
-- The owner learns what happens through handlers; a test transport (options.redis.transport)
-- may sit between Redis and the owner (hold pub/sub messages, slow down script replies).
local uv = require "luv"
local hiredis = require "longpoll.hiredis"
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
    attempts = { cmd = 0, sub = 0 }, syncs = 0, stopped = false,
  }, Link)
  self.timers = { cmd = uv.new_timer(), sub = uv.new_timer() }
  self.timers.cmd:unref()
  self.timers.sub:unref()
  return self
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

function Link:_connect_cmd()
  if self.stopped then return end
  local handshake = {}
  for i, name in ipairs(scripts.NAMES) do handshake[i] = { "SCRIPT", "LOAD", scripts[name] } end
  local conn
  conn = Connection.new(self.cfg, nil, function(err)
    if self.cmd ~= conn then return end
    self.cmd, self.cmd_ready = nil, false
    self:_set_offline(err)
    self.log("warn", "Redis command connection lost", { error = err })
    self.timers.cmd:start(self:_backoff("cmd"), 0, function() self:_connect_cmd() end)
  end)
  self.cmd = conn
  conn:connect(handshake, function(shas)
    for i, name in ipairs(scripts.NAMES) do self.shas[name] = shas[i] end
    self.cmd_ready = true
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
  local conn
  conn = Connection.new(self.cfg, function(reply) self:_on_push(reply) end, function(err)
    if self.sub ~= conn then return end
    self.sub, self.sub_ready = nil, false
    self:_set_offline(err)
    self.log("warn", "Redis pub/sub connection lost", { error = err })
    self.handlers.pubsub_lost(err)
    self.timers.sub:start(self:_backoff("sub"), 0, function() self:_connect_sub() end)
  end)
  self.sub = conn
  self.sub_confirmed = 0
  conn:connect(nil, function()
    self.attempts.sub = 0
    local argv = { "SUBSCRIBE" }
    for i, c in ipairs(self.channels) do argv[i + 1] = c end
    conn:send(argv)
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
  self:_connect_cmd()
  self:_connect_sub()
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

-- Drops the pub/sub connection (it looks open but does not deliver) and reconnects it.
function Link:restart_pubsub(reason)
  if self.sub then self.sub:abort(reason) end
end

function Link:stats()
  return { online = self.online, syncs = self.syncs, command_connected = self.cmd_ready,
    pubsub_connected = self.sub_ready }
end

-- Closes connections and timers; commands in flight get (nil, "Redis connection closed").
function Link:close()
  if self.stopped then return end
  self.stopped = true
  if self.cmd then self.cmd:close() end
  if self.sub then self.sub:close() end
  self.cmd, self.sub, self.cmd_ready, self.sub_ready, self.online = nil, nil, false, false, false
  close_handle(self.timers.cmd)
  close_handle(self.timers.sub)
end

-- One blocking round trip before serving: is Redis there, recent enough, and where is its
-- sequence. Runs the mark script (args: its ARGV) on clock_key; returns its reply or nil, message.
function M.probe(cfg, clock_key, args)
  local conn, err = hiredis.connect(cfg.host, cfg.port, cfg.connect_timeout_ms)
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
