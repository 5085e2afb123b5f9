-- Publish authentication for the standalone server: a handler wrapper that lets a request
-- through only with `Authorization: Bearer <token>` (subscribers are never wrapped).
local answers = require "longpoll.answers"

local M = {}

-- Compares two strings in time that depends on their lengths only, not on where they differ.
local function same_secret(a, b)
  if #a ~= #b then return false end
  local diff = 0
  for i = 1, #a do diff = diff | (a:byte(i) ~ b:byte(i)) end
  return diff == 0
end

-- The token of an `Authorization: Bearer <token>` header (the scheme is case-insensitive,
-- RFC 6750), or nil.
local function bearer_token(value)
  if type(value) ~= "string" then return nil end
  local scheme, token = value:match("^%s*(%S+)%s+(%S+)%s*$")
  if scheme and scheme:lower() == "bearer" then return token end
  return nil
end

-- Checks a token given on the command line or in the environment: nil when good, or a message.
function M.check_token(token)
  if type(token) ~= "string" or #token < 16 then
    return "the publish token must be at least 16 characters (e.g. `openssl rand -hex 16`)"
  end
  if not token:match("^[%w%-._~+/]+=*$") then
    return "the publish token may hold letters, digits and -._~+/ (RFC 6750's token68)"
  end
end

-- Returns handler wrapped: a request without the token gets 401 and a JSON error. OPTIONS
-- goes through untouched (a CORS preflight never carries credentials; the handler answers it).
-- options.cors: a longpoll.cors policy, so that a refused cross-origin request still carries
-- the CORS headers and the browser's script can read the 401.
function M.require_bearer(handler, token, options)
  local err = M.check_token(token)
  if err then error(err, 2) end
  local cors = options and options.cors
  return function(req, res)
    if req.method == "OPTIONS" then return handler(req, res) end
    local given = bearer_token(req.headers.authorization)
    if given and same_secret(given, token) then return handler(req, res) end
    if cors then cors:add_headers(req, res) end
    res:set_header("WWW-Authenticate", 'Bearer realm="longpoll"')
    return answers.send_error(res, 401, "publishing needs the header Authorization: Bearer <token>")
  end
end

-- True for addresses only this machine reaches: 127.0.0.0/8, ::1, localhost.
function M.is_loopback(host)
  return host == "localhost" or host == "::1" or host:match("^127%.%d+%.%d+%.%d+$") ~= nil
    or host:lower():match("^::ffff:127%.") ~= nil
end

return M
