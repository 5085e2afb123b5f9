/* lp_fast: what the HTTP engine needs to serve a long poll without entering Lua: the
 * subscription read from a raw query string exactly as the manager reads it (longpoll.
 * subscription), but only in the case the fast path serves: a valid query, with or without a
 * since_time cursor. Anything else (errors, something unusual) is left to the Lua handler, which
 * answers it with its own messages. Sans-I/O, no allocation beyond the caller's buffer. */
#ifndef LP_FAST_H
#define LP_FAST_H

#include <stddef.h>
#include <stdint.h>

#include "lp_buf.h"
#include "lp_store.h" /* lp_slice */
#include "lp_uuid.h"

#define LP_FAST_MAX_CATEGORIES 64

typedef struct lp_fast_limits {
  size_t max_category_bytes;
  size_t max_categories; /* per subscription */
  int64_t max_timeout_s; /* the long poll's `timeout`: 1..this (a stream has none) */
} lp_fast_limits;

typedef struct lp_fast_sub {
  lp_slice categories[LP_FAST_MAX_CATEGORIES]; /* decoded, in query order, into the scratch buffer */
  size_t ncategories;
  int has_since; /* 0: no cursor, the poll waits for the next event */
  int64_t since;
  int has_last_id;
  char last_id[LP_UUID_LEN + 1]; /* lower-cased */
  int64_t timeout_s;
} lp_fast_sub;

/* Reads a long poll's subscription from a raw query (undecoded). scratch is emptied and holds
 * the decoded categories afterwards (out's slices point into it until it is next changed).
 * Returns 1 when the query is valid; 0 when the Lua handler must decide (an error, a last_id
 * without since_time); -1 when memory ran out. */
int lp_fast_parse_subscription(lp_slice query, const lp_fast_limits *lim, lp_buf *scratch, lp_fast_sub *out);

/* Reads an SSE stream's subscription as longpoll.subscription reads kind "stream": no timeout;
 * the cursor comes from last_event_id_header (the request's Last-Event-ID, ptr NULL when absent)
 * when not empty, else from the query's last_event_id when not empty, else from since_time (+
 * last_id); with none the stream starts at the present (has_since 0). A resume cursor is
 * "<timestamp>_<uuid>" or "<timestamp>". Same returns and scratch rules as above. */
int lp_fast_parse_stream(lp_slice query, lp_slice last_event_id_header, const lp_fast_limits *lim, lp_buf *scratch,
                         lp_fast_sub *out);

#endif
