-- The live dashboard (issue 17, part 3): one HTML page, with a few KB of dependency-free
-- JavaScript, that polls the stats endpoint's JSON every second and draws the busiest
-- categories, the waiting subscribers, and events and deliveries per second as live charts.
-- Served by the stats handler to browsers (Accept: text/html) and by `serve --dashboard PATH`.
local response = require "longpoll.http.response"

local M = {}

M.CONTENT_TYPE = "text/html; charset=utf-8"
-- the page runs only its own inline script and talks only to this server
M.CSP = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self';"
  .. " img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"

local function escape_html(s)
  return (s:gsub("[&<>\"']", { ["&"] = "&amp;", ["<"] = "&lt;", [">"] = "&gt;", ['"'] = "&quot;", ["'"] = "&#39;" }))
end

local PAGE = [=[<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>longpoll dashboard</title>
<link rel="icon" href="data:,">
<style>
:root { --bg: #0f1419; --panel: #182029; --text: #e6edf3; --dim: #8b98a5; --a: #4fc3f7; --b: #81c784; --c: #ffb74d; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.4 system-ui, -apple-system, "Segoe UI", sans-serif; background: var(--bg); color: var(--text); }
header { display: flex; flex-wrap: wrap; align-items: baseline; gap: .25rem 1rem; padding: .8rem 1rem; }
h1 { font-size: 1.25rem; margin: 0; }
#status { color: var(--dim); font-size: .9rem; }
#status[data-state="live"]::before { content: "\25CF "; color: var(--b); }
#status[data-state="offline"]::before { content: "\25CF "; color: #e57373; }
main { display: grid; gap: .75rem; padding: 0 1rem 1rem; }
.tiles, .charts { display: grid; gap: .75rem; grid-template-columns: repeat(auto-fit, minmax(9rem, 1fr)); }
.charts { grid-template-columns: repeat(auto-fit, minmax(17rem, 1fr)); }
.tile, section { background: var(--panel); border-radius: .6rem; padding: .7rem .9rem; min-width: 0; }
.tile .v { font-size: 1.7rem; font-weight: 600; font-variant-numeric: tabular-nums; }
.tile .k, h2 { color: var(--dim); font-size: .8rem; font-weight: 500; margin: 0 0 .3rem;
  text-transform: uppercase; letter-spacing: .04em; }
canvas { width: 100%; height: 9rem; display: block; }
table { width: 100%; border-collapse: collapse; font-variant-numeric: tabular-nums; }
th, td { text-align: right; padding: .25rem .4rem; border-bottom: 1px solid #26313d; }
th:first-child, td:first-child { text-align: left; max-width: 14rem; overflow: hidden; text-overflow: ellipsis;
  white-space: nowrap; }
th { color: var(--dim); font-weight: 500; font-size: .8rem; }
#note { color: var(--dim); font-size: .85rem; margin: .4rem 0 0; }
</style>
</head>
<body data-stats-url="@STATS_URL@">
<header><h1>longpoll</h1><span id="status" data-state="connecting">connecting&hellip;</span></header>
<main>
  <div class="tiles">
    <div class="tile"><div class="k">events / s</div><div class="v" id="events-rate">&ndash;</div></div>
    <div class="tile"><div class="k">deliveries / s</div><div class="v" id="deliveries-rate">&ndash;</div></div>
    <div class="tile"><div class="k">waiting subscribers</div><div class="v" id="waiting">&ndash;</div></div>
    <div class="tile"><div class="k">categories</div><div class="v" id="categories">&ndash;</div></div>
    <div class="tile"><div class="k">buffered events</div><div class="v" id="events">&ndash;</div></div>
    <div class="tile"><div class="k">published</div><div class="v" id="published">&ndash;</div></div>
  </div>
  <div class="charts">
    <section><h2>events / s</h2><canvas id="chart-events" data-color="--a"></canvas></section>
    <section><h2>deliveries / s</h2><canvas id="chart-deliveries" data-color="--b"></canvas></section>
    <section><h2>waiting subscribers</h2><canvas id="chart-waiting" data-color="--c"></canvas></section>
  </div>
  <section><h2>busiest categories</h2>
    <table id="busiest"><thead><tr><th>category</th><th>events</th><th>bytes</th><th>waiting</th></tr></thead>
      <tbody></tbody></table>
    <p id="note" hidden></p>
  </section>
</main>
<script>
(function () {
  'use strict';
  var url = document.body.getAttribute('data-stats-url');
  var POINTS = 120, INTERVAL_MS = 1000, TOP = 10;
  var series = { events: [], deliveries: [], waiting: [] };
  var prev = null, withCategories = true, timer = null;
  var $ = function (id) { return document.getElementById(id); };
  function fmt(n) {
    if (n >= 1e9) return (n / 1e9).toFixed(1) + 'G';
    if (n >= 1e6) return (n / 1e6).toFixed(1) + 'M';
    if (n >= 1e4) return (n / 1e3).toFixed(1) + 'k';
    return n >= 100 || n === Math.round(n) ? String(Math.round(n)) : n.toFixed(1);
  }
  function push(list, v) { list.push(v); if (list.length > POINTS) list.shift(); }
  function draw(canvas, data) {
    var dpr = window.devicePixelRatio || 1, w = canvas.clientWidth, h = canvas.clientHeight;
    if (canvas.width !== Math.round(w * dpr) || canvas.height !== Math.round(h * dpr)) {
      canvas.width = Math.round(w * dpr); canvas.height = Math.round(h * dpr);
    }
    var ctx = canvas.getContext('2d');
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, w, h);
    var max = 1;
    data.forEach(function (v) { if (v > max) max = v; });
    var color = getComputedStyle(document.documentElement).getPropertyValue(canvas.getAttribute('data-color')).trim();
    ctx.strokeStyle = '#26313d'; ctx.lineWidth = 1;
    ctx.beginPath(); ctx.moveTo(0, h - 0.5); ctx.lineTo(w, h - 0.5); ctx.moveTo(0, 16.5); ctx.lineTo(w, 16.5); ctx.stroke();
    ctx.fillStyle = '#8b98a5'; ctx.font = '11px system-ui, sans-serif'; ctx.fillText(fmt(max), 2, 12);
    if (data.length < 2) return;
    var step = w / (POINTS - 1), x0 = w - (data.length - 1) * step, top = 18;
    var y = function (v) { return h - 1 - (v / max) * (h - top - 1); };
    ctx.beginPath();
    data.forEach(function (v, i) { if (i) ctx.lineTo(x0 + i * step, y(v)); else ctx.moveTo(x0, y(v)); });
    ctx.strokeStyle = color; ctx.lineWidth = 2; ctx.stroke();
    ctx.lineTo(w, h); ctx.lineTo(x0, h); ctx.closePath();
    ctx.globalAlpha = 0.18; ctx.fillStyle = color; ctx.fill(); ctx.globalAlpha = 1;
  }
  function busiest(s) {
    var tbody = $('busiest').tBodies[0], rows = [];
    var by = s.by_category || {};
    // the server ranks by bytes, then waiting, then name; JSON objects do not keep that order
    Object.keys(by).forEach(function (name) { rows.push([name, by[name]]); });
    rows.sort(function (a, b) {
      return b[1].bytes - a[1].bytes || b[1].waiting - a[1].waiting || (a[0] < b[0] ? -1 : a[0] > b[0] ? 1 : 0);
    });
    tbody.textContent = '';
    rows.slice(0, TOP).forEach(function (r) {
      var tr = document.createElement('tr');
      [r[0], fmt(r[1].events), fmt(r[1].bytes), fmt(r[1].waiting)].forEach(function (text) {
        var td = document.createElement('td'); td.textContent = text; tr.appendChild(td);
      });
      tr.firstChild.title = r[0];
      tbody.appendChild(tr);
    });
    var note = $('note');
    if (!withCategories) {
      note.hidden = false;
      note.textContent = 'Category names are hidden (they can be secrets): start the server with '
        + '--stats-categories (option stats_categories) to list them.';
    } else if (!rows.length) {
      note.hidden = false; note.textContent = 'No categories yet.';
    } else {
      note.hidden = true;
    }
  }
  function show(s) {
    var now = s.uptime_seconds;
    if (prev && now > prev.uptime_seconds) {
      var dt = now - prev.uptime_seconds;
      var er = Math.max(0, (s.published - prev.published) / dt), dr = Math.max(0, (s.delivered - prev.delivered) / dt);
      push(series.events, er); push(series.deliveries, dr);
      $('events-rate').textContent = fmt(er); $('deliveries-rate').textContent = fmt(dr);
    }
    push(series.waiting, s.waiting);
    prev = s;
    $('waiting').textContent = fmt(s.waiting);
    $('waiting').title = s.long_polls + ' long polls, ' + s.sse_streams + ' SSE streams';
    $('categories').textContent = fmt(s.categories);
    $('events').textContent = fmt(s.events);
    $('published').textContent = fmt(s.published);
    draw($('chart-events'), series.events);
    draw($('chart-deliveries'), series.deliveries);
    draw($('chart-waiting'), series.waiting);
    busiest(s);
    var st = $('status');
    st.dataset.state = 'live';
    st.textContent = 'live, updated ' + new Date().toLocaleTimeString() + ', up ' + Math.floor(now) + ' s';
  }
  function offline(why) {
    var st = $('status');
    st.dataset.state = 'offline';
    st.textContent = 'offline: ' + why + ' (retrying)';
  }
  function get(path) {
    var controller = new AbortController();
    var guard = setTimeout(function () { controller.abort(); }, 5000);
    return fetch(path, { headers: { Accept: 'application/json' }, cache: 'no-store', signal: controller.signal })
      .finally(function () { clearTimeout(guard); });
  }
  function tick() {
    var sep = url.indexOf('?') < 0 ? '?' : '&';
    var path = url + sep + 'format=json' + (withCategories ? '&categories=1&limit=' + TOP : '');
    get(path).then(function (r) {
      if (r.status === 403 && withCategories) { withCategories = false; return null; }
      if (r.status !== 200) throw new Error('HTTP ' + r.status);
      return r.json();
    }).then(function (s) {
      if (s) show(s);
      timer = setTimeout(tick, s ? INTERVAL_MS : 0);
    }, function (e) {
      offline(e.message || String(e));
      timer = setTimeout(tick, INTERVAL_MS * 2);
    });
  }
  window.addEventListener('resize', function () {
    draw($('chart-events'), series.events);
    draw($('chart-deliveries'), series.deliveries);
    draw($('chart-waiting'), series.waiting);
  });
  window.longpollDashboard = { stop: function () { clearTimeout(timer); } };
  tick();
})();
</script>
</body>
</html>
]=]

-- The page, polling the stats JSON at stats_url (a path on this server).
function M.page(stats_url)
  return (PAGE:gsub("@STATS_URL@", function() return escape_html(stats_url) end))
end

-- The page around its one stats URL: before, after (the native stats handler writes the
-- HTML-escaped URL between them, as M.page does).
function M.page_parts()
  local at, stop = PAGE:find("@STATS_URL@", 1, true)
  assert(at and not PAGE:find("@STATS_URL@", stop + 1, true), "the page names its stats URL once")
  return PAGE:sub(1, at - 1), PAGE:sub(stop + 1)
end

-- The page's header lines, as one block.
M.BLOCK = response.header_block {
  { "Content-Type", M.CONTENT_TYPE },
  { "Cache-Control", "no-cache" },
  { "X-Content-Type-Options", "nosniff" },
  { "Content-Security-Policy", M.CSP },
}

-- Whether a request to the stats endpoint is a browser asking for a page: Accept names
-- text/html and no ?format= was given.
function M.wants_html(req)
  if req.query.format ~= nil then return false end
  local accept = req.headers.accept
  return accept ~= nil and accept:lower():find("text/html", 1, true) ~= nil
end

-- Sends the page for stats_url.
function M.send(res, stats_url)
  return res:send_block(200, M.BLOCK, M.page(stats_url))
end

-- handler(stats_url) -> function(req, res): the page on its own path (serve --dashboard PATH).
function M.handler(stats_url)
  return function(req, res)
    if req.method ~= "GET" and req.method ~= "HEAD" then
      res:set_header("Allow", "GET, HEAD")
      res:set_header("Content-Type", "application/json")
      return res:send(405, '{"error":"method not allowed"}')
    end
    return M.send(res, stats_url)
  end
end

return M
