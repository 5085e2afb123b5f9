-- CORS for the manager's handlers (option `cors`): the checks of the option, the headers of
-- answers to allowed origins, and the answers to preflight OPTIONS requests.
local core = require "longpoll.core"

local find, lower, concat, format = string.find, string.lower, table.concat, string.format

local M = {}

M.DEFAULT_ALLOW_HEADERS = { "Content-Type", "Last-Event-ID", "Idempotency-Key" }
-- answer headers scripts of another origin may read (a publish replayed for its Idempotency-Key)
M.EXPOSE_HEADERS = "Idempotent-Replayed"
M.DEFAULT_MAX_AGE = 600

local FIELDS = { origins = true, allow_headers = true, max_age = true, credentials = true }

local function is_origin(s)
  -- scheme://host[:port], as browsers send it: no path, no trailing slash
  return type(s) == "string" and find(s, "^%a[%w+.-]*://[^/?#%s]+$") ~= nil
end

local function is_token(s)
  return type(s) == "string" and find(s, "^[%w!#$%%&'*+.^_`|~-]+$") ~= nil
end

-- Checks the option's value; returns nil when good, or the end of a message that follows
-- "option 'cors' ".
function M.check(v)
  if type(v) ~= "table" then
    return 'must be a table like { origins = { "https://a.example" } } or { origins = "*" }'
  end
  for k in pairs(v) do
    if not FIELDS[k] then
      return format("has an unknown field '%s' (known: origins, allow_headers, max_age, credentials)", tostring(k))
    end
  end
  local origins = v.origins
  if origins == nil then
    return 'needs the field \'origins\': "*" or a list of origins like "https://a.example"'
  elseif origins ~= "*" then
    if type(origins) ~= "table" or #origins == 0 then
      return 'field \'origins\' must be "*" or a non-empty list of origins like "https://a.example"'
    end
    for k in pairs(origins) do
      if math.type(k) ~= "integer" or k < 1 or k > #origins then
        return "field 'origins' must be a list (no other keys)"
      end
    end
    for i, o in ipairs(origins) do
      if not is_origin(o) then
        return format("field 'origins' entry %d (%s) is not an origin: scheme://host[:port], without path or trailing slash",
          i, type(o) == "string" and format("%q", o) or type(o))
      end
    end
  end
  local headers = v.allow_headers
  if headers ~= nil then
    if type(headers) ~= "table" then return "field 'allow_headers' must be a list of header names" end
    for i, h in ipairs(headers) do
      if not is_token(h) then
        return format("field 'allow_headers' entry %d is not a header name", i)
      end
    end
  end
  local max_age = v.max_age
  if max_age ~= nil and (math.type(max_age) ~= "integer" or max_age < 0 or max_age > 86400) then
    return "field 'max_age' must be an integer number of seconds, 0 to 86400"
  end
  if v.credentials ~= nil and type(v.credentials) ~= "boolean" then
    return "field 'credentials' must be a boolean"
  end
  if v.credentials and origins == "*" then
    return 'cannot allow credentials for origins = "*": list the origins instead'
  end
  return nil
end

local Policy = {}
Policy.__index = Policy

-- A policy from a checked option value.
function M.new(v)
  local p = setmetatable({
    any = v.origins == "*",
    origins = {},
    allow_headers = concat(v.allow_headers or M.DEFAULT_ALLOW_HEADERS, ", "),
    max_age = tostring(v.max_age or M.DEFAULT_MAX_AGE),
    credentials = v.credentials == true,
  }, Policy)
  if not p.any then
    for _, o in ipairs(v.origins) do p.origins[lower(o)] = true end
  end
  return p
end

-- The Access-Control-Allow-Origin value for a request's Origin, or nil when not allowed.
function Policy:allow_origin(origin)
  if self.any then return "*" end
  if origin and self.origins[lower(origin)] then return origin end
  return nil
end

-- Adds the headers every answer carries; returns whether the origin is allowed.
function Policy:add_headers(req, res)
  local allowed = self:allow_origin(req.headers.origin)
  if not self.any then
    -- the answer differs by Origin, so caches must keep them apart
    local vary = res:get_header("Vary")
    res:set_header("Vary", vary and (vary .. ", Origin") or "Origin")
  end
  if allowed then
    res:set_header("Access-Control-Allow-Origin", allowed)
    res:set_header("Access-Control-Expose-Headers", M.EXPOSE_HEADERS)
    if self.credentials then res:set_header("Access-Control-Allow-Credentials", "true") end
  end
  return allowed ~= nil
end

-- The policy as the HTTP engine's native handlers take it (core.native_subscription's `cors`),
-- for a route serving route_methods: the same headers, written in C.
function Policy:native(route_methods)
  local origins = {}
  for o in pairs(self.origins) do origins[#origins + 1] = o end
  table.sort(origins)
  return {
    any = self.any,
    origins = origins,
    credentials = self.credentials,
    preflight = "Access-Control-Allow-Methods: " .. route_methods .. ", OPTIONS\r\n"
      .. "Access-Control-Allow-Headers: " .. self.allow_headers .. "\r\n"
      .. "Access-Control-Max-Age: " .. self.max_age .. "\r\n",
  }
end

local function method_not_allowed(res, allow)
  res:set_header("Allow", allow)
  res:set_header("Content-Type", "application/json")
  return res:send(405, '{"error":' .. core.json_string("method not allowed") .. "}")
end

-- Wraps a handler. route_methods: the methods the route serves ("GET, HEAD" or "POST").
-- other_methods_to_handler: OPTIONS that is not an allowed preflight goes to the handler (the
-- publish handler answers it with its own 405); else it gets 405 here, as from the server.
function M.wrap(policy, handler, route_methods, other_methods_to_handler)
  local allow_methods = route_methods .. ", OPTIONS"
  return function(req, res)
    local allowed = policy:add_headers(req, res)
    if req.method == "OPTIONS" then
      if allowed and req.headers.origin and req.headers["access-control-request-method"] then
        res:set_header("Access-Control-Allow-Methods", allow_methods)
        res:set_header("Access-Control-Allow-Headers", policy.allow_headers)
        res:set_header("Access-Control-Max-Age", policy.max_age)
        return res:send(204)
      end
      if not other_methods_to_handler then return method_not_allowed(res, route_methods) end
    end
    return handler(req, res)
  end
end

-- Wraps the manager's handlers in place (longpoll.start does it when the option is set).
function M.apply(manager)
  local policy = M.new(manager.options.cors)
  manager.cors = policy
  manager.subscription_handler = M.wrap(policy, manager.subscription_handler, "GET, HEAD")
  manager.publish_handler = M.wrap(policy, manager.publish_handler, "POST", true)
  if manager.sse_handler then manager.sse_handler = M.wrap(policy, manager.sse_handler, "GET, HEAD") end
  if manager.stats_handler then manager.stats_handler = M.wrap(policy, manager.stats_handler, "GET, HEAD") end
  return policy
end

return M
