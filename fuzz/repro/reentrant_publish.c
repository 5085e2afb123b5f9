/* Reproducer: lp_store_publish calls the wake callback while it still uses
 * the new event; a callback that publishes again into the same category
 * (buffer size 1) drops and frees that event, and the outer publish then
 * reads it in fill_published (heap-use-after-free). The comment in
 * lp_store_publish says a callback may publish or wait again.
 * Build: clang -g -fsanitize=address -Isrc fuzz/repro/reentrant_publish.c \
 *          src/lp_buf.c src/lp_json.c src/lp_store.c src/lp_uuid.c -o /tmp/repro && /tmp/repro */
#include <stdio.h>

#include "lp_store.h"

static lp_store *store;

static void wake(void *ctx, uint64_t handle, void *owner) {
  (void)ctx, (void)handle, (void)owner;
  lp_published again;
  lp_store_publish(store, (lp_slice){"a", 1}, (lp_slice){"2", 1}, 1000, NULL, NULL, &again);
}

int main(void) {
  lp_store_config cfg = {.max_event_buffer_size = 1, .max_category_bytes = 64}; /* one event per category */
  store = lp_store_new(&cfg);
  uint64_t h;
  lp_store_wait(store, &(lp_slice){"a", 1}, 1, &h);
  lp_published p;
  int rc = lp_store_publish(store, (lp_slice){"a", 1}, (lp_slice){"1", 1}, 1000, wake, NULL, &p);
  printf("publish: %d\n", rc);
  lp_store_free(store);
  return 0;
}
