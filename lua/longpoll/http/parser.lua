-- Incremental HTTP/1.x request parser, sans-I/O: bytes go in with push(), parse() hands back a
-- complete request, nil ("need more bytes") or nil, status, message (malformed; close after).
-- The parsing itself is C (src/lp_http.c, through longpoll.core).
--
--   local p = parser.new{ max_header_bytes = 16384, max_body_bytes = 1048576, max_url_bytes = 8192 }
--   p:push(bytes)
--   local req, status, message = p:parse()  -- with a request, status is the count of bytes
--                                            -- still buffered (pipelined requests)
--   -- req = { method, target, version = "1.1"|"1.0", headers = { lower-name = value },
--   --         body, keep_alive, expect_continue,
--   --         path, raw_path, raw_query, query, query_count (see longpoll.http.request) }
--   -- while only the body is missing, p.head holds the request parsed so far (for 100-continue).
--   p:buffered()     -- bytes received but not yet part of a request
--   p:in_progress()  -- true while a request has started but is not complete
--   p:close()        -- frees the buffers now (a connection waiting on a long poll keeps none)
local core = require "longpoll.core"

local parser = {}

function parser.new(limits)
  return core.http_parser(limits)
end

return parser
