/* cache_model: lp_cache against a model of Redis, driven by a program of bytes (tests/test_cache.c
 * runs seeded programs, fuzz/fuzz_cache.c runs libFuzzer's). The model keeps Redis's streams in
 * an lp_store (the same buffer rule the scripts keep) and the node's pub/sub as a queue of
 * messages not delivered yet; the shard's handling of messages (gap, sync, new epoch) is
 * replayed as engine/redis/shard.lua does it. The oracle: whenever the cache answers a catch-up
 * with events, they are byte for byte what Redis would answer for that cursor now, and whenever
 * it says "wait", Redis has nothing after the cursor (and the position it waits from is not
 * beyond Redis's). Cursors come from every event Redis holds, delivered to the node or not (a
 * client may have seen them on another node).
 *
 * Polls parked on a WAIT (lp_cache_wait) are checked too: each is woken by the first event of its
 * categories that reaches the node after the position it parked at, with that event's answer,
 * once; none stays parked past such an event; a reset ends them.
 *
 * One exception is the design's, not a defect: a lost message is noticed when the next one
 * arrives (a gap in the sequence); until then answers are not checked. Pub/sub runs on TCP, so a
 * message is lost only with its connection, which the link reports at once (sync). */
#ifndef CACHE_MODEL_H
#define CACHE_MODEL_H

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lp_cache.h"
#include "lp_store.h"

#define CM_CATEGORIES 3
#define CM_LOG_MAX 4096
#define CM_QUEUE_MAX 4096
#define CM_PARKED_MAX 16

typedef struct cm_event {
  int64_t ts, seq;
  int cat;
  char id[LP_UUID_LEN + 1];
  char data[24];
} cm_event;

struct cm_model;

/* A poll parked on the cache (the HTTP engine's, in the model). */
typedef struct cm_parked {
  lp_waiter w;
  struct cm_model *m;
  int parked;
  unsigned mask; /* its categories */
  lp_cache_pos cursor;
  uint64_t handle;
} cm_parked;

typedef struct cm_model {
  lp_cache *cache;
  cm_parked parked[CM_PARKED_MAX];
  const cm_event *delivering; /* the event lp_cache_add is being handed */
  uint64_t checked_wakes;
  lp_store *redis; /* Redis's streams, this epoch */
  size_t bufsize;
  int epoch;
  int64_t ts, seq; /* Redis's newest position */
  uint64_t next_id;
  cm_event log[CM_LOG_MAX]; /* every event of this epoch, for cursors */
  size_t nlog;
  cm_event queue[CM_QUEUE_MAX]; /* published, not yet delivered to the node */
  size_t qhead, qlen;
  /* the shard's state */
  int has_msg_seq;
  int64_t msg_seq;
  int from_next_message;
  int lost_unnoticed; /* a message was lost and no later one arrived yet */
  lp_buf got, want;
  const char *failure; /* set when the oracle disagrees */
  uint64_t checked_events, checked_waits, misses;
} cm_model;

static const char *const cm_names[CM_CATEGORIES] = {"a", "b", "c"};

/* Whether event e comes after a parked poll's position and is one of its categories. */
static int cm_is_new_to(const cm_parked *p, const cm_event *e, const char *epoch) {
  if (!(p->mask & (1u << e->cat))) return 0;
  if (strcmp(p->cursor.epoch, epoch) != 0) return 1;
  return e->ts > p->cursor.ts || (e->ts == p->cursor.ts && e->seq > p->cursor.seq);
}

static void cm_epoch(const struct cm_model *m, char *out, size_t n);

static void cm_woken(lp_waiter *w, const lp_slice *answer, size_t n) {
  cm_parked *p = (cm_parked *)w;
  struct cm_model *m = p->m;
  const cm_event *e = m->delivering;
  char epoch[32];
  cm_epoch(m, epoch, sizeof epoch);
  p->parked = 0;
  if (!e || !cm_is_new_to(p, e, epoch)) {
    m->failure = "a parked poll was woken by an event it must not get";
    return;
  }
  lp_buf want = LP_BUF_INIT, got = LP_BUF_INIT;
  lp_buf_append_str(&want, "{\"events\":[");
  lp_event_json_append(&want, (lp_slice){cm_names[e->cat], strlen(cm_names[e->cat])},
                       (lp_slice){e->data, strlen(e->data)}, e->id, e->ts);
  lp_buf_append_str(&want, "]}");
  for (size_t i = 0; i < n; i++) lp_buf_append(&got, answer[i].ptr, answer[i].len);
  if (got.len != want.len || memcmp(got.data, want.data, got.len) != 0)
    m->failure = "a parked poll's answer is not its event's";
  m->checked_wakes++;
  lp_buf_free(&want);
  lp_buf_free(&got);
}

static void cm_ended(lp_waiter *w) { ((cm_parked *)w)->parked = 0; }

static const lp_waiter_ops CM_PARKED_OPS = {.woken = cm_woken, .ended = cm_ended};

static lp_slice cm_slice(const char *s) { return (lp_slice){s, strlen(s)}; }

static void cm_epoch(const struct cm_model *m, char *out, size_t n) { snprintf(out, n, "epoch%d", m->epoch); }

static void cm_pos(const cm_model *m, int64_t ts, int64_t seq, lp_cache_pos *p) {
  char e[32];
  cm_epoch(m, e, sizeof e);
  lp_cache_pos_set(p, e, strlen(e), ts, seq);
}

static lp_store *cm_new_redis(size_t bufsize) {
  lp_store_config sc;
  memset(&sc, 0, sizeof sc);
  sc.max_event_buffer_size = bufsize;
  sc.max_category_bytes = 1024;
  return lp_store_new(&sc);
}

/* max_categories 0 or more; bufsize >= 1. Returns 0 when memory ran out. */
static int cm_init(cm_model *m, size_t bufsize, size_t max_categories) {
  memset(m, 0, sizeof *m);
  m->bufsize = bufsize;
  lp_cache_config cfg = {bufsize, 1024, max_categories, 0};
  m->cache = lp_cache_new(&cfg);
  m->redis = cm_new_redis(bufsize);
  m->ts = 1000;
  return m->cache && m->redis;
}

static void cm_free(cm_model *m) {
  lp_cache_free(m->cache);
  lp_store_free(m->redis);
  lp_buf_free(&m->got);
  lp_buf_free(&m->want);
}

/* The link came (back): pub/sub was lost (the cache dropped), then the sync's mark started it at
 * Redis's position; what was in flight is gone. */
static void cm_sync(cm_model *m) {
  lp_cache_reset(m->cache, 1);
  m->qhead = m->qlen = 0;
  m->has_msg_seq = 1; /* the mark's seq: a gap right after it shows too */
  m->msg_seq = m->seq;
  m->from_next_message = 0;
  m->lost_unnoticed = 0;
  lp_cache_pos p;
  cm_pos(m, m->ts, m->seq, &p);
  lp_cache_start(m->cache, &p);
}

/* Redis lost its data: a new epoch, empty streams, timestamps go on. The node learns it (its
 * next message or reply) and drops its cache; the next message starts it. */
static void cm_restart(cm_model *m) {
  lp_store_free(m->redis);
  m->redis = cm_new_redis(m->bufsize);
  m->epoch++;
  m->seq = 0;
  m->nlog = 0;
  m->qhead = m->qlen = 0;
  m->has_msg_seq = 0;
  m->lost_unnoticed = 0;
  lp_cache_reset(m->cache, 1);
  m->from_next_message = 1;
}

static void cm_publish(cm_model *m, int cat, int64_t dt) {
  if (m->nlog == CM_LOG_MAX || m->qlen == CM_QUEUE_MAX || !m->redis) return;
  cm_event e;
  memset(&e, 0, sizeof e);
  m->ts += dt;
  e.ts = m->ts;
  e.seq = ++m->seq;
  e.cat = cat;
  uint64_t n = ++m->next_id;
  snprintf(e.id, sizeof e.id, "00000000-0000-4000-8000-%012" PRIx64, n);
  snprintf(e.data, sizeof e.data, "%" PRIu64, n);
  lp_published p;
  if (lp_store_restore(m->redis, cm_slice(cm_names[cat]), cm_slice(e.data), e.id, e.ts, &p) != LP_OK) {
    m->failure = "the Redis model refused an event";
    return;
  }
  m->log[m->nlog++] = e;
  m->queue[(m->qhead + m->qlen++) % CM_QUEUE_MAX] = e;
}

/* The next message reaches the node: the shard's _on_event_message. */
static void cm_deliver(cm_model *m) {
  if (m->qlen == 0) return;
  cm_event e = m->queue[m->qhead];
  m->qhead = (m->qhead + 1) % CM_QUEUE_MAX;
  m->qlen--;
  if (m->has_msg_seq && e.seq > m->msg_seq + 1) { /* a gap: every waiter reads, the cache drops */
    lp_cache_reset(m->cache, 1);
    m->from_next_message = 1;
  }
  m->lost_unnoticed = 0;
  if (!m->has_msg_seq || e.seq > m->msg_seq) {
    m->has_msg_seq = 1;
    m->msg_seq = e.seq;
  }
  lp_cache_pos p;
  if (m->from_next_message) {
    m->from_next_message = 0;
    cm_pos(m, e.ts, e.seq - 1, &p);
    lp_cache_start(m->cache, &p);
  }
  cm_pos(m, e.ts, e.seq, &p);
  m->delivering = &e;
  if (lp_cache_add(m->cache, &p, cm_slice(cm_names[e.cat]), e.id, cm_slice(e.data)) != LP_OK)
    m->failure = "the cache refused an event";
  m->delivering = NULL;
  char epoch[32];
  cm_epoch(m, epoch, sizeof epoch);
  for (int i = 0; i < CM_PARKED_MAX; i++)
    if (m->parked[i].parked && cm_is_new_to(&m->parked[i], &e, epoch))
      m->failure = "a parked poll missed an event of its categories";
}

/* A parked poll's client leaves. */
static void cm_leave(cm_model *m, unsigned a) {
  cm_parked *p = &m->parked[a % CM_PARKED_MAX];
  if (!p->parked) return;
  if (lp_cache_cancel(m->cache, p->handle) != 1) m->failure = "a parked poll's wait was gone";
  p->parked = 0;
}

static void cm_lose(cm_model *m) {
  if (m->qlen == 0) return;
  m->qhead = (m->qhead + 1) % CM_QUEUE_MAX;
  m->qlen--;
  m->lost_unnoticed = 1;
}

/* A client's cursor from two bytes: the since of an event Redis holds (or held), moved by -1, 0
 * or +1, or one of the ends; a last_id that is that event's, another's or none. */
static void cm_cursor(const cm_model *m, unsigned a, unsigned b, int64_t *since, const char **last_id) {
  *last_id = NULL;
  if (m->nlog == 0 || a % 8 == 7) {
    *since = (a & 1) ? -1 : m->ts + 1;
    return;
  }
  const cm_event *e = &m->log[(a / 8 + (size_t)b * 31) % m->nlog];
  *since = e->ts + (int64_t)(b % 3) - 1;
  if (b % 5 == 0) *since = e->ts;
  if (b % 4 == 1 || b % 5 == 0) *last_id = e->id;
  if (b % 4 == 2) *last_id = m->log[(size_t)b % m->nlog].id;
  if (b % 4 == 3 && a % 3 == 0) *last_id = "ffffffff-ffff-4fff-bfff-ffffffffffff";
}

/* A read of one category from Redis, as waiters.lua does it for a first catch-up: the cache may
 * keep what it returned. */
typedef struct cm_read {
  lp_cache_event ev[CM_LOG_MAX];
  char ids[CM_LOG_MAX][LP_UUID_LEN + 1];
  size_t n;
} cm_read;

static int cm_collect(void *ctx, const lp_event_view *e) {
  cm_read *r = ctx;
  if (r->n == CM_LOG_MAX) return 1;
  memcpy(r->ids[r->n], e->id, LP_UUID_LEN + 1);
  r->ev[r->n].ts = e->timestamp;
  r->ev[r->n].id = r->ids[r->n];
  /* data: the event JSON's "data" value, found in the model's log by id */
  r->ev[r->n].data_json = cm_slice("null");
  r->n++;
  return 0;
}

static void cm_warm(cm_model *m, int cat, unsigned a, unsigned b) {
  static cm_read r;
  int64_t since;
  const char *last_id;
  cm_cursor(m, a, b, &since, &last_id);
  r.n = 0;
  size_t count = 0;
  int missed = 0;
  lp_slice c = cm_slice(cm_names[cat]);
  if (lp_store_fetch_each(m->redis, &c, 1, since, last_id, 0, cm_collect, &r, &count, &missed) != LP_OK) return;
  for (size_t i = 0; i < r.n; i++) /* the data of each event, from the log */
    for (size_t k = 0; k < m->nlog; k++)
      if (strcmp(m->log[k].id, r.ids[i]) == 0) r.ev[i].data_json = cm_slice(m->log[k].data);
  lp_cache_pos p;
  cm_pos(m, m->ts, m->seq, &p);
  lp_cache_warm(m->cache, c, since, r.ev, r.n, missed, &p);
}

/* Redis as it was when its newest position was (this epoch's) seq: a store of the log's events
 * up to it. NULL when memory ran out. */
static lp_store *cm_redis_at(const cm_model *m, int64_t seq) {
  lp_store *s = cm_new_redis(m->bufsize);
  for (size_t i = 0; s && i < m->nlog && m->log[i].seq <= seq; i++) {
    lp_published p;
    const cm_event *e = &m->log[i];
    if (lp_store_restore(s, cm_slice(cm_names[e->cat]), cm_slice(e->data), e->id, e->ts, &p) != LP_OK) {
      lp_store_free(s);
      return NULL;
    }
  }
  return s;
}

/* The HTTP engine parks a poll the cache said wait to, from cursor. */
static void cm_park(cm_model *m, const lp_slice *cats, size_t n, const lp_cache_pos *cursor, unsigned slot) {
  cm_parked *p = &m->parked[slot % CM_PARKED_MAX];
  if (p->parked) return;
  p->w.ops = &CM_PARKED_OPS;
  p->m = m;
  p->mask = 0;
  for (size_t i = 0; i < n; i++) p->mask |= 1u << (unsigned)(cats[i].ptr[0] - 'a');
  p->cursor = *cursor;
  if (lp_cache_wait(m->cache, cats, n, &p->w, &p->handle) == LP_OK)
    p->parked = 1;
  else
    m->failure = "a valid cache refused a parked poll";
}

static void cm_answer(cm_model *m, unsigned mask, unsigned a, unsigned b) {
  lp_slice cats[CM_CATEGORIES];
  size_t n = 0;
  for (int i = 0; i < CM_CATEGORIES; i++)
    if (mask & (1u << i)) cats[n++] = cm_slice(cm_names[i]);
  if (n == 0) cats[n++] = cm_slice(cm_names[a % CM_CATEGORIES]);
  int64_t since;
  const char *last_id;
  cm_cursor(m, a, b, &since, &last_id);
  lp_buf_reset(&m->got);
  lp_cache_pos cursor;
  /* a poll without a cursor, now and then: it waits from the cache's position */
  int from_now = b % 5 == 4;
  int r = from_now ? lp_cache_now(m->cache, cats, n, &cursor)
                   : lp_cache_answer(m->cache, cats, n, since, last_id, &m->got, &cursor);
  if (r == LP_CACHE_MISS) {
    m->misses++;
    return;
  }
  if (m->lost_unnoticed) return;
  char e[32];
  cm_epoch(m, e, sizeof e);
  if (strcmp(cursor.epoch, e) != 0 || cursor.ts > m->ts || (cursor.ts == m->ts && cursor.seq > m->seq)) {
    m->failure = "the cache knows a position beyond Redis's";
    return;
  }
  if (from_now) {
    /* every event of these categories up to the cursor reached the node (none of them is after
     * it in the cache), and a parked poll is checked to get the first one after it */
    if (r != LP_CACHE_WAIT) m->failure = "lp_cache_now answered events";
    m->checked_waits++;
    cm_park(m, cats, n, &cursor, a + b);
    return;
  }
  /* the answer must be Redis's as of the position the cache knows everything up to: events
   * after it reach the node by pub/sub, and a waiter gets them */
  lp_store *then = cm_redis_at(m, cursor.seq);
  if (!then) {
    m->failure = "out of memory in the model";
    return;
  }
  lp_buf_reset(&m->want);
  size_t count = 0;
  int missed = 0;
  int rc = lp_store_fetch(then, cats, n, since, last_id, 0, &m->want, &count, &missed);
  lp_store_free(then);
  if (rc != LP_OK) {
    m->failure = "the Redis model's fetch failed";
  } else if (r == LP_CACHE_EVENTS) {
    m->checked_events++;
    if (count == 0)
      m->failure = "the cache answered events where Redis had none";
    else if (m->got.len != m->want.len || memcmp(m->got.data, m->want.data, m->got.len) != 0)
      m->failure = "the cache's answer differs from Redis's";
  } else {
    m->checked_waits++;
    if (count != 0) m->failure = "the cache said wait where Redis had events";
    /* the HTTP engine parks such a poll */
    if (b % 2 == 0) cm_park(m, cats, n, &cursor, a + b);
  }
}

/* Runs one step of the program at p (3 bytes). */
static void cm_step(cm_model *m, const unsigned char *p) {
  unsigned op = p[0] % 16;
  if (op < 5) {
    cm_publish(m, (int)(p[1] % CM_CATEGORIES), (int64_t)(p[2] % 3));
  } else if (op < 9) {
    cm_deliver(m);
  } else if (op == 9) {
    if (p[1] % 4 == 0)
      cm_lose(m);
    else
      cm_deliver(m);
  } else if (op == 10) {
    if (p[1] % 16 == 15)
      cm_leave(m, p[2]);
    else if (p[1] % 8 == 0)
      cm_restart(m);
    else if (p[1] % 8 == 1)
      cm_sync(m);
    else
      cm_warm(m, (int)(p[1] % CM_CATEGORIES), p[1], p[2]);
  } else {
    cm_answer(m, p[0] >> 4, p[1], p[2]);
  }
}

#endif
