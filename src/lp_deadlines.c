/* lp_deadlines: one FIFO per wait length (see lp_deadlines.h). */
#include "lp_deadlines.h"

#include <stdlib.h>

struct lp_deadline_fifo {
  lp_deadline_fifo *next;
  uint64_t length;
  lp_deadline *head, *tail; /* head: the earliest */
};

int lp_deadlines_add(lp_deadlines *d, lp_deadline *e, uint64_t length, uint64_t now) {
  lp_deadline_fifo *f = d->fifos;
  while (f && f->length != length) f = f->next;
  if (!f) {
    f = calloc(1, sizeof *f);
    if (!f) return -1;
    f->length = length;
    f->next = d->fifos;
    d->fifos = f;
  }
  e->at = now + length;
  /* a clock that went back (it should not) would break the order: never before the tail */
  if (f->tail && e->at < f->tail->at) e->at = f->tail->at;
  e->fifo = f;
  e->next = NULL;
  e->prev = f->tail;
  if (f->tail)
    f->tail->next = e;
  else
    f->head = e;
  f->tail = e;
  d->count++;
  return 0;
}

void lp_deadlines_remove(lp_deadlines *d, lp_deadline *e) {
  lp_deadline_fifo *f = e->fifo;
  if (!f) return;
  if (e->prev)
    e->prev->next = e->next;
  else
    f->head = e->next;
  if (e->next)
    e->next->prev = e->prev;
  else
    f->tail = e->prev;
  e->prev = e->next = NULL;
  e->fifo = NULL;
  d->count--;
}

int lp_deadlines_next(const lp_deadlines *d, uint64_t *at) {
  int found = 0;
  for (const lp_deadline_fifo *f = d->fifos; f; f = f->next) {
    if (f->head && (!found || f->head->at < *at)) {
      *at = f->head->at;
      found = 1;
    }
  }
  return found;
}

lp_deadline *lp_deadlines_pop_expired(lp_deadlines *d, uint64_t now) {
  lp_deadline *first = NULL;
  for (lp_deadline_fifo *f = d->fifos; f; f = f->next)
    if (f->head && f->head->at <= now && (!first || f->head->at < first->at)) first = f->head;
  if (first) lp_deadlines_remove(d, first);
  return first;
}

void lp_deadlines_free(lp_deadlines *d) {
  while (d->fifos) {
    lp_deadline_fifo *next = d->fifos->next;
    free(d->fifos);
    d->fifos = next;
  }
  d->count = 0;
}
