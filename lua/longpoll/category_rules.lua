-- Per-category rules (issue 17, part 2): a category's buffer size, TTL and delete-after-first
-- chosen by its name. The options `category_rules` (a list, first match wins) and
-- `category_options` (a function) are checked here, the command line's --category-rule is
-- parsed here, and resolver() makes the one function the engines ask once per new category
-- (the C store through core.new_store's category_limits; Redis through a bounded cache).
local M = {}

local FOREVER = -1 -- longpoll.FOREVER

local RULE_FIELDS = {
  prefix = true, match = true, max_event_buffer_size = true, event_ttl_seconds = true,
  delete_event_after_first_retrieval = true,
}

local function check_limits(t, where)
  local n = t.max_event_buffer_size
  if n ~= nil and (math.type(n) ~= "integer" or n < 1 or n > 100000000) then
    return where .. "'max_event_buffer_size' must be an integer between 1 and 100000000"
  end
  local ttl = t.event_ttl_seconds
  if ttl ~= nil and ttl ~= FOREVER and ttl ~= math.huge
    and (type(ttl) ~= "number" or ttl ~= ttl or ttl <= 0 or ttl > 315360000) then
    return where .. "'event_ttl_seconds' must be a positive number of seconds (at most ten years), or longpoll.FOREVER"
  end
  local d = t.delete_event_after_first_retrieval
  if d ~= nil and type(d) ~= "boolean" then
    return where .. "'delete_event_after_first_retrieval' must be a boolean"
  end
end

-- Checks the option category_rules; returns nil or a message (without the option's name).
function M.check_rules(rules)
  if type(rules) ~= "table" or (next(rules) ~= nil and #rules == 0) then
    return "must be a list of rules { prefix = \"chat/\" | match = \"^presence/\", max_event_buffer_size =,"
      .. " event_ttl_seconds =, delete_event_after_first_retrieval = }"
  end
  for k in pairs(rules) do
    if math.type(k) ~= "integer" then return "must be a list (found the key '" .. tostring(k) .. "')" end
  end
  for i, r in ipairs(rules) do
    local where = ("rule %d: "):format(i)
    if type(r) ~= "table" then return where .. "must be a table" end
    for k in pairs(r) do
      if not RULE_FIELDS[k] then
        return where .. ("unknown field '%s' (known: prefix, match, max_event_buffer_size, event_ttl_seconds,"
          .. " delete_event_after_first_retrieval)"):format(tostring(k))
      end
    end
    if (r.prefix == nil) == (r.match == nil) then return where .. "needs exactly one of 'prefix' and 'match'" end
    if r.prefix ~= nil and (type(r.prefix) ~= "string" or r.prefix == "") then
      return where .. "'prefix' must be a non-empty string"
    end
    if r.match ~= nil then
      if type(r.match) ~= "string" or r.match == "" then return where .. "'match' must be a non-empty Lua pattern" end
      local ok, err = pcall(string.find, "", r.match)
      if not ok then return where .. "'match' is not a valid Lua pattern: " .. tostring(err):gsub("^.-:%d+: ", "") end
    end
    if r.max_event_buffer_size == nil and r.event_ttl_seconds == nil and r.delete_event_after_first_retrieval == nil then
      return where .. "sets nothing (give max_event_buffer_size, event_ttl_seconds or delete_event_after_first_retrieval)"
    end
    local err = check_limits(r, where)
    if err then return err end
  end
end

-- The C store's form of limits: { max_event_buffer_size =, event_ttl_ms = (0: forever),
-- delete_after_first = }, each field falling back to the global options.
local function store_limits(t, options)
  local ttl = t.event_ttl_seconds
  if ttl == nil then ttl = options.event_ttl_seconds end
  local ttl_ms = (ttl == FOREVER or ttl == math.huge) and 0 or math.max(1, math.floor(ttl * 1000))
  local d = t.delete_event_after_first_retrieval
  if d == nil then d = options.delete_event_after_first_retrieval end
  return { max_event_buffer_size = t.max_event_buffer_size or options.max_event_buffer_size,
    event_ttl_ms = ttl_ms, delete_after_first = d or false }
end

-- Whether any per-category setting is configured.
function M.configured(options)
  return options.category_rules ~= nil or options.category_options ~= nil
end

-- Checks rules against the engine: delete-after-first cannot be honoured with Redis (the nodes
-- could not agree which retrieval is the first). Returns nil or a message.
function M.check_with(options)
  if options.redis and options.category_rules then
    for i, r in ipairs(options.category_rules) do
      if r.delete_event_after_first_retrieval then
        return ("option 'category_rules' rule %d: 'delete_event_after_first_retrieval' cannot be used with 'redis'"
          .. " (the nodes could not agree on which retrieval is the first)"):format(i)
      end
    end
  end
end

-- resolver(options, log) -> nil when nothing is configured, else function(category) -> limits
-- (store_limits' form). category_options(category) is called once per call here (the engines
-- cache); a bad answer or an error is logged and the global options apply.
function M.resolver(options, log)
  if not M.configured(options) then return nil end
  local rules = {}
  for i, r in ipairs(options.category_rules or {}) do
    rules[i] = { prefix = r.prefix, match = r.match, limits = store_limits(r, options) }
  end
  local defaults = store_limits({}, options)
  local fn = options.category_options
  local find, sub = string.find, string.sub
  return function(category)
    for i = 1, #rules do
      local r = rules[i]
      if r.prefix then
        if sub(category, 1, #r.prefix) == r.prefix then return r.limits end
      elseif find(category, r.match) then
        return r.limits
      end
    end
    if fn then
      local ok, t = pcall(fn, category)
      if not ok then
        log("error", "category_options failed", { category = category, error = tostring(t) })
        return defaults
      end
      if t == nil then return defaults end
      if type(t) ~= "table" then
        log("error", "category_options must return a table or nil", { category = category })
        return defaults
      end
      local err = check_limits(t, "")
      if not err then
        for k in pairs(t) do
          if k ~= "max_event_buffer_size" and k ~= "event_ttl_seconds" and k ~= "delete_event_after_first_retrieval" then
            err = ("unknown field '%s'"):format(tostring(k))
          end
        end
      end
      if not err and options.redis and t.delete_event_after_first_retrieval then
        err = "'delete_event_after_first_retrieval' cannot be used with 'redis'"
      end
      if err then
        log("error", "category_options returned bad limits: the global options apply",
          { category = category, error = err })
        return defaults
      end
      return store_limits(t, options)
    end
    return defaults
  end
end

---------------------------------------------------------------------------------------------
-- The command line: --category-rule 'chat/*:buffer=50,ttl=600' (repeatable)

local SETTINGS = {
  buffer = "max_event_buffer_size",
  ttl = "event_ttl_seconds",
  ["delete-after-first"] = "delete_event_after_first_retrieval",
}

-- parse_cli("chat/*:buffer=50,ttl=600") -> rule | nil, message. The category part is a prefix
-- ending in '*' ("chat/*"), or an exact name; settings: buffer=N, ttl=S (or ttl=forever),
-- delete-after-first.
function M.parse_cli(text)
  local function bad(why)
    return nil, ("--category-rule '%s': %s (form: 'PREFIX*:buffer=N,ttl=S,delete-after-first')"):format(text, why)
  end
  local cat, settings = text:match("^([^:]+):(.+)$")
  if not cat then return bad("needs CATEGORY:SETTINGS") end
  local rule = {}
  if cat:sub(-1) == "*" then
    rule.prefix = cat:sub(1, -2)
    if rule.prefix == "" then return bad("the prefix before '*' is empty (the global flags set every category)") end
    if rule.prefix:find("*", 1, true) then return bad("'*' only at the end") end
  else
    if cat:find("*", 1, true) then return bad("'*' only at the end") end
    rule.match = "^" .. cat:gsub("[%^%$%(%)%%%.%[%]%*%+%-%?]", "%%%0") .. "$"
  end
  for item in (settings .. ","):gmatch("([^,]*),") do
    local k, v = item:match("^%s*([%w-]+)%s*=%s*(.-)%s*$")
    k = k or item:match("^%s*([%w-]+)%s*$")
    local field = k and SETTINGS[k]
    if not field then return bad(("unknown setting '%s' (known: buffer, ttl, delete-after-first)"):format(item)) end
    if field == "delete_event_after_first_retrieval" then
      if v ~= nil and v ~= "true" and v ~= "false" then return bad("delete-after-first takes no value") end
      rule[field] = v ~= "false"
    elseif v == nil or v == "" then
      return bad(k .. " needs a value")
    elseif field == "max_event_buffer_size" then
      local n = v:match("^%d+$") and math.tointeger(tonumber(v))
      if not n or n < 1 then return bad("buffer needs a whole number of at least 1") end
      rule[field] = n
    else
      if v == "forever" then
        rule[field] = FOREVER
      else
        local n = tonumber(v)
        if not n or n <= 0 or n ~= n then return bad("ttl needs a positive number of seconds, or 'forever'") end
        rule[field] = n
      end
    end
  end
  local err = M.check_rules { rule }
  if err then return bad(err:gsub("^rule 1: ", "")) end
  return rule
end

return M
