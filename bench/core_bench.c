/* core_bench: the C core alone (src/lp_store.c), no Lua, no sockets: the
 * ceiling the layers above it can approach. Prints one JSON line per case.
 *
 *   core_bench [events]   (default 2,000,000 publishes per case) */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "lp_store.h"

#define NCATS 1000

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static lp_store *new_store(void) {
  lp_store_config cfg;
  memset(&cfg, 0, sizeof cfg);
  cfg.max_event_buffer_size = 250;
  cfg.max_category_bytes = 1024;
  lp_store *s = lp_store_new(&cfg);
  if (!s) {
    fprintf(stderr, "core_bench: cannot create a store\n");
    exit(1);
  }
  return s;
}

static char names[NCATS][16];
static lp_slice cats[NCATS];

typedef struct wake_ctx {
  uint64_t woken;
  uint64_t last;
} wake_ctx;

static void on_wake(void *ctx, uint64_t handle, void *owner) {
  (void)owner;
  wake_ctx *w = ctx;
  w->woken++;
  w->last = handle;
}

static void must(int rc, const char *what) {
  if (rc != LP_OK) {
    fprintf(stderr, "core_bench: %s: %s\n", what, lp_strerror(rc));
    exit(1);
  }
}

/* waiters: subscriptions waiting in each category before every publish; each
 * woken one waits again at once, as a long-poll client that re-polls would. */
static void bench_publish(long n, int waiters) {
  lp_store *s = new_store();
  lp_slice data = {"\"benchmark-event-payload-0123456789\"", 36};
  wake_ctx w = {0, 0};
  uint64_t h;
  for (int c = 0; c < NCATS; c++)
    for (int k = 0; k < waiters; k++) must(lp_store_wait(s, &cats[c], 1, &h), "wait");
  lp_published out;
  int64_t now = 1700000000000;
  double t0 = now_s();
  for (long i = 0; i < n; i++) {
    int c = (int)(i % NCATS);
    uint64_t before = w.woken;
    must(lp_store_publish(s, cats[c], data, now + i / 1000, on_wake, &w, &out), "publish");
    for (uint64_t k = before; k < w.woken; k++) must(lp_store_wait(s, &cats[c], 1, &h), "wait");
  }
  double secs = now_s() - t0;
  printf(
      "{\"case\":\"core_publish\",\"categories\":%d,\"waiters_per_category\":%d,\"events\":%ld,"
      "\"woken\":%" PRIu64 ",\"seconds\":%.3f,\"events_per_s\":%.0f}\n",
      NCATS, waiters, n, w.woken, secs, n / secs);
  lp_store_free(s);
}

/* The catch-up path: a cursor before the only buffered event of a category. */
static void bench_fetch(long n) {
  lp_store *s = new_store();
  lp_slice data = {"\"catch-up-event-payload\"", 24};
  lp_published out;
  must(lp_store_publish(s, cats[0], data, 1700000000000, NULL, NULL, &out), "publish");
  lp_buf buf = LP_BUF_INIT;
  size_t count = 0, total = 0;
  int missed = 0;
  double t0 = now_s();
  for (long i = 0; i < n; i++) {
    lp_buf_reset(&buf);
    must(lp_store_fetch(s, &cats[0], 1, 0, NULL, 1700000000001, &buf, &count, &missed), "fetch");
    total += count;
  }
  double secs = now_s() - t0;
  printf("{\"case\":\"core_fetch\",\"fetches\":%ld,\"events\":%zu,\"seconds\":%.3f,\"fetches_per_s\":%.0f}\n", n, total,
         secs, n / secs);
  lp_buf_free(&buf);
  lp_store_free(s);
}

int main(int argc, char **argv) {
  long n = argc > 1 ? atol(argv[1]) : 2000000;
  if (n < NCATS) n = NCATS;
  for (int c = 0; c < NCATS; c++) {
    snprintf(names[c], sizeof names[c], "cat-%d", c);
    cats[c].ptr = names[c];
    cats[c].len = strlen(names[c]);
  }
  bench_publish(n, 0);
  bench_publish(n, 1);
  bench_publish(n / 10, 10);
  bench_fetch(n);
  return 0;
}
