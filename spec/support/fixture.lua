-- Test fixture: a manager served by the built-in server on a free port, inside
-- async.run, torn down afterwards (server closed, manager shut down).
local async = require "support.async"
local longpoll = require "longpoll"
local server = require "longpoll.server"
local cjson = require "cjson"

local fixture = {}

-- Percent-encodes a query value.
function fixture.escape(s)
  return (s:gsub("[^%w%-%._~]", function(c) return ("%%%02X"):format(c:byte()) end))
end

-- Builds "path?k=v&..." from a list of {key, value} pairs (repeated keys allowed).
function fixture.url(path, pairs_list)
  local parts = {}
  for _, kv in ipairs(pairs_list) do parts[#parts + 1] = fixture.escape(kv[1]) .. "=" .. fixture.escape(tostring(kv[2])) end
  return path .. (#parts > 0 and ("?" .. table.concat(parts, "&")) or "")
end

-- Runs fn(ctx) with ctx = { manager, srv, port, get(query_pairs), publish(category, data_json_text) }.
-- setup(manager, srv) may mount wrapped handlers; by default /events and /publish are mounted.
function fixture.with_server(manager_options, fn, opts)
  opts = opts or {}
  async.run(function()
    local manager = assert(longpoll.start(manager_options or {}))
    local srv = assert(server.new(opts.server or { host = "127.0.0.1", port = 0 }))
    if opts.setup then
      opts.setup(manager, srv)
    else
      srv:route("GET", "/events", manager.subscription_handler)
      srv:route("*", "/publish", manager.publish_handler)
      srv:route("GET", "/sse", manager.sse_handler)
      srv:route("GET", "/stats", manager.stats_handler)
    end
    local port = assert(srv:listen())
    local ctx = { manager = manager, srv = srv, port = port }
    function ctx.get(query, headers)
      local status, h, body = async.http(port, { path = fixture.url("/events", query), headers = headers, timeout_ms = 15000 })
      local ok, decoded = pcall(cjson.decode, body)
      return status, ok and decoded or body, h
    end
    function ctx.publish(category, data_json, headers)
      local body = '{"category":' .. cjson.encode(category) .. ',"data":' .. data_json .. "}"
      local status, h, rbody = async.http(port, { method = "POST", path = "/publish", body = body, headers = headers })
      local ok, decoded = pcall(cjson.decode, rbody)
      return status, ok and decoded or rbody, h
    end
    local ok, err = pcall(fn, ctx)
    manager:shutdown()
    local closed = async.event()
    srv:close(function() closed:set(true) end)
    assert(closed:wait(5000), "server did not close")
    if not ok then error(err, 0) end
  end, opts.timeout_ms or 20000)
end

return fixture
