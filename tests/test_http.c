/* C tests of lp_http, the server's request parser and target decoding: framing, incremental
 * feeding, limits, rejections. TAP output; built with ASan+UBSan and run under valgrind by
 * `make test`. spec/http_parser_spec.lua checks the same rules through the Lua binding. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lp_http.h"
#include "tap.h"

static const lp_http_limits LIMITS = {1024, 100, 64};

static int eq(lp_slice s, const char *lit) { return s.len == strlen(lit) && memcmp(s.ptr, lit, s.len) == 0; }

static const char *header(const lp_http_event *ev, const char *name) {
  static char value[256];
  for (size_t i = 0; i < ev->nheaders; i++) {
    if (eq(ev->headers[i].name, name)) {
      size_t n = ev->headers[i].value.len < 255 ? ev->headers[i].value.len : 255;
      memcpy(value, ev->headers[i].value.ptr, n);
      value[n] = '\0';
      return value;
    }
  }
  return NULL;
}

/* What one request looked like, copied out of the parser. */
typedef struct req {
  char method[16], target[128], body[256], host[256];
  int minor, keep_alive, expect_continue;
  size_t nheaders;
} req;

static void copy(char *dst, size_t cap, lp_slice s) {
  size_t n = s.len < cap - 1 ? s.len : cap - 1;
  memcpy(dst, s.ptr, n);
  dst[n] = '\0';
}

/* Feeds bytes `step` at a time; fills out[] with the requests, returns how many, and sets
 * *status to the error status (0 when none). */
static size_t parse_all(const char *bytes, size_t step, req *out, size_t max, int *status) {
  lp_http_parser p;
  lp_http_init(&p, &LIMITS);
  size_t len = strlen(bytes), n = 0;
  *status = 0;
  req cur;
  memset(&cur, 0, sizeof cur);
  for (size_t i = 0; i < len && !*status; i += step) {
    size_t k = len - i < step ? len - i : step;
    if (lp_http_push(&p, bytes + i, k) != 0) *status = -1;
    lp_http_event ev;
    int rc;
    while (!*status && (rc = lp_http_parse(&p, &ev)) != LP_HTTP_MORE) {
      if (rc == LP_HTTP_ERROR) {
        *status = ev.status;
      } else if (rc == LP_HTTP_HEAD) {
        memset(&cur, 0, sizeof cur);
        copy(cur.method, sizeof cur.method, ev.method);
        copy(cur.target, sizeof cur.target, ev.target);
        const char *host = header(&ev, "host");
        if (host) snprintf(cur.host, sizeof cur.host, "%s", host);
        cur.minor = ev.minor;
        cur.keep_alive = ev.keep_alive;
        cur.expect_continue = ev.expect_continue;
        cur.nheaders = ev.nheaders;
      } else {
        copy(cur.body, sizeof cur.body, ev.body);
        if (n < max) out[n] = cur;
        n++;
      }
    }
  }
  lp_http_free(&p);
  return n;
}

static int status_of(const char *bytes) {
  req r[4];
  int status;
  parse_all(bytes, strlen(bytes), r, 4, &status);
  return status;
}

static void test_get_in_one_piece(void) {
  int ok = 1;
  lp_http_parser p;
  lp_http_init(&p, &LIMITS);
  const char *bytes = "GET /a?b=1 HTTP/1.1\r\nHost: x\r\nX-Long-Name: v a l \r\n\r\n";
  CHECK(lp_http_push(&p, bytes, strlen(bytes)) == 0);
  lp_http_event ev;
  CHECK(lp_http_parse(&p, &ev) == LP_HTTP_HEAD);
  CHECK(eq(ev.method, "GET") && eq(ev.target, "/a?b=1") && ev.minor == 1 && ev.keep_alive);
  CHECK(ev.nheaders == 2 && eq(ev.headers[1].name, "x-long-name") && eq(ev.headers[1].value, "v a l"));
  CHECK(lp_http_in_progress(&p));
  CHECK(lp_http_parse(&p, &ev) == LP_HTTP_BODY && ev.body.len == 0);
  CHECK(!lp_http_in_progress(&p) && lp_http_buffered(&p) == 0);
  CHECK(lp_http_parse(&p, &ev) == LP_HTTP_MORE);
  lp_http_free(&p);
  report("a GET request in one piece", ok);
}

static void test_any_split_gives_the_same(void) {
  int ok = 1;
  const char *bytes = "POST /p HTTP/1.1\r\nContent-Length: 5\r\nA: 1\r\n\r\nhelloGET /n HTTP/1.0\r\n\r\n";
  for (size_t step = 1; step <= strlen(bytes); step++) {
    req r[4];
    int status;
    size_t n = parse_all(bytes, step, r, 4, &status);
    CHECK(status == 0 && n == 2);
    CHECK(strcmp(r[0].body, "hello") == 0 && strcmp(r[0].method, "POST") == 0);
    CHECK(strcmp(r[1].target, "/n") == 0 && r[1].minor == 0 && !r[1].keep_alive);
  }
  report("any split of the input gives the same requests", ok);
}

static void test_incomplete_head_and_body(void) {
  int ok = 1;
  lp_http_parser p;
  lp_http_init(&p, &LIMITS);
  lp_http_event ev;
  const char *a = "POST / HTTP/1.1\r\nContent-Length: 4\r\nExpect: 100-continue\r\n";
  lp_http_push(&p, a, strlen(a));
  CHECK(lp_http_parse(&p, &ev) == LP_HTTP_MORE);
  CHECK(lp_http_in_progress(&p) && lp_http_buffered(&p) == strlen(a));
  lp_http_push(&p, "\r\nab", 4);
  CHECK(lp_http_parse(&p, &ev) == LP_HTTP_HEAD && ev.expect_continue);
  CHECK(lp_http_parse(&p, &ev) == LP_HTTP_MORE);
  CHECK(lp_http_buffered(&p) == 0 && lp_http_in_progress(&p));
  lp_http_push(&p, "cdGET", 5); /* the rest of the body and the start of the next request */
  CHECK(lp_http_parse(&p, &ev) == LP_HTTP_BODY && eq(ev.body, "abcd"));
  CHECK(lp_http_buffered(&p) == 3 && lp_http_in_progress(&p));
  CHECK(lp_http_parse(&p, &ev) == LP_HTTP_MORE);
  lp_http_free(&p);
  CHECK(p.in.data == NULL && p.body.data == NULL && p.headers == NULL && p.limits.max_url_bytes == 64);
  report("an incomplete head, then a body in pieces", ok);
}

static void test_chunked(void) {
  int ok = 1;
  const char *bytes =
      "POST / HTTP/1.1\r\nTransfer-Encoding: Chunked\r\n\r\n"
      "5;name=v\r\nhello\r\n1\r\n \r\nA\r\n0123456789\r\n0\r\nX-Trailer: 1\r\n\r\n"
      "GET /next HTTP/1.1\r\n\r\n";
  for (size_t step = 1; step <= strlen(bytes); step++) {
    req r[4];
    int status;
    size_t n = parse_all(bytes, step, r, 4, &status);
    CHECK(status == 0 && n == 2);
    CHECK(strcmp(r[0].body, "hello 0123456789") == 0 && strcmp(r[1].target, "/next") == 0);
  }
  req r[2];
  int status;
  CHECK(parse_all("POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 3, r, 2, &status) == 1);
  CHECK(status == 0 && r[0].body[0] == '\0');
  report("chunked bodies with extensions and trailers", ok);
}

static void test_lines_and_headers(void) {
  int ok = 1;
  req r[2];
  int status;
  CHECK(parse_all("\r\n\r\nGET / HTTP/1.1\nHost: x\n\n", 100, r, 2, &status) == 1 && status == 0);
  CHECK(strcmp(r[0].host, "x") == 0);
  /* repeats are kept (the binding joins them); an identical Content-Length only once */
  lp_http_parser p;
  lp_http_init(&p, &LIMITS);
  const char *b = "POST / HTTP/1.1\r\nACCEPT: a\r\nAccept: b\r\nContent-Length: 2\r\ncontent-length: 2\r\n\r\nok";
  lp_http_push(&p, b, strlen(b));
  lp_http_event ev;
  CHECK(lp_http_parse(&p, &ev) == LP_HTTP_HEAD && ev.nheaders == 3);
  CHECK(eq(ev.headers[0].name, "accept") && eq(ev.headers[1].value, "b") && eq(ev.headers[2].name, "content-length"));
  CHECK(lp_http_parse(&p, &ev) == LP_HTTP_BODY && eq(ev.body, "ok"));
  lp_http_free(&p);
  report("empty lines before a request, bare LF, repeated headers", ok);
}

static void test_keep_alive_and_expect(void) {
  int ok = 1;
  req r[2];
  int status;
  parse_all("GET / HTTP/1.1\r\nConnection: Close\r\n\r\n", 100, r, 2, &status);
  CHECK(!r[0].keep_alive);
  parse_all("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n", 100, r, 2, &status);
  CHECK(r[0].keep_alive);
  parse_all("GET / HTTP/1.0\r\n\r\n", 100, r, 2, &status);
  CHECK(!r[0].keep_alive);
  parse_all("GET / HTTP/1.1\r\nConnection: upgrade\r\nConnection: CLOSE\r\n\r\n", 100, r, 2, &status);
  CHECK(!r[0].keep_alive);
  parse_all("GET / HTTP/1.1\r\nExpect: 100-Continue\r\n\r\n", 100, r, 2, &status);
  CHECK(r[0].expect_continue);
  parse_all("GET / HTTP/1.1\r\nExpect: 100-continue\r\nExpect: 100-continue\r\n\r\n", 100, r, 2, &status);
  CHECK(!r[0].expect_continue);
  parse_all("GET / HTTP/1.0\r\nExpect: 100-continue\r\n\r\n", 100, r, 2, &status);
  CHECK(!r[0].expect_continue);
  report("keep-alive from version and Connection; Expect", ok);
}

static void test_limits(void) {
  int ok = 1;
  char line[512], big[1300];
  snprintf(line, sizeof line, "GET /%0100d HTTP/1.1\r\n\r\n", 0);
  CHECK(status_of(line) == 414);
  snprintf(line, sizeof line, "GET /%0100d%0100d", 0, 0); /* refused before the head ends */
  CHECK(status_of(line) == 414);
  snprintf(big, sizeof big, "GET / HTTP/1.1\r\nX: %01100d\r\n\r\n", 0);
  CHECK(status_of(big) == 431);
  big[1060] = '\0';
  CHECK(status_of(big) == 431);
  CHECK(status_of("POST / HTTP/1.1\r\nContent-Length: 101\r\n\r\n") == 413);
  CHECK(status_of("POST / HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n") == 413);
  CHECK(status_of("POST / HTTP/1.1\r\nContent-Length: 000000000000000000001\r\n\r\nx") == 413);
  char chunked[512];
  snprintf(chunked, sizeof chunked, "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n40\r\n%064d\r\n40\r\n", 0);
  CHECK(status_of(chunked) == 413);
  snprintf(chunked, sizeof chunked,
           "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n40\r\n%064d\r\n24\r\n%036d\r\n0\r\n\r\n", 0, 0);
  req r[1];
  int status;
  CHECK(parse_all(chunked, 7, r, 1, &status) == 1 && status == 0 && strlen(r[0].body) == 100);
  CHECK(status_of("POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1000000000000000\r\n") == 413);
  report("limits: 414, 431, 413", ok);
}

static void test_rejections(void) {
  int ok = 1;
  static const struct {
    const char *bytes;
    int status;
  } cases[] = {
      {"GET /\r\n\r\n", 400},
      {"GET / http/1.1\r\n\r\n", 400},
      {"GET  / HTTP/1.1\r\n\r\n", 400},
      {"G(T / HTTP/1.1\r\n\r\n", 400},
      {"GET / HTTP/1.1\r\nHost x\r\n\r\n", 400},
      {"GET / HTTP/1.1\r\nHost : x\r\n\r\n", 400},
      {"GET / HTTP/1.1\r\nA: b\r\n c\r\n\r\n", 400},
      {"GET / HTTP/1.1\r\n: b\r\n\r\n", 400},
      {"GET / HTTP/1.1\r\nA: b\x7f\r\n\r\n", 400},
      {"GET /\1 HTTP/1.1\r\n\r\n", 400},
      {"GET / HTTP/1.1\r\nA: b\rc\r\n\r\n", 400},
      {"POST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n", 400},
      {"POST / HTTP/1.1\r\nContent-Length: 1x\r\n\r\n", 400},
      {"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400},
      {"POST / HTTP/1.1\r\nContent-Length:\r\n\r\n", 400},
      {"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400},
      {"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 400},
      {"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n", 400},
      {"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400},
      {"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5x\r\n", 400},
      {"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nab\r\n", 400},
      {"GET / HTTP/2.0\r\n\r\n", 505},
      {"GET / HTTP/1.2\r\n\r\n", 505},
      {"GET / HTTP/01.1\r\n\r\n", 505},
  };
  for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
    int got = status_of(cases[i].bytes);
    if (got != cases[i].status) printf("# case %zu: got %d\n", i, got);
    CHECK(got == cases[i].status);
  }
  /* the NUL byte needs an explicit length */
  lp_http_parser p;
  lp_http_init(&p, &LIMITS);
  lp_http_event ev;
  lp_http_push(&p, "GET / HTTP/1.1\r\nA: b\0c\r\n\r\n", 26);
  CHECK(lp_http_parse(&p, &ev) == LP_HTTP_ERROR && ev.status == 400 && ev.message != NULL);
  CHECK(lp_http_buffered(&p) == 0 && !lp_http_in_progress(&p));
  lp_http_free(&p);
  report("malformed requests: 400 and 505", ok);
}

static void test_body_where_it_lies(void) {
  int ok = 1;
  lp_http_parser p;
  lp_http_init(&p, &LIMITS);
  lp_http_event ev;
  const char *b = "POST / HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc";
  lp_http_push(&p, b, strlen(b));
  CHECK(lp_http_parse(&p, &ev) == LP_HTTP_HEAD);
  CHECK(lp_http_parse(&p, &ev) == LP_HTTP_BODY && eq(ev.body, "abc"));
  CHECK(ev.body.ptr >= p.in.data && ev.body.ptr < p.in.data + p.in.cap); /* not copied */
  CHECK(p.body.len == 0);
  lp_http_free(&p);
  report("a body that came with its head is not copied", ok);
}

static void test_decode(void) {
  int ok = 1;
  char out[64];
  CHECK(lp_http_decode("/a%20b/%C3%bc", 13, out, 0) == 7 && memcmp(out, "/a b/\xc3\xbc", 7) == 0);
  CHECK(lp_http_decode("1+2", 3, out, 0) == 3 && memcmp(out, "1+2", 3) == 0);
  CHECK(lp_http_decode("1+2%2B", 6, out, 1) == 4 && memcmp(out, "1 2+", 4) == 0);
  CHECK(lp_http_decode("%2", 2, out, 0) == -1);
  CHECK(lp_http_decode("%", 1, out, 0) == -1);
  CHECK(lp_http_decode("a%zz", 4, out, 0) == -1);
  CHECK(lp_http_decode("%2x", 3, out, 0) == -1);
  CHECK(lp_http_decode("%%41", 4, out, 0) == -1);
  CHECK(lp_http_decode("%2541", 5, out, 0) == 3 && memcmp(out, "%41", 3) == 0);
  CHECK(lp_http_decode("", 0, out, 0) == 0);
  char in_place[] = "x%41%42+";
  CHECK(lp_http_decode(in_place, 8, in_place, 1) == 4 && memcmp(in_place, "xAB ", 4) == 0);
  report("percent-decoding", ok);
}

static void test_split_target(void) {
  int ok = 1;
  lp_slice path, query;
  CHECK(lp_http_split_target((lp_slice){"/a?b=1?c", 8}, &path, &query) == 0 && eq(path, "/a") && eq(query, "b=1?c"));
  CHECK(lp_http_split_target((lp_slice){"/a", 2}, &path, &query) == 0 && eq(path, "/a") && query.len == 0);
  CHECK(lp_http_split_target((lp_slice){"http://h:1/p?x=1", 16}, &path, &query) == 0 && eq(path, "/p") &&
        eq(query, "x=1"));
  CHECK(lp_http_split_target((lp_slice){"svn+ssh://h", 11}, &path, &query) == 0 && eq(path, "/"));
  CHECK(lp_http_split_target((lp_slice){"*", 1}, &path, &query) == 0 && eq(path, "*"));
  CHECK(lp_http_split_target((lp_slice){"x", 1}, &path, &query) == -1);
  CHECK(lp_http_split_target((lp_slice){"?a", 2}, &path, &query) == -1);
  CHECK(lp_http_split_target((lp_slice){"1http://h/", 10}, &path, &query) == -1);
  CHECK(lp_http_split_target((lp_slice){"", 0}, &path, &query) == -1);
  report("request targets: origin-form, absolute-form, *", ok);
}

static void test_query_pairs(void) {
  int ok = 1;
  lp_slice q = {"&a=1&&b&=x&c=&a=2=3&", 20}, k, v;
  size_t pos = 0;
  int has;
  const char *want[][2] = {{"a", "1"}, {"b", ""}, {"", "x"}, {"c", ""}, {"a", "2=3"}};
  const int want_has[] = {1, 0, 1, 1, 1};
  for (size_t i = 0; i < 5; i++) {
    CHECK(lp_http_query_next(q, &pos, &k, &v, &has) == 1);
    CHECK(eq(k, want[i][0]) && eq(v, want[i][1]) && has == want_has[i]);
  }
  CHECK(lp_http_query_next(q, &pos, &k, &v, &has) == 0);
  pos = 0;
  CHECK(lp_http_query_next((lp_slice){"", 0}, &pos, &k, &v, &has) == 0);
  report("query pairs", ok);
}

static void test_large_buffers_are_freed(void) {
  int ok = 1;
  lp_http_limits limits = {1024, 1 << 20, 64};
  lp_http_parser p;
  lp_http_init(&p, &limits);
  lp_http_event ev;
  const char *head = "POST / HTTP/1.1\r\nContent-Length: 200000\r\n\r\n";
  lp_http_push(&p, head, strlen(head));
  CHECK(lp_http_parse(&p, &ev) == LP_HTTP_HEAD && lp_http_parse(&p, &ev) == LP_HTTP_MORE);
  char *chunk = calloc(1, 50000);
  for (int i = 0; i < 4; i++) lp_http_push(&p, chunk, 50000);
  free(chunk);
  CHECK(lp_http_parse(&p, &ev) == LP_HTTP_BODY && ev.body.len == 200000);
  lp_http_push(&p, "GET / HTTP/1.1\r\n\r\n", 18);
  CHECK(p.body.data == NULL); /* the big body buffer went with the next call */
  CHECK(lp_http_parse(&p, &ev) == LP_HTTP_HEAD && lp_http_parse(&p, &ev) == LP_HTTP_BODY);
  lp_http_free(&p);
  report("large buffers are freed once used", ok);
}

int main(void) {
  test_get_in_one_piece();
  test_any_split_gives_the_same();
  test_incomplete_head_and_body();
  test_chunked();
  test_lines_and_headers();
  test_keep_alive_and_expect();
  test_limits();
  test_rejections();
  test_body_where_it_lies();
  test_decode();
  test_split_target();
  test_query_pairs();
  test_large_buffers_are_freed();
  printf("1..%d\n", test_no);
  return failures ? 1 : 0;
}
