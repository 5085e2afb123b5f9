/* lp_http: the server's HTTP/1.x request parser and target decoding (see lp_http.h). The
 * rules, limits and messages are those the Lua parser had (spec/http_parser_spec.lua). */
#include "lp_http.h"

#include <stdlib.h>
#include <string.h>

enum { ST_HEAD, ST_NO_BODY, ST_BODY, ST_CHUNK_SIZE, ST_CHUNK_DATA, ST_CHUNK_END, ST_TRAILER };

/* A received buffer this large is freed once it is empty rather than kept for the next request. */
#define KEEP_BYTES (64 * 1024)

#define TOKEN 1 /* tchar (RFC 9110 5.6.2) */
#define CTL 2   /* never allowed in a head: controls but HT, LF and CR */
#define SPACE 4 /* isspace() in the C locale, which ends the method and the target */
#define HEX 8

static const unsigned char byte_class[256] = {
    2, 2, 2, 2, 2, 2, 2, 2, 2, 4, 4, 6, 6, 4, 2, 2,  //
    2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2,  //
    4, 1, 0, 1, 1, 1, 1, 1, 0, 0, 1, 1, 0, 1, 1, 0,  //
    9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 0, 0, 0, 0, 0, 0,  //
    0, 9, 9, 9, 9, 9, 9, 1, 1, 1, 1, 1, 1, 1, 1, 1,  //
    1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 1, 1,  //
    1, 9, 9, 9, 9, 9, 9, 1, 1, 1, 1, 1, 1, 1, 1, 1,  //
    1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 1, 0, 1, 2,  //
};

#define IS(c, k) (byte_class[(unsigned char)(c)] & (k))

static int hex_value(unsigned char c) {
  if (c >= '0' && c <= '9') return c - '0';
  c |= 0x20;
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  return -1;
}

static unsigned char lower(unsigned char c) { return (c >= 'A' && c <= 'Z') ? (unsigned char)(c | 0x20) : c; }

static int equals_lower(lp_slice s, const char *lit) {
  size_t n = strlen(lit);
  if (s.len != n) return 0;
  for (size_t i = 0; i < n; i++)
    if (lower((unsigned char)s.ptr[i]) != (unsigned char)lit[i]) return 0;
  return 1;
}

/* Whether lit (lower case) occurs in s, ignoring case. */
static int contains_lower(lp_slice s, const char *lit) {
  size_t n = strlen(lit);
  for (size_t i = 0; i + n <= s.len; i++) {
    size_t k = 0;
    while (k < n && lower((unsigned char)s.ptr[i + k]) == (unsigned char)lit[k]) k++;
    if (k == n) return 1;
  }
  return 0;
}

static int all_token(const char *s, size_t n) {
  for (size_t i = 0; i < n; i++)
    if (!IS(s[i], TOKEN)) return 0;
  return n > 0;
}

void lp_http_init(lp_http_parser *p, const lp_http_limits *limits) {
  memset(p, 0, sizeof *p);
  p->limits = *limits;
  p->state = ST_HEAD;
}

void lp_http_free(lp_http_parser *p) {
  lp_http_limits limits = p->limits;
  lp_buf_free(&p->in);
  lp_buf_free(&p->body);
  free(p->headers);
  lp_http_init(p, &limits);
}

/* What the previous call handed out is dropped once the caller comes back; a large buffer
 * left empty is freed then (not earlier: a body may point into it). */
static void forget_body(lp_http_parser *p) {
  if (p->in.len == 0 && p->in.cap > KEEP_BYTES) lp_buf_free(&p->in);
  if (p->state != ST_HEAD || !p->body.data) return;
  if (p->body.cap > KEEP_BYTES)
    lp_buf_free(&p->body);
  else
    lp_buf_reset(&p->body);
}

/* Empties the received buffer once everything in it is consumed (its memory is kept). */
static void drop_consumed(lp_http_parser *p) {
  if (p->pos < p->in.len) return;
  p->in.len = p->pos = p->scan = 0;
}

int lp_http_push(lp_http_parser *p, const char *data, size_t len) {
  forget_body(p);
  if (p->pos > 0) {
    size_t rest = p->in.len - p->pos;
    memmove(p->in.data, p->in.data + p->pos, rest);
    p->in.len = rest;
    p->scan = p->scan > p->pos ? p->scan - p->pos : 0;
    p->pos = 0;
  }
  /* The bytes of a body being waited for go to the body directly: copied once. */
  if (p->state == ST_BODY && p->in.len == 0 && len > 0) {
    size_t take = len < p->remaining ? len : (size_t)p->remaining;
    if (lp_buf_append(&p->body, data, take) != 0) {
      p->oom = 1;
      return -1;
    }
    p->remaining -= take;
    data += take;
    len -= take;
  }
  if (lp_buf_append(&p->in, data, len) != 0) {
    p->oom = 1;
    return -1;
  }
  return 0;
}

size_t lp_http_buffered(const lp_http_parser *p) { return p->in.len - p->pos; }

int lp_http_in_progress(const lp_http_parser *p) { return p->state != ST_HEAD || p->pos < p->in.len; }

static int fail(lp_http_parser *p, lp_http_event *ev, int status, const char *message) {
  p->in.len = p->pos = p->scan = 0;
  p->state = ST_HEAD;
  p->remaining = p->body_len = 0;
  p->oom = 0;
  lp_buf_reset(&p->body);
  if (p->in.cap > KEEP_BYTES) lp_buf_free(&p->in);
  if (p->body.cap > KEEP_BYTES) lp_buf_free(&p->body);
  ev->status = status;
  ev->message = message;
  return LP_HTTP_ERROR;
}

static int finish(lp_http_parser *p, lp_http_event *ev, const char *body, size_t len) {
  ev->body.ptr = body;
  ev->body.len = len;
  p->state = ST_HEAD;
  p->remaining = p->body_len = 0;
  drop_consumed(p);
  p->scan = p->pos;
  return LP_HTTP_BODY;
}

/* "METHOD SP TARGET SP HTTP/digits.digits" then CRLF or LF, at the start of h[0..n). */
static int request_line(const char *h, size_t n, lp_http_event *ev, lp_slice *major, lp_slice *minor, size_t *next) {
  size_t i = 0;
  while (i < n && !IS(h[i], SPACE)) i++;
  if (i == 0 || i >= n || h[i] != ' ') return 0;
  ev->method.ptr = h;
  ev->method.len = i++;
  size_t t = i;
  while (i < n && !IS(h[i], SPACE)) i++;
  if (i == t || n - i < 6 || memcmp(h + i, " HTTP/", 6) != 0) return 0;
  ev->target.ptr = h + t;
  ev->target.len = i - t;
  i += 6;
  size_t a = i;
  while (i < n && h[i] >= '0' && h[i] <= '9') i++;
  if (i == a || i >= n || h[i] != '.') return 0;
  major->ptr = h + a;
  major->len = i - a;
  size_t b = ++i;
  while (i < n && h[i] >= '0' && h[i] <= '9') i++;
  if (i == b) return 0;
  minor->ptr = h + b;
  minor->len = i - b;
  if (i < n && h[i] == '\r') i++;
  if (i >= n || h[i] != '\n') return 0;
  *next = i + 1;
  return 1;
}

static int add_header(lp_http_parser *p, size_t n, lp_slice name, lp_slice value) {
  if (n == p->headers_cap) {
    size_t cap = p->headers_cap ? p->headers_cap * 2 : 16;
    lp_http_header *h = realloc(p->headers, cap * sizeof *h);
    if (!h) return -1;
    p->headers = h;
    p->headers_cap = cap;
  }
  p->headers[n].name = name;
  p->headers[n].value = value;
  return 0;
}

static int parse_head(lp_http_parser *p, lp_http_event *ev) {
  const lp_http_limits *lim = &p->limits;
  char *buf = p->in.data;
  size_t len = p->in.len, pos = p->pos;
  /* RFC 9112 2.2: empty lines before a request line are ignored (some clients send one after
   * a POST body). */
  while (pos < len && (buf[pos] == '\r' || buf[pos] == '\n')) pos++;
  p->pos = pos;
  size_t scan = p->scan > pos ? p->scan : pos, end = 0;
  int found = 0;
  while (scan < len) {
    const char *nl = memchr(buf + scan, '\n', len - scan);
    if (!nl) break;
    size_t i = (size_t)(nl - buf);
    if (i + 1 < len && buf[i + 1] == '\n') {
      end = i + 1, found = 1;
      break;
    }
    if (i + 2 < len && buf[i + 1] == '\r' && buf[i + 2] == '\n') {
      end = i + 2, found = 1;
      break;
    }
    scan = i + 1;
  }
  if (!found) {
    size_t n = len - pos;
    /* "DELETE " + " HTTP/1.1\r\n" is the slack beyond the target itself. */
    if (n > 20 && n - 20 > lim->max_url_bytes && !memchr(buf + pos, '\n', n))
      return fail(p, ev, 414, "request line too long");
    if (n > lim->max_header_bytes) return fail(p, ev, 431, "request header too large");
    /* The terminator is at most 3 bytes long, so only its last 2 bytes need another look. */
    p->scan = len >= 2 ? len - 2 : 0;
    return LP_HTTP_MORE;
  }
  char *h = buf + pos;
  size_t hlen = end - pos + 1;

  lp_slice major, minor;
  size_t i;
  if (!request_line(h, hlen, ev, &major, &minor, &i)) {
    size_t line = (size_t)((const char *)memchr(h, '\n', hlen) - h);
    if (line > 20 && line - 20 > lim->max_url_bytes) return fail(p, ev, 414, "request line too long");
    return fail(p, ev, 400, "malformed request line");
  }
  if (ev->target.len > lim->max_url_bytes) return fail(p, ev, 414, "request target too long");
  if (hlen > lim->max_header_bytes) return fail(p, ev, 431, "request header too large");
  for (size_t k = 0; k < hlen; k++) {
    /* the head ends with '\n', so h[k + 1] exists after a CR */
    if (IS(h[k], CTL) || (h[k] == '\r' && h[k + 1] != '\n'))
      return fail(p, ev, 400, "control character in request head");
  }
  if (!all_token(ev->method.ptr, ev->method.len)) return fail(p, ev, 400, "malformed method");
  if (major.len != 1 || major.ptr[0] != '1' || minor.len != 1 || (minor.ptr[0] != '1' && minor.ptr[0] != '0'))
    return fail(p, ev, 505, "HTTP version not supported");
  ev->minor = minor.ptr[0] - '0';

  size_t n = 0, te_count = 0, expect_count = 0;
  int has_cl = 0, has_connection = 0, close = 0, keep = 0;
  lp_slice cl = {NULL, 0}, te = {NULL, 0}, expect = {NULL, 0};
  /* One line per pass, in a head that ends with an empty line: bounded by hlen. */
  for (;;) {
    size_t s = i;
    while (i < hlen && h[i] != ':' && h[i] != '\r' && h[i] != '\n') i++;
    if (i == s || h[i] != ':') {
      if (h[s] == '\n' || (h[s] == '\r' && h[s + 1] == '\n')) break;
      return fail(p, ev, 400, "malformed header line");
    }
    lp_slice name = {h + s, i - s};
    i++;
    while (h[i] == ' ' || h[i] == '\t') i++;
    size_t eol = (size_t)((const char *)memchr(h + i, '\n', hlen - i) - h), ve = eol;
    if (ve > i && h[ve - 1] == '\r') ve--;
    while (ve > i && (h[ve - 1] == ' ' || h[ve - 1] == '\t')) ve--;
    lp_slice value = {h + i, ve - i};
    i = eol + 1;
    if (!all_token(name.ptr, name.len)) return fail(p, ev, 400, "malformed header name");
    for (size_t k = 0; k < name.len; k++) h[s + k] = (char)lower((unsigned char)h[s + k]);
    if (name.len == 14 && memcmp(name.ptr, "content-length", 14) == 0) {
      if (has_cl) {
        if (value.len != cl.len || memcmp(value.ptr, cl.ptr, cl.len) != 0)
          return fail(p, ev, 400, "conflicting Content-Length");
        continue; /* a repeat of the same length is not repeated in the headers */
      }
      has_cl = 1, cl = value;
    } else if (name.len == 17 && memcmp(name.ptr, "transfer-encoding", 17) == 0) {
      if (te_count++ == 0) te = value;
    } else if (name.len == 6 && memcmp(name.ptr, "expect", 6) == 0) {
      if (expect_count++ == 0) expect = value;
    } else if (name.len == 10 && memcmp(name.ptr, "connection", 10) == 0) {
      has_connection = 1;
      close |= contains_lower(value, "close");
      keep |= contains_lower(value, "keep-alive");
    }
    if (add_header(p, n++, name, value) != 0) return fail(p, ev, 500, "out of memory");
  }
  ev->headers = p->headers;
  ev->nheaders = n;
  /* Repeated headers are joined with ", ": a repeated Expect or Transfer-Encoding is then not
   * "100-continue" or "chunked" any more. */
  ev->keep_alive = has_connection ? !close && (ev->minor == 1 || keep) : ev->minor == 1;
  ev->expect_continue = expect_count == 1 && ev->minor == 1 && equals_lower(expect, "100-continue");
  p->pos = end + 1;

  if (te_count > 0) {
    if (has_cl) return fail(p, ev, 400, "both Content-Length and Transfer-Encoding");
    if (te_count > 1 || !equals_lower(te, "chunked")) return fail(p, ev, 400, "unsupported Transfer-Encoding");
    p->state = ST_CHUNK_SIZE;
    p->body_len = 0;
    return LP_HTTP_HEAD;
  }
  p->state = ST_NO_BODY;
  if (has_cl) {
    uint64_t v = 0;
    for (size_t k = 0; k < cl.len; k++) {
      if (cl.ptr[k] < '0' || cl.ptr[k] > '9') return fail(p, ev, 400, "invalid Content-Length");
      if (k < 15) v = v * 10 + (uint64_t)(cl.ptr[k] - '0');
    }
    if (cl.len == 0) return fail(p, ev, 400, "invalid Content-Length");
    if (cl.len > 15 || v > lim->max_body_bytes) return fail(p, ev, 413, "request body too large");
    if (v > 0) {
      p->state = ST_BODY;
      p->remaining = v;
    }
  }
  return LP_HTTP_HEAD;
}

/* Moves up to p->remaining received bytes into the body; 1 when the body or chunk is whole. */
static int take(lp_http_parser *p, lp_http_event *ev) {
  size_t avail = p->in.len - p->pos;
  size_t n = avail < p->remaining ? avail : (size_t)p->remaining;
  if (lp_buf_append(&p->body, p->in.data + p->pos, n) != 0) {
    fail(p, ev, 500, "out of memory");
    return -1;
  }
  p->pos += n;
  p->remaining -= n;
  drop_consumed(p);
  return p->remaining == 0;
}

int lp_http_parse(lp_http_parser *p, lp_http_event *ev) {
  forget_body(p);
  if (p->oom) return fail(p, ev, 500, "out of memory");
  /* Each pass consumes bytes or returns: bounded by the buffer. */
  for (;;) {
    size_t avail = p->in.len - p->pos;
    const char *at = p->in.data ? p->in.data + p->pos : "";
    int r;
    switch (p->state) {
      case ST_HEAD: return parse_head(p, ev);
      case ST_NO_BODY: return finish(p, ev, "", 0);
      case ST_BODY:
        /* A body that arrived with its head is handed out where it lies. */
        if (p->body.len == 0 && avail >= p->remaining) {
          p->pos += (size_t)p->remaining;
          return finish(p, ev, at, (size_t)p->remaining);
        }
        r = take(p, ev);
        if (r < 0) return LP_HTTP_ERROR;
        if (r == 0) return LP_HTTP_MORE;
        return finish(p, ev, p->body.data, p->body.len);
      case ST_CHUNK_SIZE: {
        const char *nl = avail ? memchr(at, '\n', avail) : NULL;
        if (!nl) {
          if (avail > LP_HTTP_MAX_CHUNK_LINE) return fail(p, ev, 400, "chunk size line too long");
          return LP_HTTP_MORE;
        }
        size_t line = (size_t)(nl - at), hex = 0;
        while (hex < line && IS(at[hex], HEX)) hex++;
        size_t rest = hex;
        while (rest < line && (at[rest] == ' ' || at[rest] == '\t')) rest++;
        size_t rest_end = line > rest && at[line - 1] == '\r' ? line - 1 : line;
        if (hex == 0 || (rest < rest_end && at[rest] != ';') || line > LP_HTTP_MAX_CHUNK_LINE)
          return fail(p, ev, 400, "malformed chunk size");
        uint64_t size = 0;
        for (size_t k = 0; k < hex && k < 15; k++) size = size * 16 + (uint64_t)hex_value((unsigned char)at[k]);
        if (hex > 15 || size > p->limits.max_body_bytes - p->body_len)
          return fail(p, ev, 413, "request body too large");
        p->pos += line + 1;
        if (size == 0) {
          p->state = ST_TRAILER;
          p->scan = p->pos;
        } else {
          p->body_len += size;
          p->remaining = size;
          p->state = ST_CHUNK_DATA;
        }
        break;
      }
      case ST_CHUNK_DATA:
        r = take(p, ev);
        if (r < 0) return LP_HTTP_ERROR;
        if (r == 0) return LP_HTTP_MORE;
        p->state = ST_CHUNK_END;
        break;
      case ST_CHUNK_END:
        if (avail >= 1 && at[0] == '\n') {
          p->pos += 1;
        } else if (avail >= 2 && at[0] == '\r' && at[1] == '\n') {
          p->pos += 2;
        } else if (avail >= 2 || (avail == 1 && at[0] != '\r')) {
          return fail(p, ev, 400, "missing CRLF after chunk data");
        } else {
          return LP_HTTP_MORE;
        }
        p->state = ST_CHUNK_SIZE;
        break;
      default: { /* ST_TRAILER: trailer fields are read and ignored */
        size_t end = 0;
        int found = 0;
        if (avail >= 1 && at[0] == '\n') {
          end = p->pos, found = 1;
        } else if (avail >= 2 && at[0] == '\r' && at[1] == '\n') {
          end = p->pos + 1, found = 1;
        } else {
          const char *buf = p->in.data;
          size_t len = p->in.len, scan = p->scan > p->pos ? p->scan : p->pos;
          while (!found && scan < len) {
            const char *nl = memchr(buf + scan, '\n', len - scan);
            if (!nl) break;
            size_t k = (size_t)(nl - buf);
            if (k + 1 < len && buf[k + 1] == '\n')
              end = k + 1, found = 1;
            else if (k + 2 < len && buf[k + 1] == '\r' && buf[k + 2] == '\n')
              end = k + 2, found = 1;
            scan = k + 1;
          }
        }
        if (!found) {
          if (avail > p->limits.max_header_bytes) return fail(p, ev, 431, "trailer too large");
          p->scan = p->in.len >= 2 ? p->in.len - 2 : 0;
          return LP_HTTP_MORE;
        }
        p->pos = end + 1;
        return finish(p, ev, p->body.data ? p->body.data : "", p->body.len);
      }
    }
  }
}

int lp_http_split_target(lp_slice target, lp_slice *path, lp_slice *query) {
  const char *t = target.ptr;
  const char *q = target.len ? memchr(t, '?', target.len) : NULL;
  size_t plen = q ? (size_t)(q - t) : target.len;
  path->ptr = t;
  path->len = plen;
  query->ptr = q ? q + 1 : t + target.len;
  query->len = q ? target.len - plen - 1 : 0;
  if (plen > 0 && t[0] == '/') return 0;
  /* absolute-form (RFC 9112 3.2.2): scheme "://" authority, then the path */
  if (plen > 0 && ((t[0] | 0x20) >= 'a' && (t[0] | 0x20) <= 'z')) {
    size_t i = 1;
    while (i < plen && (((t[i] | 0x20) >= 'a' && (t[i] | 0x20) <= 'z') || (t[i] >= '0' && t[i] <= '9') || t[i] == '+' ||
                        t[i] == '.' || t[i] == '-'))
      i++;
    if (plen - i >= 3 && memcmp(t + i, "://", 3) == 0) {
      i += 3;
      while (i < plen && t[i] != '/') i++;
      if (i == plen) {
        path->ptr = "/";
        path->len = 1;
      } else {
        path->ptr = t + i;
        path->len = plen - i;
      }
      return 0;
    }
  }
  if (plen == 1 && t[0] == '*') return 0;
  return -1;
}

ssize_t lp_http_decode(const char *in, size_t len, char *out, int plus_is_space) {
  size_t o = 0;
  for (size_t i = 0; i < len; i++) {
    char c = in[i];
    if (c == '%') {
      if (len - i < 3) return -1;
      int hi = hex_value((unsigned char)in[i + 1]), lo = hex_value((unsigned char)in[i + 2]);
      if (hi < 0 || lo < 0) return -1;
      out[o++] = (char)(hi << 4 | lo);
      i += 2;
    } else {
      out[o++] = (c == '+' && plus_is_space) ? ' ' : c;
    }
  }
  return (ssize_t)o;
}

int lp_http_query_next(lp_slice query, size_t *pos, lp_slice *key, lp_slice *value, int *has_value) {
  size_t i = *pos;
  while (i < query.len && query.ptr[i] == '&') i++;
  if (i >= query.len) {
    *pos = i;
    return 0;
  }
  const char *s = query.ptr + i;
  const char *amp = memchr(s, '&', query.len - i);
  size_t n = amp ? (size_t)(amp - s) : query.len - i;
  const char *eq = memchr(s, '=', n);
  key->ptr = s;
  if (eq) {
    key->len = (size_t)(eq - s);
    value->ptr = eq + 1;
    value->len = n - key->len - 1;
  } else {
    key->len = n;
    value->ptr = s + n;
    value->len = 0;
  }
  *has_value = eq != NULL;
  *pos = i + n;
  return 1;
}
