/* lp_static: the rules of static file mounts (see lp_static.h). */
#include "lp_static.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "lp_conn.h" /* lp_http_reason */

static char *copy_text(const char *s, size_t len) {
  char *c = malloc(len + 1);
  if (!c) return NULL;
  memcpy(c, s, len);
  c[len] = 0;
  return c;
}

static void free_strings(lp_static_mount *mount) {
  free(mount->prefix);
  free(mount->dir);
  free(mount->root);
}

int lp_static_add_mount(lp_static_mounts *m, const char *prefix, size_t prefix_len, const char *dir, size_t dir_len,
                        const char *root, int follow_symlinks) {
  while (dir_len > 1 && dir[dir_len - 1] == '/') dir_len--;
  int slash = prefix_len == 0 || prefix[prefix_len - 1] != '/';
  lp_static_mount mount = {0};
  mount.prefix = malloc(prefix_len + 2);
  mount.dir = copy_text(dir, dir_len);
  mount.root = root ? copy_text(root, strlen(root)) : NULL;
  lp_static_mount **grown = realloc(m->mounts, (m->nmounts + 1) * sizeof *grown);
  if (grown) m->mounts = grown;
  lp_static_mount *fresh = malloc(sizeof *fresh);
  if (!mount.prefix || !mount.dir || (root && !mount.root) || !grown || !fresh) {
    free_strings(&mount);
    free(fresh);
    return -1;
  }
  memcpy(mount.prefix, prefix, prefix_len);
  if (slash) mount.prefix[prefix_len++] = '/';
  mount.prefix[prefix_len] = 0;
  mount.prefix_len = prefix_len;
  mount.dir_len = dir_len;
  mount.root_len = root ? strlen(root) : 0;
  mount.follow_symlinks = follow_symlinks != 0;
  size_t i = 0;
  for (; i < m->nmounts; i++) {
    lp_static_mount *old = m->mounts[i];
    if (old->prefix_len == prefix_len && memcmp(old->prefix, mount.prefix, prefix_len) == 0) {
      free_strings(old); /* in place: a file being served may still point at it */
      *old = mount;
      free(fresh);
      return 0;
    }
  }
  /* kept longest prefix first: the first match is the longest */
  for (i = 0; i < m->nmounts && m->mounts[i]->prefix_len >= prefix_len; i++) {
  }
  memmove(&m->mounts[i + 1], &m->mounts[i], (m->nmounts - i) * sizeof *m->mounts);
  *fresh = mount;
  m->mounts[i] = fresh;
  m->nmounts++;
  return 0;
}

int lp_static_add_route(lp_static_mounts *m, const char *path, size_t len) {
  for (size_t i = 0; i < m->nroutes; i++)
    if (m->routes[i].len == len && memcmp(m->routes[i].ptr, path, len) == 0) return 0;
  lp_slice *grown = realloc(m->routes, (m->nroutes + 1) * sizeof *grown);
  if (!grown) return -1;
  m->routes = grown;
  char *copy = copy_text(path, len);
  if (!copy) return -1;
  m->routes[m->nroutes++] = (lp_slice){copy, len};
  return 0;
}

int lp_static_set_root(lp_static_mount *mount, const char *root, size_t len) {
  char *copy = copy_text(root, len);
  if (!copy) return -1;
  free(mount->root);
  mount->root = copy;
  mount->root_len = len;
  return 0;
}

void lp_static_free(lp_static_mounts *m) {
  for (size_t i = 0; i < m->nmounts; i++) {
    free_strings(m->mounts[i]);
    free(m->mounts[i]);
  }
  for (size_t i = 0; i < m->nroutes; i++) free((char *)m->routes[i].ptr);
  free(m->mounts);
  free(m->routes);
  memset(m, 0, sizeof *m);
}

lp_static_mount *lp_static_match(const lp_static_mounts *m, lp_slice path) {
  for (size_t i = 0; i < m->nroutes; i++)
    if (m->routes[i].len == path.len && memcmp(m->routes[i].ptr, path.ptr, path.len) == 0) return NULL;
  for (size_t i = 0; i < m->nmounts; i++) {
    lp_static_mount *mount = m->mounts[i];
    if (path.len >= mount->prefix_len && memcmp(path.ptr, mount->prefix, mount->prefix_len) == 0) return mount;
  }
  return NULL;
}

int lp_static_check(lp_slice rel) {
  /* the path is percent-decoded already: "%2e%2e", "%00" and "%5c" are caught here too */
  if (memchr(rel.ptr, 0, rel.len) || memchr(rel.ptr, '\\', rel.len)) return 400;
  size_t i = 0;
  while (i < rel.len) {
    if (rel.ptr[i] == '/') {
      i++;
      continue;
    }
    size_t start = i;
    while (i < rel.len && rel.ptr[i] != '/') i++;
    if (rel.ptr[start] == '.' || i - start > LP_STATIC_NAME_MAX) return 404; /* "..", ".", hidden files */
  }
  return 0;
}

int lp_static_file_path(const lp_static_mount *mount, lp_slice rel, lp_buf *out) {
  lp_buf_reset(out);
  int index = rel.len == 0 || rel.ptr[rel.len - 1] == '/';
  int rc = lp_buf_append(out, mount->dir, mount->dir_len);
  if (rc == 0) rc = lp_buf_append_char(out, '/');
  if (rc == 0) rc = lp_buf_append(out, rel.ptr, rel.len);
  if (rc == 0 && index) rc = lp_buf_append_str(out, "index.html");
  if (rc == 0) rc = lp_buf_append_char(out, 0);
  if (rc != 0) return -1;
  out->len--; /* the NUL stays after the text */
  return 0;
}

int lp_static_inside(const lp_static_mount *mount, const char *real, size_t len) {
  if (mount->follow_symlinks) return 1;
  if (!mount->root) return 0;
  size_t n = mount->root_len;
  if (n == 1 && mount->root[0] == '/') return len > 1 && real[0] == '/'; /* the mount is "/" */
  return len > n + 1 && memcmp(real, mount->root, n) == 0 && real[n] == '/';
}

int lp_static_lookup_status(int err, const char **message) {
  switch (err) {
    case ENOENT:
    case ENOTDIR:
    case ENAMETOOLONG:
    case ELOOP: *message = "not found"; return 404;
    case EACCES:
    case EPERM: *message = "forbidden"; return 403;
    default: *message = "cannot read file"; return 500;
  }
}

static const char *const TYPES[][2] = {
    {"html", "text/html; charset=utf-8"},
    {"htm", "text/html; charset=utf-8"},
    {"css", "text/css; charset=utf-8"},
    {"js", "application/javascript; charset=utf-8"},
    {"mjs", "application/javascript; charset=utf-8"},
    {"json", "application/json"},
    {"map", "application/json"},
    {"txt", "text/plain; charset=utf-8"},
    {"md", "text/markdown; charset=utf-8"},
    {"xml", "application/xml"},
    {"svg", "image/svg+xml"},
    {"png", "image/png"},
    {"jpg", "image/jpeg"},
    {"jpeg", "image/jpeg"},
    {"gif", "image/gif"},
    {"webp", "image/webp"},
    {"ico", "image/x-icon"},
    {"wasm", "application/wasm"},
    {"woff", "font/woff"},
    {"woff2", "font/woff2"},
    {"pdf", "application/pdf"},
};

static int is_alnum(char c) { return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z'); }

const char *lp_static_content_type(const char *path, size_t len) {
  /* the extension: letters and digits after the last '.', up to the end */
  size_t i = len;
  while (i > 0 && is_alnum(path[i - 1])) i--;
  size_t ext_len = len - i;
  if (i == 0 || path[i - 1] != '.' || ext_len == 0 || ext_len > 5) return "application/octet-stream";
  char ext[6];
  for (size_t k = 0; k < ext_len; k++) {
    char c = path[i + k];
    ext[k] = (c >= 'A' && c <= 'Z') ? (char)(c - 'A' + 'a') : c;
  }
  ext[ext_len] = 0;
  for (size_t k = 0; k < sizeof TYPES / sizeof TYPES[0]; k++)
    if (strcmp(TYPES[k][0], ext) == 0) return TYPES[k][1];
  return "application/octet-stream";
}

/* Lua's %s in the C locale */
static int is_blank(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\v' || c == '\f' || c == '\r'; }

/* Reads a run of digits at *p (at most 15; more: -1); *present says whether there was one. */
static int digits(const char **p, const char *end, uint64_t *v, int *present) {
  const char *s = *p;
  uint64_t n = 0;
  while (*p < end && **p >= '0' && **p <= '9') n = n * 10 + (uint64_t)(*(*p)++ - '0');
  if (*p - s > 15) return -1;
  *present = *p > s;
  *v = n;
  return 0;
}

static void skip_blanks(const char **p, const char *end) {
  while (*p < end && is_blank(**p)) (*p)++;
}

void lp_static_range_parse(lp_slice value, int count, lp_static_range *r) {
  memset(r, 0, sizeof *r);
  if (!value.ptr || count != 1) return; /* repeated headers are joined with ", ": several ranges */
  const char *p = value.ptr, *end = value.ptr + value.len;
  skip_blanks(&p, end);
  if (end - p < 5 || memcmp(p, "bytes", 5) != 0) return;
  p += 5;
  skip_blanks(&p, end);
  if (p == end || *p++ != '=') return;
  skip_blanks(&p, end);
  uint64_t a, b;
  int has_a, has_b;
  if (digits(&p, end, &a, &has_a) != 0) return;
  skip_blanks(&p, end);
  if (p == end || *p++ != '-') return;
  skip_blanks(&p, end);
  if (digits(&p, end, &b, &has_b) != 0) return;
  skip_blanks(&p, end);
  if (p != end || (!has_a && !has_b)) return;
  r->kind = has_a ? LP_RANGE_FROM : LP_RANGE_SUFFIX;
  r->a = a;
  r->b = b;
  r->has_b = has_b;
}

int lp_static_range_apply(const lp_static_range *r, uint64_t size, uint64_t *first, uint64_t *last) {
  if (r->kind == LP_RANGE_SUFFIX) {
    if (r->b == 0 || size == 0) return -1;
    *first = r->b >= size ? 0 : size - r->b;
    *last = size - 1;
    return 1;
  }
  if (r->kind == LP_RANGE_FROM) {
    if (r->has_b && r->b < r->a) return 0; /* not a range we serve: the whole file */
    if (r->a >= size) return -1;
    *first = r->a;
    *last = r->has_b && r->b < size - 1 ? r->b : size - 1;
    return 1;
  }
  return 0;
}

void lp_static_http_date(int64_t t, char out[64]) {
  static const char *const days[7] = {"Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"};
  static const char *const months[12] = {"Jan", "Feb", "Mar", "Apr", "May", "Jun",
                                         "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"};
  time_t tt = (time_t)t;
  struct tm tm;
  if (!gmtime_r(&tt, &tm)) memset(&tm, 0, sizeof tm);
  unsigned year = tm.tm_year + 1900 < 0 ? 0u : (unsigned)(tm.tm_year + 1900) % 10000u;
  snprintf(out, 64, "%s, %02u %s %04u %02u:%02u:%02u GMT", days[(unsigned)tm.tm_wday % 7u], (unsigned)tm.tm_mday % 100u,
           months[(unsigned)tm.tm_mon % 12u], year, (unsigned)tm.tm_hour % 100u, (unsigned)tm.tm_min % 100u,
           (unsigned)tm.tm_sec % 100u);
}

/* Content-Length, Date, Connection and the empty line: the end of every head. */
static int end_head(lp_buf *out, uint64_t length, const lp_static_reply *reply) {
  char line[48];
  snprintf(line, sizeof line, "Content-Length: %llu\r\n", (unsigned long long)length);
  int rc = lp_buf_append_str(out, line);
  if (rc == 0 && reply->date_line) rc = lp_buf_append_str(out, reply->date_line);
  if (rc == 0 && !reply->keep) rc = lp_buf_append_str(out, "Connection: close\r\n");
  if (rc == 0 && reply->keep && reply->http10) rc = lp_buf_append_str(out, "Connection: keep-alive\r\n");
  if (rc == 0) rc = lp_buf_append_str(out, "\r\n");
  return rc;
}

static int status_line(lp_buf *out, int status) {
  char line[64];
  snprintf(line, sizeof line, "HTTP/1.1 %d %s\r\n", status, lp_http_reason(status));
  return lp_buf_append_str(out, line);
}

static int file_lines(lp_buf *out, const char *content_type, int64_t mtime) {
  char date[64];
  lp_static_http_date(mtime, date);
  int rc = lp_buf_append_str(out, "Content-Type: ");
  if (rc == 0) rc = lp_buf_append_str(out, content_type);
  if (rc == 0) rc = lp_buf_append_str(out, "\r\nLast-Modified: ");
  if (rc == 0) rc = lp_buf_append_str(out, date);
  if (rc == 0) rc = lp_buf_append_str(out, "\r\nAccept-Ranges: bytes\r\n");
  return rc;
}

int lp_static_file_head(lp_buf *out, int status, const char *content_type, int64_t mtime, uint64_t size, uint64_t first,
                        uint64_t last, const lp_static_reply *reply) {
  int rc = status_line(out, status);
  if (rc == 0) rc = file_lines(out, content_type, mtime);
  if (rc == 0 && status == 206) {
    char line[96];
    snprintf(line, sizeof line, "Content-Range: bytes %llu-%llu/%llu\r\n", (unsigned long long)first,
             (unsigned long long)last, (unsigned long long)size);
    rc = lp_buf_append_str(out, line);
  }
  if (rc == 0) rc = end_head(out, size == 0 ? 0 : last - first + 1, reply);
  return rc;
}

static const char UNSATISFIABLE[] = "{\"error\":\"range not satisfiable\"}";

int lp_static_unsatisfiable(lp_buf *out, int64_t mtime, uint64_t size, int head_only, const lp_static_reply *reply) {
  char line[64];
  snprintf(line, sizeof line, "Content-Range: bytes */%llu\r\n", (unsigned long long)size);
  int rc = status_line(out, 416);
  if (rc == 0) rc = file_lines(out, "application/json", mtime);
  if (rc == 0) rc = lp_buf_append_str(out, line);
  if (rc == 0) rc = end_head(out, sizeof UNSATISFIABLE - 1, reply);
  if (rc == 0 && !head_only) rc = lp_buf_append_str(out, UNSATISFIABLE);
  return rc;
}

int lp_static_error(lp_buf *out, int status, const char *message, const char *allow, int head_only,
                    const lp_static_reply *reply) {
  /* messages are this file's and lp_lua_static.c's constants: no JSON escaping needed */
  size_t body_len = strlen("{\"error\":\"\"}") + strlen(message);
  int rc = status_line(out, status);
  if (rc == 0 && allow) rc = lp_buf_append_str(out, "Allow: ");
  if (rc == 0 && allow) rc = lp_buf_append_str(out, allow);
  if (rc == 0 && allow) rc = lp_buf_append_str(out, "\r\n");
  if (rc == 0) rc = lp_buf_append_str(out, "Content-Type: application/json\r\n");
  if (rc == 0) rc = end_head(out, body_len, reply);
  if (rc == 0 && !head_only) rc = lp_buf_append_str(out, "{\"error\":\"");
  if (rc == 0 && !head_only) rc = lp_buf_append_str(out, message);
  if (rc == 0 && !head_only) rc = lp_buf_append_str(out, "\"}");
  return rc;
}
