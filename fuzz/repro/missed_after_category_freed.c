/* Reproducer (contract, not memory safety): "missed": true is lost when a
 * category is freed. An event dropped by TTL (or by size) is remembered in its
 * category only; when that leaves the category with no events and no waiters
 * the category is freed, and a client whose cursor is older than the dropped
 * event later gets the new events without "missed": true
 * (docs/http-api.md: "When the cursor is older than events the buffer already
 * dropped, the events answer also carries "missed": true").
 * Build: clang -g -fsanitize=address -Isrc fuzz/repro/missed_after_category_freed.c \
 *          src/lp_buf.c src/lp_json.c src/lp_store.c src/lp_uuid.c -o /tmp/repro && /tmp/repro */
#include <stdio.h>

#include "lp_store.h"

static int fetch_missed(lp_store *s, int64_t since, int64_t now) {
  lp_buf out = LP_BUF_INIT;
  size_t count;
  int missed;
  lp_store_fetch(s, &(lp_slice){"a", 1}, 1, since, NULL, now, &out, &count, &missed);
  lp_buf_free(&out);
  return missed;
}

int main(void) {
  lp_store_config cfg = {.max_event_buffer_size = 4, .event_ttl_ms = 10, .max_category_bytes = 64};
  lp_store *s = lp_store_new(&cfg);
  lp_published p;
  lp_store_publish(s, (lp_slice){"a", 1}, (lp_slice){"1", 1}, 1000, NULL, NULL, &p);
  lp_store_publish(s, (lp_slice){"a", 1}, (lp_slice){"2", 1}, 1005, NULL, NULL, &p);
  /* at 1012 the first event has expired, the second has not: "missed" is reported */
  printf("category kept:  missed=%d (expected 1)\n", fetch_missed(s, 999, 1012));
  /* at 1020 both expired and the category was freed; a new event arrives */
  lp_store_publish(s, (lp_slice){"a", 1}, (lp_slice){"3", 1}, 1020, NULL, NULL, &p);
  int missed = fetch_missed(s, 999, 1021);
  printf("category freed: missed=%d (expected 1)\n", missed);
  lp_store_free(s);
  return missed == 1 ? 0 : 1;
}
