/* lp_lua_server: the HTTP server engine on luv's own libuv loop, in longpoll.core
 * (core.http_server). It accepts, reads, writes and keeps the time; lp_conn decides what each
 * connection does; the manager's own handlers are served in C (lp_lua_native.c, lp_lua_stream.c)
 * and static mounts too (lp_lua_static.c); other requests go whole to one Lua function
 * (longpoll.server routes them), and answers come back through the connection handle
 * (longpoll.HttpConn) that response.lua uses. Lua timers, luv sockets and this server share one
 * loop. */
#include <lauxlib.h>
#include <lua.h>
#include <signal.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <uv.h>

#include "lp_lua_engine.h"

void lp_lua_http_push_request(lua_State *L, const lp_http_event *head, lp_slice body, const char *remote_addr);

#define SERVER_MT "longpoll.HttpServer"
#define CONN_MT "longpoll.HttpConn"
#define SHADOW_MT "longpoll.HttpServerHandles"

typedef struct conn_box {
  sconn *s; /* NULL once the connection is closed */
} conn_box;

typedef struct write_req {
  uv_write_t req;
  sconn *s;
  size_t len;
  char data[];
} write_req;

/* ---------------------------------------------------------------------------------------------
 * Calls into Lua (always on the main thread, protected) */

static int traceback(lua_State *L) {
  const char *msg = lua_tostring(L, 1);
  luaL_traceback(L, L, msg ? msg : "(error object)", 1);
  return 1;
}

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

int lp_lua_engine_pcall(lua_State *L, server *srv, int nargs) {
  int base = lua_gettop(L) - nargs;
  lua_pushcfunction(L, traceback);
  lua_insert(L, base);
  int status = lua_pcall(L, nargs, 0, base);
  if (status != LUA_OK) {
    if (srv) log_callback_error(srv);
    lua_pop(L, 1);
  }
  lua_remove(L, base); /* traceback */
  return status;
}

/* Calls the function below nargs arguments on the stack, dropping results. */
static void call_lua(server *srv, int nargs) { lp_lua_engine_pcall(srv->L, srv, nargs); }

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

void lp_lua_engine_log(server *srv, const char *level, const char *message, const char *key, lua_Integer value) {
  if (srv->log_ref == LUA_NOREF) return;
  log_call lc = {srv, level, message, key, value};
  protected_c(srv, log_in_lua, &lc); /* the logger itself is pcall'd by longpoll.server */
}

/* ---------------------------------------------------------------------------------------------
 * The host of each lp_conn */

static void maybe_closed(server *srv);

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
  if (s->task && s->task_waits && s->queued <= s->task_below && !s->handle_closing) {
    s->task_waits = 0;
    s->task->drain(s->task);
  }
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

/* The client of the response a C task produces is gone: the task stops. */
static void drop_task(sconn *s) {
  lp_lua_task *t = s->task;
  s->task = NULL;
  s->task_waits = 0;
  if (t) t->gone(t);
}

static void host_close(void *ud) {
  sconn *s = ud;
  server *srv = s->srv;
  lp_lua_native_unpark(s);
  lp_lua_stream_end(s);
  drop_task(s);
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
  lp_lua_native_unpark(s); /* a parked poll's client left: its wait ends, nothing is answered */
  lp_lua_stream_end(s);
  drop_task(s);
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

const char *lp_lua_engine_date(server *srv) {
  time_t t = time(NULL);
  if (t != srv->date_second) {
    struct tm tm;
    gmtime_r(&t, &tm);
    strftime(srv->date_line, sizeof srv->date_line, "Date: %a, %d %b %Y %H:%M:%S GMT\r\n", &tm);
    srv->date_second = t;
  }
  return srv->date_line;
}

static const char *host_date(void *ud) { return lp_lua_engine_date(((sconn *)ud)->srv); }

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

static void reserve_check(sconn *s);

static void host_request(void *ud, const lp_http_event *head, lp_slice body) {
  sconn *s = ud;
  server *srv = s->srv;
  s->request_bytes = 0;
  s->native_declined = 0;
  if (lp_lua_native_serve(s, head, body)) return;
  if (lp_lua_static_request(srv->statics, s, head)) { /* a static mount's, answered in C */
    reserve_check(s);
    return;
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
  reserve_check(s);
}

/* After a request was dispatched. */
static void reserve_check(sconn *s) {
  server *srv = s->srv;
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
 * What the parts of the engine in other files use (lp_lua_server.h) */

void lp_lua_conn_set_task(sconn *s, lp_lua_task *t) {
  s->task = t;
  s->task_waits = 0;
}
void lp_lua_conn_wait_drain(sconn *s, size_t below) {
  s->task_below = below;
  s->task_waits = s->task != NULL;
}
lp_conn *lp_lua_conn_state(sconn *s) { return &s->conn; }
uv_loop_t *lp_lua_conn_loop(sconn *s) { return s->srv->loop; }
size_t lp_lua_conn_queued(sconn *s) { return s->queued; }
uint64_t lp_lua_conn_now(sconn *s) { return now_ms(s->srv); }
const char *lp_lua_conn_date(sconn *s) { return host_date(s); }
void lp_lua_conn_count_fast(sconn *s) { s->srv->fast_answers++; }

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
  lp_lua_engine_log(srv, "warn", "too many connections: refused with 503", "refused",
                    (lua_Integer)srv->refused_unlogged);
  srv->refused_unlogged = 0;
}

static void on_connection(uv_stream_t *listener, int status) {
  server *srv = SERVER_OF(listener, listener);
  if (status < 0) {
    lp_lua_engine_log(srv, "warn", "accept failed", "code", status);
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
  lp_lua_native_free(L, srv);
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
    lp_lua_native_free(L, srv);
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
  if (s && h->enabled && h->kind != NATIVE_PUBLISH && h->kind != NATIVE_REDIS_PUBLISH && !s->native_declined &&
      s->srv->current == s && s->srv->current_head && s->conn.phase == LP_CONN_ANSWERING && s->request_bytes == 0) {
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
      answered = lp_lua_native_handback(s, h, store, cache, head, path, query, watched);
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

/* server:static_mount(prefix, dir[, follow_symlinks]): files under dir answer GET and HEAD below
 * prefix, in C (lp_lua_static.c); server:route_path(path): a route owns path, no mount takes it. */
static int server_static_mount(lua_State *L) { return lp_lua_static_mount(L, &check_server(L)->statics); }
static int server_route_path(lua_State *L) { return lp_lua_static_route(L, &check_server(L)->statics); }

/* server:fast_answers() -> how many requests were answered without entering Lua. */
static int server_fast_answers(lua_State *L) {
  lua_pushinteger(L, (lua_Integer)check_server(L)->fast_answers);
  return 1;
}

/* server:native_route(method, path, handler | nil): see lp_lua_native_route. */
static int server_native_route(lua_State *L) { return lp_lua_native_route(L, check_server(L)); }

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
                                          {"static_mount", server_static_mount},
                                          {"route_path", server_route_path},
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

static const luaL_Reg functions[] = {
    {"http_server", l_http_server}, {"raise_nofile_limit", l_raise_nofile}, {NULL, NULL}};

/* Adds core.http_server to the module table on top of the stack (from luaopen_longpoll_core). */
void lp_lua_server_open(lua_State *L) {
  if (luaL_newmetatable(L, SERVER_MT)) {
    luaL_newlib(L, server_methods);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, server_gc);
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
  lp_lua_native_open(L);
}
