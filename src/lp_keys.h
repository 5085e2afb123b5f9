/* lp_keys: the bounded table of Idempotency-Keys the in-memory engine remembers (issue 17,
 * docs/idempotency.md). A key's record holds the fingerprint of its first publish, then the id
 * and timestamp of the event once stored. A repeat with the same fingerprint is a replay, with
 * another a mismatch, and while the first publish is not stored yet the key is busy.
 *
 * One window for every key, so insertion order is expiry order: records sit in a ring, oldest
 * first, and a hash map finds a key's record. Over max_keys or max_bytes the oldest records go
 * first (a retry of theirs would publish again: counted as evicted). Sans-I/O: time is an
 * argument. The table owns its records and their bytes; nothing it returns outlives the next
 * call that changes it. */
#ifndef LP_KEYS_H
#define LP_KEYS_H

#include <stddef.h>
#include <stdint.h>

#include "lp_store.h" /* lp_slice */

/* What one record costs besides its key, fingerprint and the 36 bytes of its event id, in the
 * figure max_bytes bounds: the record, its ring slot and its map slot, rounded up. */
#define LP_KEYS_RECORD_COST 200

enum {
  LP_KEYS_NEW = 0,      /* a new key: publish, then lp_keys_commit or lp_keys_abort */
  LP_KEYS_REPLAY = 1,   /* the key's event was stored before: *prior names it */
  LP_KEYS_MISMATCH = 2, /* the key was used with another fingerprint */
  LP_KEYS_BUSY = 3,     /* the key's first publish is not stored yet */
  LP_KEYS_NOMEM = -1,
};

typedef struct lp_keys lp_keys;

typedef struct lp_keys_prior {
  lp_slice id; /* points into the table */
  int64_t timestamp;
} lp_keys_prior;

typedef struct lp_keys_stats {
  size_t keys;  /* live keys */
  size_t bytes; /* what max_bytes bounds */
  uint64_t replays, conflicts, evicted;
} lp_keys_stats;

/* The key of an Idempotency-Key header value (idempotency.lua's check_key): 1 to 255 printable
 * ASCII characters, as sent or as a structured-field string ("..." without '"' or '\' inside,
 * the quotes not part of the key). 0 and *key (pointing into value), or -1 when it is none. */
int lp_keys_check(lp_slice value, lp_slice *key);

/* NULL when memory ran out. max_keys, max_bytes >= 1; window_ms >= 1. */
lp_keys *lp_keys_new(size_t max_keys, size_t max_bytes, int64_t window_ms);
void lp_keys_free(lp_keys *k);

/* Looks key up (after forgetting the keys whose window ended at now). LP_KEYS_NEW: the key is
 * remembered as busy, *ticket names this record for commit or abort. LP_KEYS_REPLAY: *prior is
 * the first event. LP_KEYS_MISMATCH, LP_KEYS_BUSY, LP_KEYS_NOMEM: nothing was remembered. */
int lp_keys_begin(lp_keys *k, lp_slice key, lp_slice fingerprint, int64_t now, uint64_t *ticket, lp_keys_prior *prior);
/* The event of a begun key was stored (id copied). Nothing when the record is gone (evicted, or
 * ticket does not name key's record). 0, or -1 when memory ran out (the key is then forgotten,
 * so a retry publishes again rather than waits forever on a busy key). */
int lp_keys_commit(lp_keys *k, uint64_t ticket, lp_slice key, lp_slice id, int64_t timestamp);
/* The publish of a begun key failed: the key is free again. */
void lp_keys_abort(lp_keys *k, uint64_t ticket, lp_slice key);
/* Forgets the keys whose window ended at now. */
void lp_keys_expire(lp_keys *k, int64_t now);
void lp_keys_get_stats(const lp_keys *k, lp_keys_stats *st);

#endif
