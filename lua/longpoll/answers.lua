-- The answers every handler writes (long poll, publish, SSE, stats, CORS): their header blocks,
-- the JSON error body, and the functions that send them. One place, so every answer of the
-- server carries the same headers.
local core = require "longpoll.core"
local response = require "longpoll.http.response"

local M = {}

local NO_CACHE_LIST = {
  { "Cache-Control", "no-cache, no-store, must-revalidate" },
  { "Pragma", "no-cache" },
  { "Expires", "0" },
  { "X-Content-Type-Options", "nosniff" },
}

local function block_with(first, list)
  local all = { first }
  for i = 1, #list do all[#all + 1] = list[i] end
  return all
end

-- JSON answers: checked once, written as one block.
M.JSON = response.header_block(block_with({ "Content-Type", "application/json" }, NO_CACHE_LIST))

-- The head of a text/event-stream (set header by header: streams are few and long-lived).
M.STREAM_HEADERS = block_with({ "Content-Type", "text/event-stream" }, NO_CACHE_LIST)
-- nginx buffers proxied answers by default, which would hold events back
M.STREAM_HEADERS[#M.STREAM_HEADERS + 1] = { "X-Accel-Buffering", "no" }
-- The same lines as one block, for the engine's C path (core.native_sse).
M.STREAM = response.header_block(M.STREAM_HEADERS)

-- '{"error":"<message>"}'
function M.error_body(message)
  return '{"error":' .. core.json_string(message) .. "}"
end

-- Sends a JSON body (a string) with the no-cache headers.
function M.send_json(res, status, body)
  return res:send_block(status, M.JSON, body)
end

-- Sends {"error": message}.
function M.send_error(res, status, message)
  return res:send_block(status, M.JSON, M.error_body(message))
end

-- The stats in Prometheus' text format: its type with the no-cache headers, as one block.
M.PROMETHEUS_TYPE = "text/plain; version=0.0.4; charset=utf-8"
M.PROMETHEUS = response.header_block(block_with({ "Content-Type", M.PROMETHEUS_TYPE }, NO_CACHE_LIST))

-- Starts an event stream: status 200 and the stream headers.
function M.start_stream(res)
  local list = M.STREAM_HEADERS
  for i = 1, #list do res:set_header(list[i][1], list[i][2]) end
  return res:write_head(200)
end

-- One answer string for many waiting subscribers (a publish waking them): built once by the
-- caller with M.shared(body), written with M.send_shared.
function M.shared(body)
  return response.shared_answer(200, M.JSON, body)
end

-- Writes a shared answer when it fits res as it is, else sends body the usual way.
function M.send_shared(res, answer, body)
  if not res:send_shared(answer, M.JSON) then return M.send_json(res, 200, body) end
  return true
end

return M
