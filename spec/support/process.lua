-- Test helper: runs bin/longpoll (or any lua5.4 script) as a child process
-- inside async.run, reads its start-up line for the port, and stops it.
local uv = require "luv"
local async = require "support.async"

local process = {}

local Child = {}
Child.__index = Child

-- Starts `lua5.4 <args...>` from the repository root. Returns a child with
-- child.port (from "listening on http://host:PORT/"), child:stop(signal) ->
-- exit code, signal. Raises when no start-up line comes within 5 s.
-- opts.shell: shell commands run first in the child (`ulimit -v 250000;`), then lua5.4 is exec'd.
-- opts.stderr_unread: the child's stderr is a pipe nobody reads. Also opts.env, wait_port,
-- start_timeout_ms.
function process.start(args, opts)
  opts = opts or {}
  local stdout, stderr = uv.new_pipe(false), uv.new_pipe(false)
  local unread
  if opts.stderr_unread then
    -- a plain blocking OS pipe (libuv's own stdio pipes are sockets with other buffer sizes)
    unread = assert(uv.pipe({ nonblock = false }, { nonblock = false }))
    stderr:close()
    stderr = unread.write
  end
  local self = setmetatable({ out = "", err = "", exited = async.event(), started = async.event() }, Child)
  -- children load the same core as the tests (the sanitizer build under `make test-asan`)
  local env = { "LUA_PATH=./lua/?.lua;./lua/?/init.lua;;",
    "LUA_CPATH=" .. (os.getenv("LONGPOLL_CPATH") or "./build/?.so") .. ";;", "PATH=" .. os.getenv("PATH") }
  for _, name in ipairs { "LD_PRELOAD", "ASAN_OPTIONS", "UBSAN_OPTIONS" } do
    if os.getenv(name) then env[#env + 1] = name .. "=" .. os.getenv(name) end
  end
  for _, e in ipairs(opts.env or {}) do env[#env + 1] = e end
  local command = "lua5.4"
  if opts.shell then
    command, args = "sh", { "-c", opts.shell .. ' exec lua5.4 "$@"', "sh", table.unpack(args) }
  end
  local handle, pid = uv.spawn(command, { args = args, stdio = { nil, stdout, stderr }, env = env },
    function(code, signal)
      self.code, self.signal = code, signal
      self.exited:set(code, signal)
    end)
  assert(handle, pid)
  self.handle, self.pid = handle, pid
  if unread then
    uv.fs_close(unread.write) -- the child holds it; our read end is never read
    self.unread_fd = unread.read
  end
  stdout:read_start(function(_, data)
    if data then
      self.out = self.out .. data
      local port = self.out:match("listening on http://[^\n]-:(%d+)/")
      if port and not self.port then
        self.port = tonumber(port)
        self.started:set(self.port)
      end
    elseif not stdout:is_closing() then
      stdout:close()
    end
  end)
  if not unread then -- opts.stderr_unread: nobody reads the child's stderr (a full pipe)
    stderr:read_start(function(_, data)
      if data then self.err = self.err .. data elseif not stderr:is_closing() then stderr:close() end
    end)
    self.pipes = { stdout, stderr }
  else
    self.pipes = { stdout }
  end
  if opts.wait_port ~= false then
    local ok = self.started:wait(opts.start_timeout_ms or 5000)
    if not ok then
      self:stop("sigkill")
      error("child did not start: " .. self.err, 2)
    end
  end
  return self
end

-- Waits for the child to exit by itself (or kills it after timeout_ms).
function Child:wait(timeout_ms)
  local code, signal = self.exited:wait(timeout_ms or 5000)
  if code == nil then
    self.handle:kill("sigkill")
    code, signal = self.exited:wait(2000)
  end
  for _ = 1, 20 do
    local open = false
    for _, p in ipairs(self.pipes) do open = open or not p:is_closing() end
    if not open then break end
    async.sleep(10)
  end
  for _, p in ipairs(self.pipes) do if not p:is_closing() then p:close() end end
  if self.unread_fd then
    uv.fs_close(self.unread_fd)
    self.unread_fd = nil
  end
  if not self.handle:is_closing() then self.handle:close() end
  return code, signal
end

function Child:stop(signal, timeout_ms)
  if self.code == nil then self.handle:kill(signal or "sigterm") end
  return self:wait(timeout_ms)
end

return process
