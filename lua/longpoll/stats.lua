-- The stats endpoint: the manager's figures as JSON, or in the Prometheus text exposition
-- format for scrapers (Accept: text/plain, or ?format=prometheus), or the live dashboard for
-- browsers (Accept: text/html; dashboard.lua). Per-category figures are
-- opt-in (option stats_categories: category names can be secrets) and come a bounded page
-- at a time, largest categories first (?categories=1&limit=N&offset=N).
local uv = require "luv"
local core = require "longpoll.core"
local answers = require "longpoll.answers"
local dashboard = require "longpoll.dashboard"

local concat, format, gsub, find, lower = table.concat, string.format, string.gsub, string.find, string.lower

local M = {}

M.PROMETHEUS_TYPE = "text/plain; version=0.0.4; charset=utf-8"

-- name, type, help, key in the stats table
local METRICS = {
  { "longpoll_categories", "gauge", "Categories with buffered events or waiting subscribers.", "categories" },
  { "longpoll_buffered_events", "gauge", "Events held in the buffers.", "events" },
  { "longpoll_buffered_bytes", "gauge", "Bytes of event JSON held in the buffers.", "event_bytes" },
  { "longpoll_waiting_subscribers", "gauge", "Waiting subscriptions: long polls, SSE streams and watches.", "waiting" },
  { "longpoll_long_polls", "gauge", "Long-poll requests waiting for an event.", "long_polls" },
  { "longpoll_sse_streams", "gauge", "Open Server-Sent Events streams.", "sse_streams" },
  { "longpoll_published_events_total", "counter", "Events published since start.", "published" },
  { "longpoll_delivered_events_total", "counter", "Events handed out from the buffers since start.", "delivered" },
  { "longpoll_dropped_events_total", "counter", "Events dropped by buffer size, TTL or the memory cap since start.", "dropped" },
  { "longpoll_evicted_events_total", "counter",
    "Events dropped to stay under the memory cap (max_buffered_bytes) since start.", "evicted" },
  { "longpoll_buffered_memory_bytes", "gauge",
    "Bytes the buffers hold with their bookkeeping: what max_buffered_bytes caps.", "buffered_bytes" },
  { "longpoll_last_event_timestamp_milliseconds", "gauge", "Timestamp of the newest event (epoch ms).", "last_timestamp" },
  { "longpoll_uptime_seconds", "gauge", "Seconds since the manager started.", "uptime_seconds" },
  { "longpoll_idempotency_keys", "gauge", "Idempotency-Keys remembered (in memory; in Redis mode they live in Redis).",
    "idempotency_keys" },
  { "longpoll_idempotency_key_bytes", "gauge", "Bytes the remembered Idempotency-Keys take (in memory).",
    "idempotency_key_bytes" },
  { "longpoll_idempotency_replays_total", "counter", "Publishes answered as replays of an Idempotency-Key.",
    "idempotency_replays" },
  { "longpoll_idempotency_conflicts_total", "counter",
    "Publishes refused because their Idempotency-Key was used with another request (422).", "idempotency_conflicts" },
  { "longpoll_idempotency_evicted_total", "counter",
    "Idempotency-Keys forgotten before their window ended, to stay under the key bounds.", "idempotency_evicted" },
  { "longpoll_idempotency_in_flight", "gauge", "Idempotent publishes of this node waiting for Redis.",
    "idempotency_in_flight" },
}

local CATEGORY_METRICS = {
  { "longpoll_category_buffered_events", "Events buffered in the category.", "events" },
  { "longpoll_category_buffered_bytes", "Bytes of event JSON buffered in the category.", "bytes" },
  { "longpoll_category_waiting_subscribers", "Subscriptions waiting on the category.", "waiting" },
}

-- JSON keys in output order (the manager's names)
local JSON_KEYS = { "categories", "events", "event_bytes", "buffered_bytes", "waiting", "long_polls", "sse_streams",
  "published", "delivered", "dropped", "evicted", "last_timestamp", "idempotency_keys", "idempotency_key_bytes",
  "idempotency_replays", "idempotency_conflicts", "idempotency_evicted", "idempotency_in_flight" }

local function number(v)
  if math.type(v) == "integer" then return format("%d", v) end
  return format("%.3f", v)
end

-- Prometheus label values escape backslash, double quote and line feed.
function M.escape_label(s)
  return (gsub(s, '[\\"\n]', { ["\\"] = "\\\\", ['"'] = '\\"', ["\n"] = "\\n" }))
end

-- The figures: the manager's stats plus uptime and open SSE streams; nil once shut down.
-- page: nil, or { offset =, limit = } for that page of the categories ranked by size.
function M.collect(manager, started, page)
  if manager.closed then return nil end
  local s = manager:stats(page)
  if page then
    s.categories_offset, s.categories_limit = page.offset, page.limit
    s.by_category_offset = nil
  end
  s.uptime_seconds = (uv.hrtime() - started) / 1e9
  s.long_polls = s.timeouts_pending
  s.timeouts_pending = nil
  return s
end

M.DEFAULT_CATEGORY_LIMIT = 100
M.MAX_CATEGORY_LIMIT = 1000

-- The names of a page of categories, largest first (the store's ranking).
local function ranked_names(s)
  return s.by_category_order or {}
end

function M.json(s)
  local out = {}
  for _, k in ipairs(JSON_KEYS) do out[#out + 1] = format('"%s":%s', k, number(s[k] or 0)) end
  out[#out + 1] = '"uptime_seconds":' .. number(s.uptime_seconds)
  if s.by_category then
    out[#out + 1] = format('"categories_offset":%d,"categories_limit":%d', s.categories_offset or 0,
      s.categories_limit or 0)
    local parts = {}
    for _, name in ipairs(ranked_names(s)) do
      local c = s.by_category[name]
      parts[#parts + 1] = format('%s:{"events":%d,"bytes":%d,"waiting":%d}', core.json_string(name),
        c.events, c.bytes, c.waiting)
    end
    out[#out + 1] = '"by_category":{' .. concat(parts, ",") .. "}"
  end
  return "{" .. concat(out, ",") .. "}"
end

function M.prometheus(s)
  local out = {}
  for _, m in ipairs(METRICS) do
    out[#out + 1] = format("# HELP %s %s\n# TYPE %s %s\n%s %s\n", m[1], m[3], m[1], m[2], m[1], number(s[m[4]] or 0))
  end
  if s.by_category then
    local names = ranked_names(s)
    for _, m in ipairs(CATEGORY_METRICS) do
      out[#out + 1] = format("# HELP %s %s\n# TYPE %s gauge\n", m[1], m[2], m[1])
      for _, name in ipairs(names) do
        out[#out + 1] = format('%s{category="%s"} %d\n', m[1], M.escape_label(name), s.by_category[name][m[3]])
      end
    end
  end
  return concat(out)
end

-- Prometheus when asked by ?format=prometheus, or by an Accept that names text/plain (or
-- OpenMetrics) and not JSON; JSON otherwise. nil, message for an unknown format.
local function wants_prometheus(req)
  local f = req.query.format
  if f ~= nil then
    if f == "prometheus" then return true end
    if f == "json" then return false end
    return nil, "Invalid 'format' arg: must be json or prometheus."
  end
  local accept = req.headers.accept
  if not accept then return false end
  accept = lower(accept)
  if find(accept, "application/json", 1, true) then return false end
  return find(accept, "text/plain", 1, true) ~= nil or find(accept, "application/openmetrics-text", 1, true) ~= nil
end

-- The page of categories a request asks for with ?categories=1[&limit=N][&offset=N]: nil
-- when it asks for none, or nil, message, status when it may not or asks wrongly.
local function category_page(manager, req)
  local c = req.query.categories
  if c == nil or c == "" or c == "0" or c == "false" then return nil end
  if not manager.options.stats_categories then
    return nil, "per-category stats are off: category names can be secrets"
      .. " (turn them on with the option stats_categories, or serve --stats-categories)", 403
  end
  local page = { offset = 0, limit = M.DEFAULT_CATEGORY_LIMIT }
  for _, k in ipairs { "offset", "limit" } do
    local v = req.query[k]
    if v ~= nil then
      local n = v:match("^%d+$") and math.tointeger(tonumber(v))
      if not n or (k == "limit" and (n < 1 or n > M.MAX_CATEGORY_LIMIT)) or (k == "offset" and n > 1e9) then
        return nil, ("Invalid '%s' arg: %s."):format(k, k == "limit" and ("1 to " .. M.MAX_CATEGORY_LIMIT)
          or "a whole number"), 400
      end
      page[k] = n
    end
  end
  return page
end

-- Returns the stats handler of a manager, a plain function(req, res).
function M.handler(manager)
  local started = uv.hrtime()
  return function(req, res)
    -- the answer depends on Accept (CORS may have put Origin there already)
    local vary = res:get_header("Vary")
    res:set_header("Vary", vary and (vary .. ", Accept") or "Accept")
    -- a browser (Accept: text/html, no ?format=) gets the live dashboard, which polls this path
    if dashboard.wants_html(req) then return dashboard.send(res, req.path) end
    local prom, err = wants_prometheus(req)
    if prom == nil then return answers.send_error(res, 400, err) end
    local page, perr, pstatus = category_page(manager, req)
    if perr then return answers.send_error(res, pstatus, perr) end
    local s = M.collect(manager, started, page)
    if not s then return answers.send_error(res, 503, "manager is shut down") end
    if prom then return answers.send_typed(res, 200, M.PROMETHEUS_TYPE, M.prometheus(s)) end
    return answers.send_json(res, 200, M.json(s))
  end
end

return M
