-- Test helper: longpoll "nodes" on a private Redis, the one fixture of the Redis specs. A node
-- is a manager in Redis mode behind its own HTTP server (/events, /publish, /sse), with a
-- test transport (support.redis.transport) on its Redis link. Use inside async.run, or
-- through nodes.with, which starts them, waits until they are online and stops them.
local async = require "support.async"
local fixture = require "support.fixture"
local redis = require "support.redis"
local sse_client = require "support.sse_client"
local longpoll = require "longpoll"
local server = require "longpoll.server"
local cjson = require "cjson"

local M = {}

-- Reconnects and timeouts short enough for tests of outages.
M.FAST = { reconnect_min_ms = 20, reconnect_max_ms = 200, command_timeout_ms = 2000, connect_timeout_ms = 1000 }

-- The `redis` option for url: M.FAST, then extra's keys.
function M.redis_option(url, extra)
  local o = { url = url }
  for k, v in pairs(M.FAST) do o[k] = v end
  for k, v in pairs(extra or {}) do o[k] = v end
  return o
end

-- The figures of a node's Redis (engine:stats().redis).
function M.redis_stats(node)
  return node.engine:stats().redis
end

-- M.start(url, options) -> node: options are the manager's (options.redis, when given, is
-- used as it is, plus the test transport).
function M.start(url, options)
  local o = { sse_heartbeat_seconds = 1 }
  for k, v in pairs(options or {}) do o[k] = v end
  local transport = redis.transport()
  local r = {}
  for k, v in pairs(o.redis or M.redis_option(url)) do r[k] = v end
  r.transport = transport.option
  o.redis = r
  local m = assert(longpoll.start(o))
  local srv = assert(server.new { host = "127.0.0.1", port = 0 })
  srv:route("GET", "/events", m.subscription_handler)
  srv:route("*", "/publish", m.publish_handler)
  srv:route("GET", "/sse", m.sse_handler)
  srv:route("HEAD", "/sse", m.sse_handler)
  local node = { manager = m, engine = m.engine, srv = srv, port = assert(srv:listen()), transport = transport }
  -- GET /events: status, decoded body (or the text), the text
  function node.get(query, timeout_ms)
    local status, _, body = async.http(node.port, { path = fixture.url("/events", query), timeout_ms = timeout_ms or 15000 })
    local ok, decoded = pcall(cjson.decode, body)
    return status, ok and decoded or body, body
  end
  -- POST /publish: status, decoded body (or the text), headers
  function node.publish_http(category, data_json)
    local body = '{"category":' .. cjson.encode(category) .. ',"data":' .. data_json .. "}"
    local status, h, rbody = async.http(node.port, { method = "POST", path = "/publish", body = body })
    local ok, decoded = pcall(cjson.decode, rbody)
    return status, ok and decoded or rbody, h
  end
  -- manager:publish, waiting for Redis's answer: the event, or nil, message
  function node.publish(category, data)
    local done = async.event()
    local queued, err = m:publish(category, data, function(event, perr) done:set(event or false, perr) end)
    if not queued then return nil, err end
    local event, perr = done:wait(5000)
    if not event then return nil, perr end
    return event
  end
  function node.publish_json(category, data_json)
    local done = async.event()
    assert(m:publish_json(category, data_json, function(event) done:set(event) end))
    return assert(done:wait(5000))
  end
  -- an SSE stream on /sse (spec/support/sse_client.lua)
  function node.stream(query, headers, method)
    return sse_client.open(node.port, query, headers, { method = method })
  end
  return node
end

function M.stop(node)
  local stopped = async.event()
  node.manager:shutdown(function() stopped:set(true) end)
  assert(stopped:wait(5000), "manager did not shut down")
  local closed = async.event()
  node.srv:close(function() closed:set(true) end)
  assert(closed:wait(5000), "server did not close")
end

-- Runs fn(nodes) with n nodes on the Redis at url, all online first, inside async.run.
function M.with(url, n, options, fn, timeout_ms)
  async.run(function()
    local list = {}
    for i = 1, n do list[i] = M.start(url, options) end
    async.wait_or_fail("nodes online", function()
      for _, node in ipairs(list) do if not M.redis_stats(node).online then return false end end
      return true
    end)
    local ok, err = pcall(fn, list)
    for _, node in ipairs(list) do M.stop(node) end
    if not ok then error(err, 0) end
  end, timeout_ms or 20000)
end

return M
