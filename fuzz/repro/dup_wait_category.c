/* Reproducer: a subscription that waits on the same category twice frees
 * that category twice when it ends (heap-use-after-free, then double free).
 * Found by fuzz_store (input: store-dup-wait-category.bin).
 * Build: clang -g -fsanitize=address -Isrc fuzz/repro/dup_wait_category.c \
 *          src/lp_buf.c src/lp_json.c src/lp_store.c src/lp_uuid.c -o /tmp/repro && /tmp/repro */
#include <stdio.h>

#include "lp_store.h"

int main(void) {
  lp_store_config cfg = {.max_event_buffer_size = 4, .max_category_bytes = 64};
  lp_store *s = lp_store_new(&cfg);
  lp_slice twice[2] = {{"b", 1}, {"b", 1}}; /* store:wait({"b", "b"}) from Lua does the same */
  uint64_t h;
  printf("wait: %d\n", lp_store_wait(s, twice, 2, &h));
  fflush(stdout);
  printf("cancel: %d\n", lp_store_cancel(s, h)); /* end_sub frees "b", then reads it again */
  /* The same happens when a publish to another category wakes it: wait on
   * {"a", "b", "b"}, publish to "a". */
  lp_store_free(s);
  return 0;
}
