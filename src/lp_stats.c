/* lp_stats: the stats endpoint's text (see lp_stats.h). */
#include "lp_stats.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "lp_http.h"
#include "lp_json.h"

const char *const lp_stats_names[LP_STATS_NFIGURES] = {"categories",
                                                       "events",
                                                       "event_bytes",
                                                       "buffered_bytes",
                                                       "waiting",
                                                       "long_polls",
                                                       "sse_streams",
                                                       "published",
                                                       "delivered",
                                                       "dropped",
                                                       "evicted",
                                                       "last_timestamp",
                                                       "idempotency_keys",
                                                       "idempotency_key_bytes",
                                                       "idempotency_replays",
                                                       "idempotency_conflicts",
                                                       "idempotency_evicted",
                                                       "idempotency_in_flight"};

#define UPTIME (-1)

typedef struct metric {
  const char *name, *type, *help;
  int figure; /* LP_STATS_*, or UPTIME */
} metric;

static const metric METRICS[] = {
    {"longpoll_categories", "gauge", "Categories with buffered events or waiting subscribers.", LP_STATS_CATEGORIES},
    {"longpoll_buffered_events", "gauge", "Events held in the buffers.", LP_STATS_EVENTS},
    {"longpoll_buffered_bytes", "gauge", "Bytes of event JSON held in the buffers.", LP_STATS_EVENT_BYTES},
    {"longpoll_waiting_subscribers", "gauge", "Waiting subscriptions: long polls, SSE streams and watches.",
     LP_STATS_WAITING},
    {"longpoll_long_polls", "gauge", "Long-poll requests waiting for an event.", LP_STATS_LONG_POLLS},
    {"longpoll_sse_streams", "gauge", "Open Server-Sent Events streams.", LP_STATS_SSE_STREAMS},
    {"longpoll_published_events_total", "counter", "Events published since start.", LP_STATS_PUBLISHED},
    {"longpoll_delivered_events_total", "counter", "Events handed out from the buffers since start.",
     LP_STATS_DELIVERED},
    {"longpoll_dropped_events_total", "counter", "Events dropped by buffer size, TTL or the memory cap since start.",
     LP_STATS_DROPPED},
    {"longpoll_evicted_events_total", "counter",
     "Events dropped to stay under the memory cap (max_buffered_bytes) since start.", LP_STATS_EVICTED},
    {"longpoll_buffered_memory_bytes", "gauge",
     "Bytes the buffers hold with their bookkeeping: what max_buffered_bytes caps.", LP_STATS_BUFFERED_BYTES},
    {"longpoll_last_event_timestamp_milliseconds", "gauge", "Timestamp of the newest event (epoch ms).",
     LP_STATS_LAST_TIMESTAMP},
    {"longpoll_uptime_seconds", "gauge", "Seconds since the manager started.", UPTIME},
    {"longpoll_idempotency_keys", "gauge", "Idempotency-Keys remembered (in memory; in Redis mode they live in Redis).",
     LP_STATS_IDEMPOTENCY_KEYS},
    {"longpoll_idempotency_key_bytes", "gauge", "Bytes the remembered Idempotency-Keys take (in memory).",
     LP_STATS_IDEMPOTENCY_KEY_BYTES},
    {"longpoll_idempotency_replays_total", "counter", "Publishes answered as replays of an Idempotency-Key.",
     LP_STATS_IDEMPOTENCY_REPLAYS},
    {"longpoll_idempotency_conflicts_total", "counter",
     "Publishes refused because their Idempotency-Key was used with another request (422).",
     LP_STATS_IDEMPOTENCY_CONFLICTS},
    {"longpoll_idempotency_evicted_total", "counter",
     "Idempotency-Keys forgotten before their window ended, to stay under the key bounds.",
     LP_STATS_IDEMPOTENCY_EVICTED},
    {"longpoll_idempotency_in_flight", "gauge", "Idempotent publishes of this node waiting for Redis.",
     LP_STATS_IDEMPOTENCY_IN_FLIGHT},
};

typedef struct category_metric {
  const char *name, *help;
} category_metric;

static const category_metric CATEGORY_METRICS[] = {
    {"longpoll_category_buffered_events", "Events buffered in the category."},
    {"longpoll_category_buffered_bytes", "Bytes of event JSON buffered in the category."},
    {"longpoll_category_waiting_subscribers", "Subscriptions waiting on the category."},
};

static size_t category_value(const lp_category_info *c, size_t which) {
  return which == 0 ? c->events : which == 1 ? c->bytes : c->waiting;
}

/* Appends printf's text. 0, or -1 when memory ran out. */
__attribute__((format(printf, 2, 3))) static int append_f(lp_buf *out, const char *fmt, ...) {
  char small[512];
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(small, sizeof small, fmt, ap);
  va_end(ap);
  if (n < 0) return -1;
  if ((size_t)n < sizeof small) return lp_buf_append(out, small, (size_t)n);
  if (lp_buf_reserve(out, (size_t)n + 1) != 0) return -1;
  va_start(ap, fmt);
  vsnprintf(out->data + out->len, (size_t)n + 1, fmt, ap);
  va_end(ap);
  out->len += (size_t)n;
  return 0;
}

int lp_stats_json(const lp_stats_figures *f, lp_buf *out) {
  int rc = lp_buf_append_char(out, '{');
  for (int i = 0; rc == 0 && i < LP_STATS_NFIGURES; i++)
    rc = append_f(out, "\"%s\":%lld,", lp_stats_names[i], (long long)f->v[i]);
  if (rc == 0) rc = append_f(out, "\"uptime_seconds\":%.3f", f->uptime_seconds);
  if (rc == 0 && f->has_page) {
    rc = append_f(out, ",\"categories_offset\":%zu,\"categories_limit\":%zu,\"by_category\":{", f->offset, f->limit);
    for (size_t i = 0; rc == 0 && i < f->npage; i++) {
      const lp_category_info *c = &f->page[i];
      if (i > 0) rc = lp_buf_append_char(out, ',');
      if (rc == 0) rc = lp_json_append_string(out, c->name.ptr, c->name.len);
      if (rc == 0)
        rc = append_f(out, ":{\"events\":%zu,\"bytes\":%zu,\"waiting\":%zu}", c->events, c->bytes, c->waiting);
    }
    if (rc == 0) rc = lp_buf_append_char(out, '}');
  }
  if (rc == 0) rc = lp_buf_append_char(out, '}');
  return rc;
}

/* A label value: backslash, double quote and line feed escaped. */
static int append_label(lp_buf *out, lp_slice s) {
  int rc = 0;
  for (size_t i = 0; rc == 0 && i < s.len; i++) {
    char c = s.ptr[i];
    rc = c == '\\'   ? lp_buf_append(out, "\\\\", 2)
         : c == '"'  ? lp_buf_append(out, "\\\"", 2)
         : c == '\n' ? lp_buf_append(out, "\\n", 2)
                     : lp_buf_append_char(out, c);
  }
  return rc;
}

int lp_stats_prometheus(const lp_stats_figures *f, lp_buf *out) {
  int rc = 0;
  for (size_t i = 0; rc == 0 && i < sizeof METRICS / sizeof METRICS[0]; i++) {
    const metric *m = &METRICS[i];
    rc = append_f(out, "# HELP %s %s\n# TYPE %s %s\n", m->name, m->help, m->name, m->type);
    if (rc == 0)
      rc = m->figure == UPTIME ? append_f(out, "%s %.3f\n", m->name, f->uptime_seconds)
                               : append_f(out, "%s %lld\n", m->name, (long long)f->v[m->figure]);
  }
  if (f->has_page) {
    for (size_t w = 0; rc == 0 && w < 3; w++) {
      const category_metric *m = &CATEGORY_METRICS[w];
      rc = append_f(out, "# HELP %s %s\n# TYPE %s gauge\n", m->name, m->help, m->name);
      for (size_t i = 0; rc == 0 && i < f->npage; i++) {
        rc = append_f(out, "%s{category=\"", m->name);
        if (rc == 0) rc = append_label(out, f->page[i].name);
        if (rc == 0) rc = append_f(out, "\"} %zu\n", category_value(&f->page[i], w));
      }
    }
  }
  return rc;
}

/* Whether s holds needle, ASCII letters compared without case (needle is lower case). */
static int contains_nocase(lp_slice s, const char *needle) {
  size_t n = strlen(needle);
  for (size_t i = 0; i + n <= s.len; i++) {
    size_t j = 0;
    while (j < n) {
      char c = s.ptr[i + j];
      if (c >= 'A' && c <= 'Z') c = (char)(c - 'A' + 'a');
      if (c != needle[j]) break;
      j++;
    }
    if (j == n) return 1;
  }
  return 0;
}

static int is(lp_slice s, const char *lit) { return s.len == strlen(lit) && memcmp(s.ptr, lit, s.len) == 0; }

/* A whole number of digits up to max: 1 and *v, or 0. */
static int digits(lp_slice s, size_t max, size_t *v) {
  if (s.len == 0) return 0;
  size_t n = 0;
  for (size_t i = 0; i < s.len; i++) {
    if (s.ptr[i] < '0' || s.ptr[i] > '9') return 0;
    n = n * 10 + (size_t)(s.ptr[i] - '0');
    if (n > max) return 0;
  }
  *v = n;
  return 1;
}

enum { Q_FORMAT, Q_CATEGORIES, Q_LIMIT, Q_OFFSET, Q_COUNT };

int lp_stats_parse_request(lp_slice query, lp_slice accept, int categories_allowed, lp_stats_request *r) {
  static const char *const names[Q_COUNT] = {"format", "categories", "limit", "offset"};
  lp_slice value[Q_COUNT];
  int has[Q_COUNT] = {0};
  size_t pos = 0;
  lp_slice k, v;
  int has_value;
  while (lp_http_query_next(query, &pos, &k, &v, &has_value)) {
    if (memchr(k.ptr, '%', k.len) || memchr(k.ptr, '+', k.len)) return 0; /* it may decode to one of ours */
    for (int i = 0; i < Q_COUNT; i++) {
      if (!has[i] && is(k, names[i])) { /* the first value wins, as in req.query */
        if (memchr(v.ptr, '%', v.len) || memchr(v.ptr, '+', v.len)) return 0;
        has[i] = 1;
        value[i] = v;
      }
    }
  }
  memset(r, 0, sizeof *r);
  if (has[Q_FORMAT]) {
    if (is(value[Q_FORMAT], "prometheus"))
      r->answer = LP_STATS_ANSWER_PROMETHEUS;
    else if (is(value[Q_FORMAT], "json"))
      r->answer = LP_STATS_ANSWER_JSON;
    else
      return 0; /* 400: the Lua handler says why */
  } else if (accept.ptr && contains_nocase(accept, "text/html")) {
    r->answer = LP_STATS_ANSWER_DASHBOARD;
    return 1;
  } else if (accept.ptr && !contains_nocase(accept, "application/json") &&
             (contains_nocase(accept, "text/plain") || contains_nocase(accept, "application/openmetrics-text"))) {
    r->answer = LP_STATS_ANSWER_PROMETHEUS;
  } else {
    r->answer = LP_STATS_ANSWER_JSON;
  }
  lp_slice c = has[Q_CATEGORIES] ? value[Q_CATEGORIES] : (lp_slice){"", 0};
  if (c.len == 0 || is(c, "0") || is(c, "false")) return 1;
  if (!categories_allowed) return 0; /* 403 */
  r->has_page = 1;
  r->offset = 0;
  r->limit = LP_STATS_DEFAULT_CATEGORY_LIMIT;
  if (has[Q_OFFSET] && !digits(value[Q_OFFSET], LP_STATS_MAX_CATEGORY_OFFSET, &r->offset)) return 0;
  if (has[Q_LIMIT] && (!digits(value[Q_LIMIT], LP_STATS_MAX_CATEGORY_LIMIT, &r->limit) || r->limit < 1)) return 0;
  return 1;
}
