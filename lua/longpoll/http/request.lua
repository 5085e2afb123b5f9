-- The request object handlers receive: the parser's table (which holds the decoded path, and the
-- decoded query, or for the server engine's requests only the checked raw query, see
-- longpoll.http.parser) given shared methods (no per-request closures: 50,000 waiting long polls
-- are common).
local core = require "longpoll.core"
local util = require "longpoll.http.util"

local find, sub, lower = string.find, string.sub, string.lower
local query_all, query_table = core.http_query_all, core.http_query
local rawget, rawset = rawget, rawset

local request = {}

local Request = {}
-- Methods; and req.query / req.query_count, made from raw_query when a handler first reads them
-- (the server engine checks the query but leaves the table to the handlers that use it: a
-- wrapper that reads a header and hands the request back never pays for it).
Request.__index = function(req, key)
  local method = Request[key]
  if method ~= nil then return method end
  if key == "query" or key == "query_count" then
    local q, n = query_table(rawget(req, "raw_query") or "")
    rawset(req, "query", q)
    rawset(req, "query_count", n)
    return key == "query" and q or n
  end
  return nil
end
request.methods = Request -- what every request has (its metatable's __index is a function)

-- All values of a query parameter in order ({} when absent).
function Request:query_all(key)
  local override = self.query_override
  if override and override[key] then
    return { table.unpack(override[key]) }
  end
  return query_all(self.raw_query, key)
end

-- Replaces a query parameter for the handlers that run next (a wrapper
-- mapping a path segment to a category, say). value: a string, a list of
-- strings, or nil to remove it.
function Request:set_query(key, value)
  local values = type(value) == "table" and value or { value }
  self.query[key] = values[1]
  self.query_override = self.query_override or {}
  self.query_override[key] = values
end

-- True while the request is as the client sent it (no set_query): a native handler may then
-- answer it from the bytes received (longpoll.http.native).
function Request:as_received()
  return self.query_override == nil
end

-- user, password from "Authorization: Basic ..."; nil when absent or malformed.
function Request:basic_auth()
  local auth = self.headers.authorization
  if not auth or lower(sub(auth, 1, 6)) ~= "basic " then
    return nil
  end
  local _, _, token = find(auth, "^%s*(%S+)%s*$", 7)
  local decoded = token and util.base64_decode(token)
  local colon = decoded and find(decoded, ":", 1, true)
  if not colon then
    return nil
  end
  return sub(decoded, 1, colon - 1), sub(decoded, colon + 1)
end

-- Turns a parsed request (a table from the C engine or longpoll.http.parser, which already holds
-- the decoded path and query) into a request object in place. Returns it, or nil, message when
-- its target could not be decoded (the caller answers 400). remote_addr: "ip:port" of the client,
-- when the table does not carry it already.
function request.new(parsed, remote_addr)
  local err = parsed.target_error
  if err then
    return nil, err
  end
  if remote_addr then
    parsed.remote_addr = remote_addr
  end
  return setmetatable(parsed, Request)
end

return request
