/* lp_fast: the catch-up long poll read from a raw query (see lp_fast.h). Its rules mirror
 * lua/longpoll/subscription.lua; spec/fast_path_spec.lua checks that both paths give the same
 * answers. */
#include "lp_fast.h"

#include <string.h>

#include "lp_http.h"
#include "lp_json.h"

static int eq(lp_slice s, const char *lit) { return s.len == strlen(lit) && memcmp(s.ptr, lit, s.len) == 0; }

/* Digits with an optional sign ('-' only when allow_minus) into *v; 0 when not such a number or
 * too long to be surely within int64 (the Lua side then decides). */
static int parse_int(lp_slice s, int allow_minus, int64_t *v) {
  size_t i = 0;
  int neg = 0;
  if (i < s.len && (s.ptr[i] == '+' || (allow_minus && s.ptr[i] == '-'))) neg = s.ptr[i++] == '-';
  if (i == s.len || s.len - i > 18) return 0;
  int64_t n = 0;
  for (; i < s.len; i++) {
    if (s.ptr[i] < '0' || s.ptr[i] > '9') return 0;
    n = n * 10 + (s.ptr[i] - '0');
  }
  *v = neg ? -n : n;
  return 1;
}

/* A lower-cased copy of a valid UUID into out->last_id. */
static void set_last_id(lp_fast_sub *out, lp_slice id) {
  for (size_t i = 0; i < LP_UUID_LEN; i++) {
    char c = id.ptr[i];
    out->last_id[i] = (c >= 'A' && c <= 'Z') ? (char)(c - 'A' + 'a') : c;
  }
  out->last_id[LP_UUID_LEN] = 0;
  out->has_last_id = 1;
}

/* An SSE resume cursor, "<timestamp>_<uuid>" or "<timestamp>" (subscription.parse_cursor), into
 * out; 0 when malformed (the Lua handler's 400). */
static int parse_resume(lp_slice s, lp_fast_sub *out) {
  const char *us = memchr(s.ptr, '_', s.len);
  lp_slice ts = {s.ptr, us ? (size_t)(us - s.ptr) : s.len};
  if (!parse_int(ts, 1, &out->since)) return 0;
  out->has_since = 1;
  out->has_last_id = 0;
  if (!us) return 1;
  lp_slice id = {us + 1, s.len - ts.len - 1};
  if (!lp_uuid_is_valid(id.ptr, id.len)) return 0;
  set_last_id(out, id);
  return 1;
}

/* stream: 0 for a long poll (timeout required), 1 for an SSE stream (see lp_fast.h). */
static int parse(lp_slice query, lp_slice resume_header, int stream, const lp_fast_limits *lim, lp_buf *scratch,
                 lp_fast_sub *out) {
  lp_buf_reset(scratch);
  /* decoding never grows: with this room, the slices into scratch stay put */
  if (lp_buf_reserve(scratch, query.len + 1) != 0) return -1;
  memset(out, 0, sizeof *out);
  int have_timeout = 0, have_since = 0, have_last_id = 0, have_resume = 0;
  lp_slice resume = {NULL, 0};
  size_t pos = 0;
  lp_slice k, v;
  int has_value;
  /* each pass consumes one piece of the query */
  while (lp_http_query_next(query, &pos, &k, &v, &has_value)) {
    char *kd = scratch->data + scratch->len;
    ssize_t kn = lp_http_decode(k.ptr, k.len, kd, 1);
    if (kn < 0) return 0; /* 400 from the Lua side */
    lp_slice key = {kd, (size_t)kn};
    char *vd = kd + kn;
    ssize_t vn = lp_http_decode(v.ptr, v.len, vd, 1);
    if (vn < 0) return 0;
    lp_slice value = {vd, (size_t)vn};
    if (eq(key, "category")) {
      if (out->ncategories == LP_FAST_MAX_CATEGORIES) return 0;
      out->categories[out->ncategories++] = value;
      scratch->len += (size_t)kn + (size_t)vn; /* keep the decoded value */
      continue;
    }
    /* the first value of a parameter is the one the handler reads */
    if (!stream && eq(key, "timeout") && !have_timeout) {
      have_timeout = 1;
      if (value.len > 0 && value.ptr[0] == '-') return 0;
      if (!parse_int(value, 0, &out->timeout_s) || out->timeout_s < 1 || out->timeout_s > lim->max_timeout_s) return 0;
    } else if (eq(key, "since_time") && !have_since) {
      have_since = 1;
      if (value.len == 0) continue; /* empty means absent: the poll waits for the next event */
      if (!parse_int(value, 1, &out->since)) return 0;
      out->has_since = 1;
    } else if (eq(key, "last_id") && !have_last_id) {
      have_last_id = 1;
      if (value.len == 0) continue;
      if (!lp_uuid_is_valid(value.ptr, value.len)) return 0;
      set_last_id(out, value);
    } else if (stream && eq(key, "last_event_id") && !have_resume) {
      have_resume = 1;
      resume = value;
      scratch->len += (size_t)kn + (size_t)vn; /* keep the decoded value */
    }
  }
  if (!stream && !have_timeout) return 0;
  if (stream && resume_header.len > 0) resume = resume_header; /* the header wins */
  if (stream && resume.len > 0) {
    if (!parse_resume(resume, out)) return 0;
  } else if (out->has_last_id && !out->has_since) {
    return 0; /* the Lua handler's 400 */
  }
  if (out->ncategories == 0 || out->ncategories > lim->max_categories) return 0;
  for (size_t i = 0; i < out->ncategories; i++) {
    lp_slice c = out->categories[i];
    if (c.len == 0 || c.len > lim->max_category_bytes || !lp_utf8_is_valid(c.ptr, c.len)) return 0;
  }
  return 1;
}

int lp_fast_parse_subscription(lp_slice query, const lp_fast_limits *lim, lp_buf *scratch, lp_fast_sub *out) {
  lp_slice none = {NULL, 0};
  return parse(query, none, 0, lim, scratch, out);
}

int lp_fast_parse_stream(lp_slice query, lp_slice last_event_id_header, const lp_fast_limits *lim, lp_buf *scratch,
                         lp_fast_sub *out) {
  return parse(query, last_event_id_header, 1, lim, scratch, out);
}
