/* fuzz_http: libFuzzer harness for lp_http. The input (a few config bytes, then a byte
 * stream a client could send) is parsed whole and fed in pieces; the two readings must
 * agree, and each head the parser accepts or refuses is checked against a reference head
 * parser written here from RFC 9112 and the project's rules (not from lp_http.c). Target
 * splitting, percent-decoding and query pairs are checked against references too. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lp_fast.h"
#include "lp_http.h"
#include "lp_json.h"
#include "lp_stats.h"

#define CHECK(cond)                                                                    \
  do {                                                                                 \
    if (!(cond)) {                                                                     \
      fprintf(stderr, "fuzz_http: invariant failed: %s (line %d)\n", #cond, __LINE__); \
      abort();                                                                         \
    }                                                                                  \
  } while (0)

/* ---- allocation failures (build.sh links with -Wl,--wrap=...): armed only inside lp_http
 * calls, so the harness's own allocations never fail ---- */

void *__real_malloc(size_t n);
void *__real_calloc(size_t n, size_t size);
void *__real_realloc(void *p, size_t n);

static int alloc_armed;
static long alloc_countdown = -1; /* allocations to let through before the one that fails */
static int alloc_failed;

static int fail_now(void) {
  if (!alloc_armed || alloc_countdown < 0) return 0;
  if (alloc_countdown-- > 0) return 0;
  alloc_failed = 1;
  return 1;
}

void *__wrap_malloc(size_t n) { return fail_now() ? NULL : __real_malloc(n); }
void *__wrap_calloc(size_t n, size_t size) { return fail_now() ? NULL : __real_calloc(n, size); }
void *__wrap_realloc(void *p, size_t n) { return fail_now() ? NULL : __real_realloc(p, n); }

/* Each piece handed to the parser lives in an allocation of its exact size, so reading one
 * byte past it is an ASan report. */
static char *dup_exact(const void *p, size_t n) {
  char *d = malloc(n ? n : 1);
  CHECK(d);
  if (n) memcpy(d, p, n);
  return d;
}

/* ---- what a run of the parser produced, serialized so two runs compare with memcmp ---- */

typedef struct run {
  lp_buf events; /* 'H' head fields, 'B' body, one after the other */
  size_t requests;
  int status; /* the error, 0 when none */
  const char *message;
  size_t buffered;
  int in_progress;
  int oom; /* an allocation failed: the run is only checked for safety */
} run;

static void put(lp_buf *b, const void *p, size_t n) {
  uint32_t len = (uint32_t)n;
  CHECK(lp_buf_append(b, &len, sizeof len) == 0);
  CHECK(lp_buf_append(b, p, n) == 0);
}

static void record_head(run *r, const lp_http_event *ev) {
  lp_buf *b = &r->events;
  char flags[4] = {'H', (char)ev->minor, (char)ev->keep_alive, (char)ev->expect_continue};
  CHECK(lp_buf_append(b, flags, 4) == 0);
  put(b, ev->method.ptr, ev->method.len);
  put(b, ev->target.ptr, ev->target.len);
  put(b, &ev->nheaders, sizeof ev->nheaders);
  for (size_t i = 0; i < ev->nheaders; i++) {
    put(b, ev->headers[i].name.ptr, ev->headers[i].name.len);
    put(b, ev->headers[i].value.ptr, ev->headers[i].value.len);
  }
}

/* Parses until the parser needs more bytes; returns 0 once it reported an error. */
static int drain(lp_http_parser *p, run *r, int *in_head) {
  lp_http_event ev;
  /* each pass reports an event or stops */
  for (;;) {
    memset(&ev, 0xa5, sizeof ev);
    alloc_armed = 1;
    int rc = lp_http_parse(p, &ev);
    alloc_armed = 0;
    if (rc == LP_HTTP_MORE) return 1;
    if (rc == LP_HTTP_ERROR) {
      CHECK(ev.message != NULL && strlen(ev.message) > 0);
      CHECK(ev.status == 400 || ev.status == 413 || ev.status == 414 || ev.status == 431 || ev.status == 505 ||
            (ev.status == 500 && alloc_failed));
      r->status = ev.status;
      r->message = ev.message;
      CHECK(lp_http_buffered(p) == 0 && !lp_http_in_progress(p));
      return 0;
    }
    if (rc == LP_HTTP_HEAD) {
      CHECK(!*in_head);
      *in_head = 1;
      CHECK(ev.minor == 0 || ev.minor == 1);
      CHECK(ev.method.len > 0 && ev.target.len > 0 && ev.target.len <= p->limits.max_url_bytes);
      for (size_t i = 0; i < ev.nheaders; i++) {
        lp_slice n = ev.headers[i].name, v = ev.headers[i].value;
        CHECK(n.len > 0);
        for (size_t k = 0; k < n.len; k++) CHECK(!(n.ptr[k] >= 'A' && n.ptr[k] <= 'Z') && n.ptr[k] != ':');
        if (v.len) CHECK(v.ptr[0] != ' ' && v.ptr[0] != '\t' && v.ptr[v.len - 1] != ' ' && v.ptr[v.len - 1] != '\t');
        CHECK(!memchr(v.ptr, '\r', v.len) && !memchr(v.ptr, '\n', v.len) && !memchr(v.ptr, '\0', v.len));
      }
      CHECK(lp_http_in_progress(p));
      record_head(r, &ev);
      continue;
    }
    CHECK(rc == LP_HTTP_BODY && *in_head);
    *in_head = 0;
    CHECK(ev.body.len <= p->limits.max_body_bytes);
    CHECK(lp_buf_append(&r->events, "B", 1) == 0);
    put(&r->events, ev.body.ptr ? ev.body.ptr : "", ev.body.len);
    r->requests++;
  }
}

/* Feeds data[0..size) in pieces whose sizes come from seed (0: all at once). */
static void parse_stream(const lp_http_limits *limits, const uint8_t *data, size_t size, unsigned seed, run *r) {
  memset(r, 0, sizeof *r);
  lp_http_parser p;
  lp_http_init(&p, limits);
  uint32_t x = seed * 2654435761u + 1;
  size_t i = 0;
  int in_head = 0, going = 1;
  while (going && i < size) {
    size_t n = size - i;
    if (seed) {
      x = x * 1103515245u + 12345u;
      size_t k = 1 + (x >> 16) % (seed % 8 == 0 ? 3 : 40);
      if (k < n) n = k;
    }
    char *piece = dup_exact(data + i, n);
    alloc_armed = 1;
    int rc = lp_http_push(&p, piece, n);
    alloc_armed = 0;
    free(piece);
    CHECK(rc == 0 || alloc_failed);
    i += n;
    going = drain(&p, r, &in_head);
  }
  if (!going) {
    /* after an error the parser starts afresh */
    CHECK(!lp_http_in_progress(&p));
  }
  r->buffered = lp_http_buffered(&p);
  r->in_progress = lp_http_in_progress(&p);
  r->oom = alloc_failed;
  lp_http_free(&p);
  CHECK(p.in.data == NULL && p.body.data == NULL && p.headers == NULL);
}

/* Errors a parser fed in pieces may report before the whole head or trailer is there: it
 * refuses what is already too long, where the whole input would be judged on what follows. */
static int early_error(const run *r) {
  return (r->status == 414 && strcmp(r->message, "request line too long") == 0) ||
         (r->status == 431 && strcmp(r->message, "request header too large") == 0) ||
         (r->status == 400 && strcmp(r->message, "chunk size line too long") == 0) ||
         (r->status == 431 && strcmp(r->message, "trailer too large") == 0);
}

/* ---- a reference head parser: one complete head (ending with the empty line) ---- */

static int ref_tchar(unsigned char c) {
  if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9')) return 1;
  return c != 0 && strchr("!#$%&'*+-.^_`|~", c) != NULL;
}

static int ref_space(unsigned char c) { return c == ' ' || (c >= '\t' && c <= '\r'); }

typedef struct ref_head {
  int status; /* 0: accepted */
  int minor, keep_alive, expect_continue;
  size_t nheaders; /* after dropping repeats of an identical Content-Length */
  int framing;     /* 0 none, 1 Content-Length, 2 chunked */
  uint64_t length;
} ref_head;

static int ieq(const unsigned char *s, size_t n, const char *lit) {
  if (strlen(lit) != n) return 0;
  for (size_t i = 0; i < n; i++) {
    unsigned char c = s[i];
    if (c >= 'A' && c <= 'Z') c += 32;
    if (c != (unsigned char)lit[i]) return 0;
  }
  return 1;
}

static int icontains(const unsigned char *s, size_t n, const char *lit) {
  size_t m = strlen(lit);
  for (size_t i = 0; i + m <= n; i++)
    if (ieq(s + i, m, lit)) return 1;
  return 0;
}

/* The project's order of checks: request line (414 when that line is too long, else 400),
 * target length 414, head size 431, control bytes 400, method 400, version 505, header lines
 * 400 (a line, then its name), a conflicting Content-Length 400, framing 400/413. */
static ref_head ref_parse_head(const unsigned char *h, size_t n, const lp_http_limits *lim) {
  ref_head r;
  memset(&r, 0, sizeof r);
  size_t eol = 0;
  while (h[eol] != '\n') eol++;
  size_t line_len = eol;
  size_t end = eol > 0 && h[eol - 1] == '\r' ? eol - 1 : eol;
  /* METHOD SP TARGET SP "HTTP/" 1*DIGIT "." 1*DIGIT, no other white space */
  size_t sp1 = 0;
  while (sp1 < end && !ref_space(h[sp1])) sp1++;
  size_t sp2 = sp1 + 1;
  while (sp2 < end && !ref_space(h[sp2])) sp2++;
  int shape = sp1 > 0 && sp1 < end && h[sp1] == ' ' && sp2 > sp1 + 1 && sp2 < end && h[sp2] == ' ';
  size_t v = sp2 + 1, dot = 0, digits_a = 0, digits_b = 0;
  if (shape) shape = end - v > 5 && memcmp(h + v, "HTTP/", 5) == 0;
  if (shape) {
    size_t k = v + 5;
    while (k < end && h[k] >= '0' && h[k] <= '9') k++, digits_a++;
    shape = digits_a > 0 && k < end && h[k] == '.';
    dot = k;
    k++;
    while (shape && k < end && h[k] >= '0' && h[k] <= '9') k++, digits_b++;
    shape = shape && digits_b > 0 && k == end;
  }
  if (!shape) {
    r.status = line_len > lim->max_url_bytes + 20 ? 414 : 400;
    return r;
  }
  if (sp2 - sp1 - 1 > lim->max_url_bytes) return r.status = 414, r;
  if (n > lim->max_header_bytes) return r.status = 431, r;
  for (size_t i = 0; i < n; i++) {
    unsigned char c = h[i];
    if ((c < 32 && c != '\t' && c != '\n' && c != '\r') || c == 127) return r.status = 400, r;
    if (c == '\r' && h[i + 1] != '\n') return r.status = 400, r;
  }
  for (size_t i = 0; i < sp1; i++)
    if (!ref_tchar(h[i])) return r.status = 400, r;
  if (digits_a != 1 || h[v + 5] != '1' || digits_b != 1 || (h[dot + 1] != '0' && h[dot + 1] != '1'))
    return r.status = 505, r;
  r.minor = h[dot + 1] - '0';
  const unsigned char *cl = NULL, *te = NULL, *expect = NULL;
  size_t cl_len = 0, te_len = 0, expect_len = 0, te_n = 0, expect_n = 0;
  int connection = 0, close = 0, keep = 0;
  size_t at = eol + 1;
  for (;;) {
    size_t e = at;
    while (h[e] != '\n') e++;
    size_t le = e > at && h[e - 1] == '\r' ? e - 1 : e;
    if (le == at) break; /* the empty line */
    const unsigned char *colon = memchr(h + at, ':', le - at);
    if (!colon || colon == h + at) return r.status = 400, r;
    size_t name_len = (size_t)(colon - (h + at));
    for (size_t k = 0; k < name_len; k++)
      if (!ref_tchar(h[at + k])) return r.status = 400, r;
    size_t vs = name_len + 1 + at, ve = le;
    while (vs < ve && (h[vs] == ' ' || h[vs] == '\t')) vs++;
    while (ve > vs && (h[ve - 1] == ' ' || h[ve - 1] == '\t')) ve--;
    const unsigned char *name = h + at, *value = h + vs;
    size_t value_len = ve - vs;
    int counted = 1;
    if (ieq(name, name_len, "content-length")) {
      if (cl && (cl_len != value_len || memcmp(cl, value, cl_len) != 0)) return r.status = 400, r;
      if (cl) counted = 0;
      cl = value, cl_len = value_len;
    } else if (ieq(name, name_len, "transfer-encoding")) {
      if (te_n++ == 0) te = value, te_len = value_len;
    } else if (ieq(name, name_len, "expect")) {
      if (expect_n++ == 0) expect = value, expect_len = value_len;
    } else if (ieq(name, name_len, "connection")) {
      connection = 1;
      close |= icontains(value, value_len, "close");
      keep |= icontains(value, value_len, "keep-alive");
    }
    r.nheaders += (size_t)counted;
    at = e + 1;
  }
  r.keep_alive = connection ? !close && (r.minor == 1 || keep) : r.minor == 1;
  r.expect_continue = expect_n == 1 && r.minor == 1 && ieq(expect, expect_len, "100-continue");
  if (te_n) {
    if (cl) return r.status = 400, r;
    if (te_n > 1 || !ieq(te, te_len, "chunked")) return r.status = 400, r;
    r.framing = 2;
    return r;
  }
  if (cl) {
    if (cl_len == 0) return r.status = 400, r;
    for (size_t k = 0; k < cl_len; k++)
      if (cl[k] < '0' || cl[k] > '9') return r.status = 400, r;
    if (cl_len > 15) return r.status = 413, r;
    for (size_t k = 0; k < cl_len; k++) r.length = r.length * 10 + (uint64_t)(cl[k] - '0');
    if (r.length > lim->max_body_bytes) return r.status = 413, r;
    r.framing = r.length > 0;
  }
  return r;
}

/* The first request of the stream, head only, against the reference. */
static void check_first_head(const lp_http_limits *lim, const uint8_t *data, size_t size) {
  size_t pos = 0;
  while (pos < size && (data[pos] == '\r' || data[pos] == '\n')) pos++;
  size_t end = 0;
  int found = 0;
  for (size_t i = pos; i < size && !found; i++) {
    if (data[i] != '\n') continue;
    if (i + 1 < size && data[i + 1] == '\n')
      end = i + 1, found = 1;
    else if (i + 2 < size && data[i + 1] == '\r' && data[i + 2] == '\n')
      end = i + 2, found = 1;
  }
  lp_http_parser p;
  lp_http_init(&p, lim);
  char *copy = dup_exact(data, size);
  CHECK(lp_http_push(&p, copy, size) == 0);
  free(copy);
  lp_http_event ev;
  int rc = lp_http_parse(&p, &ev);
  if (!found) {
    size_t n = size - pos;
    int want = (n > lim->max_url_bytes + 20 && !memchr(data + pos, '\n', n)) ? 414
               : n > lim->max_header_bytes                                   ? 431
                                                                             : 0;
    CHECK(want ? (rc == LP_HTTP_ERROR && ev.status == want) : rc == LP_HTTP_MORE);
  } else {
    ref_head ref = ref_parse_head(data + pos, end - pos + 1, lim);
    if (ref.status) {
      CHECK(rc == LP_HTTP_ERROR && ev.status == ref.status);
    } else {
      CHECK(rc == LP_HTTP_HEAD);
      CHECK(ev.minor == ref.minor && ev.keep_alive == ref.keep_alive && ev.expect_continue == ref.expect_continue);
      CHECK(ev.nheaders == ref.nheaders);
      CHECK(ev.method.ptr == (const char *)p.in.data + pos);
      size_t avail = size - (end + 1);
      rc = lp_http_parse(&p, &ev);
      if (ref.framing == 0) CHECK(rc == LP_HTTP_BODY && ev.body.len == 0);
      if (ref.framing == 1) {
        if (avail >= ref.length)
          CHECK(rc == LP_HTTP_BODY && ev.body.len == ref.length &&
                memcmp(ev.body.ptr, data + end + 1, ref.length) == 0);
        else
          CHECK(rc == LP_HTTP_MORE && lp_http_in_progress(&p));
      }
    }
  }
  lp_http_free(&p);
}

/* ---- targets, percent-decoding and query pairs ---- */

static int ref_hex(unsigned char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

static void check_decoding(const uint8_t *data, size_t size) {
  char *in = dup_exact(data, size);
  char *out = malloc(size ? size : 1);
  char *ref = malloc(size ? size : 1);
  CHECK(out && ref);
  for (int plus = 0; plus <= 1; plus++) {
    ssize_t got = lp_http_decode(in, size, out, plus);
    ssize_t want = 0;
    for (size_t i = 0; i < size && want >= 0; i++) {
      if (data[i] == '%') {
        int a = i + 2 < size ? ref_hex(data[i + 1]) : -1;
        int b = i + 2 < size ? ref_hex(data[i + 2]) : -1;
        if (a < 0 || b < 0) {
          want = -1;
        } else {
          ref[want++] = (char)(a * 16 + b);
          i += 2;
        }
      } else {
        ref[want++] = (char)(plus && data[i] == '+' ? ' ' : data[i]);
      }
    }
    CHECK(got == want);
    if (got > 0) CHECK(memcmp(out, ref, (size_t)got) == 0);
  }
  /* decoding in place gives the same */
  ssize_t a = lp_http_decode(in, size, out, 1);
  ssize_t b = lp_http_decode(in, size, in, 1);
  CHECK(a == b);
  if (a > 0) CHECK(memcmp(in, out, (size_t)a) == 0);
  free(in);
  free(out);
  free(ref);

  /* the target: the path is a suffix-free prefix of what comes before '?' */
  char *t = dup_exact(data, size);
  lp_slice path, query;
  int rc = lp_http_split_target((lp_slice){t, size}, &path, &query);
  const uint8_t *q = size ? memchr(data, '?', size) : NULL;
  size_t plen = q ? (size_t)(q - data) : size;
  CHECK(query.len == (q ? size - plen - 1 : 0));
  if (query.len) CHECK(query.ptr == t + plen + 1);
  if (rc == 0) {
    if (plen > 0 && data[0] == '/') {
      CHECK(path.ptr == t && path.len == plen);
    } else if (plen == 1 && data[0] == '*') {
      CHECK(path.len == 1 && path.ptr[0] == '*');
    } else {
      const uint8_t *sep = plen >= 3 ? memmem(data, plen, "://", 3) : NULL;
      CHECK(sep != NULL && sep > data);
      const uint8_t *slash = memchr(sep + 3, '/', plen - (size_t)(sep + 3 - data));
      if (slash)
        CHECK(path.ptr == t + (slash - data) && path.len == plen - (size_t)(slash - data));
      else
        CHECK(path.len == 1 && path.ptr[0] == '/');
    }
  } else {
    CHECK(!(plen > 0 && data[0] == '/') && !(plen == 1 && data[0] == '*'));
  }

  /* query pairs: the pieces between '&'s, in order, none empty */
  size_t pos = 0, at = 0;
  lp_slice k, v;
  int has;
  /* each pass consumes a piece */
  while (lp_http_query_next((lp_slice){t, size}, &pos, &k, &v, &has)) {
    while (at < size && data[at] == '&') at++;
    size_t e = at;
    while (e < size && data[e] != '&') e++;
    CHECK(k.ptr == t + at && e > at);
    const uint8_t *eq = memchr(data + at, '=', e - at);
    CHECK(has == (eq != NULL));
    if (eq) {
      CHECK(k.len == (size_t)(eq - (data + at)) && v.ptr == t + (eq - data) + 1 &&
            v.len == e - (size_t)(eq - data) - 1);
    } else {
      CHECK(k.len == e - at && v.len == 0);
    }
    at = e;
  }
  while (at < size && data[at] == '&') at++;
  CHECK(at == size && pos == size);
  free(t);
}

/* The C path's reading of a subscription (lp_fast): whatever the query, an answer it accepts
 * holds 1..max valid UTF-8 categories within the size bound, in the scratch buffer, a lower-case
 * UUID when it has a last_id and a cursor for it; a stream's resume header, when valid, sets the
 * cursor whatever the query says. */
static void check_fast(const uint8_t *data, size_t size, unsigned b) {
  lp_slice query = {(const char *)data, size};
  lp_fast_limits lim = {1 + b % 8, 1 + (b >> 3) % 4, 1 + (b >> 5)};
  lp_buf scratch = LP_BUF_INIT;
  lp_fast_sub sub;
  for (int stream = 0; stream < 3; stream++) {
    lp_slice header = {stream == 2 ? "-7_0b0c7a39-1D6E-4d0b-9b61-6f2d3c3e9a10" : NULL, stream == 2 ? 39 : 0};
    int rc = stream ? lp_fast_parse_stream(query, header, &lim, &scratch, &sub)
                    : lp_fast_parse_subscription(query, &lim, &scratch, &sub);
    CHECK(rc == 1 || rc == 0 || rc == -1);
    if (rc != 1) continue;
    CHECK(sub.ncategories >= 1 && sub.ncategories <= lim.max_categories);
    for (size_t i = 0; i < sub.ncategories; i++) {
      lp_slice c = sub.categories[i];
      CHECK(c.len >= 1 && c.len <= lim.max_category_bytes && lp_utf8_is_valid(c.ptr, c.len));
      CHECK(c.ptr >= scratch.data && c.ptr + c.len <= scratch.data + scratch.len);
    }
    if (sub.has_last_id) {
      CHECK(sub.has_since && lp_uuid_is_valid(sub.last_id, strlen(sub.last_id)));
      for (const char *p = sub.last_id; *p; p++) CHECK(!(*p >= 'A' && *p <= 'Z'));
    }
    if (!stream) CHECK(sub.timeout_s >= 1 && sub.timeout_s <= lim.max_timeout_s);
    if (stream == 2)
      CHECK(sub.has_since && sub.since == -7 && strcmp(sub.last_id, "0b0c7a39-1d6e-4d0b-9b61-6f2d3c3e9a10") == 0);
  }
  lp_buf_free(&scratch);
}

/* The stats handler's reading of a request (lp_stats): whatever the query and Accept, an answer
 * it takes is one of the three, and a page within the bounds the Lua handler checks. */
static void check_stats(const uint8_t *data, size_t size, unsigned b) {
  lp_slice query = {(const char *)data, size};
  lp_slice accept = {(const char *)data, size / 2};
  lp_stats_request r;
  int rc = lp_stats_parse_request(query, (b & 1) ? accept : (lp_slice){NULL, 0}, (int)(b & 2), &r);
  CHECK(rc == 0 || rc == 1);
  if (rc != 1) return;
  CHECK(r.answer == LP_STATS_ANSWER_JSON || r.answer == LP_STATS_ANSWER_PROMETHEUS ||
        r.answer == LP_STATS_ANSWER_DASHBOARD);
  if (r.has_page) {
    CHECK(b & 2);
    CHECK(r.limit >= 1 && r.limit <= LP_STATS_MAX_CATEGORY_LIMIT && r.offset <= LP_STATS_MAX_CATEGORY_OFFSET);
  }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (size < 4) return 0;
  lp_http_limits lim = {16 + 4 * (size_t)data[0], 1 + (size_t)data[1], 1 + (size_t)data[2] % 96};
  unsigned b3 = data[3];
  data += 4, size -= 4;
  alloc_countdown = -1;
  alloc_failed = 0;

  run whole, pieces;
  parse_stream(&lim, data, size, 0, &whole);
  if (b3 & 0x80) alloc_countdown = b3 & 0x1f;
  parse_stream(&lim, data, size, 1 + (b3 & 0x7f), &pieces);
  alloc_countdown = -1;

  /* 1. Pieces or whole: the same requests, and an error the whole reading reports is
   * reported in pieces too, the same or an early one. */
  if (!pieces.oom) {
    CHECK(pieces.requests <= whole.requests);
    CHECK(pieces.events.len <= whole.events.len);
    if (pieces.events.len) CHECK(memcmp(pieces.events.data, whole.events.data, pieces.events.len) == 0);
    if (pieces.events.len < whole.events.len) CHECK(pieces.status && early_error(&pieces));
    if (pieces.events.len == whole.events.len) {
      if (whole.status)
        CHECK(pieces.status == whole.status ? (strcmp(pieces.message, whole.message) == 0 || early_error(&pieces))
                                            : early_error(&pieces));
      else if (pieces.status)
        CHECK(early_error(&pieces));
      else
        CHECK(pieces.buffered == whole.buffered && pieces.in_progress == whole.in_progress);
    }
  }
  lp_buf_free(&whole.events);
  lp_buf_free(&pieces.events);

  /* 2. The first head against the reference. */
  check_first_head(&lim, data, size);

  /* 3. The bytes as a target, as a string to decode and as a query string. */
  check_decoding(data, size);

  /* 4. The bytes as the query of a long poll and of a stream, as the C path reads them. */
  check_fast(data, size, b3);

  /* 5. The bytes as the query (and Accept) of a stats request. */
  check_stats(data, size, b3);
  return 0;
}
