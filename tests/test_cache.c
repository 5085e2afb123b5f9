/* C tests of lp_cache, the Redis engine's node-local cache: each coverage rule on its own, then
 * seeded programs against the model of Redis in cache_model.h (fuzz/fuzz_cache.c runs it with
 * libFuzzer's programs). TAP output; built with ASan+UBSan and run under valgrind by `make test`. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cache_model.h"
#include "lp_cache.h"
#include "tap.h"

static lp_slice S(const char *s) { return (lp_slice){s, strlen(s)}; }

static lp_cache_pos P(const char *epoch, int64_t ts, int64_t seq) {
  lp_cache_pos p;
  lp_cache_pos_set(&p, epoch, strlen(epoch), ts, seq);
  return p;
}

static const char *ID1 = "00000000-0000-4000-8000-000000000001";
static const char *ID2 = "00000000-0000-4000-8000-000000000002";
static const char *ID3 = "00000000-0000-4000-8000-000000000003";
static const char *ID4 = "00000000-0000-4000-8000-000000000004";

static lp_cache *new_cache(size_t size, size_t max_categories) {
  lp_cache_config cfg = {size, 1024, max_categories, 0};
  return lp_cache_new(&cfg);
}

static int add(lp_cache *c, const char *epoch, int64_t ts, int64_t seq, const char *cat, const char *id,
               const char *data) {
  lp_cache_pos p = P(epoch, ts, seq);
  return lp_cache_add(c, &p, S(cat), id, S(data));
}

/* The answer for one category; the body (NUL-terminated) stays in out. */
static int answer1(lp_cache *c, const char *cat, int64_t since, const char *last_id, lp_buf *out,
                   lp_cache_pos *cursor) {
  lp_buf_reset(out);
  lp_slice s = S(cat);
  lp_cache_pos ignored;
  int r = lp_cache_answer(c, &s, 1, since, last_id, out, cursor ? cursor : &ignored);
  lp_buf_append_char(out, '\0');
  return r;
}

static void test_invalid_until_started(void) {
  int ok = 1;
  lp_cache *c = new_cache(3, 0);
  lp_buf out = LP_BUF_INIT;
  CHECK(add(c, "e", 10, 1, "a", ID1, "1") == LP_OK); /* ignored */
  CHECK(answer1(c, "a", 0, NULL, &out, NULL) == LP_CACHE_MISS);
  CHECK(!lp_cache_is_valid(c));
  lp_cache_stats st;
  lp_cache_get_stats(c, &st);
  CHECK(st.categories == 0 && st.hits == 0 && st.misses == 0); /* an invalid cache counts nothing */
  lp_buf_free(&out);
  lp_cache_free(c);
  report("an unstarted cache keeps nothing and answers nothing", ok);
}

static void test_empty_redis_covers_everything(void) {
  int ok = 1;
  lp_cache *c = new_cache(3, 0);
  lp_buf out = LP_BUF_INIT;
  lp_cache_pos start = P("e", 5, 0), cur;
  lp_cache_start(c, &start); /* seq 0: Redis never held an event */
  CHECK(add(c, "e", 10, 1, "a", ID1, "1") == LP_OK);
  CHECK(add(c, "e", 11, 2, "a", ID2, "2") == LP_OK);
  CHECK(answer1(c, "a", -1, NULL, &out, &cur) == LP_CACHE_EVENTS);
  CHECK(strstr(out.data, "\"data\":1") && strstr(out.data, "\"data\":2") && !strstr(out.data, "missed"));
  const char *head = "{\"events\":[{\"timestamp\":10,\"category\":\"a\",\"data\":1,\"id\":\"";
  CHECK(strncmp(out.data, head, strlen(head)) == 0);
  CHECK(cur.ts == 11 && cur.seq == 2);
  CHECK(answer1(c, "a", 10, NULL, &out, NULL) == LP_CACHE_EVENTS);
  CHECK(strstr(out.data, "\"data\":2") && !strstr(out.data, "\"data\":1"));
  CHECK(answer1(c, "a", 10, ID1, &out, NULL) == LP_CACHE_EVENTS);     /* after ID1 */
  CHECK(answer1(c, "b", 0, NULL, &out, &cur) == LP_CACHE_WAIT);       /* nothing of b: wait */
  CHECK(cur.ts == 11 && cur.seq == 2 && strcmp(cur.epoch, "e") == 0); /* from the newest */
  lp_cache_stats st;
  lp_cache_get_stats(c, &st);
  CHECK(st.valid && st.categories == 1 && st.hits == 3 && st.waits == 1 && st.misses == 0);
  lp_buf_free(&out);
  lp_cache_free(c);
  report("started on an empty Redis, every cursor is covered", ok);
}

static void test_base_position(void) {
  int ok = 1;
  lp_cache *c = new_cache(3, 0);
  lp_buf out = LP_BUF_INIT;
  lp_cache_pos start = P("e", 100, 7);
  lp_cache_start(c, &start); /* events up to (100, 7) are Redis's alone */
  CHECK(add(c, "e", 105, 8, "a", ID1, "1") == LP_OK);
  CHECK(answer1(c, "a", 99, NULL, &out, NULL) == LP_CACHE_MISS);    /* events of 100 may be missing */
  CHECK(answer1(c, "a", 100, NULL, &out, NULL) == LP_CACHE_EVENTS); /* after 100: all here */
  CHECK(answer1(c, "a", 100, ID4, &out, NULL) == LP_CACHE_MISS);    /* with last_id, 100 itself is asked */
  CHECK(answer1(c, "a", 101, ID4, &out, NULL) == LP_CACHE_EVENTS);
  CHECK(answer1(c, "z", 99, NULL, &out, NULL) == LP_CACHE_MISS); /* a category never seen: the same rule */
  CHECK(answer1(c, "z", 100, NULL, &out, NULL) == LP_CACHE_WAIT);
  lp_buf_free(&out);
  lp_cache_free(c);
  report("from a base position, only what is stamped after it is covered", ok);
}

static void test_node_behind_client(void) {
  int ok = 1;
  lp_cache *c = new_cache(3, 0);
  lp_buf out = LP_BUF_INIT;
  lp_cache_pos start = P("e", 0, 0);
  lp_cache_start(c, &start);
  CHECK(add(c, "e", 10, 1, "a", ID1, "1") == LP_OK);
  CHECK(add(c, "e", 20, 2, "b", ID2, "2") == LP_OK);
  CHECK(add(c, "e", 20, 3, "a", ID3, "3") == LP_OK);
  CHECK(answer1(c, "a", 21, NULL, &out, NULL) == LP_CACHE_MISS);  /* the client saw later than this node */
  CHECK(answer1(c, "a", 20, NULL, &out, NULL) == LP_CACHE_MISS);  /* more of 20 may exist */
  CHECK(answer1(c, "a", 20, ID4, &out, NULL) == LP_CACHE_MISS);   /* an id of 20 this node never saw */
  CHECK(answer1(c, "a", 20, ID2, &out, NULL) == LP_CACHE_EVENTS); /* one it saw: after it, ID3 */
  CHECK(strstr(out.data, ID3) && !strstr(out.data, ID2));
  CHECK(answer1(c, "a", 20, ID3, &out, NULL) == LP_CACHE_WAIT);
  CHECK(answer1(c, "a", 19, NULL, &out, NULL) == LP_CACHE_EVENTS);
  lp_buf_free(&out);
  lp_cache_free(c);
  report("the node must not be behind the client's cursor", ok);
}

static void test_two_categories(void) {
  int ok = 1;
  lp_cache *c = new_cache(3, 0);
  lp_buf out = LP_BUF_INIT;
  lp_cache_pos start = P("e", 0, 0), cur;
  lp_cache_start(c, &start);
  CHECK(add(c, "e", 10, 1, "a", ID1, "1") == LP_OK);
  CHECK(add(c, "e", 11, 2, "b", ID2, "2") == LP_OK);
  lp_slice ab[2] = {S("a"), S("b")}, ac[2] = {S("a"), S("c")};
  lp_buf_reset(&out);
  CHECK(lp_cache_answer(c, ab, 2, 0, NULL, &out, &cur) == LP_CACHE_MISS); /* two with events: Redis's order */
  lp_buf_reset(&out);
  CHECK(lp_cache_answer(c, ac, 2, 0, NULL, &out, &cur) == LP_CACHE_EVENTS); /* one with events */
  lp_buf_reset(&out);
  CHECK(lp_cache_answer(c, ab, 2, 10, NULL, &out, &cur) == LP_CACHE_EVENTS); /* only b's after 10 */
  lp_buf_reset(&out);
  CHECK(lp_cache_answer(c, ab, 2, 11, ID2, &out, &cur) == LP_CACHE_WAIT);
  lp_buf_free(&out);
  lp_cache_free(c);
  report("events of two categories are Redis's to order", ok);
}

static void test_buffer_rule_and_missed(void) {
  int ok = 1;
  lp_cache *c = new_cache(2, 0);
  lp_buf out = LP_BUF_INIT;
  lp_cache_pos start = P("e", 0, 0);
  lp_cache_start(c, &start);
  CHECK(add(c, "e", 10, 1, "a", ID1, "1") == LP_OK);
  CHECK(add(c, "e", 11, 2, "a", ID2, "2") == LP_OK);
  CHECK(add(c, "e", 12, 3, "a", ID3, "3") == LP_OK);
  CHECK(answer1(c, "a", 0, NULL, &out, NULL) == LP_CACHE_EVENTS);
  CHECK(strstr(out.data, "\"missed\":true") && !strstr(out.data, ID1)); /* the newest 2, as Redis keeps */
  CHECK(answer1(c, "a", 10, ID1, &out, NULL) == LP_CACHE_EVENTS);
  CHECK(!strstr(out.data, "missed")); /* the client saw the one dropped */
  lp_buf_free(&out);
  lp_cache_free(c);
  report("the buffer keeps Redis's newest events, so \"missed\" agrees", ok);
}

static void test_warm(void) {
  int ok = 1;
  lp_cache *c = new_cache(3, 0);
  lp_buf out = LP_BUF_INIT;
  lp_cache_pos start = P("e", 100, 7), at = P("e", 120, 9), other = P("f", 120, 9), cur;
  lp_cache_start(c, &start);
  lp_cache_event read[2] = {{50, ID1, S("1")}, {60, ID2, S("2")}};
  CHECK(lp_cache_warm(c, S("a"), 40, read, 2, 1, &at) == 0);    /* missed: not all of it */
  CHECK(lp_cache_warm(c, S("a"), 40, read, 2, 0, &other) == 0); /* another epoch */
  lp_cache_pos old = P("e", 90, 6);
  CHECK(lp_cache_warm(c, S("a"), 40, read, 2, 0, &old) == 0); /* a read from before the base */
  CHECK(lp_cache_warm(c, S("a"), 40, read, 2, 0, &at) == 1);
  CHECK(lp_cache_warm(c, S("a"), 40, read, 2, 0, &at) == 0); /* the category is held already */
  CHECK(answer1(c, "a", 39, NULL, &out, NULL) == LP_CACHE_MISS);
  CHECK(answer1(c, "a", 40, NULL, &out, &cur) == LP_CACHE_EVENTS);
  CHECK(strstr(out.data, ID1) && strstr(out.data, ID2));
  CHECK(cur.ts == 120 && cur.seq == 9); /* what the read knew */
  /* pub/sub then brings events the read returned already, and later ones */
  CHECK(add(c, "e", 110, 8, "a", ID3, "3") == LP_OK);
  CHECK(add(c, "e", 130, 10, "a", ID4, "4") == LP_OK);
  CHECK(answer1(c, "a", 60, ID2, &out, NULL) == LP_CACHE_EVENTS);
  CHECK(!strstr(out.data, ID3) && strstr(out.data, ID4));
  /* a read whose since is the largest cursor does not wrap around to "everything" */
  lp_cache_pos at2 = P("e", 130, 10);
  CHECK(lp_cache_warm(c, S("m"), INT64_MAX, NULL, 0, 0, &at2) == 1);
  CHECK(answer1(c, "m", 0, NULL, &out, NULL) == LP_CACHE_MISS);
  lp_cache_stats st;
  lp_cache_get_stats(c, &st);
  CHECK(st.warmed == 2 && st.categories == 2);
  lp_buf_free(&out);
  lp_cache_free(c);
  report("a read warms a category the cache has nothing of", ok);
}

static void test_warmed_category_with_others(void) {
  int ok = 1;
  lp_cache *c = new_cache(3, 0);
  lp_buf out = LP_BUF_INIT;
  lp_cache_pos start = P("e", 0, 0), at = P("e", 30, 3), cur;
  lp_cache_start(c, &start);
  CHECK(add(c, "e", 10, 1, "a", ID1, "1") == LP_OK);
  /* a read of b came back before pub/sub brought (20, 2) of a and (30, 3) of b */
  lp_cache_event read[1] = {{30, ID3, S("3")}};
  CHECK(lp_cache_warm(c, S("b"), 5, read, 1, 0, &at) == 1);
  CHECK(answer1(c, "b", 5, NULL, &out, &cur) == LP_CACHE_EVENTS);
  lp_slice ab[2] = {S("a"), S("b")};
  lp_buf_reset(&out);
  /* b known up to 30, a only up to 10: a's event of 20 may be on its way; Redis answers */
  CHECK(lp_cache_answer(c, ab, 2, 10, NULL, &out, &cur) == LP_CACHE_MISS);
  CHECK(add(c, "e", 20, 2, "a", ID2, "2") == LP_OK);
  CHECK(add(c, "e", 30, 3, "b", ID3, "3") == LP_OK); /* the node caught up */
  lp_buf_reset(&out);
  CHECK(lp_cache_answer(c, ab, 2, 25, NULL, &out, &cur) == LP_CACHE_EVENTS);
  lp_buf_free(&out);
  lp_cache_free(c);
  report("a category warmed beyond pub/sub is answered alone", ok);
}

static void test_from_now(void) {
  int ok = 1;
  lp_cache *c = new_cache(3, 0);
  lp_slice a = S("a"), ab[2] = {S("a"), S("b")}, b = S("b");
  lp_cache_pos cur, start = P("e", 5, 0), at = P("e", 30, 3);
  CHECK(lp_cache_now(c, &a, 1, &cur) == LP_CACHE_MISS); /* not started */
  lp_cache_start(c, &start);
  CHECK(lp_cache_now(c, &a, 1, &cur) == LP_CACHE_WAIT && cur.ts == 5 && cur.seq == 0);
  CHECK(add(c, "e", 10, 1, "a", ID1, "1") == LP_OK);
  CHECK(lp_cache_now(c, ab, 2, &cur) == LP_CACHE_WAIT && cur.ts == 10 && cur.seq == 1);
  /* b warmed by a read beyond what pub/sub brought: Lua's to wait from the node's position */
  lp_cache_event read[1] = {{30, ID3, S("3")}};
  CHECK(lp_cache_warm(c, S("b"), 5, read, 1, 0, &at) == 1);
  CHECK(lp_cache_now(c, &b, 1, &cur) == LP_CACHE_MISS);
  CHECK(lp_cache_now(c, ab, 2, &cur) == LP_CACHE_MISS);
  CHECK(lp_cache_now(c, &a, 1, &cur) == LP_CACHE_WAIT);
  CHECK(add(c, "e", 30, 3, "b", ID3, "3") == LP_OK); /* the node caught up */
  CHECK(lp_cache_now(c, ab, 2, &cur) == LP_CACHE_WAIT && cur.ts == 30);
  lp_cache_reset(c, 1);
  CHECK(lp_cache_now(c, &a, 1, &cur) == LP_CACHE_MISS);
  lp_cache_free(c);
  report("a poll without a cursor waits from the cache's position, unless a read is ahead of it", ok);
}

static void test_limits_refusals_resets(void) {
  int ok = 1;
  lp_cache *c = new_cache(3, 1);
  lp_buf out = LP_BUF_INIT;
  lp_cache_pos start = P("e", 0, 0);
  lp_cache_start(c, &start);
  CHECK(add(c, "e", 10, 1, "a", ID1, "1") == LP_OK);
  CHECK(add(c, "e", 11, 2, "b", ID2, "2") == LP_OK); /* over max_categories: Redis's */
  CHECK(answer1(c, "a", 0, NULL, &out, NULL) == LP_CACHE_EVENTS);
  CHECK(answer1(c, "b", 0, NULL, &out, NULL) == LP_CACHE_MISS);
  CHECK(answer1(c, "c", 0, NULL, &out, NULL) == LP_CACHE_WAIT); /* never seen: no event of it exists */
  CHECK(add(c, "e", 12, 3, "a", "not-a-uuid", "3") != LP_OK);   /* refused: a goes to Redis */
  CHECK(answer1(c, "a", 0, NULL, &out, NULL) == LP_CACHE_MISS);
  lp_cache_reset(c, 1);
  CHECK(answer1(c, "c", 0, NULL, &out, NULL) == LP_CACHE_MISS);
  lp_cache_stats st;
  lp_cache_get_stats(c, &st);
  CHECK(!st.valid && st.categories == 0 && st.resets == 1);
  lp_cache_start(c, &start); /* a restart counts no reset */
  lp_cache_get_stats(c, &st);
  CHECK(st.valid && st.resets == 1);
  lp_cache_pos p;
  char long_epoch[LP_CACHE_EPOCH_MAX + 2];
  memset(long_epoch, 'x', sizeof long_epoch - 1);
  long_epoch[sizeof long_epoch - 1] = 0;
  CHECK(lp_cache_pos_set(&p, long_epoch, strlen(long_epoch), 1, 1) == LP_EINVAL);
  CHECK(answer1(c, "a", 0, "nope", &out, NULL) == LP_CACHE_MISS); /* not a UUID */
  lp_buf_free(&out);
  lp_cache_free(c);
  lp_cache_free(NULL);
  lp_cache_config bad = {0, 1024, 0, 0};
  CHECK(lp_cache_new(&bad) == NULL);
  report("max_categories, refused events, resets and bad arguments", ok);
}

static void test_new_epoch_message(void) {
  int ok = 1;
  lp_cache *c = new_cache(3, 0);
  lp_buf out = LP_BUF_INIT;
  lp_cache_pos start = P("e", 0, 0);
  lp_cache_start(c, &start);
  CHECK(add(c, "e", 50, 1, "a", ID1, "1") == LP_OK);
  /* the shard drops the cache on a new epoch first; an older stamp reaching a category is refused,
   * and the category goes to Redis */
  CHECK(add(c, "f", 40, 1, "a", ID2, "2") == LP_EORDER);
  CHECK(answer1(c, "a", 40, ID2, &out, NULL) == LP_CACHE_MISS);
  CHECK(answer1(c, "b", 40, ID2, &out, NULL) == LP_CACHE_WAIT); /* the newest is (f, 40) now */
  CHECK(answer1(c, "b", 41, NULL, &out, NULL) == LP_CACHE_MISS);
  lp_buf_free(&out);
  lp_cache_free(c);
  report("a message of another epoch moves the newest position", ok);
}

/* A parked poll as the HTTP engine keeps one: what woke or ended it. */
typedef struct test_parked {
  lp_waiter w;
  int woken, ended;
  char answer[256];
} test_parked;

static void tp_woken(lp_waiter *w, const lp_slice *answer, size_t n) {
  test_parked *t = (test_parked *)w;
  size_t len = 0;
  t->woken++;
  for (size_t i = 0; i < n; i++) {
    if (len + answer[i].len >= sizeof t->answer) break;
    memcpy(t->answer + len, answer[i].ptr, answer[i].len);
    len += answer[i].len;
  }
  t->answer[len] = 0;
}

static void tp_ended(lp_waiter *w) { ((test_parked *)w)->ended++; }

static const lp_waiter_ops TP_OPS = {.woken = tp_woken, .ended = tp_ended};

static int park1(lp_cache *c, test_parked *t, const char *cat, uint64_t *handle) {
  memset(t, 0, sizeof *t);
  t->w.ops = &TP_OPS;
  lp_slice s = S(cat);
  return lp_cache_wait(c, &s, 1, &t->w, handle);
}

static void test_parked_polls(void) {
  int ok = 1;
  lp_cache_config cfg = {3, 1024, 2, 3};
  lp_cache *c = lp_cache_new(&cfg);
  lp_buf out = LP_BUF_INIT;
  test_parked a1, a2, b1, gone, over;
  uint64_t h, hgone;
  CHECK(park1(c, &a1, "a", &h) == LP_EINVAL); /* an invalid cache parks nothing */
  lp_cache_pos start = P("e", 0, 0);
  lp_cache_start(c, &start);
  CHECK(park1(c, &a1, "a", &h) == LP_OK);
  CHECK(park1(c, &a2, "a", &h) == LP_OK);
  CHECK(park1(c, &gone, "b", &hgone) == LP_OK);
  CHECK(lp_cache_cancel(c, hgone) == 1 && lp_cache_cancel(c, hgone) == 0);
  memset(&b1, 0, sizeof b1);
  b1.w.ops = &TP_OPS;
  lp_slice ab[2] = {S("a"), S("b")};
  CHECK(lp_cache_wait(c, ab, 2, &b1.w, &h) == LP_OK);
  CHECK(park1(c, &over, "a", &h) == LP_EWAITERS); /* max_waiting_per_category */
  lp_cache_stats st;
  lp_cache_get_stats(c, &st);
  CHECK(st.parked == 3);
  /* an event of a: every poll on a is answered once with the answer the Lua path writes */
  CHECK(add(c, "e", 10, 1, "a", ID1, "{\"n\":1}") == LP_OK);
  const char *want =
      "{\"events\":[{\"timestamp\":10,\"category\":\"a\",\"data\":{\"n\":1},\"id\":\""
      "00000000-0000-4000-8000-000000000001\"}]}";
  CHECK(a1.woken == 1 && a2.woken == 1 && b1.woken == 1 && gone.woken == 0);
  CHECK(strcmp(a1.answer, want) == 0 && strcmp(b1.answer, want) == 0);
  CHECK(add(c, "e", 11, 2, "a", ID2, "2") == LP_OK); /* woken once: their waits are gone */
  CHECK(a1.woken == 1 && b1.woken == 1);
  /* a category the cache does not keep (over max_categories) still wakes its polls */
  CHECK(add(c, "e", 12, 3, "b", ID3, "3") == LP_OK);
  CHECK(park1(c, &gone, "c", &h) == LP_OK);
  CHECK(add(c, "e", 13, 4, "c", ID4, "4") == LP_OK);
  CHECK(gone.woken == 1 && strstr(gone.answer, "\"category\":\"c\"") != NULL);
  /* an event that cannot be answered (not a UUID) ends the parked waits instead */
  CHECK(park1(c, &gone, "c", &h) == LP_OK);
  CHECK(add(c, "e", 14, 5, "c", "not-a-uuid", "5") == LP_OK); /* c is not kept: nothing refused */
  CHECK(gone.woken == 0 && gone.ended == 1);
  /* an event a read put here already wakes nobody: a poll parked on the category is past it */
  lp_cache_event evs[1] = {{20, ID1, {"5", 1}}};
  lp_cache_reset(c, 0);
  lp_cache_start(c, &start);
  lp_cache_pos at = P("e", 25, 12);
  CHECK(lp_cache_warm(c, S("w"), 0, evs, 1, 0, &at) == 1);
  CHECK(add(c, "e", 22, 10, "z", ID2, "6") == LP_OK);
  lp_cache_pos cursor;
  CHECK(answer1(c, "w", 20, ID1, &out, &cursor) == LP_CACHE_WAIT && cursor.ts == 25 && cursor.seq == 12);
  CHECK(park1(c, &a1, "w", &h) == LP_OK);
  CHECK(add(c, "e", 20, 9, "w", ID1, "5") == LP_OK);
  CHECK(a1.woken == 0);
  /* a reset ends every parked wait, without an answer */
  CHECK(park1(c, &a2, "x", &h) == LP_OK);
  lp_cache_reset(c, 1);
  CHECK(a1.ended == 1 && a2.ended == 1 && a1.woken == 0);
  lp_cache_get_stats(c, &st);
  CHECK(st.parked == 0 && st.woken == 4 && st.ended == 3);
  /* and so does freeing the cache */
  lp_cache_start(c, &start);
  CHECK(park1(c, &a1, "a", &h) == LP_OK);
  lp_buf_free(&out);
  lp_cache_free(c);
  CHECK(a1.ended == 1);
  report("parked polls: woken once by their categories' next event, ended by a reset", ok);
}

/* A xorshift generator: the programs are the same on every run. */
static uint64_t rng_state;
static unsigned rnd(void) {
  rng_state ^= rng_state << 13;
  rng_state ^= rng_state >> 7;
  rng_state ^= rng_state << 17;
  return (unsigned)(rng_state >> 24);
}

static void test_model(void) {
  int ok = 1;
  static cm_model m;
  uint64_t events = 0, waits = 0, wakes = 0;
  for (unsigned seed = 1; seed <= 40 && ok; seed++) {
    rng_state = 0x9e3779b97f4a7c15ull * seed;
    if (!cm_init(&m, 1 + seed % 4, seed % 5 == 0 ? 2 : 0)) {
      ok = 0;
      break;
    }
    cm_sync(&m);
    for (int step = 0; step < 1500 && !m.failure; step++) {
      unsigned char p[3] = {(unsigned char)rnd(), (unsigned char)rnd(), (unsigned char)rnd()};
      cm_step(&m, p);
    }
    if (m.failure) {
      printf("# seed %u: %s\n", seed, m.failure);
      ok = 0;
    }
    events += m.checked_events;
    waits += m.checked_waits;
    wakes += m.checked_wakes;
    cm_free(&m);
  }
  printf("# model: %llu answers with events, %llu waits and %llu parked polls woken checked\n",
         (unsigned long long)events, (unsigned long long)waits, (unsigned long long)wakes);
  CHECK(events > 1000 && waits > 500 && wakes > 200); /* the programs reach every answer */
  report("seeded programs: every answer is Redis's as of what the node knows", ok);
}

int main(void) {
  test_invalid_until_started();
  test_empty_redis_covers_everything();
  test_base_position();
  test_node_behind_client();
  test_two_categories();
  test_buffer_rule_and_missed();
  test_warm();
  test_warmed_category_with_others();
  test_from_now();
  test_limits_refusals_resets();
  test_new_epoch_message();
  test_parked_polls();
  test_model();
  printf("1..%d\n", test_no);
  return failures ? 1 : 0;
}
