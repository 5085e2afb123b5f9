/* lp_lua_json: encodes Lua values as JSON for manager:publish. lua-cjson on
 * Lua 5.4 prints integers with 14 significant digits; event data must keep
 * every digit, so integers are printed exactly and floats round-trip. */
#include <lauxlib.h>
#include <lua.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lp_json.h"

#define MAX_DEPTH 128

typedef struct encoder {
  lua_State *L;
  lp_buf out;
  const char *err;
  char errbuf[96];
} encoder;

static int encode_value(encoder *e, int idx, int depth);

static int set_err(encoder *e, const char *msg) {
  if (!e->err) e->err = msg;
  return -1;
}

static int encode_number(encoder *e, int idx) {
  lua_State *L = e->L;
  if (lua_isinteger(L, idx)) return lp_buf_append_i64(&e->out, (int64_t)lua_tointeger(L, idx));
  double d = lua_tonumber(L, idx);
  if (!isfinite(d)) return set_err(e, "cannot encode NaN or infinity as JSON");
  char tmp[40];
  snprintf(tmp, sizeof tmp, "%.15g", d);
  if (strtod(tmp, NULL) != d) snprintf(tmp, sizeof tmp, "%.17g", d);
  return lp_buf_append_str(&e->out, tmp);
}

static int encode_string(encoder *e, int idx) {
  size_t len;
  const char *s = lua_tolstring(e->L, idx, &len);
  if (!lp_utf8_is_valid(s, len)) return set_err(e, "string is not valid UTF-8");
  return lp_json_append_string(&e->out, s, len);
}

/* A table is an array when its keys are exactly 1..n. */
static int is_array(lua_State *L, int idx, lua_Integer *n) {
  lua_Integer count = 0, max = 0;
  lua_pushnil(L);
  while (lua_next(L, idx)) {
    lua_pop(L, 1);
    if (!lua_isinteger(L, -1) || lua_tointeger(L, -1) < 1) {
      lua_pop(L, 1);
      return 0;
    }
    lua_Integer k = lua_tointeger(L, -1);
    if (k > max) max = k;
    count++;
  }
  *n = max;
  return count > 0 && count == max;
}

static int encode_table(encoder *e, int idx, int depth) {
  lua_State *L = e->L;
  if (depth >= MAX_DEPTH) return set_err(e, "table nested too deeply (or a cycle)");
  if (!lua_checkstack(L, 4)) return set_err(e, "out of Lua stack");
  lua_Integer n;
  if (is_array(L, idx, &n)) {
    if (lp_buf_append_char(&e->out, '[')) return -1;
    for (lua_Integer i = 1; i <= n; i++) {
      if (i > 1 && lp_buf_append_char(&e->out, ',')) return -1;
      lua_rawgeti(L, idx, i);
      int rc = encode_value(e, lua_gettop(L), depth + 1);
      lua_pop(L, 1);
      if (rc) return -1;
    }
    return lp_buf_append_char(&e->out, ']');
  }
  if (lp_buf_append_char(&e->out, '{')) return -1;
  int first = 1;
  lua_pushnil(L);
  while (lua_next(L, idx)) {
    int kt = lua_type(L, -2);
    if (kt != LUA_TSTRING && kt != LUA_TNUMBER) {
      lua_pop(L, 2);
      return set_err(e, "table keys must be strings or numbers");
    }
    if (!first && lp_buf_append_char(&e->out, ',')) goto nomem;
    first = 0;
    lua_pushvalue(L, -2); /* a copy: tolstring on a number key would confuse lua_next */
    size_t klen;
    const char *k = lua_tolstring(L, -1, &klen);
    int rc = lp_utf8_is_valid(k, klen) ? lp_json_append_string(&e->out, k, klen) : set_err(e, "key is not valid UTF-8");
    lua_pop(L, 1);
    if (rc || lp_buf_append_char(&e->out, ':') || encode_value(e, lua_gettop(L), depth + 1)) {
      lua_pop(L, 2);
      return -1;
    }
    lua_pop(L, 1);
  }
  return lp_buf_append_char(&e->out, '}');
nomem:
  lua_pop(L, 2);
  return -1;
}

static int encode_value(encoder *e, int idx, int depth) {
  lua_State *L = e->L;
  switch (lua_type(L, idx)) {
    case LUA_TBOOLEAN: return lp_buf_append_str(&e->out, lua_toboolean(L, idx) ? "true" : "false");
    case LUA_TNUMBER: return encode_number(e, idx);
    case LUA_TSTRING: return encode_string(e, idx);
    case LUA_TTABLE: return encode_table(e, idx, depth);
    case LUA_TLIGHTUSERDATA:
      /* lua-cjson's cjson.null is a NULL light userdata */
      if (lua_touserdata(L, idx) == NULL) return lp_buf_append_str(&e->out, "null");
      /* fall through */
    default:
      snprintf(e->errbuf, sizeof e->errbuf, "cannot encode a %s as JSON", luaL_typename(L, idx));
      return set_err(e, e->errbuf);
  }
}

/* core.json_encode(value) -> text | nil, message. Never raises for bad data. */
int lp_lua_json_encode(lua_State *L) {
  luaL_checkany(L, 1);
  encoder e;
  memset(&e, 0, sizeof e);
  e.L = L;
  lua_settop(L, 1);
  int rc = encode_value(&e, 1, 0);
  if (rc != 0) {
    lp_buf_free(&e.out);
    luaL_pushfail(L);
    lua_pushstring(L, e.err ? e.err : "out of memory");
    return 2;
  }
  lua_pushlstring(L, e.out.data ? e.out.data : "", e.out.len);
  lp_buf_free(&e.out);
  return 1;
}
