-- The command line of bin/longpoll: flag parsing, and `serve`, which mounts
-- the manager's handlers on the built-in server and shuts down gracefully.
local uv = require "luv"
local auth = require "longpoll.auth"
local cors_mod = require "longpoll.cors"

local M = {}

local USAGE = [[
usage: longpoll serve [flags]

Serves golongpoll-compatible long-poll pub-sub over HTTP.

flags:
  --host ADDR            address to listen on (default 127.0.0.1; "::1" for IPv6)
  --port N               port (default 8101; 0 picks a free one, printed on start)
  --subscribe-path PATH  subscription handler path (default /events)
  --publish-path PATH    publish handler path (default /publish; empty turns it off)
  --sse-path PATH        Server-Sent Events handler path (default /sse; empty turns it off)
  --stats-path PATH      stats handler path, JSON or Prometheus (default /stats; empty turns it off)
  --stats-categories     let /stats?categories=1 list categories by name (default off: names can be
                         secrets), the largest first, 100 a page (&limit=N up to 1000, &offset=N)
  --dashboard PATH       serve the live dashboard at PATH too (it is always at the stats path
                         for browsers: Accept: text/html); needs the stats path
  --cors ORIGIN          allow cross-origin requests from ORIGIN (repeatable; "*" for any)
  --max-timeout S        largest 'timeout' a subscriber may ask for (default 110)
  --buffer-size N        events kept per category (default 250)
  --ttl S                seconds an event is kept (default: forever)
  --delete-after-first   remove an event once it has been handed out
  --category-rule RULE   per-category limits, first match wins (repeatable), e.g.
                         'chat/*:buffer=50,ttl=600' or 'presence/*:buffer=1,delete-after-first';
                         PREFIX* or an exact name, then buffer=N, ttl=S|forever, delete-after-first
  --idempotency-window S seconds an Idempotency-Key is remembered (default 86400, or the TTL
                         when shorter): a retried publish with the key is stored once
  --idempotency-max-keys N  keys remembered at most (default 100000; the oldest go first)
  --static DIR           serve the files of DIR under / (index.html for /)
  --js-prefix PATH       where the browser client is served (default /js/, as /js/longpoll.js)
  --persist FILE         keep events in FILE (one JSON per line), restored on start
  --flush-ms N           with --persist: write batches every N ms (default 1000)
  --fsync                with --persist: fsync every flush
                         With --persist, publishes get 503 while FILE cannot be written (a full
                         disk); one server per FILE (FILE.lock); docs/persistence.md
  --error-status N       HTTP status of subscribe errors: 200 (golongpoll) or 400
  --max-connections N    connections that may wait (default: from the open-file limit,
                         raised to its hard limit; a reserve above it serves short requests)
  --max-memory SIZE      bytes the event buffers may hold, bookkeeping included (K, M or G
                         suffix; default 512M, or a quarter of the RAM when that is less;
                         0: no cap). Over it the oldest events of the largest categories go
                         (counted as "evicted" in /stats). Not with --redis (set maxmemory)
  --max-categories N     categories at most; a publish to a new one over it gets 503
                         (default 0: no cap, --max-memory bounds them)
  --max-answer-bytes N   bytes of events in one long-poll answer (default 4194304); the rest
                         comes on the client's next poll, from its cursor
  --max-body-bytes N     largest publish body (default 2097152: an event of 1.5 MiB fits,
                         JSON escapes included)
  --publish-token TOKEN  publishes need the header 'Authorization: Bearer TOKEN' (also
                         cross-origin ones; TOKEN: 16 or more of A-Z a-z 0-9 -._~+/, e.g.
                         `openssl rand -hex 16`); subscribers are unaffected. Also taken from the
                         environment variable LONGPOLL_PUBLISH_TOKEN. Without it, serve warns
                         when it listens on an address other machines reach
  --redis URL            share events with other servers through Redis (redis://host:port/db);
                         start fails when Redis does not answer (docs/scaling.md)
  --redis-prefix P       prefix of the Redis keys and channels (default longpoll:)
  --redis-sentinel LIST  find the Redis master through these sentinels (host:port,host:port,...)
                         and follow its failovers; needs --redis-master (--redis URL, if given,
                         only carries password and database)
  --redis-master NAME    the master's name in Sentinel
  --redis-wait N         acknowledge a publish only once N replicas have it (Redis WAIT);
                         503 otherwise
  --redis-shards LIST    spread categories over several Redis masters (redis://...,redis://...),
                         listed in the same order on every server
  --redis-no-cache       answer every catch-up from Redis, not from this server's copy of the stream
  --log-level LEVEL      debug, info, warn or error (default warn)
  --quiet                no start-up line
  -h, --help             this text

SIGINT or SIGTERM: stop accepting, answer waiting polls with the timeout
answer, flush add-ons, exit 0.
]]

local FLAGS = {
  ["--host"] = "string", ["--port"] = "integer", ["--subscribe-path"] = "string",
  ["--publish-path"] = "string", ["--max-timeout"] = "integer", ["--buffer-size"] = "integer",
  ["--ttl"] = "number", ["--delete-after-first"] = "boolean", ["--static"] = "string",
  ["--js-prefix"] = "string", ["--persist"] = "string", ["--flush-ms"] = "integer",
  ["--fsync"] = "boolean", ["--error-status"] = "integer", ["--max-connections"] = "integer",
  ["--log-level"] = "string", ["--quiet"] = "boolean",
  ["--redis"] = "string", ["--redis-prefix"] = "string", ["--redis-sentinel"] = "string",
  ["--redis-master"] = "string", ["--redis-wait"] = "integer", ["--redis-shards"] = "string",
  ["--redis-no-cache"] = "boolean",
  ["--sse-path"] = "string", ["--stats-path"] = "string", ["--cors"] = "repeatable",
  ["--max-memory"] = "size", ["--max-categories"] = "integer",
  ["--max-answer-bytes"] = "integer", ["--max-body-bytes"] = "integer",
  ["--publish-token"] = "string", ["--stats-categories"] = "boolean",
  -- issue 17: idempotent publish, per-category rules, the dashboard
  ["--idempotency-window"] = "number", ["--idempotency-max-keys"] = "integer",
  ["--category-rule"] = "repeatable", ["--dashboard"] = "string",
}

local function comma_list(v)
  local out = {}
  for item in v:gmatch("[^,]+") do out[#out + 1] = item end
  return out
end

-- The `redis` option the --redis* flags ask for: a table, nil (no Redis), or nil, message.
function M.redis_option(flags)
  local any = flags.redis or flags["redis-sentinel"] or flags["redis-shards"]
  if not any then
    for _, f in ipairs { "redis-prefix", "redis-master", "redis-wait", "redis-no-cache" } do
      if flags[f] ~= nil then return nil, "--" .. f .. " needs --redis, --redis-sentinel or --redis-shards" end
    end
    return nil
  end
  if (flags["redis-sentinel"] == nil) ~= (flags["redis-master"] == nil) then
    return nil, "--redis-sentinel and --redis-master go together"
  end
  local cache -- nil: the default (on)
  if flags["redis-no-cache"] then cache = false end
  return {
    url = flags.redis, prefix = flags["redis-prefix"], master_name = flags["redis-master"],
    sentinels = flags["redis-sentinel"] and comma_list(flags["redis-sentinel"]),
    shards = flags["redis-shards"] and comma_list(flags["redis-shards"]),
    wait_replicas = flags["redis-wait"], cache = cache,
  }
end

M.DEFAULT_MAX_MEMORY = 512 * 1024 * 1024
M.DEFAULT_MAX_BODY_BYTES = 2 * 1024 * 1024

local UNITS = { [""] = 1, k = 1024, m = 1024 * 1024, g = 1024 * 1024 * 1024 }

-- "512M", "64k", "1G", "1048576" (1024-based; "MiB", "MB" and "M" mean the same) -> bytes, or nil.
function M.parse_size(s)
  local digits, unit = s:match("^(%d+)%s*(%a*)$")
  if not digits then return nil end
  unit = unit:lower():gsub("i?b$", "")
  local n, mult = math.tointeger(tonumber(digits)), UNITS[unit]
  if not n or not mult or n > math.maxinteger // mult then return nil end
  return n * mult
end

-- The default of --max-memory: 512 MiB, or a quarter of the machine's RAM when that is less.
function M.default_max_memory()
  local total = uv.get_total_memory and uv.get_total_memory() or 0
  if total > 0 and total // 4 < M.DEFAULT_MAX_MEMORY then return math.floor(total // 4) end
  return M.DEFAULT_MAX_MEMORY
end

-- Returns a table of flag values (keys without the dashes), or nil, message.
function M.parse(args, first)
  local out = {}
  local i = first or 1
  while i <= #args do
    local a = args[i]
    local name, inline = a:match("^(%-%-[%w-]+)=(.*)$")
    name = name or a
    local kind = FLAGS[name]
    if a == "-h" or a == "--help" then
      out.help = true
    elseif not kind then
      return nil, ("unknown flag '%s'"):format(a)
    elseif kind == "boolean" then
      if inline then return nil, ("flag %s takes no value"):format(name) end
      out[name:sub(3)] = true
    else
      local v = inline
      if v == nil then
        i = i + 1
        v = args[i]
      end
      if v == nil then return nil, ("flag %s needs a value"):format(name) end
      if kind == "integer" then
        v = v:match("^%d+$") and math.tointeger(tonumber(v))
        if not v then return nil, ("flag %s needs a whole number"):format(name) end
      elseif kind == "size" then
        v = M.parse_size(v)
        if not v then return nil, ("flag %s needs a size like 512M, 64K, 2G or a number of bytes"):format(name) end
      elseif kind == "number" then
        v = tonumber(v)
        if not v or v <= 0 then return nil, ("flag %s needs a positive number"):format(name) end
      end
      if kind == "repeatable" then -- every occurrence adds to a list
        local list = out[name:sub(3)] or {}
        list[#list + 1] = v
        out[name:sub(3)] = list
      else
        out[name:sub(3)] = v
      end
    end
    i = i + 1
  end
  return out
end

-- The origins given with --cors: "*" anywhere allows any origin.
function M.cors_origins(list)
  for _, o in ipairs(list) do
    if o == "*" then return "*" end
  end
  return list
end

local function die(msg)
  io.stderr:write("longpoll: ", msg, "\n(see longpoll serve --help)\n")
  return 2
end

local function module_dir()
  local path = package.searchpath("longpoll.manager", package.path)
  return path and path:match("^(.*)/manager%.lua$")
end

function M.serve(flags)
  local longpoll = require "longpoll"
  local server_mod = require "longpoll.server"
  local add_ons = {}
  local file_mod, file
  if flags.persist then
    local err
    file_mod = require("longpoll.addons").file
    file, err = file_mod {
      path = flags.persist, flush_interval_ms = flags["flush-ms"] or 1000, fsync = flags.fsync or false,
      max_event_buffer_size = flags["buffer-size"], event_ttl_seconds = flags.ttl,
    }
    if not file then return die(err) end
    add_ons[#add_ons + 1] = file
  end
  local redis, rerr = M.redis_option(flags)
  if rerr then return die(rerr) end
  if flags["max-memory"] and redis then
    return die("--max-memory cannot be used with Redis (events are kept in Redis: set maxmemory there)")
  end
  local token = flags["publish-token"] or os.getenv("LONGPOLL_PUBLISH_TOKEN")
  if token == "" then token = nil end
  if token then
    local terr = auth.check_token(token)
    if terr then return die(terr) end
  end
  local max_memory = flags["max-memory"] or (not redis and M.default_max_memory()) or nil
  local cors_option = flags.cors and { origins = M.cors_origins(flags.cors) } or nil
  if cors_option and token then -- browsers must be allowed to send the token
    cors_option.allow_headers = { "Content-Type", "Last-Event-ID", "Idempotency-Key", "Authorization" }
  end
  local category_rules
  for _, text in ipairs(flags["category-rule"] or {}) do
    local rule, rule_err = require("longpoll.category_rules").parse_cli(text)
    if not rule then return die(rule_err) end
    category_rules = category_rules or {}
    category_rules[#category_rules + 1] = rule
  end
  local manager, err = longpoll.start {
    max_longpoll_timeout_seconds = flags["max-timeout"],
    max_event_buffer_size = flags["buffer-size"],
    event_ttl_seconds = flags.ttl,
    delete_event_after_first_retrieval = flags["delete-after-first"] or nil,
    subscribe_error_status = flags["error-status"],
    add_on = #add_ons > 0 and add_ons or nil,
    logger = { level = flags["log-level"] or "warn" },
    redis = redis,
    cors = cors_option,
    max_buffered_bytes = max_memory,
    max_categories = flags["max-categories"],
    max_answer_bytes = flags["max-answer-bytes"],
    stats_categories = flags["stats-categories"] or nil,
    idempotency_window_seconds = flags["idempotency-window"],
    idempotency_max_keys = flags["idempotency-max-keys"],
    category_rules = category_rules,
  }
  if not manager then return die(err) end
  local srv, serr = server_mod.new {
    host = flags.host or "127.0.0.1", port = flags.port or 8101,
    max_connections = flags["max-connections"],
    max_body_bytes = flags["max-body-bytes"] or M.DEFAULT_MAX_BODY_BYTES,
    logger = manager.logger,
  }
  if not srv then
    manager:shutdown()
    return die(serr)
  end
  srv:route("GET", flags["subscribe-path"] or "/events", manager.subscription_handler)
  local publish_path = flags["publish-path"] or "/publish"
  if publish_path ~= "" then
    local publish = manager.publish_handler
    -- a full disk pauses publishing (503) rather than acknowledging events it cannot keep
    if file then publish = file_mod.guard(file, publish) end
    if token then
      publish = auth.require_bearer(publish, token, { cors = cors_option and cors_mod.new(cors_option) })
    end
    srv:route("*", publish_path, publish)
  end
  local sse_path, stats_path = flags["sse-path"] or "/sse", flags["stats-path"] or "/stats"
  for flag, path in pairs { ["--sse-path"] = sse_path, ["--stats-path"] = stats_path } do
    if path ~= "" and path:sub(1, 1) ~= "/" then return die(flag .. " must start with '/'") end
  end
  if sse_path ~= "" then srv:route("GET", sse_path, manager.sse_handler) end
  if stats_path ~= "" then srv:route("GET", stats_path, manager.stats_handler) end
  local dashboard_path = flags.dashboard
  if dashboard_path then
    if dashboard_path:sub(1, 1) ~= "/" then return die("--dashboard must start with '/'") end
    if stats_path == "" then return die("--dashboard needs the stats path (it polls it)") end
    srv:route("GET", dashboard_path, require("longpoll.dashboard").handler(stats_path))
  end
  if flags.cors then -- preflight requests come as OPTIONS (publish is mounted for every method)
    srv:route("OPTIONS", flags["subscribe-path"] or "/events", manager.subscription_handler)
    if sse_path ~= "" then srv:route("OPTIONS", sse_path, manager.sse_handler) end
    if stats_path ~= "" then srv:route("OPTIONS", stats_path, manager.stats_handler) end
  end
  -- the browser client is served from the installed module's js/ folder
  local dir = module_dir()
  if dir then srv:static(flags["js-prefix"] or "/js/", dir .. "/js") end
  if flags.static then srv:static("/", flags.static) end
  local port, lerr = srv:listen()
  if not port then return die("cannot listen: " .. tostring(lerr)) end
  if publish_path ~= "" and not token and not auth.is_loopback(srv.host) then
    io.stderr:write(("longpoll: warning: listening on %s with open publishing: anyone who reaches this"
      .. " port can publish. Set --publish-token (or LONGPOLL_PUBLISH_TOKEN), or --publish-path ''.\n")
      :format(srv.host))
    io.stderr:flush()
  end
  if not flags.quiet then
    local host = srv.host:find(":") and ("[" .. srv.host .. "]") or srv.host
    io.stdout:write(("longpoll listening on http://%s:%d/\n"):format(host, port))
    io.stdout:flush()
  end
  local signals = {}
  local stopping = false
  local function stop()
    if stopping then return end
    stopping = true
    for _, s in ipairs(signals) do s:close() end
    -- waiting polls get the timeout answer, add-ons flush, then the server closes
    manager:shutdown_with_timeout(5, function()
      srv:close(function() end)
    end)
  end
  for _, name in ipairs { "sigint", "sigterm" } do
    local s = uv.new_signal()
    s:start(name, stop)
    signals[#signals + 1] = s
  end
  uv.run()
  return 0
end

function M.main(args)
  args = args or {}
  if args[1] == "-h" or args[1] == "--help" or args[1] == "help" then
    io.stdout:write(USAGE)
    return 0
  end
  if args[1] ~= "serve" then return die(args[1] and ("unknown command '" .. args[1] .. "'") or "missing command") end
  local flags, err = M.parse(args, 2)
  if not flags then return die(err) end
  if flags.help then
    io.stdout:write(USAGE)
    return 0
  end
  return M.serve(flags)
end

return M
