/* loadgen: a libuv load generator for the benchmarks (bench/run). It speaks
 * longpoll's golongpoll API and Nchan's long-poll API, keeps many connections
 * in one process, and reports its own CPU use so a run can show that the
 * generator was not the bottleneck. One scenario per invocation; the result
 * is one JSON line on stdout, progress goes to stderr.
 *
 *   loadgen hold    --proto lp|nchan --port P --n N --cats C --pid SERVER_PID
 *   loadgen churn   --proto .. --port P --subs 1000 --cats 4 --rate 100 --duration 10 --pid PID
 *   loadgen catchup --proto .. --port P --conns 8 --duration 5
 *   loadgen publish --proto .. --port P --conns 8 --duration 5 [--idempotency-keys 1]
 * --port2 P2 (hold, churn): every other subscriber connects to a second server on P2 (two nodes
 * sharing events through Redis); publishers stay on P.
 *
 * Every phase has a deadline, so a run always ends. Only --host (default
 * 127.0.0.1) is ever connected to. */
#include <ctype.h>
#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/resource.h>
#include <unistd.h>
#include <uv.h>

enum { PROTO_LP, PROTO_NCHAN };
enum { MODE_HOLD, MODE_CHURN, MODE_CATCHUP, MODE_PUBLISH };
enum { ROLE_SUB, ROLE_PUB, ROLE_LOOP };

#define MAX_INFLIGHT_CONNECTS 256
#define WBUF 1024
#define MAX_CATS 64

typedef struct conn conn;
struct conn {
  uv_tcp_t tcp;
  uv_connect_t creq;
  uv_write_t wreq;
  int id, cat, role;
  int open, busy, wrote, busy_sse;
  char wbuf[WBUF];
  char *rbuf;
  size_t rlen, rcap;
  /* response being parsed */
  size_t head_len;
  long content_len;
  int chunked, status, head_done;
  /* cursor: ours (since/last_id) and Nchan's (Last-Modified/Etag) */
  int64_t since;
  char last_id[40];
  char lastmod[64], etag[64];
  int64_t expected; /* churn: next seq expected from this subscriber's category */
  /* churn publisher: queue of scheduled events */
  int64_t *q_seq;
  uint64_t *q_t;
  size_t q_head, q_tail, q_cap;
};

static struct {
  int mode, proto, port, port2, n, cats, pid, conns, timeout_s;
  double duration, rate;
  const char *host, *prefix;
  const char *path;   /* our subscribe path (default /events) */
  const char *header; /* an extra header line for our subscribes ("" for none) */
  int sse;            /* hold: the subscribers are SSE streams, answered by their first "data:" */
  uv_loop_t *loop;
  struct sockaddr_in addr, addr2;
  conn **subs;
  conn *pubs[MAX_CATS];
  int nsubs, next_connect, inflight, connected, written, connect_errors, io_errors, early;
  int answered, phase;
  uint64_t t_start, t_written, t_pub[MAX_CATS], t_first_pub, t_last_answer;
  uint32_t *lat;
  size_t nlat, lat_cap;
  long rss_base_kb, rss_held_kb;
  /* settle */
  uv_timer_t settle_timer, deadline_timer, tick_timer;
  long last_ticks;
  int idle_rounds, settle_rounds;
  void (*after_settle)(void);
  /* churn */
  int64_t pubseq[MAX_CATS];
  uint64_t churn_t0, churn_end;
  int64_t scheduled;
  long gaps, dups, missed_flags, deliveries, timeouts_seen;
  long ticks0, ticks1;
  uint64_t tick_t0, tick_t1;
  size_t max_queue;
  /* loops */
  long done_reqs, bad_reqs;
  int measuring;
  uint64_t m_t0, m_t1;
  struct rusage ru0, ru1;
  uint64_t wall0, wall1;
  int idempotency_keys; /* --idempotency-keys: every publish carries a fresh Idempotency-Key */
  unsigned long key_seq;
} G;

static uint64_t now_us(void) { return uv_hrtime() / 1000; }

static void die(const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  fprintf(stderr, "loadgen: ");
  vfprintf(stderr, fmt, ap);
  fprintf(stderr, "\n");
  va_end(ap);
  exit(2);
}

static void progress(const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  fprintf(stderr, "  [loadgen] ");
  vfprintf(stderr, fmt, ap);
  fprintf(stderr, "\n");
  va_end(ap);
}

/* ---------------------------------------------------------------- /proc */

static long proc_rss_kb(int pid) {
  char path[64], line[256];
  snprintf(path, sizeof path, "/proc/%d/status", pid);
  FILE *f = fopen(path, "r");
  if (!f) return -1;
  long kb = -1;
  while (fgets(line, sizeof line, f))
    if (!strncmp(line, "VmRSS:", 6)) kb = strtol(line + 6, NULL, 10);
  fclose(f);
  return kb;
}

/* utime + stime of the process, in clock ticks */
static long proc_cpu_ticks(int pid) {
  char path[64], buf[1024];
  snprintf(path, sizeof path, "/proc/%d/stat", pid);
  FILE *f = fopen(path, "r");
  if (!f) return -1;
  size_t n = fread(buf, 1, sizeof buf - 1, f);
  fclose(f);
  buf[n] = 0;
  char *p = strrchr(buf, ')');
  if (!p) return -1;
  /* after ") ": field 3 (state) ... utime is field 14, stime 15 */
  int field = 2;
  unsigned long ut = 0, st = 0;
  for (char *tok = strtok(p + 1, " "); tok; tok = strtok(NULL, " ")) {
    field++;
    if (field == 14) ut = strtoul(tok, NULL, 10);
    if (field == 15) {
      st = strtoul(tok, NULL, 10);
      break;
    }
  }
  return (long)(ut + st);
}

/* ---------------------------------------------------------------- latency */

static void lat_add(uint64_t us) {
  if (G.nlat == G.lat_cap) {
    G.lat_cap = G.lat_cap ? G.lat_cap * 2 : 65536;
    G.lat = realloc(G.lat, G.lat_cap * sizeof *G.lat);
    if (!G.lat) die("out of memory");
  }
  G.lat[G.nlat++] = us > UINT32_MAX ? UINT32_MAX : (uint32_t)us;
}

static int cmp_u32(const void *a, const void *b) {
  uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
  return x < y ? -1 : x > y;
}

static double lat_pct_ms(double p) {
  if (!G.nlat) return -1;
  size_t i = (size_t)(p * (double)(G.nlat - 1) + 0.5);
  return G.lat[i] / 1000.0;
}

/* ---------------------------------------------------------------- connections */

static void on_close_free(uv_handle_t *h) {
  conn *c = h->data;
  if (c->role == ROLE_PUB) {
    if (G.pubs[c->cat] == c) G.pubs[c->cat] = NULL;
  } else if (G.subs && G.subs[c->id] == c) {
    G.subs[c->id] = NULL;
  }
  free(c->rbuf);
  free(c->q_seq);
  free(c->q_t);
  free(c);
}

static void conn_close(conn *c) {
  if (!c->open) return;
  c->open = 0;
  uv_close((uv_handle_t *)&c->tcp, on_close_free);
}

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf) {
  conn *c = h->data;
  (void)suggested;
  if (c->rcap - c->rlen < 16384) {
    size_t cap = c->rcap ? c->rcap * 2 : 16384;
    while (cap - c->rlen < 16384) cap *= 2;
    char *r = realloc(c->rbuf, cap + 1);
    if (!r) die("out of memory");
    c->rbuf = r;
    c->rcap = cap;
  }
  buf->base = c->rbuf + c->rlen;
  buf->len = c->rcap - c->rlen;
}

static void on_response(conn *c, const char *body, size_t len);
static void on_written(uv_write_t *w, int status);
static void finish_hold(void);

static void conn_send(conn *c, size_t len) {
  uv_buf_t b = uv_buf_init(c->wbuf, (unsigned)len);
  c->busy = 1;
  int rc = uv_write(&c->wreq, (uv_stream_t *)&c->tcp, &b, 1, on_written);
  if (rc) {
    G.io_errors++;
    conn_close(c);
  }
}

/* A request for this connection's role, written into c->wbuf. */
static size_t build_subscribe(conn *c, const char *cat) {
  if (G.sse)
    return (size_t)snprintf(c->wbuf, WBUF,
                            G.proto == PROTO_LP
                                ? "GET /sse?category=%s HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n"
                                : "GET /sse?id=%s HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n",
                            cat);
  if (G.proto == PROTO_LP) {
    if (c->since >= 0 && c->last_id[0])
      return (size_t)snprintf(c->wbuf, WBUF,
                              "GET %s?category=%s&timeout=%d&since_time=%" PRId64
                              "&last_id=%s HTTP/1.1\r\nHost: 127.0.0.1\r\n%s\r\n",
                              G.path, cat, G.timeout_s, c->since, c->last_id, G.header);
    if (c->since >= 0)
      return (size_t)snprintf(c->wbuf, WBUF,
                              "GET %s?category=%s&timeout=%d&since_time=%" PRId64
                              " HTTP/1.1\r\nHost: 127.0.0.1\r\n%s\r\n",
                              G.path, cat, G.timeout_s, c->since, G.header);
    return (size_t)snprintf(c->wbuf, WBUF, "GET %s?category=%s&timeout=%d HTTP/1.1\r\nHost: 127.0.0.1\r\n%s\r\n",
                            G.path, cat, G.timeout_s, G.header);
  }
  if (c->lastmod[0])
    return (size_t)snprintf(c->wbuf, WBUF,
                            "GET /sub?id=%s HTTP/1.1\r\nHost: 127.0.0.1\r\nIf-Modified-Since: %s\r\n"
                            "If-None-Match: %s\r\n\r\n",
                            cat, c->lastmod, c->etag);
  return (size_t)snprintf(c->wbuf, WBUF, "GET /sub?id=%s HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", cat);
}

static size_t build_publish(conn *c, const char *cat, const char *data) {
  char body[256];
  int blen;
  if (G.proto == PROTO_LP) {
    blen = snprintf(body, sizeof body, "{\"category\":\"%s\",\"data\":\"%s\"}", cat, data);
    char key[64] = "";
    if (G.idempotency_keys) snprintf(key, sizeof key, "Idempotency-Key: lg-%d-%lu\r\n", (int)getpid(), ++G.key_seq);
    return (size_t)snprintf(c->wbuf, WBUF,
                            "POST /publish HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                            "%sContent-Length: %d\r\n\r\n%s",
                            key, blen, body);
  }
  blen = (int)strlen(data);
  return (size_t)snprintf(c->wbuf, WBUF,
                          "POST /pub?id=%s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: text/plain\r\n"
                          "Content-Length: %d\r\n\r\n%s",
                          cat, blen, data);
}

static void cat_name(int cat, char *out, size_t n) { snprintf(out, n, "%s%d", G.prefix, cat); }

/* Response parsing: head, then Content-Length or chunked body. */
static int header_is(const char *line, size_t llen, const char *name, const char **val, size_t *vlen) {
  size_t n = strlen(name);
  if (llen <= n || strncasecmp(line, name, n) || line[n] != ':') return 0;
  const char *v = line + n + 1, *end = line + llen;
  while (v < end && (*v == ' ' || *v == '\t')) v++;
  while (end > v && (end[-1] == ' ' || end[-1] == '\t')) end--;
  *val = v;
  *vlen = (size_t)(end - v);
  return 1;
}

static void parse_head(conn *c) {
  const char *p = c->rbuf, *end = c->rbuf + c->head_len;
  c->status = atoi(p + 9);
  c->content_len = -1;
  c->chunked = 0;
  const char *line = memchr(p, '\n', (size_t)(end - p));
  line = line ? line + 1 : end;
  while (line < end) {
    const char *nl = memchr(line, '\n', (size_t)(end - line));
    if (!nl) break;
    size_t llen = (size_t)(nl - line);
    if (llen && line[llen - 1] == '\r') llen--;
    const char *v;
    size_t vlen;
    if (header_is(line, llen, "content-length", &v, &vlen))
      c->content_len = strtol(v, NULL, 10);
    else if (header_is(line, llen, "transfer-encoding", &v, &vlen))
      c->chunked = vlen >= 7 && !strncasecmp(v, "chunked", 7);
    else if (header_is(line, llen, "last-modified", &v, &vlen) && vlen < sizeof c->lastmod) {
      memcpy(c->lastmod, v, vlen);
      c->lastmod[vlen] = 0;
    } else if (header_is(line, llen, "etag", &v, &vlen) && vlen < sizeof c->etag) {
      memcpy(c->etag, v, vlen);
      c->etag[vlen] = 0;
    }
    line = nl + 1;
  }
  if (c->status < 200 || c->status == 204 || c->status == 304) c->content_len = c->content_len < 0 ? 0 : c->content_len;
}

/* Decodes a complete chunked body in place; returns total consumed or 0 if incomplete. */
static size_t dechunk(conn *c, size_t *body_len) {
  char *p = c->rbuf + c->head_len, *end = c->rbuf + c->rlen, *out = p;
  /* first pass: is the body complete? (decoding in place must not start before) */
  for (char *q = p;;) {
    char *nl = memchr(q, '\n', (size_t)(end - q));
    if (!nl) return 0;
    long size = strtol(q, NULL, 16);
    if (size == 0) {
      if (!memchr(nl + 1, '\n', (size_t)(end - nl - 1))) return 0;
      break;
    }
    if (end - (nl + 1) < size + 2) return 0;
    q = nl + 1 + size + 2;
  }
  for (;;) {
    char *nl = memchr(p, '\n', (size_t)(end - p));
    if (!nl) return 0;
    long size = strtol(p, NULL, 16);
    char *data = nl + 1;
    if (size == 0) {
      char *fin = memchr(data, '\n', (size_t)(end - data)); /* the final CRLF (no trailers sent) */
      if (!fin) return 0;
      *body_len = (size_t)(out - (c->rbuf + c->head_len));
      return (size_t)(fin + 1 - c->rbuf);
    }
    if (end - data < size + 2) return 0;
    memmove(out, data, (size_t)size);
    out += size;
    p = data + size + 2;
  }
}

static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf) {
  conn *c = s->data;
  (void)buf;
  if (nread < 0) {
    if (G.phase < 3) {
      G.io_errors++;
      if (G.io_errors <= 3) progress("connection %d lost: %s", c->id, uv_strerror((int)nread));
    }
    conn_close(c);
    return;
  }
  c->rlen += (size_t)nread;
  if (G.sse && c->role == ROLE_SUB) {
    /* a stream: answered by its first "data:" line; earlier bytes (head, retry, comments) only
     * need to end in a way that lets a "data:" split across reads be found */
    c->rbuf[c->rlen] = 0;
    if (!c->busy_sse && strstr(c->rbuf, "data:")) {
      c->busy_sse = 1;
      uint64_t now = now_us();
      if (G.phase < 2) {
        G.early++;
      } else {
        uint64_t t0 = G.t_pub[c->cat];
        lat_add(now > t0 ? now - t0 : 0);
        G.answered++;
        G.t_last_answer = now;
        if (G.answered + G.bad_reqs >= G.nsubs - G.connect_errors - G.io_errors - G.early || G.answered >= G.nsubs)
          finish_hold();
        return;
      }
    }
    if (c->rlen > 8) {
      memmove(c->rbuf, c->rbuf + c->rlen - 8, 8);
      c->rlen = 8;
    }
    return;
  }
  /* a response may arrive in several reads; there is never more than one in flight */
  for (;;) {
    if (!c->head_done) {
      c->rbuf[c->rlen] = 0;
      char *e = strstr(c->rbuf, "\r\n\r\n");
      if (!e) return;
      c->head_len = (size_t)(e + 4 - c->rbuf);
      c->head_done = 1;
      parse_head(c);
    }
    size_t total, body_len;
    if (c->chunked) {
      total = dechunk(c, &body_len);
      if (!total) return;
    } else {
      long cl = c->content_len < 0 ? 0 : c->content_len;
      if (c->rlen < c->head_len + (size_t)cl) return;
      body_len = (size_t)cl;
      total = c->head_len + (size_t)cl;
    }
    char saved = c->rbuf[c->head_len + body_len];
    c->rbuf[c->head_len + body_len] = 0;
    c->head_done = 0;
    size_t rest = c->rlen - total;
    /* copy the body out: the handler may send at once and reuse the buffer */
    char body_stack[4096];
    char *body = body_len < sizeof body_stack ? body_stack : malloc(body_len + 1);
    memcpy(body, c->rbuf + c->head_len, body_len + 1);
    (void)saved;
    if (rest) memmove(c->rbuf, c->rbuf + total, rest);
    c->rlen = rest;
    c->busy = 0;
    on_response(c, body, body_len);
    if (body != body_stack) free(body);
    if (!c->open || !rest) return;
  }
}

static void on_written(uv_write_t *w, int status) {
  conn *c = (conn *)((char *)w - offsetof(conn, wreq));
  if (status) {
    G.io_errors++;
    conn_close(c);
    return;
  }
  if (c->role == ROLE_SUB && !c->wrote) {
    c->wrote = 1;
    G.written++;
    if (G.written == G.nsubs) {
      G.t_written = now_us();
      progress("%d subscribers connected and waiting (%.2f s); settling", G.nsubs, (G.t_written - G.t_start) / 1e6);
      G.phase = 1;
    }
  }
}

static conn *conn_new(int id, int role, int cat) {
  conn *c = calloc(1, sizeof *c);
  if (!c) die("out of memory");
  c->id = id;
  c->role = role;
  c->cat = cat;
  /* churn starts from the beginning of a fresh category: no race with the first publish */
  c->since = (G.mode == MODE_CHURN && role == ROLE_SUB) ? 0 : -1;
  c->tcp.data = c;
  uv_tcp_init(G.loop, &c->tcp);
  c->open = 1;
  return c;
}

static void start_request(conn *c);

static void on_connect(uv_connect_t *req, int status) {
  conn *c = req->data;
  if (c->role == ROLE_SUB) G.inflight--;
  if (status < 0) {
    if (c->role == ROLE_PUB) die("publisher cannot connect: %s", uv_strerror(status));
    G.connect_errors++;
    if (G.connect_errors <= 5) progress("connect failed: %s", uv_strerror(status));
    conn_close(c);
    return;
  }
  G.connected++;
  uv_tcp_nodelay(&c->tcp, 1);
  uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read);
  start_request(c);
}

static void conn_connect(conn *c) {
  c->creq.data = c;
  const struct sockaddr_in *to = (G.port2 && c->role == ROLE_SUB && (c->id & 1)) ? &G.addr2 : &G.addr;
  int rc = uv_tcp_connect(&c->creq, &c->tcp, (const struct sockaddr *)to, on_connect);
  if (rc) {
    G.connect_errors++;
    if (G.connect_errors <= 5) progress("connect: %s", uv_strerror(rc));
    conn_close(c);
    if (c->role == ROLE_SUB) G.inflight--;
  }
}

static void connect_more(void) {
  while (G.inflight < MAX_INFLIGHT_CONNECTS && G.next_connect < G.nsubs) {
    int i = G.next_connect++;
    conn *c = conn_new(i, ROLE_SUB, i % G.cats);
    G.subs[i] = c;
    G.inflight++;
    conn_connect(c);
  }
}

/* ---------------------------------------------------------------- scenario logic */

static void send_subscribe(conn *c) {
  char cat[64];
  cat_name(c->cat, cat, sizeof cat);
  conn_send(c, build_subscribe(c, cat));
}

static void pub_send_next(conn *c);
static void hold_send(int k);

static void start_request(conn *c) {
  switch (c->role) {
    case ROLE_SUB:
      send_subscribe(c);
      connect_more();
      break;
    case ROLE_PUB:
      if (G.mode == MODE_HOLD && G.phase == 2) hold_send(c->cat);
      if (G.mode == MODE_CHURN) pub_send_next(c);
      if (G.mode == MODE_CATCHUP) {
        char cat[64];
        cat_name(0, cat, sizeof cat);
        conn_send(c, build_publish(c, cat, "catch-up-event-payload"));
      }
      break;
    case ROLE_LOOP: {
      char cat[64];
      if (G.mode == MODE_CATCHUP) {
        cat_name(0, cat, sizeof cat);
        /* no cursor: every request asks for the whole buffer, the one event published first */
        if (G.proto == PROTO_LP) c->since = 0;
        c->lastmod[0] = 0;
        send_subscribe(c);
      } else {
        cat_name(c->id % 8, cat, sizeof cat);
        conn_send(c, build_publish(c, cat, "benchmark-event-payload-0123456789"));
      }
      break;
    }
  }
}

/* Parses our events answer: calls fn(seq, t_us) per event and leaves the
 * cursor of the last event in c. Returns the number of events; -1 for a
 * timeout answer (cursor from its timestamp), -2 for anything else. */
static int parse_lp_events(conn *c, const char *body, void (*fn)(conn *, int64_t, uint64_t)) {
  if (strstr(body, "\"events\":[") == NULL) {
    const char *t = strstr(body, "\"timeout\":");
    if (!t) return -2;
    const char *ts = strstr(body, "\"timestamp\":");
    if (ts) {
      c->since = strtoll(ts + 12, NULL, 10);
      c->last_id[0] = 0;
    }
    return -1;
  }
  if (strstr(body, "\"missed\":true")) G.missed_flags++;
  int n = 0;
  const char *p = body;
  while ((p = strstr(p, "{\"timestamp\":")) != NULL) {
    int64_t ts = strtoll(p + 13, NULL, 10);
    const char *d = strstr(p, "\"data\":\"");
    const char *id = strstr(p, "\"id\":\"");
    if (!d || !id) return -2;
    char *endp;
    int64_t seq = strtoll(d + 8, &endp, 10);
    uint64_t t = *endp == ':' ? strtoull(endp + 1, NULL, 10) : 0;
    c->since = ts;
    memcpy(c->last_id, id + 6, 36);
    c->last_id[36] = 0;
    if (fn) fn(c, seq, t);
    n++;
    p = id + 6 + 36;
  }
  return n;
}

static void churn_delivery(conn *c, int64_t seq, uint64_t t) {
  uint64_t now = now_us();
  G.deliveries++;
  if (t) lat_add(now > t ? now - t : 0);
  if (seq == c->expected) {
    c->expected++;
  } else if (seq > c->expected) {
    G.gaps += seq - c->expected;
    c->expected = seq + 1;
  } else {
    G.dups++;
  }
}

static void finish_hold(void);
static void finish_churn_check(void);

static void on_response(conn *c, const char *body, size_t len) {
  uint64_t now = now_us();
  if (c->role == ROLE_PUB) {
    if (c->status < 200 || c->status > 299) {
      G.bad_reqs++;
      if (G.bad_reqs <= 3) progress("publish answered %d: %.*s", c->status, (int)(len > 200 ? 200 : len), body);
    }
    if (G.mode == MODE_CHURN)
      pub_send_next(c);
    else if (G.mode == MODE_CATCHUP && G.phase == 0) {
      G.phase = 1; /* the one event is buffered: start the loops */
    }
    return;
  }
  if (c->role == ROLE_LOOP) {
    int ok = c->status >= 200 && c->status <= 299;
    if (ok && G.mode == MODE_CATCHUP) {
      ok = G.proto == PROTO_LP ? strstr(body, "\"events\":[") != NULL : len > 0;
    }
    if (G.measuring) {
      if (ok)
        G.done_reqs++;
      else
        G.bad_reqs++;
    }
    if (!ok && G.bad_reqs <= 3 && G.measuring)
      progress("unexpected answer %d: %.*s", c->status, (int)(len > 200 ? 200 : len), body);
    if (G.phase >= 3) return; /* measurement over: stop sending */
    start_request(c);
    return;
  }
  /* subscriber */
  if (G.mode == MODE_HOLD) {
    if (G.phase < 2) {
      G.early++;
      if (G.early <= 3) progress("early answer %d: %.*s", c->status, (int)(len > 200 ? 200 : len), body);
      conn_close(c);
      return;
    }
    int ok = c->status == 200 && (G.proto == PROTO_LP ? strstr(body, "\"events\":[") != NULL : len > 0);
    if (!ok) G.bad_reqs++;
    uint64_t t0 = G.t_pub[c->cat];
    lat_add(now > t0 ? now - t0 : 0);
    G.answered++;
    G.t_last_answer = now;
    /* connections stay open until every answer is in: client teardown is not part of the fan-out */
    if (G.answered + G.bad_reqs >= G.nsubs - G.connect_errors - G.io_errors - G.early || G.answered >= G.nsubs)
      finish_hold();
    return;
  }
  /* churn subscriber: record, continue with the cursor */
  if (G.proto == PROTO_LP) {
    int n = parse_lp_events(c, body, churn_delivery);
    if (n == -1) G.timeouts_seen++;
    if (n == -2) {
      G.bad_reqs++;
      if (G.bad_reqs <= 3) progress("unexpected answer %d: %.*s", c->status, (int)(len > 200 ? 200 : len), body);
    }
    if (c->since < 0) c->since = 0;
  } else {
    if (c->status == 200 && len > 0) {
      char *endp;
      int64_t seq = strtoll(body, &endp, 10);
      uint64_t t = *endp == ':' ? strtoull(endp + 1, NULL, 10) : 0;
      churn_delivery(c, seq, t);
    } else if (c->status == 304 || c->status == 408) {
      G.timeouts_seen++;
    } else {
      G.bad_reqs++;
      if (G.bad_reqs <= 3) progress("unexpected answer %d: %.*s", c->status, (int)(len > 200 ? 200 : len), body);
    }
  }
  if (G.phase >= 4) return;
  send_subscribe(c);
  if (G.phase == 3) finish_churn_check();
}

/* ---------------------------------------------------------------- settle: the server has taken every request */

static void settle_tick(uv_timer_t *t) {
  (void)t;
  if (G.phase < 1) {
    if (now_us() - G.t_start > 90 * 1000000ULL) {
      progress("timed out connecting: %d of %d written (%d connect errors)", G.written, G.nsubs, G.connect_errors);
      G.phase = 1;
    }
    if (G.connect_errors && G.written + G.connect_errors + G.io_errors >= G.nsubs) G.phase = 1;
    return;
  }
  long ticks = proc_cpu_ticks(G.pid);
  if (ticks == G.last_ticks)
    G.idle_rounds++;
  else
    G.idle_rounds = 0;
  G.last_ticks = ticks;
  G.settle_rounds++;
  /* idle for 3 rounds of 100 ms, or give up waiting after 30 s */
  if (G.idle_rounds >= 3 || G.settle_rounds > 300) {
    uv_timer_stop(&G.settle_timer);
    G.after_settle();
  }
}

static void start_settle(void (*then)(void)) {
  G.after_settle = then;
  G.last_ticks = -1;
  uv_timer_init(G.loop, &G.settle_timer);
  uv_timer_start(&G.settle_timer, settle_tick, 100, 100);
}

static void print_rusage_fields(void) {
  double cpu =
      (G.ru1.ru_utime.tv_sec - G.ru0.ru_utime.tv_sec) + (G.ru1.ru_utime.tv_usec - G.ru0.ru_utime.tv_usec) / 1e6 +
      (G.ru1.ru_stime.tv_sec - G.ru0.ru_stime.tv_sec) + (G.ru1.ru_stime.tv_usec - G.ru0.ru_stime.tv_usec) / 1e6;
  double wall = (G.wall1 - G.wall0) / 1e6;
  printf("\"loadgen_cpu_s\":%.3f,\"loadgen_wall_s\":%.3f,\"loadgen_cpu_pct\":%.1f", cpu, wall,
         wall > 0 ? 100.0 * cpu / wall : 0);
}

static void stop_all(void) {
  for (int i = 0; i < G.nsubs; i++)
    if (G.subs[i]) conn_close(G.subs[i]);
  for (int i = 0; i < MAX_CATS; i++)
    if (G.pubs[i]) conn_close(G.pubs[i]);
  uv_stop(G.loop);
}

/* ---------------------------------------------------------------- hold */

static void hold_send(int k) {
  conn *p = G.pubs[k];
  char cat[64], data[64];
  cat_name(k, cat, sizeof cat);
  G.t_pub[k] = now_us();
  if (!G.t_first_pub) G.t_first_pub = G.t_pub[k];
  snprintf(data, sizeof data, "0:%" PRIu64, G.t_pub[k]);
  conn_send(p, build_publish(p, cat, data));
}

static void hold_publish(void) {
  G.rss_held_kb = proc_rss_kb(G.pid);
  progress("server RSS %ld kB -> %ld kB; publishing one event per category", G.rss_base_kb, G.rss_held_kb);
  G.phase = 2;
  for (int k = 0; k < G.cats; k++) {
    if (G.pubs[k] && G.pubs[k]->open) {
      hold_send(k);
    } else {
      /* the server closed the idle publisher (nginx does when it runs out of connections): reconnect */
      G.pubs[k] = conn_new(k, ROLE_PUB, k);
      conn_connect(G.pubs[k]);
    }
  }
}

static void finish_hold(void) {
  if (G.phase >= 3) return;
  G.phase = 3;
  getrusage(RUSAGE_SELF, &G.ru1);
  G.wall1 = now_us();
  qsort(G.lat, G.nlat, sizeof *G.lat, cmp_u32);
  int held = G.nsubs - G.connect_errors - G.io_errors - G.early;
  printf(
      "{\"scenario\":\"hold\",\"n\":%d,\"held\":%d,\"answered\":%d,\"connect_errors\":%d,\"io_errors\":%d,"
      "\"early\":%d,\"bad\":%ld,\"connect_s\":%.3f,\"rss_base_kb\":%ld,\"rss_held_kb\":%ld,"
      "\"rss_per_sub_b\":%.1f,\"fanout_ms\":%.3f,\"p50_ms\":%.3f,\"p99_ms\":%.3f,",
      G.nsubs, held, G.answered, G.connect_errors, G.io_errors, G.early, G.bad_reqs, (G.t_written - G.t_start) / 1e6,
      G.rss_base_kb, G.rss_held_kb, held > 0 ? (G.rss_held_kb - G.rss_base_kb) * 1024.0 / held : 0,
      G.answered ? (G.t_last_answer - G.t_first_pub) / 1000.0 : -1, lat_pct_ms(0.5), lat_pct_ms(0.99));
  print_rusage_fields();
  printf("}\n");
  fflush(stdout);
  stop_all();
}

static void deadline_cb(uv_timer_t *t) {
  (void)t;
  progress("deadline reached in phase %d", G.phase);
  if (G.mode == MODE_HOLD)
    finish_hold();
  else if (G.mode == MODE_CHURN) {
    G.phase = 3;
    G.churn_end = 0;
    finish_churn_check();
  } else
    stop_all();
}

/* ---------------------------------------------------------------- churn */

static void pub_send_next(conn *c) {
  if (c->busy || !c->open || c->q_head == c->q_tail) return;
  size_t i = c->q_head++ % c->q_cap;
  char cat[64], data[64];
  cat_name(c->cat, cat, sizeof cat);
  snprintf(data, sizeof data, "%" PRId64 ":%" PRIu64, c->q_seq[i], c->q_t[i]);
  conn_send(c, build_publish(c, cat, data));
}

static void churn_tick(uv_timer_t *t) {
  uint64_t now = now_us();
  if (G.phase != 2) {
    uv_timer_stop(t);
    return;
  }
  int64_t due = (int64_t)((now - G.churn_t0) * G.rate / 1e6) + 1;
  int64_t total = (int64_t)(G.rate * G.duration);
  if (due > total) due = total;
  while (G.scheduled < due) {
    int64_t k = G.scheduled++;
    int cat = (int)(k % G.cats);
    conn *p = G.pubs[cat];
    if (p->q_tail - p->q_head == p->q_cap) {
      size_t cap = p->q_cap ? p->q_cap * 2 : 1024;
      int64_t *s = malloc(cap * sizeof *s);
      uint64_t *tt = malloc(cap * sizeof *tt);
      for (size_t j = 0; j < p->q_tail - p->q_head; j++) {
        s[j] = p->q_seq[(p->q_head + j) % p->q_cap];
        tt[j] = p->q_t[(p->q_head + j) % p->q_cap];
      }
      p->q_tail -= p->q_head;
      p->q_head = 0;
      free(p->q_seq);
      free(p->q_t);
      p->q_seq = s;
      p->q_t = tt;
      p->q_cap = cap;
    }
    size_t slot = p->q_tail++ % p->q_cap;
    p->q_seq[slot] = G.pubseq[cat]++;
    /* the scheduled time, not the send time: a slow server cannot hide its queueing */
    p->q_t[slot] = G.churn_t0 + (uint64_t)(k * 1e6 / G.rate);
    if (p->q_tail - p->q_head > G.max_queue) G.max_queue = p->q_tail - p->q_head;
    pub_send_next(p);
  }
  if (G.scheduled >= total) {
    uv_timer_stop(t);
    G.ticks1 = proc_cpu_ticks(G.pid);
    G.tick_t1 = now;
    G.phase = 3;
    G.churn_end = now;
    progress("published %" PRId64 " events; draining", G.scheduled);
    finish_churn_check();
  }
}

static void churn_start(void) {
  progress("%d subscribers waiting; publishing %.0f events/s for %.1f s", G.nsubs, G.rate, G.duration);
  G.phase = 2;
  G.churn_t0 = now_us();
  G.ticks0 = proc_cpu_ticks(G.pid);
  G.tick_t0 = G.churn_t0;
  getrusage(RUSAGE_SELF, &G.ru0);
  G.wall0 = G.churn_t0;
  uv_timer_init(G.loop, &G.tick_timer);
  uv_timer_start(&G.tick_timer, churn_tick, 1, 1);
}

static void churn_report(long missing) {
  G.phase = 4;
  getrusage(RUSAGE_SELF, &G.ru1);
  G.wall1 = G.tick_t1 ? G.tick_t1 : now_us();
  qsort(G.lat, G.nlat, sizeof *G.lat, cmp_u32);
  long expected = 0;
  for (int i = 0; i < G.nsubs; i++) expected += G.pubseq[i % G.cats];
  long hz = sysconf(_SC_CLK_TCK);
  double window = (G.tick_t1 - G.tick_t0) / 1e6;
  double cpu_pct = (G.ticks1 >= 0 && window > 0) ? 100.0 * (G.ticks1 - G.ticks0) / hz / window : -1;
  printf("{\"scenario\":\"churn\",\"subs\":%d,\"events\":%" PRId64
         ",\"deliveries\":%ld,\"expected\":%ld,"
         "\"gaps\":%ld,\"dups\":%ld,\"missing_at_end\":%ld,\"missed_flags\":%ld,\"timeouts\":%ld,\"bad\":%ld,"
         "\"connect_errors\":%d,\"io_errors\":%d,\"p50_ms\":%.3f,\"p99_ms\":%.3f,\"max_ms\":%.3f,"
         "\"server_cpu_pct\":%.1f,\"max_publish_queue\":%zu,",
         G.nsubs, G.scheduled, G.deliveries, expected, G.gaps, G.dups, missing, G.missed_flags, G.timeouts_seen,
         G.bad_reqs, G.connect_errors, G.io_errors, lat_pct_ms(0.5), lat_pct_ms(0.99), lat_pct_ms(1.0), cpu_pct,
         G.max_queue);
  print_rusage_fields();
  printf("}\n");
  fflush(stdout);
  stop_all();
}

/* After publishing: done when every subscriber has every event of its
 * category, or 10 s after the last publish (the rest counts as missing). */
static void finish_churn_check(void) {
  if (G.phase != 3) return;
  long missing = 0;
  for (int i = 0; i < G.nsubs; i++) {
    conn *c = G.subs[i];
    if (!c) continue;
    int64_t want = G.pubseq[c->cat];
    if (c->expected < want) missing += want - c->expected;
  }
  uint64_t now = now_us();
  if (missing == 0 || G.churn_end == 0 || now - G.churn_end > 10000000ULL) churn_report(missing);
}

static void drain_tick(uv_timer_t *t) {
  (void)t;
  if (G.phase == 3) finish_churn_check();
}

/* ---------------------------------------------------------------- loops (catch-up, publish) */

static void loops_stop(uv_timer_t *t) {
  (void)t;
  if (!G.measuring) {
    /* warm-up over */
    G.measuring = 1;
    G.m_t0 = now_us();
    G.wall0 = G.m_t0;
    getrusage(RUSAGE_SELF, &G.ru0);
    G.ticks0 = G.pid ? proc_cpu_ticks(G.pid) : 0;
    uv_timer_start(&G.tick_timer, loops_stop, (uint64_t)(G.duration * 1000), 0);
    return;
  }
  G.measuring = 0;
  G.m_t1 = now_us();
  G.wall1 = G.m_t1;
  getrusage(RUSAGE_SELF, &G.ru1);
  G.ticks1 = G.pid ? proc_cpu_ticks(G.pid) : 0;
  G.phase = 3;
  double secs = (G.m_t1 - G.m_t0) / 1e6;
  long hz = sysconf(_SC_CLK_TCK);
  printf(
      "{\"scenario\":\"%s\",\"conns\":%d,\"requests\":%ld,\"bad\":%ld,\"seconds\":%.3f,\"rps\":%.1f,"
      "\"server_cpu_pct\":%.1f,\"connect_errors\":%d,\"io_errors\":%d,",
      G.mode == MODE_CATCHUP ? "catchup" : "publish", G.nsubs, G.done_reqs, G.bad_reqs, secs, G.done_reqs / secs,
      G.pid ? 100.0 * (G.ticks1 - G.ticks0) / hz / secs : -1, G.connect_errors, G.io_errors);
  print_rusage_fields();
  printf("}\n");
  fflush(stdout);
  stop_all();
}

static void loops_begin(void) {
  for (int i = 0; i < G.nsubs; i++) {
    conn *c = conn_new(i, ROLE_LOOP, 0);
    G.subs[i] = c;
    conn_connect(c);
  }
  uv_timer_init(G.loop, &G.tick_timer);
  uv_timer_start(&G.tick_timer, loops_stop, 500, 0); /* 0.5 s warm-up */
}

static void catchup_wait(uv_timer_t *t) {
  if (G.phase == 1) {
    uv_timer_stop(t);
    uv_close((uv_handle_t *)t, NULL);
    G.phase = 2;
    loops_begin();
  }
}

/* ---------------------------------------------------------------- main */

static void usage(void) {
  fprintf(stderr,
          "usage: loadgen hold|churn|catchup|publish --proto lp|nchan --port P [--n N] [--subs N] "
          "[--port2 P2] [--cats C] [--conns C] [--rate R] [--duration S] [--pid PID] [--prefix P] [--host H] "
          "[--path /events] [--header \"Name: value\"] [--sse 1 (hold: SSE streams)] [--idempotency-keys 1]\n");
  exit(2);
}

int main(int argc, char **argv) {
  if (argc < 2) usage();
  G.host = "127.0.0.1";
  G.prefix = "c";
  G.path = "/events";
  G.header = "";
  G.cats = 10;
  G.n = 1000;
  G.conns = 8;
  G.rate = 100;
  G.duration = 5;
  G.timeout_s = 110;
  G.proto = -1;
  if (!strcmp(argv[1], "hold"))
    G.mode = MODE_HOLD;
  else if (!strcmp(argv[1], "churn"))
    G.mode = MODE_CHURN;
  else if (!strcmp(argv[1], "catchup"))
    G.mode = MODE_CATCHUP;
  else if (!strcmp(argv[1], "publish"))
    G.mode = MODE_PUBLISH;
  else
    usage();
  for (int i = 2; i < argc; i++) {
    const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
    if (!v) usage();
    i++;
    if (!strcmp(a, "--proto"))
      G.proto = !strcmp(v, "lp") ? PROTO_LP : !strcmp(v, "nchan") ? PROTO_NCHAN : -2;
    else if (!strcmp(a, "--port"))
      G.port = atoi(v);
    else if (!strcmp(a, "--port2"))
      G.port2 = atoi(v);
    else if (!strcmp(a, "--host"))
      G.host = v;
    else if (!strcmp(a, "--n") || !strcmp(a, "--subs"))
      G.n = atoi(v);
    else if (!strcmp(a, "--cats"))
      G.cats = atoi(v);
    else if (!strcmp(a, "--conns"))
      G.conns = atoi(v);
    else if (!strcmp(a, "--rate"))
      G.rate = atof(v);
    else if (!strcmp(a, "--duration"))
      G.duration = atof(v);
    else if (!strcmp(a, "--pid"))
      G.pid = atoi(v);
    else if (!strcmp(a, "--prefix"))
      G.prefix = v;
    else if (!strcmp(a, "--timeout"))
      G.timeout_s = atoi(v);
    else if (!strcmp(a, "--idempotency-keys"))
      G.idempotency_keys = atoi(v);
    else if (!strcmp(a, "--sse"))
      G.sse = atoi(v);
    else if (!strcmp(a, "--path"))
      G.path = v;
    else if (!strcmp(a, "--header")) {
      static char line[512];
      snprintf(line, sizeof line, "%s\r\n", v);
      G.header = line;
    }
    else
      usage();
  }
  if (G.proto < 0 || G.port <= 0 || G.cats < 1 || G.cats > MAX_CATS || G.n < 1) usage();
  if (strcmp(G.host, "127.0.0.1") && strcmp(G.host, "localhost")) die("only 127.0.0.1 is a target");
  if (G.duration <= 0 || G.duration > 120) die("--duration must be 0-120 s");
  uv_ip4_addr("127.0.0.1", G.port, &G.addr);
  if (G.port2) uv_ip4_addr("127.0.0.1", G.port2, &G.addr2);
  G.loop = uv_default_loop();
  G.t_start = now_us();

  uv_timer_init(G.loop, &G.deadline_timer);
  uv_timer_t drain;
  switch (G.mode) {
    case MODE_HOLD:
    case MODE_CHURN:
      if (!G.pid) die("--pid is required");
      G.nsubs = G.n;
      G.subs = calloc((size_t)G.nsubs, sizeof *G.subs);
      if (G.mode == MODE_HOLD) G.rss_base_kb = proc_rss_kb(G.pid);
      for (int k = 0; k < G.cats; k++) {
        G.pubs[k] = conn_new(k, ROLE_PUB, k);
        conn_connect(G.pubs[k]);
      }
      getrusage(RUSAGE_SELF, &G.ru0);
      G.wall0 = now_us();
      connect_more();
      start_settle(G.mode == MODE_HOLD ? hold_publish : churn_start);
      /* hard bound on the whole run */
      uv_timer_start(&G.deadline_timer, deadline_cb,
                     G.mode == MODE_HOLD ? 180000 : (uint64_t)(G.duration * 1000) + 120000, 0);
      if (G.mode == MODE_CHURN) {
        uv_timer_init(G.loop, &drain);
        uv_timer_start(&drain, drain_tick, 100, 100);
      }
      break;
    case MODE_CATCHUP:
    case MODE_PUBLISH:
      G.nsubs = G.conns;
      G.subs = calloc((size_t)G.nsubs, sizeof *G.subs);
      uv_timer_start(&G.deadline_timer, deadline_cb, (uint64_t)(G.duration * 1000) + 30000, 0);
      if (G.mode == MODE_CATCHUP) {
        /* one event, then everyone asks for it again and again */
        G.pubs[0] = conn_new(0, ROLE_PUB, 0);
        conn_connect(G.pubs[0]);
        uv_timer_t *w = malloc(sizeof *w);
        uv_timer_init(G.loop, w);
        uv_timer_start(w, catchup_wait, 10, 10);
      } else {
        loops_begin();
      }
      break;
  }
  uv_run(G.loop, UV_RUN_DEFAULT);
  /* let close callbacks run, then leave without waiting for stragglers */
  uv_run(G.loop, UV_RUN_NOWAIT);
  return G.phase >= 3 ? 0 : 1;
}
