/* lp_lua_redis_publish: HTTP publishes in Redis mode served in C. A publisher
 * (core.redis_publisher, made by the engine's shard) keeps its own connection to the shard's
 * Redis on luv's loop and sends each publish the engine's script call (lp_redis_publish.c),
 * pipelined, the commands of one loop turn in one write; replies come back in order and each
 * answers its HTTP request with the bytes the Lua handler writes. The node learns of the event
 * as of any other node's: through its pub/sub message. */
#include <lauxlib.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lp_json.h"
#include "lp_lua_engine.h"
#include "lp_redis_publish.h"
#include "lp_uuid.h"

#define PUBLISHER_MT "longpoll.RedisPublisher"
#define PUBLISHER_SHADOW_MT "longpoll.RedisPublisherHandles"

/* How soon after a failed connection the next publish may start another (they go to Lua till). */
#define RETRY_MS 100

/* One publish whose reply is awaited. Owned by its publisher's queue; its HTTP connection (s,
 * NULL once the client left) points back at it through s->publish_pending. */
typedef struct pub_entry {
  struct pub_entry *next;
  sconn *s;
  const native_handler *nh; /* the route's handler: its header block */
  uint64_t sent_at;
  unsigned keep : 1, http10 : 1, evaled : 1;
  size_t extra_len;    /* the answer's own lines (CORS), first in bytes */
  size_t category_len; /* the category (for the log), after them */
  size_t tail_len;     /* the command after its head (lp_redis_publish_tail), last */
  char bytes[];
} pub_entry;

typedef struct publisher publisher;

/* One connection attempt; freed in its handle's close callback. */
typedef struct pub_conn {
  uv_tcp_t tcp; /* first: the handle is the connection */
  uv_connect_t connect_req;
  publisher *p;
  uint64_t started_at;
  int handshake_left; /* AUTH / SELECT replies still to come */
} pub_conn;

typedef struct pub_write {
  uv_write_t req;
  publisher *p;
  pub_conn *c;
  lp_buf bytes;
} pub_write;

struct publisher {
  luv_handle_t walk;  /* what uv.walk sees of our handles (as lp_lua_server.c's) */
  publisher **shadow; /* the shadow object's pointer to us */
  publisher **box;    /* the userdata's pointer to us, NULL once collected */
  uv_loop_t *loop;
  uv_timer_t timer;     /* the connect timeout and the overdue reply */
  uv_prepare_t flusher; /* writes the turn's commands before the loop waits */
  int handles;          /* open uv handles, connections included */
  int closed;
  lp_redis_publish_config cfg; /* its slices point into strings */
  char *strings;
  char sha_text[41];
  lp_slice sha, script;
  lp_buf handshake; /* AUTH and SELECT, sent first on each connection */
  int handshake_count;
  char host[64];
  int port;
  int wanted; /* connect() said where, and no disconnect() came after it */
  uint64_t connect_timeout_ms, command_timeout_ms;
  pub_conn *conn; /* NULL: none; ready when conn && !conn->handshake_left && connected */
  int ready;
  uint64_t retry_at;
  lp_buf out, in, scratch;
  pub_entry *head, *tail;
  size_t in_flight;
  int64_t floor;
  uint64_t published, failed;
  lua_State *L; /* main thread: the log function runs there */
  int log_ref;  /* log(level, message, fields), LUA_NOREF: none */
};

static publisher *publisher_of(lua_State *L, int idx) {
  publisher **box = luaL_testudata(L, idx, PUBLISHER_MT);
  return box ? *box : NULL;
}

/* ---------------------------------------------------------------------------------------------
 * Answers */

/* Writes the answer of e to its client (when still there) and frees e. */
static void answer(pub_entry *e, const char *status_line, lp_slice body) {
  sconn *s = e->s;
  if (s) {
    s->publish_pending = NULL;
    lp_slice extra = {e->bytes, e->extra_len}, block = {e->nh->block, e->nh->block_len};
    lp_lua_native_answer(s, status_line, block, e->keep, e->http10, extra, &body, 1);
  }
  free(e);
}

static void answer_success(pub_entry *e) {
  static const lp_slice SUCCESS = {"{\"success\":true}", 16};
  answer(e, "HTTP/1.1 200 OK\r\n", SUCCESS);
}

/* The engine's line for a failed publish (Engine:publish): warn "publish failed" with the category
 * and the error. The log function runs protected; it may close the publisher. */
static void log_failed(publisher *p, const pub_entry *e, lp_slice why) {
  if (p->log_ref == LUA_NOREF) return;
  lua_State *L = p->L;
  lua_rawgeti(L, LUA_REGISTRYINDEX, p->log_ref);
  lua_pushliteral(L, "warn");
  lua_pushliteral(L, "publish failed");
  lua_createtable(L, 0, 2);
  lua_pushlstring(L, e->bytes + e->extra_len, e->category_len);
  lua_setfield(L, -2, "category");
  lua_pushlstring(L, why.ptr, why.len);
  lua_setfield(L, -2, "error");
  if (lua_pcall(L, 3, 0, 0) != LUA_OK) lua_pop(L, 1); /* the log's own failure is not the publish's */
}

/* The Lua handler's 503 for a failed publish: {"error":"publish failed: <why>"}. why may point
 * into the bytes read: it is copied before the log runs (which may close the publisher). */
static void answer_failed(publisher *p, pub_entry *e, lp_slice why) {
  static const char PREFIX[] = "publish failed: ";
  p->failed++;
  lp_buf body = LP_BUF_INIT;
  lp_buf msg = LP_BUF_INIT;
  int rc = lp_buf_append_str(&msg, PREFIX);
  if (rc == 0) rc = lp_buf_append(&msg, why.ptr, why.len);
  if (rc == 0 && !lp_utf8_is_valid(msg.data, msg.len)) {
    lp_buf_reset(&msg);
    rc = lp_buf_append_str(&msg, "publish failed: Redis answered in bytes that are not UTF-8");
  }
  if (rc == 0) {
    lp_slice logged = {msg.data + sizeof PREFIX - 1, msg.len - (sizeof PREFIX - 1)};
    log_failed(p, e, logged);
  }
  if (rc == 0) rc = lp_buf_append_str(&body, "{\"error\":");
  if (rc == 0) rc = lp_json_append_string(&body, msg.data, msg.len);
  if (rc == 0) rc = lp_buf_append_char(&body, '}');
  if (rc != 0) {
    if (e->s) e->s->publish_pending = NULL;
    if (e->s) lp_conn_abort(&e->s->conn);
    free(e);
  } else {
    lp_slice b = {body.data, body.len};
    answer(e, "HTTP/1.1 503 Service Unavailable\r\n", b);
  }
  lp_buf_free(&body);
  lp_buf_free(&msg);
}

/* ---------------------------------------------------------------------------------------------
 * The connection */

static void on_conn_closed(uv_handle_t *h);
static void start_connect(publisher *p);

static lp_slice cstr(const char *s) {
  lp_slice v = {s, strlen(s)};
  return v;
}

/* Gives up on the connection: every publish in flight is answered with the failure, oldest
 * first; the next publish after RETRY_MS starts a new connection (those before go to Lua). */
static void drop_conn(publisher *p, const char *prefix, const char *why) {
  pub_conn *c = p->conn;
  if (c) {
    p->conn = NULL;
    uv_close((uv_handle_t *)&c->tcp, on_conn_closed);
  }
  p->ready = 0;
  p->retry_at = uv_now(p->loop) + RETRY_MS;
  lp_buf_reset(&p->out);
  lp_buf_reset(&p->in);
  pub_entry *e = p->head;
  p->head = p->tail = NULL;
  p->in_flight = 0;
  char reason[256];
  snprintf(reason, sizeof reason, "%s%s", prefix, why);
  while (e) {
    pub_entry *next = e->next;
    answer_failed(p, e, cstr(reason));
    e = next;
  }
}

static void lost(publisher *p, const char *why) { drop_conn(p, "Redis connection lost: ", why); }

/* One of p's handles closed: p goes with the last once its userdata was collected. */
static void handle_closed(publisher *p) {
  p->handles--;
  if (!p->box && p->handles == 0) {
    lp_buf_free(&p->handshake);
    free(p->strings);
    free(p);
  }
}

static void on_conn_closed(uv_handle_t *h) {
  pub_conn *c = (pub_conn *)h;
  publisher *p = c->p;
  free(c);
  handle_closed(p);
}

static void on_written(uv_write_t *req, int status) {
  pub_write *w = (pub_write *)req;
  publisher *p = w->p;
  pub_conn *c = w->c;
  lp_buf_free(&w->bytes);
  free(w);
  if (status < 0 && p->conn == c) {
    char why[96];
    snprintf(why, sizeof why, "write error: %s", uv_err_name(status));
    lost(p, why);
  }
}

/* Writes what this turn queued, in one write. */
static void on_flush(uv_prepare_t *h) {
  publisher *p = CONTAINER(h, publisher, flusher);
  uv_prepare_stop(h);
  if (!p->conn || p->out.len == 0) return;
  pub_write *w = malloc(sizeof *w);
  if (!w) return lost(p, "out of memory");
  w->p = p;
  w->c = p->conn;
  w->bytes = p->out;
  p->out = (lp_buf)LP_BUF_INIT;
  uv_buf_t b = uv_buf_init(w->bytes.data, (unsigned)w->bytes.len);
  int rc = uv_write(&w->req, (uv_stream_t *)&p->conn->tcp, &b, 1, on_written);
  if (rc < 0) {
    lp_buf_free(&w->bytes);
    free(w);
    char why[96];
    snprintf(why, sizeof why, "write error: %s", uv_err_name(rc));
    lost(p, why);
  }
}

static void flush_soon(publisher *p) {
  if (!uv_is_active((uv_handle_t *)&p->flusher)) uv_prepare_start(&p->flusher, on_flush);
}

/* e waits for the next reply after those in flight. */
static void enqueue(publisher *p, pub_entry *e) {
  e->next = NULL;
  if (p->tail)
    p->tail->next = e;
  else
    p->head = e;
  p->tail = e;
  p->in_flight++;
}

/* Sends e's command again, by the script's text (Redis lost the script: NOSCRIPT). */
static int resend_by_text(publisher *p, pub_entry *e) {
  size_t before = p->out.len;
  lp_slice tail = {e->bytes + e->extra_len + e->category_len, e->tail_len};
  if (lp_redis_publish_head(&p->out, 1, p->script) != 0 || lp_buf_append(&p->out, tail.ptr, tail.len) != 0) {
    p->out.len = before;
    return -1;
  }
  e->evaled = 1;
  enqueue(p, e);
  flush_soon(p);
  return 0;
}

/* The reply to the oldest publish in flight. */
static void settle(publisher *p, const lp_resp_reply *r) {
  pub_entry *e = p->head;
  p->head = e->next;
  if (!p->head) p->tail = NULL;
  p->in_flight--;
  lp_slice epoch, message;
  int64_t ts, seq;
  int rc = lp_redis_publish_reply(r, &epoch, &ts, &seq, &message);
  if (rc == 0) {
    p->published++;
    if (ts > p->floor) p->floor = ts; /* as Position:observe */
    return answer_success(e);
  }
  if (rc == 1 && !e->evaled && resend_by_text(p, e) == 0) return;
  answer_failed(p, e, message);
}

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf) {
  (void)suggested;
  publisher *p = ((pub_conn *)h)->p;
  if (lp_buf_reserve(&p->in, 65536) != 0) {
    *buf = uv_buf_init(NULL, 0);
    return;
  }
  *buf = uv_buf_init(p->in.data + p->in.len, (unsigned)(p->in.cap - p->in.len));
}

static void on_read(uv_stream_t *stream, ssize_t nread, const uv_buf_t *buf) {
  (void)buf;
  pub_conn *c = (pub_conn *)stream;
  publisher *p = c->p;
  if (p->conn != c) return;
  if (nread == UV_ENOBUFS) return lost(p, "out of memory");
  if (nread == UV_EOF) return lost(p, "Redis closed the connection");
  if (nread < 0) {
    char why[96];
    snprintf(why, sizeof why, "read error: %s", uv_err_name((int)nread));
    return lost(p, why);
  }
  p->in.len += (size_t)nread;
  size_t at = 0;
  while (at < p->in.len) {
    lp_resp_reply r;
    long n = lp_resp_read(p->in.data + at, p->in.len - at, &r);
    if (n == 0) break;
    if (n < 0) return lost(p, "protocol error");
    at += (size_t)n;
    if (c->handshake_left > 0) {
      if (r.type == LP_RESP_ERROR) return lost(p, "AUTH or SELECT refused");
      if (--c->handshake_left == 0) p->ready = 1;
    } else if (p->head) {
      settle(p, &r);            /* answers, which may run the next request of that client */
      if (p->conn != c) return; /* that closed the connection: in is gone */
    } else {
      return lost(p, "a reply nobody asked for");
    }
  }
  memmove(p->in.data, p->in.data + at, p->in.len - at);
  p->in.len -= at;
}

static void on_connected(uv_connect_t *req, int status) {
  pub_conn *c = CONTAINER(req, pub_conn, connect_req);
  publisher *p = c->p;
  if (p->conn != c) return;
  if (status < 0) {
    char why[160];
    snprintf(why, sizeof why, "cannot connect to %s:%d: %s", p->host, p->port, uv_err_name(status));
    return lost(p, why);
  }
  uv_tcp_nodelay(&c->tcp, 1);
  uv_tcp_keepalive(&c->tcp, 1, 10);
  int rc = uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read);
  if (rc == 0 && p->handshake_count > 0) rc = lp_buf_append(&p->out, p->handshake.data, p->handshake.len);
  if (rc != 0) return lost(p, "cannot read");
  c->handshake_left = p->handshake_count;
  if (c->handshake_left == 0)
    p->ready = 1;
  else
    flush_soon(p);
}

static void start_connect(publisher *p) {
  struct sockaddr_storage addr;
  if (uv_ip4_addr(p->host, p->port, (struct sockaddr_in *)&addr) != 0 &&
      uv_ip6_addr(p->host, p->port, (struct sockaddr_in6 *)&addr) != 0)
    return; /* a name, not an address: every publish stays Lua's */
  pub_conn *c = calloc(1, sizeof *c);
  if (!c) return;
  c->p = p;
  c->started_at = uv_now(p->loop);
  uv_tcp_init(p->loop, &c->tcp);
  c->tcp.data = &p->walk;
  uv_unref((uv_handle_t *)&c->tcp);
  p->handles++;
  p->conn = c;
  p->ready = 0;
  int rc = uv_tcp_connect(&c->connect_req, &c->tcp, (struct sockaddr *)&addr, on_connected);
  if (rc != 0) {
    char why[160];
    snprintf(why, sizeof why, "cannot connect to %s:%d: %s", p->host, p->port, uv_err_name(rc));
    lost(p, why);
  }
}

/* A reply overdue by command_timeout_ms (or a connection not made in connect_timeout_ms) means
 * Redis hangs or the network dropped us silently: give up on the connection. Without one (lost),
 * connect again, RETRY_MS after the last failure at the soonest. */
static void on_timer(uv_timer_t *t) {
  publisher *p = CONTAINER(t, publisher, timer);
  pub_conn *c = p->conn;
  uint64_t now = uv_now(p->loop);
  char why[192];
  if (c && !p->ready && now - c->started_at > p->connect_timeout_ms) {
    snprintf(why, sizeof why, "cannot connect to %s:%d within %llu ms", p->host, p->port,
             (unsigned long long)p->connect_timeout_ms);
    lost(p, why);
  } else if (p->head && now - p->head->sent_at > p->command_timeout_ms) {
    snprintf(why, sizeof why, "no reply within %llu ms", (unsigned long long)p->command_timeout_ms);
    lost(p, why);
  } else if (!c && p->wanted && !p->closed && now >= p->retry_at) {
    start_connect(p);
  }
}

/* ---------------------------------------------------------------------------------------------
 * The way in (lp_lua_native.c) */

static void *publisher_at(lua_State *L, int idx) { return publisher_of(L, idx); }

/* Hex of 8 random bytes: a 16-character epoch candidate (Position.epoch_candidate). */
static int epoch_candidate(char out[17]) {
  unsigned char r[8];
  if (lp_random_bytes(r, sizeof r) != 0) return -1;
  static const char hex[] = "0123456789abcdef";
  for (int i = 0; i < 8; i++) {
    out[2 * i] = hex[r[i] >> 4];
    out[2 * i + 1] = hex[r[i] & 15];
  }
  out[16] = 0;
  return 0;
}

int lp_lua_redis_publish_serve(sconn *s, native_route *r, const lp_http_event *head, lp_slice body) {
  server *srv = s->srv;
  publisher *p = lp_lua_native_route_object(srv, r, publisher_at);
  /* a connection above the cap may not wait for a reply: the Lua handler refuses it */
  if (!p || p->closed || s->publish_pending || s->reserve) return 0;
  if (!p->ready) {
    /* not connected: Lua publishes (or says Redis is unavailable) while a connection starts */
    if (!p->conn && p->wanted && uv_now(p->loop) >= p->retry_at) start_connect(p);
    return 0;
  }
  /* an idempotent publish (Idempotency-Key, issue 17) is the Lua handler's: it looks the key up */
  if (lp_lua_native_header(head, "idempotency-key", NULL).ptr) return 0;
  lp_publish_body pb;
  const char *err;
  if (lp_json_parse_publish(body.ptr ? body.ptr : "", body.len, &pb, &err) != 0) return 0;
  lp_slice category = {pb.category.data, pb.category.len};
  int ok = pb.has_category && category.len >= 1 && category.len <= r->h->limits.max_category_bytes && pb.has_data &&
           lp_utf8_is_valid(category.ptr, category.len);
  int allowed;
  char id[LP_UUID_LEN + 1], epoch[17];
  lp_buf *tail = &p->scratch;
  lp_buf_reset(tail);
  lp_slice data = {pb.data, pb.data_len};
  if (ok) ok = lp_lua_native_cors_lines(r->h, head, &srv->fast_extra, &allowed) == 0;
  if (ok) ok = lp_uuid_v4(id) == 0 && epoch_candidate(epoch) == 0;
  if (ok) ok = lp_redis_publish_tail(tail, &p->cfg, category, data, id, epoch, p->floor) == 0;
  size_t extra_len = srv->fast_extra.len;
  pub_entry *e = ok ? malloc(sizeof *e + extra_len + category.len + tail->len) : NULL;
  if (e) memcpy(e->bytes + extra_len, category.ptr, category.len);
  lp_buf_free(&pb.category);
  if (!e) return 0; /* the Lua handler answers (a bad request: its 400) */
  size_t before = p->out.len;
  if (lp_redis_publish_head(&p->out, 0, p->sha) != 0 || lp_buf_append(&p->out, tail->data, tail->len) != 0) {
    p->out.len = before;
    free(e);
    return 0;
  }
  memset(e, 0, sizeof *e);
  e->s = s;
  e->nh = r->h;
  e->sent_at = uv_now(p->loop);
  e->keep = head->keep_alive != 0;
  e->http10 = head->minor == 0;
  e->extra_len = extra_len;
  e->category_len = category.len;
  e->tail_len = tail->len;
  if (extra_len) memcpy(e->bytes, srv->fast_extra.data, extra_len);
  memcpy(e->bytes + extra_len + e->category_len, tail->data, tail->len);
  enqueue(p, e);
  s->publish_pending = e;
  if (tail->cap > (1u << 20)) lp_buf_free(tail);
  flush_soon(p);
  return 1;
}

void lp_lua_redis_publish_forget(sconn *s) {
  pub_entry *e = s->publish_pending;
  if (!e) return;
  e->s = NULL; /* the reply frees it; the event may be stored, as on the Lua path */
  s->publish_pending = NULL;
}

/* ---------------------------------------------------------------------------------------------
 * The publisher's Lua API */

static publisher *check_publisher(lua_State *L) {
  publisher *p = publisher_of(L, 1);
  luaL_argcheck(L, p != NULL && !p->closed, 1, "an open Redis publisher expected");
  return p;
}

static const char *opt_string(lua_State *L, int t, const char *k, size_t *len) {
  lua_getfield(L, t, k);
  const char *s = lua_isnil(L, -1) ? NULL : luaL_checklstring(L, -1, len);
  lua_pop(L, 1); /* still referenced by the options table */
  return s;
}

static int64_t opt_int(lua_State *L, int t, const char *k, int64_t min) {
  lua_getfield(L, t, k);
  int ok;
  lua_Integer v = lua_tointegerx(L, -1, &ok);
  if (!ok || v < min) luaL_error(L, "option '%s' must be an integer of at least %d", k, (int)min);
  lua_pop(L, 1);
  return (int64_t)v;
}

static void on_handle_closed(uv_handle_t *h) { handle_closed(CONTAINER(h->data, publisher, walk)); }

/* core.redis_publisher{ prefix, script, max_event_buffer_size, ttl_ms, connect_timeout_ms,
 *   command_timeout_ms[, user, password, db, log] } -> publisher. prefix: the shard's key prefix
 * (keys P.."clock", P.."s:"..category, P.."d:"..category, channel P.."events"); script: the
 * publish script's text. It connects once told where (publisher:connect). */
static int l_redis_publisher(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  uv_loop_t *loop = luv_loop(L);
  if (!loop) return luaL_error(L, "luv is not loaded");
  size_t plen, slen, ulen = 0, pwlen = 0;
  const char *prefix = opt_string(L, 1, "prefix", &plen);
  const char *script = opt_string(L, 1, "script", &slen);
  const char *user = opt_string(L, 1, "user", &ulen);
  const char *password = opt_string(L, 1, "password", &pwlen);
  luaL_argcheck(L, prefix && script, 1, "prefix and script are required");
  int64_t size = opt_int(L, 1, "max_event_buffer_size", 1), ttl = opt_int(L, 1, "ttl_ms", 0);
  int64_t connect_ms = opt_int(L, 1, "connect_timeout_ms", 1), command_ms = opt_int(L, 1, "command_timeout_ms", 1);
  lua_getfield(L, 1, "db");
  lua_Integer db = luaL_optinteger(L, -1, 0);
  lua_pop(L, 1);
  publisher **box = lua_newuserdatauv(L, sizeof *box, 0);
  *box = NULL;
  luaL_setmetatable(L, PUBLISHER_MT);
  publisher *p = calloc(1, sizeof *p);
  if (!p) return luaL_error(L, "out of memory");
  *box = p;
  p->box = box;
  p->closed = 1; /* until it is whole */
  p->walk.ref = p->walk.callbacks[0] = p->walk.callbacks[1] = LUA_NOREF;
  p->walk.ctx = luv_context(L);
  p->log_ref = LUA_NOREF;
  lua_rawgeti(L, LUA_REGISTRYINDEX, LUA_RIDX_MAINTHREAD);
  p->L = lua_tothread(L, -1);
  lua_pop(L, 1);
  lua_getfield(L, 1, "log");
  if (lua_isfunction(L, -1))
    p->log_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  else
    lua_pop(L, 1);
  p->loop = loop;
  /* the strings: clock key, stream prefix, dropped prefix, channel, script */
  size_t total = 4 * plen + 16 + slen;
  p->strings = malloc(total);
  if (!p->strings) return luaL_error(L, "out of memory");
  char *at = p->strings;
#define KEEP(field, a, alen, b)      \
  do {                               \
    memcpy(at, a, alen);             \
    memcpy(at + alen, b, strlen(b)); \
    field.ptr = at;                  \
    field.len = alen + strlen(b);    \
    at += field.len;                 \
  } while (0)
  KEEP(p->cfg.clock_key, prefix, plen, "clock");
  KEEP(p->cfg.stream_prefix, prefix, plen, "s:");
  KEEP(p->cfg.dropped_prefix, prefix, plen, "d:");
  KEEP(p->cfg.channel, prefix, plen, "events");
  KEEP(p->script, script, slen, "");
#undef KEEP
  p->cfg.max_event_buffer_size = size;
  p->cfg.ttl_ms = ttl;
  p->connect_timeout_ms = (uint64_t)connect_ms;
  p->command_timeout_ms = (uint64_t)command_ms;
  if (password) {
    lp_slice argv[3] = {cstr("AUTH"), {user, ulen}, {password, pwlen}};
    if (!user) argv[1] = argv[2];
    if (lp_resp_append_command(&p->handshake, user ? 3 : 2, argv) != 0) return luaL_error(L, "out of memory");
    p->handshake_count++;
  }
  if (db != 0) {
    char digits[24];
    snprintf(digits, sizeof digits, "%lld", (long long)db);
    lp_slice argv[2] = {cstr("SELECT"), cstr(digits)};
    if (lp_resp_append_command(&p->handshake, 2, argv) != 0) return luaL_error(L, "out of memory");
    p->handshake_count++;
  }
  publisher **shadow = lua_newuserdatauv(L, sizeof *shadow, 0);
  *shadow = p;
  p->shadow = shadow;
  luaL_setmetatable(L, PUBLISHER_SHADOW_MT);
  p->walk.ref = luaL_ref(L, LUA_REGISTRYINDEX);
  uv_timer_init(loop, &p->timer);
  p->timer.data = &p->walk;
  uint64_t period = command_ms / 4 < 20 ? 20 : command_ms / 4 > 1000 ? 1000 : (uint64_t)command_ms / 4;
  uv_timer_start(&p->timer, on_timer, period, period);
  uv_unref((uv_handle_t *)&p->timer);
  uv_prepare_init(loop, &p->flusher);
  p->flusher.data = &p->walk;
  uv_unref((uv_handle_t *)&p->flusher);
  p->handles = 2;
  p->closed = 0;
  return 1;
}

/* publisher:connect(host, port, sha): where the shard's master is now (the engine's link reached
 * it and synced) and the SHA it gave the publish script. Connects, unless connected there
 * already; a new place drops the old connection (its publishes in flight fail). */
static int publisher_connect(lua_State *L) {
  publisher *p = check_publisher(L);
  const char *host = luaL_checkstring(L, 2);
  lua_Integer port = luaL_checkinteger(L, 3);
  size_t shalen;
  const char *sha = luaL_checklstring(L, 4, &shalen);
  luaL_argcheck(L, port >= 1 && port <= 65535, 3, "port must be 1 to 65535");
  luaL_argcheck(L, shalen == 40, 4, "a SHA1 in hex expected");
  memcpy(p->sha_text, sha, 41);
  p->sha.ptr = p->sha_text;
  p->sha.len = 40;
  int same = p->port == port && strcmp(p->host, host) == 0;
  if (same && p->conn) {
    p->wanted = 1;
    return 0;
  }
  if (p->conn) drop_conn(p, "", "Redis master moved");
  snprintf(p->host, sizeof p->host, "%s", host);
  p->port = (int)port;
  p->wanted = 1;
  start_connect(p);
  return 0;
}

/* publisher:disconnect(reason): the engine lost its link to the master (a failover, Redis away):
 * the connection goes (publishes in flight fail with "Redis connection lost: <reason>") and
 * publishes take the Lua path until publisher:connect again. */
static int publisher_disconnect(lua_State *L) {
  publisher *p = check_publisher(L);
  const char *reason = luaL_checkstring(L, 2);
  p->wanted = 0;
  if (p->conn) lost(p, reason);
  return 0;
}

/* publisher:raise_floor(T): later publishes get timestamps of at least T (Position's floor). */
static int publisher_raise_floor(lua_State *L) {
  publisher *p = check_publisher(L);
  lua_Integer T = luaL_checkinteger(L, 2);
  if (T > p->floor) p->floor = T;
  return 0;
}

/* publisher:stats() -> { published =, failed =, in_flight =, connected = } */
static int publisher_stats(lua_State *L) {
  publisher **box = luaL_checkudata(L, 1, PUBLISHER_MT);
  publisher *p = *box;
  lua_createtable(L, 0, 4);
  lua_pushinteger(L, p ? (lua_Integer)p->published : 0);
  lua_setfield(L, -2, "published");
  lua_pushinteger(L, p ? (lua_Integer)p->failed : 0);
  lua_setfield(L, -2, "failed");
  lua_pushinteger(L, p ? (lua_Integer)p->in_flight : 0);
  lua_setfield(L, -2, "in_flight");
  lua_pushboolean(L, p && p->ready);
  lua_setfield(L, -2, "connected");
  return 1;
}

/* Closes the connection (publishes in flight get the Lua handler's "Redis connection closed"
 * failure) and the handles; idempotent. */
static void close_publisher(publisher *p) {
  if (p->closed) return;
  p->closed = 1;
  drop_conn(p, "", "Redis connection closed");
  lp_buf_free(&p->out);
  lp_buf_free(&p->in);
  lp_buf_free(&p->scratch);
  uv_close((uv_handle_t *)&p->timer, on_handle_closed);
  uv_close((uv_handle_t *)&p->flusher, on_handle_closed);
  if (p->shadow) *p->shadow = NULL;
  p->shadow = NULL;
}

/* publisher:close() */
static int publisher_close(lua_State *L) {
  publisher **box = luaL_checkudata(L, 1, PUBLISHER_MT);
  if (*box) close_publisher(*box);
  return 0;
}

static int publisher_gc(lua_State *L) {
  publisher **box = luaL_checkudata(L, 1, PUBLISHER_MT);
  publisher *p = *box;
  if (!p) return 0;
  *box = NULL;
  close_publisher(p);
  luaL_unref(L, LUA_REGISTRYINDEX, p->walk.ref);
  p->walk.ref = LUA_NOREF;
  luaL_unref(L, LUA_REGISTRYINDEX, p->log_ref);
  p->log_ref = LUA_NOREF;
  p->box = NULL;
  p->handles++; /* released at once when no handle is still closing */
  handle_closed(p);
  return 0;
}

int lp_lua_redis_publisher_check(lua_State *L, int idx) { return publisher_of(L, idx) != NULL; }

/* core.redis_event(payload) -> epoch, seq, timestamp, category, id, data_json, json | nil: an
 * event message of the shard's pub/sub channel read in one call, with the event's JSON made
 * (lp_event_json_append, the one format); nil when the payload is not a valid event message. */
static int l_redis_event(lua_State *L) {
  size_t len;
  const char *payload = luaL_checklstring(L, 1, &len);
  lp_redis_event ev;
  if (lp_redis_event_parse(payload, len, &ev) != 0) {
    luaL_pushfail(L);
    return 1;
  }
  char id[LP_UUID_LEN + 1];
  memcpy(id, ev.id.ptr, LP_UUID_LEN);
  id[LP_UUID_LEN] = 0;
  lp_buf json = LP_BUF_INIT;
  if (lp_event_json_append(&json, ev.category, ev.data_json, id, ev.ts) != LP_OK) {
    lp_buf_free(&json);
    return luaL_error(L, "out of memory");
  }
  lua_pushlstring(L, ev.epoch.ptr, ev.epoch.len);
  lua_pushinteger(L, (lua_Integer)ev.seq);
  lua_pushinteger(L, (lua_Integer)ev.ts);
  lua_pushlstring(L, ev.category.ptr, ev.category.len);
  lua_pushlstring(L, id, LP_UUID_LEN);
  lua_pushlstring(L, ev.data_json.ptr, ev.data_json.len);
  lua_pushlstring(L, json.data, json.len); /* cannot raise after the others: memory errors aside */
  lp_buf_free(&json);
  return 7;
}

/* What uv.walk hands to Lua for the publisher's handles. */
static int shadow_get_type(lua_State *L) {
  lua_pushliteral(L, "longpoll_redis_publisher");
  return 1;
}
static int shadow_is_closing(lua_State *L) {
  publisher **p = luaL_checkudata(L, 1, PUBLISHER_SHADOW_MT);
  lua_pushboolean(L, *p == NULL || (*p)->closed);
  return 1;
}
static int shadow_is_active(lua_State *L) {
  publisher **p = luaL_checkudata(L, 1, PUBLISHER_SHADOW_MT);
  lua_pushboolean(L, *p != NULL);
  return 1;
}

static const luaL_Reg publisher_methods[] = {
    {"connect", publisher_connect}, {"disconnect", publisher_disconnect}, {"raise_floor", publisher_raise_floor},
    {"stats", publisher_stats},     {"close", publisher_close},           {NULL, NULL}};
static const luaL_Reg shadow_methods[] = {
    {"get_type", shadow_get_type}, {"is_closing", shadow_is_closing}, {"is_active", shadow_is_active}, {NULL, NULL}};

void lp_lua_redis_publish_open(lua_State *L) {
  if (luaL_newmetatable(L, PUBLISHER_MT)) {
    luaL_newlib(L, publisher_methods);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, publisher_gc);
    lua_setfield(L, -2, "__gc");
  }
  lua_pop(L, 1);
  if (luaL_newmetatable(L, PUBLISHER_SHADOW_MT)) {
    luaL_newlib(L, shadow_methods);
    lua_setfield(L, -2, "__index");
  }
  lua_pop(L, 1);
  lua_pushcfunction(L, l_redis_publisher);
  lua_setfield(L, -2, "redis_publisher");
  lua_pushcfunction(L, l_redis_event);
  lua_setfield(L, -2, "redis_event");
}
