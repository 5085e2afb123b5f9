/* lp_stats: the stats endpoint's text (docs/extensions.md): the figures as JSON or in the
 * Prometheus text exposition format, and which answer a request asks for. One implementation
 * for both paths: the native stats handler (lp_lua_stats.c) and lua/longpoll/stats.lua (Redis
 * mode, a changed request) through core.stats_json / core.stats_prometheus. Sans-I/O. */
#ifndef LP_STATS_H
#define LP_STATS_H

#include <stddef.h>
#include <stdint.h>

#include "lp_buf.h"
#include "lp_store.h"

/* The figures, in the JSON answer's order; lp_stats_names[i] is figure i's JSON key (the
 * manager's stats table's name). */
enum {
  LP_STATS_CATEGORIES,
  LP_STATS_EVENTS,
  LP_STATS_EVENT_BYTES,
  LP_STATS_BUFFERED_BYTES,
  LP_STATS_WAITING,
  LP_STATS_LONG_POLLS,
  LP_STATS_SSE_STREAMS,
  LP_STATS_PUBLISHED,
  LP_STATS_DELIVERED,
  LP_STATS_DROPPED,
  LP_STATS_EVICTED,
  LP_STATS_LAST_TIMESTAMP,
  LP_STATS_IDEMPOTENCY_KEYS,
  LP_STATS_IDEMPOTENCY_KEY_BYTES,
  LP_STATS_IDEMPOTENCY_REPLAYS,
  LP_STATS_IDEMPOTENCY_CONFLICTS,
  LP_STATS_IDEMPOTENCY_EVICTED,
  LP_STATS_IDEMPOTENCY_IN_FLIGHT,
  LP_STATS_NFIGURES
};
extern const char *const lp_stats_names[LP_STATS_NFIGURES];

typedef struct lp_stats_figures {
  int64_t v[LP_STATS_NFIGURES];
  double uptime_seconds;
  /* a page of the categories, largest first (lp_store_top_categories); has_page 0: none asked */
  int has_page;
  size_t offset, limit;
  const lp_category_info *page; /* not owned */
  size_t npage;
} lp_stats_figures;

/* Append the answer's body. 0, or -1 when memory ran out. Category names must be valid UTF-8
 * (the store's are). */
int lp_stats_json(const lp_stats_figures *f, lp_buf *out);
int lp_stats_prometheus(const lp_stats_figures *f, lp_buf *out);

#define LP_STATS_DEFAULT_CATEGORY_LIMIT 100
#define LP_STATS_MAX_CATEGORY_LIMIT 1000
#define LP_STATS_MAX_CATEGORY_OFFSET 1000000000

enum { LP_STATS_ANSWER_JSON, LP_STATS_ANSWER_PROMETHEUS, LP_STATS_ANSWER_DASHBOARD };

typedef struct lp_stats_request {
  int answer; /* LP_STATS_ANSWER_* */
  int has_page;
  size_t offset, limit;
} lp_stats_request;

/* What a GET of the stats path asks for (stats.lua's rules): the dashboard for a browser
 * (Accept names text/html, no ?format=), Prometheus for ?format=prometheus or an Accept that names
 * text/plain or OpenMetrics and not JSON, JSON otherwise; a page of categories for ?categories=
 * other than "", 0 or false (with ?limit=, ?offset=). accept.ptr NULL: no Accept header.
 * 1 when *r says what to answer; 0 when the native path leaves the request to the Lua handler:
 * an error to explain (a bad format or page, categories while categories_allowed is 0) or a
 * query it does not decode (a %-escape or '+' in a parameter). */
int lp_stats_parse_request(lp_slice query, lp_slice accept, int categories_allowed, lp_stats_request *r);

#endif
