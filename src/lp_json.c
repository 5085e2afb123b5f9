/* lp_json: a strict, depth-limited JSON scanner (RFC 8259) with no allocation
 * except for the decoded category string. */
#include "lp_json.h"

#include <string.h>

/* Length of the UTF-8 sequence at s (at most len bytes), or 0 when invalid. */
static size_t utf8_seq(const unsigned char *s, size_t len) {
  unsigned c = s[0];
  if (c < 0x80) return 1;
  size_t n;
  unsigned min;
  unsigned cp;
  if (c >= 0xc2 && c <= 0xdf) {
    n = 2, min = 0x80, cp = c & 0x1f;
  } else if (c >= 0xe0 && c <= 0xef) {
    n = 3, min = 0x800, cp = c & 0x0f;
  } else if (c >= 0xf0 && c <= 0xf4) {
    n = 4, min = 0x10000, cp = c & 0x07;
  } else {
    return 0;
  }
  if (len < n) return 0;
  for (size_t i = 1; i < n; i++) {
    if ((s[i] & 0xc0) != 0x80) return 0;
    cp = (cp << 6) | (s[i] & 0x3f);
  }
  if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) return 0;
  return n;
}

int lp_utf8_is_valid(const char *s, size_t len) {
  const unsigned char *p = (const unsigned char *)s;
  size_t i = 0;
  while (i < len) {
    if (p[i] < 0x80) {
      i++;
      continue;
    }
    size_t n = utf8_seq(p + i, len - i);
    if (n == 0) return 0;
    i += n;
  }
  return 1;
}

int lp_json_append_string(lp_buf *out, const char *s, size_t len) {
  static const char hex[] = "0123456789abcdef";
  if (lp_buf_reserve(out, len + 2) != 0) return -1;
  if (lp_buf_append_char(out, '"') != 0) return -1;
  size_t run = 0; /* bytes that need no escaping are copied in runs */
  for (size_t i = 0; i < len; i++) {
    unsigned char c = (unsigned char)s[i];
    if (c >= 0x20 && c != '"' && c != '\\') continue;
    if (lp_buf_append(out, s + run, i - run) != 0) return -1;
    char esc[6] = {'\\', 0, 0, 0, 0, 0};
    size_t n = 2;
    switch (c) {
      case '"': esc[1] = '"'; break;
      case '\\': esc[1] = '\\'; break;
      case '\n': esc[1] = 'n'; break;
      case '\r': esc[1] = 'r'; break;
      case '\t': esc[1] = 't'; break;
      case '\b': esc[1] = 'b'; break;
      case '\f': esc[1] = 'f'; break;
      default: esc[1] = 'u', esc[2] = '0', esc[3] = '0', esc[4] = hex[c >> 4], esc[5] = hex[c & 15]; n = 6;
    }
    if (lp_buf_append(out, esc, n) != 0) return -1;
    run = i + 1;
  }
  if (lp_buf_append(out, s + run, len - run) != 0) return -1;
  return lp_buf_append_char(out, '"');
}

typedef struct scanner {
  const unsigned char *p;
  const unsigned char *end;
  const char *err;
} scanner;

static const char out_of_memory[] = "out of memory";

static void skip_ws(scanner *sc) {
  while (sc->p < sc->end && (*sc->p == ' ' || *sc->p == '\t' || *sc->p == '\n' || *sc->p == '\r')) sc->p++;
}

static int fail(scanner *sc, const char *msg) {
  if (!sc->err) sc->err = msg;
  return -1;
}

static int hex4(const unsigned char *p, unsigned *out) {
  unsigned v = 0;
  for (int i = 0; i < 4; i++) {
    unsigned c = p[i];
    v <<= 4;
    if (c >= '0' && c <= '9')
      v |= c - '0';
    else if (c >= 'a' && c <= 'f')
      v |= c - 'a' + 10;
    else if (c >= 'A' && c <= 'F')
      v |= c - 'A' + 10;
    else
      return -1;
  }
  *out = v;
  return 0;
}

/* Writes code point cp as UTF-8 into t; returns the length (1 to 4). */
static size_t utf8_encode(unsigned cp, unsigned char t[4]) {
  if (cp < 0x80) {
    t[0] = (unsigned char)cp;
    return 1;
  }
  if (cp < 0x800) {
    t[0] = (unsigned char)(0xc0 | (cp >> 6)), t[1] = (unsigned char)(0x80 | (cp & 0x3f));
    return 2;
  }
  if (cp < 0x10000) {
    t[0] = (unsigned char)(0xe0 | (cp >> 12)), t[1] = (unsigned char)(0x80 | ((cp >> 6) & 0x3f));
    t[2] = (unsigned char)(0x80 | (cp & 0x3f));
    return 3;
  }
  t[0] = (unsigned char)(0xf0 | (cp >> 18)), t[1] = (unsigned char)(0x80 | ((cp >> 12) & 0x3f));
  t[2] = (unsigned char)(0x80 | ((cp >> 6) & 0x3f)), t[3] = (unsigned char)(0x80 | (cp & 0x3f));
  return 4;
}

static int put_utf8(lp_buf *b, unsigned cp) {
  unsigned char t[4];
  size_t n = utf8_encode(cp, t);
  return lp_buf_append(b, t, n);
}

/* Scans a string starting at the opening quote. When out is not NULL the
 * decoded bytes are appended to it. */
static int scan_string(scanner *sc, lp_buf *out) {
  sc->p++; /* opening quote */
  for (;;) {
    if (sc->p >= sc->end) return fail(sc, "unterminated string");
    unsigned c = *sc->p;
    if (c == '"') {
      sc->p++;
      return 0;
    }
    if (c < 0x20) return fail(sc, "control character in string");
    if (c == '\\') {
      if (sc->end - sc->p < 2) return fail(sc, "unterminated string");
      unsigned e = sc->p[1];
      const char *simple = NULL;
      switch (e) {
        case '"': simple = "\""; break;
        case '\\': simple = "\\"; break;
        case '/': simple = "/"; break;
        case 'b': simple = "\b"; break;
        case 'f': simple = "\f"; break;
        case 'n': simple = "\n"; break;
        case 'r': simple = "\r"; break;
        case 't': simple = "\t"; break;
        case 'u': break;
        default: return fail(sc, "invalid escape in string");
      }
      if (simple) {
        if (out && lp_buf_append(out, simple, 1) != 0) return fail(sc, out_of_memory);
        sc->p += 2;
        continue;
      }
      unsigned cp;
      if (sc->end - sc->p < 6 || hex4(sc->p + 2, &cp) != 0) return fail(sc, "invalid \\u escape");
      sc->p += 6;
      if (cp >= 0xd800 && cp <= 0xdbff) {
        unsigned lo;
        if (sc->end - sc->p < 6 || sc->p[0] != '\\' || sc->p[1] != 'u' || hex4(sc->p + 2, &lo) != 0 || lo < 0xdc00 ||
            lo > 0xdfff)
          return fail(sc, "unpaired surrogate in string");
        cp = 0x10000 + ((cp - 0xd800) << 10) + (lo - 0xdc00);
        sc->p += 6;
      } else if (cp >= 0xdc00 && cp <= 0xdfff) {
        return fail(sc, "unpaired surrogate in string");
      }
      if (out && put_utf8(out, cp) != 0) return fail(sc, out_of_memory);
      continue;
    }
    size_t n = c < 0x80 ? 1 : utf8_seq(sc->p, (size_t)(sc->end - sc->p));
    if (n == 0) return fail(sc, "invalid UTF-8 in string");
    if (out && lp_buf_append(out, sc->p, n) != 0) return fail(sc, out_of_memory);
    sc->p += n;
  }
}

static int is_digit(unsigned c) { return c >= '0' && c <= '9'; }

static int scan_number(scanner *sc) {
  const unsigned char *p = sc->p, *end = sc->end;
  if (p < end && *p == '-') p++;
  if (p >= end) return fail(sc, "invalid number");
  if (*p == '0') {
    p++;
  } else if (is_digit(*p)) {
    while (p < end && is_digit(*p)) p++;
  } else {
    return fail(sc, "invalid number");
  }
  if (p < end && *p == '.') {
    p++;
    if (p >= end || !is_digit(*p)) return fail(sc, "invalid number");
    while (p < end && is_digit(*p)) p++;
  }
  if (p < end && (*p == 'e' || *p == 'E')) {
    p++;
    if (p < end && (*p == '+' || *p == '-')) p++;
    if (p >= end || !is_digit(*p)) return fail(sc, "invalid number");
    while (p < end && is_digit(*p)) p++;
  }
  sc->p = p;
  return 0;
}

static int scan_literal(scanner *sc, const char *word) {
  size_t n = strlen(word);
  if ((size_t)(sc->end - sc->p) < n || memcmp(sc->p, word, n) != 0) return fail(sc, "invalid JSON value");
  sc->p += n;
  return 0;
}

/* Containers are scanned with an explicit stack of open brackets, so that
 * hostile nesting costs no C stack; depth is still bounded. */
static int scan_value(scanner *sc) {
  char stack[LP_JSON_MAX_DEPTH];
  int depth = 0;
  for (;;) {
    skip_ws(sc);
    if (sc->p >= sc->end) return fail(sc, "unexpected end of JSON");
    unsigned c = *sc->p;
    int opened = 0;
    if (c == '{' || c == '[') {
      if (depth == LP_JSON_MAX_DEPTH) return fail(sc, "JSON nested too deeply");
      stack[depth++] = (char)c;
      sc->p++;
      skip_ws(sc);
      if (sc->p < sc->end && *sc->p == (c == '{' ? '}' : ']')) {
        sc->p++;
        depth--;
      } else {
        opened = 1;
      }
    } else if (c == '"') {
      if (scan_string(sc, NULL) != 0) return -1;
    } else if (c == '-' || is_digit(c)) {
      if (scan_number(sc) != 0) return -1;
    } else if (c == 't') {
      if (scan_literal(sc, "true") != 0) return -1;
    } else if (c == 'f') {
      if (scan_literal(sc, "false") != 0) return -1;
    } else if (c == 'n') {
      if (scan_literal(sc, "null") != 0) return -1;
    } else {
      return fail(sc, "invalid JSON value");
    }
    /* After a value (or an opening bracket): a key in an object, or the
     * separator / closing bracket of the enclosing container. */
    for (;;) {
      if (depth == 0) return 0;
      if (opened) {
        opened = 0;
        if (stack[depth - 1] == '[') break; /* next: first element */
      } else {
        skip_ws(sc);
        if (sc->p >= sc->end) return fail(sc, "unexpected end of JSON");
        char close = stack[depth - 1] == '{' ? '}' : ']';
        if (*sc->p == close) {
          sc->p++;
          depth--;
          continue;
        }
        if (*sc->p != ',') return fail(sc, "expected ',' or a closing bracket");
        sc->p++;
        if (stack[depth - 1] == '[') break;
      }
      /* In an object: a key and a colon come before the next value. */
      skip_ws(sc);
      if (sc->p >= sc->end || *sc->p != '"') return fail(sc, "expected a string key");
      if (scan_string(sc, NULL) != 0) return -1;
      skip_ws(sc);
      if (sc->p >= sc->end || *sc->p != ':') return fail(sc, "expected ':'");
      sc->p++;
      break;
    }
  }
}

int lp_json_check(const char *text, size_t len, const char **err) {
  scanner sc = {(const unsigned char *)text, (const unsigned char *)text + len, NULL};
  if (scan_value(&sc) != 0) {
    *err = sc.err;
    return -1;
  }
  skip_ws(&sc);
  if (sc.p != sc.end) {
    *err = "unexpected bytes after the JSON value";
    return -1;
  }
  return 0;
}

/* 1 when the key at [start, end) (quotes included, already checked by
 * scan_string) decodes to name: escapes are decoded as any JSON parser would,
 * so "\u0063ategory" is the key category. No allocation: the decoded bytes are
 * compared as they come. */
static int key_is(const unsigned char *start, const unsigned char *end, const char *name) {
  const unsigned char *p = start + 1, *q = end - 1;
  size_t n = strlen(name), i = 0;
  while (p < q) {
    unsigned char t[4];
    size_t tn = 1;
    if (*p != '\\') {
      t[0] = *p++;
    } else if (p[1] != 'u') {
      static const char from[] = "\"\\/bfnrt", to[] = "\"\\/\b\f\n\r\t";
      t[0] = (unsigned char)to[strchr(from, p[1]) - from];
      p += 2;
    } else {
      unsigned cp, lo;
      hex4(p + 2, &cp);
      p += 6;
      if (cp >= 0xd800 && cp <= 0xdbff) { /* scan_string checked the pair */
        hex4(p + 2, &lo);
        cp = 0x10000 + ((cp - 0xd800) << 10) + (lo - 0xdc00);
        p += 6;
      }
      tn = utf8_encode(cp, t);
    }
    if (tn > n - i || memcmp(t, name + i, tn) != 0) return 0;
    i += tn;
  }
  return i == n;
}

int lp_json_parse_publish(const char *body, size_t len, lp_publish_body *pb, const char **err) {
  memset(pb, 0, sizeof *pb);
  scanner sc = {(const unsigned char *)body, (const unsigned char *)body + len, NULL};
  skip_ws(&sc);
  if (sc.p >= sc.end || *sc.p != '{') {
    *err = "body is not a JSON object";
    return -1;
  }
  sc.p++;
  skip_ws(&sc);
  int first = 1;
  for (;;) {
    skip_ws(&sc);
    if (sc.p < sc.end && *sc.p == '}' && first) {
      sc.p++;
      break;
    }
    if (sc.p >= sc.end || *sc.p != '"') {
      fail(&sc, "expected a string key");
      goto bad;
    }
    const unsigned char *kstart = sc.p;
    if (scan_string(&sc, NULL) != 0) goto bad;
    const unsigned char *kend = sc.p;
    skip_ws(&sc);
    if (sc.p >= sc.end || *sc.p != ':') {
      fail(&sc, "expected ':'");
      goto bad;
    }
    sc.p++;
    skip_ws(&sc);
    const unsigned char *vstart = sc.p;
    int is_category = key_is(kstart, kend, "category");
    if (is_category && sc.p < sc.end && *sc.p == '"') {
      /* a later duplicate key wins, as in Go's decoder */
      lp_buf_reset(&pb->category);
      if (scan_string(&sc, &pb->category) != 0) goto bad;
      pb->has_category = 1;
      pb->category_bad_type = 0;
    } else {
      if (scan_value(&sc) != 0) goto bad;
      if (is_category) {
        pb->has_category = 0;
        pb->category_bad_type = 1;
      } else if (key_is(kstart, kend, "data")) {
        pb->data = (const char *)vstart;
        pb->data_len = (size_t)(sc.p - vstart);
        pb->has_data = !(pb->data_len == 4 && memcmp(vstart, "null", 4) == 0);
      }
    }
    first = 0;
    skip_ws(&sc);
    if (sc.p < sc.end && *sc.p == ',') {
      sc.p++;
      continue;
    }
    if (sc.p < sc.end && *sc.p == '}') {
      sc.p++;
      break;
    }
    fail(&sc, "expected ',' or '}'");
    goto bad;
  }
  skip_ws(&sc);
  if (sc.p != sc.end) {
    fail(&sc, "unexpected bytes after the JSON object");
    goto bad;
  }
  if (!pb->has_data) pb->data = NULL, pb->data_len = 0;
  return 0;
bad:
  *err = sc.err ? sc.err : "invalid JSON";
  lp_buf_free(&pb->category);
  memset(pb, 0, sizeof *pb);
  return *err == out_of_memory ? -2 : -1;
}
