/* lp_deadlines: the timeouts of many waiting long polls, kept for one timer. Waits of the same
 * length expire in the order they started (the clock never goes back), so one FIFO per length is
 * a priority queue with O(1) add and remove; the earliest deadline is at the head of one of the
 * few FIFOs (as many as distinct lengths, at most the longest timeout in seconds). Entries are
 * embedded in their owner (intrusive); the set owns only its FIFOs. Sans-I/O: times are
 * arguments, in any monotonic milliseconds. */
#ifndef LP_DEADLINES_H
#define LP_DEADLINES_H

#include <stddef.h>
#include <stdint.h>

typedef struct lp_deadline_fifo lp_deadline_fifo;

typedef struct lp_deadline {
  struct lp_deadline *prev, *next;
  lp_deadline_fifo *fifo; /* NULL when not in a set */
  uint64_t at;
} lp_deadline;

typedef struct lp_deadlines {
  lp_deadline_fifo *fifos;
  size_t count; /* entries in the set */
} lp_deadlines;

/* Adds e (not in a set) to expire at now + length. 0, or -1 when memory for a new length ran
 * out (e is then not in the set). */
int lp_deadlines_add(lp_deadlines *d, lp_deadline *e, uint64_t length, uint64_t now);
/* Takes e out of its set; nothing when it is in none. */
void lp_deadlines_remove(lp_deadlines *d, lp_deadline *e);
/* The earliest deadline: 1 and *at, or 0 when the set is empty. */
int lp_deadlines_next(const lp_deadlines *d, uint64_t *at);
/* Takes out and returns the earliest entry whose deadline is at or before now, or NULL. */
lp_deadline *lp_deadlines_pop_expired(lp_deadlines *d, uint64_t now);
/* Frees the FIFOs; the entries still in the set are left as they are (the caller's). */
void lp_deadlines_free(lp_deadlines *d);

#endif
