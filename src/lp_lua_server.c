/* lp_lua_server: the HTTP server engine on luv's own libuv loop, in longpoll.core
 * (core.http_server). It accepts, reads, writes and keeps the time; lp_conn decides what each
 * connection does; whole requests go to one Lua function (longpoll.server routes them), and
 * answers come back through the connection handle (longpoll.HttpConn) that response.lua uses.
 * Lua timers, luv sockets and this server share one loop. */
#include <lauxlib.h>
#include <lua.h>
#include <signal.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/time.h>
#include <time.h>
#include <uv.h>

#include "lp_cache.h"
#include "lp_conn.h"
#include "lp_cors.h"
#include "lp_deadlines.h"
#include "lp_fast.h"
#include "lp_json.h"
#include "lp_waiter.h"
/* lua-luv-dev: luv_loop, luv_context, luv_handle_t (its luv.h has a `()` prototype) */
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wstrict-prototypes"
#include "luv/lhandle.h"
#pragma GCC diagnostic pop

void lp_lua_http_push_request(lua_State *L, const lp_http_event *head, lp_slice body, const char *remote_addr);
lp_store *lp_lua_store_of(lua_State *L, int idx); /* lp_lua.c */
lp_cache *lp_lua_cache_of(lua_State *L, int idx); /* lp_lua_cache.c */

#define SERVER_MT "longpoll.HttpServer"
#define CONN_MT "longpoll.HttpConn"
#define SHADOW_MT "longpoll.HttpServerHandles"
#define NATIVE_MT "longpoll.NativeHandler"

/* A handler the engine can run itself (core.native_subscription): the manager's long-poll
 * handler, for the polls it answers at once from the buffers and those it parks here, in C, until
 * a publish wakes them or their timeout passes. User value 1: the store. NATIVE_CACHED
 * (core.native_cached_subscription): that handler in Redis mode, for the catch-ups the engine's
 * node-local cache (lp_cache) answers with events, and the polls it parks on that cache until
 * pub/sub brings an event of theirs; user value 1: the cache. */
enum { NATIVE_SUBSCRIPTION = 1, NATIVE_PUBLISH, NATIVE_CACHED };

struct sconn;

typedef struct native_handler {
  int kind;
  int enabled; /* the manager turns it off when it shuts down */
  lp_fast_limits limits;
  char *block; /* the answer's header lines (the manager's JSON block) */
  size_t block_len;
  lp_cors cors;         /* the manager's CORS policy, when its handlers are wrapped by one */
  struct sconn *parked; /* the long polls parked on it (any server's), newest first */
  size_t nparked;
  /* NATIVE_CACHED: a parked poll's timeout needs a Redis mark (engine/redis/marks.lua) for its
   * timestamp. Polls whose time is up stay parked (an event may still reach them) in the
   * expiring list, oldest first, each with the batch it joined; mark_ref is the manager's Lua
   * function mark(batch), which asks the engine for one mark per batch and hands it back
   * (handler:marked(batch, T)). LUA_NOREF: no mark (each poll answers with its floor). */
  int mark_ref;
  uint64_t batch;                    /* the batch polls timing out now join (from 1) */
  struct sconn *exp_head, *exp_tail; /* the expiring list */
  struct native_handler *mark_next;  /* handlers to ask for a mark (on_poll_timer's list) */
  int mark_wanted;                   /* in that list */
} native_handler;

/* GET, POST or OPTIONS path -> native handler, mirrored from server:route (longpoll.server). */
enum { ROUTE_GET = 0, ROUTE_POST, ROUTE_OPTIONS };
typedef struct native_route {
  int post; /* ROUTE_GET, ROUTE_POST or ROUTE_OPTIONS */
  char *path;
  size_t path_len;
  int ref; /* registry ref of the native_handler's userdata */
  native_handler *h;
} native_route;
#define READ_BUFFER 65536

typedef struct server server;

typedef struct sconn {
  uv_tcp_t tcp; /* first: a handle is its connection */
  uv_shutdown_t shutdown_req;
  lp_conn conn;
  server *srv;
  size_t queued;      /* bytes handed to uv_write and not completed */
  int box_ref;        /* registry ref of the Lua handle (longpoll.HttpConn) */
  int drain_ref;      /* conn:on_drain's function, LUA_NOREF when none */
  size_t drain_below; /* ... called once queued is at most this */
  uint64_t id;
  size_t request_bytes;         /* written for the current request */
  unsigned reserve : 1;         /* admitted above max_connections: served only for immediate answers */
  unsigned native_declined : 1; /* the native handler already declined the current request */
  unsigned counted : 1;
  unsigned handle_closing : 1;
  struct sconn *prev, *next;             /* every connection whose handle is open */
  struct sconn *sched_prev, *sched_next; /* waiting for lp_conn_resume */
  int in_sched;
  /* A long poll parked here, in C, on its store subscription or on a Redis cache (see park):
   * woken by a publish or a pub/sub event (waiter), timed out (deadline, in the server's set) or
   * gone with its client. */
  native_handler *parked_by;         /* NULL when no long poll is parked */
  lp_store *parked_store;            /* valid while parked: closing the store ends the wait first */
  lp_cache *parked_cache;            /* instead of parked_store (Redis mode); a reset ends the wait first */
  int64_t parked_floor;              /* Redis mode: the timeout timestamp when no mark can be had */
  uint64_t mark_batch;               /* Redis mode: the mark batch its timeout waits for, 0 when none */
  struct sconn *exp_prev, *exp_next; /* parked_by's expiring list */
  uint64_t parked_handle;
  lp_waiter waiter;
  lp_deadline deadline;
  struct sconn *park_prev, *park_next; /* parked_by's list */
  unsigned parked_keep : 1;            /* the request allows keep-alive */
  unsigned parked_http10 : 1;
  char *parked_extra; /* the answer's own header lines (CORS), owned; NULL when none */
  size_t parked_extra_len;
  char remote[64];
} sconn;

typedef struct conn_box {
  sconn *s; /* NULL once the connection is closed */
} conn_box;

struct server {
  /* luv owns the loop and reads every handle's data as its own luv_handle_t (uv.walk, the
   * loop's collection at exit): each of ours points here, at a record whose userdata is the
   * server's shadow object (see SHADOW_MT). Our callbacks find their struct by address. */
  luv_handle_t walk;
  struct server **shadow; /* the shadow object's pointer to us */
  lua_State *L;           /* main thread */
  uv_loop_t *loop;
  uv_tcp_t listener;
  uv_timer_t sweep;
  uv_idle_t turn;         /* runs the scheduled connections */
  uv_timer_t poll_timer;  /* the next timeout of a parked long poll */
  lp_deadlines deadlines; /* the parked long polls' timeouts */
  uint64_t poll_timer_at; /* when poll_timer fires, 0 when stopped */
  lp_conn_config config;
  int dispatch_ref, gone_ref, log_ref, close_ref, self_ref;
  sconn *conns;
  sconn *sched_head;
  size_t count; /* counted connections (not the refused ones) */
  size_t max_connections, reserve;
  int handles; /* open uv handles */
  int listening, closing, closed;
  uint64_t next_id;
  char host[64];
  int port;
  time_t date_second;
  char date_line[64];
  uint64_t refused, refused_logged_at, refused_unlogged;
  native_route *routes;
  size_t nroutes;
  lp_buf fast_scratch, fast_body, fast_head, fast_extra;
  lp_woken fast_woken;               /* the parked polls a fast publish woke */
  uint64_t fast_answers;             /* requests answered without entering Lua */
  struct sconn *current;             /* the connection whose request a Lua handler runs now */
  const lp_http_event *current_head; /* its head, valid while it runs */
  char read_buffer[READ_BUFFER];
};

typedef struct write_req {
  uv_write_t req;
  sconn *s;
  size_t len;
  char data[];
} write_req;

static uint64_t now_ms(server *srv) { return uv_now(srv->loop); }

/* ---------------------------------------------------------------------------------------------
 * Calls into Lua (always on the main thread, protected) */

static int traceback(lua_State *L) {
  const char *msg = lua_tostring(L, 1);
  luaL_traceback(L, L, msg ? msg : "(error object)", 1);
  return 1;
}

static void log_line(server *srv, const char *level, const char *message, const char *key, lua_Integer value);

/* Logs the error message on top of the stack ("server callback failed") through the server's
 * logger, when it has one; the message stays on the stack. */
static void log_callback_error(server *srv) {
  lua_State *L = srv->L;
  if (srv->log_ref == LUA_NOREF) return;
  const char *err = lua_tostring(L, -1);
  lua_rawgeti(L, LUA_REGISTRYINDEX, srv->log_ref);
  lua_pushliteral(L, "error");
  lua_pushliteral(L, "server callback failed");
  lua_createtable(L, 0, 1);
  lua_pushstring(L, err ? err : "?");
  lua_setfield(L, -2, "error");
  if (lua_pcall(L, 3, 0, 0) != LUA_OK) lua_pop(L, 1);
}

/* Calls the function below nargs arguments on the stack, dropping results. */
static void call_lua(server *srv, int nargs) {
  lua_State *L = srv->L;
  int base = lua_gettop(L) - nargs;
  lua_pushcfunction(L, traceback);
  lua_insert(L, base);
  if (lua_pcall(L, nargs, 0, base) != LUA_OK) {
    log_callback_error(srv);
    lua_pop(L, 1);
  }
  lua_remove(L, base);
}

typedef struct log_call {
  server *srv;
  const char *level, *message, *key;
  lua_Integer value;
} log_call;

static int log_in_lua(lua_State *L) {
  log_call *lc = lua_touserdata(L, 1);
  lua_rawgeti(L, LUA_REGISTRYINDEX, lc->srv->log_ref);
  lua_pushstring(L, lc->level);
  lua_pushstring(L, lc->message);
  lua_createtable(L, 0, 1);
  if (lc->key) {
    lua_pushinteger(L, lc->value);
    lua_setfield(L, -2, lc->key);
  }
  lua_call(L, 3, 0);
  return 0;
}

static int protected_c(server *srv, lua_CFunction fn, void *ud);

static void log_line(server *srv, const char *level, const char *message, const char *key, lua_Integer value) {
  if (srv->log_ref == LUA_NOREF) return;
  log_call lc = {srv, level, message, key, value};
  protected_c(srv, log_in_lua, &lc); /* the logger itself is pcall'd by longpoll.server */
}

/* ---------------------------------------------------------------------------------------------
 * The host of each lp_conn */

static void maybe_closed(server *srv);
static void free_native(lua_State *L, server *srv);
static void unpark(struct sconn *s, int cancel);

static void sched_remove(sconn *s) {
  if (!s->in_sched) return;
  if (s->sched_prev)
    s->sched_prev->sched_next = s->sched_next;
  else
    s->srv->sched_head = s->sched_next;
  if (s->sched_next) s->sched_next->sched_prev = s->sched_prev;
  s->sched_prev = s->sched_next = NULL;
  s->in_sched = 0;
}

#define SERVER_OF(handle, field) ((server *)((char *)(handle)-offsetof(server, field)))

static void on_turn(uv_idle_t *h) {
  server *srv = SERVER_OF(h, turn);
  /* Take the whole list: connections scheduled while it runs wait for the next turn. */
  sconn *list = srv->sched_head;
  srv->sched_head = NULL;
  for (sconn *s = list; s; s = s->sched_next) s->in_sched = 2;
  while (list) {
    sconn *s = list;
    list = s->sched_next;
    if (list) list->sched_prev = NULL;
    s->sched_next = s->sched_prev = NULL;
    if (s->in_sched != 2) continue; /* closed meanwhile (taken out below) */
    s->in_sched = 0;
    lp_conn_resume(&s->conn, now_ms(srv));
  }
  if (!srv->sched_head) uv_idle_stop(&srv->turn);
}

static void host_schedule(void *ud) {
  sconn *s = ud;
  server *srv = s->srv;
  if (s->in_sched == 1) return;
  if (s->in_sched == 2) {
    /* still in the list being run: it runs in this turn's pass */
    return;
  }
  s->in_sched = 1;
  s->sched_prev = NULL;
  s->sched_next = srv->sched_head;
  if (srv->sched_head) srv->sched_head->sched_prev = s;
  srv->sched_head = s;
  uv_idle_start(&srv->turn, on_turn);
}

static void call_drain(sconn *s) {
  lua_State *L = s->srv->L;
  int ref = s->drain_ref;
  s->drain_ref = LUA_NOREF;
  lua_rawgeti(L, LUA_REGISTRYINDEX, ref);
  luaL_unref(L, LUA_REGISTRYINDEX, ref);
  call_lua(s->srv, 0);
}

static void on_written(uv_write_t *req, int status) {
  write_req *w = (write_req *)req;
  sconn *s = w->s;
  s->queued -= w->len;
  free(w);
  if (status < 0) {
    lp_conn_abort(&s->conn);
    return;
  }
  lp_conn_wrote(&s->conn, now_ms(s->srv));
  if (s->drain_ref != LUA_NOREF && s->queued <= s->drain_below && !s->handle_closing) call_drain(s);
}

static void host_write(void *ud, const lp_slice *bufs, size_t nbufs) {
  sconn *s = ud;
  if (s->handle_closing || nbufs == 0) return;
  uv_buf_t ub[8];
  size_t total = 0, n = nbufs < 8 ? nbufs : 8, done = 0;
  for (size_t i = 0; i < nbufs; i++) total += bufs[i].len;
  s->request_bytes += total;
  if (total == 0) return;
  if (s->queued == 0 && nbufs <= 8) {
    /* No write request, no callback and no write interest when the socket takes it all. */
    for (size_t i = 0; i < n; i++) ub[i] = uv_buf_init((char *)bufs[i].ptr, (unsigned)bufs[i].len);
    int r = uv_try_write((uv_stream_t *)&s->tcp, ub, (unsigned)n);
    if (r > 0) done = (size_t)r; /* an error is met again by the queued write below */
  }
  if (done == total) return;
  write_req *w = malloc(sizeof *w + (total - done));
  if (!w) {
    lp_conn_abort(&s->conn);
    return;
  }
  size_t off = 0, skip = done;
  for (size_t i = 0; i < nbufs; i++) {
    size_t len = bufs[i].len;
    if (skip >= len) {
      skip -= len;
      continue;
    }
    memcpy(w->data + off, bufs[i].ptr + skip, len - skip);
    off += len - skip;
    skip = 0;
  }
  w->s = s;
  w->len = off;
  uv_buf_t b = uv_buf_init(w->data, (unsigned)off);
  if (uv_write(&w->req, (uv_stream_t *)&s->tcp, &b, 1, on_written) != 0) {
    free(w);
    lp_conn_abort(&s->conn);
    return;
  }
  s->queued += off;
}

static size_t host_queued(void *ud) { return ((sconn *)ud)->queued; }

static void on_shutdown(uv_shutdown_t *req, int status) {
  sconn *s = req->data;
  if (status < 0)
    lp_conn_abort(&s->conn);
  else
    lp_conn_fin_sent(&s->conn, now_ms(s->srv));
}

static void host_shutdown(void *ud) {
  sconn *s = ud;
  if (s->counted) { /* a closing connection serves nobody: it no longer counts against the caps */
    s->counted = 0;
    s->srv->count--;
  }
  s->shutdown_req.data = s;
  if (uv_shutdown(&s->shutdown_req, (uv_stream_t *)&s->tcp, on_shutdown) != 0) lp_conn_abort(&s->conn);
}

static void on_conn_closed(uv_handle_t *h) {
  sconn *s = (sconn *)h;
  server *srv = s->srv;
  if (s->prev)
    s->prev->next = s->next;
  else
    srv->conns = s->next;
  if (s->next) s->next->prev = s->prev;
  lp_conn_free(&s->conn);
  free(s);
  srv->handles--;
  maybe_closed(srv);
}

/* Pushes the response attached to the connection's handle (nil when none). */
static void push_attached(lua_State *L, sconn *s) {
  lua_rawgeti(L, LUA_REGISTRYINDEX, s->box_ref);
  lua_getiuservalue(L, -1, 1);
  lua_remove(L, -2);
}

static void detach(lua_State *L, sconn *s) {
  lua_rawgeti(L, LUA_REGISTRYINDEX, s->box_ref);
  lua_pushnil(L);
  lua_setiuservalue(L, -2, 1);
  lua_pop(L, 1);
}

static void host_close(void *ud) {
  sconn *s = ud;
  server *srv = s->srv;
  unpark(s, 1);
  if (s->handle_closing) return;
  s->handle_closing = 1;
  if (s->in_sched == 2)
    s->in_sched = 0; /* in the list on_turn is running: skipped there */
  else
    sched_remove(s);
  if (s->counted) {
    s->counted = 0;
    srv->count--;
  }
  lua_State *L = srv->L;
  if (s->box_ref != LUA_NOREF) {
    lua_rawgeti(L, LUA_REGISTRYINDEX, s->box_ref);
    conn_box *box = lua_touserdata(L, -1);
    box->s = NULL;
    lua_pushnil(L);
    lua_setiuservalue(L, -2, 1);
    lua_pop(L, 1);
    luaL_unref(L, LUA_REGISTRYINDEX, s->box_ref);
  }
  s->box_ref = LUA_NOREF;
  luaL_unref(L, LUA_REGISTRYINDEX, s->drain_ref); /* never called: on_close tells the owner */
  s->drain_ref = LUA_NOREF;
  uv_read_stop((uv_stream_t *)&s->tcp);
  uv_close((uv_handle_t *)&s->tcp, on_conn_closed);
}

static void host_gone(void *ud) {
  sconn *s = ud;
  server *srv = s->srv;
  lua_State *L = srv->L;
  unpark(s, 1); /* a parked poll's client left: its wait ends, nothing is answered */
  if (s->box_ref == LUA_NOREF) return;
  if (s->counted && s->conn.phase == LP_CONN_CLOSED) { /* gone for good: the count says so already */
    s->counted = 0;
    srv->count--;
  }
  push_attached(L, s);
  if (lua_isnil(L, -1)) {
    lua_pop(L, 1);
    return;
  }
  detach(L, s);
  lua_rawgeti(L, LUA_REGISTRYINDEX, srv->gone_ref);
  lua_insert(L, -2);
  call_lua(srv, 1);
}

static const char *host_date(void *ud) {
  server *srv = ((sconn *)ud)->srv;
  time_t t = time(NULL);
  if (t != srv->date_second) {
    struct tm tm;
    gmtime_r(&t, &tm);
    strftime(srv->date_line, sizeof srv->date_line, "Date: %a, %d %b %Y %H:%M:%S GMT\r\n", &tm);
    srv->date_second = t;
  }
  return srv->date_line;
}

/* Runs fn(L) with ud as a light userdata in protected mode; errors are logged. Returns the
 * lua_pcall status. Pushing a light C function allocates nothing, so this itself cannot fail. */
static int protected_c(server *srv, lua_CFunction fn, void *ud) {
  lua_State *L = srv->L;
  lua_pushcfunction(L, traceback);
  int base = lua_gettop(L);
  lua_pushcfunction(L, fn);
  lua_pushlightuserdata(L, ud);
  int status = lua_pcall(L, 1, 0, base);
  if (status != LUA_OK) {
    if (status != LUA_ERRMEM) log_callback_error(srv);
    lua_pop(L, 1);
  }
  lua_pop(L, 1); /* traceback */
  return status;
}

typedef struct request_call {
  sconn *s;
  const lp_http_event *head;
  lp_slice body;
} request_call;

/* dispatch(conn, request) in Lua (through protected_c). */
static int request_in_lua(lua_State *L) {
  request_call *rc = lua_touserdata(L, 1);
  sconn *s = rc->s;
  lua_rawgeti(L, LUA_REGISTRYINDEX, s->srv->dispatch_ref);
  lua_rawgeti(L, LUA_REGISTRYINDEX, s->box_ref);
  lp_lua_http_push_request(L, rc->head, rc->body, s->remote[0] ? s->remote : NULL);
  lua_call(L, 2, 0);
  return 0;
}

/* The connection's Lua handle (through protected_c). */
static int make_box(lua_State *L) {
  sconn *s = lua_touserdata(L, 1);
  conn_box *box = lua_newuserdatauv(L, sizeof *box, 1);
  box->s = s;
  luaL_setmetatable(L, CONN_MT);
  s->box_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  return 0;
}

static int64_t wall_clock_ms(void) {
  struct timeval tv;
  gettimeofday(&tv, NULL);
  return (int64_t)tv.tv_sec * 1000 + tv.tv_usec / 1000;
}

static native_route *find_route(server *srv, int post, lp_slice path) {
  for (size_t i = 0; i < srv->nroutes; i++) {
    native_route *r = &srv->routes[i];
    if (r->post == post && r->path_len == path.len && memcmp(r->path, path.ptr, path.len) == 0) return r;
  }
  return NULL;
}

static lp_store *route_store(server *srv, native_route *r) {
  lua_State *L = srv->L;
  lua_rawgeti(L, LUA_REGISTRYINDEX, r->ref);
  lua_getiuservalue(L, -1, 1);
  lp_store *store = lp_lua_store_of(L, -1);
  lua_pop(L, 2);
  return store;
}

static lp_cache *route_cache(server *srv, native_route *r) {
  lua_State *L = srv->L;
  lua_rawgeti(L, LUA_REGISTRYINDEX, r->ref);
  lua_getiuservalue(L, -1, 1);
  lp_cache *cache = lp_lua_cache_of(L, -1);
  lua_pop(L, 2);
  return cache;
}

/* Writes a 200 with the handler's header block and the body pieces (at most 7); the response is
 * done. keep_alive, http10: what the request asked for. */
static void answer_200(sconn *s, const native_handler *nh, int keep_alive, int http10, lp_slice extra,
                       const lp_slice *body, size_t nbody) {
  server *srv = s->srv;
  lp_buf *h = &srv->fast_head;
  int keep = keep_alive && lp_conn_may_keep_alive(&s->conn);
  size_t len = 0;
  for (size_t i = 0; i < nbody; i++) len += body[i].len;
  char length[48];
  snprintf(length, sizeof length, "Content-Length: %zu\r\n", len);
  lp_buf_reset(h);
  int rc = lp_buf_append_str(h, "HTTP/1.1 200 OK\r\n");
  if (rc == 0 && extra.len) rc = lp_buf_append(h, extra.ptr, extra.len);
  if (rc == 0) rc = lp_buf_append(h, nh->block, nh->block_len);
  if (rc == 0) rc = lp_buf_append_str(h, length);
  if (rc == 0) rc = lp_buf_append_str(h, host_date(s));
  if (rc == 0 && !keep) rc = lp_buf_append_str(h, "Connection: close\r\n");
  if (rc == 0 && keep && http10) rc = lp_buf_append_str(h, "Connection: keep-alive\r\n");
  if (rc == 0) rc = lp_buf_append_str(h, "\r\n");
  if (rc != 0) {
    lp_conn_abort(&s->conn); /* done already (events taken, event stored): no half answer */
    return;
  }
  lp_slice bufs[8] = {{h->data, h->len}};
  for (size_t i = 0; i < nbody && i < 7; i++) bufs[i + 1] = body[i];
  lp_conn_write(&s->conn, bufs, 1 + (nbody < 7 ? nbody : 7));
  srv->fast_answers++;
  lp_conn_response_done(&s->conn, keep, now_ms(srv));
}

/* ---------------------------------------------------------------------------------------------
 * Long polls parked in C: a poll with nothing to answer yet waits on its store subscription
 * (lp_store_wait_owned, the connection's lp_waiter is the owner) with its timeout in the
 * server's lp_deadlines, until a publish wakes it (parked_woken, called by whoever published:
 * the store's Lua binding or fast_publish), its time is up (time_out) or its client leaves
 * (unpark from host_gone / host_close). No Lua runs on any of these paths.
 * In Redis mode (NATIVE_CACHED) the poll waits on the engine's node-local cache instead
 * (lp_cache_wait): the pub/sub event the engine hands the cache wakes it (cache:add, the same
 * parked_woken); a reset of the cache ends it (parked_ended: the timeout answer with its floor);
 * its timeout needs a Redis mark, so it waits in its handler's expiring list, still parked, for
 * the one mark its batch asks Lua for (expire_cached, ask_mark, settle_marks). */

#define CONTAINER(ptr, type, field) ((type *)((char *)(ptr)-offsetof(type, field)))

static void poll_timer_arm(server *srv);

/* Takes s out of its handler's list and the timeouts; cancel: the store subscription is still
 * there (the client left, the time is up). */
/* Takes s out of its handler's expiring list, if it is in it. */
static void exp_remove(sconn *s) {
  native_handler *nh = s->parked_by;
  if (!s->mark_batch) return;
  if (s->exp_prev)
    s->exp_prev->exp_next = s->exp_next;
  else
    nh->exp_head = s->exp_next;
  if (s->exp_next)
    s->exp_next->exp_prev = s->exp_prev;
  else
    nh->exp_tail = s->exp_prev;
  s->exp_prev = s->exp_next = NULL;
  s->mark_batch = 0;
}

static void unpark(sconn *s, int cancel) {
  native_handler *nh = s->parked_by;
  if (!nh) return;
  if (cancel && s->parked_cache)
    lp_cache_cancel(s->parked_cache, s->parked_handle);
  else if (cancel)
    lp_store_cancel(s->parked_store, s->parked_handle);
  exp_remove(s);
  if (s->park_prev)
    s->park_prev->park_next = s->park_next;
  else
    nh->parked = s->park_next;
  if (s->park_next) s->park_next->park_prev = s->park_prev;
  s->park_prev = s->park_next = NULL;
  nh->nparked--;
  lp_deadlines_remove(&s->srv->deadlines, &s->deadline);
  s->parked_by = NULL;
  s->parked_store = NULL;
  s->parked_cache = NULL;
  free(s->parked_extra); /* unless taken before (take_extra) */
  s->parked_extra = NULL;
  s->parked_extra_len = 0;
}

/* The parked poll's own header lines, handed over to the caller (free them after the answer);
 * taken before unpark, which frees what is left. */
static lp_slice take_extra(sconn *s) {
  lp_slice extra = {s->parked_extra, s->parked_extra_len};
  s->parked_extra = NULL;
  s->parked_extra_len = 0;
  return extra;
}

static void parked_woken(lp_waiter *w, const lp_slice *answer, size_t n) {
  sconn *s = CONTAINER(w, sconn, waiter);
  native_handler *nh = s->parked_by;
  if (!nh) return;
  lp_slice extra = take_extra(s);
  unpark(s, 0); /* the publish ended the subscription */
  answer_200(s, nh, s->parked_keep, s->parked_http10, extra, answer, n);
  free((char *)extra.ptr);
}

/* The golongpoll timeout answer with timestamp T. cancel: the wait is still there. */
static void answer_timeout_at(sconn *s, int64_t T, int cancel) {
  native_handler *nh = s->parked_by;
  lp_slice extra = take_extra(s);
  unpark(s, cancel);
  char body[96];
  int len = snprintf(body, sizeof body, "{\"timeout\":\"no events before timeout\",\"timestamp\":%lld}", (long long)T);
  lp_slice piece = {body, (size_t)len};
  answer_200(s, nh, s->parked_keep, s->parked_http10, extra, &piece, 1);
  free((char *)extra.ptr);
}

/* The store closed under the poll (the manager answers its polls before it closes the store;
 * this is the backstop): the manager's 503. A cache ended the wait (a reset: pub/sub lost, a
 * gap, a new epoch, the engine closing): events may have been missed, so the timeout answer
 * with the poll's floor, from which the client's next poll reads what it missed. */
static void parked_ended(lp_waiter *w) {
  sconn *s = CONTAINER(w, sconn, waiter);
  if (!s->parked_by) return;
  if (s->parked_cache) return answer_timeout_at(s, s->parked_floor, 0);
  unpark(s, 0);
  lp_conn_fail(&s->conn, 503, "manager is shut down", now_ms(s->srv));
}

static const lp_waiter_ops PARKED_OPS = {parked_woken, parked_ended};

/* The golongpoll timeout answer, with a timestamp no later event reaches (the store's mark; in
 * Redis mode the poll's floor: use this only when no Redis mark can be had). */
static void answer_timeout(sconn *s) {
  int64_t T = s->parked_cache ? s->parked_floor : lp_store_mark_time(s->parked_store, wall_clock_ms());
  answer_timeout_at(s, T, 1);
}

/* Every poll of nh's expiring list that joined batch b or an earlier one gets the timeout answer:
 * with T, the batch's Redis mark (has_T), or its floor. Those still parked when the mark came got
 * no event published before it (the marker follows every such event on pub/sub). */
static void settle_marks(native_handler *nh, uint64_t b, int has_T, int64_t T) {
  sconn *s;
  while ((s = nh->exp_head) != NULL && s->mark_batch <= b)
    answer_timeout_at(s, has_T && T > s->parked_floor ? T : s->parked_floor, 1);
}

/* Asks the manager's mark function (on L, protected; errors logged through srv when given) for
 * the mark of nh's open batch, and opens the next; without the function, or when the call fails,
 * the batch is answered with its polls' floors. */
static void ask_mark(lua_State *L, server *srv, native_handler *nh) {
  nh->mark_wanted = 0;
  uint64_t b = nh->batch;
  if (!nh->exp_head || nh->exp_tail->mark_batch != b) return; /* answered meanwhile */
  nh->batch = b + 1; /* polls timing out while the mark is asked for join the next batch */
  int status = LUA_ERRRUN;
  if (nh->mark_ref != LUA_NOREF) {
    lua_pushcfunction(L, traceback);
    int base = lua_gettop(L);
    lua_rawgeti(L, LUA_REGISTRYINDEX, nh->mark_ref);
    lua_pushinteger(L, (lua_Integer)b);
    status = lua_pcall(L, 1, 0, base);
    if (status != LUA_OK) {
      if (srv && status != LUA_ERRMEM) log_callback_error(srv);
      lua_pop(L, 1);
    }
    lua_pop(L, 1); /* traceback */
  }
  if (status != LUA_OK) settle_marks(nh, b, 0, 0);
}

/* A poll parked on a cache whose time is up: it joins its handler's open batch (kept parked). */
static void expire_cached(sconn *s, native_handler **wanted) {
  native_handler *nh = s->parked_by;
  if (s->mark_batch) return;
  s->mark_batch = nh->batch;
  s->exp_next = NULL;
  s->exp_prev = nh->exp_tail;
  if (nh->exp_tail)
    nh->exp_tail->exp_next = s;
  else
    nh->exp_head = s;
  nh->exp_tail = s;
  if (!nh->mark_wanted) {
    nh->mark_wanted = 1;
    nh->mark_next = *wanted;
    *wanted = nh;
  }
}

static void on_poll_timer(uv_timer_t *t) {
  server *srv = SERVER_OF(t, poll_timer);
  srv->poll_timer_at = 0;
  uint64_t now = now_ms(srv);
  lp_deadline *e;
  native_handler *wanted = NULL;
  while ((e = lp_deadlines_pop_expired(&srv->deadlines, now)) != NULL) {
    sconn *s = CONTAINER(e, sconn, deadline);
    if (s->parked_by && s->parked_cache)
      expire_cached(s, &wanted);
    else if (s->parked_by)
      answer_timeout(s);
  }
  while (wanted) { /* one mark per handler and turn */
    native_handler *nh = wanted;
    wanted = nh->mark_next;
    ask_mark(srv->L, srv, nh);
  }
  poll_timer_arm(srv);
}

/* Sets the timer for the earliest timeout, unless it fires before that already. */
static void poll_timer_arm(server *srv) {
  uint64_t at;
  if (!lp_deadlines_next(&srv->deadlines, &at)) return;
  if (srv->poll_timer_at != 0 && srv->poll_timer_at <= at) return;
  uint64_t now = now_ms(srv);
  srv->poll_timer_at = at > 0 ? at : 1;
  uv_timer_start(&srv->poll_timer, on_poll_timer, at > now ? at - now : 0, 0);
}

/* Parks the poll of s on store, or on cache (Redis mode, with its timeout floor): 1 when it waits
 * now, 0 when the Lua handler must take it (a connection above the cap may not wait; the store
 * refused, e.g. max_waiting_per_category: Lua says why). */
static int park(sconn *s, native_handler *nh, lp_store *store, lp_cache *cache, int64_t floor,
                const lp_http_event *head, lp_slice extra, const lp_fast_sub *sub) {
  server *srv = s->srv;
  if (s->reserve || srv->closing || s->parked_by) return 0;
  char *extra_copy = NULL;
  if (extra.len) {
    extra_copy = malloc(extra.len);
    if (!extra_copy) return 0;
    memcpy(extra_copy, extra.ptr, extra.len);
  }
  s->waiter.ops = &PARKED_OPS;
  uint64_t handle;
  int rc = cache ? lp_cache_wait(cache, sub->categories, sub->ncategories, &s->waiter, &handle)
                 : lp_store_wait_owned(store, sub->categories, sub->ncategories, &s->waiter, &handle);
  if (rc != LP_OK) {
    free(extra_copy);
    return 0;
  }
  if (lp_deadlines_add(&srv->deadlines, &s->deadline, (uint64_t)sub->timeout_s * 1000, now_ms(srv)) != 0) {
    if (cache)
      lp_cache_cancel(cache, handle);
    else
      lp_store_cancel(store, handle);
    free(extra_copy);
    return 0;
  }
  s->parked_extra = extra_copy;
  s->parked_extra_len = extra.len;
  s->parked_by = nh;
  s->parked_store = store;
  s->parked_cache = cache;
  s->parked_floor = floor;
  s->mark_batch = 0;
  s->parked_handle = handle;
  s->parked_keep = head->keep_alive != 0;
  s->parked_http10 = head->minor == 0;
  s->park_prev = NULL;
  s->park_next = nh->parked;
  if (nh->parked) nh->parked->park_prev = s;
  nh->parked = s;
  nh->nparked++;
  poll_timer_arm(srv);
  return 1;
}

/* Every poll parked on nh gets the timeout answer now (the manager shuts down). */
static void answer_parked(native_handler *nh) {
  while (nh->parked) answer_timeout(nh->parked);
}

/* ---------------------------------------------------------------------------------------------
 * CORS, as longpoll.cors wraps the manager's handlers */

/* The value of request header name (lower-case), or an empty slice with ptr NULL. */
static lp_slice header_value(const lp_http_event *head, const char *name) {
  size_t len = strlen(name);
  for (size_t i = 0; i < head->nheaders; i++) {
    lp_slice n = head->headers[i].name;
    if (n.len == len && memcmp(n.ptr, name, len) == 0) return head->headers[i].value;
  }
  return (lp_slice){NULL, 0};
}

/* The handler's CORS lines for this request into out (emptied first; lp_cors_lines); *allowed:
 * whether its Origin is allowed. 0, or -1 when memory ran out. */
static int cors_lines(const native_handler *nh, const lp_http_event *head, lp_buf *out, int *allowed) {
  lp_buf_reset(out);
  lp_slice origin = header_value(head, "origin");
  *allowed = !nh->cors.on || lp_cors_allowed(&nh->cors, origin);
  return lp_cors_lines(&nh->cors, origin, out);
}

/* An allowed preflight (OPTIONS with Origin and Access-Control-Request-Method) to a route of a
 * handler under the policy: 204 with the policy's headers. 1 when answered, 0 when the Lua
 * handler decides (not allowed, not a preflight). */
static int fast_preflight(sconn *s, const native_handler *nh, const lp_http_event *head) {
  server *srv = s->srv;
  int allowed;
  if (!nh->cors.on || !header_value(head, "origin").ptr || !header_value(head, "access-control-request-method").ptr)
    return 0;
  if (cors_lines(nh, head, &srv->fast_extra, &allowed) != 0 || !allowed) return 0;
  int keep = head->keep_alive && lp_conn_may_keep_alive(&s->conn);
  lp_buf *h = &srv->fast_head;
  lp_buf_reset(h);
  int rc = lp_buf_append_str(h, "HTTP/1.1 204 No Content\r\n");
  if (rc == 0) rc = lp_buf_append(h, srv->fast_extra.data, srv->fast_extra.len);
  if (rc == 0) rc = lp_buf_append(h, nh->cors.preflight, nh->cors.preflight_len);
  if (rc == 0) rc = lp_buf_append_str(h, host_date(s));
  if (rc == 0 && !keep) rc = lp_buf_append_str(h, "Connection: close\r\n");
  if (rc == 0 && keep && head->minor == 0) rc = lp_buf_append_str(h, "Connection: keep-alive\r\n");
  if (rc == 0) rc = lp_buf_append_str(h, "\r\n");
  if (rc != 0) return 0;
  lp_slice bufs[1] = {{h->data, h->len}};
  lp_conn_write(&s->conn, bufs, 1);
  srv->fast_answers++;
  lp_conn_response_done(&s->conn, keep, now_ms(srv));
  return 1;
}

/* A publish to the manager's handler stored here: 1 when answered, 0 when the Lua handler must
 * run (always with an Idempotency-Key). Only publishes that wake no Lua waiter (no Lua long poll,
 * stream or watcher waits on the category; the polls parked here are answered here) are taken:
 * the manager registers this handler only when it has no add-on to tell. */
static int fast_publish(sconn *s, native_route *r, const lp_http_event *head, lp_slice body) {
  server *srv = s->srv;
  /* an idempotent publish (Idempotency-Key, issue 17) is the Lua handler's: it looks the key up */
  for (size_t i = 0; i < head->nheaders; i++) {
    lp_slice n = head->headers[i].name;
    if (n.len == 15 && memcmp(n.ptr, "idempotency-key", 15) == 0) return 0;
  }
  lp_publish_body pb;
  const char *err;
  if (lp_json_parse_publish(body.ptr ? body.ptr : "", body.len, &pb, &err) != 0) return 0;
  int ok = pb.has_category && pb.category.len >= 1 && pb.category.len <= r->h->limits.max_category_bytes && pb.has_data;
  lp_store *store = ok ? route_store(srv, r) : NULL;
  lp_slice category = {pb.category.data, pb.category.len};
  lp_store_stats st;
  if (store) lp_store_get_stats(store, &st);
  if (!store || lp_store_unowned_waiting_in(store, category) > 0 ||
      lp_woken_reserve(&srv->fast_woken, st.waiting) != LP_OK) {
    lp_buf_free(&pb.category);
    return 0;
  }
  int allowed;
  if (cors_lines(r->h, head, &srv->fast_extra, &allowed) != 0) {
    lp_buf_free(&pb.category);
    return 0;
  }
  lp_slice data = {pb.data, pb.data_len};
  lp_published out;
  int rc = lp_store_publish(store, category, data, wall_clock_ms(), lp_woken_add, &srv->fast_woken, &out);
  lp_buf_free(&pb.category);
  if (rc != LP_OK) return 0; /* refused, nothing stored: the Lua handler says why */
  lp_woken_answer(&srv->fast_woken, &out);
  static const lp_slice SUCCESS = {"{\"success\":true}", 16};
  lp_slice extra = {srv->fast_extra.data, srv->fast_extra.len};
  answer_200(s, r->h, head->keep_alive, head->minor == 0, extra, &SUCCESS, 1);
  return 1;
}

/* A long poll to the manager's handler, served here: answered from the store when events after
 * its cursor exist, else parked (when may_park) until one is published. 1 when served, 0 when
 * the Lua handler must run (an error, anything unusual, a poll that may not be parked). */
static int fast_subscription(sconn *s, native_handler *nh, lp_store *store, const lp_http_event *head, lp_slice query,
                             int may_park) {
  server *srv = s->srv;
  lp_fast_sub sub;
  if (!store || lp_fast_parse_subscription(query, &nh->limits, &srv->fast_scratch, &sub) != 1) return 0;
  int allowed;
  if (cors_lines(nh, head, &srv->fast_extra, &allowed) != 0) return 0;
  lp_slice extra = {srv->fast_extra.data, srv->fast_extra.len};
  if (sub.has_since) {
    lp_buf *body = &srv->fast_body;
    lp_buf_reset(body);
    size_t count = 0;
    int missed = 0;
    int rc = lp_store_fetch(store, sub.categories, sub.ncategories, sub.since, sub.has_last_id ? sub.last_id : NULL,
                            wall_clock_ms(), body, &count, &missed);
    if (rc != LP_OK) return 0;
    if (count > 0) {
      lp_slice answer = {body->data, body->len};
      answer_200(s, nh, head->keep_alive, head->minor == 0, extra, &answer, 1);
      /* one huge answer should not pin its memory */
      if (body->cap > (1u << 20)) lp_buf_free(body);
      return 1;
    }
  }
  return may_park && park(s, nh, store, NULL, 0, head, extra, &sub);
}

/* A long poll to the manager's handler in Redis mode, served here when the engine's node-local
 * cache (lp_cache) can tell: answered when the cache holds its events, parked on the cache (when
 * may_park) when nothing comes after its cursor up to the cache's position (an LP_CACHE_WAIT).
 * 1 when served, 0 when the Lua handler must run (the cache cannot tell: a read from Redis; no
 * cursor, an error, anything unusual). */
static int fast_cached(sconn *s, native_handler *nh, lp_cache *cache, const lp_http_event *head, lp_slice query,
                       int may_park) {
  server *srv = s->srv;
  lp_fast_sub sub;
  if (!cache || lp_fast_parse_subscription(query, &nh->limits, &srv->fast_scratch, &sub) != 1 || !sub.has_since)
    return 0;
  lp_buf *body = &srv->fast_body;
  lp_buf_reset(body);
  lp_cache_pos cursor;
  int r = lp_cache_answer(cache, sub.categories, sub.ncategories, sub.since, sub.has_last_id ? sub.last_id : NULL, body,
                          &cursor);
  if (r != LP_CACHE_EVENTS && r != LP_CACHE_WAIT) return 0;
  int allowed;
  if (cors_lines(nh, head, &srv->fast_extra, &allowed) != 0) return 0;
  lp_slice extra = {srv->fast_extra.data, srv->fast_extra.len};
  if (r == LP_CACHE_WAIT) {
    /* The floor: the cache knows every event of these categories up to cursor and none comes after
     * the client's; some stamped cursor.ts may still come (a later seq). Continuing from the floor
     * skips none, and repeats none the client got unless cursor.ts is its since_time. */
    int64_t floor = cursor.ts - 1 > sub.since ? cursor.ts - 1 : sub.since;
    return may_park && park(s, nh, NULL, cache, floor, head, extra, &sub);
  }
  lp_slice answer = {body->data, body->len};
  answer_200(s, nh, head->keep_alive, head->minor == 0, extra, &answer, 1);
  if (body->cap > (1u << 20)) lp_buf_free(body);
  return 1;
}

static void host_request(void *ud, const lp_http_event *head, lp_slice body) {
  sconn *s = ud;
  server *srv = s->srv;
  s->request_bytes = 0;
  s->native_declined = 0;
  if (srv->nroutes > 0) {
    int get = head->method.len == 3 && memcmp(head->method.ptr, "GET", 3) == 0;
    int post = head->method.len == 4 && memcmp(head->method.ptr, "POST", 4) == 0;
    int options = head->method.len == 7 && memcmp(head->method.ptr, "OPTIONS", 7) == 0;
    lp_slice path, query;
    if ((get || post || options) && lp_http_split_target(head->target, &path, &query) == 0 &&
        !memchr(path.ptr, '%', path.len)) {
      native_route *r = find_route(srv, options ? ROUTE_OPTIONS : post ? ROUTE_POST : ROUTE_GET, path);
      if (r && r->h->enabled) {
        int served = options                       ? fast_preflight(s, r->h, head)
                     : r->h->kind == NATIVE_CACHED ? fast_cached(s, r->h, route_cache(srv, r), head, query, 1)
                     : r->h->kind == NATIVE_SUBSCRIPTION
                         ? fast_subscription(s, r->h, route_store(srv, r), head, query, 1)
                         : fast_publish(s, r, head, body);
        if (served) return;
        s->native_declined = 1; /* the Lua handler it falls to need not ask again (res:native) */
      }
    }
  }
  /* while the Lua handler runs, a native handler it calls may still read the head (conn:native) */
  sconn *outer = srv->current;
  const lp_http_event *outer_head = srv->current_head;
  srv->current = s;
  srv->current_head = head;
  request_call rc = {s, head, body};
  int status = protected_c(srv, request_in_lua, &rc);
  srv->current = outer;
  srv->current_head = outer_head;
  if (status != LUA_OK && s->conn.phase == LP_CONN_ANSWERING && s->request_bytes == 0) {
    /* the request table or the dispatch failed (memory, most likely): answer, never hang */
    host_gone(s);
    lp_conn_fail(&s->conn, status == LUA_ERRMEM ? 503 : 500,
                 status == LUA_ERRMEM ? "out of memory" : "internal server error", now_ms(srv));
  }
  if (s->reserve && s->conn.phase == LP_CONN_ANSWERING) {
    /* A connection above max_connections may not wait: the cap keeps room for publishers. */
    if (s->request_bytes == 0) {
      host_gone(s);
      lp_conn_fail(&s->conn, 503, "too many connections", now_ms(srv));
    } else {
      lp_conn_abort(&s->conn);
    }
  }
}

static const lp_conn_host HOST = {host_request, host_write,    host_queued, host_shutdown,
                                  host_close,   host_schedule, host_gone,   host_date};

/* ---------------------------------------------------------------------------------------------
 * Accepting */

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf) {
  (void)suggested;
  sconn *s = (sconn *)h;
  buf->base = s->srv->read_buffer;
  buf->len = READ_BUFFER;
}

static void on_read(uv_stream_t *stream, ssize_t nread, const uv_buf_t *buf) {
  sconn *s = (sconn *)stream;
  uint64_t now = now_ms(s->srv);
  if (nread > 0)
    lp_conn_received(&s->conn, buf->base, (size_t)nread, now);
  else if (nread == UV_EOF)
    lp_conn_peer_eof(&s->conn, now);
  else if (nread < 0)
    lp_conn_abort(&s->conn);
}

static void format_peer(sconn *s) {
  struct sockaddr_storage ss;
  int len = sizeof ss;
  s->remote[0] = 0;
  if (uv_tcp_getpeername(&s->tcp, (struct sockaddr *)&ss, &len) != 0) return;
  char ip[48];
  if (ss.ss_family == AF_INET6) {
    struct sockaddr_in6 *a = (struct sockaddr_in6 *)&ss;
    uv_ip6_name(a, ip, sizeof ip);
    snprintf(s->remote, sizeof s->remote, "[%s]:%d", ip, ntohs(a->sin6_port));
  } else {
    struct sockaddr_in *a = (struct sockaddr_in *)&ss;
    uv_ip4_name(a, ip, sizeof ip);
    snprintf(s->remote, sizeof s->remote, "%s:%d", ip, ntohs(a->sin_port));
  }
}

/* At most one line a second about refused connections, with the count since the last one. */
static void log_refused(server *srv) {
  srv->refused++;
  srv->refused_unlogged++;
  uint64_t now = now_ms(srv);
  if (srv->refused_logged_at != 0 && now - srv->refused_logged_at < 1000) return;
  srv->refused_logged_at = now ? now : 1;
  log_line(srv, "warn", "too many connections: refused with 503", "refused", (lua_Integer)srv->refused_unlogged);
  srv->refused_unlogged = 0;
}

static void on_connection(uv_stream_t *listener, int status) {
  server *srv = SERVER_OF(listener, listener);
  if (status < 0) {
    log_line(srv, "warn", "accept failed", "code", status);
    return;
  }
  if (srv->closing) return;
  sconn *s = calloc(1, sizeof *s);
  if (!s) return; /* the connection stays in the backlog; tried again on the next one */
  s->srv = srv;
  s->box_ref = s->drain_ref = LUA_NOREF;
  uv_tcp_init(srv->loop, &s->tcp);
  s->tcp.data = &srv->walk;
  srv->handles++;
  s->next = srv->conns;
  if (srv->conns) srv->conns->prev = s;
  srv->conns = s;
  lp_conn_init(&s->conn, &srv->config, &HOST, s, now_ms(srv));
  /* the handle Lua sees; made in protected mode: an allocation error must not unwind libuv */
  if (protected_c(srv, make_box, s) != LUA_OK) s->box_ref = LUA_NOREF;
  if (uv_accept(listener, (uv_stream_t *)&s->tcp) != 0 || s->box_ref == LUA_NOREF) {
    lp_conn_abort(&s->conn);
    return;
  }
  s->id = ++srv->next_id;
  uv_tcp_nodelay(&s->tcp, 1);
  uv_read_start((uv_stream_t *)&s->tcp, on_alloc, on_read);
  if (srv->count >= srv->max_connections + srv->reserve) {
    /* never a silent close: the client learns why */
    log_refused(srv);
    lp_conn_fail(&s->conn, 503, "too many connections", now_ms(srv));
    return;
  }
  s->reserve = srv->count >= srv->max_connections;
  s->counted = 1;
  srv->count++;
  format_peer(s);
}

/* ---------------------------------------------------------------------------------------------
 * Server lifetime */

static void on_sweep(uv_timer_t *t) {
  server *srv = SERVER_OF(t, sweep);
  uint64_t now = now_ms(srv);
  sconn *s = srv->conns;
  /* closing only starts uv_close: every node stays valid until its close callback */
  while (s) {
    sconn *next = s->next;
    if (s->conn.deadline_kind != LP_DL_NONE && now >= s->conn.deadline) lp_conn_tick(&s->conn, now);
    s = next;
  }
}

static void server_handle_closed(server *srv) {
  srv->handles--;
  maybe_closed(srv);
}
static void on_listener_closed(uv_handle_t *h) { server_handle_closed(SERVER_OF(h, listener)); }
static void on_sweep_closed(uv_handle_t *h) { server_handle_closed(SERVER_OF(h, sweep)); }
static void on_turn_closed(uv_handle_t *h) { server_handle_closed(SERVER_OF(h, turn)); }
static void on_poll_timer_closed(uv_handle_t *h) { server_handle_closed(SERVER_OF(h, poll_timer)); }

static void finish_close(server *srv) {
  lua_State *L = srv->L;
  srv->closed = 1;
  int cb = srv->close_ref;
  srv->close_ref = LUA_NOREF;
  luaL_unref(L, LUA_REGISTRYINDEX, srv->dispatch_ref);
  luaL_unref(L, LUA_REGISTRYINDEX, srv->gone_ref);
  srv->dispatch_ref = srv->gone_ref = LUA_NOREF;
  free_native(L, srv);
  int self = srv->self_ref;
  srv->self_ref = LUA_NOREF;
  if (cb != LUA_NOREF) {
    lua_rawgeti(L, LUA_REGISTRYINDEX, cb);
    luaL_unref(L, LUA_REGISTRYINDEX, cb);
    call_lua(srv, 0);
  }
  luaL_unref(L, LUA_REGISTRYINDEX, srv->log_ref);
  srv->log_ref = LUA_NOREF;
  if (srv->shadow) *srv->shadow = NULL; /* a spec may keep it after the server is gone */
  srv->shadow = NULL;
  luaL_unref(L, LUA_REGISTRYINDEX, srv->walk.ref);
  srv->walk.ref = LUA_NOREF;
  luaL_unref(L, LUA_REGISTRYINDEX, self); /* the userdata may be collected from now on */
}

static void maybe_closed(server *srv) {
  if (!srv->closing || srv->closed) return;
  /* The sweep timer and the turn outlive the connections (they cut those that never read). */
  if (srv->conns == NULL && srv->listening) {
    srv->listening = 0;
    uv_close((uv_handle_t *)&srv->sweep, on_sweep_closed);
    uv_close((uv_handle_t *)&srv->turn, on_turn_closed);
    uv_close((uv_handle_t *)&srv->poll_timer, on_poll_timer_closed);
    return;
  }
  if (srv->handles == 0) finish_close(srv);
}

static server *check_server(lua_State *L) {
  server **p = luaL_checkudata(L, 1, SERVER_MT);
  luaL_argcheck(L, *p != NULL, 1, "server is gone");
  return *p;
}

static size_t opt_size(lua_State *L, const char *k, size_t def) {
  lua_getfield(L, 1, k);
  if (lua_isnil(L, -1)) {
    lua_pop(L, 1);
    return def;
  }
  int ok;
  lua_Integer v = lua_tointegerx(L, -1, &ok);
  if (!ok || v < 1) luaL_error(L, "option '%s' must be a positive integer", k);
  lua_pop(L, 1);
  return (size_t)v;
}

static int opt_ref(lua_State *L, const char *k, int required) {
  lua_getfield(L, 1, k);
  if (lua_isnil(L, -1) && !required) {
    lua_pop(L, 1);
    return LUA_NOREF;
  }
  if (!lua_isfunction(L, -1)) luaL_error(L, "option '%s' must be a function", k);
  return luaL_ref(L, LUA_REGISTRYINDEX);
}

/* core.http_server{ host, port, max_header_bytes, max_body_bytes, max_url_bytes,
 *   header_timeout_ms, keepalive_timeout_ms, linger_ms, max_connections, reserve_connections,
 *   high_water, output_budget, dispatch = fn(conn, req), gone = fn(res), log = fn(level, msg,
 *   fields) } -> server. `require "luv"` must have run (the loop is luv's). */
static int l_http_server(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  uv_loop_t *loop = luv_loop(L);
  if (!loop) return luaL_error(L, "luv is not loaded");
  server **p = lua_newuserdatauv(L, sizeof *p, 0);
  *p = NULL;
  luaL_setmetatable(L, SERVER_MT);
  server *srv = calloc(1, sizeof *srv);
  if (!srv) return luaL_error(L, "out of memory");
  *p = srv;
  srv->dispatch_ref = srv->gone_ref = srv->log_ref = srv->close_ref = srv->self_ref = LUA_NOREF;
  srv->walk.ref = srv->walk.callbacks[0] = srv->walk.callbacks[1] = LUA_NOREF;
  srv->walk.ctx = luv_context(L);
  lua_rawgeti(L, LUA_REGISTRYINDEX, LUA_RIDX_MAINTHREAD);
  srv->L = lua_tothread(L, -1);
  lua_pop(L, 1);
  srv->loop = loop;
  lp_conn_config *k = &srv->config;
  k->limits.max_header_bytes = opt_size(L, "max_header_bytes", 16384);
  k->limits.max_body_bytes = opt_size(L, "max_body_bytes", 1048576);
  k->limits.max_url_bytes = opt_size(L, "max_url_bytes", 8192);
  k->header_timeout_ms = opt_size(L, "header_timeout_ms", 10000);
  k->keepalive_timeout_ms = opt_size(L, "keepalive_timeout_ms", 75000);
  k->linger_ms = opt_size(L, "linger_ms", 2000);
  k->high_water = opt_size(L, "high_water", 1 << 20);
  k->output_budget = opt_size(L, "output_budget", 8 << 20);
  srv->max_connections = opt_size(L, "max_connections", 10000);
  lua_getfield(L, 1, "reserve_connections");
  srv->reserve = lua_isnil(L, -1) ? 0 : (size_t)luaL_checkinteger(L, -1);
  lua_pop(L, 1);
  lua_getfield(L, 1, "host");
  const char *host = luaL_optstring(L, -1, "127.0.0.1");
  snprintf(srv->host, sizeof srv->host, "%s", host);
  lua_pop(L, 1);
  lua_getfield(L, 1, "port");
  srv->port = (int)luaL_optinteger(L, -1, 0);
  lua_pop(L, 1);
  srv->dispatch_ref = opt_ref(L, "dispatch", 1);
  srv->gone_ref = opt_ref(L, "gone", 1);
  srv->log_ref = opt_ref(L, "log", 0);
  return 1;
}

/* server:listen() -> port | nil, message */
static int server_listen(lua_State *L) {
  server *srv = check_server(L);
  if (srv->listening) {
    luaL_pushfail(L);
    lua_pushliteral(L, "already listening");
    return 2;
  }
  if (srv->closing) {
    luaL_pushfail(L);
    lua_pushliteral(L, "server closed");
    return 2;
  }
  struct sockaddr_storage addr;
  int rc = uv_ip4_addr(srv->host, srv->port, (struct sockaddr_in *)&addr);
  if (rc != 0) rc = uv_ip6_addr(srv->host, srv->port, (struct sockaddr_in6 *)&addr);
  uv_tcp_init(srv->loop, &srv->listener);
  srv->listener.data = &srv->walk;
  if (rc == 0) rc = uv_tcp_bind(&srv->listener, (struct sockaddr *)&addr, 0);
  if (rc == 0) rc = uv_listen((uv_stream_t *)&srv->listener, 1024, on_connection);
  if (rc != 0) {
    uv_close((uv_handle_t *)&srv->listener, NULL);
    luaL_pushfail(L);
    lua_pushfstring(L, "cannot listen on %s:%d: %s: %s", srv->host, srv->port, uv_err_name(rc), uv_strerror(rc));
    return 2;
  }
  struct sockaddr_storage bound;
  int len = sizeof bound;
  uv_tcp_getsockname(&srv->listener, (struct sockaddr *)&bound, &len);
  srv->port = ntohs(bound.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&bound)->sin6_port
                                                : ((struct sockaddr_in *)&bound)->sin_port);
  srv->listening = 1;
  srv->handles++;
  /* Writing to a socket the peer has reset raises SIGPIPE, whose default ends the process. */
  signal(SIGPIPE, SIG_IGN);
  /* One timer for every deadline; its period follows the shortest timeout, so short test
   * timeouts stay accurate; unref'd, it never keeps the loop alive by itself. */
  uint64_t shortest = srv->config.header_timeout_ms < srv->config.keepalive_timeout_ms
                          ? srv->config.header_timeout_ms
                          : srv->config.keepalive_timeout_ms;
  uint64_t period = shortest / 4;
  if (period > 1000) period = 1000;
  if (period < 10) period = 10;
  uv_timer_init(srv->loop, &srv->sweep);
  srv->sweep.data = &srv->walk;
  uv_timer_start(&srv->sweep, on_sweep, period, period);
  uv_unref((uv_handle_t *)&srv->sweep);
  uv_idle_init(srv->loop, &srv->turn);
  srv->turn.data = &srv->walk;
  uv_timer_init(srv->loop, &srv->poll_timer);
  srv->poll_timer.data = &srv->walk;
  uv_unref((uv_handle_t *)&srv->poll_timer); /* the parked connections keep the loop alive */
  srv->handles += 3;
  lua_pushvalue(L, 1);
  srv->self_ref = luaL_ref(L, LUA_REGISTRYINDEX); /* kept while handles are open */
  server **shadow = lua_newuserdatauv(L, sizeof *shadow, 0);
  *shadow = srv;
  srv->shadow = shadow;
  luaL_setmetatable(L, SHADOW_MT);
  srv->walk.ref = luaL_ref(L, LUA_REGISTRYINDEX);
  lua_pushinteger(L, srv->port);
  return 1;
}

/* server:close(callback): stops accepting, closes idle connections now and the others once
 * their answer is written; callback() once every handle is closed. */
static int server_close(lua_State *L) {
  server *srv = check_server(L);
  if (!lua_isnoneornil(L, 2)) {
    luaL_checktype(L, 2, LUA_TFUNCTION);
    lua_pushvalue(L, 2);
    if (srv->close_ref != LUA_NOREF) luaL_unref(L, LUA_REGISTRYINDEX, srv->close_ref);
    srv->close_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  }
  if (srv->closing) {
    if (srv->closed && srv->close_ref != LUA_NOREF) {
      lua_rawgeti(L, LUA_REGISTRYINDEX, srv->close_ref);
      luaL_unref(L, LUA_REGISTRYINDEX, srv->close_ref);
      srv->close_ref = LUA_NOREF;
      lua_call(L, 0, 0);
    }
    return 0;
  }
  srv->closing = 1;
  if (!srv->listening) {
    finish_close(srv);
    return 0;
  }
  uv_close((uv_handle_t *)&srv->listener, on_listener_closed);
  uint64_t now = now_ms(srv);
  sconn *s = srv->conns;
  while (s) {
    sconn *next = s->next;
    lp_conn_server_closing(&s->conn, now);
    s = next;
  }
  maybe_closed(srv);
  return 0;
}

static int server_connection_count(lua_State *L) {
  lua_pushinteger(L, (lua_Integer)check_server(L)->count);
  return 1;
}

static const char *const phase_names[] = {"reading", "answering", "closing", "closed"};

/* server:connections() -> { { id, phase, paused, queued, buffered, memory, reserve }, ... }:
 * what each open connection is doing (specs and diagnostics). */
static int server_connections(lua_State *L) {
  server *srv = check_server(L);
  lua_newtable(L);
  lua_Integer i = 0;
  for (sconn *s = srv->conns; s; s = s->next) {
    lua_createtable(L, 0, 7);
    lua_pushinteger(L, (lua_Integer)s->id);
    lua_setfield(L, -2, "id");
    lua_pushstring(L, phase_names[s->conn.phase]);
    lua_setfield(L, -2, "phase");
    lua_pushboolean(L, s->conn.paused);
    lua_setfield(L, -2, "paused");
    lua_pushinteger(L, (lua_Integer)s->queued);
    lua_setfield(L, -2, "queued");
    lua_pushinteger(L, (lua_Integer)lp_http_buffered(&s->conn.parser));
    lua_setfield(L, -2, "buffered");
    lua_pushinteger(L, (lua_Integer)(s->conn.parser.in.cap + s->conn.parser.body.cap + s->conn.head_bytes.cap));
    lua_setfield(L, -2, "memory");
    lua_pushboolean(L, s->reserve);
    lua_setfield(L, -2, "reserve");
    lua_rawseti(L, -2, ++i);
  }
  return 1;
}

static int server_gc(lua_State *L) {
  server **p = luaL_checkudata(L, 1, SERVER_MT);
  server *srv = *p;
  if (srv && srv->handles == 0 && (srv->closed || !srv->listening)) {
    luaL_unref(L, LUA_REGISTRYINDEX, srv->dispatch_ref);
    luaL_unref(L, LUA_REGISTRYINDEX, srv->gone_ref);
    luaL_unref(L, LUA_REGISTRYINDEX, srv->log_ref);
    luaL_unref(L, LUA_REGISTRYINDEX, srv->close_ref);
    free_native(L, srv);
    free(srv);
    *p = NULL;
  }
  return 0;
}

/* ---------------------------------------------------------------------------------------------
 * The connection handle responses write through */

static conn_box *check_box(lua_State *L) { return luaL_checkudata(L, 1, CONN_MT); }

/* conn:write(data) -> true | nil, "closed" | nil, "client too slow"; data: a string or a list
 * of strings (up to 8), written in order. */
static int conn_write(lua_State *L) {
  conn_box *box = check_box(L);
  lp_slice bufs[8];
  size_t n = 0;
  if (lua_type(L, 2) == LUA_TTABLE) {
    lua_Integer len = luaL_len(L, 2);
    luaL_argcheck(L, len <= 8, 2, "at most 8 pieces");
    for (lua_Integer i = 1; i <= len; i++) {
      lua_rawgeti(L, 2, i);
      bufs[n].ptr = luaL_checklstring(L, -1, &bufs[n].len); /* stays referenced by the table */
      lua_pop(L, 1);
      n++;
    }
  } else {
    bufs[0].ptr = luaL_checklstring(L, 2, &bufs[0].len);
    n = 1;
  }
  sconn *s = box->s;
  if (!s || !lp_conn_is_open(&s->conn)) {
    luaL_pushfail(L);
    lua_pushliteral(L, "closed");
    return 2;
  }
  if (lp_conn_write(&s->conn, bufs, n) != 0) {
    luaL_pushfail(L);
    lua_pushliteral(L, "client too slow");
    return 2;
  }
  lua_pushboolean(L, 1);
  return 1;
}

/* conn:done(keep): the response is complete; keep: the connection may serve another request. */
static int conn_done(lua_State *L) {
  conn_box *box = check_box(L);
  int keep = lua_toboolean(L, 2);
  lua_pushnil(L);
  lua_setiuservalue(L, 1, 1);
  if (box->s) lp_conn_response_done(&box->s->conn, keep, now_ms(box->s->srv));
  return 0;
}

/* conn:attach(res): gone(res) runs if the client leaves before the response is done. */
static int conn_attach(lua_State *L) {
  conn_box *box = check_box(L);
  if (box->s && box->s->conn.phase == LP_CONN_ANSWERING) {
    lua_settop(L, 2);
    lua_setiuservalue(L, 1, 1);
  }
  return 0;
}

/* conn:on_drain(fn[, below]): fn() once at most `below` bytes (default 0) wait to be written;
 * at once when that is so already. Never called once the connection is closed. */
static int conn_on_drain(lua_State *L) {
  conn_box *box = check_box(L);
  luaL_checktype(L, 2, LUA_TFUNCTION);
  lua_Integer below = luaL_optinteger(L, 3, 0);
  sconn *s = box->s;
  if (!s || s->handle_closing) return 0;
  if (s->drain_ref != LUA_NOREF) luaL_unref(L, LUA_REGISTRYINDEX, s->drain_ref);
  lua_pushvalue(L, 2);
  s->drain_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  s->drain_below = below < 0 ? 0 : (size_t)below;
  if (s->queued <= s->drain_below) call_drain(s);
  return 0;
}

/* conn:native(handler) -> true when the native handler answered the request now being
 * dispatched on this connection (a wrapper handing it back: response.lua's res:native), false
 * when the Lua handler must run (another request, a later call, something only Lua answers). */
static int conn_native(lua_State *L) {
  conn_box *box = check_box(L);
  native_handler *h = luaL_checkudata(L, 2, NATIVE_MT);
  sconn *s = box->s;
  int answered = 0;
  if (s && h->enabled && h->kind != NATIVE_PUBLISH && !s->native_declined && s->srv->current == s &&
      s->srv->current_head && s->conn.phase == LP_CONN_ANSWERING && s->request_bytes == 0) {
    const lp_http_event *head = s->srv->current_head;
    lp_slice path, query;
    if (head->method.len == 3 && memcmp(head->method.ptr, "GET", 3) == 0 &&
        lp_http_split_target(head->target, &path, &query) == 0) {
      lua_getiuservalue(L, 2, 1);
      lp_store *store = lp_lua_store_of(L, -1);
      lp_cache *cache = lp_lua_cache_of(L, -1);
      lua_pop(L, 1);
      /* a poll whose response Lua watches (res:on_close) is not parked: Lua must hear it end */
      push_attached(L, s);
      int watched = !lua_isnil(L, -1);
      lua_pop(L, 1);
      answered = h->kind == NATIVE_CACHED ? fast_cached(s, h, cache, head, query, !watched)
                                          : fast_subscription(s, h, store, head, query, !watched);
    }
  }
  lua_pushboolean(L, answered);
  return 1;
}

static int conn_abort(lua_State *L) {
  conn_box *box = check_box(L);
  if (box->s) lp_conn_abort(&box->s->conn);
  return 0;
}

static int conn_is_open(lua_State *L) {
  conn_box *box = check_box(L);
  lua_pushboolean(L, box->s && lp_conn_is_open(&box->s->conn));
  return 1;
}

static int conn_may_keep_alive(lua_State *L) {
  conn_box *box = check_box(L);
  lua_pushboolean(L, box->s && lp_conn_may_keep_alive(&box->s->conn));
  return 1;
}

static int conn_queued(lua_State *L) {
  conn_box *box = check_box(L);
  lua_pushinteger(L, box->s ? (lua_Integer)box->s->queued : 0);
  return 1;
}

/* ---------------------------------------------------------------------------------------------
 * Native handlers */

static size_t opt_size_at(lua_State *L, int t, const char *k) {
  lua_getfield(L, t, k);
  int ok;
  lua_Integer v = lua_tointegerx(L, -1, &ok);
  if (!ok || v < 1) luaL_error(L, "option '%s' must be a positive integer", k);
  lua_pop(L, 1);
  return (size_t)v;
}

/* cors = { any = bool, origins = { origin, ... }, credentials = bool, preflight = "header
 * lines" } (made by longpoll.cors Policy:native). The handler's userdata owns what is read here
 * from the moment it is set (its __gc frees it), even on an error. */
static void read_cors(lua_State *L, int t, lp_cors *c) {
  luaL_checktype(L, t, LUA_TTABLE);
  c->on = 1;
  lua_getfield(L, t, "any");
  c->any = lua_toboolean(L, -1);
  lua_getfield(L, t, "credentials");
  c->credentials = lua_toboolean(L, -1);
  lua_getfield(L, t, "preflight");
  size_t len;
  const char *lines = luaL_checklstring(L, -1, &len);
  if (lp_cors_set_preflight(c, lines, len) != 0) luaL_error(L, "out of memory");
  lua_getfield(L, t, "origins");
  luaL_checktype(L, -1, LUA_TTABLE);
  size_t n = (size_t)lua_rawlen(L, -1);
  for (size_t i = 0; i < n; i++) {
    lua_rawgeti(L, -1, (lua_Integer)i + 1);
    const char *origin = luaL_checklstring(L, -1, &len);
    if (lp_cors_add_origin(c, origin, len) != 0) luaL_error(L, "out of memory");
    lua_pop(L, 1);
  }
  lua_pop(L, 4);
}

/* core.native_subscription(store, { max_category_bytes, max_categories_per_subscription,
 *   max_longpoll_timeout_seconds, header_block[, cors] }) -> handler: what a server needs to answer the
 * manager's catch-up long polls itself (see longpoll.http.native). handler:disable() sends
 * every later request to the Lua handler (the manager shutting down). */
static int make_native(lua_State *L, int kind) {
  if (kind == NATIVE_CACHED)
    luaL_argcheck(L, lp_lua_cache_of(L, 1) != NULL, 1, "a cache expected");
  else
    luaL_argcheck(L, lp_lua_store_of(L, 1) != NULL, 1, "an open store expected");
  luaL_checktype(L, 2, LUA_TTABLE);
  native_handler *h = lua_newuserdatauv(L, sizeof *h, 1);
  memset(h, 0, sizeof *h);
  h->mark_ref = LUA_NOREF;
  h->batch = 1;
  luaL_setmetatable(L, NATIVE_MT);
  h->kind = kind;
  h->limits.max_category_bytes = opt_size_at(L, 2, "max_category_bytes");
  if (h->kind != NATIVE_PUBLISH) {
    h->limits.max_categories = opt_size_at(L, 2, "max_categories_per_subscription");
    h->limits.max_timeout_s = (int64_t)opt_size_at(L, 2, "max_longpoll_timeout_seconds");
  }
  lua_getfield(L, 2, "header_block");
  size_t len;
  const char *block = luaL_checklstring(L, -1, &len);
  h->block = malloc(len + 1);
  if (!h->block) return luaL_error(L, "out of memory");
  memcpy(h->block, block, len + 1);
  h->block_len = len;
  lua_pop(L, 1);
  lua_getfield(L, 2, "cors");
  if (!lua_isnil(L, -1)) read_cors(L, lua_gettop(L), &h->cors);
  lua_pop(L, 1);
  if (kind == NATIVE_CACHED) {
    lua_getfield(L, 2, "mark");
    if (lua_isfunction(L, -1))
      h->mark_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    else
      lua_pop(L, 1);
  }
  lua_pushvalue(L, 1);
  lua_setiuservalue(L, -2, 1);
  h->enabled = 1;
  return 1;
}

static int l_native_subscription(lua_State *L) { return make_native(L, NATIVE_SUBSCRIPTION); }

/* core.native_cached_subscription(cache, { as native_subscription, mark = function(batch) }) ->
 * handler: the manager's long-poll handler in Redis mode, for the catch-ups the engine's
 * node-local cache (core.new_cache) answers with events and the polls it parks on that cache
 * (nothing after the cursor); everything else goes to Lua. A parked poll whose time is up gets
 * the timeout answer once mark(batch) handed the batch's Redis mark to handler:marked(batch, T)
 * (without mark, or with T nil: its floor, see fast_cached). */
static int l_native_cached_subscription(lua_State *L) { return make_native(L, NATIVE_CACHED); }

/* core.native_publish(store, { max_category_bytes, header_block }) -> handler: the manager's
 * publish handler, for publishes that wake nobody (the manager registers it only when it has no
 * add-on to tell). */
static int l_native_publish(lua_State *L) { return make_native(L, NATIVE_PUBLISH); }

/* handler:disable(): every later request goes to the Lua handler, and the polls parked on the
 * handler get the timeout answer now (the manager shutting down); in Redis mode once the mark
 * they all wait for came (handler:marked). */
static int native_disable(lua_State *L) {
  native_handler *h = luaL_checkudata(L, 1, NATIVE_MT);
  h->enabled = 0;
  if (h->kind == NATIVE_CACHED && h->mark_ref != LUA_NOREF) {
    native_handler *ignored = NULL;
    for (sconn *s = h->parked; s; s = s->park_next) expire_cached(s, &ignored);
    ask_mark(L, NULL, h);
    luaL_unref(L, LUA_REGISTRYINDEX, h->mark_ref); /* it holds the manager: no more marks */
    h->mark_ref = LUA_NOREF;
    return 0; /* answered when the mark comes, or when the engine closes the cache (floors) */
  }
  answer_parked(h);
  return 0;
}

/* handler:marked(batch, T | nil): the Redis mark of a batch of timed-out parked polls (nil: none
 * could be had): those still parked get the timeout answer (T, or their floor). */
static int native_marked(lua_State *L) {
  native_handler *h = luaL_checkudata(L, 1, NATIVE_MT);
  lua_Integer b = luaL_checkinteger(L, 2);
  int has_T = !lua_isnoneornil(L, 3);
  lua_Integer T = has_T ? luaL_checkinteger(L, 3) : 0;
  if (b > 0) settle_marks(h, (uint64_t)b, has_T, (int64_t)T);
  return 0;
}

/* handler:parked() -> how many long polls wait parked on it. */
static int native_parked(lua_State *L) {
  native_handler *h = luaL_checkudata(L, 1, NATIVE_MT);
  lua_pushinteger(L, (lua_Integer)h->nparked);
  return 1;
}

static int native_gc(lua_State *L) {
  native_handler *h = luaL_checkudata(L, 1, NATIVE_MT);
  answer_parked(h);
  luaL_unref(L, LUA_REGISTRYINDEX, h->mark_ref);
  h->mark_ref = LUA_NOREF;
  lp_cors_free(&h->cors);
  free(h->block);
  h->block = NULL;
  h->enabled = 0;
  return 0;
}

static void drop_route(lua_State *L, server *srv, size_t i) {
  luaL_unref(L, LUA_REGISTRYINDEX, srv->routes[i].ref);
  free(srv->routes[i].path);
  srv->routes[i] = srv->routes[--srv->nroutes];
}

/* server:native_route(method, path, handler | nil): a GET (a subscription handler) or POST (a
 * publish handler) to path is answered by the native handler when it can, and an OPTIONS
 * preflight by a handler under a CORS policy (nil: never). */
static int server_native_route(lua_State *L) {
  server *srv = check_server(L);
  const char *method = luaL_checkstring(L, 2);
  int post = strcmp(method, "POST") == 0 ? ROUTE_POST : strcmp(method, "OPTIONS") == 0 ? ROUTE_OPTIONS : ROUTE_GET;
  luaL_argcheck(L, post != ROUTE_GET || strcmp(method, "GET") == 0, 2, "GET, POST or OPTIONS");
  size_t len;
  const char *path = luaL_checklstring(L, 3, &len);
  native_handler *h = lua_isnoneornil(L, 4) ? NULL : luaL_checkudata(L, 4, NATIVE_MT);
  if (h && post == ROUTE_OPTIONS && !h->cors.on) h = NULL; /* only preflights are answered */
  if (h && post != ROUTE_OPTIONS && (post == ROUTE_POST) != (h->kind == NATIVE_PUBLISH))
    h = NULL; /* not for this method */
  lp_slice p = {path, len};
  native_route *r = find_route(srv, post, p);
  if (r) drop_route(L, srv, (size_t)(r - srv->routes));
  if (!h) return 0;
  native_route *grown = realloc(srv->routes, (srv->nroutes + 1) * sizeof *grown);
  if (!grown) return luaL_error(L, "out of memory");
  srv->routes = grown;
  char *copy = malloc(len + 1);
  if (!copy) return luaL_error(L, "out of memory");
  memcpy(copy, path, len + 1);
  lua_pushvalue(L, 4);
  native_route *nr = &srv->routes[srv->nroutes++];
  nr->post = post;
  nr->path = copy;
  nr->path_len = len;
  nr->h = h;
  nr->ref = luaL_ref(L, LUA_REGISTRYINDEX);
  return 0;
}

/* server:fast_answers() -> how many requests were answered without entering Lua. */
static int server_fast_answers(lua_State *L) {
  lua_pushinteger(L, (lua_Integer)check_server(L)->fast_answers);
  return 1;
}

static void free_native(lua_State *L, server *srv) {
  while (srv->nroutes > 0) drop_route(L, srv, srv->nroutes - 1);
  free(srv->routes);
  srv->routes = NULL;
  lp_buf_free(&srv->fast_scratch);
  lp_buf_free(&srv->fast_body);
  lp_buf_free(&srv->fast_head);
  lp_buf_free(&srv->fast_extra);
  lp_woken_free(&srv->fast_woken);
  lp_deadlines_free(&srv->deadlines);
}

/* What uv.walk hands to Lua for each of the server's handles: one object per server that says
 * what they are. */
static int shadow_get_type(lua_State *L) {
  lua_pushliteral(L, "longpoll_http");
  return 1;
}
static int shadow_is_closing(lua_State *L) {
  server **p = luaL_checkudata(L, 1, SHADOW_MT);
  lua_pushboolean(L, *p == NULL || (*p)->closing);
  return 1;
}
static int shadow_is_active(lua_State *L) {
  server **p = luaL_checkudata(L, 1, SHADOW_MT);
  lua_pushboolean(L, *p != NULL);
  return 1;
}
static int shadow_tostring(lua_State *L) {
  server **p = luaL_checkudata(L, 1, SHADOW_MT);
  if (*p)
    lua_pushfstring(L, "longpoll_http: %d handles, port %d", (*p)->handles, (*p)->port);
  else
    lua_pushliteral(L, "longpoll_http: closed");
  return 1;
}
static const luaL_Reg shadow_methods[] = {
    {"get_type", shadow_get_type}, {"is_closing", shadow_is_closing}, {"is_active", shadow_is_active}, {NULL, NULL}};

static const luaL_Reg server_methods[] = {{"listen", server_listen},
                                          {"close", server_close},
                                          {"connection_count", server_connection_count},
                                          {"connections", server_connections},
                                          {"native_route", server_native_route},
                                          {"fast_answers", server_fast_answers},
                                          {NULL, NULL}};

static const luaL_Reg conn_methods[] = {{"write", conn_write},     {"done", conn_done},
                                        {"attach", conn_attach},   {"abort", conn_abort},
                                        {"is_open", conn_is_open}, {"may_keep_alive", conn_may_keep_alive},
                                        {"queued", conn_queued},   {"on_drain", conn_on_drain},
                                        {"native", conn_native},   {NULL, NULL}};

/* Raises the soft limit of open files to the hard one; returns the limit now in force. */
static int l_raise_nofile(lua_State *L) {
  struct rlimit rl;
  if (getrlimit(RLIMIT_NOFILE, &rl) != 0) {
    luaL_pushfail(L);
    return 1;
  }
  if (rl.rlim_cur < rl.rlim_max) {
    rlim_t want = rl.rlim_max;
    rl.rlim_cur = want;
    if (setrlimit(RLIMIT_NOFILE, &rl) != 0) getrlimit(RLIMIT_NOFILE, &rl);
  }
  lua_pushinteger(L, rl.rlim_cur == RLIM_INFINITY ? (lua_Integer)1 << 20 : (lua_Integer)rl.rlim_cur);
  return 1;
}

static const luaL_Reg functions[] = {{"http_server", l_http_server},
                                     {"raise_nofile_limit", l_raise_nofile},
                                     {"native_subscription", l_native_subscription},
                                     {"native_publish", l_native_publish},
                                     {"native_cached_subscription", l_native_cached_subscription},
                                     {NULL, NULL}};

/* Adds core.http_server to the module table on top of the stack (from luaopen_longpoll_core). */
void lp_lua_server_open(lua_State *L) {
  if (luaL_newmetatable(L, SERVER_MT)) {
    luaL_newlib(L, server_methods);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, server_gc);
    lua_setfield(L, -2, "__gc");
  }
  lua_pop(L, 1);
  if (luaL_newmetatable(L, NATIVE_MT)) {
    lua_createtable(L, 0, 3);
    lua_pushcfunction(L, native_disable);
    lua_setfield(L, -2, "disable");
    lua_pushcfunction(L, native_parked);
    lua_setfield(L, -2, "parked");
    lua_pushcfunction(L, native_marked);
    lua_setfield(L, -2, "marked");
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, native_gc);
    lua_setfield(L, -2, "__gc");
  }
  lua_pop(L, 1);
  if (luaL_newmetatable(L, SHADOW_MT)) {
    luaL_newlib(L, shadow_methods);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, shadow_tostring);
    lua_setfield(L, -2, "__tostring");
  }
  lua_pop(L, 1);
  if (luaL_newmetatable(L, CONN_MT)) {
    luaL_newlib(L, conn_methods);
    lua_setfield(L, -2, "__index");
  }
  lua_pop(L, 1);
  luaL_setfuncs(L, functions, 0);
}
