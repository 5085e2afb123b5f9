/* lp_http: a sans-I/O HTTP/1.x request parser for the server: request line, headers,
 * Content-Length and chunked bodies, with a server's limits; and the percent-decoding of
 * request targets and query strings. Bytes go in, requests come out; nothing here reads a
 * socket or allocates behind the caller's back (the parser owns two buffers, freed by
 * lp_http_free). */
#ifndef LP_HTTP_H
#define LP_HTTP_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "lp_buf.h"
#include "lp_store.h" /* lp_slice */

/* The longest chunk-size line (size plus extensions) accepted; clients send a few bytes. */
#define LP_HTTP_MAX_CHUNK_LINE 1024

typedef struct lp_http_limits {
  size_t max_header_bytes; /* request line, headers and the empty line: 431 beyond */
  size_t max_body_bytes;   /* 413 beyond (Content-Length, or the chunks' total) */
  size_t max_url_bytes;    /* the request target: 414 beyond */
} lp_http_limits;

typedef struct lp_http_header {
  lp_slice name;  /* lower-cased */
  lp_slice value; /* without the blanks around it */
} lp_http_header;

/* What lp_http_parse found. Every request is reported twice: LP_HTTP_HEAD, then LP_HTTP_BODY
 * once its body is complete (at once when it has none). */
enum { LP_HTTP_MORE = 0, LP_HTTP_HEAD = 1, LP_HTTP_BODY = 2, LP_HTTP_ERROR = -1 };

typedef struct lp_http_event {
  /* LP_HTTP_HEAD */
  lp_slice method, target;
  int minor;                     /* HTTP/1.<minor>: 0 or 1 */
  const lp_http_header *headers; /* in arrival order, repeats kept */
  size_t nheaders;
  int keep_alive;      /* from the version and Connection */
  int expect_continue; /* Expect: 100-continue on HTTP/1.1 */
  /* LP_HTTP_BODY: the whole body, de-chunked */
  lp_slice body;
  /* LP_HTTP_ERROR: the status to answer (400, 413, 414, 431, 505; 500 when memory ran out)
   * and a static message. The parser is empty again afterwards; close the connection. */
  int status;
  const char *message;
} lp_http_event;

typedef struct lp_http_parser {
  lp_http_limits limits;
  lp_buf in;   /* bytes received; those before pos are consumed */
  size_t pos;  /* first unconsumed byte of in */
  size_t scan; /* where the search for the end of the head resumes */
  int state;
  int oom;            /* lp_http_push ran out of memory: the next parse reports it */
  uint64_t remaining; /* bytes missing from the body or the current chunk */
  uint64_t body_len;  /* body bytes announced so far (chunked) */
  lp_buf body;        /* the body, when it does not arrive in one piece */
  lp_http_header *headers;
  size_t headers_cap;
} lp_http_parser;

/* Makes p an empty parser with the given limits (copied). It owns nothing yet. */
void lp_http_init(lp_http_parser *p, const lp_http_limits *limits);
/* Frees what p holds; p is empty (and may be used again) afterwards. */
void lp_http_free(lp_http_parser *p);

/* Appends received bytes (copied). Returns 0, or -1 when memory runs out: the next
 * lp_http_parse then reports LP_HTTP_ERROR with status 500. */
int lp_http_push(lp_http_parser *p, const char *data, size_t len);

/* Parses what was pushed. Returns LP_HTTP_MORE (need more bytes), LP_HTTP_HEAD,
 * LP_HTTP_BODY or LP_HTTP_ERROR and fills *ev as described there. The slices in *ev point
 * into p and stay valid until the next call on p. */
int lp_http_parse(lp_http_parser *p, lp_http_event *ev);

/* Bytes received but not yet part of a reported request (a started head, pipelined requests). */
size_t lp_http_buffered(const lp_http_parser *p);
/* 1 while a request has started but has not been reported whole. */
int lp_http_in_progress(const lp_http_parser *p);

/* Splits a request target into its raw path and raw query (after the first '?', empty when
 * none). The path of an absolute-form target ("http://host/p") is "/p" ("/" when empty).
 * Returns 0, or -1 when the target is neither origin-form, absolute-form nor "*". */
int lp_http_split_target(lp_slice target, lp_slice *path, lp_slice *query);

/* Percent-decodes in[0..len) into out, which has room for len bytes (decoding never grows);
 * '+' becomes ' ' when plus_is_space (query strings). Returns the decoded length, or -1 when a
 * '%' is not followed by two hex digits. */
ssize_t lp_http_decode(const char *in, size_t len, char *out, int plus_is_space);

/* Iterates over the "key=value" pairs of a raw query string, skipping empty pieces ("a&&b").
 * *pos starts at 0. Returns 1 with the raw (undecoded) key and value, value empty and
 * *has_value 0 when the piece has no '='; returns 0 after the last pair. */
int lp_http_query_next(lp_slice query, size_t *pos, lp_slice *key, lp_slice *value, int *has_value);

#endif
