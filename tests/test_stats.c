/* test_stats: lp_stats, the stats endpoint's text and request rules (the byte comparison with
 * the Lua handler is spec/stats_native_spec.lua's; these are the rules' edges). */
#include <string.h>

#include "lp_stats.h"
#include "tap.h"

static lp_slice S(const char *s) { return (lp_slice){s, strlen(s)}; }
static int has(const lp_buf *b, const char *text) { return memmem(b->data, b->len, text, strlen(text)) != NULL; }
static const lp_slice NONE = {NULL, 0};

static int parse(const char *query, lp_slice accept, int allowed, lp_stats_request *r) {
  return lp_stats_parse_request(S(query), accept, allowed, r);
}

static void test_request_rules(void) {
  int ok = 1;
  lp_stats_request r;
  CHECK(parse("", NONE, 0, &r) == 1 && r.answer == LP_STATS_ANSWER_JSON && !r.has_page);
  CHECK(parse("", S("TEXT/HTML,*/*"), 0, &r) == 1 && r.answer == LP_STATS_ANSWER_DASHBOARD);
  CHECK(parse("format=json", S("text/html"), 0, &r) == 1 && r.answer == LP_STATS_ANSWER_JSON);
  CHECK(parse("", S("text/plain"), 0, &r) == 1 && r.answer == LP_STATS_ANSWER_PROMETHEUS);
  CHECK(parse("", S("text/plain, application/json"), 0, &r) == 1 && r.answer == LP_STATS_ANSWER_JSON);
  CHECK(parse("", S("application/openmetrics-text"), 0, &r) == 1 && r.answer == LP_STATS_ANSWER_PROMETHEUS);
  CHECK(parse("format=prometheus&format=xml", NONE, 0, &r) == 1 && r.answer == LP_STATS_ANSWER_PROMETHEUS);
  /* left to Lua: an error to explain, or a query it would decode */
  CHECK(parse("format=xml", NONE, 0, &r) == 0);
  CHECK(parse("format", NONE, 0, &r) == 0);
  CHECK(parse("for%6Dat=json", NONE, 0, &r) == 0);
  CHECK(parse("format=pro%6Detheus", NONE, 0, &r) == 0);
  CHECK(parse("categories=1", NONE, 0, &r) == 0); /* 403: names can be secrets */
  /* pages */
  CHECK(parse("categories=0&limit=x", NONE, 0, &r) == 1 && !r.has_page);
  CHECK(parse("categories=false", NONE, 1, &r) == 1 && !r.has_page);
  CHECK(parse("categories=", NONE, 1, &r) == 1 && !r.has_page);
  CHECK(parse("categories=1", NONE, 1, &r) == 1 && r.has_page && r.offset == 0 &&
        r.limit == LP_STATS_DEFAULT_CATEGORY_LIMIT);
  CHECK(parse("categories=yes&limit=1000&offset=1000000000", NONE, 1, &r) == 1 && r.limit == 1000 &&
        r.offset == 1000000000);
  CHECK(parse("categories=1&limit=007", NONE, 1, &r) == 1 && r.limit == 7);
  CHECK(parse("categories=1&limit=0", NONE, 1, &r) == 0);
  CHECK(parse("categories=1&limit=1001", NONE, 1, &r) == 0);
  CHECK(parse("categories=1&offset=1000000001", NONE, 1, &r) == 0);
  CHECK(parse("categories=1&offset=99999999999999999999999", NONE, 1, &r) == 0);
  CHECK(parse("categories=1&offset=", NONE, 1, &r) == 0);
  CHECK(parse("categories=1&limit=-1", NONE, 1, &r) == 0);
  report("which answer a request asks for, and which it leaves to Lua", ok);
}

static void test_text(void) {
  int ok = 1;
  lp_stats_figures f;
  memset(&f, 0, sizeof f);
  f.v[LP_STATS_EVENTS] = 3;
  f.v[LP_STATS_IDEMPOTENCY_IN_FLIGHT] = 9;
  f.uptime_seconds = 1.5;
  lp_category_info page[2] = {{{"a\"\\\n", 4}, 1, 2, 3}, {{"b", 1}, 4, 5, 6}};
  f.has_page = 1;
  f.offset = 10;
  f.limit = 2;
  f.page = page;
  f.npage = 2;
  lp_buf out = LP_BUF_INIT;
  CHECK(lp_stats_json(&f, &out) == 0);
  CHECK(out.len > 0 && out.data[0] == '{' && out.data[out.len - 1] == '}');
  CHECK(has(&out, "\"events\":3,"));
  CHECK(has(&out, "\"idempotency_in_flight\":9,\"uptime_seconds\":1.500,"));
  const char *by =
      "\"categories_offset\":10,\"categories_limit\":2,\"by_category\":{\"a\\\"\\\\\\n\":"
      "{\"events\":1,\"bytes\":2,\"waiting\":3},\"b\":{\"events\":4,\"bytes\":5,\"waiting\":6}}}";
  CHECK(out.len >= strlen(by) && memcmp(out.data + out.len - strlen(by), by, strlen(by)) == 0);
  lp_buf_reset(&out);
  CHECK(lp_stats_prometheus(&f, &out) == 0);
  const char *label = "longpoll_category_waiting_subscribers{category=\"a\\\"\\\\\\n\"} 3\n";
  CHECK(has(&out, label));
  CHECK(has(&out, "\nlongpoll_uptime_seconds 1.500\n"));
  lp_buf_free(&out);
  report("JSON and Prometheus text, with a page of categories and escaped names", ok);
}

int main(void) {
  test_request_rules();
  test_text();
  printf("1..%d\n", test_no);
  return failures ? 1 : 0;
}
