/* lp_json: the little JSON the core needs: escaping a string, validating a
 * value, and picking "category" and "data" out of a publish body without
 * re-encoding data (numbers keep every digit). */
#ifndef LP_JSON_H
#define LP_JSON_H

#include <stddef.h>

#include "lp_buf.h"

#define LP_JSON_MAX_DEPTH 512

/* 1 when s[0..len) is valid UTF-8 (no surrogates, no overlong forms). */
int lp_utf8_is_valid(const char *s, size_t len);

/* Appends s as a quoted JSON string. s must be valid UTF-8.
 * Returns 0, or -1 when memory runs out. */
int lp_json_append_string(lp_buf *out, const char *s, size_t len);

/* Checks that text[0..len) is exactly one JSON value, optionally surrounded
 * by white space. Returns 0, or -1 with *err set to a static message. */
int lp_json_check(const char *text, size_t len, const char **err);

typedef struct lp_publish_body {
  lp_buf category;  /* decoded category bytes; owned by the caller (lp_buf_free) */
  const char *data; /* points into the body: the raw JSON text of "data" */
  size_t data_len;
  int has_category;      /* "category" was present and a string */
  int category_bad_type; /* "category" was present but not a string */
  int has_data;          /* "data" was present and not null */
} lp_publish_body;

/* Parses a publish body: one JSON object, nothing after it but white space.
 * Keys are compared decoded ("\u0063ategory" is "category"), as any JSON
 * parser reads them. On success returns 0 and fills *pb (caller frees
 * pb->category). Returns -1 with *err set when the body is not a JSON object,
 * -2 when memory ran out; pb->category is freed then. Missing keys are
 * reported through the flags, not as errors. */
int lp_json_parse_publish(const char *body, size_t len, lp_publish_body *pb, const char **err);

#endif
