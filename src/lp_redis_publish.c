/* lp_redis_publish: the publish script's call and reply (see lp_redis_publish.h). */
#include "lp_redis_publish.h"

#include <stdio.h>
#include <string.h>

#include "lp_json.h"
#include "lp_uuid.h"

#define PUBLISH_ARGC 14 /* EVALSHA, sha, 3, three keys, eight arguments */

static lp_slice str(const char *s) {
  lp_slice v = {s, strlen(s)};
  return v;
}

static int bulk_i64(lp_buf *out, int64_t v) {
  char digits[24];
  int n = snprintf(digits, sizeof digits, "%lld", (long long)v);
  lp_slice s = {digits, (size_t)n};
  return lp_resp_append_bulk(out, s);
}

/* A key of the prefix and the category, as one bulk string. */
static int bulk_key(lp_buf *out, lp_slice prefix, lp_slice category) {
  size_t before = out->len;
  int rc = lp_buf_append_char(out, '$');
  if (rc == 0) rc = lp_buf_append_i64(out, (int64_t)(prefix.len + category.len));
  if (rc == 0) rc = lp_buf_append(out, "\r\n", 2);
  if (rc == 0) rc = lp_buf_append(out, prefix.ptr, prefix.len);
  if (rc == 0) rc = lp_buf_append(out, category.ptr, category.len);
  if (rc == 0) rc = lp_buf_append(out, "\r\n", 2);
  if (rc != 0) out->len = before;
  return rc;
}

int lp_redis_publish_tail(lp_buf *out, const lp_redis_publish_config *c, lp_slice category, lp_slice data_json,
                          const char *event_id, const char *epoch_candidate, int64_t floor) {
  size_t before = out->len;
  /* reserved at once: a failed append then changes nothing */
  size_t need = 256 + c->clock_key.len + 2 * category.len + c->stream_prefix.len + c->dropped_prefix.len +
                data_json.len + c->channel.len;
  if (lp_buf_reserve(out, need) != 0) return -1;
  int rc = lp_resp_append_bulk(out, str("3"));
  if (rc == 0) rc = lp_resp_append_bulk(out, c->clock_key);
  if (rc == 0) rc = bulk_key(out, c->stream_prefix, category);
  if (rc == 0) rc = bulk_key(out, c->dropped_prefix, category);
  if (rc == 0) rc = lp_resp_append_bulk(out, category);
  if (rc == 0) rc = lp_resp_append_bulk(out, data_json);
  if (rc == 0) rc = lp_resp_append_bulk(out, str(event_id));
  if (rc == 0) rc = bulk_i64(out, c->max_event_buffer_size);
  if (rc == 0) rc = bulk_i64(out, c->ttl_ms);
  if (rc == 0) rc = lp_resp_append_bulk(out, c->channel);
  if (rc == 0) rc = lp_resp_append_bulk(out, str(epoch_candidate));
  if (rc == 0) rc = bulk_i64(out, floor);
  if (rc != 0) out->len = before;
  return rc;
}

int lp_redis_publish_head(lp_buf *out, int eval, lp_slice sha_or_script) {
  size_t before = out->len;
  int rc = lp_buf_append_char(out, '*');
  if (rc == 0) rc = lp_buf_append_i64(out, PUBLISH_ARGC);
  if (rc == 0) rc = lp_buf_append(out, "\r\n", 2);
  if (rc == 0) rc = lp_resp_append_bulk(out, str(eval ? "EVAL" : "EVALSHA"));
  if (rc == 0) rc = lp_resp_append_bulk(out, sha_or_script);
  if (rc != 0) out->len = before;
  return rc;
}

static int to_i64(lp_slice s, int64_t *v) {
  if (s.len == 0 || s.len > 18) return -1;
  int64_t x = 0;
  for (size_t i = 0; i < s.len; i++) {
    if (s.ptr[i] < '0' || s.ptr[i] > '9') return -1;
    x = x * 10 + (s.ptr[i] - '0');
  }
  *v = x;
  return 0;
}

int lp_redis_publish_reply(const lp_resp_reply *r, lp_slice *epoch, int64_t *ts, int64_t *seq, lp_slice *message) {
  if (r->type == LP_RESP_ERROR) {
    *message = r->str;
    return r->str.len >= 8 && memcmp(r->str.ptr, "NOSCRIPT", 8) == 0 ? 1 : -1;
  }
  if (r->type == LP_RESP_ARRAY && r->integer == 3 && r->items[0].ptr && r->items[1].ptr && r->items[2].ptr &&
      to_i64(r->items[1], ts) == 0 && to_i64(r->items[2], seq) == 0) {
    *epoch = r->items[0];
    return 0;
  }
  *message = str("unexpected reply to the publish script");
  return -1;
}

/* The digits at *at up to the byte stop, into *v; *at moves past stop. */
static int field_i64(const char *p, size_t len, size_t *at, char stop, int64_t *v) {
  const char *end = memchr(p + *at, stop, len - *at);
  if (!end) return -1;
  lp_slice s = {p + *at, (size_t)(end - (p + *at))};
  if (to_i64(s, v) != 0) return -1;
  *at = (size_t)(end - p) + 1;
  return 0;
}

int lp_redis_event_parse(const char *p, size_t len, lp_redis_event *ev) {
  if (len < 2 || p[0] != 'E' || p[1] != ' ') return -1;
  size_t at = 2;
  const char *sp = memchr(p + at, ' ', len - at);
  if (!sp || sp == p + at) return -1;
  ev->epoch.ptr = p + at;
  ev->epoch.len = (size_t)(sp - (p + at));
  at = (size_t)(sp - p) + 1;
  int64_t clen;
  if (field_i64(p, len, &at, ' ', &ev->seq) != 0 || field_i64(p, len, &at, ' ', &ev->ts) != 0 ||
      field_i64(p, len, &at, '\n', &clen) != 0)
    return -1;
  if ((uint64_t)clen > len - at || len - at - (size_t)clen < LP_UUID_LEN) return -1;
  ev->category.ptr = p + at;
  ev->category.len = (size_t)clen;
  ev->id.ptr = p + at + (size_t)clen;
  ev->id.len = LP_UUID_LEN;
  ev->data_json.ptr = ev->id.ptr + LP_UUID_LEN;
  ev->data_json.len = len - at - (size_t)clen - LP_UUID_LEN;
  if (!lp_uuid_is_valid(ev->id.ptr, ev->id.len) || !lp_utf8_is_valid(ev->category.ptr, ev->category.len)) return -1;
  return 0;
}
