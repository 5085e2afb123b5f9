/* lp_lua_engine.h: the HTTP engine's own structures, shared by the three files it is made of:
 * lp_lua_server.c (sockets, connections, the server's and the connection handle's Lua API),
 * lp_lua_native.c (the manager's handlers served in C: catch-ups, long polls parked in C,
 * publishes, CORS preflights, and the native handler objects) and lp_lua_stream.c (SSE streams
 * served in C). Internal to longpoll.core; lp_lua_server.h is the narrower view static files get. */
#ifndef LP_LUA_ENGINE_H
#define LP_LUA_ENGINE_H

#include <lua.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/time.h>
#include <uv.h>

#include "lp_cache.h"
#include "lp_conn.h"
#include "lp_cors.h"
#include "lp_deadlines.h"
#include "lp_fast.h"
#include "lp_keys.h"
#include "lp_lua_server.h"
#include "lp_lua_static.h"
#include "lp_waiter.h"
/* lua-luv-dev: luv_loop, luv_context, luv_handle_t (its luv.h has a `()` prototype) */
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wstrict-prototypes"
#include "luv/lhandle.h"
#pragma GCC diagnostic pop

lp_store *lp_lua_store_of(lua_State *L, int idx); /* lp_lua.c */
lp_cache *lp_lua_cache_of(lua_State *L, int idx); /* lp_lua_cache.c */
lp_keys *lp_lua_keys_of(lua_State *L, int idx);   /* lp_lua_keys.c */

#define NATIVE_MT "longpoll.NativeHandler"

/* A handler the engine can run itself (core.native_subscription): the manager's long-poll
 * handler, for the polls it answers at once from the buffers and those it parks here, in C, until
 * a publish wakes them or their timeout passes. User value 1: the store. NATIVE_CACHED
 * (core.native_cached_subscription): that handler in Redis mode, for the catch-ups the engine's
 * node-local cache (lp_cache) answers with events, and the polls it parks on that cache until
 * pub/sub brings an event of theirs; user value 1: the cache. NATIVE_SSE (core.native_sse): the
 * manager's SSE handler, whose streams are served here, in C, from the store (see fast_sse);
 * user value 1: the store. NATIVE_STATS (core.native_stats): the manager's stats handler in memory
 * mode (lp_lua_stats.c); user value 1: the store, 2: its options (which hold what it reads). */
enum { NATIVE_SUBSCRIPTION = 1, NATIVE_PUBLISH, NATIVE_CACHED, NATIVE_SSE, NATIVE_STATS, NATIVE_REDIS_PUBLISH };

typedef struct lp_lua_stats lp_lua_stats; /* lp_lua_stats.c */

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
  struct sconn *streams; /* NATIVE_SSE: its open streams (any server's), newest first */
  size_t nstreams;
  uint64_t heartbeat_ms, retry_ms; /* NATIVE_SSE */
  /* NATIVE_CACHED: a parked poll's timeout needs a Redis mark (engine/redis/marks.lua) for its
   * timestamp. Polls whose time is up stay parked (an event may still reach them) in the
   * expiring list, oldest first, each with the batch it joined; mark_ref is the manager's Lua
   * function mark(batch), which asks the engine for one mark per batch and hands it back
   * (handler:marked(batch, T)). LUA_NOREF: no mark (each poll answers with its floor). */
  int mark_ref;
  /* NATIVE_CACHED: max_waiting_per_category (0: none) counts the polls parked on the cache and
   * the engine's own waiters, in the store of waiting_ref (a registry ref, LUA_NOREF: none). */
  size_t max_waiting;
  int waiting_ref;
  uint64_t batch;                    /* the batch polls timing out now join (from 1) */
  struct sconn *exp_head, *exp_tail; /* the expiring list */
  struct native_handler *mark_next;  /* handlers to ask for a mark (on_poll_timer's list) */
  int mark_wanted;                   /* in that list */
  lp_lua_stats *stats;               /* NATIVE_STATS: what it reads besides the store, owned */
  /* NATIVE_PUBLISH: the engine's Idempotency-Keys (user value 2 keeps them; NULL: a keyed publish
   * is Lua's) and the body of the 422 answer (owned). */
  lp_keys *keys;
  char *mismatch_body;
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
  lp_lua_task *task;  /* the C producer of the pending response's body (a static file), or NULL */
  size_t task_below;  /* its drain runs once queued is at most this, when task_waits */
  unsigned task_waits : 1;
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
  /* An SSE stream served here, in C (see fast_sse): its store subscription (owned by waiter)
   * is woken by each event and waits again (stream_after); its heartbeat is its deadline. A
   * connection has a parked poll or a stream, never both. */
  native_handler *stream_by; /* NULL when no stream */
  lp_store *stream_store;
  uint64_t stream_handle;      /* 0 between a wake and the wait again */
  lp_slice *stream_categories; /* owned, one block with the names */
  size_t stream_ncategories;
  struct sconn *stream_prev, *stream_next; /* stream_by's list */
  unsigned stream_chunked : 1;             /* HTTP/1.1: chunks; HTTP/1.0: until the connection ends */
  unsigned stream_keep : 1;                /* the connection may serve another request after it */
  struct pub_entry *publish_pending;       /* a publish waiting for Redis's reply (lp_lua_redis_publish.c) */
  char remote[64];
} sconn;

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
  lp_lua_statics *statics; /* server:static mounts, served in C (lp_lua_static.c) */
  lp_buf fast_scratch, fast_body, fast_head, fast_extra;
  lp_woken fast_woken;                /* the parked polls a fast publish woke */
  lp_buf stream_frame;                /* the SSE message of the event being written to streams */
  const lp_store *stream_frame_store; /* whose event it is: its store, seq and id */
  uint64_t stream_frame_seq;
  char stream_frame_id[LP_UUID_LEN + 1];
  char stream_frame_size[24];        /* its chunk size line, "<hex>\r\n" */
  uint64_t fast_answers;             /* requests answered without entering Lua */
  struct sconn *current;             /* the connection whose request a Lua handler runs now */
  const lp_http_event *current_head; /* its head, valid while it runs */
  char read_buffer[READ_BUFFER];
};

#define SERVER_OF(handle, field) ((server *)((char *)(handle)-offsetof(server, field)))
#define CONTAINER(ptr, type, field) ((type *)((char *)(ptr)-offsetof(type, field)))

/* The loop's time (deadlines, timeouts) and the wall clock (event times, TTL). */
static inline uint64_t now_ms(server *srv) { return uv_now(srv->loop); }
static inline int64_t wall_clock_ms(void) {
  struct timeval tv;
  gettimeofday(&tv, NULL);
  return (int64_t)tv.tv_sec * 1000 + tv.tv_usec / 1000;
}

/* lp_lua_server.c: "Date: ...\r\n", formatted once a second; a line through the server's logger;
 * fn and nargs arguments on L's stack called protected (errors logged through srv when given,
 * popped): the lua_pcall status. */
const char *lp_lua_engine_date(server *srv);
void lp_lua_engine_log(server *srv, const char *level, const char *message, const char *key, lua_Integer value);
int lp_lua_engine_pcall(lua_State *L, server *srv, int nargs);

/* lp_lua_native.c: the request on s answered by the native route it goes to, if any (1; 0: Lua's
 * turn, and s->native_declined says whether a native handler declined it); the same for a
 * request a Lua wrapper hands back to handler h (watched: Lua watches the response, so nothing
 * is parked); a parked poll's client left; the timer of the server's deadlines (parked polls'
 * timeouts, streams' heartbeats) set for the earliest; a handler's CORS lines for a request
 * (lp_cors_lines into out, *allowed); the native routes' memory freed; server:native_route;
 * the native handler type and its constructors added to the module table on top of L. */
int lp_lua_native_serve(sconn *s, const lp_http_event *head, lp_slice body);
int lp_lua_native_handback(sconn *s, native_handler *h, lp_store *store, lp_cache *cache, const lp_http_event *head,
                           lp_slice path, lp_slice query, int watched);
void lp_lua_native_unpark(sconn *s);
void lp_lua_native_timer_arm(server *srv);
int lp_lua_native_cors_lines(const native_handler *nh, const lp_http_event *head, lp_buf *out, int *allowed);
/* The first value of request header name (lower-case; ptr NULL when absent), *count (when given)
 * how many times it is there. */
lp_slice lp_lua_native_header(const lp_http_event *head, const char *name, size_t *count);
/* An answer's head into h (emptied first): the status line, extra lines (CORS), the block, the
 * framing line ("" for none), Date and the Connection line for keep / http10. 0, or -1 when
 * memory ran out. */
int lp_lua_native_head(lp_buf *h, server *srv, const char *status_line, lp_slice extra, lp_slice block,
                       const char *framing, int keep, int http10);
/* Writes an answer with the status line, the header block and the body pieces (at most 7): the
 * response is done. keep_alive, http10: what the request asked for; extra: the answer's own lines
 * (CORS). */
void lp_lua_native_answer(sconn *s, const char *status_line, lp_slice block, int keep_alive, int http10, lp_slice extra,
                          const lp_slice *body, size_t nbody);
/* The object a native route's handler serves from (its user value 1: a store, a cache, a
 * publisher), as of(L, idx) reads it from the stack; NULL when it is none. */
void *lp_lua_native_route_object(server *srv, native_route *r, void *(*of)(lua_State *L, int idx));
void lp_lua_native_free(lua_State *L, server *srv);
int lp_lua_native_route(lua_State *L, server *srv);
void lp_lua_native_open(lua_State *L);

/* lp_lua_redis_publish.c: a publish to handler r->h (NATIVE_REDIS_PUBLISH) sent to Redis from C
 * (1: its answer follows the reply; 0: Lua's turn); the client of s left (its publish's answer is
 * dropped); whether the value at idx is a publisher (core.redis_publisher); core.redis_publisher
 * added to the module table on top of L. */
int lp_lua_redis_publish_serve(sconn *s, native_route *r, const lp_http_event *head, lp_slice body);
void lp_lua_redis_publish_forget(sconn *s);
int lp_lua_redis_publisher_check(lua_State *L, int idx);
void lp_lua_redis_publish_open(lua_State *L);

/* lp_lua_stream.c: an SSE stream to handler nh served on s (1; 0: Lua's turn); its end when the
 * client left (nothing written); its heartbeat, due now; every stream of nh finished cleanly. */
int lp_lua_stream_serve(sconn *s, native_handler *nh, lp_store *store, const lp_http_event *head, lp_slice query);
void lp_lua_stream_end(sconn *s);
void lp_lua_stream_heartbeat(sconn *s);
void lp_lua_stream_finish_all(native_handler *nh);

/* lp_lua_stats.c: a GET of the stats path served on s (1; 0: Lua's turn: HEAD, an error to
 * explain, a query it does not decode); the options of core.native_stats read from the table at
 * t into h->stats; h->stats freed; the gauges and text functions added to the module table. */
int lp_lua_stats_serve(sconn *s, native_handler *nh, lp_store *store, const lp_http_event *head, lp_slice path,
                       lp_slice query);
int lp_lua_stats_read(lua_State *L, int t, native_handler *h);
void lp_lua_stats_free(lp_lua_stats *st);
void lp_lua_stats_open(lua_State *L);

#endif
