-- The stats endpoint: the manager's figures as JSON, or in the Prometheus text exposition
-- format for scrapers (Accept: text/plain, or ?format=prometheus), or the live dashboard for
-- browsers (Accept: text/html; dashboard.lua). Per-category figures are
-- opt-in (option stats_categories: category names can be secrets) and come a bounded page
-- at a time, largest categories first (?categories=1&limit=N&offset=N).
--
-- In memory mode the HTTP engine answers GETs itself, in C (M.native: src/lp_lua_stats.c), with
-- the same text; this handler answers what it leaves: Redis mode, HEAD, errors, a request a
-- wrapper changed.
local uv = require "luv"
local core = require "longpoll.core"
local answers = require "longpoll.answers"
local dashboard = require "longpoll.dashboard"

local find, lower = string.find, string.lower

local M = {}

M.PROMETHEUS_TYPE = answers.PROMETHEUS_TYPE

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

-- The answers' text, written in C (src/lp_stats.c) for this handler and the native one alike:
-- the figures of M.collect as JSON, and in the Prometheus text format.
M.json = core.stats_json
M.prometheus = core.stats_prometheus

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

-- The native stats handler (core.native_stats) over a memory engine's store: what it reads
-- besides the store is in `from` = { keys = the engine's idempotency keys, polls = the native
-- long-poll handler, streams = the native SSE handler, lua_polls, lua_streams = the gauges of
-- the long polls and streams Lua serves, categories = option stats_categories, cors = the
-- policy's native form or nil }.
function M.native(store, from)
  local before, after = dashboard.page_parts()
  return core.native_stats(store, {
    header_block = answers.JSON.text,
    prometheus_block = answers.PROMETHEUS.text,
    page_block = dashboard.BLOCK.text,
    page_before = before,
    page_after = after,
    categories = from.categories,
    keys = from.keys,
    polls = from.polls,
    streams = from.streams,
    lua_polls = from.lua_polls,
    lua_streams = from.lua_streams,
    cors = from.cors,
  })
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
    if prom then return res:send_block(200, answers.PROMETHEUS, M.prometheus(s)) end
    return answers.send_json(res, 200, M.json(s))
  end
end

return M
