/* C tests of the core with fake time: every store rule of the wire contract.
 * TAP output; built with ASan+UBSan and run under valgrind by `make test`. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lp_json.h"
#include "lp_store.h"
#include "lp_waiter.h"
#include "tap.h"

static lp_slice S(const char *s) { return (lp_slice){s, strlen(s)}; }

static lp_store *new_store(size_t size, int64_t ttl, int daf) {
  lp_store_config cfg = {size, ttl, daf, 1024, 0, 0, 0, NULL, NULL, 0};
  return lp_store_new(&cfg);
}

typedef struct woken {
  uint64_t handles[64];
  size_t n;
} woken;

static void on_wake(void *ctx, uint64_t h, void *owner) {
  (void)owner;
  woken *w = ctx;
  if (w->n < 64) w->handles[w->n++] = h;
}

static lp_published pub(lp_store *s, const char *cat, const char *data, int64_t now) {
  lp_published p;
  memset(&p, 0, sizeof p);
  int rc = lp_store_publish(s, S(cat), S(data), now, NULL, NULL, &p);
  if (rc != LP_OK) printf("# publish failed: %s\n", lp_strerror(rc));
  return p;
}

/* fetch of one category; returns count and leaves the answer in out */
static size_t fetch1(lp_store *s, const char *cat, int64_t since, const char *last_id, int64_t now, lp_buf *out,
                     int *missed) {
  size_t count = 0;
  int m = 0;
  lp_buf_reset(out);
  lp_slice c = S(cat);
  lp_store_fetch(s, &c, 1, since, last_id, now, out, &count, &m);
  if (missed) *missed = m;
  if (out->len) lp_buf_append_char(out, '\0');
  return count;
}

static int contains(const lp_buf *b, const char *needle) { return b->len && strstr(b->data, needle) != NULL; }

static void test_publish_and_fetch_order(void) {
  int ok = 1;
  lp_store *s = new_store(250, 0, 0);
  lp_published a = pub(s, "news", "\"a\"", 1000);
  lp_published b = pub(s, "news", "{\"x\":[1,2]}", 1001);
  pub(s, "other", "3", 1002);
  CHECK(a.timestamp == 1000 && b.timestamp == 1001);
  CHECK(strlen(a.id) == 36 && a.id[14] == '4' && strchr("89ab", a.id[19]));
  CHECK(strcmp(a.id, b.id) != 0);
  lp_buf out = LP_BUF_INIT;
  size_t n = fetch1(s, "news", 0, NULL, 2000, &out, NULL);
  CHECK(n == 2);
  char expect[512];
  snprintf(expect, sizeof expect,
           "{\"events\":[{\"timestamp\":1000,\"category\":\"news\",\"data\":\"a\",\"id\":\"%s\"},"
           "{\"timestamp\":1001,\"category\":\"news\",\"data\":{\"x\":[1,2]},\"id\":\"%s\"}]}",
           a.id, b.id);
  CHECK(out.len && strcmp(out.data, expect) == 0);
  CHECK(fetch1(s, "news", 1000, NULL, 2000, &out, NULL) == 1); /* strictly after since_time */
  CHECK(fetch1(s, "news", 1001, NULL, 2000, &out, NULL) == 0);
  CHECK(fetch1(s, "nothing", 0, NULL, 2000, &out, NULL) == 0);
  CHECK(fetch1(s, "news", 5000, NULL, 2000, &out, NULL) == 0); /* since_time in the future */
  lp_buf_free(&out);
  lp_store_free(s);
  report("publish and fetch: order, shape, since_time strictly after", ok);
}

static void test_same_millisecond_cursor(void) {
  int ok = 1;
  lp_store *s = new_store(250, 0, 0);
  lp_published e[4];
  for (int i = 0; i < 4; i++) e[i] = pub(s, "c", "1", 7000); /* all in one millisecond */
  lp_buf out = LP_BUF_INIT;
  CHECK(fetch1(s, "c", 7000, e[1].id, 8000, &out, NULL) == 2);
  CHECK(contains(&out, e[2].id) && contains(&out, e[3].id) && !contains(&out, e[1].id));
  CHECK(fetch1(s, "c", 7000, e[3].id, 8000, &out, NULL) == 0);
  CHECK(fetch1(s, "c", 7000, NULL, 8000, &out, NULL) == 0); /* no last_id: that ms was seen */
  CHECK(fetch1(s, "c", 6999, NULL, 8000, &out, NULL) == 4);
  /* an unknown (evicted) last_id: every event of that millisecond is newer */
  CHECK(fetch1(s, "c", 7000, "00000000-0000-4000-8000-000000000000", 8000, &out, NULL) == 4);
  lp_buf_free(&out);
  lp_store_free(s);
  report("several events in one millisecond: the (since_time, last_id) cursor", ok);
}

static void test_overflow_and_missed(void) {
  int ok = 1;
  lp_store *s = new_store(3, 0, 0);
  lp_published e[5];
  for (int i = 0; i < 5; i++) e[i] = pub(s, "c", "1", 100 + i);
  lp_buf out = LP_BUF_INIT;
  int missed = 0;
  CHECK(fetch1(s, "c", 0, NULL, 200, &out, &missed) == 3);
  CHECK(missed == 1 && contains(&out, "\"missed\":true") && !contains(&out, e[1].id) && contains(&out, e[2].id));
  CHECK(fetch1(s, "c", 101, e[1].id, 200, &out, &missed) == 3);
  CHECK(missed == 0); /* the client saw the newest dropped event itself */
  CHECK(fetch1(s, "c", 102, e[2].id, 200, &out, &missed) == 2 && missed == 0);
  CHECK(fetch1(s, "c", 100, e[0].id, 200, &out, &missed) == 3 && missed == 1);
  lp_store_stats st;
  lp_store_get_stats(s, &st);
  CHECK(st.events == 3 && st.dropped == 2 && st.categories == 1);
  lp_buf_free(&out);
  lp_store_free(s);
  report("buffer overflow drops the oldest first and reports missed", ok);
}

static void test_ttl(void) {
  int ok = 1;
  lp_store *s = new_store(250, 1000, 0);
  pub(s, "a", "1", 10000);
  pub(s, "b", "2", 10500);
  lp_buf out = LP_BUF_INIT;
  CHECK(fetch1(s, "a", 0, NULL, 10999, &out, NULL) == 1);
  CHECK(fetch1(s, "a", 0, NULL, 11000, &out, NULL) == 0); /* expired at exactly ttl */
  lp_store_stats st;
  lp_store_get_stats(s, &st);
  CHECK(st.categories == 1 && st.events == 1); /* "a" was freed */
  CHECK(lp_store_expire(s, 11500) == 1);
  lp_store_get_stats(s, &st);
  CHECK(st.categories == 0 && st.events == 0 && st.event_bytes == 0);
  lp_buf_free(&out);
  lp_store_free(s);
  report("TTL drops events and frees empty categories", ok);
}

static void test_category_with_waiter_survives_ttl(void) {
  int ok = 1;
  lp_store *s = new_store(250, 1000, 0);
  pub(s, "a", "1", 0);
  uint64_t h;
  lp_slice a = S("a");
  CHECK(lp_store_wait(s, &a, 1, &h) == LP_OK);
  lp_store_expire(s, 5000);
  lp_store_stats st;
  lp_store_get_stats(s, &st);
  CHECK(st.categories == 1 && st.events == 0 && st.waiting == 1);
  CHECK(lp_store_cancel(s, h) == 1);
  CHECK(lp_store_cancel(s, h) == 0); /* a dead handle */
  lp_store_get_stats(s, &st);
  CHECK(st.categories == 0 && st.waiting == 0);
  lp_store_free(s);
  report("a category with a waiting subscriber is kept; cancel frees it", ok);
}

static void test_wake_and_cancel(void) {
  int ok = 1;
  lp_store *s = new_store(250, 0, 0);
  lp_slice a = S("a"), b = S("b"), ab[2] = {S("a"), S("b")};
  uint64_t h1, h2, h3, h4;
  CHECK(lp_store_wait(s, &a, 1, &h1) == LP_OK);
  CHECK(lp_store_wait(s, &a, 1, &h2) == LP_OK);
  CHECK(lp_store_wait(s, &b, 1, &h3) == LP_OK);
  CHECK(lp_store_wait(s, ab, 2, &h4) == LP_OK);
  CHECK(lp_store_cancel(s, h2) == 1);
  woken w = {{0}, 0};
  lp_published p;
  CHECK(lp_store_publish(s, a, S("1"), 10, on_wake, &w, &p) == LP_OK);
  CHECK(w.n == 2);
  int saw1 = 0, saw4 = 0;
  for (size_t i = 0; i < w.n; i++) saw1 |= w.handles[i] == h1, saw4 |= w.handles[i] == h4;
  CHECK(saw1 && saw4);
  /* h4 waited on both: being woken by "a" removed it from "b" too */
  w.n = 0;
  CHECK(lp_store_publish(s, b, S("2"), 11, on_wake, &w, &p) == LP_OK);
  CHECK(w.n == 1 && w.handles[0] == h3);
  CHECK(lp_store_cancel(s, h1) == 0 && lp_store_cancel(s, h4) == 0);
  lp_store_stats st;
  lp_store_get_stats(s, &st);
  CHECK(st.waiting == 0 && st.delivered == 3);
  lp_store_free(s);
  report("publish wakes every waiter of its category once; cancel is O(1) and idempotent", ok);
}

static void test_delete_after_first(void) {
  int ok = 1;
  lp_store *s = new_store(250, 0, 1);
  lp_buf out = LP_BUF_INIT;
  /* with a waiter: handed to it, never buffered */
  lp_slice a = S("a");
  uint64_t h;
  CHECK(lp_store_wait(s, &a, 1, &h) == LP_OK);
  woken w = {{0}, 0};
  lp_published p;
  CHECK(lp_store_publish(s, a, S("\"x\""), 10, on_wake, &w, &p) == LP_OK);
  CHECK(w.n == 1 && p.buffered == 0 && strstr(p.json, "\"x\"") != NULL);
  CHECK(fetch1(s, "a", 0, NULL, 20, &out, NULL) == 0);
  lp_store_stats st;
  lp_store_get_stats(s, &st);
  CHECK(st.categories == 0 && st.events == 0);
  /* without: buffered, then removed by the first fetch */
  pub(s, "a", "1", 30);
  pub(s, "a", "2", 31);
  CHECK(fetch1(s, "a", 30, NULL, 40, &out, NULL) == 1);
  CHECK(fetch1(s, "a", 30, NULL, 40, &out, NULL) == 0);
  CHECK(fetch1(s, "a", 0, NULL, 40, &out, NULL) == 1); /* the older one was not handed out */
  CHECK(fetch1(s, "a", 0, NULL, 40, &out, NULL) == 0);
  lp_store_get_stats(s, &st);
  CHECK(st.categories == 0 && st.events == 0);
  lp_buf_free(&out);
  lp_store_free(s);
  report("delete after first retrieval, with and without waiting subscribers", ok);
}

static void test_clock_steps_back(void) {
  int ok = 1;
  lp_store *s = new_store(250, 0, 0);
  lp_published a = pub(s, "c", "1", 5000);
  lp_published b = pub(s, "c", "2", 3000); /* the wall clock went back */
  CHECK(b.timestamp == 5000 && b.seq > a.seq);
  int64_t t = lp_store_mark_time(s, 4000);
  CHECK(t == 5000);
  lp_published c = pub(s, "c", "3", 4500);
  CHECK(c.timestamp == 5001); /* never equal to a timeout answer's timestamp */
  lp_buf out = LP_BUF_INIT;
  CHECK(fetch1(s, "c", t, NULL, 6000, &out, NULL) == 1 && contains(&out, c.id));
  CHECK(fetch1(s, "c", 5000, a.id, 6000, &out, NULL) == 2);
  lp_buf_free(&out);
  lp_store_free(s);
  report("timestamps never decrease when the clock steps back; timeout marks are safe", ok);
}

static void test_multi_category_cursor(void) {
  int ok = 1;
  lp_store *s = new_store(250, 0, 0);
  lp_published a1 = pub(s, "a", "1", 100);
  lp_published b1 = pub(s, "b", "1", 100);
  lp_published a2 = pub(s, "a", "2", 100);
  lp_published b2 = pub(s, "b", "2", 101);
  lp_slice ab[2] = {S("a"), S("b")};
  lp_buf out = LP_BUF_INIT;
  size_t count;
  int missed;
  CHECK(lp_store_fetch(s, ab, 2, 0, NULL, 200, &out, &count, &missed) == LP_OK && count == 4);
  lp_buf_append_char(&out, '\0');
  const char *p1 = strstr(out.data, a1.id), *p2 = strstr(out.data, b1.id), *p3 = strstr(out.data, a2.id),
             *p4 = strstr(out.data, b2.id);
  CHECK(p1 && p2 && p3 && p4 && p1 < p2 && p2 < p3 && p3 < p4);
  lp_buf_reset(&out);
  /* last_id from "b" positions the cursor in "a" too */
  CHECK(lp_store_fetch(s, ab, 2, 100, b1.id, 200, &out, &count, &missed) == LP_OK && count == 2);
  lp_buf_free(&out);
  lp_store_free(s);
  report("several categories: one merged stream, one cursor", ok);
}

static void test_bad_categories_and_limits(void) {
  int ok = 1;
  lp_store_config cfg = {10, 0, 0, 8, 2, 1, 0, NULL, NULL, 0};
  lp_store *s = lp_store_new(&cfg);
  lp_published p;
  CHECK(lp_store_publish(s, S(""), S("1"), 1, NULL, NULL, &p) == LP_EINVAL);
  CHECK(lp_store_publish(s, S("123456789"), S("1"), 1, NULL, NULL, &p) == LP_EINVAL);
  CHECK(lp_store_publish(s, (lp_slice){"\xff\xfe", 2}, S("1"), 1, NULL, NULL, &p) == LP_EUTF8);
  CHECK(lp_store_publish(s, S("a"), S("1"), 1, NULL, NULL, &p) == LP_OK);
  CHECK(lp_store_publish(s, S("b"), S("1"), 1, NULL, NULL, &p) == LP_OK);
  CHECK(lp_store_publish(s, S("c"), S("1"), 1, NULL, NULL, &p) == LP_ECATEGORIES);
  uint64_t h;
  lp_slice a = S("a");
  CHECK(lp_store_wait(s, &a, 1, &h) == LP_OK);
  CHECK(lp_store_wait(s, &a, 1, &h) == LP_EWAITERS);
  CHECK(lp_store_publish(s, S("a\"\\\n"), S("1"), 1, NULL, NULL, &p) == LP_ECATEGORIES);
  lp_store_free(s);
  lp_store *t = new_store(10, 0, 0);
  CHECK(lp_store_publish(t, S("q\"\\\n\x01/"), S("1"), 1, NULL, NULL, &p) == LP_OK);
  CHECK(strstr(p.json, "\"category\":\"q\\\"\\\\\\n\\u0001/\"") != NULL);
  lp_store_free(t);
  report("bad categories, category escaping, caps on categories and waiters", ok);
}

static void test_restore(void) {
  int ok = 1;
  lp_store *s = new_store(250, 0, 0);
  lp_published p;
  const char *id = "7C17587A-3437-4861-BEF7-8F29905589E4";
  CHECK(lp_store_restore(s, S("n"), S("1"), id, 500, &p) == LP_OK);
  CHECK(strstr(p.json, "7c17587a-3437-4861-bef7-8f29905589e4") != NULL);
  CHECK(lp_store_restore(s, S("n"), S("2"), "not-a-uuid", 600, &p) == LP_EINVAL);
  CHECK(lp_store_restore(s, S("n"), S("2"), id, 400, &p) == LP_EORDER);
  lp_published q = pub(s, "n", "3", 100); /* the clock is behind the restored events */
  CHECK(q.timestamp == 500);
  lp_store_free(s);
  report("restore keeps ids and timestamps and refuses events out of order", ok);
}

static void test_memory_returns_to_baseline(void) {
  int ok = 1;
  lp_store *s = new_store(4, 1000, 0);
  char name[32];
  for (int i = 0; i < 100000; i++) {
    snprintf(name, sizeof name, "category-%d", i);
    pub(s, name, "{\"n\":1}", 10000 + i / 100);
  }
  lp_store_stats st;
  lp_store_get_stats(s, &st);
  CHECK(st.categories == 100000 && st.events == 100000);
  CHECK(lp_store_expire(s, 1000000) == 100000);
  lp_store_get_stats(s, &st);
  CHECK(st.categories == 0 && st.events == 0 && st.event_bytes == 0);
  lp_store_free(s);
  report("100,000 categories created and expired leave nothing behind", ok);
}

static void test_json_publish_body(void) {
  int ok = 1;
  lp_publish_body pb;
  const char *err = NULL;
  const char *body = " {\"category\":\"n\\u00e9ws\",\"data\":12345678901234567890123} ";
  CHECK(lp_json_parse_publish(body, strlen(body), &pb, &err) == 0);
  CHECK(pb.has_category && pb.category.len == 5 && memcmp(pb.category.data, "n\xc3\xa9ws", 5) == 0);
  CHECK(pb.has_data && pb.data_len == 23 && memcmp(pb.data, "12345678901234567890123", 23) == 0);
  lp_buf_free(&pb.category);
  const char *bad[] = {"",
                       "[]",
                       "{\"category\":\"a\",\"data\":1} x",
                       "{\"category\":\"a\",\"data\":01}",
                       "{\"category\":\"a\",\"data\":\"\\ud800\"}",
                       "{\"category\":\"a\" \"data\":1}",
                       "{\"data\":[1,]}",
                       "{\"data\":\"\xff\"}",
                       "{\"a\":tru}",
                       "{"};
  for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
    int rc = lp_json_parse_publish(bad[i], strlen(bad[i]), &pb, &err);
    if (rc == 0) printf("# accepted: %s\n", bad[i]), lp_buf_free(&pb.category);
    CHECK(rc == -1);
  }
  body = "{\"category\":5,\"data\":null}";
  CHECK(lp_json_parse_publish(body, strlen(body), &pb, &err) == 0 && !pb.has_category && pb.category_bad_type &&
        !pb.has_data);
  lp_buf_free(&pb.category);
  /* nesting deeper than the limit is an error, not a crash */
  size_t depth = 100000;
  char *deep = malloc(depth * 2 + 32);
  size_t n = (size_t)sprintf(deep, "{\"data\":");
  for (size_t i = 0; i < depth; i++) deep[n++] = '[';
  for (size_t i = 0; i < depth; i++) deep[n++] = ']';
  deep[n++] = '}';
  CHECK(lp_json_parse_publish(deep, n, &pb, &err) == -1 && strstr(err, "deep") != NULL);
  free(deep);
  {
    const char *j = "[[[{\"a\":[1,2,{}]}]]]";
    CHECK(lp_json_check(j, strlen(j), &err) == 0);
  }
  report("publish body parsing: raw data, escapes, strictness, depth limit", ok);
}

static void test_max_buffered_bytes(void) {
  int ok = 1;
  /* with the bookkeeping (LP_EVENT_COST, LP_CATEGORY_COST) a 200-byte event
   * costs about 400 bytes, its category 260 more */
  lp_store_config cfg = {100, 0, 0, 1024, 0, 0, 3000, NULL, NULL, 0};
  lp_store *s = lp_store_new(&cfg);
  char big[201];
  memset(big, 'x', 200);
  big[0] = big[199] = '"';
  big[200] = '\0';
  lp_published small = pub(s, "small", "1", 1);
  for (int i = 0; i < 10; i++) pub(s, "large", big, 2 + i);
  lp_store_stats st;
  lp_store_get_stats(s, &st);
  CHECK(st.buffered_bytes <= 3000 && st.event_bytes < st.buffered_bytes);
  CHECK(st.dropped > 0 && st.evicted == st.dropped);
  lp_buf out = LP_BUF_INIT;
  int missed = 0;
  /* the largest category paid for the cap; the small one kept its event */
  CHECK(fetch1(s, "small", 0, NULL, 100, &out, &missed) == 1 && contains(&out, small.id) && !missed);
  size_t large = fetch1(s, "large", 0, NULL, 100, &out, &missed);
  CHECK(large >= 1 && large < 10 && missed);
  CHECK(contains(&out, "\"timestamp\":11,")); /* the newest is kept */
  /* one event over the whole cap is refused */
  char *huge = malloc(3100);
  memset(huge, 'y', 3099);
  huge[0] = huge[3098] = '"';
  huge[3099] = '\0';
  lp_published p;
  CHECK(lp_store_publish(s, S("small"), S(huge), 200, NULL, NULL, &p) == LP_ETOOBIG);
  free(huge);
  /* many categories: eviction empties and frees the largest ones first */
  char name[16];
  for (int i = 0; i < 50; i++) {
    snprintf(name, sizeof name, "c%d", i);
    pub(s, name, big, 300 + i);
  }
  lp_store_get_stats(s, &st);
  CHECK(st.buffered_bytes <= 3000 && st.categories <= 6);
  lp_buf_free(&out);
  lp_store_free(s);
  report("max_buffered_bytes drops the oldest events of the largest categories", ok);
}

static void test_take_waiters(void) {
  int ok = 1;
  lp_store *s = new_store(250, 0, 0);
  lp_slice a = S("a"), b = S("b"), ab[2] = {S("a"), S("b")};
  uint64_t h1, h2, h3;
  CHECK(lp_store_wait(s, &a, 1, &h1) == LP_OK);
  CHECK(lp_store_wait(s, ab, 2, &h2) == LP_OK);
  CHECK(lp_store_wait(s, &b, 1, &h3) == LP_OK);
  woken w = {{0}, 0};
  size_t n = 99;
  CHECK(lp_store_take_waiters(s, a, on_wake, &w, &n) == LP_OK);
  CHECK(n == 2 && w.n == 2);
  int saw1 = 0, saw2 = 0;
  for (size_t i = 0; i < w.n; i++) saw1 |= w.handles[i] == h1, saw2 |= w.handles[i] == h2;
  CHECK(saw1 && saw2);
  CHECK(lp_store_cancel(s, h1) == 0 && lp_store_cancel(s, h2) == 0); /* their handles are dead */
  lp_store_stats st;
  lp_store_get_stats(s, &st);
  /* nothing was stored or delivered; "a" was freed, "b" keeps its other waiter */
  CHECK(st.events == 0 && st.published == 0 && st.delivered == 0 && st.waiting == 1 && st.categories == 1);
  w.n = 0;
  CHECK(lp_store_take_waiters(s, a, on_wake, &w, &n) == LP_OK && n == 0 && w.n == 0);
  CHECK(lp_store_take_waiters(s, S("never"), on_wake, &w, &n) == LP_OK && n == 0);
  CHECK(lp_store_take_waiters(s, S(""), on_wake, &w, &n) == LP_EINVAL && n == 0);
  CHECK(lp_store_take_waiters(s, b, NULL, NULL, &n) == LP_OK && n == 1);
  lp_buf out = LP_BUF_INIT;
  CHECK(fetch1(s, "b", 0, NULL, 10, &out, NULL) == 0); /* no event appeared */
  lp_store_get_stats(s, &st);
  CHECK(st.waiting == 0 && st.categories == 0);
  /* a waiter taken can wait again at once, and a publish still wakes it */
  CHECK(lp_store_wait(s, &a, 1, &h1) == LP_OK);
  w.n = 0;
  lp_published p;
  CHECK(lp_store_publish(s, a, S("1"), 10, on_wake, &w, &p) == LP_OK && w.n == 1 && w.handles[0] == h1);
  lp_buf_free(&out);
  lp_store_free(s);
  report("take_waiters ends the waits of a category without storing an event", ok);
}

static void test_duplicate_categories_in_one_wait(void) {
  int ok = 1;
  lp_store_config cfg = {10, 0, 0, 64, 0, 1, 0, NULL, NULL, 0};
  lp_store *s = lp_store_new(&cfg);
  lp_slice twice[3] = {S("a"), S("b"), S("b")};
  uint64_t h1, h2;
  /* found by fuzz_store: a category named twice was linked twice and freed twice */
  CHECK(lp_store_wait(s, twice, 3, &h1) == LP_OK); /* the cap of 1 waiter is not hit by the repeat */
  CHECK(lp_store_cancel(s, h1) == 1);
  CHECK(lp_store_wait(s, twice, 3, &h2) == LP_OK);
  woken w = {{0}, 0};
  lp_published p;
  CHECK(lp_store_publish(s, S("a"), S("1"), 1, on_wake, &w, &p) == LP_OK && w.n == 1 && w.handles[0] == h2);
  lp_store_stats st;
  lp_store_get_stats(s, &st);
  CHECK(st.waiting == 0 && st.categories == 1);
  lp_store_free(s);
  report("a category named twice in one wait is waited on once", ok);
}

/* Clock readings and restored timestamps at the ends of int64 (a crafted
 * persist line said INT64_MAX): nothing overflows (UBSan aborts if it does),
 * timestamps stay in 0..LP_TIME_MAX, the TTL keeps working. */
static void test_time_bounds(void) {
  int ok = 1;
  lp_store *s = new_store(250, 1000, 0);
  lp_published p;
  char id[LP_UUID_LEN + 1];
  CHECK(lp_uuid_v4(id) == 0);
  CHECK(lp_store_restore(s, S("c"), S("1"), id, INT64_MAX, &p) == LP_ETIME);
  CHECK(lp_store_restore(s, S("c"), S("1"), id, -1, &p) == LP_ETIME);
  CHECK(lp_store_restore(s, S("c"), S("1"), id, LP_TIME_MAX, &p) == LP_OK);
  CHECK(lp_store_mark_time(s, INT64_MAX) == LP_TIME_MAX);
  int64_t t = lp_store_mark_time(s, INT64_MAX);
  CHECK(t >= LP_TIME_MAX && t < INT64_MAX);
  lp_published a = pub(s, "c", "2", INT64_MAX);
  CHECK(a.timestamp > t && a.timestamp < INT64_MAX);
  lp_store_free(s);

  s = new_store(250, 1000, 0);
  CHECK(lp_store_mark_time(s, INT64_MIN) == 0);
  lp_published b = pub(s, "c", "3", INT64_MIN);
  CHECK(b.timestamp >= 0);
  lp_buf out = LP_BUF_INIT;
  CHECK(fetch1(s, "c", INT64_MIN, NULL, INT64_MIN, &out, NULL) == 1);
  CHECK(fetch1(s, "c", INT64_MAX, NULL, 500, &out, NULL) == 0);
  CHECK(lp_store_expire(s, INT64_MAX) == 1); /* far past the TTL */
  lp_buf_free(&out);
  lp_store_free(s);
  report("times at the ends of int64 are clamped or refused, never overflow", ok);
}

/* Keys are read decoded, as a standard JSON parser reads them, so a gateway
 * that checked the category with its own parser sees the category we store. */
static void test_json_escaped_keys(void) {
  int ok = 1;
  lp_publish_body pb;
  const char *err;
  const char *body = "{\"\\u0063ategory\":\"secret\",\"category\\u0000\":\"x\",\"d\\u0061ta\":[1]}";
  CHECK(lp_json_parse_publish(body, strlen(body), &pb, &err) == 0);
  CHECK(pb.has_category && pb.category.len == 6 && memcmp(pb.category.data, "secret", 6) == 0);
  CHECK(pb.has_data && pb.data_len == 3 && memcmp(pb.data, "[1]", 3) == 0);
  lp_buf_free(&pb.category);
  /* the later key wins, however it is spelled */
  body = "{\"category\":\"a\",\"\\u0063\\u0061tegory\":\"b\",\"data\":1,\"\\/data\":2}";
  CHECK(lp_json_parse_publish(body, strlen(body), &pb, &err) == 0);
  CHECK(pb.has_category && pb.category.len == 1 && pb.category.data[0] == 'b');
  CHECK(pb.has_data && pb.data_len == 1 && pb.data[0] == '1');
  lp_buf_free(&pb.category);
  report("publish body keys written with escapes are the keys they spell", ok);
}

/* The stats page: ranked by bytes (ties by waiters, then name), paged, bounded. */
static void test_top_categories(void) {
  int ok = 1;
  lp_store *s = new_store(250, 0, 0);
  char name[16], data[64];
  for (int i = 1; i <= 20; i++) {
    snprintf(name, sizeof name, "c%02d", i);
    snprintf(data, sizeof data, "\"%.*s\"", i, "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxx");
    pub(s, name, data, 1000 + i);
  }
  pub(s, "t-b", "\"x\"", 2000); /* the same bytes as c01 */
  pub(s, "t-a", "\"x\"", 2001);
  lp_category_info page[5];
  size_t n;
  CHECK(lp_store_top_categories(s, 0, 5, page, &n) == LP_OK && n == 5);
  CHECK(page[0].name.len == 3 && memcmp(page[0].name.ptr, "c20", 3) == 0 && page[0].events == 1);
  CHECK(memcmp(page[4].name.ptr, "c16", 3) == 0 && page[0].bytes > page[4].bytes);
  CHECK(lp_store_top_categories(s, 18, 5, page, &n) == LP_OK && n == 4);
  CHECK(page[0].name.len == 3 && memcmp(page[0].name.ptr, "c02", 3) == 0);
  CHECK(page[1].name.len == 3 && memcmp(page[1].name.ptr, "c01", 3) == 0);
  /* t-a and t-b hold the same bytes as c01: ordered by name */
  CHECK(page[2].name.len == 3 && memcmp(page[2].name.ptr, "t-a", 3) == 0);
  CHECK(page[3].name.len == 3 && memcmp(page[3].name.ptr, "t-b", 3) == 0);
  CHECK(lp_store_top_categories(s, 22, 5, page, &n) == LP_OK && n == 0);
  CHECK(lp_store_top_categories(s, SIZE_MAX, 5, page, &n) == LP_EINVAL);
  CHECK(lp_store_top_categories(s, 0, 0, page, &n) == LP_EINVAL);
  lp_store_free(s);
  report("categories ranked by size, a page at a time", ok);
}

/* Per-category rules: "s/..." keep 2 events for 100 ms, "f/..." forever, "d/..."
 * delete after first, "t<N>" a TTL of N ms; others the store's defaults. */
static int limits_calls = 0;
static void test_limits(void *ctx, lp_slice name, lp_category_limits *lim) {
  (void)ctx;
  limits_calls++;
  if (name.len >= 2 && memcmp(name.ptr, "s/", 2) == 0) lim->max_event_buffer_size = 2, lim->event_ttl_ms = 100;
  if (name.len >= 2 && memcmp(name.ptr, "f/", 2) == 0) lim->event_ttl_ms = 0;
  if (name.len >= 2 && memcmp(name.ptr, "d/", 2) == 0) lim->delete_after_first = 1;
  if (name.len >= 2 && name.ptr[0] == 't') lim->event_ttl_ms = 1 + atoi(name.ptr + 1);
}

static void test_category_limits(void) {
  int ok = 1;
  lp_store_config cfg = {10, 1000, 0, 1024, 0, 0, 0, test_limits, NULL, 0};
  lp_store *s = lp_store_new(&cfg);
  lp_buf out = LP_BUF_INIT;
  for (int i = 0; i < 5; i++) {
    pub(s, "s/a", "1", 10000 + i);
    pub(s, "f/a", "1", 10000 + i);
    pub(s, "d/a", "1", 10000 + i);
    pub(s, "plain", "1", 10000 + i);
  }
  CHECK(limits_calls == 4); /* once per new category, not per publish */
  CHECK(fetch1(s, "s/a", 0, NULL, 10010, &out, NULL) == 2);
  CHECK(fetch1(s, "plain", 0, NULL, 10010, &out, NULL) == 5);
  CHECK(fetch1(s, "d/a", 0, NULL, 10010, &out, NULL) == 5);
  CHECK(fetch1(s, "d/a", 0, NULL, 10010, &out, NULL) == 0); /* deleted after the first retrieval */
  CHECK(fetch1(s, "plain", 0, NULL, 10010, &out, NULL) == 5);
  /* s/a expires after 100 ms, plain after 1000, f/a never */
  CHECK(fetch1(s, "s/a", 0, NULL, 10104, &out, NULL) == 0);
  CHECK(fetch1(s, "plain", 0, NULL, 10104, &out, NULL) == 5);
  CHECK(lp_store_expire(s, 11004) == 5);
  CHECK(fetch1(s, "f/a", 0, NULL, 99999999, &out, NULL) == 5);
  lp_store_stats st;
  lp_store_get_stats(s, &st);
  CHECK(st.events == 5 && st.categories == 1);
  /* at most LP_TTL_CLASSES distinct TTLs: 3 used (1000, 100, 0) */
  char name[16];
  int refused = 0;
  for (int i = 0; i < LP_TTL_CLASSES; i++) {
    snprintf(name, sizeof name, "t%d", 5000 + i);
    lp_published p;
    int rc = lp_store_publish(s, S(name), S("1"), 20000, NULL, NULL, &p);
    if (rc == LP_ELIMIT) refused++;
  }
  CHECK(refused == 3);
  lp_buf_free(&out);
  lp_store_free(s);
  report("per-category limits: buffer size, TTL and delete-after-first chosen once per category", ok);
}

typedef struct collected {
  char ids[8][LP_UUID_LEN + 1];
  size_t n;
  int stop_at; /* the callback stops the fetch at this call (-1: never) */
} collected;

static int collect_event(void *ctx, const lp_event_view *e) {
  collected *c = ctx;
  if ((int)c->n == c->stop_at) return 1;
  if (c->n < 8) memcpy(c->ids[c->n], e->id, LP_UUID_LEN + 1);
  c->n++;
  return e->json_len > 0 && e->json[0] == '{' ? 0 : 1;
}

static void test_fetch_each(void) {
  int ok = 1;
  lp_store *s = new_store(3, 0, 1); /* delete-after-first: a stopped fetch must delete nothing */
  lp_published a1 = pub(s, "a", "1", 100);
  lp_published b1 = pub(s, "b", "1", 100);
  lp_published a2 = pub(s, "a", "2", 101);
  lp_slice ab[2] = {S("a"), S("b")};
  size_t count;
  int missed;
  lp_store_stats st;
  collected c = {.stop_at = 1};
  CHECK(lp_store_fetch_each(s, ab, 2, 0, NULL, 200, collect_event, &c, &count, &missed) == LP_ENOMEM);
  CHECK(count == 0 && missed == 0);
  lp_store_get_stats(s, &st);
  CHECK(st.events == 3 && st.delivered == 0);
  collected all = {.stop_at = -1};
  CHECK(lp_store_fetch_each(s, ab, 2, 0, NULL, 200, collect_event, &all, &count, &missed) == LP_OK);
  CHECK(count == 3 && all.n == 3 && !missed);
  CHECK(strcmp(all.ids[0], a1.id) == 0 && strcmp(all.ids[1], b1.id) == 0 && strcmp(all.ids[2], a2.id) == 0);
  lp_store_get_stats(s, &st);
  CHECK(st.events == 0 && st.delivered == 3);
  lp_store_free(s);
  report("fetch_each: events in store order; a stopped fetch changes nothing", ok);
}

static void test_max_answer_bytes(void) {
  int ok = 1;
  lp_store_config cfg = {.max_event_buffer_size = 100, .max_category_bytes = 1024, .max_answer_bytes = 250};
  lp_store *s = lp_store_new(&cfg);
  CHECK(s != NULL);
  lp_published p[5];
  for (int i = 0; i < 5; i++) p[i] = pub(s, "a", "\"0123456789012345678901234567890123456789\"", 100 + i);
  /* each event is ~130 bytes: an answer of at most 250 bytes of events holds one */
  lp_slice a = S("a");
  lp_buf out = LP_BUF_INIT;
  size_t count, got = 0;
  int missed;
  int64_t since = 0;
  const char *last = NULL;
  char last_id[LP_UUID_LEN + 1];
  for (int round = 0; round < 10 && got < 5; round++) {
    lp_buf_reset(&out);
    CHECK(lp_store_fetch(s, &a, 1, since, last, 200, &out, &count, &missed) == LP_OK);
    CHECK(count >= 1 && count <= 2 && !missed);
    CHECK(out.len < 250 + 64 || count == 1);
    lp_buf_append_char(&out, '\0');
    CHECK(strstr(out.data, p[got].id) != NULL); /* the next one, in order: nothing skipped */
    got += count;
    since = p[got - 1].timestamp;
    memcpy(last_id, p[got - 1].id, sizeof last_id);
    last = last_id;
  }
  CHECK(got == 5);
  /* one event larger than the cap still goes, alone */
  lp_published big = pub(s, "b",
                         "\"01234567890123456789012345678901234567890123456789012345678901234567890123456789"
                         "012345678901234567890123456789012345678901234567890123456789012345678901234567890123456789\"",
                         300);
  lp_slice b = S("b");
  lp_buf_reset(&out);
  CHECK(lp_store_fetch(s, &b, 1, 0, NULL, 400, &out, &count, &missed) == LP_OK && count == 1);
  lp_buf_append_char(&out, '\0');
  CHECK(strstr(out.data, big.id) != NULL);
  lp_buf_free(&out);
  lp_store_free(s);
  report("max_answer_bytes: answers cut between events, the cursor walks the rest, none lost", ok);
}

/* A waiter parked in C: what it was handed. */
typedef struct fake_waiter {
  lp_waiter w;
  char answer[256];
  int woken, ended;
} fake_waiter;

static void fake_woken(lp_waiter *w, const lp_slice *answer, size_t n) {
  fake_waiter *f = (fake_waiter *)w;
  f->woken++;
  f->answer[0] = 0;
  for (size_t i = 0; i < n; i++) strncat(f->answer, answer[i].ptr, answer[i].len);
}
static void fake_ended(lp_waiter *w) { ((fake_waiter *)w)->ended++; }
static const lp_waiter_ops FAKE_OPS = {.woken = fake_woken, .ended = fake_ended};

static void test_owned_waiters(void) {
  int ok = 1;
  lp_store *s = new_store(10, 0, 0);
  fake_waiter f1 = {{&FAKE_OPS}, "", 0, 0}, f2 = {{&FAKE_OPS}, "", 0, 0}, f3 = {{&FAKE_OPS}, "", 0, 0};
  lp_slice a = S("a"), b = S("b"), ab[2] = {S("a"), S("b")};
  uint64_t h1, h2, h3, h4;
  CHECK(lp_store_wait_owned(s, &a, 1, &f1.w, &h1) == LP_OK);
  CHECK(lp_store_wait_owned(s, ab, 2, &f2.w, &h2) == LP_OK);
  CHECK(lp_store_wait(s, &a, 1, &h3) == LP_OK);
  CHECK(lp_store_wait_owned(s, &b, 1, &f3.w, &h4) == LP_OK);
  CHECK(lp_store_waiting_in(s, a) == 3 && lp_store_unowned_waiting_in(s, a) == 1);
  CHECK(lp_store_waiting_in(s, b) == 2 && lp_store_unowned_waiting_in(s, b) == 0);
  /* a publish hands owned waiters apart from the plain handles, then each gets the answer */
  lp_woken w = {0};
  lp_store_stats st;
  lp_store_get_stats(s, &st);
  CHECK(lp_woken_reserve(&w, st.waiting) == LP_OK);
  lp_published p;
  CHECK(lp_store_publish(s, a, S("1"), 10, lp_woken_add, &w, &p) == LP_OK);
  CHECK(w.nhandles == 1 && w.handles[0] == h3 && w.nowned == 2);
  CHECK(f1.woken == 0 && f2.woken == 0);
  lp_woken_answer(&w, &p);
  CHECK(f1.woken == 1 && f2.woken == 1 && f3.woken == 0);
  char want[256];
  snprintf(want, sizeof want, "{\"events\":[%.*s]}", (int)p.json_len, p.json);
  CHECK(strcmp(f1.answer, want) == 0 && strcmp(f2.answer, want) == 0);
  /* f2's wait on b ended with it: only f3 is left, owned */
  CHECK(lp_store_waiting_in(s, b) == 1 && lp_store_unowned_waiting_in(s, b) == 0);
  CHECK(lp_store_cancel(s, h2) == 0); /* woken: dead */
  /* cancelling an owned waiter keeps the counts right */
  CHECK(lp_store_cancel(s, h4) == 1);
  CHECK(lp_store_waiting_in(s, b) == 0 && lp_store_unowned_waiting_in(s, b) == 0);
  /* a closing store ends the owned waiters only */
  CHECK(lp_store_wait_owned(s, ab, 2, &f3.w, &h4) == LP_OK);
  CHECK(lp_store_wait(s, &b, 1, &h3) == LP_OK);
  CHECK(lp_store_end_owned(s, lp_waiter_end, NULL) == 1);
  CHECK(f3.ended == 1 && f3.woken == 0);
  CHECK(lp_store_waiting_in(s, a) == 0 && lp_store_waiting_in(s, b) == 1);
  CHECK(lp_store_unowned_waiting_in(s, b) == 1);
  lp_store_get_stats(s, &st);
  CHECK(st.waiting == 1);
  lp_woken_free(&w);
  lp_store_free(s);
  report("owned waiters: woken apart from handles, counted apart, ended when the store closes", ok);
}

/* A stream-like waiter: takes the event itself, and waits again once the publish is over. */
typedef struct fake_stream {
  lp_waiter w;
  lp_store *store;
  lp_slice category;
  uint64_t handle;
  int events, afters, waiting_when_told, ended;
  int64_t last_ts;
} fake_stream;

static void fake_stream_ended(lp_waiter *w) { ((fake_stream *)w)->ended++; }

static void fake_stream_event(lp_waiter *w, const lp_published *p) {
  fake_stream *f = (fake_stream *)w;
  f->events++;
  f->last_ts = p->timestamp;
  f->waiting_when_told = (int)lp_store_waiting_in(f->store, f->category);
}
static void fake_stream_after(lp_waiter *w) {
  fake_stream *f = (fake_stream *)w;
  f->afters++;
  lp_store_wait_owned(f->store, &f->category, 1, &f->w, &f->handle);
}
static const lp_waiter_ops STREAM_OPS = {
    .ended = fake_stream_ended, .woken_event = fake_stream_event, .after = fake_stream_after};

static void test_streams_wait_again(void) {
  int ok = 1;
  lp_store *s = new_store(10, 0, 0);
  fake_stream f1 = {{&STREAM_OPS}, s, S("a"), 0, 0, 0, 0, 0, 0}, f2 = {{&STREAM_OPS}, s, S("a"), 0, 0, 0, 0, 0, 0};
  fake_waiter poll = {{&FAKE_OPS}, "", 0, 0};
  CHECK(lp_store_wait_owned(s, &f1.category, 1, &f1.w, &f1.handle) == LP_OK);
  CHECK(lp_store_wait_owned(s, &f2.category, 1, &f2.w, &f2.handle) == LP_OK);
  lp_slice a = S("a");
  uint64_t hp;
  CHECK(lp_store_wait_owned(s, &a, 1, &poll.w, &hp) == LP_OK);
  lp_woken w = {0};
  for (int i = 1; i <= 3; i++) {
    lp_store_stats st;
    lp_store_get_stats(s, &st);
    CHECK(lp_woken_reserve(&w, st.waiting) == LP_OK);
    lp_published p;
    CHECK(lp_store_publish(s, a, S("1"), 10 * i, lp_woken_add, &w, &p) == LP_OK);
    lp_woken_answer(&w, &p);
    /* each stream got the event itself (not the answer), before anyone waited again */
    CHECK(f1.events == i && f2.events == i && f1.last_ts == 10 * i && f2.last_ts == 10 * i);
    CHECK(f1.waiting_when_told == 0 && f2.waiting_when_told == 0);
    CHECK(f1.afters == i && f2.afters == i);
    CHECK(lp_store_waiting_in(s, a) == 2); /* the streams wait again; the poll was answered once */
  }
  CHECK(poll.woken == 1);
  CHECK(lp_store_end_owned(s, lp_waiter_end, NULL) == 2);
  CHECK(f1.ended == 1 && f2.ended == 1 && poll.ended == 0);
  CHECK(lp_store_waiting_in(s, a) == 0);
  lp_woken_free(&w);
  lp_store_free(s);
  report("owned waiters: a stream takes each event itself and waits again after the publish", ok);
}

int main(void) {
  test_publish_and_fetch_order();
  test_same_millisecond_cursor();
  test_overflow_and_missed();
  test_ttl();
  test_category_with_waiter_survives_ttl();
  test_wake_and_cancel();
  test_delete_after_first();
  test_clock_steps_back();
  test_multi_category_cursor();
  test_bad_categories_and_limits();
  test_restore();
  test_memory_returns_to_baseline();
  test_json_publish_body();
  test_max_buffered_bytes();
  test_take_waiters();
  test_duplicate_categories_in_one_wait();
  test_time_bounds();
  test_json_escaped_keys();
  test_top_categories();
  test_category_limits();
  test_fetch_each();
  test_max_answer_bytes();
  test_owned_waiters();
  test_streams_wait_again();
  printf("1..%d\n", test_no);
  return failures ? 1 : 0;
}
