/* lp_resp: Redis's wire protocol (RESP2) without I/O: a command appended to a buffer, and one
 * reply read from received bytes. What the C publish path (lp_lua_redis_publish.c) needs: replies
 * are read whole (nested arrays included) but only their top level and up to LP_RESP_MAX_ITEMS
 * string items are kept; a deeper or longer reply is consumed and reported by its type. */
#ifndef LP_RESP_H
#define LP_RESP_H

#include <stddef.h>
#include <stdint.h>

#include "lp_buf.h"
#include "lp_store.h" /* lp_slice */

#define LP_RESP_MAX_ITEMS 4
/* A reply's nesting and size limits: beyond them the stream counts as broken (-1). */
#define LP_RESP_MAX_DEPTH 8
#define LP_RESP_MAX_BULK (512u << 20)

enum { LP_RESP_STATUS = 1, LP_RESP_ERROR, LP_RESP_INTEGER, LP_RESP_BULK, LP_RESP_NIL, LP_RESP_ARRAY };

typedef struct lp_resp_reply {
  int type;
  lp_slice str;    /* STATUS, ERROR, BULK: points into the bytes read */
  int64_t integer; /* INTEGER; ARRAY: its element count */
  /* ARRAY: its first elements that are bulk or status strings (ptr NULL for other types) */
  lp_slice items[LP_RESP_MAX_ITEMS];
} lp_resp_reply;

/* Appends the command argv[0..argc) to out as a RESP array of bulk strings. 0, or -1 when
 * memory ran out (out keeps what it had). */
int lp_resp_append_command(lp_buf *out, size_t argc, const lp_slice *argv);
/* Appends one bulk string ("$<len>\r\n<bytes>\r\n"); 0 or -1 as above. */
int lp_resp_append_bulk(lp_buf *out, lp_slice s);

/* Reads the reply at the start of p[0..len): the bytes it takes (> 0) with *r filled (its slices
 * point into p), 0 when the bytes end before the reply does, -1 when they are not RESP (the
 * connection is unusable then). */
long lp_resp_read(const char *p, size_t len, lp_resp_reply *r);

#endif
