/* lp_buf: a growable byte buffer. */
#include "lp_buf.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int lp_buf_reserve(lp_buf *b, size_t extra) {
  if (extra <= b->cap - b->len) return 0;
  if (extra > SIZE_MAX / 2 - b->len) return -1;
  size_t cap = b->cap ? b->cap : 64;
  while (cap - b->len < extra) cap *= 2;
  char *p = realloc(b->data, cap);
  if (!p) return -1;
  b->data = p;
  b->cap = cap;
  return 0;
}

int lp_buf_append(lp_buf *b, const void *p, size_t n) {
  if (n == 0) return 0;
  if (lp_buf_reserve(b, n) != 0) return -1;
  memcpy(b->data + b->len, p, n);
  b->len += n;
  return 0;
}

int lp_buf_append_str(lp_buf *b, const char *s) { return lp_buf_append(b, s, strlen(s)); }

int lp_buf_append_char(lp_buf *b, char c) { return lp_buf_append(b, &c, 1); }

int lp_buf_append_i64(lp_buf *b, int64_t v) {
  char tmp[24];
  int n = snprintf(tmp, sizeof tmp, "%lld", (long long)v);
  return lp_buf_append(b, tmp, (size_t)n);
}

void lp_buf_reset(lp_buf *b) { b->len = 0; }

void lp_buf_free(lp_buf *b) {
  free(b->data);
  b->data = NULL;
  b->len = b->cap = 0;
}
