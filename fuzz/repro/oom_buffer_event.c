/* Reproducer: with max_buffered_bytes set, buffer_event links the new event
 * into its category's ring and the store-wide list, then heap_update's
 * realloc fails; lp_store_publish returns LP_ENOMEM and frees the event that
 * is still linked (heap-use-after-free on the next fetch, double free in
 * lp_store_free). Found by fuzz_store (input: store-oom-byte-cap.bin).
 * Build: clang -g -fsanitize=address -Isrc fuzz/repro/oom_buffer_event.c \
 *          src/lp_buf.c src/lp_json.c src/lp_store.c src/lp_uuid.c \
 *          -Wl,--wrap=realloc -o /tmp/repro && /tmp/repro */
#include <stdio.h>
#include <stdlib.h>

#include "lp_store.h"

void *__real_realloc(void *p, size_t n);
static int fail_heap; /* the first realloc of NULL to 64 pointers is the heap's */
void *__wrap_realloc(void *p, size_t n) {
  if (fail_heap && p == NULL && n == 64 * sizeof(void *)) return NULL;
  return __real_realloc(p, n);
}

int main(void) {
  lp_store_config cfg = {.max_event_buffer_size = 4, .max_category_bytes = 64, .max_buffered_bytes = 4096};
  lp_store *s = lp_store_new(&cfg);
  lp_published p;
  fail_heap = 1;
  int rc = lp_store_publish(s, (lp_slice){"a", 1}, (lp_slice){"1", 1}, 1000, NULL, NULL, &p);
  fail_heap = 0;
  printf("publish: %s\n", lp_strerror(rc)); /* out of memory, but the event stays linked */
  fflush(stdout);
  lp_buf out = LP_BUF_INIT;
  size_t count;
  int missed;
  lp_store_fetch(s, &(lp_slice){"a", 1}, 1, 0, NULL, 1000, &out, &count, &missed); /* reads the freed event */
  lp_buf_free(&out);
  lp_store_free(s);
  return 0;
}
