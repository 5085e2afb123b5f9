/* C tests of the Redis protocol without sockets: lp_resp (commands, replies) and lp_redis_publish
 * (the publish script's call and reply). TAP output; built with ASan+UBSan and run under valgrind
 * by `make test`. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lp_redis_publish.h"
#include "lp_resp.h"
#include "tap.h"

static lp_slice S(const char *s) { return (lp_slice){s, strlen(s)}; }

static int eq(lp_slice a, const char *b) { return a.len == strlen(b) && memcmp(a.ptr, b, a.len) == 0; }

static void test_command(void) {
  int ok = 1;
  lp_buf b = LP_BUF_INIT;
  lp_slice argv[3] = {S("SET"), S("k"), {"a\r\nb", 4}};
  CHECK(lp_resp_append_command(&b, 3, argv) == 0);
  const char *want = "*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$4\r\na\r\nb\r\n";
  CHECK(b.len == strlen(want) && memcmp(b.data, want, b.len) == 0);
  /* a command read back as an array: the same strings */
  lp_resp_reply r;
  CHECK(lp_resp_read(b.data, b.len, &r) == (long)b.len);
  CHECK(r.type == LP_RESP_ARRAY && r.integer == 3 && eq(r.items[0], "SET") && r.items[2].len == 4);
  lp_buf_free(&b);
  report("resp: a command is an array of bulk strings, binary-safe", ok);
}

static void test_replies(void) {
  int ok = 1;
  lp_resp_reply r;
  const char *all = "+OK\r\n-ERR no\r\n:-42\r\n$-1\r\n*-1\r\n$0\r\n\r\n";
  size_t at = 0, len = strlen(all);
  long n = lp_resp_read(all + at, len - at, &r);
  CHECK(n == 5 && r.type == LP_RESP_STATUS && eq(r.str, "OK"));
  at += (size_t)n;
  n = lp_resp_read(all + at, len - at, &r);
  CHECK(n == 9 && r.type == LP_RESP_ERROR && eq(r.str, "ERR no"));
  at += (size_t)n;
  n = lp_resp_read(all + at, len - at, &r);
  CHECK(n == 6 && r.type == LP_RESP_INTEGER && r.integer == -42);
  at += (size_t)n;
  n = lp_resp_read(all + at, len - at, &r);
  CHECK(n == 5 && r.type == LP_RESP_NIL);
  at += (size_t)n;
  n = lp_resp_read(all + at, len - at, &r);
  CHECK(n == 5 && r.type == LP_RESP_NIL);
  at += (size_t)n;
  n = lp_resp_read(all + at, len - at, &r);
  CHECK(n == 6 && r.type == LP_RESP_BULK && r.str.len == 0);
  at += (size_t)n;
  CHECK(at == len);
  /* nested arrays are read whole; only the top level's strings are kept */
  const char *nested = "*3\r\n*2\r\n:1\r\n$1\r\nx\r\n$2\r\nab\r\n:7\r\n";
  CHECK(lp_resp_read(nested, strlen(nested), &r) == (long)strlen(nested));
  CHECK(r.type == LP_RESP_ARRAY && r.integer == 3 && r.items[0].ptr == NULL && eq(r.items[1], "ab") &&
        r.items[2].ptr == NULL);
  report("resp: every reply type, nested arrays", ok);
}

static void test_partial_and_broken(void) {
  int ok = 1;
  lp_resp_reply r;
  const char *whole = "*3\r\n$16\r\n0123456789abcdef\r\n$13\r\n1700000000000\r\n$1\r\n7\r\n";
  size_t len = strlen(whole);
  /* every cut before the end is incomplete, never an error or a read past the end */
  for (size_t cut = 0; cut < len; cut++) {
    char *copy = malloc(cut ? cut : 1);
    memcpy(copy, whole, cut);
    CHECK(lp_resp_read(copy, cut, &r) == 0);
    free(copy);
  }
  CHECK(lp_resp_read(whole, len, &r) == (long)len);
  const char *bad[] = {"?x\r\n", "$3\r\nabcd\r\n", ":12a\r\n", "$-2\r\n", "+a\nb\r\n", "*1\r\n!\r\n", ":\r\n"};
  for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) CHECK(lp_resp_read(bad[i], strlen(bad[i]), &r) == -1);
  /* too deep: the stream counts as broken */
  char deep[64] = "";
  for (int i = 0; i < LP_RESP_MAX_DEPTH + 2; i++) strcat(deep, "*1\r\n");
  strcat(deep, ":1\r\n");
  CHECK(lp_resp_read(deep, strlen(deep), &r) == -1);
  report("resp: a cut reply waits for more bytes, broken bytes are an error", ok);
}

static void test_publish_call(void) {
  int ok = 1;
  lp_redis_publish_config c = {S("P:clock"), S("P:s:"), S("P:d:"), S("P:events"), 250, 0};
  lp_buf b = LP_BUF_INIT;
  const char *id = "0b5f3d2e-7c1a-4e6b-9f00-123456789abc";
  CHECK(lp_redis_publish_head(&b, 0, S("0123456789012345678901234567890123456789")) == 0);
  CHECK(lp_redis_publish_tail(&b, &c, S("news"), S("{\"n\":1}"), id, "00112233aabbccdd", 1700000000123) == 0);
  /* the EVALSHA Shard:publish sends: keys clock, stream, dropped; then category, data, id, size,
   * ttl, channel, epoch candidate, floor */
  const char *want =
      "*14\r\n$7\r\nEVALSHA\r\n$40\r\n0123456789012345678901234567890123456789\r\n$1\r\n3\r\n"
      "$7\r\nP:clock\r\n$8\r\nP:s:news\r\n$8\r\nP:d:news\r\n$4\r\nnews\r\n$7\r\n{\"n\":1}\r\n"
      "$36\r\n0b5f3d2e-7c1a-4e6b-9f00-123456789abc\r\n$3\r\n250\r\n$1\r\n0\r\n$8\r\nP:events\r\n"
      "$16\r\n00112233aabbccdd\r\n$13\r\n1700000000123\r\n";
  CHECK(b.len == strlen(want) && memcmp(b.data, want, b.len) == 0);
  lp_buf_reset(&b);
  CHECK(lp_redis_publish_head(&b, 1, S("return 1")) == 0);
  CHECK(b.len == strlen("*14\r\n$4\r\nEVAL\r\n$8\r\nreturn 1\r\n"));
  lp_buf_free(&b);
  report("redis publish: the script call, byte for byte", ok);
}

static void test_publish_reply(void) {
  int ok = 1;
  lp_resp_reply r;
  lp_slice epoch, msg;
  int64_t ts = 0, seq = 0;
  const char *good = "*3\r\n$16\r\n0123456789abcdef\r\n$13\r\n1700000000000\r\n$1\r\n7\r\n";
  CHECK(lp_resp_read(good, strlen(good), &r) > 0);
  CHECK(lp_redis_publish_reply(&r, &epoch, &ts, &seq, &msg) == 0);
  CHECK(eq(epoch, "0123456789abcdef") && ts == 1700000000000 && seq == 7);
  const char *noscript = "-NOSCRIPT No matching script. Please use EVAL.\r\n";
  CHECK(lp_resp_read(noscript, strlen(noscript), &r) > 0);
  CHECK(lp_redis_publish_reply(&r, &epoch, &ts, &seq, &msg) == 1);
  const char *err = "-OOM command not allowed\r\n";
  CHECK(lp_resp_read(err, strlen(err), &r) > 0);
  CHECK(lp_redis_publish_reply(&r, &epoch, &ts, &seq, &msg) == -1 && eq(msg, "OOM command not allowed"));
  const char *odd[] = {"*2\r\n$1\r\na\r\n$1\r\n1\r\n", "*3\r\n$1\r\na\r\n$1\r\nx\r\n$1\r\n1\r\n",
                       "*3\r\n$1\r\na\r\n:1\r\n$1\r\n1\r\n", ":1\r\n"};
  for (size_t i = 0; i < sizeof odd / sizeof *odd; i++) {
    CHECK(lp_resp_read(odd[i], strlen(odd[i]), &r) > 0);
    CHECK(lp_redis_publish_reply(&r, &epoch, &ts, &seq, &msg) == -1);
  }
  report("redis publish: the reply, NOSCRIPT, errors and odd replies", ok);
}

static void test_event_message(void) {
  int ok = 1;
  lp_redis_event ev;
  const char *id = "0b5f3d2e-7c1a-4e6b-9f00-123456789abc";
  char msg[256];
  snprintf(msg, sizeof msg, "E 00112233aabbccdd 42 1700000000123 5\nn\xc3\xa9ws%s{\"n\":1}", id);
  CHECK(lp_redis_event_parse(msg, strlen(msg), &ev) == 0);
  CHECK(eq(ev.epoch, "00112233aabbccdd") && ev.seq == 42 && ev.ts == 1700000000123);
  CHECK(eq(ev.category, "n\xc3\xa9ws") && eq(ev.id, id) && eq(ev.data_json, "{\"n\":1}"));
  /* a category with a space and a newline in it: its length says where it ends */
  snprintf(msg, sizeof msg, "E e 1 2 3\na \n%s1", id);
  CHECK(lp_redis_event_parse(msg, strlen(msg), &ev) == 0 && eq(ev.category, "a \n") && eq(ev.data_json, "1"));
  const char *bad[] = {"M t e 1 2 3",
                       "E e 1 2\n",
                       "E  1 2 3\nabc",
                       "E e x 2 3\nabc",
                       "E e 1 2 99\nabc",
                       "E e 1 2 1\na0b5f3d2e-7c1a-4e6b-9f00-123456789ab",
                       "E e 1 2 1\nazzzzzzzz-7c1a-4e6b-9f00-123456789abc1",
                       "E e 1 2 1\n\xff"
                       "0b5f3d2e-7c1a-4e6b-9f00-123456789abc1"};
  for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) CHECK(lp_redis_event_parse(bad[i], strlen(bad[i]), &ev) == -1);
  report("redis publish: the event message on pub/sub, and malformed ones", ok);
}

int main(void) {
  test_command();
  test_replies();
  test_partial_and_broken();
  test_publish_call();
  test_publish_reply();
  test_event_message();
  printf("1..%d\n", test_no);
  return failures ? 1 : 0;
}
