/* fuzz_keys: libFuzzer harness for lp_keys, the table of Idempotency-Keys. The input is a
 * program (a first byte of configuration, then 3 bytes per step: begin, commit, abort, expire,
 * a key check) run against a reference kept as a plain list, oldest first, with the same rules
 * (spec/idempotency_spec.lua's reference, in C): every answer, prior event and figure must agree. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lp_keys.h"

#define REF_MAX 4096

typedef struct ref_rec {
  char key[64], fp[8], id[24];
  size_t key_len, cost;
  int64_t exp, ts;
  int live, has_id;
  uint64_t ticket; /* the table's */
} ref_rec;

typedef struct ref {
  ref_rec recs[REF_MAX];
  size_t head, n; /* recs[head .. n) are still in the list */
  size_t max_keys, max_bytes;
  int64_t window;
  size_t count, bytes;
  uint64_t replays, conflicts, evicted;
} ref;

static void fail(const char *what) {
  fprintf(stderr, "fuzz_keys: invariant failed: %s\n", what);
  abort();
}

static void ref_forget(ref *r, ref_rec *e) {
  e->live = 0;
  r->count--;
  r->bytes -= e->cost;
}

static int ref_pop(ref *r) {
  ref_rec *e = &r->recs[r->head++];
  if (!e->live) return 0;
  ref_forget(r, e);
  return 1;
}

static void ref_expire(ref *r, int64_t now) {
  while (r->head < r->n && (!r->recs[r->head].live || r->recs[r->head].exp <= now)) ref_pop(r);
}

static ref_rec *ref_live(ref *r, const char *key, size_t len) {
  for (size_t i = r->head; i < r->n; i++)
    if (r->recs[i].live && r->recs[i].key_len == len && memcmp(r->recs[i].key, key, len) == 0) return &r->recs[i];
  return NULL;
}

static void check_stats(const ref *r, lp_keys *k) {
  lp_keys_stats st;
  lp_keys_get_stats(k, &st);
  if (st.keys != r->count || st.bytes != r->bytes) fail("live keys or bytes differ");
  if (st.replays != r->replays || st.conflicts != r->conflicts || st.evicted != r->evicted) fail("counters differ");
  if (st.keys > r->max_keys) fail("over max_keys");
}

/* idempotency.lua's check_key, written plainly. */
static int ref_check(const char *v, size_t n, size_t *off, size_t *len) {
  *off = 0;
  if (n >= 2 && v[0] == '"' && v[n - 1] == '"') {
    for (size_t i = 1; i + 1 < n; i++)
      if (v[i] == '"' || v[i] == '\\') return -1;
    *off = 1;
    n -= 2;
  }
  if (n < 1 || n > 255) return -1;
  for (size_t i = 0; i < n; i++)
    if ((unsigned char)v[*off + i] < 32 || (unsigned char)v[*off + i] > 126) return -1;
  *len = n;
  return 0;
}

int LLVMFuzzerTestOneInput(const unsigned char *data, size_t size) {
  static ref r;
  if (size < 1) return 0;
  memset(&r, 0, sizeof r);
  r.max_keys = 1 + data[0] % 16;
  r.max_bytes = 240 + (size_t)(data[0] >> 4) * 120;
  r.window = 1 + data[0] % 64;
  lp_keys *k = lp_keys_new(r.max_keys, r.max_bytes, r.window);
  if (!k) return 0;
  int64_t now = 0;
  for (size_t i = 1; i + 3 <= size && r.n < REF_MAX; i += 3) {
    unsigned op = data[i] % 8, a = data[i + 1], b = data[i + 2];
    if (op < 4) {
      now += b % 4;
      char key[64];
      size_t len = (size_t)snprintf(key, sizeof key, "k%u", a % 24);
      size_t pad = (b >> 2) % 3 * 20;
      memset(key + len, 'x', pad);
      len += pad;
      const char *fp = b % 5 == 0 ? "other" : "fp";
      lp_slice ks = {key, len}, fs = {fp, strlen(fp)};
      uint64_t ticket;
      lp_keys_prior prior;
      int got = lp_keys_begin(k, ks, fs, now, &ticket, &prior);
      ref_expire(&r, now);
      ref_rec *e = ref_live(&r, key, len);
      if (e) {
        if (strcmp(e->fp, fp) != 0) {
          r.conflicts++;
          if (got != LP_KEYS_MISMATCH) fail("a mismatch not seen");
        } else if (!e->has_id) {
          if (got != LP_KEYS_BUSY) fail("a busy key not seen");
        } else {
          r.replays++;
          if (got != LP_KEYS_REPLAY) fail("a replay not seen");
          if (prior.id.len != strlen(e->id) || memcmp(prior.id.ptr, e->id, prior.id.len) != 0 || prior.timestamp != e->ts)
            fail("a replay names another event");
        }
      } else {
        if (got == LP_KEYS_NOMEM) continue;
        if (got != LP_KEYS_NEW) fail("a new key not taken");
        size_t cost = len + strlen(fp) + 36 + LP_KEYS_RECORD_COST;
        while ((r.count + 1 > r.max_keys || r.bytes + cost > r.max_bytes) && r.head < r.n)
          if (ref_pop(&r)) r.evicted++;
        e = &r.recs[r.n++];
        memset(e, 0, sizeof *e);
        memcpy(e->key, key, len);
        e->key_len = len;
        strcpy(e->fp, fp);
        e->exp = now + r.window;
        e->cost = cost;
        e->live = 1;
        e->ticket = ticket;
        r.count++;
        r.bytes += cost;
      }
    } else if (op < 6) {
      /* the commit or abort of a record begun earlier, live or not (a late one changes nothing) */
      if (r.n == 0) continue;
      ref_rec *e = &r.recs[r.n - 1 - a % (r.n < 8 ? r.n : 8)];
      if (e->has_id) continue;
      lp_slice ks = {e->key, e->key_len};
      if (op == 4) {
        char id[24];
        size_t idlen = (size_t)snprintf(id, sizeof id, "id%zu", i);
        if (lp_keys_commit(k, e->ticket, ks, (lp_slice){id, idlen}, (int64_t)i) != 0) continue;
        if (e->live) {
          strcpy(e->id, id);
          e->ts = (int64_t)i;
          e->has_id = 1;
        }
      } else {
        lp_keys_abort(k, e->ticket, ks);
        if (e->live) ref_forget(&r, e);
      }
    } else if (op == 6) {
      now += b % 8;
      lp_keys_expire(k, now);
      ref_expire(&r, now);
    } else {
      /* a key check of the input's next bytes */
      size_t n = a % 8 < size - i ? a % 8 : size - i;
      lp_slice key;
      size_t off, len;
      int want = ref_check((const char *)data + i, n, &off, &len);
      int got = lp_keys_check((lp_slice){(const char *)data + i, n}, &key);
      if (got != want) fail("key checks differ");
      if (got == 0 && (key.ptr != (const char *)data + i + off || key.len != len)) fail("another key");
    }
    check_stats(&r, k);
  }
  lp_keys_free(k);
  return 0;
}
