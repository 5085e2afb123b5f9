/* lp_waiter: a waiting long poll parked in C, on a store subscription it owns
 * (lp_store_wait_owned), instead of in a Lua table of handles. Whoever publishes to the store
 * (the store's Lua binding, the HTTP engine's fast publish) collects what the publish woke in an
 * lp_woken and, once lp_store_publish has returned, hands every owned waiter the answer. */
#ifndef LP_WAITER_H
#define LP_WAITER_H

#include <stddef.h>
#include <stdint.h>

#include "lp_store.h"

typedef struct lp_waiter lp_waiter;

typedef struct lp_waiter_ops {
  /* A publish woke it (its subscription is gone): answer[0..n) are the pieces of the long-poll
   * answer {"events":[json]}, pointing into the store, valid during the call. It must not call
   * into the store or into Lua. */
  void (*woken)(lp_waiter *w, const lp_slice *answer, size_t n);
  /* The store is closing (lp_store_end_owned): the wait ended without an event. */
  void (*ended)(lp_waiter *w);
  /* Optional. When set, called instead of woken, with the event itself (an SSE stream frames
   * it its own way); p and what it points to are valid during the call. Same rules as woken. */
  void (*woken_event)(lp_waiter *w, const lp_published *p);
  /* Optional. Called once every waiter the publish woke was told (lp_woken_answer): the store
   * is no longer in the middle of the publish, so the waiter may wait again (a stream). */
  void (*after)(lp_waiter *w);
} lp_waiter_ops;

/* Embedded in its owner's struct; the owner keeps it alive while its subscription waits. */
struct lp_waiter {
  const lp_waiter_ops *ops;
};

/* What a publish woke: the handles of subscriptions without an owner (for the caller's table)
 * and the owned waiters. Owns its two arrays. */
typedef struct lp_woken {
  uint64_t *handles;
  size_t nhandles;
  lp_waiter **owned;
  size_t nowned;
  size_t cap;
} lp_woken;

/* Empties w and makes room for `waiting` wakes (lp_store_stats.waiting), before the store
 * changes: running out of memory then changes nothing. LP_OK or LP_ENOMEM. */
int lp_woken_reserve(lp_woken *w, size_t waiting);
/* An lp_wake_fn; ctx is the lp_woken (reserved). */
void lp_woken_add(void *ctx, uint64_t handle, void *owner);
/* Hands the event of p, as the answer {"events":[json]} (or as the event, woken_event), to every
 * owned waiter in w, then calls after on those that have it. */
void lp_woken_answer(const lp_woken *w, const lp_published *p);
void lp_woken_free(lp_woken *w);

/* An lp_wake_fn for lp_store_end_owned: tells the owner its wait ended (ctx unused). */
void lp_waiter_end(void *ctx, uint64_t handle, void *owner);

#endif
