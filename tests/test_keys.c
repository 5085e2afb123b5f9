/* test_keys: lp_keys, the table of Idempotency-Keys (the random comparison with a plain list
 * is spec/idempotency_spec.lua's; these are the edges it reaches rarely). */
#include <string.h>

#include "lp_keys.h"
#include "tap.h"

static lp_slice S(const char *s) { return (lp_slice){s, strlen(s)}; }

static void test_codes(void) {
  int ok = 1;
  lp_keys *k = lp_keys_new(10, 1 << 20, 1000);
  uint64_t t;
  lp_keys_prior p;
  CHECK(lp_keys_begin(k, S("a"), S("fp"), 0, &t, &p) == LP_KEYS_NEW);
  CHECK(lp_keys_begin(k, S("a"), S("fp"), 1, &t, &p) == LP_KEYS_BUSY);
  CHECK(lp_keys_begin(k, S("a"), S("other"), 1, &t, &p) == LP_KEYS_MISMATCH);
  CHECK(lp_keys_commit(k, t, S("a"), S("id-1"), 42) == 0);
  CHECK(lp_keys_begin(k, S("a"), S("fp"), 2, &t, &p) == LP_KEYS_REPLAY);
  CHECK(p.id.len == 4 && memcmp(p.id.ptr, "id-1", 4) == 0 && p.timestamp == 42);
  lp_keys_stats st;
  lp_keys_get_stats(k, &st);
  CHECK(st.keys == 1 && st.replays == 1 && st.conflicts == 1 && st.evicted == 0);
  CHECK(st.bytes == 1 + 2 + 36 + LP_KEYS_RECORD_COST);
  /* the window ends at 1000: the key is new again */
  CHECK(lp_keys_begin(k, S("a"), S("other"), 1000, &t, &p) == LP_KEYS_NEW);
  lp_keys_free(k);
  report("new, busy, mismatch, replay, and a key new again after its window", ok);
}

static void test_tickets(void) {
  int ok = 1;
  lp_keys *k = lp_keys_new(2, 1 << 20, 1000);
  uint64_t t1, t2, t3;
  lp_keys_prior p;
  CHECK(lp_keys_begin(k, S("a"), S("fp"), 0, &t1, &p) == LP_KEYS_NEW);
  lp_keys_abort(k, t1, S("a"));
  CHECK(lp_keys_begin(k, S("a"), S("fp"), 0, &t2, &p) == LP_KEYS_NEW);
  CHECK(t2 != t1);
  /* the aborted publish's late commit names another record: nothing happens */
  CHECK(lp_keys_commit(k, t1, S("a"), S("stale"), 1) == 0);
  CHECK(lp_keys_begin(k, S("a"), S("fp"), 0, &t3, &p) == LP_KEYS_BUSY);
  /* two more keys evict "a" while its publish is in flight: its commit does nothing */
  CHECK(lp_keys_begin(k, S("b"), S("fp"), 0, &t3, &p) == LP_KEYS_NEW);
  CHECK(lp_keys_begin(k, S("c"), S("fp"), 0, &t3, &p) == LP_KEYS_NEW);
  CHECK(lp_keys_commit(k, t2, S("a"), S("late"), 1) == 0);
  CHECK(lp_keys_begin(k, S("a"), S("fp"), 0, &t1, &p) == LP_KEYS_NEW);
  lp_keys_stats st;
  lp_keys_get_stats(k, &st);
  CHECK(st.keys == 2 && st.evicted == 2);
  lp_keys_free(k); /* with records in flight: ASan and valgrind see what leaks */
  report("tickets: a commit after an abort or an eviction changes nothing", ok);
}

static void test_bounds(void) {
  int ok = 1;
  size_t one = 2 + 2 + 36 + LP_KEYS_RECORD_COST; /* a two-byte key */
  lp_keys *k = lp_keys_new(1000, 3 * one, 1000);
  uint64_t t;
  lp_keys_prior p;
  char key[3] = "k0";
  for (int i = 0; i < 10; i++) {
    key[1] = (char)('0' + i);
    CHECK(lp_keys_begin(k, S(key), S("fp"), i, &t, &p) == LP_KEYS_NEW);
    CHECK(lp_keys_commit(k, t, S(key), S("id"), i) == 0);
  }
  lp_keys_stats st;
  lp_keys_get_stats(k, &st);
  CHECK(st.keys == 3 && st.bytes == 3 * one && st.evicted == 7);
  CHECK(lp_keys_begin(k, S("k9"), S("fp"), 10, &t, &p) == LP_KEYS_REPLAY);
  CHECK(lp_keys_begin(k, S("k6"), S("fp"), 10, &t, &p) == LP_KEYS_NEW);
  /* many keys: the map grows and every key is still found */
  lp_keys *big = lp_keys_new(100000, (size_t)1 << 30, 1000);
  char name[16];
  for (int i = 0; i < 5000; i++) {
    int n = snprintf(name, sizeof name, "key%d", i);
    CHECK(lp_keys_begin(big, (lp_slice){name, (size_t)n}, S("fp"), 0, &t, &p) == LP_KEYS_NEW);
    CHECK(lp_keys_commit(big, t, (lp_slice){name, (size_t)n}, S("x"), i) == 0);
  }
  int found = 0;
  for (int i = 0; i < 5000; i++) {
    int n = snprintf(name, sizeof name, "key%d", i);
    found += lp_keys_begin(big, (lp_slice){name, (size_t)n}, S("fp"), 1, &t, &p) == LP_KEYS_REPLAY && p.timestamp == i;
  }
  CHECK(found == 5000);
  lp_keys_expire(big, 1000);
  lp_keys_get_stats(big, &st);
  CHECK(st.keys == 0 && st.bytes == 0);
  lp_keys_free(big);
  lp_keys_free(k);
  report("bounds: the oldest keys go first; a big table finds every key, and expires them all", ok);
}

static void test_check(void) {
  int ok = 1;
  lp_slice k;
  CHECK(lp_keys_check(S("abc"), &k) == 0 && k.len == 3 && memcmp(k.ptr, "abc", 3) == 0);
  CHECK(lp_keys_check(S("\"abc\""), &k) == 0 && k.len == 3 && memcmp(k.ptr, "abc", 3) == 0);
  CHECK(lp_keys_check(S("\""), &k) == 0 && k.len == 1); /* one quote: a key as sent */
  CHECK(lp_keys_check(S("\"\""), &k) == -1);            /* an empty quoted key */
  CHECK(lp_keys_check(S("\"a\"b\""), &k) == -1);
  CHECK(lp_keys_check(S("\"a\\b\""), &k) == -1);
  CHECK(lp_keys_check(S("a\\b"), &k) == 0); /* unquoted: any printable character */
  CHECK(lp_keys_check(S(""), &k) == -1);
  CHECK(lp_keys_check(S("tab\there"), &k) == -1);
  CHECK(lp_keys_check(S("\xc3\xa9"), &k) == -1);
  char longest[257];
  memset(longest, 'x', 256);
  longest[256] = '\0';
  CHECK(lp_keys_check(S(longest), &k) == -1);
  longest[255] = '\0';
  CHECK(lp_keys_check(S(longest), &k) == 0 && k.len == 255);
  report("the key of a header value: as sent or quoted, 1 to 255 printable ASCII characters", ok);
}

int main(void) {
  test_check();
  test_codes();
  test_tickets();
  test_bounds();
  printf("1..%d\n", test_no);
  return failures ? 1 : 0;
}
