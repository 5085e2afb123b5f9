-- Small HTTP helpers shared by the server, requests and responses: HTTP dates, MIME types,
-- status texts and base64 (for Basic auth).
local util = {}

local byte, char, find, gsub, sub, lower = string.byte, string.char, string.find, string.gsub,
  string.sub, string.lower
local os_date, os_time = os.date, os.time

-- An HTTP date (Last-Modified, Date) for a Unix time t, or now.
function util.http_date(t)
  return os_date("!%a, %d %b %Y %H:%M:%S GMT", t or os_time())
end

util.mime_types = {
  html = "text/html; charset=utf-8",
  htm = "text/html; charset=utf-8",
  css = "text/css; charset=utf-8",
  js = "application/javascript; charset=utf-8",
  mjs = "application/javascript; charset=utf-8",
  json = "application/json",
  map = "application/json",
  txt = "text/plain; charset=utf-8",
  md = "text/markdown; charset=utf-8",
  xml = "application/xml",
  svg = "image/svg+xml",
  png = "image/png",
  jpg = "image/jpeg",
  jpeg = "image/jpeg",
  gif = "image/gif",
  webp = "image/webp",
  ico = "image/x-icon",
  wasm = "application/wasm",
  woff = "font/woff",
  woff2 = "font/woff2",
  pdf = "application/pdf",
}

function util.mime_type(path)
  local ext = string.match(path, "%.([%w]+)$")
  return ext and util.mime_types[lower(ext)] or "application/octet-stream"
end

util.status_text = {
  [100] = "Continue", [101] = "Switching Protocols",
  [200] = "OK", [201] = "Created", [202] = "Accepted", [204] = "No Content",
  [206] = "Partial Content",
  [301] = "Moved Permanently", [302] = "Found", [303] = "See Other", [304] = "Not Modified",
  [307] = "Temporary Redirect", [308] = "Permanent Redirect",
  [400] = "Bad Request", [401] = "Unauthorized", [403] = "Forbidden", [404] = "Not Found",
  [405] = "Method Not Allowed", [408] = "Request Timeout", [409] = "Conflict", [410] = "Gone",
  [411] = "Length Required", [413] = "Content Too Large", [414] = "URI Too Long",
  [415] = "Unsupported Media Type", [417] = "Expectation Failed", [422] = "Unprocessable Content",
  [429] = "Too Many Requests",
  [431] = "Request Header Fields Too Large",
  [500] = "Internal Server Error", [501] = "Not Implemented", [502] = "Bad Gateway",
  [503] = "Service Unavailable", [504] = "Gateway Timeout", [505] = "HTTP Version Not Supported",
}

local alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
local b64 = {}
do
  for i = 1, 64 do
    b64[byte(alphabet, i)] = i - 1
  end
end

-- Standard base64 with optional '=' padding; nil when the input is not valid base64.
function util.base64_decode(s)
  s = gsub(s, "=+$", "")
  local n = #s
  if n % 4 == 1 or find(s, "[^%w+/]") then
    return nil
  end
  local out = {}
  for i = 1, n, 4 do
    local a, b, c, d = byte(s, i, i + 3)
    local v = (b64[a] << 18) | (b64[b] << 12) | ((c and b64[c] or 0) << 6) | (d and b64[d] or 0)
    if d then
      out[#out + 1] = char(v >> 16, (v >> 8) & 255, v & 255)
    elseif c then
      out[#out + 1] = char(v >> 16, (v >> 8) & 255)
    else
      out[#out + 1] = char(v >> 16)
    end
  end
  return table.concat(out)
end

-- Standard base64 with '=' padding (for Authorization: Basic).
function util.base64_encode(s)
  local out = {}
  for i = 1, #s, 3 do
    local a, b, c = byte(s, i, i + 2)
    local v = (a << 16) | ((b or 0) << 8) | (c or 0)
    local quad = {}
    for k = 1, 4 do
      local digit = ((v >> (24 - 6 * k)) & 63) + 1
      quad[k] = sub(alphabet, digit, digit)
    end
    if not c then quad[4] = "=" end
    if not b then quad[3] = "=" end
    out[#out + 1] = table.concat(quad)
  end
  return table.concat(out)
end

return util
