/* tap.h: the C tests' TAP output. A test keeps `int ok = 1;`, checks with CHECK(cond) (which
 * prints the failed condition and goes on), and ends with report(name, ok); main prints the plan
 * ("1..N" from test_no) and exits non-zero when failures is. */
#ifndef LP_TAP_H
#define LP_TAP_H

#include <stdio.h>

static int test_no = 0, failures = 0;

#define CHECK(cond)                                                     \
  do {                                                                  \
    if (!(cond)) {                                                      \
      printf("# %s:%d: check failed: %s\n", __FILE__, __LINE__, #cond); \
      ok = 0;                                                           \
    }                                                                   \
  } while (0)

static void report(const char *name, int ok) {
  test_no++;
  if (!ok) failures++;
  printf("%sok %d - %s\n", ok ? "" : "not ", test_no, name);
}

#endif
