/* lp_lua_stats: the stats endpoint in C. The manager's stats handler served by the HTTP engine
 * without entering Lua (NATIVE_STATS, core.native_stats: JSON, Prometheus and the dashboard page,
 * from the store, the idempotency keys, the native handlers' counts and the gauges Lua keeps);
 * the gauges (core.new_gauge: a count a Lua module keeps where this handler reads it); and the
 * text functions stats.lua answers with in the cases left to it (core.stats_json,
 * core.stats_prometheus), so both paths write the same text (lp_stats). */
#include <lauxlib.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lp_keys.h"
#include "lp_lua_engine.h"
#include "lp_stats.h"

#define GAUGE_MT "longpoll.Gauge"

/* What the native stats handler reads besides its store; the handler's userdata keeps every
 * object named here alive (user value 2: the options table), so the pointers stay valid. */
struct lp_lua_stats {
  lp_keys *keys;                       /* NULL: none (no figures) */
  const native_handler *polls;         /* the native long-poll handler: its parked polls */
  const native_handler *streams;       /* the native SSE handler: its streams */
  const lua_Integer *lua_polls;        /* the Lua long polls' gauge */
  const lua_Integer *lua_streams;      /* the Lua SSE hub's gauge */
  int categories_allowed;              /* option stats_categories */
  uint64_t started_ns;                 /* uv_hrtime when made */
  char *prometheus_block, *page_block; /* header lines, owned */
  size_t prometheus_block_len, page_block_len;
  char *page_before, *page_after; /* the dashboard page around its stats URL, owned */
  size_t page_before_len, page_after_len;
};

/* ---------------------------------------------------------------------------------------------
 * Gauges */

/* core.new_gauge() -> gauge: gauge:add(n), gauge:set(n), gauge:get() -> n. */
static int l_new_gauge(lua_State *L) {
  lua_Integer *g = lua_newuserdatauv(L, sizeof *g, 0);
  *g = 0;
  luaL_setmetatable(L, GAUGE_MT);
  return 1;
}

static int gauge_add(lua_State *L) {
  lua_Integer *g = luaL_checkudata(L, 1, GAUGE_MT);
  *g += luaL_checkinteger(L, 2);
  return 0;
}

static int gauge_set(lua_State *L) {
  lua_Integer *g = luaL_checkudata(L, 1, GAUGE_MT);
  *g = luaL_checkinteger(L, 2);
  return 0;
}

static int gauge_get(lua_State *L) {
  lua_Integer *g = luaL_checkudata(L, 1, GAUGE_MT);
  lua_pushinteger(L, *g);
  return 1;
}

/* ---------------------------------------------------------------------------------------------
 * The text, for stats.lua: core.stats_json(s), core.stats_prometheus(s), s the manager's figures
 * as stats.collect makes them (missing figures are 0; with by_category and by_category_order, the
 * page of categories_offset and categories_limit). */

static lua_Integer int_field(lua_State *L, int t, const char *k) {
  lua_getfield(L, t, k);
  lua_Integer v = lua_isinteger(L, -1) ? lua_tointeger(L, -1) : (lua_Integer)lua_tonumber(L, -1);
  lua_pop(L, 1);
  return v;
}

static int stats_text(lua_State *L, int prometheus) {
  luaL_checktype(L, 1, LUA_TTABLE);
  lp_stats_figures f;
  memset(&f, 0, sizeof f);
  for (int i = 0; i < LP_STATS_NFIGURES; i++) f.v[i] = (int64_t)int_field(L, 1, lp_stats_names[i]);
  lua_getfield(L, 1, "uptime_seconds");
  f.uptime_seconds = lua_tonumber(L, -1);
  lua_pop(L, 1);
  lp_category_info *page = NULL;
  if (lua_getfield(L, 1, "by_category") == LUA_TTABLE) {
    int by = lua_gettop(L);
    f.has_page = 1;
    f.offset = (size_t)int_field(L, 1, "categories_offset");
    f.limit = (size_t)int_field(L, 1, "categories_limit");
    lua_getfield(L, 1, "by_category_order");
    int order = lua_gettop(L);
    size_t n = lua_istable(L, order) ? (size_t)lua_rawlen(L, order) : 0;
    page = lua_newuserdatauv(L, (n ? n : 1) * sizeof *page, 0); /* the GC frees it, even on an error */
    for (size_t i = 0; i < n; i++) {
      lua_rawgeti(L, order, (lua_Integer)i + 1);
      lp_category_info *c = &page[f.npage];
      c->name.ptr = luaL_checklstring(L, -1, &c->name.len); /* kept alive by s.by_category_order */
      lua_rawget(L, by);
      if (!lua_istable(L, -1)) luaL_error(L, "by_category lacks a category of by_category_order");
      c->events = (size_t)int_field(L, -1, "events");
      c->bytes = (size_t)int_field(L, -1, "bytes");
      c->waiting = (size_t)int_field(L, -1, "waiting");
      lua_pop(L, 1);
      f.npage++;
    }
    f.page = page;
  }
  lp_buf out = LP_BUF_INIT;
  int rc = prometheus ? lp_stats_prometheus(&f, &out) : lp_stats_json(&f, &out);
  if (rc != 0) {
    lp_buf_free(&out);
    return luaL_error(L, "out of memory");
  }
  lua_pushlstring(L, out.data, out.len);
  lp_buf_free(&out);
  return 1;
}

static int l_stats_json(lua_State *L) { return stats_text(L, 0); }
static int l_stats_prometheus(lua_State *L) { return stats_text(L, 1); }

/* ---------------------------------------------------------------------------------------------
 * The native handler */

static char *copy_field(lua_State *L, int t, const char *k, size_t *len) {
  lua_getfield(L, t, k);
  const char *s = luaL_checklstring(L, -1, len);
  char *copy = malloc(*len + 1);
  if (!copy) luaL_error(L, "out of memory");
  memcpy(copy, s, *len + 1);
  lua_pop(L, 1);
  return copy;
}

static const native_handler *handler_field(lua_State *L, int t, const char *k) {
  lua_getfield(L, t, k);
  const native_handler *h = lua_isnil(L, -1) ? NULL : luaL_checkudata(L, -1, NATIVE_MT);
  lua_pop(L, 1);
  return h;
}

static const lua_Integer *gauge_field(lua_State *L, int t, const char *k) {
  lua_getfield(L, t, k);
  const lua_Integer *g = lua_isnil(L, -1) ? NULL : luaL_checkudata(L, -1, GAUGE_MT);
  lua_pop(L, 1);
  return g;
}

int lp_lua_stats_read(lua_State *L, int t, native_handler *h) {
  lp_lua_stats *st = calloc(1, sizeof *st);
  if (!st) return luaL_error(L, "out of memory");
  h->stats = st; /* owned by h from here: freed by its __gc even if an error follows */
  lua_getfield(L, t, "keys");
  st->keys = lp_lua_keys_of(L, -1);
  lua_pop(L, 1);
  st->polls = handler_field(L, t, "polls");
  st->streams = handler_field(L, t, "streams");
  st->lua_polls = gauge_field(L, t, "lua_polls");
  st->lua_streams = gauge_field(L, t, "lua_streams");
  lua_getfield(L, t, "categories");
  st->categories_allowed = lua_toboolean(L, -1);
  lua_pop(L, 1);
  st->prometheus_block = copy_field(L, t, "prometheus_block", &st->prometheus_block_len);
  st->page_block = copy_field(L, t, "page_block", &st->page_block_len);
  st->page_before = copy_field(L, t, "page_before", &st->page_before_len);
  st->page_after = copy_field(L, t, "page_after", &st->page_after_len);
  st->started_ns = uv_hrtime();
  return 0;
}

void lp_lua_stats_free(lp_lua_stats *st) {
  if (!st) return;
  free(st->prometheus_block);
  free(st->page_block);
  free(st->page_before);
  free(st->page_after);
  free(st);
}

/* The page's stats URL, HTML-escaped as dashboard.lua's escape_html does. */
static int append_html(lp_buf *out, lp_slice s) {
  int rc = 0;
  for (size_t i = 0; rc == 0 && i < s.len; i++) {
    switch (s.ptr[i]) {
      case '&': rc = lp_buf_append_str(out, "&amp;"); break;
      case '<': rc = lp_buf_append_str(out, "&lt;"); break;
      case '>': rc = lp_buf_append_str(out, "&gt;"); break;
      case '"': rc = lp_buf_append_str(out, "&quot;"); break;
      case '\'': rc = lp_buf_append_str(out, "&#39;"); break;
      default: rc = lp_buf_append_char(out, s.ptr[i]);
    }
  }
  return rc;
}

/* The answer's own lines: CORS (when the manager has a policy), then Vary with Accept added
 * (stats.lua: the answer depends on Accept, and CORS may have said Origin already). */
static int vary_lines(const native_handler *nh, const lp_http_event *head, lp_buf *extra, lp_buf *scratch) {
  int allowed;
  if (lp_lua_native_cors_lines(nh, head, scratch, &allowed) != 0) return -1;
  lp_buf_reset(extra);
  static const char ORIGIN[] = "Vary: Origin\r\n";
  size_t n = sizeof ORIGIN - 1;
  if (scratch->len >= n && memcmp(scratch->data, ORIGIN, n) == 0) {
    if (lp_buf_append_str(extra, "Vary: Origin, Accept\r\n") != 0) return -1;
    return lp_buf_append(extra, scratch->data + n, scratch->len - n);
  }
  if (scratch->len && lp_buf_append(extra, scratch->data, scratch->len) != 0) return -1;
  return lp_buf_append_str(extra, "Vary: Accept\r\n");
}

int lp_lua_stats_serve(sconn *s, native_handler *nh, lp_store *store, const lp_http_event *head, lp_slice path,
                       lp_slice query) {
  server *srv = s->srv;
  const lp_lua_stats *st = nh->stats;
  if (!store || !st) return 0;
  size_t naccept;
  lp_slice accept = lp_lua_native_header(head, "accept", &naccept);
  if (naccept > 1) return 0; /* Lua's req.headers joins them */
  lp_stats_request rq;
  if (lp_stats_parse_request(query, accept, st->categories_allowed, &rq) != 1) return 0;
  if (vary_lines(nh, head, &srv->fast_extra, &srv->fast_scratch) != 0) return 0;
  lp_slice extra = {srv->fast_extra.data, srv->fast_extra.len};
  lp_buf *body = &srv->fast_body;
  lp_buf_reset(body);
  if (rq.answer == LP_STATS_ANSWER_DASHBOARD) {
    if (lp_buf_append(body, st->page_before, st->page_before_len) != 0 || append_html(body, path) != 0 ||
        lp_buf_append(body, st->page_after, st->page_after_len) != 0)
      return 0;
    lp_slice block = {st->page_block, st->page_block_len}, answer = {body->data, body->len};
    lp_lua_native_answer(s, "HTTP/1.1 200 OK\r\n", block, head->keep_alive, head->minor == 0, extra, &answer, 1);
    return 1;
  }
  lp_stats_figures f;
  memset(&f, 0, sizeof f);
  lp_store_stats ss;
  lp_store_get_stats(store, &ss);
  f.v[LP_STATS_CATEGORIES] = (int64_t)ss.categories;
  f.v[LP_STATS_EVENTS] = (int64_t)ss.events;
  f.v[LP_STATS_EVENT_BYTES] = (int64_t)ss.event_bytes;
  f.v[LP_STATS_BUFFERED_BYTES] = (int64_t)ss.buffered_bytes;
  f.v[LP_STATS_WAITING] = (int64_t)ss.waiting;
  f.v[LP_STATS_PUBLISHED] = (int64_t)ss.published;
  f.v[LP_STATS_DELIVERED] = (int64_t)ss.delivered;
  f.v[LP_STATS_DROPPED] = (int64_t)ss.dropped;
  f.v[LP_STATS_EVICTED] = (int64_t)ss.evicted;
  f.v[LP_STATS_LAST_TIMESTAMP] = ss.last_timestamp;
  f.v[LP_STATS_LONG_POLLS] =
      (int64_t)(st->polls ? st->polls->nparked : 0) + (int64_t)(st->lua_polls ? *st->lua_polls : 0);
  f.v[LP_STATS_SSE_STREAMS] =
      (int64_t)(st->streams ? st->streams->nstreams : 0) + (int64_t)(st->lua_streams ? *st->lua_streams : 0);
  if (st->keys) {
    lp_keys_expire(st->keys, wall_clock_ms());
    lp_keys_stats ks;
    lp_keys_get_stats(st->keys, &ks);
    f.v[LP_STATS_IDEMPOTENCY_KEYS] = (int64_t)ks.keys;
    f.v[LP_STATS_IDEMPOTENCY_KEY_BYTES] = (int64_t)ks.bytes;
    f.v[LP_STATS_IDEMPOTENCY_REPLAYS] = (int64_t)ks.replays;
    f.v[LP_STATS_IDEMPOTENCY_CONFLICTS] = (int64_t)ks.conflicts;
    f.v[LP_STATS_IDEMPOTENCY_EVICTED] = (int64_t)ks.evicted;
  }
  f.uptime_seconds = (double)(uv_hrtime() - st->started_ns) / 1e9;
  lp_category_info *page = NULL;
  if (rq.has_page) {
    page = malloc(rq.limit * sizeof *page);
    if (!page || lp_store_top_categories(store, rq.offset, rq.limit, page, &f.npage) != LP_OK) {
      free(page);
      return 0;
    }
    f.has_page = 1;
    f.offset = rq.offset;
    f.limit = rq.limit;
    f.page = page;
  }
  int prometheus = rq.answer == LP_STATS_ANSWER_PROMETHEUS;
  int rc = prometheus ? lp_stats_prometheus(&f, body) : lp_stats_json(&f, body);
  free(page);
  if (rc != 0) return 0;
  lp_slice block =
      prometheus ? (lp_slice){st->prometheus_block, st->prometheus_block_len} : (lp_slice){nh->block, nh->block_len};
  lp_slice answer = {body->data, body->len};
  lp_lua_native_answer(s, "HTTP/1.1 200 OK\r\n", block, head->keep_alive, head->minor == 0, extra, &answer, 1);
  if (body->cap > (1u << 20)) lp_buf_free(body);
  return 1;
}

static const luaL_Reg gauge_methods[] = {{"add", gauge_add}, {"set", gauge_set}, {"get", gauge_get}, {NULL, NULL}};

static const luaL_Reg functions[] = {
    {"new_gauge", l_new_gauge}, {"stats_json", l_stats_json}, {"stats_prometheus", l_stats_prometheus}, {NULL, NULL}};

void lp_lua_stats_open(lua_State *L) {
  if (luaL_newmetatable(L, GAUGE_MT)) {
    luaL_newlib(L, gauge_methods);
    lua_setfield(L, -2, "__index");
  }
  lua_pop(L, 1);
  luaL_setfuncs(L, functions, 0);
}
