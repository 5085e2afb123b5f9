/* lp_cors: the manager's CORS policy in C (see lp_cors.h). */
#include "lp_cors.h"

#include <stdlib.h>
#include <string.h>

static char lower(char ch) { return ch >= 'A' && ch <= 'Z' ? (char)(ch - 'A' + 'a') : ch; }

int lp_cors_add_origin(lp_cors *c, const char *origin, size_t len) {
  char **grown = realloc(c->origins, (c->norigins + 1) * sizeof *grown);
  if (!grown) return -1;
  c->origins = grown;
  char *copy = malloc(len + 1);
  if (!copy) return -1;
  for (size_t i = 0; i < len; i++) copy[i] = lower(origin[i]);
  copy[len] = 0;
  c->origins[c->norigins++] = copy;
  return 0;
}

int lp_cors_set_preflight(lp_cors *c, const char *lines, size_t len) {
  char *copy = malloc(len + 1);
  if (!copy) return -1;
  memcpy(copy, lines, len);
  copy[len] = 0;
  free(c->preflight);
  c->preflight = copy;
  c->preflight_len = len;
  return 0;
}

void lp_cors_free(lp_cors *c) {
  for (size_t i = 0; i < c->norigins; i++) free(c->origins[i]);
  free(c->origins);
  free(c->preflight);
  memset(c, 0, sizeof *c);
}

int lp_cors_allowed(const lp_cors *c, lp_slice origin) {
  if (c->any) return 1;
  if (!origin.ptr) return 0;
  for (size_t i = 0; i < c->norigins; i++) {
    const char *o = c->origins[i];
    if (strlen(o) != origin.len) continue;
    size_t k = 0;
    while (k < origin.len && lower(origin.ptr[k]) == o[k]) k++;
    if (k == origin.len) return 1;
  }
  return 0;
}

int lp_cors_lines(const lp_cors *c, lp_slice origin, lp_buf *out) {
  if (!c->on) return 0;
  int rc = 0;
  if (!c->any) rc = lp_buf_append_str(out, "Vary: Origin\r\n"); /* answers differ by Origin */
  if (rc == 0 && lp_cors_allowed(c, origin)) {
    rc = lp_buf_append_str(out, "Access-Control-Allow-Origin: ");
    if (rc == 0) rc = c->any ? lp_buf_append_str(out, "*") : lp_buf_append(out, origin.ptr, origin.len);
    if (rc == 0) rc = lp_buf_append_str(out, "\r\nAccess-Control-Expose-Headers: Idempotent-Replayed\r\n");
    if (rc == 0 && c->credentials) rc = lp_buf_append_str(out, "Access-Control-Allow-Credentials: true\r\n");
  }
  return rc;
}
