/* lp_hiredis: the Lua module longpoll.hiredis, the Redis protocol for the
 * Redis engine. A reader turns bytes into replies (hiredis's parser, no I/O),
 * format() builds a command, and a blocking connection serves the one check
 * longpoll.start makes before the loop runs. Linked with -lhiredis. */
#include <hiredis/hiredis.h>
#include <lauxlib.h>
#include <lua.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>

#define READER_MT "longpoll.hiredis.Reader"
#define CONN_MT "longpoll.hiredis.Connection"
#define LP_HIREDIS_VERSION "0.1.0"

typedef struct reader_ud {
  redisReader *reader; /* NULL once closed */
  void *reply;         /* a reply being converted, freed even if Lua raises */
} reader_ud;

typedef struct conn_ud {
  redisContext *ctx; /* NULL once closed */
  void *reply;
} conn_ud;

static int fail(lua_State *L, const char *msg) {
  luaL_pushfail(L);
  lua_pushstring(L, msg);
  return 2;
}

/* Replies become Lua values: bulk and status strings are strings, integers
 * integers, a nil reply is hiredis.null (a NULL light userdata, so arrays
 * keep their length), an error is the table { error = "message" }. */
static void push_reply(lua_State *L, const redisReply *r) {
  luaL_checkstack(L, 3, "Redis reply nested too deep");
  switch (r->type) {
    case REDIS_REPLY_STRING:
    case REDIS_REPLY_STATUS: lua_pushlstring(L, r->str, r->len); break;
    case REDIS_REPLY_INTEGER: lua_pushinteger(L, (lua_Integer)r->integer); break;
    case REDIS_REPLY_ERROR:
      lua_createtable(L, 0, 1);
      lua_pushlstring(L, r->str, r->len);
      lua_setfield(L, -2, "error");
      break;
    case REDIS_REPLY_ARRAY:
      lua_createtable(L, (int)r->elements, 0);
      for (size_t i = 0; i < r->elements; i++) {
        push_reply(L, r->element[i]);
        lua_rawseti(L, -2, (lua_Integer)i + 1);
      }
      break;
    default: lua_pushlightuserdata(L, NULL); break;
  }
}

static void drop_reply(void **reply) {
  if (*reply) freeReplyObject(*reply);
  *reply = NULL;
}

/* ---- reader ---- */

static reader_ud *check_reader(lua_State *L, int i) {
  reader_ud *u = luaL_checkudata(L, i, READER_MT);
  luaL_argcheck(L, u->reader != NULL, i, "reader is closed");
  return u;
}

/* hiredis.reader() -> reader */
static int l_reader(lua_State *L) {
  reader_ud *u = lua_newuserdatauv(L, sizeof *u, 0);
  memset(u, 0, sizeof *u);
  luaL_setmetatable(L, READER_MT);
  u->reader = redisReaderCreate();
  if (!u->reader) return luaL_error(L, "out of memory");
  return 1;
}

static int reader_close(lua_State *L) {
  reader_ud *u = luaL_checkudata(L, 1, READER_MT);
  drop_reply(&u->reply);
  if (u->reader) redisReaderFree(u->reader);
  u->reader = NULL;
  return 0;
}

/* reader:feed(bytes) -> { reply, ..., n = count } | nil, message
 * Every complete reply in the bytes fed so far, oldest first. After a
 * protocol error the reader is unusable: the connection must be dropped. */
static int reader_feed(lua_State *L) {
  reader_ud *u = check_reader(L, 1);
  size_t len;
  const char *bytes = luaL_checklstring(L, 2, &len);
  if (len > 0 && redisReaderFeed(u->reader, bytes, len) != REDIS_OK) return fail(L, u->reader->errstr);
  lua_newtable(L);
  lua_Integer n = 0;
  for (;;) {
    void *reply = NULL;
    if (redisReaderGetReply(u->reader, &reply) != REDIS_OK) return fail(L, u->reader->errstr);
    if (!reply) break;
    drop_reply(&u->reply);
    u->reply = reply;
    push_reply(L, reply);
    lua_rawseti(L, -2, ++n);
    drop_reply(&u->reply);
  }
  lua_pushinteger(L, n);
  lua_setfield(L, -2, "n");
  return 1;
}

/* ---- commands ---- */

/* Pushes the strings of the array at index t on the stack (numbers are
 * converted there, so they stay alive) and fills argv/lens. */
static int collect_args(lua_State *L, int t, const char ***argv, size_t **lens) {
  luaL_checktype(L, t, LUA_TTABLE);
  lua_Integer argc = (lua_Integer)lua_rawlen(L, t);
  luaL_argcheck(L, argc >= 1 && argc <= 100000, t, "a command is 1 to 100000 strings");
  luaL_checkstack(L, (int)argc + 2, "too many command arguments");
  /* one userdata holds both arrays, so nothing leaks if a conversion raises */
  char *mem = lua_newuserdatauv(L, (size_t)argc * (sizeof(char *) + sizeof(size_t)), 0);
  *lens = (size_t *)(void *)mem;
  *argv = (const char **)(void *)(mem + (size_t)argc * sizeof(size_t));
  for (lua_Integer i = 0; i < argc; i++) {
    lua_rawgeti(L, t, i + 1);
    int type = lua_type(L, -1);
    if (type != LUA_TSTRING && type != LUA_TNUMBER)
      return luaL_error(L, "command argument %d must be a string or a number", (int)i + 1);
    (*argv)[i] = lua_tolstring(L, -1, &(*lens)[i]);
  }
  return (int)argc;
}

/* hiredis.format({ "SET", "k", "v" }) -> the command in Redis's protocol */
static int l_format(lua_State *L) {
  const char **argv;
  size_t *lens;
  int argc = collect_args(L, 1, &argv, &lens);
  char *cmd = NULL;
  int len = redisFormatCommandArgv(&cmd, argc, argv, lens);
  if (len < 0) return luaL_error(L, "out of memory");
  luaL_Buffer b;
  luaL_buffinit(L, &b);
  luaL_addlstring(&b, cmd, (size_t)len);
  redisFreeCommand(cmd);
  luaL_pushresult(&b);
  return 1;
}

/* ---- blocking connection (start-up check only: it blocks the thread) ---- */

static conn_ud *check_conn(lua_State *L, int i) {
  conn_ud *u = luaL_checkudata(L, i, CONN_MT);
  luaL_argcheck(L, u->ctx != NULL, i, "connection is closed");
  return u;
}

static struct timeval ms_to_tv(lua_Integer ms) {
  struct timeval tv;
  tv.tv_sec = (time_t)(ms / 1000);
  tv.tv_usec = (suseconds_t)((ms % 1000) * 1000);
  return tv;
}

/* hiredis.connect(host, port, timeout_ms) -> connection | nil, message
 * Blocks for at most timeout_ms to connect, and as long for each command. */
static int l_connect(lua_State *L) {
  const char *host = luaL_checkstring(L, 1);
  lua_Integer port = luaL_checkinteger(L, 2);
  lua_Integer ms = luaL_checkinteger(L, 3);
  luaL_argcheck(L, port >= 1 && port <= 65535, 2, "port must be 1 to 65535");
  luaL_argcheck(L, ms >= 1, 3, "timeout must be positive");
  conn_ud *u = lua_newuserdatauv(L, sizeof *u, 0);
  memset(u, 0, sizeof *u);
  luaL_setmetatable(L, CONN_MT);
  u->ctx = redisConnectWithTimeout(host, (int)port, ms_to_tv(ms));
  if (!u->ctx) return fail(L, "out of memory");
  if (u->ctx->err) {
    lua_pushfstring(L, "cannot connect: %s", u->ctx->errstr);
    redisFree(u->ctx);
    u->ctx = NULL;
    luaL_pushfail(L);
    lua_insert(L, -2);
    return 2;
  }
  redisSetTimeout(u->ctx, ms_to_tv(ms));
  return 1;
}

/* connection:command({ ... }) -> reply | nil, message (an I/O error: the
 * connection is unusable afterwards). Error replies are { error = ... }. */
static int conn_command(lua_State *L) {
  conn_ud *u = check_conn(L, 1);
  const char **argv;
  size_t *lens;
  int argc = collect_args(L, 2, &argv, &lens);
  drop_reply(&u->reply);
  u->reply = redisCommandArgv(u->ctx, argc, argv, lens);
  if (!u->reply) return fail(L, u->ctx->err ? u->ctx->errstr : "no reply");
  push_reply(L, u->reply);
  drop_reply(&u->reply);
  return 1;
}

static int conn_close(lua_State *L) {
  conn_ud *u = luaL_checkudata(L, 1, CONN_MT);
  drop_reply(&u->reply);
  if (u->ctx) redisFree(u->ctx);
  u->ctx = NULL;
  return 0;
}

static const luaL_Reg reader_methods[] = {{"feed", reader_feed}, {"close", reader_close}, {NULL, NULL}};
static const luaL_Reg reader_meta[] = {{"__gc", reader_close}, {"__close", reader_close}, {NULL, NULL}};
static const luaL_Reg conn_methods[] = {{"command", conn_command}, {"close", conn_close}, {NULL, NULL}};
static const luaL_Reg conn_meta[] = {{"__gc", conn_close}, {"__close", conn_close}, {NULL, NULL}};
static const luaL_Reg functions[] = {{"reader", l_reader}, {"format", l_format}, {"connect", l_connect}, {NULL, NULL}};

static void new_type(lua_State *L, const char *name, const luaL_Reg *meta, const luaL_Reg *methods) {
  if (luaL_newmetatable(L, name)) {
    luaL_setfuncs(L, meta, 0);
    lua_newtable(L);
    luaL_setfuncs(L, methods, 0);
    lua_setfield(L, -2, "__index");
  }
  lua_pop(L, 1);
}

int luaopen_longpoll_hiredis(lua_State *L) {
  new_type(L, READER_MT, reader_meta, reader_methods);
  new_type(L, CONN_MT, conn_meta, conn_methods);
  luaL_newlib(L, functions);
  lua_pushlightuserdata(L, NULL);
  lua_setfield(L, -2, "null");
  lua_pushliteral(L, "longpoll.hiredis");
  lua_setfield(L, -2, "_NAME");
  lua_pushliteral(L, LP_HIREDIS_VERSION);
  lua_setfield(L, -2, "_VERSION");
  lua_pushfstring(L, "%d.%d.%d", HIREDIS_MAJOR, HIREDIS_MINOR, HIREDIS_PATCH);
  lua_setfield(L, -2, "hiredis_version");
  return 1;
}
