-- Test helper: a private redis-server on a free port of 127.0.0.1 (never the
-- default port), started daemonized in a temporary directory and killed
-- afterwards. Blocking calls: use it outside the loop or between steps.
local uv = require "luv"
local async = require "support.async"

local M = {}

local function sh(cmd)
  local ok = os.execute(cmd .. " >/dev/null 2>&1")
  return ok == true or ok == 0
end

-- Waits 20 ms: on the loop inside an async task (so servers in this process keep serving),
-- else by sleeping the process.
local function pause()
  if async.in_task() then async.sleep(20) else sh("sleep 0.02") end
end

local function read_file(path)
  local f = io.open(path, "rb")
  if not f then return nil end
  local s = f:read("a")
  f:close()
  return s
end

-- A port nobody listens on right now.
function M.free_port()
  local tcp = uv.new_tcp()
  assert(tcp:bind("127.0.0.1", 0))
  local port = tcp:getsockname().port
  tcp:close()
  uv.run("nowait")
  return port
end

function M.available()
  return sh("command -v redis-server") and sh("command -v redis-cli")
end

local Server = {}
Server.__index = Server

-- Runs redis-cli against this server; returns its output (trailing newline removed).
function Server:cli(args)
  local p = io.popen(("redis-cli -p %d %s 2>&1"):format(self.port, args))
  local out = p:read("a")
  p:close()
  return (out:gsub("\n$", ""))
end

function Server:pid()
  local s = read_file(self.dir .. "/redis.pid")
  return s and tonumber(s:match("%d+"))
end

function Server:running()
  return self:cli("PING") == "PONG"
end

-- Starts (or restarts, keeping its directory and its data files) the server.
function Server:start()
  if self.sentinel_of then return self:_start_sentinel() end
  local args = { "redis-server", "--port", self.port, "--bind", "127.0.0.1", "--daemonize", "yes",
    "--dir", self.dir, "--pidfile", self.dir .. "/redis.pid", "--logfile", self.dir .. "/redis.log",
    "--save", "''", "--repl-diskless-sync-delay", "0" } -- a replica's full sync starts at once
  if self.replica_of then args[#args + 1] = "--replicaof 127.0.0.1 " .. self.replica_of end
  if self.persist then
    args[#args + 1] = "--appendonly yes --appendfsync always"
  else
    args[#args + 1] = "--appendonly no"
  end
  assert(sh(table.concat(args, " ")), "redis-server did not start")
  for _ = 1, 200 do
    if self:running() then return self end
    pause()
  end
  error("redis-server on port " .. self.port .. " did not answer: " .. (read_file(self.dir .. "/redis.log") or ""))
end

function Server:_wait_running()
  for _ = 1, 200 do
    if self:running() then return self end
    pause()
  end
  error("server on port " .. self.port .. " did not answer: " .. (read_file(self.dir .. "/redis.log") or ""))
end

-- A sentinel watching the master "mymaster" on port sentinel_of (quorum 2), quick to act:
-- down after 1 s without an answer (less makes a busy master look dead: a replica's full sync
-- stalls it, and a second failover then promotes a replica still empty), failover given up
-- after 4 s.
function Server:_start_sentinel()
  local conf = self.dir .. "/sentinel.conf"
  local f = assert(io.open(conf, "w"))
  f:write(table.concat({
    "port " .. self.port, "bind 127.0.0.1", "daemonize yes", "dir " .. self.dir,
    "pidfile " .. self.dir .. "/redis.pid", "logfile " .. self.dir .. "/redis.log",
    "sentinel monitor mymaster 127.0.0.1 " .. self.sentinel_of .. " 2",
    "sentinel down-after-milliseconds mymaster 1000",
    "sentinel failover-timeout mymaster 4000",
    "sentinel parallel-syncs mymaster 1", "",
  }, "\n"))
  f:close()
  assert(sh("redis-sentinel '" .. conf .. "'"), "redis-sentinel did not start")
  return self:_wait_running()
end

-- Kills the server with SIGKILL (no shutdown, no save) and waits until it is gone.
function Server:kill()
  local pid = self:pid()
  if pid then sh("kill -9 " .. pid) end
  for _ = 1, 200 do
    if not self:running() then break end
    pause()
  end
  os.remove(self.dir .. "/redis.pid")
end

function Server:stop()
  self:kill()
  sh("rm -rf '" .. self.dir .. "'")
end

-- Sentinel: whether a failover of "mymaster" is under way (its flags say so).
function Server:failover_in_progress()
  return self:cli("SENTINEL MASTER mymaster"):find("failover_in_progress", 1, true) ~= nil
end

function M.sentinel_available()
  return sh("command -v redis-sentinel")
end

-- opts.persist: append-only file with fsync on every write, so a killed
-- server comes back with everything it acknowledged.
-- opts.replica_of: a port; the server replicates the one there.
-- opts.sentinel_of: a port; a sentinel (not a server) watching the master there as "mymaster".
function M.start(opts)
  opts = opts or {}
  local dir = os.tmpname()
  os.remove(dir)
  assert(sh("mkdir -p '" .. dir .. "'"))
  local self = setmetatable({ port = opts.port or M.free_port(), dir = dir, persist = opts.persist,
    replica_of = opts.replica_of, sentinel_of = opts.sentinel_of }, Server)
  self.url = ("redis://127.0.0.1:%d/0"):format(self.port)
  return self:start()
end

-- A transport for options.redis.transport that can hold pub/sub messages (a slow link), drop
-- some (a lost message), and slow down the answers of reads ("fetch" scripts).
--   t.option: the value for options.redis.transport
--   t:hold(), t:release(): hold messages, then deliver those held, in order
--   t.held: the payloads held (t:drop(i) removes one)
--   t.fetch_delay_ms: when set, read answers arrive that much later; t.delayed_replies counts
--   those that reached the node and wait
function M.transport()
  local t = { held = {}, holding = false, delayed_replies = 0 }
  local deliver_held = {}
  t.option = {
    message = function(payload, deliver)
      if t.holding then
        t.held[#t.held + 1] = payload
        deliver_held[payload] = deliver
        return
      end
      deliver(payload)
    end,
    reply = function(name, reply, err, deliver)
      if name == "fetch" and t.fetch_delay_ms then
        t.delayed_replies = t.delayed_replies + 1
        local timer = uv.new_timer()
        timer:start(t.fetch_delay_ms, 0, function()
          timer:close()
          t.delayed_replies = t.delayed_replies - 1
          deliver(reply, err)
        end)
        return
      end
      deliver(reply, err)
    end,
  }
  function t.hold() t.holding = true end
  function t.drop(i) table.remove(t.held, i) end
  function t.release()
    t.holding = false
    local held = t.held
    t.held = {}
    for _, payload in ipairs(held) do
      local deliver = deliver_held[payload]
      deliver_held[payload] = nil
      deliver(payload)
    end
  end
  return t
end

return M
