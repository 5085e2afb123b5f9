/* C tests of lp_static, the rules of static file mounts: mount matching (routes first, longest
 * prefix), the path checks made before the disk, file paths and index.html, staying inside the
 * mount, lookup errors, single byte ranges, content types, HTTP dates and the answers' bytes.
 * TAP output; built with ASan+UBSan and run under valgrind by `make test`. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lp_static.h"
#include "tap.h"

static lp_slice S(const char *s) { return (lp_slice){s, strlen(s)}; }

static const char *prefix_of(const lp_static_mounts *m, const char *path) {
  lp_static_mount *mount = lp_static_match(m, S(path));
  return mount ? mount->prefix : NULL;
}

static int same(const char *a, const char *b) { return a && b && strcmp(a, b) == 0; }

static void test_mounts(void) {
  int ok = 1;
  lp_static_mounts m = LP_STATIC_MOUNTS_INIT;
  CHECK(lp_static_add_mount(&m, "/", 1, "pub", 3, "/srv/pub", 0) == 0);
  CHECK(lp_static_add_mount(&m, "/static", 7, "pub//", 5, NULL, 0) == 0);
  CHECK(lp_static_add_mount(&m, "/static/js/", 11, "/", 1, NULL, 1) == 0);
  CHECK(m.nmounts == 3);
  CHECK(same(m.mounts[1]->prefix, "/static/") && m.mounts[1]->dir_len == 3);
  CHECK(same(m.mounts[0]->dir, "/")); /* "/" keeps its slash */
  CHECK(same(prefix_of(&m, "/static/js/app.js"), "/static/js/"));
  CHECK(same(prefix_of(&m, "/static/app.js"), "/static/"));
  CHECK(same(prefix_of(&m, "/static"), "/")); /* no slash: the shorter mount */
  CHECK(same(prefix_of(&m, "/x"), "/"));
  CHECK(lp_static_add_route(&m, "/static/app.js", 14) == 0);
  CHECK(lp_static_add_route(&m, "/static/app.js", 14) == 0); /* once */
  CHECK(m.nroutes == 1);
  CHECK(prefix_of(&m, "/static/app.js") == NULL); /* routes come first */
  CHECK(same(prefix_of(&m, "/static/app.jsx"), "/static/"));
  /* the same prefix again: changed in place, the address kept */
  lp_static_mount *before = m.mounts[1];
  CHECK(lp_static_add_mount(&m, "/static/", 8, "other", 5, "/srv/other", 1) == 0);
  CHECK(m.nmounts == 3 && m.mounts[1] == before && same(before->dir, "other") && before->follow_symlinks);
  CHECK(same(before->root, "/srv/other"));
  CHECK(lp_static_set_root(before, "/r", 2) == 0 && same(before->root, "/r") && before->root_len == 2);
  lp_static_free(&m);
  CHECK(m.nmounts == 0 && m.mounts == NULL);
  lp_static_mounts empty = LP_STATIC_MOUNTS_INIT;
  CHECK(lp_static_match(&empty, S("/")) == NULL);
  report("mounts: routes first, longest prefix, normalised, changed in place", ok);
}

static void test_check(void) {
  int ok = 1;
  CHECK(lp_static_check(S("")) == 0);
  CHECK(lp_static_check(S("app.js")) == 0);
  CHECK(lp_static_check(S("sub/")) == 0);
  CHECK(lp_static_check(S("a//b")) == 0);
  CHECK(lp_static_check(S("a.b/c.d")) == 0);
  CHECK(lp_static_check(S("../secret")) == 404);
  CHECK(lp_static_check(S("sub/../../secret")) == 404);
  CHECK(lp_static_check(S("./x")) == 404);
  CHECK(lp_static_check(S(".hidden")) == 404);
  CHECK(lp_static_check(S("sub/.git/config")) == 404);
  CHECK(lp_static_check(S("..\\secret")) == 400); /* the backslash first, as static.lua did */
  CHECK(lp_static_check((lp_slice){"a\0.txt", 6}) == 400);
  char name[300];
  memset(name, 'n', sizeof name);
  CHECK(lp_static_check((lp_slice){name, 255}) == 0);
  CHECK(lp_static_check((lp_slice){name, 256}) == 404);
  name[10] = '/';
  CHECK(lp_static_check((lp_slice){name, 266}) == 0);
  report("paths refused before the disk: 400 for NUL and backslash, 404 for dot segments and long names", ok);
}

static void test_file_path_and_inside(void) {
  int ok = 1;
  lp_static_mounts m = LP_STATIC_MOUNTS_INIT;
  CHECK(lp_static_add_mount(&m, "/", 1, "pub/", 4, "/srv/pub", 0) == 0);
  CHECK(lp_static_add_mount(&m, "/all/", 5, "/", 1, "/", 0) == 0);
  CHECK(lp_static_add_mount(&m, "/open/", 6, "pub", 3, NULL, 1) == 0);
  CHECK(lp_static_add_mount(&m, "/none/", 6, "gone", 4, NULL, 0) == 0);
  lp_static_mount *pub = lp_static_match(&m, S("/x")), *all = lp_static_match(&m, S("/all/x"));
  lp_static_mount *open = lp_static_match(&m, S("/open/x")), *none = lp_static_match(&m, S("/none/x"));
  lp_buf b = LP_BUF_INIT;
  CHECK(lp_static_file_path(pub, S("a/b.txt"), &b) == 0 && same(b.data, "pub/a/b.txt") && b.len == 11);
  CHECK(lp_static_file_path(pub, S(""), &b) == 0 && same(b.data, "pub/index.html"));
  CHECK(lp_static_file_path(pub, S("sub/"), &b) == 0 && same(b.data, "pub/sub/index.html"));
  CHECK(lp_static_file_path(all, S("etc/x"), &b) == 0 && same(b.data, "//etc/x"));
  lp_buf_free(&b);
  CHECK(lp_static_inside(pub, "/srv/pub/a", 10));
  CHECK(!lp_static_inside(pub, "/srv/pub", 8));
  CHECK(!lp_static_inside(pub, "/srv/public/a", 13)); /* a sibling with the same start */
  CHECK(!lp_static_inside(pub, "/etc/passwd", 11));
  CHECK(lp_static_inside(all, "/etc/passwd", 11));
  CHECK(lp_static_inside(open, "/etc/passwd", 11)); /* follow_symlinks */
  CHECK(!lp_static_inside(none, "/srv/pub/a", 10)); /* root unknown */
  lp_static_free(&m);
  const char *msg = NULL;
  CHECK(lp_static_lookup_status(ENOENT, &msg) == 404 && same(msg, "not found"));
  CHECK(lp_static_lookup_status(ENOTDIR, &msg) == 404);
  CHECK(lp_static_lookup_status(ENAMETOOLONG, &msg) == 404);
  CHECK(lp_static_lookup_status(ELOOP, &msg) == 404);
  CHECK(lp_static_lookup_status(EACCES, &msg) == 403 && same(msg, "forbidden"));
  CHECK(lp_static_lookup_status(EPERM, &msg) == 403);
  CHECK(lp_static_lookup_status(EIO, &msg) == 500 && same(msg, "cannot read file"));
  report("file paths with index.html, inside the mount's real path, lookup errors", ok);
}

/* kind of the parsed range, and its result for size: "none", "416" or "first-last" */
static const char *range(const char *value, int count, uint64_t size) {
  static char out[64];
  lp_static_range r;
  lp_static_range_parse(value ? S(value) : (lp_slice){NULL, 0}, count, &r);
  uint64_t first = 0, last = 0;
  int rc = lp_static_range_apply(&r, size, &first, &last);
  if (rc == 0) return "none";
  if (rc < 0) return "416";
  snprintf(out, sizeof out, "%llu-%llu", (unsigned long long)first, (unsigned long long)last);
  return out;
}

static void test_ranges(void) {
  int ok = 1;
  CHECK(same(range(NULL, 0, 100), "none"));
  CHECK(same(range("bytes=0-9", 1, 100), "0-9"));
  CHECK(same(range("bytes=10-", 1, 100), "10-99"));
  CHECK(same(range("bytes=90-1000", 1, 100), "90-99"));
  CHECK(same(range("bytes=-10", 1, 100), "90-99"));
  CHECK(same(range("bytes=-1000", 1, 100), "0-99"));
  CHECK(same(range(" bytes = 5 - 6 ", 1, 100), "5-6"));
  CHECK(same(range("\tbytes=\v5-\f6\r", 1, 100), "5-6"));
  CHECK(same(range("bytes=100-", 1, 100), "416"));
  CHECK(same(range("bytes=-0", 1, 100), "416"));
  CHECK(same(range("bytes=-5", 1, 0), "416"));
  CHECK(same(range("bytes=0-", 1, 0), "416"));
  CHECK(same(range("bytes=9-3", 1, 100), "none")); /* backwards: the whole file */
  CHECK(same(range("bytes=-", 1, 100), "none"));
  CHECK(same(range("bytes=0-1,3-4", 1, 100), "none"));
  CHECK(same(range("bytes=0-9", 2, 100), "none")); /* two Range headers */
  CHECK(same(range("Bytes=0-9", 1, 100), "none"));
  CHECK(same(range("bytes 0-9", 1, 100), "none"));
  CHECK(same(range("bytes=a-9", 1, 100), "none"));
  CHECK(same(range("bytes=0-9x", 1, 100), "none"));
  CHECK(same(range("items=0-9", 1, 100), "none"));
  CHECK(same(range("", 1, 100), "none"));
  CHECK(same(range("bytes=999999999999999-", 1, 100), "416"));    /* 15 digits */
  CHECK(same(range("bytes=1000000000000000-", 1, 100), "none"));  /* 16 digits */
  CHECK(same(range("bytes=0-1000000000000000", 1, 100), "none")); /* 16 digits */
  CHECK(same(range("bytes=-1000000000000000", 1, 100), "none"));  /* 16 digits */
  CHECK(same(range("bytes=0-999999999999999", 1, 100), "0-99"));
  report("single byte ranges: 206 spans, 416, and the whole file for the rest", ok);
}

static const char *ctype(const char *path) { return lp_static_content_type(path, strlen(path)); }

static void test_types_and_dates(void) {
  int ok = 1;
  CHECK(same(ctype("pub/app.js"), "application/javascript; charset=utf-8"));
  CHECK(same(ctype("pub/INDEX.HTML"), "text/html; charset=utf-8"));
  CHECK(same(ctype("x.woff2"), "font/woff2"));
  CHECK(same(ctype("x.png"), "image/png"));
  CHECK(same(ctype("x.tar.gz"), "application/octet-stream"));
  CHECK(same(ctype("x.json.d/file"), "application/octet-stream"));
  CHECK(same(ctype("noext"), "application/octet-stream"));
  CHECK(same(ctype("x."), "application/octet-stream"));
  CHECK(same(ctype("a..js"), "application/javascript; charset=utf-8"));
  CHECK(same(ctype("x.htmlx"), "application/octet-stream"));
  char date[64];
  lp_static_http_date(0, date);
  CHECK(same(date, "Thu, 01 Jan 1970 00:00:00 GMT"));
  lp_static_http_date(1577934245, date);
  CHECK(same(date, "Thu, 02 Jan 2020 03:04:05 GMT"));
  lp_static_http_date(784111777, date);
  CHECK(same(date, "Sun, 06 Nov 1994 08:49:37 GMT"));
  report("content types by extension; HTTP dates", ok);
}

static void test_answers(void) {
  int ok = 1;
  lp_buf b = LP_BUF_INIT;
  lp_static_reply keep = {"Date: D\r\n", 1, 0}, close = {"Date: D\r\n", 0, 0}, keep10 = {"Date: D\r\n", 1, 1};
  CHECK(lp_static_file_head(&b, 200, "text/plain; charset=utf-8", 1577934245, 5, 0, 4, &keep) == 0);
  CHECK(same(b.data ? (lp_buf_append_char(&b, 0), b.data) : NULL,
             "HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\nLast-Modified: Thu, 02 Jan 2020 03:04:05 "
             "GMT\r\nAccept-Ranges: bytes\r\nContent-Length: 5\r\nDate: D\r\n\r\n"));
  lp_buf_reset(&b);
  CHECK(lp_static_file_head(&b, 206, "image/png", 0, 300000, 100, 70000, &close) == 0);
  lp_buf_append_char(&b, 0);
  CHECK(same(b.data,
             "HTTP/1.1 206 Partial Content\r\nContent-Type: image/png\r\nLast-Modified: Thu, 01 Jan 1970 00:00:00 "
             "GMT\r\nAccept-Ranges: bytes\r\nContent-Range: bytes 100-70000/300000\r\nContent-Length: 69901\r\nDate: "
             "D\r\nConnection: close\r\n\r\n"));
  lp_buf_reset(&b);
  CHECK(lp_static_file_head(&b, 200, "application/octet-stream", 0, 0, 0, 0, &keep10) == 0);
  lp_buf_append_char(&b, 0);
  CHECK(strstr(b.data, "Content-Length: 0\r\nDate: D\r\nConnection: keep-alive\r\n\r\n") != NULL);
  lp_buf_reset(&b);
  CHECK(lp_static_unsatisfiable(&b, 0, 5, 0, &keep) == 0);
  lp_buf_append_char(&b, 0);
  CHECK(same(b.data,
             "HTTP/1.1 416 Range Not Satisfiable\r\nContent-Type: application/json\r\nLast-Modified: Thu, 01 Jan 1970 "
             "00:00:00 GMT\r\nAccept-Ranges: bytes\r\nContent-Range: bytes */5\r\nContent-Length: 33\r\nDate: "
             "D\r\n\r\n{\"error\":\"range not satisfiable\"}"));
  lp_buf_reset(&b);
  CHECK(lp_static_unsatisfiable(&b, 0, 5, 1, &keep) == 0);
  lp_buf_append_char(&b, 0);
  CHECK(strstr(b.data, "Content-Length: 33\r\nDate: D\r\n\r\n") && b.data[b.len - 2] == '\n');
  lp_buf_reset(&b);
  CHECK(lp_static_error(&b, 405, "method not allowed", "GET, HEAD", 0, &close) == 0);
  lp_buf_append_char(&b, 0);
  CHECK(same(b.data,
             "HTTP/1.1 405 Method Not Allowed\r\nAllow: GET, HEAD\r\nContent-Type: application/json\r\nContent-Length: "
             "30\r\nDate: D\r\nConnection: close\r\n\r\n{\"error\":\"method not allowed\"}"));
  lp_buf_reset(&b);
  CHECK(lp_static_error(&b, 404, "not found", NULL, 1, &keep) == 0);
  lp_buf_append_char(&b, 0);
  CHECK(same(b.data,
             "HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nContent-Length: 21\r\nDate: D\r\n\r\n"));
  lp_buf_reset(&b);
  lp_static_reply nodate = {NULL, 1, 0};
  CHECK(lp_static_error(&b, 400, "invalid path", NULL, 0, &nodate) == 0);
  lp_buf_append_char(&b, 0);
  CHECK(same(b.data,
             "HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nContent-Length: 24\r\n\r\n{\"error\":"
             "\"invalid path\"}"));
  lp_buf_free(&b);
  report("answer bytes: file heads (200, 206, empty), 416, errors with Allow and for HEAD", ok);
}

int main(void) {
  test_mounts();
  test_check();
  test_file_path_and_inside();
  test_ranges();
  test_types_and_dates();
  test_answers();
  printf("1..%d\n", test_no);
  return failures ? 1 : 0;
}
