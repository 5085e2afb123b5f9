/* lp_lua_keys: the Lua binding of lp_keys (core.new_keys), the in-memory engine's table of
 * Idempotency-Keys (lua/longpoll/idempotency.lua hands it out; the native stats handler reads
 * its figures through lp_lua_keys_of).
 *
 *   core.new_keys{ max_keys =, max_bytes =, window_ms = } -> keys
 *   keys:begin(key, fingerprint, now) -> ticket | nil, code[, { id =, timestamp = }]
 *     code: "EREPLAY" (with the first event), "EKEYMISMATCH", "EKEYBUSY", "ENOMEM"
 *   keys:commit(ticket, key, id, timestamp)   keys:abort(ticket, key)
 *   keys:stats(now) -> { idempotency_keys =, idempotency_key_bytes =, idempotency_replays =,
 *                        idempotency_conflicts =, idempotency_evicted = } */
#include <lauxlib.h>
#include <lua.h>

#include "lp_keys.h"

#define KEYS_MT "longpoll.Keys"

typedef struct keys_ud {
  lp_keys *keys; /* NULL once freed */
} keys_ud;

static lp_keys *check_keys(lua_State *L) {
  keys_ud *u = luaL_checkudata(L, 1, KEYS_MT);
  luaL_argcheck(L, u->keys != NULL, 1, "key table is freed");
  return u->keys;
}

lp_keys *lp_lua_keys_of(lua_State *L, int idx) {
  keys_ud *u = luaL_testudata(L, idx, KEYS_MT);
  return u ? u->keys : NULL;
}

static lp_slice check_slice(lua_State *L, int idx) {
  lp_slice s;
  s.ptr = luaL_checklstring(L, idx, &s.len);
  return s;
}

static lua_Integer limit_field(lua_State *L, const char *k, lua_Integer def) {
  lua_getfield(L, 1, k);
  lua_Integer v = def;
  if (!lua_isnil(L, -1)) {
    int ok;
    v = lua_tointegerx(L, -1, &ok);
    if (!ok || v < 1) luaL_error(L, "option '%s' must be an integer >= 1", k);
  }
  lua_pop(L, 1);
  return v;
}

static int l_new_keys(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  lua_Integer max_keys = limit_field(L, "max_keys", 100000);
  lua_Integer max_bytes = limit_field(L, "max_bytes", 16 * 1024 * 1024);
  lua_Integer window_ms = limit_field(L, "window_ms", 86400000);
  keys_ud *u = lua_newuserdatauv(L, sizeof *u, 0);
  u->keys = NULL;
  luaL_setmetatable(L, KEYS_MT);
  u->keys = lp_keys_new((size_t)max_keys, (size_t)max_bytes, (int64_t)window_ms);
  if (!u->keys) return luaL_error(L, "out of memory");
  return 1;
}

static int l_begin(lua_State *L) {
  lp_keys *k = check_keys(L);
  lp_slice key = check_slice(L, 2), fp = check_slice(L, 3);
  int64_t now = (int64_t)luaL_checkinteger(L, 4);
  uint64_t ticket;
  lp_keys_prior prior;
  int rc = lp_keys_begin(k, key, fp, now, &ticket, &prior);
  if (rc == LP_KEYS_NEW) {
    lua_pushinteger(L, (lua_Integer)ticket);
    return 1;
  }
  luaL_pushfail(L);
  if (rc == LP_KEYS_REPLAY) {
    lua_pushliteral(L, "EREPLAY");
    lua_createtable(L, 0, 2);
    lua_pushlstring(L, prior.id.ptr, prior.id.len);
    lua_setfield(L, -2, "id");
    lua_pushinteger(L, (lua_Integer)prior.timestamp);
    lua_setfield(L, -2, "timestamp");
    return 3;
  }
  lua_pushstring(L, rc == LP_KEYS_MISMATCH ? "EKEYMISMATCH" : rc == LP_KEYS_BUSY ? "EKEYBUSY" : "ENOMEM");
  return 2;
}

static int l_commit(lua_State *L) {
  lp_keys *k = check_keys(L);
  uint64_t ticket = (uint64_t)luaL_checkinteger(L, 2);
  lp_slice key = check_slice(L, 3), id = check_slice(L, 4);
  lua_pushboolean(L, lp_keys_commit(k, ticket, key, id, (int64_t)luaL_checkinteger(L, 5)) == 0);
  return 1;
}

static int l_abort(lua_State *L) {
  lp_keys *k = check_keys(L);
  uint64_t ticket = (uint64_t)luaL_checkinteger(L, 2);
  lp_keys_abort(k, ticket, check_slice(L, 3));
  return 0;
}

static void set_int(lua_State *L, const char *k, lua_Integer v) {
  lua_pushinteger(L, v);
  lua_setfield(L, -2, k);
}

static int l_stats(lua_State *L) {
  lp_keys *k = check_keys(L);
  lp_keys_expire(k, (int64_t)luaL_checkinteger(L, 2));
  lp_keys_stats st;
  lp_keys_get_stats(k, &st);
  lua_createtable(L, 0, 5);
  set_int(L, "idempotency_keys", (lua_Integer)st.keys);
  set_int(L, "idempotency_key_bytes", (lua_Integer)st.bytes);
  set_int(L, "idempotency_replays", (lua_Integer)st.replays);
  set_int(L, "idempotency_conflicts", (lua_Integer)st.conflicts);
  set_int(L, "idempotency_evicted", (lua_Integer)st.evicted);
  return 1;
}

static int keys_gc(lua_State *L) {
  keys_ud *u = luaL_checkudata(L, 1, KEYS_MT);
  lp_keys_free(u->keys);
  u->keys = NULL;
  return 0;
}

static const luaL_Reg keys_methods[] = {
    {"begin", l_begin}, {"commit", l_commit}, {"abort", l_abort}, {"stats", l_stats}, {NULL, NULL}};

void lp_lua_keys_open(lua_State *L) {
  if (luaL_newmetatable(L, KEYS_MT)) {
    luaL_newlib(L, keys_methods);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, keys_gc);
    lua_setfield(L, -2, "__gc");
  }
  lua_pop(L, 1);
  lua_pushcfunction(L, l_new_keys);
  lua_setfield(L, -2, "new_keys");
  lua_pushinteger(L, LP_KEYS_RECORD_COST);
  lua_setfield(L, -2, "KEYS_RECORD_COST");
}
