/* fuzz_json: libFuzzer harness for lp_json. Arbitrary bytes go through the
 * strict scanner, the publish-body parser and the string encoder; each must
 * agree with a small reference parser and UTF-8 validator written here from
 * RFC 8259 and the Unicode table (not from lp_json.c), and with each other. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lp_json.h"

#define CHECK(cond)                                                                    \
  do {                                                                                 \
    if (!(cond)) {                                                                     \
      fprintf(stderr, "fuzz_json: invariant failed: %s (line %d)\n", #cond, __LINE__); \
      abort();                                                                         \
    }                                                                                  \
  } while (0)

/* Unicode 15, table 3-7 (well-formed UTF-8 byte sequences). */
static int ref_utf8_valid(const unsigned char *s, size_t n) {
  size_t i = 0;
  while (i < n) {
    unsigned c = s[i];
    size_t len;
    unsigned lo = 0x80, hi = 0xbf; /* range of the second byte */
    if (c <= 0x7f) {
      i++;
      continue;
    } else if (c >= 0xc2 && c <= 0xdf) {
      len = 2;
    } else if (c == 0xe0) {
      len = 3, lo = 0xa0;
    } else if ((c >= 0xe1 && c <= 0xec) || c == 0xee || c == 0xef) {
      len = 3;
    } else if (c == 0xed) {
      len = 3, hi = 0x9f;
    } else if (c == 0xf0) {
      len = 4, lo = 0x90;
    } else if (c >= 0xf1 && c <= 0xf3) {
      len = 4;
    } else if (c == 0xf4) {
      len = 4, hi = 0x8f;
    } else {
      return 0;
    }
    if (n - i < len) return 0;
    if (s[i + 1] < lo || s[i + 1] > hi) return 0;
    for (size_t k = 2; k < len; k++)
      if (s[i + k] < 0x80 || s[i + k] > 0xbf) return 0;
    i += len;
  }
  return 1;
}

static int is_ws(unsigned char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }

/* ---- a reference parser, written from RFC 8259 rather than from lp_json.c:
 * plain recursion, no shared code. Project choices it copies on purpose: a
 * \u escape of an unpaired surrogate is an error, containers nest at most
 * LP_JSON_MAX_DEPTH deep, and keys are matched decoded ("\u0063ategory" is
 * "category", as in any JSON decoder). ---- */

typedef struct ref {
  const unsigned char *p, *end;
} ref;

static void ref_ws(ref *r) {
  while (r->p < r->end && is_ws(*r->p)) r->p++;
}

static int ref_hex(ref *r, unsigned *v) {
  if (r->end - r->p < 4) return -1;
  *v = 0;
  for (int i = 0; i < 4; i++) {
    unsigned c = r->p[i], d;
    if (c >= '0' && c <= '9')
      d = c - '0';
    else if ((c | 0x20) >= 'a' && (c | 0x20) <= 'f')
      d = (c | 0x20) - 'a' + 10;
    else
      return -1;
    *v = *v * 16 + d;
  }
  r->p += 4;
  return 0;
}

static void ref_put(lp_buf *out, unsigned cp) {
  unsigned char t[4];
  size_t n;
  if (cp < 0x80) {
    t[0] = (unsigned char)cp, n = 1;
  } else if (cp < 0x800) {
    t[0] = (unsigned char)(0xc0 + cp / 64), t[1] = (unsigned char)(0x80 + cp % 64), n = 2;
  } else if (cp < 0x10000) {
    t[0] = (unsigned char)(0xe0 + cp / 4096), t[1] = (unsigned char)(0x80 + cp / 64 % 64);
    t[2] = (unsigned char)(0x80 + cp % 64), n = 3;
  } else {
    t[0] = (unsigned char)(0xf0 + cp / 262144), t[1] = (unsigned char)(0x80 + cp / 4096 % 64);
    t[2] = (unsigned char)(0x80 + cp / 64 % 64), t[3] = (unsigned char)(0x80 + cp % 64), n = 4;
  }
  if (out) CHECK(lp_buf_append(out, t, n) == 0);
}

/* string = quotation-mark *char quotation-mark; decoded into out when given */
static int ref_string(ref *r, lp_buf *out) {
  if (r->p >= r->end || *r->p != '"') return -1;
  r->p++;
  for (;;) {
    if (r->p >= r->end) return -1;
    unsigned c = *r->p;
    if (c == '"') {
      r->p++;
      return 0;
    }
    if (c <= 0x1f) return -1;
    if (c != '\\') {
      size_t n = 1;
      if (c >= 0x80) {
        while (n <= 4 && (size_t)(r->end - r->p) >= n && !ref_utf8_valid(r->p, n)) n++;
        if (n > 4 || (size_t)(r->end - r->p) < n) return -1;
      }
      if (out) CHECK(lp_buf_append(out, r->p, n) == 0);
      r->p += n;
      continue;
    }
    r->p++;
    if (r->p >= r->end) return -1;
    unsigned e = *r->p++;
    const char *from = "\"\\/bfnrt", *to = "\"\\/\b\f\n\r\t";
    const char *hit = e ? strchr(from, (int)e) : NULL;
    if (hit) {
      ref_put(out, (unsigned char)to[hit - from]);
      continue;
    }
    if (e != 'u') return -1;
    unsigned cp, lo;
    if (ref_hex(r, &cp) != 0) return -1;
    if (cp >= 0xdc00 && cp <= 0xdfff) return -1;
    if (cp >= 0xd800 && cp <= 0xdbff) {
      if (r->end - r->p < 2 || r->p[0] != '\\' || r->p[1] != 'u') return -1;
      r->p += 2;
      if (ref_hex(r, &lo) != 0 || lo < 0xdc00 || lo > 0xdfff) return -1;
      cp = 0x10000 + (cp - 0xd800) * 1024 + (lo - 0xdc00);
    }
    ref_put(out, cp);
  }
}

static int ref_digits(ref *r) {
  const unsigned char *s = r->p;
  while (r->p < r->end && *r->p >= '0' && *r->p <= '9') r->p++;
  return r->p > s ? 0 : -1;
}

/* number = [ minus ] int [ frac ] [ exp ] */
static int ref_number(ref *r) {
  if (r->p < r->end && *r->p == '-') r->p++;
  if (r->p < r->end && *r->p == '0')
    r->p++;
  else if (r->p >= r->end || *r->p < '1' || *r->p > '9' || ref_digits(r) != 0)
    return -1;
  if (r->p < r->end && *r->p == '.') {
    r->p++;
    if (ref_digits(r) != 0) return -1;
  }
  if (r->p < r->end && (*r->p == 'e' || *r->p == 'E')) {
    r->p++;
    if (r->p < r->end && (*r->p == '+' || *r->p == '-')) r->p++;
    if (ref_digits(r) != 0) return -1;
  }
  return 0;
}

/* depth: containers already open around this value */
static int ref_value(ref *r, int depth) {
  ref_ws(r);
  if (r->p >= r->end) return -1;
  unsigned c = *r->p;
  if (c == '"') return ref_string(r, NULL);
  if (c == '-' || (c >= '0' && c <= '9')) return ref_number(r);
  static const char *const words[] = {"true", "false", "null"};
  for (int i = 0; i < 3; i++) {
    size_t n = strlen(words[i]);
    if (c == (unsigned char)words[i][0]) {
      if ((size_t)(r->end - r->p) < n || memcmp(r->p, words[i], n) != 0) return -1;
      r->p += n;
      return 0;
    }
  }
  if (c != '[' && c != '{') return -1;
  if (depth + 1 > LP_JSON_MAX_DEPTH) return -1;
  unsigned close = c == '[' ? ']' : '}';
  r->p++;
  ref_ws(r);
  if (r->p < r->end && *r->p == close) {
    r->p++;
    return 0;
  }
  for (;;) {
    if (c == '{') {
      ref_ws(r);
      if (ref_string(r, NULL) != 0) return -1;
      ref_ws(r);
      if (r->p >= r->end || *r->p != ':') return -1;
      r->p++;
    }
    if (ref_value(r, depth + 1) != 0) return -1;
    ref_ws(r);
    if (r->p >= r->end) return -1;
    if (*r->p == ',') {
      r->p++;
      continue;
    }
    if (*r->p != close) return -1;
    r->p++;
    return 0;
  }
}

static int ref_check(const unsigned char *s, size_t n) {
  ref r = {s, s + n};
  if (ref_value(&r, 0) != 0) return -1;
  ref_ws(&r);
  return r.p == r.end ? 0 : -1;
}

typedef struct ref_body {
  lp_buf category;
  int has_category, category_bad_type, has_data;
  const unsigned char *data;
  size_t data_len;
} ref_body;

/* The publish body: an object whose values each nest at most
 * LP_JSON_MAX_DEPTH deep on their own; the last "category" and "data" win. */
static int ref_publish(const unsigned char *s, size_t n, ref_body *b) {
  ref r = {s, s + n};
  memset(b, 0, sizeof *b);
  ref_ws(&r);
  if (r.p >= r.end || *r.p != '{') return -1;
  r.p++;
  ref_ws(&r);
  if (r.p < r.end && *r.p == '}') {
    r.p++;
  } else {
    for (;;) {
      ref_ws(&r);
      lp_buf key = LP_BUF_INIT;
      if (ref_string(&r, &key) != 0) {
        lp_buf_free(&key);
        return -1;
      }
      int is_cat = key.len == 8 && memcmp(key.data, "category", 8) == 0;
      int is_data = key.len == 4 && memcmp(key.data, "data", 4) == 0;
      lp_buf_free(&key);
      ref_ws(&r);
      if (r.p >= r.end || *r.p != ':') return -1;
      r.p++;
      ref_ws(&r);
      const unsigned char *v = r.p;
      if (is_cat && r.p < r.end && *r.p == '"') {
        lp_buf_reset(&b->category);
        if (ref_string(&r, &b->category) != 0) return -1;
        b->has_category = 1, b->category_bad_type = 0;
      } else {
        if (ref_value(&r, 0) != 0) return -1;
        if (is_cat) b->has_category = 0, b->category_bad_type = 1;
        if (is_data) {
          b->data = v, b->data_len = (size_t)(r.p - v);
          b->has_data = !(b->data_len == 4 && memcmp(v, "null", 4) == 0);
        }
      }
      ref_ws(&r);
      if (r.p < r.end && *r.p == ',') {
        r.p++;
        continue;
      }
      if (r.p < r.end && *r.p == '}') {
        r.p++;
        break;
      }
      return -1;
    }
  }
  ref_ws(&r);
  return r.p == r.end ? 0 : -1;
}

/* A copy of p[0..n) in its own allocation, so ASan sees any read past n. */
static char *dup_exact(const void *p, size_t n) {
  char *d = malloc(n ? n : 1);
  CHECK(d);
  if (n) memcpy(d, p, n);
  return d;
}

/* Checks a successful parse_publish result against its input. */
static void check_publish(const char *in, size_t len, const lp_publish_body *pb) {
  CHECK(!(pb->has_category && pb->category_bad_type));
  CHECK(pb->category.len <= pb->category.cap);
  if (pb->has_category) CHECK(lp_utf8_is_valid(pb->category.data, pb->category.len));
  if (pb->has_category) CHECK(ref_utf8_valid((const unsigned char *)pb->category.data, pb->category.len));
  if (pb->has_data) {
    CHECK(pb->data != NULL && pb->data_len > 0);
    CHECK(pb->data >= in && pb->data_len <= len && (size_t)(pb->data - in) <= len - pb->data_len);
    CHECK(!is_ws((unsigned char)pb->data[0]) && !is_ws((unsigned char)pb->data[pb->data_len - 1]));
    CHECK(!(pb->data_len == 4 && memcmp(pb->data, "null", 4) == 0));
    const char *err = NULL;
    char *copy = dup_exact(pb->data, pb->data_len);
    CHECK(lp_json_check(copy, pb->data_len, &err) == 0);
    free(copy);
  } else {
    CHECK(pb->data == NULL && pb->data_len == 0);
  }
}

/* Encodes s (valid UTF-8), then checks the text is JSON and decodes back to s. */
static void check_roundtrip(const char *s, size_t len) {
  lp_buf enc = LP_BUF_INIT;
  CHECK(lp_json_append_string(&enc, s, len) == 0);
  CHECK(enc.len >= len + 2 && enc.data[0] == '"' && enc.data[enc.len - 1] == '"');
  const char *err = NULL;
  char *copy = dup_exact(enc.data, enc.len);
  CHECK(lp_json_check(copy, enc.len, &err) == 0);
  free(copy);
  /* The encoding is plain: only control characters, '"' and '\' are escaped. */
  for (size_t i = 0; i < enc.len; i++) CHECK((unsigned char)enc.data[i] >= 0x20);

  lp_buf doc = LP_BUF_INIT;
  CHECK(lp_buf_append_str(&doc, "{\"category\":") == 0);
  CHECK(lp_buf_append(&doc, enc.data, enc.len) == 0);
  CHECK(lp_buf_append_str(&doc, ",\"data\":1}") == 0);
  copy = dup_exact(doc.data, doc.len);
  lp_publish_body pb;
  err = NULL;
  CHECK(lp_json_parse_publish(copy, doc.len, &pb, &err) == 0);
  CHECK(pb.has_category && !pb.category_bad_type && pb.category.len == len);
  CHECK(len == 0 || memcmp(pb.category.data, s, len) == 0);
  CHECK(pb.has_data && pb.data_len == 1 && pb.data[0] == '1');
  check_publish(copy, doc.len, &pb);
  lp_buf_free(&pb.category);
  free(copy);
  lp_buf_free(&doc);
  lp_buf_free(&enc);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  const char *in = (const char *)data;

  /* 1. The scanner: no crash, an error message on failure. */
  const char *check_err = NULL;
  int checked = lp_json_check(in, size, &check_err);
  CHECK(checked == 0 || (checked == -1 && check_err != NULL));

  /* 2. The scanner agrees with the reference parser. */
  CHECK(checked == ref_check(data, size));

  /* 3. The publish-body parser agrees with the reference, field by field. */
  lp_publish_body pb;
  const char *err = NULL;
  int parsed = lp_json_parse_publish(in, size, &pb, &err);
  CHECK(parsed == 0 || (parsed == -1 && err != NULL));
  ref_body rb;
  int ref_parsed = ref_publish(data, size, &rb);
  CHECK(parsed == ref_parsed);
  if (parsed == 0) {
    check_publish(in, size, &pb);
    CHECK(pb.has_category == rb.has_category && pb.category_bad_type == rb.category_bad_type);
    CHECK(pb.has_data == rb.has_data);
    if (pb.has_category)
      CHECK(pb.category.len == rb.category.len &&
            (pb.category.len == 0 || memcmp(pb.category.data, rb.category.data, pb.category.len) == 0));
    if (pb.has_data) CHECK((const unsigned char *)pb.data == rb.data && pb.data_len == rb.data_len);
    lp_buf_free(&pb.category);
  } else {
    CHECK(pb.category.data == NULL && !pb.has_category && !pb.has_data && pb.data == NULL);
  }
  lp_buf_free(&rb.category);
  /* Directly, too: a body is a JSON object, and every JSON object is a body. */
  size_t first = 0;
  while (first < size && is_ws(data[first])) first++;
  int is_object = first < size && data[first] == '{';
  if (parsed == 0) CHECK(is_object);
  if (checked == 0 && is_object) CHECK(parsed == 0);

  /* 4. Valid UTF-8: the two validators agree. */
  int valid = lp_utf8_is_valid(in, size);
  CHECK(valid == ref_utf8_valid(data, size));

  /* 5. Encoding round trip, on the input itself when it is valid UTF-8,
   * else on the input with every byte of an invalid sequence made '?'. */
  if (valid) {
    check_roundtrip(in, size);
  } else {
    char *fixed = dup_exact(in, size);
    size_t i = 0;
    while (i < size) {
      size_t n = 1;
      while (n <= 4 && i + n <= size && !ref_utf8_valid((const unsigned char *)fixed + i, n)) n++;
      if (n > 4 || i + n > size) {
        fixed[i++] = '?';
      } else {
        i += n;
      }
    }
    CHECK(lp_utf8_is_valid(fixed, size));
    check_roundtrip(fixed, size);
    free(fixed);
  }
  return 0;
}
