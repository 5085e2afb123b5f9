/* fuzz_static: libFuzzer harness for lp_static, the rules of static file mounts. The input is
 * cut at 0x01 bytes into fields: a request path (decoded), a Range header's value, then mount
 * prefixes (their first byte: follow_symlinks and a root) and route paths; the last 8 bytes of
 * the path field's neighbour give a file size. Checked against references written here (not from
 * lp_static.c): the Range grammar as a POSIX regular expression, the longest-prefix match as a
 * linear search, and the rule that a path passing the checks cannot climb out of its directory
 * (no segment starting with '.', no NUL, no backslash); every answer head parses back. */
#include <regex.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lp_static.h"

#define CHECK(cond)                                                                      \
  do {                                                                                   \
    if (!(cond)) {                                                                       \
      fprintf(stderr, "fuzz_static: invariant failed: %s (line %d)\n", #cond, __LINE__); \
      abort();                                                                           \
    }                                                                                    \
  } while (0)

#define BLANK "[ \t\n\v\f\r]*"
static regex_t range_re;
static int range_re_ready;

/* The reference Range rule: kind, a, b, has_b as lp_static_range. */
static void reference_range(const char *v, size_t len, int count, lp_static_range *r) {
  memset(r, 0, sizeof *r);
  if (!v || count != 1 || memchr(v, 0, len)) return;
  if (!range_re_ready) {
    CHECK(regcomp(&range_re, "^" BLANK "bytes" BLANK "=" BLANK "([0-9]*)" BLANK "-" BLANK "([0-9]*)" BLANK "$",
                  REG_EXTENDED) == 0);
    range_re_ready = 1;
  }
  char *s = malloc(len + 1);
  CHECK(s);
  memcpy(s, v, len);
  s[len] = 0;
  regmatch_t m[3];
  if (regexec(&range_re, s, 3, m, 0) == 0) {
    size_t la = (size_t)(m[1].rm_eo - m[1].rm_so), lb = (size_t)(m[2].rm_eo - m[2].rm_so);
    if ((la || lb) && la <= 15 && lb <= 15) {
      r->kind = la ? LP_RANGE_FROM : LP_RANGE_SUFFIX;
      r->a = la ? strtoull(s + m[1].rm_so, NULL, 10) : 0;
      r->b = lb ? strtoull(s + m[2].rm_so, NULL, 10) : 0;
      r->has_b = lb > 0;
    }
  }
  free(s);
}

static void check_range(lp_slice value, int count, uint64_t size) {
  lp_static_range got, want;
  lp_static_range_parse(value, count, &got);
  reference_range(value.ptr, value.len, count, &want);
  CHECK(got.kind == want.kind);
  if (got.kind == LP_RANGE_FROM) CHECK(got.a == want.a);
  if (got.kind != LP_RANGE_NONE) CHECK(got.has_b == want.has_b && (!got.has_b || got.b == want.b));
  uint64_t first = 7, last = 7;
  int rc = lp_static_range_apply(&got, size, &first, &last);
  if (rc == 1) {
    CHECK(size > 0 && first <= last && last < size);
    if (got.kind == LP_RANGE_FROM) CHECK(first == got.a && (!got.has_b || last == (got.b < size ? got.b : size - 1)));
    if (got.kind == LP_RANGE_SUFFIX) CHECK(last == size - 1 && last - first + 1 == (got.b < size ? got.b : size));
  } else if (rc < 0) {
    CHECK(got.kind != LP_RANGE_NONE);
    CHECK(size == 0 || (got.kind == LP_RANGE_FROM ? got.a >= size : got.b == 0));
  } else {
    CHECK(got.kind == LP_RANGE_NONE || (got.kind == LP_RANGE_FROM && got.has_b && got.b < got.a));
  }
  /* the head says what will be sent */
  if (rc >= 0) {
    lp_static_reply reply = {"Date: D\r\n", count & 1, 0};
    lp_buf b = LP_BUF_INIT;
    if (rc == 0) first = 0, last = size ? size - 1 : 0;
    CHECK(lp_static_file_head(&b, rc ? 206 : 200, "x/y", (int64_t)(size % 4000000000u), size, first, last, &reply) ==
          0);
    CHECK(lp_buf_append_char(&b, 0) == 0);
    const char *cl = strstr(b.data, "\r\nContent-Length: ");
    CHECK(cl);
    unsigned long long n = strtoull(cl + 18, NULL, 10);
    CHECK(n == (size ? last - first + 1 : 0));
    CHECK(strstr(b.data, "\r\n\r\n") == b.data + b.len - 5);
    lp_buf_free(&b);
  }
}

static void check_path(lp_slice rel) {
  int status = lp_static_check(rel);
  int has_bad = memchr(rel.ptr, 0, rel.len) || memchr(rel.ptr, '\\', rel.len);
  CHECK((status == 400) == has_bad);
  if (status != 0) return;
  lp_static_mount mount = {0};
  mount.dir = "d";
  mount.dir_len = 1;
  lp_buf b = LP_BUF_INIT;
  CHECK(lp_static_file_path(&mount, rel, &b) == 0);
  CHECK(b.len >= 2 && memcmp(b.data, "d/", 2) == 0 && b.data[b.len] == 0 && strlen(b.data) == b.len);
  /* no segment after the directory can climb or hide: none starts with '.' */
  for (size_t i = 2; i < b.len;) {
    size_t end = i;
    while (end < b.len && b.data[end] != '/') end++;
    if (end > i) CHECK(b.data[i] != '.' && end - i <= LP_STATIC_NAME_MAX);
    i = end + 1;
  }
  CHECK(strstr(b.data, "/.") == NULL);
  lp_buf_free(&b);
}

/* The reference longest-prefix search (routes first). */
static const char *reference_match(const lp_slice *prefixes, size_t n, const lp_slice *routes, size_t nr, lp_slice p,
                                   char *norm, size_t *best_len) {
  for (size_t i = 0; i < nr; i++)
    if (routes[i].len == p.len && memcmp(routes[i].ptr, p.ptr, p.len) == 0) return NULL;
  const char *best = NULL;
  *best_len = 0;
  for (size_t i = 0; i < n; i++) {
    size_t len = prefixes[i].len;
    memcpy(norm, prefixes[i].ptr, len);
    if (len == 0 || norm[len - 1] != '/') norm[len++] = '/';
    if (p.len >= len && memcmp(p.ptr, norm, len) == 0 && (!best || len > *best_len)) {
      best = prefixes[i].ptr;
      *best_len = len;
    }
  }
  return best;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  lp_slice fields[16];
  size_t n = 0, start = 0;
  for (size_t i = 0; i <= size && n < 16; i++) {
    if (i == size || data[i] == 1) {
      fields[n++] = (lp_slice){(const char *)data + start, i - start};
      start = i + 1;
    }
  }
  lp_slice path = fields[0];
  lp_slice range = n > 1 ? fields[1] : (lp_slice){NULL, 0};
  uint64_t file_size = 0;
  for (size_t i = 0; i < 8 && i < path.len; i++) file_size = file_size << 8 | (uint8_t)path.ptr[path.len - 1 - i];
  if (file_size >> 62) file_size >>= 20; /* huge sizes too, but not all of them */
  check_range(range, range.ptr ? 1 + (int)(range.len % 3 == 2) : 0, file_size);
  check_path(path);
  (void)lp_static_content_type(path.ptr, path.len);
  const char *msg;
  (void)lp_static_lookup_status((int)(file_size % 200), &msg);

  /* mounts (fields starting with '/') and routes (with '=') */
  lp_static_mounts m = LP_STATIC_MOUNTS_INIT;
  lp_slice prefixes[16], routes[16];
  size_t np = 0, nr = 0;
  for (size_t i = 2; i < n; i++) {
    lp_slice f = fields[i];
    if (f.len == 0) continue;
    if (f.ptr[0] == '=') {
      routes[nr++] = (lp_slice){f.ptr + 1, f.len - 1};
      CHECK(lp_static_add_route(&m, f.ptr + 1, f.len - 1) == 0);
    } else {
      int dup = 0; /* the same prefix again changes the mount in place */
      char a[300], b[300];
      size_t la, lb;
      for (size_t k = 0; k < np && f.len < 290; k++) {
        if (prefixes[k].len >= 290) continue;
        la = prefixes[k].len, lb = f.len;
        memcpy(a, prefixes[k].ptr, la);
        memcpy(b, f.ptr, lb);
        if (la == 0 || a[la - 1] != '/') a[la++] = '/';
        if (lb == 0 || b[lb - 1] != '/') b[lb++] = '/';
        if (la == lb && memcmp(a, b, la) == 0) dup = 1;
      }
      if (f.len >= 290) continue;
      if (!dup) prefixes[np++] = f;
      CHECK(lp_static_add_mount(&m, f.ptr, f.len, "dir/", 4, (f.len & 1) ? "/r" : NULL, f.len & 2) == 0);
    }
  }
  for (size_t i = 1; i < m.nmounts; i++) CHECK(m.mounts[i - 1]->prefix_len >= m.mounts[i]->prefix_len);
  char norm[300];
  size_t best_len;
  const char *want = reference_match(prefixes, np, routes, nr, path, norm, &best_len);
  lp_static_mount *got = lp_static_match(&m, path);
  CHECK((want == NULL) == (got == NULL));
  if (got) {
    CHECK(got->prefix_len == best_len && memcmp(got->prefix, path.ptr, best_len) == 0);
    CHECK(lp_static_inside(got, path.ptr, path.len) ==
          (got->follow_symlinks || (got->root && path.len > 3 && memcmp(path.ptr, "/r/", 3) == 0)));
  }
  lp_static_free(&m);
  return 0;
}
