/* C tests of lp_conn, the server's connection state machine, driven with a recording host and a
 * fake clock: ordering of pipelined requests, keep-alive, deadlines (408, idle, stall, linger
 * from the end of the write), 100-continue, pausing on queued output, the output budget, early
 * close, server shutdown; and the C path's pieces (CORS, SSE text, stream cursors). TAP output; built with ASan+UBSan
 * and run under valgrind by `make test`. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lp_conn.h"
#include "lp_cors.h"
#include "lp_deadlines.h"
#include "lp_fast.h"
#include "lp_sse.h"
#include "tap.h"

/* What the connection asked of its host. */
typedef struct rec {
  lp_conn c;
  lp_buf out;          /* everything written */
  size_t queued;       /* what the fake socket has not taken */
  int requests;        /* host->request calls */
  char targets[8][64]; /* their targets */
  char bodies[8][64];
  char header_x[8][64]; /* their X header */
  int shutdowns, closes, schedules, gones;
  int answer_now; /* request() answers 200 "ok" at once (keep-alive) */
} rec;

static void on_request(void *ud, const lp_http_event *head, lp_slice body) {
  rec *r = ud;
  int i = r->requests < 8 ? r->requests : 7;
  snprintf(r->targets[i], 64, "%.*s", (int)head->target.len, head->target.ptr);
  snprintf(r->bodies[i], 64, "%.*s", (int)body.len, body.ptr);
  r->header_x[i][0] = 0;
  for (size_t k = 0; k < head->nheaders; k++)
    if (head->headers[k].name.len == 1 && head->headers[k].name.ptr[0] == 'x')
      snprintf(r->header_x[i], 64, "%.*s", (int)head->headers[k].value.len, head->headers[k].value.ptr);
  r->requests++;
  if (r->answer_now) {
    lp_slice s = {"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", 40};
    lp_conn_write(&r->c, &s, 1);
    lp_conn_response_done(&r->c, 1, 0);
  }
}
static void on_write(void *ud, const lp_slice *bufs, size_t n) {
  rec *r = ud;
  for (size_t i = 0; i < n; i++) lp_buf_append(&r->out, bufs[i].ptr, bufs[i].len);
}
static size_t on_queued(void *ud) { return ((rec *)ud)->queued; }
static void on_shutdown(void *ud) { ((rec *)ud)->shutdowns++; }
static void on_close(void *ud) { ((rec *)ud)->closes++; }
static void on_schedule(void *ud) { ((rec *)ud)->schedules++; }
static void on_gone(void *ud) { ((rec *)ud)->gones++; }
static const char *on_date(void *ud) {
  (void)ud;
  return "Date: x\r\n";
}

static const lp_conn_host HOST = {on_request, on_write,    on_queued, on_shutdown,
                                  on_close,   on_schedule, on_gone,   on_date};
static const lp_conn_config CONFIG = {{1024, 100, 256}, 1000, 5000, 2000, 4096, 65536};

static void start(rec *r) {
  memset(r, 0, sizeof *r);
  lp_conn_init(&r->c, &CONFIG, &HOST, r, 0);
}
static void stop(rec *r) {
  lp_conn_free(&r->c);
  lp_buf_free(&r->out);
}
static void feed(rec *r, const char *s, uint64_t now) { lp_conn_received(&r->c, s, strlen(s), now); }
static int out_has(rec *r, const char *lit) {
  lp_buf_append_char(&r->out, '\0');
  r->out.len--;
  return r->out.data && strstr(r->out.data, lit) != NULL;
}
static void answer(rec *r, int keep, uint64_t now) {
  lp_slice s = {"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nA", 39};
  lp_conn_write(&r->c, &s, 1);
  lp_conn_response_done(&r->c, keep, now);
}

static void test_keep_alive_and_idle(void) {
  int ok = 1;
  rec r;
  start(&r);
  r.answer_now = 1;
  CHECK(r.c.deadline_kind == LP_DL_IDLE && r.c.deadline == 1000); /* a new connection: header timeout */
  feed(&r, "GET /a HTTP/1.1\r\n\r\n", 10);
  CHECK(r.requests == 1 && strcmp(r.targets[0], "/a") == 0);
  CHECK(r.c.phase == LP_CONN_READING && r.schedules == 0);
  CHECK(r.c.deadline_kind == LP_DL_IDLE && r.c.deadline == 10 + 5000);
  lp_conn_tick(&r.c, 5009);
  CHECK(r.closes == 0);
  lp_conn_tick(&r.c, 5010);
  CHECK(r.closes == 1 && r.out.len == 40); /* idle: closed without a word */
  stop(&r);
  report("keep-alive: answered, then an idle connection closes silently at its deadline", ok);
}

static void test_pipelined_in_order_never_nested(void) {
  int ok = 1;
  rec r;
  start(&r);
  feed(&r, "GET /1 HTTP/1.1\r\n\r\nGET /2 HTTP/1.1\r\n\r\nGET /3 HTTP/1.1\r\n\r\n", 0);
  CHECK(r.requests == 1); /* /1 is pending: the others wait */
  answer(&r, 1, 5);
  CHECK(r.requests == 1); /* finishing a response never runs the next request in the same call */
  CHECK(r.schedules == 1 && r.c.scheduled);
  lp_conn_resume(&r.c, 6);
  CHECK(r.requests == 2 && strcmp(r.targets[1], "/2") == 0);
  answer(&r, 1, 7);
  CHECK(r.requests == 2 && r.schedules == 2);
  lp_conn_resume(&r.c, 8);
  CHECK(r.requests == 3 && strcmp(r.targets[2], "/3") == 0);
  answer(&r, 1, 9);
  CHECK(r.schedules == 2); /* nothing buffered: no turn needed */
  CHECK(r.c.deadline_kind == LP_DL_IDLE);
  stop(&r);
  report("pipelining: one request at a time, in order, the next only on a later turn", ok);
}

static void test_split_reads_and_saved_head(void) {
  int ok = 1;
  rec r;
  start(&r);
  const char *req = "POST /p HTTP/1.1\r\nX: hello\r\nContent-Length: 5\r\n\r\nabcde";
  for (size_t i = 0; req[i]; i++) lp_conn_received(&r.c, req + i, 1, i);
  CHECK(r.requests == 1);
  CHECK(strcmp(r.targets[0], "/p") == 0 && strcmp(r.bodies[0], "abcde") == 0);
  CHECK(strcmp(r.header_x[0], "hello") == 0); /* the head outlived the parser's moves */
  stop(&r);
  report("split reads: one byte at a time gives the same request, head kept while the body comes", ok);
}

static void test_continue_and_body_deadline(void) {
  int ok = 1;
  rec r;
  start(&r);
  feed(&r, "POST /p HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n", 0);
  CHECK(out_has(&r, "HTTP/1.1 100 Continue\r\n\r\n"));
  CHECK(r.c.deadline_kind == LP_DL_BODY && r.c.deadline == 1000);
  feed(&r, "a", 500);
  CHECK(r.c.deadline == 1500); /* renewed by every read */
  lp_conn_tick(&r.c, 1499);
  CHECK(r.shutdowns == 0);
  lp_conn_tick(&r.c, 1500);
  CHECK(out_has(&r, "HTTP/1.1 408 Request Timeout\r\n"));
  CHECK(out_has(&r, "Connection: close\r\n\r\n{\"error\":\"request timeout\"}"));
  CHECK(r.shutdowns == 1 && r.requests == 0);
  stop(&r);
  report("100-continue once; a stalled body gets 408 a header timeout after the last byte", ok);
}

static void test_head_deadline_not_renewed(void) {
  int ok = 1;
  rec r;
  start(&r);
  feed(&r, "GET / HT", 100);
  CHECK(r.c.deadline_kind == LP_DL_HEAD && r.c.deadline == 1100);
  feed(&r, "TP/1.1\r\n", 900);
  CHECK(r.c.deadline == 1100); /* counted from the first byte of the head */
  lp_conn_tick(&r.c, 1100);
  CHECK(out_has(&r, " 408 ") && r.shutdowns == 1);
  stop(&r);
  report("a head dripped slowly gets 408 a header timeout after its first byte", ok);
}

static void test_limits(void) {
  int ok = 1;
  rec r;
  start(&r);
  feed(&r, "POST / HTTP/1.1\r\nContent-Length: 101\r\n\r\n", 0);
  CHECK(out_has(&r, "HTTP/1.1 413 Content Too Large\r\n") && r.shutdowns == 1 && r.requests == 0);
  feed(&r, "GET / HTTP/1.1\r\n\r\n", 1); /* lingering: dropped */
  CHECK(r.requests == 0);
  stop(&r);
  start(&r);
  char big[400];
  memset(big, 'a', sizeof big);
  memcpy(big, "GET /", 5);
  big[399] = 0;
  feed(&r, big, 0);
  CHECK(out_has(&r, " 414 ") && r.shutdowns == 1);
  stop(&r);
  start(&r);
  feed(&r, "GARBAGE\r\n\r\n", 0);
  CHECK(out_has(&r, " 400 ") && out_has(&r, "application/json") && r.shutdowns == 1);
  stop(&r);
  report("limits and bad input: 413, 414, 400 with a JSON error, then a graceful close", ok);
}

static void test_early_close(void) {
  int ok = 1;
  rec r;
  start(&r);
  feed(&r, "GET / HTTP/1.1\r\nHost:", 0);
  lp_conn_peer_eof(&r.c, 1);
  CHECK(r.closes == 1 && r.out.len == 0 && r.gones == 0); /* a half request goes unanswered */
  stop(&r);
  start(&r);
  feed(&r, "GET /wait HTTP/1.1\r\n\r\n", 0);
  lp_conn_peer_eof(&r.c, 1);
  CHECK(r.gones == 1 && r.closes == 1); /* the pending response learns its client left */
  CHECK(lp_conn_write(&r.c, NULL, 0) == -1);
  lp_conn_response_done(&r.c, 1, 2); /* a late answer changes nothing */
  CHECK(r.closes == 1 && r.schedules == 0);
  stop(&r);
  start(&r);
  r.answer_now = 1;
  feed(&r, "GET /a HTTP/1.1\r\n\r\n", 0);
  lp_conn_peer_eof(&r.c, 1);
  CHECK(r.shutdowns == 1 && r.closes == 0); /* idle: flush and FIN */
  lp_conn_fin_sent(&r.c, 2);
  CHECK(r.closes == 1);
  stop(&r);
  report("early close: a half request or a pending answer is dropped (on_close), idle ends cleanly", ok);
}

static void test_pause_and_budget(void) {
  int ok = 1;
  rec r;
  start(&r);
  feed(&r, "GET /1 HTTP/1.1\r\n\r\nGET /2 HTTP/1.1\r\n\r\n", 0);
  r.queued = 5000; /* above high_water: the client does not read */
  answer(&r, 1, 1);
  lp_conn_resume(&r.c, 2);
  CHECK(r.requests == 1 && r.c.paused);
  CHECK(r.c.deadline_kind == LP_DL_STALL && r.c.deadline == 2 + 5000);
  r.queued = 100;
  lp_conn_wrote(&r.c, 3);
  CHECK(r.requests == 1 && r.c.paused); /* waits for the queue to empty */
  r.queued = 0;
  lp_conn_wrote(&r.c, 4);
  CHECK(r.requests == 2 && !r.c.paused);
  /* the output budget: a write while more than it is queued cuts the connection */
  r.queued = 70000;
  lp_slice s = {"x", 1};
  CHECK(lp_conn_write(&r.c, &s, 1) == -1);
  CHECK(r.closes == 1 && r.gones == 1);
  stop(&r);
  start(&r);
  feed(&r, "GET /1 HTTP/1.1\r\n\r\nGET /2 HTTP/1.1\r\n\r\n", 0);
  r.queued = 5000;
  answer(&r, 1, 1);
  lp_conn_resume(&r.c, 2);
  lp_conn_tick(&r.c, 5002); /* paused for a whole keep-alive period: cut */
  CHECK(r.closes == 1 && r.requests == 1);
  stop(&r);
  report("queued output pauses pipelined requests until drained; the output budget and the stall cut", ok);
}

static void test_pipelined_flood_cut(void) {
  int ok = 1;
  rec r;
  start(&r);
  feed(&r, "GET /wait HTTP/1.1\r\n\r\n", 0);
  char chunk[200];
  memset(chunk, 'G', sizeof chunk - 1);
  chunk[sizeof chunk - 1] = 0;
  for (int i = 0; i < 10 && r.closes == 0; i++) feed(&r, chunk, 1);
  CHECK(r.closes == 1 && r.gones == 1); /* more than max_header + max_body behind a pending answer */
  stop(&r);
  report("bytes pipelined behind a pending answer are bounded: beyond one maximal request, cut", ok);
}

static void test_linger_from_end_of_write(void) {
  int ok = 1;
  rec r;
  start(&r);
  feed(&r, "GET / HTTP/1.0\r\n\r\n", 0);
  r.queued = 50000;
  answer(&r, 0, 10);
  CHECK(r.shutdowns == 1 && r.c.deadline_kind == LP_DL_STALL);
  r.queued = 20000;
  lp_conn_wrote(&r.c, 4000); /* progress renews the stall deadline */
  CHECK(r.c.deadline == 4000 + 5000);
  r.queued = 0;
  lp_conn_wrote(&r.c, 8000);
  lp_conn_fin_sent(&r.c, 8000);
  CHECK(r.c.deadline_kind == LP_DL_LINGER && r.c.deadline == 8000 + 2000);
  lp_conn_tick(&r.c, 9999);
  CHECK(r.closes == 0);
  lp_conn_tick(&r.c, 10000);
  CHECK(r.closes == 1);
  stop(&r);
  report("a slow reader gets its whole answer: lingering counts from the FIN, after the write", ok);
}

static void test_server_closing(void) {
  int ok = 1;
  rec r;
  start(&r);
  r.answer_now = 1;
  feed(&r, "GET / HTTP/1.1\r\n\r\n", 0);
  lp_conn_server_closing(&r.c, 1);
  CHECK(r.shutdowns == 1); /* idle: closed now */
  stop(&r);
  start(&r);
  feed(&r, "GET /wait HTTP/1.1\r\n\r\n", 0);
  lp_conn_server_closing(&r.c, 1);
  CHECK(r.shutdowns == 0 && !lp_conn_may_keep_alive(&r.c));
  answer(&r, 1, 2);
  CHECK(r.shutdowns == 1);
  lp_conn_fin_sent(&r.c, 3);
  CHECK(r.closes == 1); /* no lingering while the server goes */
  stop(&r);
  report("server shutdown: idle connections close now, pending ones after their answer", ok);
}

static void test_fail_json(void) {
  int ok = 1;
  rec r;
  start(&r);
  lp_conn_fail(&r.c, 503, "too \"many\"\n", 0);
  CHECK(out_has(&r, "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: 30\r\n"));
  CHECK(out_has(&r, "Date: x\r\nConnection: close\r\n\r\n{\"error\":\"too \\\"many\\\"\\u000a\"}"));
  stop(&r);
  report("refusals are JSON with the message escaped", ok);
}

/* lp_deadlines, the parked long polls' timeouts (the server's glue arms one timer from it). */
static void test_deadlines(void) {
  int ok = 1;
  lp_deadlines d = {0};
  lp_deadline e[6];
  memset(e, 0, sizeof e);
  uint64_t at = 0;
  CHECK(!lp_deadlines_next(&d, &at));
  CHECK(lp_deadlines_pop_expired(&d, 1000000) == NULL);
  CHECK(lp_deadlines_add(&d, &e[0], 5000, 100) == 0);  /* 5100 */
  CHECK(lp_deadlines_add(&d, &e[1], 1000, 200) == 0);  /* 1200 */
  CHECK(lp_deadlines_add(&d, &e[2], 5000, 300) == 0);  /* 5300 */
  CHECK(lp_deadlines_add(&d, &e[3], 1000, 400) == 0);  /* 1400 */
  CHECK(lp_deadlines_add(&d, &e[4], 30000, 500) == 0); /* 30500 */
  CHECK(d.count == 5);
  CHECK(lp_deadlines_next(&d, &at) && at == 1200);
  CHECK(lp_deadlines_pop_expired(&d, 1199) == NULL);
  CHECK(lp_deadlines_pop_expired(&d, 1200) == &e[1]);
  CHECK(lp_deadlines_pop_expired(&d, 1200) == NULL);
  /* removed from the middle of a FIFO and from its head */
  lp_deadlines_remove(&d, &e[3]);
  lp_deadlines_remove(&d, &e[3]); /* twice: nothing */
  lp_deadlines_remove(&d, &e[0]);
  CHECK(d.count == 2);
  CHECK(lp_deadlines_next(&d, &at) && at == 5300);
  /* a clock that went back never puts an entry before its FIFO's tail */
  CHECK(lp_deadlines_add(&d, &e[5], 5000, 0) == 0);
  CHECK(e[5].at == 5300);
  CHECK(lp_deadlines_pop_expired(&d, 40000) == &e[2]);
  CHECK(lp_deadlines_pop_expired(&d, 40000) == &e[5]);
  CHECK(lp_deadlines_pop_expired(&d, 40000) == &e[4]);
  CHECK(lp_deadlines_pop_expired(&d, 40000) == NULL && d.count == 0);
  CHECK(!lp_deadlines_next(&d, &at));
  /* an entry may go back in once out */
  CHECK(lp_deadlines_add(&d, &e[1], 1000, 50000) == 0 && lp_deadlines_next(&d, &at) && at == 51000);
  lp_deadlines_free(&d);
  report("deadlines: earliest first across lengths, removal anywhere, order kept", ok);
}

/* lp_cors: the lines of cors.lua's Policy:add_headers, for "*" and for a listed policy. */
static void test_cors(void) {
  int ok = 1;
  lp_buf out = LP_BUF_INIT;
  lp_cors none = {0};
  lp_slice a = {"https://A.example", 17}, other = {"https://b.example", 17}, absent = {NULL, 0};
  CHECK(lp_cors_lines(&none, a, &out) == 0 && out.len == 0);
  lp_cors any = {0};
  any.on = any.any = 1;
  CHECK(lp_cors_allowed(&any, absent));
  CHECK(lp_cors_lines(&any, absent, &out) == 0);
  CHECK(out.len == strlen("Access-Control-Allow-Origin: *\r\nAccess-Control-Expose-Headers: Idempotent-Replayed\r\n"));
  CHECK(memcmp(out.data, "Access-Control-Allow-Origin: *\r\n", 32) == 0);
  lp_cors listed = {0};
  listed.on = listed.credentials = 1;
  CHECK(lp_cors_add_origin(&listed, "https://a.EXAMPLE", 17) == 0);
  CHECK(lp_cors_set_preflight(&listed, "X: y\r\n", 6) == 0 && listed.preflight_len == 6);
  CHECK(lp_cors_allowed(&listed, a) && !lp_cors_allowed(&listed, other) && !lp_cors_allowed(&listed, absent));
  lp_buf_reset(&out);
  CHECK(lp_cors_lines(&listed, a, &out) == 0);
  const char *want =
      "Vary: Origin\r\nAccess-Control-Allow-Origin: https://A.example\r\n"
      "Access-Control-Expose-Headers: Idempotent-Replayed\r\nAccess-Control-Allow-Credentials: true\r\n";
  CHECK(out.len == strlen(want) && memcmp(out.data, want, out.len) == 0); /* the origin as sent */
  lp_buf_reset(&out);
  CHECK(lp_cors_lines(&listed, other, &out) == 0);
  CHECK(out.len == 14 && memcmp(out.data, "Vary: Origin\r\n", 14) == 0);
  lp_cors_free(&listed);
  CHECK(listed.on == 0 && listed.origins == NULL);
  lp_buf_free(&out);
  report("cors: the lines of an answer by Origin, listed origins without case", ok);
}

static int buf_is(const lp_buf *b, const char *want) {
  return b->len == strlen(want) && memcmp(b->data, want, b->len) == 0;
}

/* lp_sse: the text longpoll.sse writes (spec/fast_path_spec.lua compares whole streams). */
static void test_sse_text(void) {
  int ok = 1;
  lp_buf b = LP_BUF_INIT;
  const char *id = "0b0c7a39-1d6e-4d0b-9b61-6f2d3c3e9a10";
  CHECK(lp_sse_preamble_append(&b, 3000, 0, 0) == 0 && buf_is(&b, "retry: 3000\n\n"));
  lp_buf_reset(&b);
  CHECK(lp_sse_preamble_append(&b, 3000, 1, -12) == 0 && buf_is(&b, "retry: 3000\nid: -12\n\n"));
  lp_buf_reset(&b);
  CHECK(lp_sse_message_append(&b, "{\"a\":1}", 7, 1700000000123, id) == 0);
  CHECK(buf_is(&b, "id: 1700000000123_0b0c7a39-1d6e-4d0b-9b61-6f2d3c3e9a10\ndata: {\"a\":1}\n\n"));
  lp_buf_reset(&b);
  /* CR LF, CR and LF each start a new data: line; a break at either end too */
  const char *json = "\n{\r\n\"a\":\r1\n}\r";
  CHECK(lp_sse_message_append(&b, json, strlen(json), 5, id) == 0);
  CHECK(buf_is(
      &b, "id: 5_0b0c7a39-1d6e-4d0b-9b61-6f2d3c3e9a10\ndata: \ndata: {\ndata: \"a\":\ndata: 1\ndata: }\ndata: \n\n"));
  lp_buf_free(&b);
  report("sse: preamble and messages, line breaks as data: lines", ok);
}

/* lp_fast_parse_stream: subscription.parse(req, o, "stream") for the queries the C path takes. */
static void test_stream_cursor(void) {
  int ok = 1;
  lp_fast_limits lim = {16, 4, 0};
  lp_buf scratch = LP_BUF_INIT;
  lp_fast_sub sub;
  const char *id = "0B0C7A39-1D6E-4D0B-9B61-6F2D3C3E9A10", *lower = "0b0c7a39-1d6e-4d0b-9b61-6f2d3c3e9a10";
  lp_slice none = {NULL, 0}, empty = {"", 0};
#define Q(s) ((lp_slice){s, strlen(s)})
  /* no cursor: from now on; a timeout is not read */
  CHECK(lp_fast_parse_stream(Q("category=a&timeout=x"), none, &lim, &scratch, &sub) == 1);
  CHECK(!sub.has_since && sub.ncategories == 1 && sub.categories[0].len == 1);
  /* since_time + last_id */
  char q[128];
  snprintf(q, sizeof q, "category=a&since_time=%%2B7&last_id=%s", id);
  CHECK(lp_fast_parse_stream(Q(q), empty, &lim, &scratch, &sub) == 1);
  CHECK(sub.has_since && sub.since == 7 && sub.has_last_id && strcmp(sub.last_id, lower) == 0);
  /* last_event_id (escaped) wins over since_time; the header wins over both */
  snprintf(q, sizeof q, "category=a&since_time=1&last_event_id=-3%%5F%s", id);
  CHECK(lp_fast_parse_stream(Q(q), none, &lim, &scratch, &sub) == 1);
  CHECK(sub.has_since && sub.since == -3 && sub.has_last_id && strcmp(sub.last_id, lower) == 0);
  CHECK(lp_fast_parse_stream(Q(q), Q("42"), &lim, &scratch, &sub) == 1);
  CHECK(sub.has_since && sub.since == 42 && !sub.has_last_id);
  CHECK(lp_fast_parse_stream(Q("category=a&last_event_id="), none, &lim, &scratch, &sub) == 1 && !sub.has_since);
  /* what the Lua handler answers with 400 */
  CHECK(lp_fast_parse_stream(Q("category=a"), Q("12_nope"), &lim, &scratch, &sub) == 0);
  CHECK(lp_fast_parse_stream(Q("category=a"), Q("12_"), &lim, &scratch, &sub) == 0);
  CHECK(lp_fast_parse_stream(Q("category=a"), Q("_12"), &lim, &scratch, &sub) == 0);
  CHECK(lp_fast_parse_stream(Q("category=a&last_event_id=x"), none, &lim, &scratch, &sub) == 0);
  snprintf(q, sizeof q, "category=a&last_id=%s", id);
  CHECK(lp_fast_parse_stream(Q(q), none, &lim, &scratch, &sub) == 0); /* last_id without since_time */
  CHECK(lp_fast_parse_stream(Q("since_time=1"), none, &lim, &scratch, &sub) == 0);
  CHECK(lp_fast_parse_stream(Q("category=a&category=b&category=c&category=d&category=e"), none, &lim, &scratch, &sub) ==
        0);
  /* a long poll still needs its timeout */
  CHECK(lp_fast_parse_subscription(Q("category=a"), &lim, &scratch, &sub) == 0);
#undef Q
  lp_buf_free(&scratch);
  report("fast: a stream's cursor from Last-Event-ID, last_event_id or since_time", ok);
}

int main(void) {
  test_keep_alive_and_idle();
  test_pipelined_in_order_never_nested();
  test_split_reads_and_saved_head();
  test_continue_and_body_deadline();
  test_head_deadline_not_renewed();
  test_limits();
  test_early_close();
  test_pause_and_budget();
  test_pipelined_flood_cut();
  test_linger_from_end_of_write();
  test_server_closing();
  test_fail_json();
  test_deadlines();
  test_cors();
  test_sse_text();
  test_stream_cursor();
  printf("1..%d\n", test_no);
  return failures ? 1 : 0;
}
