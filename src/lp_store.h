/* lp_store: the sans-I/O heart of longpoll. Categories map to bounded event
 * buffers; waiting subscriptions hang off their categories. Time is always an
 * argument (epoch milliseconds); nothing here reads a clock or a socket. */
#ifndef LP_STORE_H
#define LP_STORE_H

#include <stddef.h>
#include <stdint.h>

#include "lp_buf.h"
#include "lp_uuid.h"

enum {
  LP_OK = 0,
  LP_ENOMEM = -1,
  LP_EINVAL = -2,      /* empty or oversized category, bad arguments */
  LP_EUTF8 = -3,       /* category is not valid UTF-8 */
  LP_EORDER = -4,      /* a restored event is older than one already stored */
  LP_ERANDOM = -5,     /* the OS random source failed */
  LP_ELIMIT = -6,      /* a resource cap was reached (handles) */
  LP_ECATEGORIES = -7, /* max_categories reached */
  LP_EWAITERS = -8,    /* max_waiting_per_category reached */
  LP_ETOOBIG = -9,     /* one event is larger than max_buffered_bytes */
  LP_ETIME = -10,      /* a restored timestamp outside 0..LP_TIME_MAX */
};

/* Times are epoch milliseconds in 0..LP_TIME_MAX (the end of year 9999): a
 * clock reading outside is clamped into it, a restored timestamp outside is
 * refused, so no cursor or TTL arithmetic can overflow. */
#define LP_TIME_MAX INT64_C(253402300799999)

/* A short message for an LP_E* code (static storage). */
const char *lp_strerror(int code);

/* The limits of one category (per-category rules): a category's buffer size,
 * TTL and delete-after-first, chosen once when the category is made. */
typedef struct lp_category_limits {
  size_t max_event_buffer_size; /* >= 1 */
  int64_t event_ttl_ms;         /* 0: its events never expire */
  int delete_after_first;
} lp_category_limits;

/* At most this many distinct TTLs among the categories alive at once (each
 * has its own expiry list); a category needing another one is refused with
 * LP_ELIMIT. */
#define LP_TTL_CLASSES 64

typedef struct lp_slice lp_slice;

/* Called once when a category is made, with *limits preset to the store's
 * defaults; it may change them (a value out of range keeps the default). It
 * must not call into the store. */
typedef void (*lp_limits_fn)(void *ctx, lp_slice name, lp_category_limits *limits);

typedef struct lp_store_config {
  size_t max_event_buffer_size;    /* events kept per category, >= 1 */
  int64_t event_ttl_ms;            /* 0: events never expire */
  int delete_after_first;          /* golongpoll's DeleteEventAfterFirstRetrieval */
  size_t max_category_bytes;       /* 1024 in the wire contract */
  size_t max_categories;           /* 0: no cap */
  size_t max_waiting_per_category; /* 0: no cap */
  size_t max_buffered_bytes;       /* 0: no cap; over it the oldest events of the largest categories go */
  lp_limits_fn category_limits;    /* NULL: every category has the defaults above */
  void *category_limits_ctx;
  size_t max_answer_bytes; /* 0: no cap; a fetch answer stops before the event that would
                            * take it past this (at least one event always goes): the
                            * client's cursor gets the rest on its next request */
} lp_store_config;

/* What max_buffered_bytes counts, so that the cap bounds the memory the
 * buffers take and not only their JSON: every buffered event costs its JSON
 * plus LP_EVENT_COST (its header, allocator overhead and ring slot), and every
 * category holding events costs LP_CATEGORY_COST plus its name (the category,
 * its ring, its hash and heap slots). Measured on x86-64 glibc, rounded up. */
#define LP_EVENT_COST 128
#define LP_CATEGORY_COST 256

struct lp_slice {
  const char *ptr;
  size_t len;
};

/* What a publish produced. json points into the store and stays valid until
 * the next call on the store. */
typedef struct lp_published {
  char id[LP_UUID_LEN + 1];
  int64_t timestamp;
  uint64_t seq;
  const char *json; /* {"timestamp":..,"category":..,"data":..,"id":".."} */
  size_t json_len;
  int buffered; /* 0 when delete-after-first handed it to waiters instead */
} lp_published;

typedef struct lp_store lp_store;

/* Appends to b the JSON text of an event, the one format every answer, stream
 * and engine uses: {"timestamp":ts,"category":"..","data":data,"id":"id"}.
 * category must be valid UTF-8, data valid JSON, id LP_UUID_LEN characters.
 * LP_OK, or LP_ENOMEM with b unchanged in content (its length may have grown). */
int lp_event_json_append(lp_buf *b, lp_slice category, lp_slice data, const char *id, int64_t ts);

/* Called once per subscription woken by a publish; the subscription has
 * already been removed from every category, so its handle is dead. owner is
 * what lp_store_wait_owned was given (NULL for lp_store_wait). The callback
 * must not call into the store (collect the handles, act after the publish
 * returned): a nested publish could free the event being published. */
typedef void (*lp_wake_fn)(void *ctx, uint64_t handle, void *owner);

/* Returns an owned store (free with lp_store_free), or NULL when memory runs
 * out or the config is invalid. The config is copied. */
lp_store *lp_store_new(const lp_store_config *cfg);
/* Frees the store, its events and its subscriptions. NULL is allowed. */
void lp_store_free(lp_store *s);

/* Publishes data_json (valid JSON text, checked by the caller) in category at
 * now_ms. Waiting subscriptions of the category are woken through wake(ctx,
 * handle). On success fills *out. */
int lp_store_publish(lp_store *s, lp_slice category, lp_slice data_json, int64_t now_ms, lp_wake_fn wake, void *ctx,
                     lp_published *out);

/* Puts back an event read from persistence, keeping its id and timestamp.
 * Events must come oldest first (LP_EORDER otherwise), timestamps within
 * 0..LP_TIME_MAX (LP_ETIME otherwise). Wakes nobody. */
int lp_store_restore(lp_store *s, lp_slice category, lp_slice data_json, const char *id, int64_t timestamp,
                     lp_published *out);

/* Appends to out the answer {"events":[...]} (with "missed":true when the
 * cursor is older than events the buffers dropped) holding the events of the
 * categories after the cursor (since_ms, last_id), oldest first, and sets
 * *count. last_id may be NULL. Nothing is appended when *count is 0. With
 * delete-after-first, the events returned are removed. */
int lp_store_fetch(lp_store *s, const lp_slice *categories, size_t ncategories, int64_t since_ms, const char *last_id,
                   int64_t now_ms, lp_buf *out, size_t *count, int *missed);

/* One event as lp_store_fetch_each hands it out: the pointers are the store's
 * and valid only during the callback. */
typedef struct lp_event_view {
  const char *json; /* {"timestamp":..,"category":..,"data":..,"id":".."} */
  size_t json_len;
  int64_t timestamp;
  const char *id; /* NUL-terminated lowercase UUID */
} lp_event_view;

/* Returns 0 to go on, non-zero to stop the fetch (the caller ran out of memory). */
typedef int (*lp_event_fn)(void *ctx, const lp_event_view *event);

/* Like lp_store_fetch, but hands each event to fn(ctx, event) instead of
 * building an answer (for streams, which frame events their own way), and
 * never cut by max_answer_bytes (a stream's catch-up is one read). When fn
 * stops the fetch, LP_ENOMEM is returned and nothing counts as delivered. fn
 * must not call into the store. */
int lp_store_fetch_each(lp_store *s, const lp_slice *categories, size_t ncategories, int64_t since_ms,
                        const char *last_id, int64_t now_ms, lp_event_fn fn, void *ctx, size_t *count, int *missed);

/* Registers a waiting subscription on the categories (1 or more). Returns
 * LP_OK and a handle, which stays valid until the subscription is woken or
 * cancelled. */
int lp_store_wait(lp_store *s, const lp_slice *categories, size_t ncategories, uint64_t *handle);
/* Like lp_store_wait, for a subscription with an owner (not owned by the store):
 * a waiter parked in C (lp_waiter.h) rather than in the caller's table of
 * handles. The store hands owner back through wake and lp_store_end_owned,
 * and counts owned waiters apart (lp_store_unowned_waiting_in). */
int lp_store_wait_owned(lp_store *s, const lp_slice *categories, size_t ncategories, void *owner, uint64_t *handle);
/* Removes a waiting subscription: 1 when it was waiting, 0 for a dead handle. */
int lp_store_cancel(lp_store *s, uint64_t handle);
/* Ends every subscription waiting on category without storing an event (an
 * event stored elsewhere, e.g. in Redis, arrived): wake(ctx, handle) is called
 * for each, as a publish would, and *count set. A category nobody waits on is
 * LP_OK with *count 0. */
int lp_store_take_waiters(lp_store *s, lp_slice category, lp_wake_fn wake, void *ctx, size_t *count);

/* How many subscriptions wait on category now (0 for an unknown category). For the HTTP
 * engine's fast publish, which takes only publishes that wake nobody. */
size_t lp_store_waiting_in(const lp_store *s, lp_slice category);
/* Of those, the ones without an owner: a publish that wakes only owned waiters needs nobody
 * but their owners (the HTTP engine's fast publish answers them itself). */
size_t lp_store_unowned_waiting_in(const lp_store *s, lp_slice category);
/* Ends every subscription that has an owner, calling fn(ctx, handle, owner) for each after it
 * is gone (the store is about to close: owners learn that their wait is over). Returns how
 * many. fn must not call into the store. */
size_t lp_store_end_owned(lp_store *s, lp_wake_fn fn, void *ctx);

/* A timestamp for a timeout answer: max(now, last issued). Every later event
 * gets a larger timestamp, so a client continuing from it misses nothing. */
int64_t lp_store_mark_time(lp_store *s, int64_t now_ms);

/* Drops expired events and frees categories left empty. Returns how many
 * events were dropped. */
size_t lp_store_expire(lp_store *s, int64_t now_ms);

typedef struct lp_store_stats {
  size_t categories;
  size_t events;
  size_t event_bytes;    /* bytes of event JSON held */
  size_t buffered_bytes; /* what max_buffered_bytes counts (see LP_EVENT_COST) */
  size_t waiting;        /* waiting subscriptions */
  uint64_t published;
  uint64_t delivered; /* events handed out, counted once per subscriber */
  uint64_t dropped;   /* events dropped by size or TTL */
  uint64_t evicted;   /* of those, dropped to stay under max_buffered_bytes */
  int64_t last_timestamp;
} lp_store_stats;

void lp_store_get_stats(const lp_store *s, lp_store_stats *st);

/* Per-category detail: calls fn for each category (order unspecified); bytes
 * is the JSON of its events. */
typedef void (*lp_category_fn)(void *ctx, lp_slice name, size_t events, size_t bytes, size_t waiting);
void lp_store_each_category(const lp_store *s, lp_category_fn fn, void *ctx);

/* One category as the stats show it; name points into the store and stays
 * valid until the next call that changes the store. */
typedef struct lp_category_info {
  lp_slice name;
  size_t events, bytes, waiting;
} lp_category_info;

/* The page [offset, offset + limit) of the categories ranked by the JSON bytes
 * of their events, largest first (then by waiting subscribers, then by name):
 * fills out[0..*n), n <= limit. One pass over the categories with a heap of
 * offset + limit entries, so a stats request costs O(categories) in C and no
 * more memory than the page. LP_EINVAL when offset + limit overflows or limit
 * is 0, LP_ENOMEM when the heap cannot be allocated. */
int lp_store_top_categories(const lp_store *s, size_t offset, size_t limit, lp_category_info *out, size_t *n);

#endif
