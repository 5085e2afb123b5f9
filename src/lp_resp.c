/* lp_resp: RESP2 commands written and replies read, sans-I/O (see lp_resp.h). */
#include "lp_resp.h"

#include <stdio.h>
#include <string.h>

int lp_resp_append_bulk(lp_buf *out, lp_slice s) {
  size_t before = out->len;
  if (lp_buf_append_char(out, '$') != 0 || lp_buf_append_i64(out, (int64_t)s.len) != 0 ||
      lp_buf_append(out, "\r\n", 2) != 0 || lp_buf_append(out, s.ptr, s.len) != 0 ||
      lp_buf_append(out, "\r\n", 2) != 0) {
    out->len = before;
    return -1;
  }
  return 0;
}

int lp_resp_append_command(lp_buf *out, size_t argc, const lp_slice *argv) {
  size_t before = out->len;
  int rc = lp_buf_append_char(out, '*');
  if (rc == 0) rc = lp_buf_append_i64(out, (int64_t)argc);
  if (rc == 0) rc = lp_buf_append(out, "\r\n", 2);
  for (size_t i = 0; rc == 0 && i < argc; i++) rc = lp_resp_append_bulk(out, argv[i]);
  if (rc != 0) out->len = before;
  return rc;
}

/* The line at p[0..len) up to CRLF: its length (without CRLF), -2 when incomplete, -1 when a
 * lone CR or LF is in it. */
static long line_end(const char *p, size_t len) {
  for (size_t i = 0; i < len; i++) {
    if (p[i] == '\r') {
      if (i + 1 == len) return -2;
      return p[i + 1] == '\n' ? (long)i : -1;
    }
    if (p[i] == '\n') return -1;
  }
  return -2;
}

static int parse_int(const char *p, size_t n, int64_t *v) {
  size_t i = 0;
  int neg = 0;
  if (n > 0 && p[0] == '-') neg = 1, i = 1;
  if (i == n || n - i > 18) return -1;
  int64_t x = 0;
  for (; i < n; i++) {
    if (p[i] < '0' || p[i] > '9') return -1;
    x = x * 10 + (p[i] - '0');
  }
  *v = neg ? -x : x;
  return 0;
}

/* One reply at p: bytes taken, 0 incomplete, -1 broken; r (may be NULL) gets its top level. */
static long read_at(const char *p, size_t len, lp_resp_reply *r, int depth) {
  if (depth > LP_RESP_MAX_DEPTH) return -1;
  if (len < 1) return 0;
  long n = line_end(p + 1, len - 1);
  if (n == -2) return 0;
  if (n < 0) return -1;
  lp_slice line = {p + 1, (size_t)n};
  long taken = 1 + n + 2;
  lp_resp_reply ignored;
  if (!r) r = &ignored;
  memset(r, 0, sizeof *r);
  switch (p[0]) {
    case '+':
    case '-':
      r->type = p[0] == '+' ? LP_RESP_STATUS : LP_RESP_ERROR;
      r->str = line;
      return taken;
    case ':': r->type = LP_RESP_INTEGER; return parse_int(line.ptr, line.len, &r->integer) == 0 ? taken : -1;
    case '$': {
      int64_t blen;
      if (parse_int(line.ptr, line.len, &blen) != 0 || blen < -1 || blen > (int64_t)LP_RESP_MAX_BULK) return -1;
      if (blen == -1) {
        r->type = LP_RESP_NIL;
        return taken;
      }
      if ((size_t)taken + (size_t)blen + 2 > len) return 0;
      if (p[taken + blen] != '\r' || p[taken + blen + 1] != '\n') return -1;
      r->type = LP_RESP_BULK;
      r->str.ptr = p + taken;
      r->str.len = (size_t)blen;
      return taken + (long)blen + 2;
    }
    case '*': {
      int64_t count;
      if (parse_int(line.ptr, line.len, &count) != 0 || count < -1 || count > (1 << 24)) return -1;
      if (count == -1) {
        r->type = LP_RESP_NIL;
        return taken;
      }
      r->type = LP_RESP_ARRAY;
      r->integer = count;
      for (int64_t i = 0; i < count; i++) {
        lp_resp_reply item;
        long k = read_at(p + taken, len - (size_t)taken, &item, depth + 1);
        if (k <= 0) return k;
        if (i < LP_RESP_MAX_ITEMS && (item.type == LP_RESP_BULK || item.type == LP_RESP_STATUS)) r->items[i] = item.str;
        taken += k;
      }
      return taken;
    }
    default: return -1;
  }
}

long lp_resp_read(const char *p, size_t len, lp_resp_reply *r) { return read_at(p, len, r, 0); }
