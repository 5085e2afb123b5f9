/* lp_cache: the node-local cache of one Redis's stream (the Redis engine's), and its coverage
 * rule: which catch-ups it may answer without asking Redis; and the long polls parked on it (a
 * WAIT: nothing after the cursor yet), woken by the next event of their categories. Sans-I/O: the caller hands it every
 * event pub/sub brought, in Redis's order, and every read it made; nothing here reads a clock,
 * a socket or Redis.
 *
 * What it knows: from a base position on (lp_cache_start: set when pub/sub is known to deliver
 * everything), every event reached it. So for every category it holds each event stamped
 * hold_from or later, where hold_from is the base's timestamp + 1, or earlier for a category
 * warmed by a read (lp_cache_warm: one category, no drop after the cursor, read when the cache
 * had nothing of it). A cursor (since, last_id) is answered here when the events it asks for all
 * lie in that range; each category keeps the newest max_event_buffer_size events in an lp_store,
 * the same buffer rule as Redis's, so the "missed" flag agrees too. And the node must not be
 * behind the client: since must come before the last event this node received, or be that
 * event's millisecond with a last_id the node saw in it. Events in two categories are never
 * answered here (their one order is Redis's to tell). No TTL: the nodes' clocks are not Redis's.
 *
 * Ownership: lp_cache_new returns an owned cache (lp_cache_free); it owns one lp_store per
 * category it keeps. Every argument is copied; no pointer into the cache outlives a call. */
#ifndef LP_CACHE_H
#define LP_CACHE_H

#include <stddef.h>
#include <stdint.h>

#include "lp_buf.h"
#include "lp_store.h"
#include "lp_waiter.h"

/* A position in Redis's one sequence of events: epoch (Redis's data generation), timestamp, seq.
 * Positions compare as stream entry IDs do, (ts, seq), within one epoch; another epoch is
 * always "after". */
#define LP_CACHE_EPOCH_MAX 64
typedef struct lp_cache_pos {
  char epoch[LP_CACHE_EPOCH_MAX + 1]; /* NUL-terminated */
  size_t epoch_len;
  int64_t ts, seq;
} lp_cache_pos;

/* Fills *p; LP_EINVAL (p unchanged) when the epoch is longer than LP_CACHE_EPOCH_MAX. */
int lp_cache_pos_set(lp_cache_pos *p, const char *epoch, size_t epoch_len, int64_t ts, int64_t seq);

typedef struct lp_cache_config {
  size_t max_event_buffer_size;    /* >= 1, Redis's MAXLEN per category */
  size_t max_category_bytes;       /* >= 1 */
  size_t max_categories;           /* categories kept at most (0: no limit); the others go to Redis */
  size_t max_waiting_per_category; /* polls parked per category at most (0: no limit) */
} lp_cache_config;

typedef struct lp_cache lp_cache;

/* An empty, invalid cache (answers nothing until lp_cache_start), or NULL (memory, bad config). */
lp_cache *lp_cache_new(const lp_cache_config *cfg);
void lp_cache_free(lp_cache *c); /* NULL is allowed */

/* Drops everything; the cache answers nothing until lp_cache_start. counted: a reset the stats
 * count (pub/sub lost, a gap, a new epoch), 0 for the one inside start or close. Every parked
 * poll's wait ends (its owner's ended op: events may have been missed, it is the owner's to
 * answer), so does lp_cache_free's. */
void lp_cache_reset(lp_cache *c, int counted);
/* From position pos on, every event reaches the cache (drops what it held). */
void lp_cache_start(lp_cache *c, const lp_cache_pos *pos);
/* Whether it answers at all (started and not reset since). */
int lp_cache_is_valid(const lp_cache *c);

/* One event from pub/sub, in Redis's order. id: a NUL-terminated UUID. LP_OK when kept or not
 * wanted (invalid cache, a category over max_categories, seen already); an LP_E* code when the
 * event was refused (that category goes to Redis until the next reset) or no store could be
 * made (the caller logs it). Unless a read put the event here already, the polls parked on its
 * category are woken (kept or refused: it is new to them) with the answer {"events":[json]}, json
 * as lp_event_json_append makes it; memory running out then ends every parked wait instead (as a
 * reset does, without dropping the cache). */
int lp_cache_add(lp_cache *c, const lp_cache_pos *ev, lp_slice category, const char *id, lp_slice data_json);

/* One event of a read, oldest first. */
typedef struct lp_cache_event {
  int64_t ts;
  const char *id; /* NUL-terminated UUID */
  lp_slice data_json;
} lp_cache_event;

/* A read of one category answered by Redis: the cursor since, its events, missed, and the
 * position pos Redis was at. When the cache has nothing of the category yet (and the read is of
 * this base, without a drop, and no poll is parked on the category), it now holds what Redis
 * holds after the cursor. Returns 1 when it warmed the category, 0 when not. */
int lp_cache_warm(lp_cache *c, lp_slice category, int64_t since, const lp_cache_event *events, size_t n, int missed,
                  const lp_cache_pos *pos);

enum {
  LP_CACHE_MISS = 0,   /* ask Redis */
  LP_CACHE_EVENTS = 1, /* out holds the answer {"events":[...]} (with "missed":true) */
  LP_CACHE_WAIT = 2,   /* nothing after the cursor: wait from *cursor (a position) */
};

/* The answer to a catch-up (categories 1..64, cursor since / last_id, lowercase or NULL). out is
 * appended to only for LP_CACHE_EVENTS (a MISS may leave bytes appended: the caller resets it).
 * For EVENTS and WAIT, *cursor is the position up to which the cache knows every event of these
 * categories: the answer is Redis's answer as of that position, and a wait goes on from there.
 * Counts a hit, a wait or a miss (a failed store fetch is a miss not counted). */
int lp_cache_answer(lp_cache *c, const lp_slice *categories, size_t n, int64_t since, const char *last_id, lp_buf *out,
                    lp_cache_pos *cursor);

/* A long poll without a cursor ("from now on": the Redis engine starts such a waiter at the
 * node's position): LP_CACHE_WAIT and *cursor = the cache's position when the cache is valid and
 * holds nothing of these categories beyond it (a read may put a category's events there before
 * pub/sub brings them: Lua's then, as for lp_cache_answer); LP_CACHE_MISS otherwise. Counts a
 * wait. */
int lp_cache_now(lp_cache *c, const lp_slice *categories, size_t n, lp_cache_pos *cursor);
/* Parks a long poll on the cache: the answer to its cursor was LP_CACHE_WAIT just now (nothing of
 * these categories after it up to the cache's position). The next event of any of the categories
 * that pub/sub brings wakes it (owner->ops->woken, once, during lp_cache_add; the wait is gone
 * then), unless lp_cache_cancel or a reset (owner->ops->ended) ends it first. LP_OK and *handle;
 * LP_EINVAL for an invalid cache, LP_EWAITERS, LP_ENOMEM (nothing parked). */
int lp_cache_wait(lp_cache *c, const lp_slice *categories, size_t n, lp_waiter *owner, uint64_t *handle);
/* Ends a parked wait without an answer: 1 when it was parked, 0 for a dead handle. */
int lp_cache_cancel(lp_cache *c, uint64_t handle);
/* How many polls are parked on category now (the engine adds its own waiters to this for
 * max_waiting_per_category, which counts both). */
size_t lp_cache_parked_in(const lp_cache *c, lp_slice category);

typedef struct lp_cache_stats {
  int valid;
  size_t categories;
  uint64_t hits, waits, misses, warmed, resets;
  size_t parked;         /* polls parked now */
  uint64_t woken, ended; /* parked polls woken by an event, and ended by a reset */
} lp_cache_stats;

void lp_cache_get_stats(const lp_cache *c, lp_cache_stats *st);

#endif
