/* lp_lua: the Lua binding of the core, module longpoll.core. The one file
 * that includes the Lua headers; errors become `nil, message` here. */
#include <errno.h>
#include <lauxlib.h>
#include <lua.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>

#include "lp_json.h"
#include "lp_store.h"
#include "lp_waiter.h"

int lp_lua_json_encode(lua_State *L);  /* lp_lua_json.c */
void lp_lua_http_open(lua_State *L);   /* lp_lua_http.c */
void lp_lua_server_open(lua_State *L); /* lp_lua_server.c */
void lp_lua_stderr_open(lua_State *L); /* lp_lua_stderr.c */
void lp_lua_cache_open(lua_State *L);  /* lp_lua_cache.c */
void lp_lua_keys_open(lua_State *L);   /* lp_lua_keys.c */
int lp_lua_fingerprint(lua_State *L);  /* lp_lua_fingerprint.c */

/* lp_lua_redis_publish.c */
void lp_lua_redis_publish_open(lua_State *L);

#define STORE_MT "longpoll.Store"
#define LP_CORE_VERSION "0.1.0"

typedef struct store_ud {
  lp_store *store; /* NULL once closed */
  lp_woken woken;  /* what the last publish woke */
  lp_buf out;      /* reused answer buffer */
  /* per-category rules: a Lua function (registry ref) asked once per new category */
  int limits_ref; /* LUA_NOREF without one */
  lua_State *L;   /* the thread of the store call in progress, for limits_ref */
  int in_limits;  /* that function is running: the store is busy */
} store_ud;

static store_ud *check_store(lua_State *L, int i) {
  store_ud *u = luaL_checkudata(L, i, STORE_MT);
  luaL_argcheck(L, u->store != NULL, i, "store is closed");
  if (u->in_limits) luaL_error(L, "the store is busy (called from category_limits)");
  u->L = L;
  return u;
}

/* The Lua side of a category_limits call, protected: (function, name slice,
 * limits) come as light userdata. The function returns nil (the defaults) or
 * { max_event_buffer_size =, event_ttl_ms =, delete_after_first = }. */
static int limits_call(lua_State *L) {
  store_ud *u = lua_touserdata(L, 1);
  const lp_slice *name = lua_touserdata(L, 2);
  lp_category_limits *lim = lua_touserdata(L, 3);
  lua_rawgeti(L, LUA_REGISTRYINDEX, u->limits_ref);
  lua_pushlstring(L, name->ptr, name->len);
  lua_call(L, 1, 1);
  if (!lua_istable(L, -1)) return 0;
  int isnum;
  lua_getfield(L, -1, "max_event_buffer_size");
  lua_Integer n = lua_tointegerx(L, -1, &isnum);
  if (isnum && n >= 1) lim->max_event_buffer_size = (size_t)n;
  lua_getfield(L, -2, "event_ttl_ms");
  n = lua_tointegerx(L, -1, &isnum);
  if (isnum && n >= 0) lim->event_ttl_ms = (int64_t)n;
  lua_getfield(L, -3, "delete_after_first");
  if (!lua_isnil(L, -1)) lim->delete_after_first = lua_toboolean(L, -1);
  return 0;
}

/* lp_limits_fn: asks the Lua function; on any error the defaults stay (the
 * Lua side logs its own errors). Nothing here may raise: the store is in the
 * middle of making a category. */
static void lua_category_limits(void *ctx, lp_slice name, lp_category_limits *limits) {
  store_ud *u = ctx;
  lua_State *L = u->L;
  if (!L || !lua_checkstack(L, 8)) return;
  lp_category_limits asked = *limits;
  lua_pushcfunction(L, limits_call);
  lua_pushlightuserdata(L, u);
  lua_pushlightuserdata(L, &name);
  lua_pushlightuserdata(L, &asked);
  u->in_limits = 1;
  int rc = lua_pcall(L, 3, 0, 0);
  u->in_limits = 0;
  if (rc != LUA_OK) {
    lua_pop(L, 1);
    return;
  }
  *limits = asked;
}

/* The store of the userdata at idx, NULL when it is not a store or is closed (lp_lua_server.c's
 * fast path holds a reference to the userdata and asks before each use). */
lp_store *lp_lua_store_of(lua_State *L, int idx) {
  store_ud *u = luaL_testudata(L, idx, STORE_MT);
  if (!u || u->in_limits) return NULL; /* busy in a category_limits call: the fast path declines */
  u->L = L;                            /* a new category's limits are asked on this (running) thread */
  return u->store;
}

static int fail(lua_State *L, const char *msg) {
  luaL_pushfail(L);
  lua_pushstring(L, msg);
  return 2;
}

/* nil, message, code: the code names the error for callers that map it to a
 * status ("ECATEGORIES", "ETOOBIG", ...). */
static int fail_store(lua_State *L, int rc) {
  static const char *const names[] = {"OK",     "ENOMEM",      "EINVAL",   "EUTF8",   "EORDER", "ERANDOM",
                                      "ELIMIT", "ECATEGORIES", "EWAITERS", "ETOOBIG", "ETIME"};
  luaL_pushfail(L);
  lua_pushstring(L, lp_strerror(rc));
  lua_pushstring(L, (-rc >= 0 && -rc < (int)(sizeof names / sizeof *names)) ? names[-rc] : "EUNKNOWN");
  return 3;
}

static lua_Integer opt_int_field(lua_State *L, int t, const char *k, lua_Integer def, lua_Integer min) {
  lua_getfield(L, t, k);
  lua_Integer v = def;
  if (!lua_isnil(L, -1)) {
    int ok;
    v = lua_tointegerx(L, -1, &ok);
    if (!ok || v < min) luaL_error(L, "option '%s' must be an integer >= %d", k, (int)min);
  }
  lua_pop(L, 1);
  return v;
}

/* core.new_store{max_event_buffer_size=, event_ttl_ms=, delete_after_first=,
 *   max_category_bytes=, max_categories=, max_waiting_per_category=} */
static int l_new_store(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  lp_store_config cfg;
  memset(&cfg, 0, sizeof cfg);
  cfg.max_event_buffer_size = (size_t)opt_int_field(L, 1, "max_event_buffer_size", 250, 1);
  cfg.event_ttl_ms = (int64_t)opt_int_field(L, 1, "event_ttl_ms", 0, 0);
  cfg.max_category_bytes = (size_t)opt_int_field(L, 1, "max_category_bytes", 1024, 1);
  cfg.max_categories = (size_t)opt_int_field(L, 1, "max_categories", 0, 0);
  cfg.max_waiting_per_category = (size_t)opt_int_field(L, 1, "max_waiting_per_category", 0, 0);
  cfg.max_buffered_bytes = (size_t)opt_int_field(L, 1, "max_buffered_bytes", 0, 0);
  cfg.max_answer_bytes = (size_t)opt_int_field(L, 1, "max_answer_bytes", 0, 0);
  lua_getfield(L, 1, "delete_after_first");
  cfg.delete_after_first = lua_toboolean(L, -1);
  lua_pop(L, 1);
  lua_getfield(L, 1, "category_limits");
  luaL_argcheck(L, lua_isnil(L, -1) || lua_isfunction(L, -1), 1, "category_limits must be a function");
  int has_limits = lua_isfunction(L, -1);
  /* userdata first, in a safe empty state, then the resources */
  store_ud *u = lua_newuserdatauv(L, sizeof *u, 0);
  memset(u, 0, sizeof *u);
  u->limits_ref = LUA_NOREF;
  luaL_setmetatable(L, STORE_MT);
  if (has_limits) {
    lua_pushvalue(L, -2);
    u->limits_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    cfg.category_limits = lua_category_limits;
    cfg.category_limits_ctx = u;
  }
  u->store = lp_store_new(&cfg);
  if (!u->store) return luaL_error(L, "cannot create store (out of memory or no random source)");
  return 1;
}

static int store_close(lua_State *L) {
  store_ud *u = luaL_checkudata(L, 1, STORE_MT);
  /* long polls parked in C on this store (lp_waiter.h) learn that their wait is over */
  if (u->store) lp_store_end_owned(u->store, lp_waiter_end, NULL);
  lp_store_free(u->store);
  u->store = NULL;
  luaL_unref(L, LUA_REGISTRYINDEX, u->limits_ref);
  u->limits_ref = LUA_NOREF;
  lp_woken_free(&u->woken);
  lp_buf_free(&u->out);
  return 0;
}

static lp_slice check_slice(lua_State *L, int i) {
  lp_slice s;
  s.ptr = luaL_checklstring(L, i, &s.len);
  return s;
}

/* Room for every handle a publish can wake (at most all waiting subscriptions),
 * made before the store changes, so running out of memory changes nothing. */
static int reserve_woken(store_ud *u) {
  lp_store_stats st;
  lp_store_get_stats(u->store, &st);
  return lp_woken_reserve(&u->woken, st.waiting);
}

/* The handles woken without an owner, as a Lua array. */
static void push_woken(lua_State *L, const lp_woken *w) {
  lua_createtable(L, (int)w->nhandles, 0);
  for (size_t i = 0; i < w->nhandles; i++) {
    lua_pushinteger(L, (lua_Integer)w->handles[i]);
    lua_rawseti(L, -2, (lua_Integer)i + 1);
  }
}

static void push_event(lua_State *L, const lp_published *p) {
  lua_pushlstring(L, p->json, p->json_len);
  lua_pushstring(L, p->id);
  lua_pushinteger(L, (lua_Integer)p->timestamp);
}

/* store:publish(category, data_json, now_ms) -> json, id, timestamp, woken, buffered[, answer]
 * woken is an array of subscription handles (possibly empty); answer, present
 * when woken is not empty, is the long-poll answer {"events":[json]} for them. Long polls
 * parked in C (lp_waiter.h) are answered here, before this returns, and are not in woken. */
static int l_publish(lua_State *L) {
  store_ud *u = check_store(L, 1);
  lp_slice cat = check_slice(L, 2);
  lp_slice data = check_slice(L, 3);
  lua_Integer now = luaL_checkinteger(L, 4);
  lp_published p;
  int rc = reserve_woken(u);
  if (rc == LP_OK) rc = lp_store_publish(u->store, cat, data, (int64_t)now, lp_woken_add, &u->woken, &p);
  if (rc != LP_OK) return fail_store(L, rc);
  lp_woken_answer(&u->woken, &p);
  push_event(L, &p);
  push_woken(L, &u->woken);
  lua_pushboolean(L, p.buffered);
  if (u->woken.nhandles == 0) return 5;
  /* the answer every woken long poll gets, built here once */
  luaL_Buffer b;
  luaL_buffinit(L, &b);
  luaL_addstring(&b, "{\"events\":[");
  luaL_addlstring(&b, p.json, p.json_len);
  luaL_addstring(&b, "]}");
  luaL_pushresult(&b);
  return 6;
}

/* store:restore(category, data_json, id, timestamp) -> json | nil, err */
static int l_restore(lua_State *L) {
  store_ud *u = check_store(L, 1);
  lp_slice cat = check_slice(L, 2);
  lp_slice data = check_slice(L, 3);
  const char *id = luaL_checkstring(L, 4);
  lua_Integer ts = luaL_checkinteger(L, 5);
  lp_published p;
  int rc = lp_store_restore(u->store, cat, data, id, (int64_t)ts, &p);
  if (rc != LP_OK) return fail_store(L, rc);
  lua_pushlstring(L, p.json, p.json_len);
  return 1;
}

#define MAX_CATEGORIES 64

/* Reads a category or an array of them at index i into out; returns the count. */
static size_t check_categories(lua_State *L, int i, lp_slice *out) {
  if (lua_type(L, i) == LUA_TSTRING) {
    out[0] = check_slice(L, i);
    return 1;
  }
  luaL_checktype(L, i, LUA_TTABLE);
  size_t n = (size_t)lua_rawlen(L, i);
  luaL_argcheck(L, n >= 1 && n <= MAX_CATEGORIES, i, "1 to 64 categories");
  for (size_t k = 0; k < n; k++) {
    lua_rawgeti(L, i, (lua_Integer)k + 1);
    luaL_argcheck(L, lua_type(L, -1) == LUA_TSTRING, i, "categories must be strings");
    out[k].ptr = lua_tolstring(L, -1, &out[k].len);
    lua_pop(L, 1); /* still referenced by the table */
  }
  return n;
}

/* The arguments of both fetches: categories, since_ms, last_id|nil (lowercased
 * into a.lower), now_ms. 0 when last_id is not a UUID. */
typedef struct fetch_args {
  lp_slice cats[MAX_CATEGORIES];
  size_t n;
  lua_Integer since, now;
  const char *last_id;
  char lower[LP_UUID_LEN + 1];
} fetch_args;

static int check_fetch_args(lua_State *L, fetch_args *a) {
  a->n = check_categories(L, 2, a->cats);
  a->since = luaL_checkinteger(L, 3);
  a->last_id = luaL_optstring(L, 4, NULL);
  a->now = luaL_checkinteger(L, 5);
  if (!a->last_id) return 1;
  if (!lp_uuid_is_valid(a->last_id, strlen(a->last_id))) return 0;
  for (size_t i = 0; i <= LP_UUID_LEN; i++)
    a->lower[i] = (char)(a->last_id[i] >= 'A' && a->last_id[i] <= 'F' ? a->last_id[i] + 32 : a->last_id[i]);
  a->last_id = a->lower;
  return 1;
}

/* store:fetch(categories, since_ms, last_id|nil, now_ms) -> body|nil, count, missed
 * or nil, message for a bad category. */
static int l_fetch(lua_State *L) {
  store_ud *u = check_store(L, 1);
  fetch_args a;
  if (!check_fetch_args(L, &a)) return fail(L, "last_id is not a UUID");
  size_t count;
  int missed;
  lp_buf_reset(&u->out);
  int rc = lp_store_fetch(u->store, a.cats, a.n, (int64_t)a.since, a.last_id, (int64_t)a.now, &u->out, &count, &missed);
  if (rc != LP_OK) return fail_store(L, rc);
  if (count == 0) {
    lua_pushnil(L);
  } else {
    lua_pushlstring(L, u->out.data, u->out.len);
  }
  lua_pushinteger(L, (lua_Integer)count);
  lua_pushboolean(L, missed);
  /* one huge answer should not pin its memory for the store's lifetime */
  if (u->out.cap > (1u << 20)) lp_buf_free(&u->out);
  return 3;
}

static int push_event_view(void *ctx, const lp_event_view *e) {
  lua_State *L = ctx;
  /* an allocation error raises out of the store's fetch before it changed anything */
  lua_createtable(L, 0, 3);
  lua_pushlstring(L, e->json, e->json_len);
  lua_setfield(L, -2, "json");
  lua_pushinteger(L, (lua_Integer)e->timestamp);
  lua_setfield(L, -2, "timestamp");
  lua_pushstring(L, e->id);
  lua_setfield(L, -2, "id");
  lua_rawseti(L, -2, (lua_Integer)lua_rawlen(L, -2) + 1);
  return 0;
}

/* store:fetch_events(categories, since_ms, last_id|nil, now_ms) -> list|nil, count, missed
 * or nil, message. list holds {json=, timestamp=, id=} per event, oldest first:
 * what streams (SSE) frame themselves, with no JSON to parse back. */
static int l_fetch_events(lua_State *L) {
  store_ud *u = check_store(L, 1);
  fetch_args a;
  if (!check_fetch_args(L, &a)) return fail(L, "last_id is not a UUID");
  size_t count;
  int missed;
  lua_newtable(L);
  int rc = lp_store_fetch_each(u->store, a.cats, a.n, (int64_t)a.since, a.last_id, (int64_t)a.now, push_event_view, L,
                               &count, &missed);
  if (rc != LP_OK) return fail_store(L, rc);
  if (count == 0) {
    lua_pop(L, 1);
    lua_pushnil(L);
  }
  lua_pushinteger(L, (lua_Integer)count);
  lua_pushboolean(L, missed);
  return 3;
}

/* store:wait(categories) -> handle | nil, message */
static int l_wait(lua_State *L) {
  store_ud *u = check_store(L, 1);
  lp_slice cats[MAX_CATEGORIES];
  size_t n = check_categories(L, 2, cats);
  uint64_t handle;
  int rc = lp_store_wait(u->store, cats, n, &handle);
  if (rc != LP_OK) return fail_store(L, rc);
  lua_pushinteger(L, (lua_Integer)handle);
  return 1;
}

static int l_cancel(lua_State *L) {
  store_ud *u = check_store(L, 1);
  lua_pushboolean(L, lp_store_cancel(u->store, (uint64_t)luaL_checkinteger(L, 2)));
  return 1;
}

/* store:take_waiters(category) -> array of handles | nil, message
 * Ends the subscriptions waiting on category without storing an event: the
 * Redis engine wakes them for events that live in Redis. */
static int l_take_waiters(lua_State *L) {
  store_ud *u = check_store(L, 1);
  lp_slice cat = check_slice(L, 2);
  size_t count;
  int rc = reserve_woken(u);
  if (rc == LP_OK) rc = lp_store_take_waiters(u->store, cat, lp_woken_add, &u->woken, &count);
  if (rc != LP_OK) return fail_store(L, rc);
  /* no event here to answer with: an owned waiter's wait just ends (none in Redis mode) */
  for (size_t i = 0; i < u->woken.nowned; i++) u->woken.owned[i]->ops->ended(u->woken.owned[i]);
  push_woken(L, &u->woken);
  return 1;
}

/* store:waiting_in(category) -> how many subscriptions wait on it now */
static int l_waiting_in(lua_State *L) {
  store_ud *u = check_store(L, 1);
  lua_pushinteger(L, (lua_Integer)lp_store_waiting_in(u->store, check_slice(L, 2)));
  return 1;
}

static int l_mark_time(lua_State *L) {
  store_ud *u = check_store(L, 1);
  lua_pushinteger(L, (lua_Integer)lp_store_mark_time(u->store, (int64_t)luaL_checkinteger(L, 2)));
  return 1;
}

static int l_expire(lua_State *L) {
  store_ud *u = check_store(L, 1);
  lua_pushinteger(L, (lua_Integer)lp_store_expire(u->store, (int64_t)luaL_checkinteger(L, 2)));
  return 1;
}

static void set_int(lua_State *L, const char *k, lua_Integer v) {
  lua_pushinteger(L, v);
  lua_setfield(L, -2, k);
}

#define STATS_CATEGORIES_DEFAULT 1000
#define STATS_CATEGORIES_MAX 10000

/* store:stats([categories]) -> table
 * categories: true for the 1000 largest categories, or {offset=, limit=} for a
 * page of the ranking (limit at most 10000). They come as by_category = {
 * [name] = {events, bytes, waiting} } and by_category_order = { names, largest
 * first }; a store with a million categories answers in one C pass. */
static int l_stats(lua_State *L) {
  store_ud *u = check_store(L, 1);
  size_t offset = 0, limit = 0;
  if (lua_istable(L, 2)) {
    offset = (size_t)opt_int_field(L, 2, "offset", 0, 0);
    limit = (size_t)opt_int_field(L, 2, "limit", STATS_CATEGORIES_DEFAULT, 1);
    luaL_argcheck(L, limit <= STATS_CATEGORIES_MAX, 2, "limit is at most 10000");
    luaL_argcheck(L, offset <= (size_t)1 << 40, 2, "offset is too large");
  } else if (lua_toboolean(L, 2)) {
    limit = STATS_CATEGORIES_DEFAULT;
  }
  lp_store_stats st;
  lp_store_get_stats(u->store, &st);
  lua_createtable(L, 0, 14);
  set_int(L, "categories", (lua_Integer)st.categories);
  set_int(L, "events", (lua_Integer)st.events);
  set_int(L, "event_bytes", (lua_Integer)st.event_bytes);
  set_int(L, "buffered_bytes", (lua_Integer)st.buffered_bytes);
  set_int(L, "waiting", (lua_Integer)st.waiting);
  set_int(L, "published", (lua_Integer)st.published);
  set_int(L, "delivered", (lua_Integer)st.delivered);
  set_int(L, "dropped", (lua_Integer)st.dropped);
  set_int(L, "evicted", (lua_Integer)st.evicted);
  set_int(L, "last_timestamp", (lua_Integer)st.last_timestamp);
  if (limit > 0) {
    lp_category_info *page = lua_newuserdatauv(L, limit * sizeof *page, 0); /* freed by the GC */
    size_t n;
    int rc = lp_store_top_categories(u->store, offset, limit, page, &n);
    if (rc != LP_OK) return fail_store(L, rc);
    lua_createtable(L, 0, (int)n); /* by_category */
    lua_createtable(L, (int)n, 0); /* by_category_order */
    for (size_t i = 0; i < n; i++) {
      lua_pushlstring(L, page[i].name.ptr, page[i].name.len);
      lua_pushvalue(L, -1);
      lua_rawseti(L, -3, (lua_Integer)i + 1);
      lua_createtable(L, 0, 3);
      set_int(L, "events", (lua_Integer)page[i].events);
      set_int(L, "bytes", (lua_Integer)page[i].bytes);
      set_int(L, "waiting", (lua_Integer)page[i].waiting);
      lua_rawset(L, -4);
    }
    lua_setfield(L, -4, "by_category_order");
    lua_setfield(L, -3, "by_category");
    lua_pop(L, 1); /* the page */
    set_int(L, "by_category_offset", (lua_Integer)offset);
  }
  return 1;
}

/* core.parse_publish(body) -> category, data_json | nil, message[, "ENOMEM"]
 * The messages are the wire contract's publish errors. */
static int l_parse_publish(lua_State *L) {
  size_t len;
  const char *body = luaL_checklstring(L, 1, &len);
  lua_Integer max_cat = luaL_optinteger(L, 2, 1024);
  lp_publish_body pb;
  const char *err;
  int prc = lp_json_parse_publish(body, len, &pb, &err);
  if (prc == -2) return fail_store(L, LP_ENOMEM);
  if (prc != 0) {
    luaL_pushfail(L);
    lua_pushfstring(L, "Invalid POST body json: %s.", err);
    return 2;
  }
  int ok_cat = pb.has_category && pb.category.len >= 1 && (lua_Integer)pb.category.len <= max_cat;
  if (!ok_cat) {
    lp_buf_free(&pb.category);
    luaL_pushfail(L);
    lua_pushfstring(L, "Invalid or missing 'category' arg, must be 1-%d characters long.", (int)max_cat);
    return 2;
  }
  if (!pb.has_data) {
    lp_buf_free(&pb.category);
    return fail(L, "Invalid or missing 'data' arg, must be non-nil.");
  }
  lua_pushlstring(L, pb.category.data, pb.category.len);
  lp_buf_free(&pb.category);
  lua_pushlstring(L, pb.data, pb.data_len);
  return 2;
}

/* core.json_check(text) -> true | nil, message */
static int l_json_check(lua_State *L) {
  size_t len;
  const char *text = luaL_checklstring(L, 1, &len);
  const char *err;
  if (lp_json_check(text, len, &err) != 0) return fail(L, err);
  lua_pushboolean(L, 1);
  return 1;
}

static int l_utf8_valid(lua_State *L) {
  size_t len;
  const char *s = luaL_checklstring(L, 1, &len);
  lua_pushboolean(L, lp_utf8_is_valid(s, len));
  return 1;
}

static int l_uuid(lua_State *L) {
  char id[LP_UUID_LEN + 1];
  if (lp_uuid_v4(id) != 0) return fail(L, "the OS random source failed");
  lua_pushstring(L, id);
  return 1;
}

static int l_is_uuid(lua_State *L) {
  size_t len;
  const char *s = luaL_checklstring(L, 1, &len);
  lua_pushboolean(L, lp_uuid_is_valid(s, len));
  return 1;
}

static int l_json_string(lua_State *L) {
  size_t len;
  const char *s = luaL_checklstring(L, 1, &len);
  if (!lp_utf8_is_valid(s, len)) return fail(L, "not valid UTF-8");
  lp_buf b = LP_BUF_INIT;
  if (lp_json_append_string(&b, s, len) != 0) {
    lp_buf_free(&b);
    return luaL_error(L, "out of memory");
  }
  lua_pushlstring(L, b.data, b.len);
  lp_buf_free(&b);
  return 1;
}

/* core.lock_file(fd) -> true | nil, message, "EWOULDBLOCK"|"ERROR"
 * An exclusive, non-blocking flock(2) on an open file descriptor (a luv fs fd).
 * The lock goes with the descriptor: closing it (or the process ending, even
 * by SIGKILL) releases it. The one system call of the module: luv has none. */
static int l_lock_file(lua_State *L) {
  int fd = (int)luaL_checkinteger(L, 1);
  if (flock(fd, LOCK_EX | LOCK_NB) == 0) {
    lua_pushboolean(L, 1);
    return 1;
  }
  int e = errno;
  luaL_pushfail(L);
  lua_pushstring(L, strerror(e));
  lua_pushstring(L, e == EWOULDBLOCK ? "EWOULDBLOCK" : "ERROR");
  return 3;
}

/* core.event_json(timestamp, category, data_json, id) -> json
 * The event's JSON text in the one format (lp_event_json_append), for events
 * stored elsewhere (Redis). Arguments are trusted: checked JSON, a UUID. */
static int l_event_json(lua_State *L) {
  lua_Integer ts = luaL_checkinteger(L, 1);
  lp_slice cat = check_slice(L, 2);
  lp_slice data = check_slice(L, 3);
  size_t id_len;
  const char *id = luaL_checklstring(L, 4, &id_len);
  luaL_argcheck(L, lp_uuid_is_valid(id, id_len), 4, "not a UUID");
  luaL_argcheck(L, lp_utf8_is_valid(cat.ptr, cat.len), 2, "not valid UTF-8");
  lp_buf b = LP_BUF_INIT;
  if (lp_event_json_append(&b, cat, data, id, (int64_t)ts) != LP_OK) {
    lp_buf_free(&b);
    return luaL_error(L, "out of memory");
  }
  lua_pushlstring(L, b.data, b.len);
  lp_buf_free(&b);
  return 1;
}

/* core.events_answer(jsons, missed) -> '{"events":[..]}' (with "missed":true)
 * The long-poll answer around event JSON texts made elsewhere (Redis). */
static int l_events_answer(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  int missed = lua_toboolean(L, 2);
  lua_Integer n = (lua_Integer)lua_rawlen(L, 1);
  luaL_Buffer b;
  luaL_buffinit(L, &b);
  luaL_addstring(&b, "{\"events\":[");
  for (lua_Integer i = 1; i <= n; i++) {
    if (i > 1) luaL_addchar(&b, ',');
    lua_rawgeti(L, 1, i);
    luaL_argcheck(L, lua_type(L, -1) == LUA_TSTRING, 1, "event JSON texts must be strings");
    luaL_addvalue(&b);
  }
  luaL_addstring(&b, missed ? "],\"missed\":true}" : "]}");
  luaL_pushresult(&b);
  return 1;
}

static const luaL_Reg store_methods[] = {{"publish", l_publish},
                                         {"restore", l_restore},
                                         {"fetch_events", l_fetch_events},
                                         {"fetch", l_fetch},
                                         {"wait", l_wait},
                                         {"cancel", l_cancel},
                                         {"mark_time", l_mark_time},
                                         {"expire", l_expire},
                                         {"stats", l_stats},
                                         {"close", store_close},
                                         {NULL, NULL}};
/* for engines that keep events elsewhere (Redis) */
static const luaL_Reg store_engine_methods[] = {
    {"take_waiters", l_take_waiters}, {"waiting_in", l_waiting_in}, {NULL, NULL}};

static const luaL_Reg store_meta[] = {{"__gc", store_close}, {"__close", store_close}, {NULL, NULL}};

static const luaL_Reg core_functions[] = {{"new_store", l_new_store},
                                          {"parse_publish", l_parse_publish},
                                          {"json_check", l_json_check},
                                          {"json_string", l_json_string},
                                          {"utf8_valid", l_utf8_valid},
                                          {"uuid", l_uuid},
                                          {"is_uuid", l_is_uuid},
                                          {"json_encode", lp_lua_json_encode},
                                          {"event_json", l_event_json},
                                          {"events_answer", l_events_answer},
                                          {"lock_file", l_lock_file},
                                          {"fingerprint", lp_lua_fingerprint},
                                          {NULL, NULL}};

int luaopen_longpoll_core(lua_State *L) {
  if (luaL_newmetatable(L, STORE_MT)) {
    luaL_setfuncs(L, store_meta, 0);
    luaL_newlib(L, store_methods);
    luaL_setfuncs(L, store_engine_methods, 0);
    lua_setfield(L, -2, "__index");
  }
  lua_pop(L, 1);
  luaL_newlib(L, core_functions);
  lp_lua_http_open(L);
  lp_lua_server_open(L);
  lp_lua_stderr_open(L);
  lp_lua_cache_open(L);
  lp_lua_keys_open(L);
  lp_lua_redis_publish_open(L);
  lua_pushliteral(L, "longpoll.core");
  lua_setfield(L, -2, "_NAME");
  lua_pushliteral(L, LP_CORE_VERSION);
  lua_setfield(L, -2, "_VERSION");
  return 1;
}
