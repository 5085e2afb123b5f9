-- The `redis` option of longpoll.start: its checks (one message naming the
-- key that is wrong) and the parsed form the engine uses.
--   redis = { url = "redis://[[user]:password@]host[:port][/db]", prefix = "longpoll:",
--             connect_timeout_ms = 2000, command_timeout_ms = 5000,
--             reconnect_min_ms = 100, reconnect_max_ms = 2000,
--             sentinels = { "host:port", ... }, master_name = "mymaster",  -- Sentinel
--             wait_replicas = 0, wait_timeout_ms = 1000,                   -- WAIT after publish
--             shards = { "redis://host:port", ... },                        -- client-side sharding
--             cache = true,   -- answer catch-ups from the node's copy of the stream (no TTL only)
--             transport = nil }   -- specs only: { message = f, reply = f }, see engine/redis/link.lua
-- With sentinels, the URL gives only credentials and database; the master's address comes from
-- the sentinels. With shards, each URL is one master; every node must list them in one order.
local M = {}

M.DEFAULT_URL = "redis://127.0.0.1:6379/0"

local URL_FORM = "redis://[[user]:password@]host[:port][/db]"

local function unescape(s)
  return (s:gsub("%%(%x%x)", function(h) return string.char(tonumber(h, 16)) end))
end

-- Parses a redis:// URL. Returns { host, port, db, user, password } or nil, message.
function M.parse_url(url)
  if type(url) ~= "string" then return nil, "must be a string, " .. URL_FORM end
  local rest = url:match("^redis://(.*)$")
  if not rest then return nil, ("must look like %s (got %q)"):format(URL_FORM, url) end
  if rest:find("[?#]") then return nil, "must not carry a query or a fragment" end
  local out = { port = 6379, db = 0 }
  local userinfo, hostpart = rest:match("^(.*)@([^@]*)$")
  if userinfo then
    local user, password = userinfo:match("^([^:]*):(.*)$")
    if not user then return nil, "must write credentials as user:password@ or :password@" end
    if password == "" then return nil, "has an empty password" end
    if user ~= "" then out.user = unescape(user) end
    out.password = unescape(password)
  else
    hostpart = rest
  end
  local hostport, db = hostpart:match("^([^/]*)/(.*)$")
  if hostport then
    if db ~= "" then
      local n = db:match("^%d+$") and math.tointeger(tonumber(db))
      if not n or n > 1000000 then return nil, ("has a bad database number %q"):format(db) end
      out.db = n
    end
  else
    hostport = hostpart
  end
  local host, port
  if hostport:sub(1, 1) == "[" then -- [IPv6 address]:port
    host, port = hostport:match("^%[([^%]]+)%](.*)$")
  else
    host, port = hostport:match("^([^:]*)(.*)$")
  end
  if not host or host == "" then return nil, ("has no host (%s)"):format(URL_FORM) end
  if port ~= "" then
    local n = port:match("^:(%d+)$")
    n = n and math.tointeger(tonumber(n))
    if not n or n < 1 or n > 65535 then return nil, ("has a bad port %q"):format(port:sub(2)) end
    out.port = n
  end
  out.host = host
  return out
end

-- Parses "host:port" (or "[v6]:port"). Returns { host =, port = } or nil, message.
function M.parse_address(v)
  if type(v) ~= "string" then return nil, "must be \"host:port\" strings" end
  local host, port = v:match("^%[([^%]]+)%]:(%d+)$")
  if not host then host, port = v:match("^([^:]+):(%d+)$") end
  port = port and math.tointeger(tonumber(port))
  if not host or not port or port < 1 or port > 65535 then return nil, ("has a bad address %q (host:port)"):format(v) end
  return { host = host, port = port }
end

local function list_of(check_one, what)
  return function(v)
    if type(v) ~= "table" or #v == 0 or #v > 64 then return "must be a list of 1 to 64 " .. what end
    for k in pairs(v) do
      if math.type(k) ~= "integer" or k < 1 or k > #v then return "must be a list of " .. what end
    end
    for _, x in ipairs(v) do
      local ok, err = check_one(x)
      if not ok then return err end
    end
  end
end

local function integer(min, max)
  return function(v)
    if math.type(v) ~= "integer" then return "must be an integer" end
    if v < min or v > max then return ("must be between %d and %d"):format(min, max) end
  end
end

local KEYS = {
  url = { M.DEFAULT_URL, function(v) local ok, err = M.parse_url(v); if not ok then return err end end },
  prefix = { "longpoll:", function(v)
    if type(v) ~= "string" or #v < 1 or #v > 256 then return "must be a string of 1 to 256 bytes" end
  end },
  connect_timeout_ms = { 2000, integer(1, 600000) },
  command_timeout_ms = { 5000, integer(1, 600000) },
  reconnect_min_ms = { 100, integer(1, 600000) },
  reconnect_max_ms = { 2000, integer(1, 600000) },
  sentinels = { nil, list_of(M.parse_address, "\"host:port\" strings") },
  master_name = { nil, function(v)
    if type(v) ~= "string" or not v:match("^[%w._-]+$") or #v > 200 then
      return "must be a Sentinel master name (letters, digits, '.', '_', '-')"
    end
  end },
  wait_replicas = { 0, integer(0, 100) },
  wait_timeout_ms = { 1000, integer(1, 600000) },
  shards = { nil, list_of(M.parse_url, "redis:// URLs") },
  cache = { true, function(v) if type(v) ~= "boolean" then return "must be true or false" end end },
  transport = { nil, function(v)
    if type(v) ~= "table" then return "must be a table of functions (message, reply)" end
    for k, f in pairs(v) do
      if (k ~= "message" and k ~= "reply") or type(f) ~= "function" then
        return "may only hold the functions 'message' and 'reply'"
      end
    end
  end },
}

-- Checks the option's value: nil when fine, otherwise the message that
-- follows "option 'redis' ".
function M.check(v)
  if type(v) ~= "table" then return "must be a table such as { url = \"" .. M.DEFAULT_URL .. "\" }" end
  for k in pairs(v) do
    if not KEYS[k] then return ("has an unknown key '%s'"):format(tostring(k)) end
  end
  for k, spec in pairs(KEYS) do
    if v[k] ~= nil then
      local err = spec[2](v[k])
      if err then return ("key '%s' %s"):format(k, err) end
    end
  end
  local min, max = v.reconnect_min_ms or KEYS.reconnect_min_ms[1], v.reconnect_max_ms or KEYS.reconnect_max_ms[1]
  if min > max then return "key 'reconnect_min_ms' must not exceed 'reconnect_max_ms'" end
  if (v.sentinels == nil) ~= (v.master_name == nil) then return "needs both 'sentinels' and 'master_name'" end
  if v.shards and v.sentinels then return "cannot have both 'shards' and 'sentinels'" end
  if v.shards and v.url then return "cannot have both 'shards' and 'url' (list every master in 'shards')" end
  local wait_ms = v.wait_timeout_ms or KEYS.wait_timeout_ms[1]
  if (v.wait_replicas or 0) > 0 and wait_ms >= (v.command_timeout_ms or KEYS.command_timeout_ms[1]) then
    return "key 'wait_timeout_ms' must be below 'command_timeout_ms'"
  end
end

-- The checked option with defaults filled in and the URL parsed: a list of one resolved table per
-- Redis master (one unless 'shards'); each has host, port, db, user, password, and, with
-- Sentinel, sentinels = { { host =, port = }, ... } and master_name.
function M.resolve(v)
  local base = {}
  for k, spec in pairs(KEYS) do
    if v[k] == nil then base[k] = spec[1] else base[k] = v[k] end
  end
  local urls = base.shards or { base.url }
  base.shards = nil
  if base.sentinels then
    local list = {}
    for i, a in ipairs(base.sentinels) do list[i] = assert(M.parse_address(a)) end
    base.sentinels = list
  end
  local out = {}
  for i, url in ipairs(urls) do
    local cfg = {}
    for k, x in pairs(base) do cfg[k] = x end
    for k, x in pairs(assert(M.parse_url(url))) do cfg[k] = x end
    cfg.url = url
    out[i] = cfg
  end
  return out
end

return M
