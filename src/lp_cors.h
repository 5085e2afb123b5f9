/* lp_cors: the CORS policy of the manager's handlers (option `cors`, lua/longpoll/cors.lua) for
 * the HTTP engine's native path: which Origin is allowed, the header lines an answer to it
 * carries, and the lines of an allowed preflight. The same rules as cors.lua's Policy (checked
 * against it byte for byte by spec/fast_path_spec.lua). Sans-I/O; the policy owns its strings. */
#ifndef LP_CORS_H
#define LP_CORS_H

#include <stddef.h>

#include "lp_buf.h"
#include "lp_store.h" /* lp_slice */

typedef struct lp_cors {
  int on;          /* 0: no policy, answers get no CORS lines */
  int any;         /* origins = "*" */
  int credentials; /* Access-Control-Allow-Credentials: true for allowed origins */
  char **origins;  /* the listed origins, lower-cased, owned */
  size_t norigins;
  char *preflight; /* the Access-Control-Allow-Methods/-Headers and -Max-Age lines, owned */
  size_t preflight_len;
} lp_cors;

/* Adds a listed origin (copied, lower-cased). 0, or -1 when memory ran out. */
int lp_cors_add_origin(lp_cors *c, const char *origin, size_t len);
/* Sets the preflight lines (copied). 0, or -1 when memory ran out. */
int lp_cors_set_preflight(lp_cors *c, const char *lines, size_t len);
/* Frees what c owns and zeroes it (no policy). */
void lp_cors_free(lp_cors *c);

/* Whether origin (ptr NULL: the request had none) is allowed: any, or listed (ASCII letters
 * compared without case). */
int lp_cors_allowed(const lp_cors *c, lp_slice origin);
/* Appends the lines an answer to a request with this Origin carries (Policy:add_headers):
 * "Vary: Origin" unless any; for an allowed origin Access-Control-Allow-Origin (the origin as
 * sent, or *), -Expose-Headers and, with credentials, -Allow-Credentials. Nothing without a
 * policy. 0, or -1 when memory ran out. */
int lp_cors_lines(const lp_cors *c, lp_slice origin, lp_buf *out);

#endif
