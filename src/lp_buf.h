/* lp_buf: a growable byte buffer; the one place the core grows output text. */
#ifndef LP_BUF_H
#define LP_BUF_H

#include <stddef.h>
#include <stdint.h>

typedef struct lp_buf {
  char *data; /* owned; NULL until the first append */
  size_t len;
  size_t cap;
} lp_buf;

#define LP_BUF_INIT \
  { NULL, 0, 0 }

/* Each append returns 0, or -1 when memory runs out (the buffer is unchanged then). */
int lp_buf_reserve(lp_buf *b, size_t extra);
int lp_buf_append(lp_buf *b, const void *p, size_t n);
int lp_buf_append_str(lp_buf *b, const char *s);
int lp_buf_append_char(lp_buf *b, char c);
int lp_buf_append_i64(lp_buf *b, int64_t v);
/* Empties the buffer but keeps its memory for reuse. */
void lp_buf_reset(lp_buf *b);
/* Frees the memory; the buffer is empty and reusable afterwards. */
void lp_buf_free(lp_buf *b);

#endif
