/* fuzz_conn: libFuzzer harness for lp_conn, whole connections. The input is a script: bytes the
 * client sends (split anywhere), its FIN, the application answering now or never, keep-alive or
 * not, the socket taking or holding output, our FIN going out, the clock moving, the server
 * closing. Checked at every step: the host is never called after close; requests never nest
 * and are never dispatched from inside the call that finished the previous answer; on_close
 * fires only for a pending answer, once; and the requests dispatched are, in order, a prefix of
 * those a fresh lp_http parser finds in all the bytes sent (a model of what was asked). */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lp_conn.h"

#define CHECK(cond)                                                                    \
  do {                                                                                 \
    if (!(cond)) {                                                                     \
      fprintf(stderr, "fuzz_conn: invariant failed: %s (line %d)\n", #cond, __LINE__); \
      abort();                                                                         \
    }                                                                                  \
  } while (0)

typedef struct world {
  lp_conn c;
  lp_buf sent;       /* every byte the client sent */
  lp_buf dispatched; /* "METHOD target body\n" per request, in order */
  size_t queued;
  int closed, in_request, in_done, pending, gones, scheduled, shutdowns;
  int answer_now, keep_now;
} world;

static void record(lp_buf *b, const lp_http_event *head, lp_slice body) {
  CHECK(lp_buf_append(b, head->method.ptr, head->method.len) == 0);
  CHECK(lp_buf_append_char(b, ' ') == 0);
  CHECK(lp_buf_append(b, head->target.ptr, head->target.len) == 0);
  CHECK(lp_buf_append_char(b, ' ') == 0);
  CHECK(lp_buf_append(b, body.ptr ? body.ptr : "", body.len) == 0);
  CHECK(lp_buf_append_char(b, '\n') == 0);
}

static void h_request(void *ud, const lp_http_event *head, lp_slice body) {
  world *w = ud;
  CHECK(!w->closed && !w->in_request && !w->in_done && !w->pending);
  record(&w->dispatched, head, body);
  w->pending = 1;
  if (w->answer_now) {
    w->in_request = 1;
    lp_slice s = {"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", 38};
    lp_conn_write(&w->c, &s, 1);
    w->pending = 0;
    w->in_done = 1;
    lp_conn_response_done(&w->c, w->keep_now, 0);
    w->in_done = 0;
    w->in_request = 0;
  }
}
static void h_write(void *ud, const lp_slice *bufs, size_t n) {
  world *w = ud;
  CHECK(!w->closed);
  for (size_t i = 0; i < n; i++) w->queued += bufs[i].len;
}
static size_t h_queued(void *ud) { return ((world *)ud)->queued; }
static void h_shutdown(void *ud) {
  world *w = ud;
  CHECK(!w->closed);
  w->shutdowns++;
  CHECK(w->shutdowns == 1);
}
static void h_close(void *ud) {
  world *w = ud;
  CHECK(!w->closed);
  w->closed = 1;
}
static void h_schedule(void *ud) {
  world *w = ud;
  CHECK(!w->closed);
  w->scheduled = 1;
}
static void h_gone(void *ud) {
  world *w = ud;
  CHECK(!w->closed && w->pending);
  w->pending = 0;
  w->gones++;
}

static const lp_conn_host HOST = {h_request, h_write, h_queued, h_shutdown, h_close, h_schedule, h_gone, NULL};

/* The requests a fresh parser finds in everything sent, as record() writes them. */
static void model(const lp_conn_config *k, const lp_buf *sent, lp_buf *out) {
  lp_http_parser p;
  lp_http_init(&p, &k->limits);
  if (sent->len) CHECK(lp_http_push(&p, sent->data, sent->len) == 0);
  lp_http_event head, ev;
  lp_buf saved = LP_BUF_INIT;
  /* each pass reports a head or a body, or stops */
  for (;;) {
    int rc = lp_http_parse(&p, &ev);
    if (rc == LP_HTTP_HEAD) {
      head = ev;
      lp_buf_reset(&saved);
      lp_slice none = {NULL, 0};
      record(&saved, &head, none); /* the slices die with the next parse */
      continue;
    }
    if (rc != LP_HTTP_BODY) break;
    CHECK(saved.len > 0);
    CHECK(lp_buf_append(out, saved.data, saved.len - 1) == 0);
    CHECK(lp_buf_append(out, ev.body.ptr ? ev.body.ptr : "", ev.body.len) == 0);
    CHECK(lp_buf_append_char(out, '\n') == 0);
  }
  lp_buf_free(&saved);
  lp_http_free(&p);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (size < 2) return 0;
  lp_conn_config k = {{64 + data[0] % 512, 16 + data[1] % 256, 16 + data[0] % 128}, 1000, 3000, 2000, 512, 4096};
  world w;
  memset(&w, 0, sizeof w);
  uint64_t now = 0;
  lp_conn_init(&w.c, &k, &HOST, &w, now);
  size_t i = 2;
  /* each pass consumes at least one byte of the script */
  while (i < size && !w.closed) {
    uint8_t op = data[i++];
    switch (op % 10) {
      case 0:
      case 1:
      case 2: { /* the client sends the next n bytes */
        size_t n = (size_t)(op / 10) % 24 + 1;
        if (n > size - i) n = size - i;
        CHECK(lp_buf_append(&w.sent, data + i, n) == 0);
        lp_conn_received(&w.c, (const char *)data + i, n, now);
        i += n;
        break;
      }
      case 3: lp_conn_peer_eof(&w.c, now); break;
      case 4: /* the application answers the pending request */
        w.answer_now = op & 16;
        w.keep_now = !(op & 32);
        if (w.pending) {
          lp_slice s = {"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", 38};
          int rc = lp_conn_write(&w.c, &s, 1);
          if (rc == 0) {
            w.pending = 0;
            w.in_done = 1;
            lp_conn_response_done(&w.c, w.keep_now, now);
            w.in_done = 0;
          }
        }
        break;
      case 5:
        if (w.scheduled) {
          w.scheduled = 0;
          lp_conn_resume(&w.c, now);
        }
        break;
      case 6: /* the socket takes some output */
        w.queued = op & 1 ? 0 : w.queued / 2;
        lp_conn_wrote(&w.c, now);
        break;
      case 7:
        if (w.shutdowns && w.queued == 0) lp_conn_fin_sent(&w.c, now);
        break;
      case 8:
        now += (uint64_t)(op / 10) * 97;
        lp_conn_tick(&w.c, now);
        break;
      default: lp_conn_server_closing(&w.c, now); break;
    }
    CHECK(!(w.pending && w.c.phase == LP_CONN_READING));
  }
  lp_buf expected = LP_BUF_INIT;
  model(&k, &w.sent, &expected);
  CHECK(w.dispatched.len <= expected.len);
  CHECK(w.dispatched.len == 0 || memcmp(w.dispatched.data, expected.data, w.dispatched.len) == 0);
  CHECK(w.gones <= 1 + (int)(w.dispatched.len > 0 ? w.dispatched.len : 0));
  lp_buf_free(&expected);
  lp_buf_free(&w.sent);
  lp_buf_free(&w.dispatched);
  lp_conn_free(&w.c);
  return 0;
}
