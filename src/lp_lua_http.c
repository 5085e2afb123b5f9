/* lp_lua_http: the Lua side of lp_http, in longpoll.core: the request table the server engine
 * hands to Lua (lp_lua_http_push_request), the request parser binding (core.http_parser, for
 * specs of the parser's rules) and req:query_all's decoding (core.http_query_all). */
#include <ctype.h>
#include <lauxlib.h>
#include <lua.h>
#include <string.h>

#include "lp_http.h"

#define PARSER_MT "longpoll.HttpParser"
#define KEYS_REGISTRY "longpoll.http_keys"

/* The field names of a request, made once (upvalue 1 of the functions here): set with
 * lua_rawset, they cost no string lookup per request. */
enum { K_METHOD = 1, K_TARGET, K_VERSION, K_HEADERS, K_KEEP_ALIVE, K_EXPECT, K_PATH, K_RAW_PATH, K_RAW_QUERY };
enum { K_QUERY = K_RAW_QUERY + 1, K_QUERY_COUNT, K_TARGET_ERROR, K_BODY, K_HTTP_11, K_HTTP_10, K_COMMA, K_COUNT };
static const char *const key_names[] = {
    NULL,   "method",   "target",    "version", "headers",     "keep_alive",   "expect_continue",
    "path", "raw_path", "raw_query", "query",   "query_count", "target_error", "body",
    "1.1",  "1.0",      ", "};

static void push_key(lua_State *L, int keys, int k) { lua_rawgeti(L, keys, k); }

/* t[key] = the value on top of the stack (popped); t is just below it. */
static void set_key(lua_State *L, int keys, int k) {
  push_key(L, keys, k);
  lua_insert(L, -2);
  lua_rawset(L, -3);
}

typedef struct parser_ud {
  lp_http_parser p; /* empty, and owning nothing, until bytes are pushed */
} parser_ud;

static parser_ud *check_parser(lua_State *L) { return luaL_checkudata(L, 1, PARSER_MT); }

static size_t limit_field(lua_State *L, const char *k) {
  lua_getfield(L, 1, k);
  int ok;
  lua_Integer v = lua_tointegerx(L, -1, &ok);
  if (!ok || v < 1) luaL_error(L, "limit '%s' must be a positive integer", k);
  lua_pop(L, 1);
  return (size_t)v;
}

/* core.http_parser{ max_header_bytes =, max_body_bytes =, max_url_bytes = } -> parser */
static int l_http_parser(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  lp_http_limits limits;
  limits.max_header_bytes = limit_field(L, "max_header_bytes");
  limits.max_body_bytes = limit_field(L, "max_body_bytes");
  limits.max_url_bytes = limit_field(L, "max_url_bytes");
  /* user value 1: the request whose body is still being read (parser.head) */
  parser_ud *u = lua_newuserdatauv(L, sizeof *u, 1);
  lp_http_init(&u->p, &limits);
  luaL_setmetatable(L, PARSER_MT);
  return 1;
}

/* parser:close(): frees the buffers now (a parser kept for a waiting long poll holds nothing). */
static int parser_close(lua_State *L) {
  parser_ud *u = check_parser(L);
  lp_http_free(&u->p);
  lua_pushnil(L);
  lua_setiuservalue(L, 1, 1);
  return 0;
}

static int parser_push(lua_State *L) {
  parser_ud *u = check_parser(L);
  size_t len;
  const char *data = luaL_checklstring(L, 2, &len);
  lp_http_push(&u->p, data, len); /* out of memory shows in the next parse */
  return 0;
}

static int parser_buffered(lua_State *L) {
  lua_pushinteger(L, (lua_Integer)lp_http_buffered(&check_parser(L)->p));
  return 1;
}

static int parser_in_progress(lua_State *L) {
  lua_pushboolean(L, lp_http_in_progress(&check_parser(L)->p));
  return 1;
}

/* Pushes s percent-decoded; returns 0, or -1 (nothing pushed) on a bad escape. */
static int push_decoded(lua_State *L, lp_slice s, int plus_is_space) {
  if (!memchr(s.ptr, '%', s.len) && !(plus_is_space && memchr(s.ptr, '+', s.len))) {
    lua_pushlstring(L, s.ptr, s.len);
    return 0;
  }
  luaL_Buffer b;
  char *out = luaL_buffinitsize(L, &b, s.len);
  ssize_t n = lp_http_decode(s.ptr, s.len, out, plus_is_space);
  luaL_pushresultsize(&b, n < 0 ? 0 : (size_t)n);
  if (n >= 0) return 0;
  lua_pop(L, 1);
  return -1;
}

/* Pushes the table of a query's parameters (decoded; the first value of each wins); returns how
 * many pairs the query has, or -1 (nothing pushed) when one does not decode. */
static lua_Integer push_query(lua_State *L, lp_slice query) {
  lua_createtable(L, 0, 4);
  size_t pos = 0;
  lua_Integer count = 0;
  lp_slice k, v;
  int has_value;
  /* each pass consumes one piece of the query */
  while (lp_http_query_next(query, &pos, &k, &v, &has_value)) {
    if (push_decoded(L, k, 1) != 0) {
      lua_pop(L, 1);
      return -1;
    }
    if (push_decoded(L, v, 1) != 0) {
      lua_pop(L, 2);
      return -1;
    }
    count++;
    lua_pushvalue(L, -2);
    if (lua_rawget(L, -4) == LUA_TNIL) {
      lua_pop(L, 1);
      lua_rawset(L, -3); /* the first value wins */
    } else {
      lua_pop(L, 3);
    }
  }
  return count;
}

/* Whether every escape in s is a valid %XX. */
static int escapes_valid(lp_slice s) {
  const char *p = s.ptr, *end = s.ptr + s.len;
  while ((p = memchr(p, '%', (size_t)(end - p))) != NULL) {
    if (end - p < 3 || !isxdigit((unsigned char)p[1]) || !isxdigit((unsigned char)p[2])) return 0;
    p += 3;
  }
  return 1;
}

/* Sets path, raw_path, raw_query, and with_query the query (first values) and query_count, in
 * the table on top of the stack from a request target; without, the query is only checked
 * (longpoll.http.request makes its table when a handler first reads it). Returns NULL, or why
 * the target is refused. */
static const char *set_target(lua_State *L, int keys, lp_slice target, int with_query) {
  lp_slice path, query;
  if (lp_http_split_target(target, &path, &query) != 0) return "invalid request target";
  lua_pushlstring(L, path.ptr, path.len);
  if (!memchr(path.ptr, '%', path.len)) {
    lua_pushvalue(L, -1);
  } else if (push_decoded(L, path, 0) != 0) {
    lua_pop(L, 1);
    return "invalid percent-encoding in path";
  }
  push_key(L, keys, K_PATH); /* table, raw path, path, key */
  lua_insert(L, -2);
  lua_rawset(L, -4);
  set_key(L, keys, K_RAW_PATH);
  lua_pushlstring(L, query.ptr, query.len);
  set_key(L, keys, K_RAW_QUERY);
  if (!with_query) return escapes_valid(query) ? NULL : "invalid percent-encoding in query";
  lua_Integer count = push_query(L, query);
  if (count < 0) return "invalid percent-encoding in query";
  set_key(L, keys, K_QUERY);
  lua_pushinteger(L, count);
  set_key(L, keys, K_QUERY_COUNT);
  return NULL;
}

/* Pushes the request table for a parsed head (see longpoll.http.parser). A target that cannot
 * be decoded leaves its reason in target_error: that request gets a 400 and the connection
 * may stay open. */
static void push_head(lua_State *L, int keys, const lp_http_event *ev, int with_query) {
  lua_createtable(L, 0, 14);
  lua_pushlstring(L, ev->method.ptr, ev->method.len);
  set_key(L, keys, K_METHOD);
  lua_pushlstring(L, ev->target.ptr, ev->target.len);
  set_key(L, keys, K_TARGET);
  push_key(L, keys, ev->minor ? K_HTTP_11 : K_HTTP_10);
  set_key(L, keys, K_VERSION);
  lua_createtable(L, 0, (int)ev->nheaders);
  for (size_t i = 0; i < ev->nheaders; i++) {
    const lp_http_header *h = &ev->headers[i];
    lua_pushlstring(L, h->name.ptr, h->name.len);
    lua_pushvalue(L, -1);
    if (lua_rawget(L, -3) == LUA_TNIL) {
      lua_pop(L, 1);
      lua_pushlstring(L, h->value.ptr, h->value.len);
    } else { /* a repeated header: values joined */
      push_key(L, keys, K_COMMA);
      lua_pushlstring(L, h->value.ptr, h->value.len);
      lua_concat(L, 3);
    }
    lua_rawset(L, -3);
  }
  set_key(L, keys, K_HEADERS);
  lua_pushboolean(L, ev->keep_alive);
  set_key(L, keys, K_KEEP_ALIVE);
  lua_pushboolean(L, ev->expect_continue);
  set_key(L, keys, K_EXPECT);
  const char *err = set_target(L, keys, ev->target, with_query);
  if (err) {
    lua_pushstring(L, err);
    set_key(L, keys, K_TARGET_ERROR);
  }
}

/* parser:parse() -> request, bytes still buffered | nil (more bytes needed)
 *                 | nil, status, message (malformed: answer and close) */
static int parser_parse(lua_State *L) {
  parser_ud *u = check_parser(L);
  lp_http_event ev;
  /* each pass reports a head or a body, or returns */
  for (;;) {
    int rc = lp_http_parse(&u->p, &ev);
    if (rc == LP_HTTP_MORE) {
      lua_pushnil(L);
      return 1;
    }
    if (rc == LP_HTTP_ERROR) {
      lua_pushnil(L);
      lua_setiuservalue(L, 1, 1);
      lua_pushnil(L);
      lua_pushinteger(L, ev.status);
      lua_pushstring(L, ev.message);
      return 3;
    }
    if (rc == LP_HTTP_HEAD) {
      push_head(L, lua_upvalueindex(1), &ev, 1);
      lua_setiuservalue(L, 1, 1);
      continue;
    }
    lua_getiuservalue(L, 1, 1);
    lua_pushlstring(L, ev.body.ptr, ev.body.len);
    set_key(L, lua_upvalueindex(1), K_BODY);
    lua_pushnil(L);
    lua_setiuservalue(L, 1, 1);
    lua_pushinteger(L, (lua_Integer)lp_http_buffered(&u->p));
    return 2;
  }
}

/* Methods, and parser.head: the request whose body is still being read (nil otherwise). */
static int parser_index(lua_State *L) {
  lua_pushvalue(L, 2);
  if (lua_rawget(L, lua_upvalueindex(1)) != LUA_TNIL) return 1;
  const char *k = lua_tostring(L, 2);
  if (k && strcmp(k, "head") == 0) lua_getiuservalue(L, 1, 1);
  return 1;
}

/* core.http_query_all(raw_query, key) -> every decoded value of key, in order ({} when none).
 * The query was validated when the request was parsed; pairs that do not decode are skipped. */
static int l_http_query_all(lua_State *L) {
  lp_slice q, key;
  q.ptr = luaL_checklstring(L, 1, &q.len);
  key.ptr = luaL_checklstring(L, 2, &key.len);
  lua_createtable(L, 1, 0);
  size_t pos = 0;
  lua_Integer n = 0;
  lp_slice k, v;
  int has_value;
  /* each pass consumes one piece of the query */
  while (lp_http_query_next(q, &pos, &k, &v, &has_value)) {
    if (!memchr(k.ptr, '%', k.len) && !memchr(k.ptr, '+', k.len)) { /* a plain key: compared as sent */
      if (k.len != key.len || memcmp(k.ptr, key.ptr, k.len) != 0) continue;
    } else {
      if (push_decoded(L, k, 1) != 0) continue;
      size_t dl;
      const char *d = lua_tolstring(L, -1, &dl);
      int same = dl == key.len && memcmp(d, key.ptr, dl) == 0;
      lua_pop(L, 1);
      if (!same) continue;
    }
    if (push_decoded(L, v, 1) != 0) continue;
    lua_rawseti(L, -2, ++n);
  }
  return 1;
}

static const luaL_Reg parser_methods[] = {{"push", parser_push},         {"parse", parser_parse},
                                          {"buffered", parser_buffered}, {"in_progress", parser_in_progress},
                                          {"close", parser_close},       {NULL, NULL}};

static const luaL_Reg parser_meta[] = {{"__gc", parser_close}, {"__close", parser_close}, {NULL, NULL}};

/* core.http_query(raw_query) -> the table of its parameters (decoded, first values), count.
 * For longpoll.http.request, which makes it when a handler first reads req.query. */
static int l_http_query(lua_State *L) {
  lp_slice q;
  q.ptr = luaL_checklstring(L, 1, &q.len);
  lua_Integer count = push_query(L, q);
  if (count < 0) { /* checked when the request was parsed; a table anyway */
    lua_newtable(L);
    count = 0;
  }
  lua_pushinteger(L, count);
  return 2;
}

static const luaL_Reg http_functions[] = {
    {"http_parser", l_http_parser}, {"http_query_all", l_http_query_all}, {"http_query", l_http_query}, {NULL, NULL}};

/* Adds the HTTP functions to the module table on top of the stack (from luaopen_longpoll_core). */
void lp_lua_http_open(lua_State *L) {
  lua_createtable(L, K_COUNT - 1, 0);
  for (int k = 1; k < K_COUNT; k++) {
    lua_pushstring(L, key_names[k]);
    lua_rawseti(L, -2, k);
  }
  lua_pushvalue(L, -1);
  lua_setfield(L, LUA_REGISTRYINDEX, KEYS_REGISTRY);
  if (luaL_newmetatable(L, PARSER_MT)) {
    luaL_setfuncs(L, parser_meta, 0);
    luaL_newlibtable(L, parser_methods);
    lua_pushvalue(L, -3);
    luaL_setfuncs(L, parser_methods, 1);
    lua_pushcclosure(L, parser_index, 1);
    lua_setfield(L, -2, "__index");
  }
  lua_pop(L, 1);
  luaL_setfuncs(L, http_functions, 1); /* pops the names */
}

/* Pushes the request table of a whole request (head and body), as parser:parse() makes it,
 * plus remote_addr when given (the server engine, lp_lua_server.c). */
void lp_lua_http_push_request(lua_State *L, const lp_http_event *head, lp_slice body, const char *remote_addr) {
  lua_getfield(L, LUA_REGISTRYINDEX, KEYS_REGISTRY);
  int keys = lua_gettop(L);
  push_head(L, keys, head, 0);
  lua_pushlstring(L, body.ptr ? body.ptr : "", body.len);
  set_key(L, keys, K_BODY);
  if (remote_addr) {
    lua_pushstring(L, remote_addr);
    lua_setfield(L, -2, "remote_addr");
  }
  lua_remove(L, keys);
}
