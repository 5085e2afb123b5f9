/* fuzz_cache: libFuzzer harness for lp_cache, the Redis engine's node-local cache. The input is a
 * program (a first byte of configuration, then 3 bytes per step: publish, deliver, lose, sync,
 * Redis restart, a warming read, a catch-up) run against the model of Redis in
 * tests/cache_model.h, whose oracle checks every answer the cache gives. */
#include <stdio.h>
#include <stdlib.h>

#include "../tests/cache_model.h"

int LLVMFuzzerTestOneInput(const unsigned char *data, size_t size) {
  static cm_model m;
  if (size < 1) return 0;
  if (!cm_init(&m, 1 + data[0] % 4, (data[0] >> 2) % 4)) abort();
  cm_sync(&m);
  for (size_t i = 1; i + 3 <= size && !m.failure; i += 3) cm_step(&m, data + i);
  if (m.failure) {
    fprintf(stderr, "fuzz_cache: invariant failed: %s\n", m.failure);
    abort();
  }
  cm_free(&m);
  return 0;
}
