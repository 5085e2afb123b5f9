/* fuzz_store: libFuzzer harness for lp_store. The input is a small program of
 * store operations run against a fake clock that can step back; a model kept
 * here predicts every answer, and the contract's invariants are checked on
 * their own as well, so a failure says which promise broke. */
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lp_json.h"
#include "lp_store.h"

#define CHECK(cond)                                                                     \
  do {                                                                                  \
    if (!(cond)) {                                                                      \
      fprintf(stderr, "fuzz_store: invariant failed: %s (line %d)\n", #cond, __LINE__); \
      abort();                                                                          \
    }                                                                                   \
  } while (0)

/* ---- allocation failures: malloc, calloc and realloc go through these
 * (build.sh links fuzz_store with -Wl,--wrap=...), so a program can make one
 * allocation inside a store call fail and check what the store does then ---- */

void *__real_malloc(size_t n);
void *__real_calloc(size_t n, size_t size);
void *__real_realloc(void *p, size_t n);

static int alloc_armed;           /* only inside store calls, never in the harness's own code */
static long alloc_countdown = -1; /* allocations to let through before the one that fails */
static int alloc_failed;

static int fail_now(void) {
  if (!alloc_armed || alloc_countdown < 0) return 0;
  if (alloc_countdown-- > 0) return 0;
  alloc_failed = 1;
  return 1;
}

void *__wrap_malloc(size_t n) { return fail_now() ? NULL : __real_malloc(n); }
void *__wrap_calloc(size_t n, size_t size) { return fail_now() ? NULL : __real_calloc(n, size); }
void *__wrap_realloc(void *p, size_t n) { return fail_now() ? NULL : __real_realloc(p, n); }

/* ---- program input ---- */

typedef struct input {
  const uint8_t *p;
  size_t left;
} input;

static unsigned take(input *in) {
  if (in->left == 0) return 0;
  in->left--;
  return *in->p++;
}

static uint64_t take64(input *in) {
  uint64_t v = 0;
  for (int i = 0; i < 8; i++) v = (v << 8) | take(in);
  return v;
}

/* ---- names and data (each in an allocation of its exact size, so ASan sees
 * any read past a slice) ---- */

#define NFIXED 10
#define NGENERATED 128 /* "g0".."g127": enough categories to grow and shrink the hash table */
#define NNAMES (NFIXED + NGENERATED)

static const char *const fixed_names[NFIXED] = {
    "a",
    "b",
    "news",
    "\xc3\xa9t\xc3\xa9" /* "été" */,
    "" /* empty */,
    "\xff" /* invalid UTF-8 */,
    "\xed\xa0\x80" /* a surrogate */,
    "abcdefgh" /* 8 bytes: valid for some limits */,
    "toolongcategory" /* longer than any limit here */,
    "\xc3" /* truncated sequence */,
};

static const char *const data_texts[] = {
    "1", "null", "\"x\"", "{\"k\":[1,2.5e3,{}]}", "[]", "\"\\u00e9\\n\"", "true", "-0",
};
#define NDATA (sizeof data_texts / sizeof data_texts[0])

static lp_slice names[NNAMES];
static lp_slice datas[NDATA];

static lp_slice exact_copy(const char *s, size_t n) {
  char *p = malloc(n ? n : 1);
  CHECK(p);
  memcpy(p, s, n);
  return (lp_slice){p, n};
}

static void init_tables(void) {
  static int done;
  if (done) return;
  done = 1;
  for (int i = 0; i < NFIXED; i++) names[i] = exact_copy(fixed_names[i], strlen(fixed_names[i]));
  for (int i = 0; i < NGENERATED; i++) {
    char t[8];
    int n = snprintf(t, sizeof t, "g%d", i);
    names[NFIXED + i] = exact_copy(t, (size_t)n);
  }
  for (size_t i = 0; i < NDATA; i++) datas[i] = exact_copy(data_texts[i], strlen(data_texts[i]));
}

static int pick_name(input *in) {
  unsigned b = take(in);
  return (b & 0x80) ? NFIXED + (int)(b & 0x7f) : (int)(b % NFIXED);
}

/* ---- the model ---- */

#define MAX_BUF 8

typedef struct mevent {
  int64_t ts;
  uint64_t seq; /* the store's */
  char id[LP_UUID_LEN + 1];
  int cat;
  int buffered;
  char *json;
  size_t json_len;
} mevent;

typedef struct mcat {
  int exists;
  int ev[MAX_BUF]; /* event indices, oldest first */
  size_t count;
  size_t links; /* waits on it (a subscription may wait on it more than once) */
  size_t bytes;
  int has_dropped;
  int64_t dropped_ts;
  uint64_t dropped_seq;
  char dropped_id[LP_UUID_LEN + 1];
} mcat;

typedef struct msub {
  uint64_t handle;
  uintptr_t owner; /* lp_store_wait_owned's owner (a made-up pointer), 0 for lp_store_wait */
  int live;
  int woken;
  size_t n;
  int cat[3];
} msub;

typedef struct model {
  lp_store_config cfg;
  lp_store *s;
  int64_t now;
  mcat cats[NNAMES];
  size_t ncats;
  mevent *ev;
  size_t nev, evcap;
  msub *subs;
  size_t nsubs, subcap;
  lp_store_stats st; /* what the stats must say */
  int64_t last_event_ts;
  uint64_t last_seq;
  int has_mark;
  int64_t max_mark;
  int degraded;  /* a publish ran out of memory part way: only consistency checks from here */
  int limits_on; /* per-category limits (name_limits) through cfg.category_limits */
  /* filled by the wake callback during one publish */
  uint64_t *woken;
  uintptr_t *woken_owner; /* what the wake callback was given with each handle */
  size_t nwoken, wokencap;
  uintptr_t next_owner;
} model;

/* Per-category limits, a function of the name only (so the store, asking once
 * when it makes a category, and the model, asking every time, agree): a
 * quarter of the names keep the defaults, the others get their own buffer size
 * (1..MAX_BUF), TTL (forever or 1..32 ms) or the other delete-after-first. */
static void name_limits(const lp_store_config *cfg, lp_slice n, lp_category_limits *lim) {
  lim->max_event_buffer_size = cfg->max_event_buffer_size;
  lim->event_ttl_ms = cfg->event_ttl_ms;
  lim->delete_after_first = cfg->delete_after_first;
  unsigned h = 7;
  for (size_t i = 0; i < n.len; i++) h = h * 31 + (unsigned char)n.ptr[i];
  switch (h % 4) {
    case 1: lim->max_event_buffer_size = 1 + (h / 4) % MAX_BUF; break;
    case 2: lim->event_ttl_ms = (h / 4) % 3 == 0 ? 0 : 1 + (int64_t)((h / 16) % 32); break;
    case 3: lim->delete_after_first = !cfg->delete_after_first; break;
    default: break;
  }
}

static void store_limits(void *ctx, lp_slice name, lp_category_limits *lim) {
  const model *m = ctx;
  name_limits(&m->cfg, name, lim);
}

/* The limits of category `name` as the store applies them. */
static lp_category_limits limits_of(const model *m, int name) {
  lp_category_limits lim = {m->cfg.max_event_buffer_size, m->cfg.event_ttl_ms, m->cfg.delete_after_first};
  if (m->limits_on) name_limits(&m->cfg, names[name], &lim);
  return lim;
}

static int name_rc(const model *m, int name) {
  lp_slice n = names[name];
  if (n.len == 0 || n.len > m->cfg.max_category_bytes) return LP_EINVAL;
  if (!lp_utf8_is_valid(n.ptr, n.len)) return LP_EUTF8;
  return LP_OK;
}

/* Categories with no events and no waiters do not exist (and forget drops). */
static void sweep(model *m) {
  for (int i = 0; i < NNAMES; i++) {
    mcat *c = &m->cats[i];
    if (c->exists && c->count == 0 && c->links == 0) {
      memset(c, 0, sizeof *c);
      m->ncats--;
    }
  }
  m->st.categories = m->ncats;
}

static void create_cat(model *m, int name) {
  if (m->cats[name].exists) return;
  memset(&m->cats[name], 0, sizeof m->cats[name]);
  m->cats[name].exists = 1;
  m->ncats++;
}

static void forget(model *m, int e) {
  mevent *v = &m->ev[e];
  mcat *c = &m->cats[v->cat];
  v->buffered = 0;
  c->bytes -= v->json_len;
  m->st.events--;
  m->st.event_bytes -= v->json_len;
}

static void drop_oldest(model *m, int name) {
  mcat *c = &m->cats[name];
  int e = c->ev[0];
  memmove(c->ev, c->ev + 1, (c->count - 1) * sizeof c->ev[0]);
  c->count--;
  c->has_dropped = 1;
  c->dropped_ts = m->ev[e].ts;
  c->dropped_seq = m->ev[e].seq;
  memcpy(c->dropped_id, m->ev[e].id, sizeof c->dropped_id);
  m->st.dropped++;
  forget(m, e);
}

static size_t model_expire(model *m, int64_t now) {
  size_t n = 0;
  for (int i = 0; i < NNAMES; i++) {
    int64_t ttl = limits_of(m, i).event_ttl_ms;
    if (ttl <= 0) continue;
    while (m->cats[i].count > 0 && now - m->ev[m->cats[i].ev[0]].ts >= ttl) {
      drop_oldest(m, i);
      n++;
    }
  }
  sweep(m);
  return n;
}

/* What max_buffered_bytes counts for category i holding `count` events of
 * `bytes` JSON bytes: the formula of lp_store.h. */
static size_t cost_of(int i, size_t count, size_t bytes) {
  return count ? bytes + count * LP_EVENT_COST + LP_CATEGORY_COST + names[i].len : 0;
}

static size_t model_buffered_bytes(const model *m) {
  size_t total = 0;
  for (int i = 0; i < NNAMES; i++) total += cost_of(i, m->cats[i].count, m->cats[i].bytes);
  return total;
}

/* ---- checks against the store ---- */

typedef struct walk {
  const model *m;
  size_t seen;
} walk;

static void on_category(void *ctx, lp_slice name, size_t events, size_t bytes, size_t waiting) {
  walk *w = ctx;
  int found = -1;
  for (int i = 0; i < NNAMES; i++)
    if (names[i].len == name.len && memcmp(names[i].ptr, name.ptr, name.len) == 0) found = i;
  CHECK(found >= 0);
  const mcat *c = &w->m->cats[found];
  CHECK(c->exists);
  CHECK(events > 0 || waiting > 0); /* an unused category is freed at once */
  CHECK(events == c->count && bytes == c->bytes && waiting == c->links);
  /* owned waiters are counted apart */
  size_t unowned = 0;
  for (size_t i = 0; i < w->m->nsubs; i++) {
    const msub *sub = &w->m->subs[i];
    for (size_t k = 0; sub->live && !sub->owner && k < sub->n; k++) unowned += sub->cat[k] == found;
  }
  CHECK(lp_store_waiting_in(w->m->s, name) == c->links);
  CHECK(lp_store_unowned_waiting_in(w->m->s, name) == unowned);
  w->seen++;
}

static void check_stats(const model *m) {
  lp_store_stats st;
  lp_store_get_stats(m->s, &st);
  CHECK(st.categories == m->st.categories);
  CHECK(st.events == m->st.events);
  CHECK(st.event_bytes == m->st.event_bytes);
  CHECK(st.waiting == m->st.waiting);
  CHECK(st.published == m->st.published);
  CHECK(st.delivered == m->st.delivered);
  CHECK(st.dropped == m->st.dropped);
  CHECK(st.evicted == m->st.evicted);
  CHECK(st.buffered_bytes == model_buffered_bytes(m));
  CHECK(st.last_timestamp == m->st.last_timestamp);
  walk w = {m, 0};
  lp_store_each_category(m->s, on_category, &w);
  CHECK(w.seen == m->ncats);
}

static void on_wake(void *ctx, uint64_t handle, void *owner) {
  model *m = ctx;
  int armed = alloc_armed;
  alloc_armed = 0;
  /* The handle is already dead: a cancel from inside the callback is a no-op. */
  CHECK(lp_store_cancel(m->s, handle) == 0);
  if (m->nwoken == m->wokencap) {
    m->wokencap = m->wokencap ? 2 * m->wokencap : 16;
    m->woken = realloc(m->woken, m->wokencap * sizeof *m->woken);
    m->woken_owner = realloc(m->woken_owner, m->wokencap * sizeof *m->woken_owner);
    CHECK(m->woken && m->woken_owner);
  }
  m->woken_owner[m->nwoken] = (uintptr_t)owner;
  m->woken[m->nwoken++] = handle;
  alloc_armed = armed;
}

/* ---- operations ---- */

/* Ends the live subscriptions waiting on name, as a wake-up does, after
 * checking that the callback saw exactly those, each once. */
static size_t model_wake(model *m, int name) {
  size_t n = 0;
  for (size_t i = 0; i < m->nsubs; i++) {
    msub *sub = &m->subs[i];
    int waits_here = 0;
    for (size_t k = 0; k < sub->n; k++) waits_here |= sub->cat[k] == name;
    if (!sub->live || !waits_here) continue;
    n++;
    sub->woken = 0;
    for (size_t w = 0; w < m->nwoken; w++)
      if (m->woken[w] == sub->handle) {
        sub->woken++;
        CHECK(m->woken_owner[w] == sub->owner); /* the owner comes back with its handle */
      }
    CHECK(sub->woken == 1);
    sub->live = 0;
    for (size_t k = 0; k < sub->n; k++) m->cats[sub->cat[k]].links--;
    m->st.waiting--;
  }
  CHECK(m->nwoken == n); /* and so nothing else was woken */
  return n;
}

/* The length of an event's text, from the documented shape
 * {"timestamp":..,"category":..,"data":..,"id":".."}. */
static size_t event_len(int name, size_t d, int64_t ts) {
  char t[24];
  int n = snprintf(t, sizeof t, "%" PRId64, ts);
  lp_buf b = LP_BUF_INIT;
  CHECK(lp_json_append_string(&b, names[name].ptr, names[name].len) == 0);
  size_t len = strlen("{\"timestamp\":") + (size_t)n + strlen(",\"category\":") + b.len + strlen(",\"data\":") +
               datas[d].len + strlen(",\"id\":\"") + LP_UUID_LEN + strlen("\"}");
  lp_buf_free(&b);
  return len;
}

static void on_count(void *ctx, lp_slice name, size_t events, size_t bytes, size_t waiting) {
  (void)bytes, (void)waiting;
  size_t *counts = ctx;
  for (int i = 0; i < NNAMES; i++)
    if (names[i].len == name.len && memcmp(names[i].ptr, name.ptr, name.len) == 0) counts[i] = events;
}

/* With max_buffered_bytes, a publish first drops the oldest event of a
 * largest category (by cost) until the new one fits. Can that end with exactly plan[i]
 * drops from each category? Largest categories can tie and the store may
 * take any of them, so every such order is tried (drops per publish are few). */
static int room_feasible(const model *m, int name, size_t json_len, const size_t *plan, size_t *done, size_t *bytes,
                         size_t total) {
  int all_done = 1;
  for (int i = 0; i < NNAMES; i++) all_done &= done[i] == plan[i];
  size_t need = json_len + LP_EVENT_COST;
  if (m->cats[name].count == done[name]) need += LP_CATEGORY_COST + names[name].len;
  if (total + need <= m->cfg.max_buffered_bytes) return all_done;
  size_t max = 0;
  int any = 0;
  for (int i = 0; i < NNAMES; i++)
    if (m->cats[i].count > done[i]) {
      any = 1;
      size_t c = cost_of(i, m->cats[i].count - done[i], bytes[i]);
      if (c > max) max = c;
    }
  if (!any) return all_done;
  for (int i = 0; i < NNAMES; i++) {
    if (m->cats[i].count <= done[i] || done[i] >= plan[i]) continue;
    size_t before = cost_of(i, m->cats[i].count - done[i], bytes[i]);
    if (before != max) continue;
    size_t sz = m->ev[m->cats[i].ev[done[i]]].json_len;
    done[i]++, bytes[i] -= sz;
    size_t after_drop = cost_of(i, m->cats[i].count - done[i], bytes[i]);
    int ok = room_feasible(m, name, json_len, plan, done, bytes, total - (before - after_drop));
    done[i]--, bytes[i] += sz;
    if (ok) return 1;
  }
  return 0;
}

/* Learns which events the byte cap evicted for an event of `need` bytes into
 * category name, checks that the policy allows it, and applies it. */
static void model_make_room(model *m, int name, size_t need) {
  size_t counts[NNAMES] = {0}, plan[NNAMES] = {0}, done[NNAMES] = {0}, bytes[NNAMES];
  lp_store_each_category(m->s, on_count, counts);
  for (int i = 0; i < NNAMES; i++) {
    bytes[i] = m->cats[i].bytes;
    if (i == name) continue;
    CHECK(counts[i] <= m->cats[i].count);
    plan[i] = m->cats[i].count - counts[i];
  }
  /* In the publishing category a full ring drops one more after the cap's
   * drops; either may have taken its oldest event. */
  size_t count0 = m->cats[name].count, max = limits_of(m, name).max_event_buffer_size;
  int ok = 0;
  for (size_t d = 0; d <= count0 && !ok; d++) {
    size_t ring = count0 - d == max;
    if (count0 - d - ring + 1 != counts[name]) continue;
    plan[name] = d;
    ok = room_feasible(m, name, need, plan, done, bytes, model_buffered_bytes(m));
  }
  CHECK(ok); /* the cap evicted from a category that was not the largest, or too much */
  for (int i = 0; i < NNAMES; i++)
    for (size_t k = 0; k < plan[i]; k++) {
      drop_oldest(m, i);
      m->st.evicted++;
    }
}

static void op_publish(model *m, input *in) {
  int name = pick_name(in);
  size_t d = take(in) % NDATA;
  model_expire(m, m->now);
  int want = name_rc(m, name);
  if (want == LP_OK && !m->cats[name].exists && m->cfg.max_categories && m->ncats >= m->cfg.max_categories)
    want = LP_ECATEGORIES;
  size_t links = m->cats[name].exists ? m->cats[name].links : 0;
  int buffered = !(limits_of(m, name).delete_after_first && links > 0);
  lp_published p;
  m->nwoken = 0;
  alloc_armed = 1;
  int rc = lp_store_publish(m->s, names[name], datas[d], m->now, on_wake, m, &p);
  alloc_armed = 0;
  CHECK(rc != LP_ENOMEM || alloc_failed);
  if (rc == LP_ENOMEM) {
    /* Which drops happened before the failure is not observable one by one;
     * the rest of the program only checks that the store is consistent. */
    CHECK(m->nwoken == 0);
    m->degraded = 1;
    return;
  }
  if (rc == LP_ETOOBIG) {
    /* refused by the byte cap: nothing changes but the clock */
    lp_store_stats st;
    lp_store_get_stats(m->s, &st);
    CHECK(want == LP_OK && buffered && m->cfg.max_buffered_bytes);
    CHECK(event_len(name, d, st.last_timestamp) + LP_EVENT_COST + LP_CATEGORY_COST + names[name].len >
          m->cfg.max_buffered_bytes);
    CHECK(st.last_timestamp >= m->now && st.last_timestamp >= m->st.last_timestamp);
    CHECK(!m->has_mark || st.last_timestamp > m->max_mark);
    CHECK(m->nwoken == 0);
    m->st.last_timestamp = st.last_timestamp;
    return;
  }
  CHECK(rc == want);
  if (rc != LP_OK) {
    CHECK(m->nwoken == 0);
    return;
  }
  /* time: never back, never before now, always after every timeout mark */
  CHECK(p.timestamp >= m->now);
  CHECK(m->st.published == 0 || p.timestamp >= m->last_event_ts);
  CHECK(p.timestamp >= m->st.last_timestamp);
  CHECK(!m->has_mark || p.timestamp > m->max_mark);
  CHECK(m->st.published == 0 || p.seq > m->last_seq);
  m->last_event_ts = p.timestamp;
  m->last_seq = p.seq;
  m->st.last_timestamp = p.timestamp;

  /* the event's text: valid JSON that decodes to what went in */
  const char *err;
  CHECK(p.json_len == event_len(name, d, p.timestamp));
  CHECK(!buffered || !m->cfg.max_buffered_bytes || p.json_len <= m->cfg.max_buffered_bytes);
  CHECK(lp_json_check(p.json, p.json_len, &err) == 0);
  lp_publish_body pb;
  CHECK(lp_json_parse_publish(p.json, p.json_len, &pb, &err) == 0);
  CHECK(pb.has_category && pb.category.len == names[name].len &&
        memcmp(pb.category.data, names[name].ptr, names[name].len) == 0);
  if (d == 1) {
    CHECK(!pb.has_data); /* null */
  } else {
    CHECK(pb.has_data && pb.data_len == datas[d].len && memcmp(pb.data, datas[d].ptr, datas[d].len) == 0);
  }
  lp_buf_free(&pb.category);
  CHECK(lp_uuid_is_valid(p.id, strlen(p.id)));
  CHECK(p.json_len > LP_UUID_LEN + 2 && memcmp(p.json + p.json_len - LP_UUID_LEN - 2, p.id, LP_UUID_LEN) == 0);
  for (size_t i = 0; i < m->nev; i++) CHECK(strcmp(m->ev[i].id, p.id) != 0);

  /* who is woken: every live subscription waiting on the category, once */
  create_cat(m, name);
  mcat *c = &m->cats[name];
  model_wake(m, name);

  CHECK(p.buffered == buffered);
  if (m->nev == m->evcap) {
    m->evcap = m->evcap ? 2 * m->evcap : 64;
    m->ev = realloc(m->ev, m->evcap * sizeof *m->ev);
    CHECK(m->ev);
  }
  int e = (int)m->nev++;
  mevent *v = &m->ev[e];
  v->ts = p.timestamp;
  v->seq = p.seq;
  memcpy(v->id, p.id, sizeof v->id);
  v->cat = name;
  v->buffered = buffered;
  v->json = malloc(p.json_len);
  CHECK(v->json);
  memcpy(v->json, p.json, p.json_len);
  v->json_len = p.json_len;
  if (buffered) {
    if (m->cfg.max_buffered_bytes) model_make_room(m, name, v->json_len);
    if (c->count == limits_of(m, name).max_event_buffer_size) drop_oldest(m, name);
    c->ev[c->count++] = e;
    c->bytes += v->json_len;
    m->st.events++;
    m->st.event_bytes += v->json_len;
    CHECK(!m->cfg.max_buffered_bytes || model_buffered_bytes(m) <= m->cfg.max_buffered_bytes);
  }
  m->st.published++;
  m->st.delivered += links;
  sweep(m);
}

static void op_wait(model *m, input *in) {
  unsigned b = take(in);
  size_t n = b % 8 == 7 ? 0 : 1 + b % 3;
  int cat[3], all[3];
  for (size_t i = 0; i < n; i++) all[i] = pick_name(in);
  lp_slice sl[3];
  int want = n == 0 ? LP_EINVAL : LP_OK;
  for (size_t i = 0; i < n; i++) {
    sl[i] = names[all[i]];
    if (want == LP_OK) want = name_rc(m, all[i]);
  }
  /* the store waits once on a category named twice: the model keeps the distinct ones */
  size_t nall = n;
  n = 0;
  for (size_t i = 0; i < nall; i++) {
    int dup = 0;
    for (size_t j = 0; j < n; j++) dup |= cat[j] == all[i];
    if (!dup) cat[n++] = all[i];
  }
  size_t linked = 0;
  if (want == LP_OK) {
    for (size_t i = 0; i < n; i++) {
      mcat *c = &m->cats[cat[i]];
      if (!c->exists && m->cfg.max_categories && m->ncats >= m->cfg.max_categories) {
        want = LP_ECATEGORIES;
        break;
      }
      create_cat(m, cat[i]);
      if (m->cfg.max_waiting_per_category && c->links >= m->cfg.max_waiting_per_category) {
        want = LP_EWAITERS;
        break;
      }
      c->links++;
      linked++;
    }
  }
  uint64_t handle = 0;
  uintptr_t owner = (b & 0x80) ? ++m->next_owner : 0; /* half the waits have an owner */
  alloc_armed = 1;
  int rc = lp_store_wait_owned(m->s, sl, nall, (void *)owner, &handle);
  alloc_armed = 0;
  CHECK(rc != LP_ENOMEM || alloc_failed);
  if (rc != LP_ENOMEM) CHECK(rc == want); /* out of memory: rolled back like any failure */
  if (rc != LP_OK) {
    for (size_t i = 0; i < linked; i++) m->cats[cat[i]].links--;
    sweep(m);
    return;
  }
  for (size_t i = 0; i < m->nsubs; i++) CHECK(!m->subs[i].live || m->subs[i].handle != handle);
  if (m->nsubs == m->subcap) {
    m->subcap = m->subcap ? 2 * m->subcap : 32;
    m->subs = realloc(m->subs, m->subcap * sizeof *m->subs);
    CHECK(m->subs);
  }
  msub *sub = &m->subs[m->nsubs++];
  memset(sub, 0, sizeof *sub);
  sub->handle = handle;
  sub->owner = owner;
  sub->live = 1;
  sub->n = n;
  memcpy(sub->cat, cat, n * sizeof cat[0]);
  m->st.waiting++;
  m->st.categories = m->ncats;
}

static void cancel_sub(model *m, msub *sub) {
  sub->live = 0;
  for (size_t k = 0; k < sub->n; k++) m->cats[sub->cat[k]].links--;
  m->st.waiting--;
  sweep(m);
}

static void op_cancel(model *m, input *in) {
  unsigned b = take(in);
  if (b % 4 == 0 || m->nsubs == 0) {
    /* a made-up handle; small generations and slots can hit a real one */
    uint64_t h = ((uint64_t)(take(in) % 4) << 32) | (take(in) % 8);
    msub *hit = NULL;
    for (size_t i = 0; i < m->nsubs; i++)
      if (m->subs[i].live && m->subs[i].handle == h) hit = &m->subs[i];
    alloc_armed = 1;
    int rc = lp_store_cancel(m->s, h);
    alloc_armed = 0;
    CHECK(rc == (hit != NULL));
    if (hit) cancel_sub(m, hit);
    return;
  }
  msub *sub = &m->subs[take(in) % m->nsubs];
  int live = sub->live;
  alloc_armed = 1;
  int rc = lp_store_cancel(m->s, sub->handle);
  alloc_armed = 0;
  CHECK(rc == live);
  if (live) cancel_sub(m, sub);
}

enum { RULE_EXCLUDED, RULE_INCLUDED, RULE_AFTER_SEQ };

static int after(int rule, int64_t since, uint64_t after_seq, int64_t ts, uint64_t seq) {
  if (ts != since) return ts > since;
  if (rule == RULE_EXCLUDED) return 0;
  if (rule == RULE_INCLUDED) return 1;
  return seq > after_seq;
}

/* lp_store_fetch_each's callback: the texts joined by commas, as in an answer. */
static int append_event_view(void *ctx, const lp_event_view *e) {
  lp_buf *b = ctx;
  return (b->len && lp_buf_append_char(b, ',')) || lp_buf_append(b, e->json, e->json_len);
}

static void op_fetch(model *m, input *in) {
  unsigned b = take(in);
  size_t n = b % 16 == 15 ? 0 : b % 16 == 14 ? 65 : 1 + b % 3;
  int cat[65];
  lp_slice sl[65];
  for (size_t i = 0; i < n; i++) {
    cat[i] = i < 3 ? pick_name(in) : cat[0];
    sl[i] = names[cat[i]];
  }

  /* the cursor: mostly near recorded events and marks, sometimes anything */
  int pick = m->nev ? (int)(take(in) % m->nev) : -1;
  int64_t since;
  switch (take(in) % 8) {
    case 0: since = 0; break;
    case 1:
    case 2: since = pick >= 0 ? m->ev[pick].ts : m->now; break;
    case 3: since = pick >= 0 ? m->ev[pick].ts - 1 : m->now - 1; break;
    case 4: since = pick >= 0 ? m->ev[pick].ts + 1 : m->now + 1; break;
    case 5: since = m->has_mark ? m->max_mark : m->now; break;
    case 6: since = (int64_t)take64(in); break;
    default: since = m->now; break;
  }
  const char *last_id = NULL;
  switch (take(in) % 5) {
    case 0: break;
    case 1:
    case 2: last_id = pick >= 0 ? m->ev[pick].id : NULL; break;
    case 3: last_id = m->nev ? m->ev[take(in) % m->nev].id : NULL; break;
    default: last_id = take(in) & 1 ? "00000000-0000-4000-8000-000000000000" : "not a uuid"; break;
  }

  model_expire(m, m->now);
  int want = (n == 0 || n > 64) ? LP_EINVAL : LP_OK;
  for (size_t i = 0; i < n && want == LP_OK; i++) want = name_rc(m, cat[i]);

  /* expected answer */
  int fetched[NNAMES] = {0};
  int rule = last_id ? RULE_INCLUDED : RULE_EXCLUDED;
  uint64_t after_seq = 0;
  int expect_missed = 0;
  size_t expect_count = 0;
  if (want == LP_OK) {
    for (size_t i = 0; i < n; i++)
      if (m->cats[cat[i]].exists && m->cats[cat[i]].count > 0) fetched[cat[i]] = 1;
    /* last_id counts as known when it is buffered in a fetched category at since */
    for (size_t e = 0; last_id && e < m->nev; e++)
      if (m->ev[e].buffered && fetched[m->ev[e].cat] && m->ev[e].ts == since && strcmp(m->ev[e].id, last_id) == 0)
        rule = RULE_AFTER_SEQ, after_seq = m->ev[e].seq;
    for (size_t e = 0; e < m->nev; e++)
      if (m->ev[e].buffered && fetched[m->ev[e].cat] && after(rule, since, after_seq, m->ev[e].ts, m->ev[e].seq))
        expect_count++;
    for (int i = 0; i < NNAMES; i++) {
      const mcat *c = &m->cats[i];
      if (!fetched[i] || !c->has_dropped) continue;
      if (rule == RULE_INCLUDED && c->dropped_ts == since && strcmp(c->dropped_id, last_id) == 0) continue;
      expect_missed |= after(rule, since, after_seq, c->dropped_ts, c->dropped_seq);
    }
    if (expect_count == 0) expect_missed = 0;
  }

  lp_buf out = LP_BUF_INIT;
  size_t prefix = take(in) % 3;
  CHECK(lp_buf_append(&out, "xyz", prefix) == 0); /* fetch appends */
  /* Streams' fetch first (it changes nothing but the delivered count unless
   * delete-after-first is on): the same events, in the same order. */
  lp_buf each = LP_BUF_INIT;
  size_t each_count = 99;
  int each_missed = 99, each_rc = LP_EINVAL - 100;
  int any_daf = 0;
  for (size_t i = 0; i < n; i++) any_daf |= limits_of(m, cat[i]).delete_after_first;
  if (!any_daf) {
    each_rc =
        lp_store_fetch_each(m->s, sl, n, since, last_id, m->now, append_event_view, &each, &each_count, &each_missed);
    CHECK(each_rc == want);
    if (each_rc == LP_OK) {
      CHECK(each_count == expect_count && each_missed == expect_missed);
      m->st.delivered += each_count;
    }
  }
  size_t count = 99;
  int missed = 99;
  alloc_armed = 1;
  int rc = lp_store_fetch(m->s, sl, n, since, last_id, m->now, &out, &count, &missed);
  alloc_armed = 0;
  CHECK(rc != LP_ENOMEM || alloc_failed);
  if (rc == LP_ENOMEM) {
    /* nothing was handed out or deleted, and out is as it was */
    CHECK(want == LP_OK && expect_count > 0);
    CHECK(count == 0 && missed == 0 && out.len == prefix);
    lp_buf_free(&out);
    lp_buf_free(&each);
    return;
  }
  CHECK(rc == want);
  if (rc != LP_OK || expect_count == 0) {
    CHECK(count == 0 && missed == 0 && out.len == prefix);
    lp_buf_free(&out);
    lp_buf_free(&each);
    return;
  }
  CHECK(count == expect_count && missed == expect_missed);
  CHECK(out.len > prefix && memcmp(out.data, "xyz", prefix) == 0);
  const char *ans = out.data + prefix;
  size_t len = out.len - prefix;
  const char *err;
  CHECK(lp_json_check(ans, len, &err) == 0);

  /* Walk the answer: each element must be one known event's text, in
   * strictly increasing publish order, buffered, in a fetched category and
   * after the cursor; the walk also proves the answer's exact shape. */
  static const char head[] = "{\"events\":[";
  CHECK(len >= sizeof head - 1 && memcmp(ans, head, sizeof head - 1) == 0);
  size_t at = sizeof head - 1;
  size_t got = 0;
  int prev = -1;
  int *handed = malloc(count * sizeof *handed);
  CHECK(handed);
  while (got < count) {
    if (got) {
      CHECK(at < len && ans[at] == ',');
      at++;
    }
    int found = -1;
    for (size_t e = 0; e < m->nev && found < 0; e++)
      if (m->ev[e].json_len <= len - at && memcmp(ans + at, m->ev[e].json, m->ev[e].json_len) == 0) found = (int)e;
    CHECK(found >= 0);
    const mevent *v = &m->ev[found];
    CHECK(found > prev); /* strictly increasing publish order */
    CHECK(v->buffered && fetched[v->cat]);
    /* the contract's rule, stated directly */
    if (v->ts == since) {
      CHECK(last_id != NULL);                                /* none == since without last_id */
      if (rule == RULE_AFTER_SEQ) CHECK(v->seq > after_seq); /* published after last_id */
    } else {
      CHECK(v->ts > since);
    }
    handed[got++] = found;
    prev = found;
    at += v->json_len;
  }
  const char *tail = missed ? "],\"missed\":true}" : "]}";
  CHECK(len - at == strlen(tail) && memcmp(ans + at, tail, len - at) == 0);
  if (each_rc == LP_OK)
    CHECK(each.len == at - (sizeof head - 1) && memcmp(each.data, ans + sizeof head - 1, each.len) == 0);
  lp_buf_free(&each);
  lp_buf_free(&out);

  m->st.delivered += count;
  if (any_daf) {
    for (size_t i = 0; i < count; i++) {
      mevent *v = &m->ev[handed[i]];
      mcat *c = &m->cats[v->cat];
      if (!limits_of(m, v->cat).delete_after_first) continue;
      CHECK(c->count > 0 && c->ev[c->count - 1] >= handed[i]); /* handed out from the newest end */
      size_t k = 0;
      while (c->ev[k] != handed[i]) k++;
      memmove(c->ev + k, c->ev + k + 1, (c->count - k - 1) * sizeof c->ev[0]);
      c->count--;
      forget(m, handed[i]);
    }
    sweep(m);
  }
  free(handed);
}

/* An event stored elsewhere arrived: its category's waiters are woken, nothing is stored. */
static void op_take_waiters(model *m, input *in) {
  int name = pick_name(in);
  int want = name_rc(m, name);
  size_t count = 99;
  m->nwoken = 0;
  alloc_armed = 1;
  int rc = lp_store_take_waiters(m->s, names[name], on_wake, m, &count);
  alloc_armed = 0;
  CHECK(rc == want);
  if (rc != LP_OK) {
    CHECK(count == 0 && m->nwoken == 0);
    return;
  }
  CHECK(count == model_wake(m, name));
  sweep(m);
}

/* The store closing under owned waiters: each ends, with its owner, once; the others stay. */
static void op_end_owned(model *m) {
  m->nwoken = 0;
  alloc_armed = 1;
  size_t n = lp_store_end_owned(m->s, on_wake, m);
  alloc_armed = 0;
  size_t want = 0;
  for (size_t i = 0; i < m->nsubs; i++) {
    msub *sub = &m->subs[i];
    if (!sub->live || !sub->owner) continue;
    want++;
    int seen = 0;
    for (size_t w = 0; w < m->nwoken; w++)
      if (m->woken[w] == sub->handle) {
        seen++;
        CHECK(m->woken_owner[w] == sub->owner);
      }
    CHECK(seen == 1);
    cancel_sub(m, sub);
  }
  CHECK(n == want && m->nwoken == want);
}

static void op_mark_time(model *m) {
  alloc_armed = 1;
  int64_t t = lp_store_mark_time(m->s, m->now);
  alloc_armed = 0;
  CHECK(t >= m->now);
  CHECK(m->st.published == 0 || t >= m->last_event_ts);
  CHECK(!m->has_mark || t >= m->max_mark);
  m->has_mark = 1;
  m->max_mark = t;
}

static void op_expire(model *m) {
  size_t want = model_expire(m, m->now);
  alloc_armed = 1;
  size_t got = lp_store_expire(m->s, m->now);
  alloc_armed = 0;
  CHECK(got == want);
}

/* Consistency of a store whose exact contents the model no longer knows:
 * the totals agree with the categories, and a fetch of everything returns
 * every buffered event as valid JSON. */
typedef struct totals {
  size_t categories, events, bytes, cost, links, with_events;
  lp_slice names[64];
  size_t nnames;
} totals;

static void on_total(void *ctx, lp_slice name, size_t events, size_t bytes, size_t waiting) {
  totals *t = ctx;
  CHECK(events > 0 || waiting > 0);
  t->categories++, t->events += events, t->bytes += bytes, t->links += waiting;
  if (events > 0) t->cost += bytes + events * LP_EVENT_COST + LP_CATEGORY_COST + name.len;
  if (events > 0) t->with_events++;
  /* copied: the names point into categories that a fetch may free */
  if (events > 0 && t->nnames < 64) t->names[t->nnames++] = exact_copy(name.ptr, name.len);
}

static void check_consistent(model *m) {
  totals t;
  memset(&t, 0, sizeof t);
  lp_store_each_category(m->s, on_total, &t);
  lp_store_stats st;
  lp_store_get_stats(m->s, &st);
  CHECK(st.categories == t.categories && st.events == t.events && st.event_bytes == t.bytes);
  CHECK(st.buffered_bytes == t.cost && st.evicted <= st.dropped);
  CHECK(!m->cfg.max_buffered_bytes || st.buffered_bytes <= m->cfg.max_buffered_bytes);
  CHECK(st.waiting <= t.links && (st.waiting > 0) == (t.links > 0));
  if (t.nnames == 0) return;
  lp_buf out = LP_BUF_INIT;
  size_t count;
  int missed;
  CHECK(lp_store_fetch(m->s, t.names, t.nnames, INT64_MIN, NULL, m->now, &out, &count, &missed) == LP_OK);
  if (t.with_events <= 64) CHECK(count == t.events);
  const char *err;
  CHECK(count > 0 && lp_json_check(out.data, out.len, &err) == 0);
  lp_buf_free(&out);
  for (size_t i = 0; i < t.nnames; i++) free((void *)t.names[i].ptr);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  init_tables();
  input in = {data, size};
  model *m = calloc(1, sizeof *m);
  CHECK(m);
  alloc_countdown = -1;
  alloc_failed = 0;
  unsigned b0 = take(&in), b1 = take(&in), b2 = take(&in), b3 = take(&in), b4 = take(&in);
  m->cfg.max_event_buffer_size = 1 + (b0 & 7);
  m->cfg.delete_after_first = (b0 >> 3) & 1;
  switch ((b0 >> 4) & 3) {
    case 2: m->cfg.event_ttl_ms = 1 + b1 % 16; break;
    case 3: m->cfg.event_ttl_ms = 1 + b1 % 256; break;
    default: m->cfg.event_ttl_ms = 0; break;
  }
  m->cfg.max_categories = (b2 & 3) == 3 ? 1 + ((b2 >> 2) & 7) : 0;
  m->limits_on = (b2 >> 5) & 1;
  if (m->limits_on) {
    m->cfg.category_limits = store_limits;
    m->cfg.category_limits_ctx = m;
  }
  m->cfg.max_waiting_per_category = (b3 & 3) == 3 ? 1 + ((b3 >> 2) & 3) : 0;
  m->cfg.max_category_bytes = 4 + ((b3 >> 4) & 7);
  /* An event's text is 90 to 130 bytes here, its cost with a category of
   * its own about 480 to 530: caps under that refuse every event, caps up
   * to 896 hold one or two, the large ones up to about 60. */
  if ((b4 & 3) == 3) {
    unsigned k = b4 >> 2;
    m->cfg.max_buffered_bytes = k < 32 ? 400 + 16 * k : 1000 + 512 * (k - 32);
  }
  m->s = lp_store_new(&m->cfg);
  CHECK(m->s);
  m->now = 1000000;
  check_stats(m);

  while (in.left > 0 && !m->degraded) {
    switch (take(&in) % 13) {
      case 0:
      case 1: op_publish(m, &in); break;
      case 2: op_wait(m, &in); break;
      case 3: op_cancel(m, &in); break;
      case 4:
      case 5: op_fetch(m, &in); break;
      case 6: op_mark_time(m); break;
      case 7: op_expire(m); break;
      case 8: m->now += take(&in) % 64; break; /* often 0: equal timestamps */
      case 9: {
        unsigned s = take(&in);
        if (s & 0x80)
          m->now -= 1 + s % 64; /* the wall clock steps back */
        else
          m->now += 1000 * (int64_t)s;
        break;
      }
      case 10: op_take_waiters(m, &in); break;
      case 11: op_end_owned(m); break;
      default:
        /* the k-th allocation in store calls from now on fails */
        alloc_countdown = take(&in) % 16;
        break;
    }
    /* A failure the store absorbed (a shrinking rehash) must change nothing. */
    alloc_failed = 0;
    if (!m->degraded) check_stats(m);
  }
  alloc_countdown = -1;

  /* Wind down: with every waiter gone and a TTL, far-future expiry empties the store. */
  for (size_t i = 0; i < m->nsubs; i++)
    if (m->subs[i].live) {
      CHECK(lp_store_cancel(m->s, m->subs[i].handle) == 1);
      cancel_sub(m, &m->subs[i]);
    }
  if (m->degraded) {
    check_consistent(m);
    lp_store_stats st;
    lp_store_get_stats(m->s, &st);
    CHECK(st.waiting == 0);
    m->now += (int64_t)1000000000000;
    lp_store_expire(m->s, m->now);
  } else {
    check_stats(m);
    m->now += (int64_t)1000000000000;
    op_expire(m);
    check_stats(m);
  }
  if (m->cfg.event_ttl_ms > 0 && !m->limits_on) {
    lp_store_stats st;
    lp_store_get_stats(m->s, &st);
    CHECK(st.categories == 0 && st.events == 0 && st.event_bytes == 0 && st.waiting == 0);
    CHECK(st.buffered_bytes == 0);
  }
  /* The end of time: a clock reading of INT64_MAX is clamped, and the cursor
   * arithmetic that follows (marks, timestamps, TTL) never overflows. */
  int64_t end = lp_store_mark_time(m->s, INT64_MAX);
  CHECK(end >= LP_TIME_MAX && end < INT64_MAX);
  lp_published last;
  int rc = lp_store_publish(m->s, names[0], datas[0], INT64_MAX, NULL, NULL, &last);
  if (rc == LP_OK) CHECK(last.timestamp > end && last.timestamp < INT64_MAX);
  lp_store_expire(m->s, INT64_MAX);
  CHECK(lp_store_mark_time(m->s, INT64_MIN) >= end);
  lp_store_free(m->s);
  for (size_t i = 0; i < m->nev; i++) free(m->ev[i].json);
  free(m->ev);
  free(m->subs);
  free(m->woken);
  free(m->woken_owner);
  free(m);
  return 0;
}
