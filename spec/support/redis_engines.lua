-- Test helper: Redis engines ("nodes") in this process, driven through the engine interface
-- alone (no manager, no HTTP). Call inside async.run.
local async = require "support.async"
local options = require "longpoll.options"

local M = {}

-- Reconnect and time out quickly, so faults are noticed within a test's deadline.
M.FAST = { reconnect_min_ms = 20, reconnect_max_ms = 250, command_timeout_ms = 2000, connect_timeout_ms = 1000 }

-- A node: an engine with the `redis` option made of FAST and redis_keys, other options from opts
-- (event_ttl_seconds gives the TTL). node.events lists what on_event got, node.logs the log.
function M.start(redis_keys, opts)
  local r = {}
  for k, v in pairs(M.FAST) do r[k] = v end
  for k, v in pairs(redis_keys) do r[k] = v end
  local o = { redis = r }
  for k, v in pairs(opts or {}) do o[k] = v end
  local checked = assert(options.check(o))
  checked.ttl_ms = o.event_ttl_seconds and math.floor(o.event_ttl_seconds * 1000) or 0
  local node = { events = {}, logs = {} }
  node.engine = assert(require("longpoll.engine.redis").new(checked, {
    log = function(level, message) node.logs[#node.logs + 1] = level .. ": " .. message end,
    on_event = function(event) node.events[#node.events + 1] = event end,
  }))
  return node
end

-- The figures of the node's Redis (engine:stats().redis).
function M.figures(node)
  return node.engine:stats().redis
end

function M.close(node)
  local done = async.event()
  node.engine:close(function() done:set(true) end)
  assert(done:wait(5000), "engine did not close")
end

-- Publishes and waits for the answer: the event, or nil, message.
function M.publish(node, category, data_json)
  local done = async.event()
  local ok, err = node.engine:publish(category, data_json, function(event, perr) done:set(event or false, perr) end)
  if not ok then return nil, err end
  local event, perr = done:wait(10000)
  if not event then return nil, perr or "no answer" end
  return event
end

-- Waits until node B received over pub/sub every event node A knows of (a node answers
-- catch-ups from what it received).
function M.caught_up(B, A)
  async.wait_or_fail("the node to receive the events", function()
    local b, a = M.figures(B), M.figures(A)
    return b.epoch == a.epoch and (b.pubsub_seq or -1) >= a.seq
  end)
end

return M
