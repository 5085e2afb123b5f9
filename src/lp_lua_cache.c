/* lp_lua_cache: the Lua binding of lp_cache (core.new_cache), the Redis engine's node-local
 * cache (lua/longpoll/engine/redis/cache.lua wraps it; lp_lua_server.c's native handler reads
 * it and parks long polls on it, which cache:add wakes). Positions are passed as three values:
 * epoch (string), ts, seq (integers). */
#include <lauxlib.h>
#include <lua.h>
#include <string.h>

#include "lp_cache.h"

#define CACHE_MT "longpoll.Cache"
#define MAX_CATEGORIES 64

typedef struct cache_ud {
  lp_cache *cache; /* NULL once freed */
  lp_buf out;      /* reused answer buffer */
} cache_ud;

static cache_ud *check_cache(lua_State *L) {
  cache_ud *u = luaL_checkudata(L, 1, CACHE_MT);
  luaL_argcheck(L, u->cache != NULL, 1, "cache is freed");
  return u;
}

/* The cache of the userdata at idx, NULL when it is none (lp_lua_server.c's native handler, which
 * also parks long polls on it: cache:add wakes them, cache:reset ends them). */
lp_cache *lp_lua_cache_of(lua_State *L, int idx) {
  cache_ud *u = luaL_testudata(L, idx, CACHE_MT);
  return u ? u->cache : NULL;
}

static lua_Integer size_field(lua_State *L, const char *k, lua_Integer def, lua_Integer min) {
  lua_getfield(L, 1, k);
  lua_Integer v = def;
  if (!lua_isnil(L, -1)) {
    int ok;
    v = lua_tointegerx(L, -1, &ok);
    if (!ok || v < min) luaL_error(L, "option '%s' must be an integer >= %d", k, (int)min);
  }
  lua_pop(L, 1);
  return v;
}

/* core.new_cache{ max_event_buffer_size =, max_category_bytes =, max_categories =,
 *   max_waiting_per_category = } -> cache */
static int l_new_cache(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  lp_cache_config cfg;
  cfg.max_event_buffer_size = (size_t)size_field(L, "max_event_buffer_size", 250, 1);
  cfg.max_category_bytes = (size_t)size_field(L, "max_category_bytes", 1024, 1);
  cfg.max_categories = (size_t)size_field(L, "max_categories", 0, 0);
  cfg.max_waiting_per_category = (size_t)size_field(L, "max_waiting_per_category", 0, 0);
  cache_ud *u = lua_newuserdatauv(L, sizeof *u, 0);
  memset(u, 0, sizeof *u);
  luaL_setmetatable(L, CACHE_MT);
  u->cache = lp_cache_new(&cfg);
  if (!u->cache) return luaL_error(L, "cannot create cache (out of memory)");
  return 1;
}

/* The position (epoch, ts, seq) at stack index i..i+2 into *p; 0 when the epoch is too long. */
static int check_pos(lua_State *L, int i, lp_cache_pos *p) {
  size_t len;
  const char *epoch = luaL_checklstring(L, i, &len);
  lua_Integer ts = luaL_checkinteger(L, i + 1), seq = luaL_checkinteger(L, i + 2);
  return lp_cache_pos_set(p, epoch, len, (int64_t)ts, (int64_t)seq) == LP_OK;
}

static void push_pos(lua_State *L, const lp_cache_pos *p) {
  lua_pushlstring(L, p->epoch, p->epoch_len);
  lua_pushinteger(L, (lua_Integer)p->ts);
  lua_pushinteger(L, (lua_Integer)p->seq);
}

static lp_slice check_slice(lua_State *L, int i) {
  lp_slice s;
  s.ptr = luaL_checklstring(L, i, &s.len);
  return s;
}

/* cache:start(epoch, ts, seq) -> true | nil, message */
static int l_start(lua_State *L) {
  cache_ud *u = check_cache(L);
  lp_cache_pos p;
  if (!check_pos(L, 2, &p)) {
    lp_cache_reset(u->cache, 0);
    luaL_pushfail(L);
    lua_pushliteral(L, "epoch too long");
    return 2;
  }
  lp_cache_start(u->cache, &p);
  lua_pushboolean(L, 1);
  return 1;
}

/* cache:reset(counted) */
static int l_reset(lua_State *L) {
  cache_ud *u = check_cache(L);
  lp_cache_reset(u->cache, lua_toboolean(L, 2));
  return 0;
}

static int l_valid(lua_State *L) {
  lua_pushboolean(L, lp_cache_is_valid(check_cache(L)->cache));
  return 1;
}

/* cache:add(epoch, ts, seq, category, id, data_json) -> true | nil, message (refused: the
 * category goes to Redis until the next reset; an epoch it cannot hold drops the cache) */
static int l_add(lua_State *L) {
  cache_ud *u = check_cache(L);
  lp_cache_pos p;
  lp_slice category = check_slice(L, 5);
  const char *id = luaL_checkstring(L, 6);
  lp_slice data = check_slice(L, 7);
  if (!check_pos(L, 2, &p)) {
    lp_cache_reset(u->cache, 1);
    luaL_pushfail(L);
    lua_pushliteral(L, "epoch too long");
    return 2;
  }
  int rc = lp_cache_add(u->cache, &p, category, id, data);
  if (rc != LP_OK) {
    luaL_pushfail(L);
    lua_pushstring(L, lp_strerror(rc));
    return 2;
  }
  lua_pushboolean(L, 1);
  return 1;
}

/* cache:warm(category, since, events, missed, epoch, ts, seq) -> true when it warmed the
 * category. events: { { ts =, id =, data_json = }, ... }, oldest first. */
static int l_warm(lua_State *L) {
  cache_ud *u = check_cache(L);
  lp_slice category = check_slice(L, 2);
  lua_Integer since = luaL_checkinteger(L, 3);
  luaL_checktype(L, 4, LUA_TTABLE);
  int missed = lua_toboolean(L, 5);
  lp_cache_pos p;
  if (!check_pos(L, 6, &p)) {
    lua_pushboolean(L, 0);
    return 1;
  }
  size_t n = (size_t)lua_rawlen(L, 4);
  lp_cache_event *events = lua_newuserdatauv(L, (n ? n : 1) * sizeof *events, 0); /* freed by the GC */
  for (size_t i = 0; i < n; i++) {
    lua_rawgeti(L, 4, (lua_Integer)i + 1);
    luaL_argcheck(L, lua_istable(L, -1), 4, "events must be tables");
    lua_getfield(L, -1, "ts");
    int ok;
    events[i].ts = (int64_t)lua_tointegerx(L, -1, &ok);
    luaL_argcheck(L, ok, 4, "an event's ts must be an integer");
    lua_getfield(L, -2, "id");
    events[i].id = lua_tostring(L, -1);
    lua_getfield(L, -3, "data_json");
    events[i].data_json.ptr = lua_tolstring(L, -1, &events[i].data_json.len);
    luaL_argcheck(L, events[i].id && events[i].data_json.ptr, 4, "an event needs id and data_json");
    lua_pop(L, 4); /* the strings stay referenced by the event tables */
  }
  lua_pushboolean(L, lp_cache_warm(u->cache, category, (int64_t)since, events, n, missed, &p));
  return 1;
}

/* cache:answer(categories, since, last_id|nil) -> "events", body | "wait", epoch, ts, seq |
 * nil (ask Redis). last_id must be lower case. */
static int l_answer(lua_State *L) {
  cache_ud *u = check_cache(L);
  luaL_checktype(L, 2, LUA_TTABLE);
  lp_slice cats[MAX_CATEGORIES];
  size_t n = (size_t)lua_rawlen(L, 2);
  luaL_argcheck(L, n >= 1 && n <= MAX_CATEGORIES, 2, "1 to 64 categories");
  for (size_t k = 0; k < n; k++) {
    lua_rawgeti(L, 2, (lua_Integer)k + 1);
    luaL_argcheck(L, lua_type(L, -1) == LUA_TSTRING, 2, "categories must be strings");
    cats[k].ptr = lua_tolstring(L, -1, &cats[k].len);
    lua_pop(L, 1); /* still referenced by the table */
  }
  lua_Integer since = luaL_checkinteger(L, 3);
  const char *last_id = luaL_optstring(L, 4, NULL);
  lp_buf_reset(&u->out);
  lp_cache_pos cursor;
  int r = lp_cache_answer(u->cache, cats, n, (int64_t)since, last_id, &u->out, &cursor);
  int results = 1;
  if (r == LP_CACHE_EVENTS) {
    lua_pushliteral(L, "events");
    lua_pushlstring(L, u->out.data, u->out.len);
    results = 2;
  } else if (r == LP_CACHE_WAIT) {
    lua_pushliteral(L, "wait");
    push_pos(L, &cursor);
    results = 4;
  } else {
    lua_pushnil(L);
  }
  /* one huge answer should not pin its memory */
  if (u->out.cap > (1u << 20)) lp_buf_free(&u->out);
  return results;
}

/* cache:stats() -> { cache_valid, cache_categories, cache_hits, cache_waits, cache_misses,
 * cache_warmed, cache_resets, cache_parked, cache_woken, cache_ended } */
static int l_stats(lua_State *L) {
  cache_ud *u = check_cache(L);
  lp_cache_stats st;
  lp_cache_get_stats(u->cache, &st);
  lua_createtable(L, 0, 10);
  lua_pushboolean(L, st.valid);
  lua_setfield(L, -2, "cache_valid");
  lua_pushinteger(L, (lua_Integer)st.categories);
  lua_setfield(L, -2, "cache_categories");
  lua_pushinteger(L, (lua_Integer)st.hits);
  lua_setfield(L, -2, "cache_hits");
  lua_pushinteger(L, (lua_Integer)st.waits);
  lua_setfield(L, -2, "cache_waits");
  lua_pushinteger(L, (lua_Integer)st.misses);
  lua_setfield(L, -2, "cache_misses");
  lua_pushinteger(L, (lua_Integer)st.warmed);
  lua_setfield(L, -2, "cache_warmed");
  lua_pushinteger(L, (lua_Integer)st.resets);
  lua_setfield(L, -2, "cache_resets");
  lua_pushinteger(L, (lua_Integer)st.parked);
  lua_setfield(L, -2, "cache_parked");
  lua_pushinteger(L, (lua_Integer)st.woken);
  lua_setfield(L, -2, "cache_woken");
  lua_pushinteger(L, (lua_Integer)st.ended);
  lua_setfield(L, -2, "cache_ended");
  return 1;
}

/* cache:parked_in(category) -> how many polls are parked on it now */
static int l_parked_in(lua_State *L) {
  cache_ud *u = check_cache(L);
  size_t len;
  const char *name = luaL_checklstring(L, 2, &len);
  lp_slice category = {name, len};
  lua_pushinteger(L, (lua_Integer)lp_cache_parked_in(u->cache, category));
  return 1;
}

static int cache_gc(lua_State *L) {
  cache_ud *u = luaL_checkudata(L, 1, CACHE_MT);
  lp_cache_free(u->cache);
  u->cache = NULL;
  lp_buf_free(&u->out);
  return 0;
}

static const luaL_Reg cache_methods[] = {{"start", l_start}, {"reset", l_reset},         {"valid", l_valid},
                                         {"add", l_add},     {"warm", l_warm},           {"answer", l_answer},
                                         {"stats", l_stats}, {"parked_in", l_parked_in}, {NULL, NULL}};

/* Adds core.new_cache to the module table on top of the stack (from luaopen_longpoll_core). */
void lp_lua_cache_open(lua_State *L) {
  if (luaL_newmetatable(L, CACHE_MT)) {
    luaL_newlib(L, cache_methods);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, cache_gc);
    lua_setfield(L, -2, "__gc");
  }
  lua_pop(L, 1);
  lua_pushcfunction(L, l_new_cache);
  lua_setfield(L, -2, "new_cache");
}
