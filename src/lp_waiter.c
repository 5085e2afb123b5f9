/* lp_waiter: the owned waiters a publish wakes (see lp_waiter.h). */
#include "lp_waiter.h"

#include <stdlib.h>

int lp_woken_reserve(lp_woken *w, size_t waiting) {
  w->nhandles = w->nowned = 0;
  if (waiting <= w->cap) return LP_OK;
  size_t cap = w->cap ? w->cap : 16;
  while (cap < waiting) cap *= 2;
  uint64_t *h = realloc(w->handles, cap * sizeof *h);
  if (!h) return LP_ENOMEM;
  w->handles = h;
  lp_waiter **o = realloc(w->owned, cap * sizeof *o);
  if (!o) return LP_ENOMEM; /* handles grew: harmless, cap still says the smaller size */
  w->owned = o;
  w->cap = cap;
  return LP_OK;
}

void lp_woken_add(void *ctx, uint64_t handle, void *owner) {
  lp_woken *w = ctx;
  if (owner)
    w->owned[w->nowned++] = owner;
  else
    w->handles[w->nhandles++] = handle;
}

void lp_woken_answer(const lp_woken *w, const lp_published *p) {
  static const char open[] = "{\"events\":[", close[] = "]}";
  lp_slice answer[3] = {{open, sizeof open - 1}, {p->json, p->json_len}, {close, sizeof close - 1}};
  for (size_t i = 0; i < w->nowned; i++) {
    lp_waiter *o = w->owned[i];
    if (o->ops->woken_event)
      o->ops->woken_event(o, p);
    else
      o->ops->woken(o, answer, 3);
  }
  for (size_t i = 0; i < w->nowned; i++)
    if (w->owned[i]->ops->after) w->owned[i]->ops->after(w->owned[i]);
}

void lp_woken_free(lp_woken *w) {
  free(w->handles);
  free(w->owned);
  w->handles = NULL;
  w->owned = NULL;
  w->nhandles = w->nowned = w->cap = 0;
}

void lp_waiter_end(void *ctx, uint64_t handle, void *owner) {
  (void)ctx, (void)handle;
  lp_waiter *w = owner;
  w->ops->ended(w);
}
