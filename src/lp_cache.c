/* lp_cache: the node-local cache of a Redis stream and its coverage rule (see lp_cache.h). */
#include "lp_cache.h"

#include <stdlib.h>
#include <string.h>

#include "lp_json.h"
#include "lp_uuid.h"

/* How many ids of the newest millisecond are remembered; past it the others count as unseen
 * (a client naming one goes to Redis: slower, never wrong). */
#define LAST_MS_IDS_MAX 1024

/* The categories of one catch-up at most (a subscription's cap, lp_fast.h's). */
#define ANSWER_MAX_CATEGORIES 64

typedef struct entry {
  struct entry *next; /* hash chain */
  uint64_t hash;
  lp_store *store;   /* NULL: a category over max_categories, answered by Redis until the reset */
  int64_t hold_from; /* every event stamped hold_from or later is here */
  lp_cache_pos last; /* the newest event put here (or the position it started from) */
  size_t name_len;
  char name[];
} entry;

struct lp_cache {
  lp_cache_config cfg;
  entry **buckets;
  size_t nbuckets, nentries, categories; /* entries: with the full ones; categories: with a store */
  int valid;
  lp_cache_pos base, last;
  int64_t base_from;
  char (*ids)[LP_UUID_LEN + 1]; /* the ids of the events stamped last.ts */
  size_t nids;
  uint64_t hits, waits, misses, warmed, resets;
  /* the parked polls: an lp_store that only indexes who waits on which category (owned waits,
   * no events), what an event woke, and that event's JSON */
  lp_store *parked;
  lp_woken woken;
  lp_buf json;
  uint64_t nwoken, nended;
};

int lp_cache_pos_set(lp_cache_pos *p, const char *epoch, size_t epoch_len, int64_t ts, int64_t seq) {
  if (epoch_len > LP_CACHE_EPOCH_MAX) return LP_EINVAL;
  memcpy(p->epoch, epoch, epoch_len);
  p->epoch[epoch_len] = 0;
  p->epoch_len = epoch_len;
  p->ts = ts;
  p->seq = seq;
  return LP_OK;
}

static int same_epoch(const lp_cache_pos *a, const lp_cache_pos *b) {
  return a->epoch_len == b->epoch_len && memcmp(a->epoch, b->epoch, a->epoch_len) == 0;
}

/* Whether ev comes after cursor (position.lua's `after`). */
static int after(const lp_cache_pos *cursor, const lp_cache_pos *ev) {
  return !same_epoch(cursor, ev) || ev->ts > cursor->ts || (ev->ts == cursor->ts && ev->seq > cursor->seq);
}

static uint64_t hash_name(lp_slice s) {
  uint64_t h = 1469598103934665603ull;
  for (size_t i = 0; i < s.len; i++) h = (h ^ (unsigned char)s.ptr[i]) * 1099511628211ull;
  return h;
}

static entry *find(const lp_cache *c, lp_slice name, uint64_t h) {
  for (entry *e = c->buckets[h & (c->nbuckets - 1)]; e; e = e->next)
    if (e->hash == h && e->name_len == name.len && memcmp(e->name, name.ptr, name.len) == 0) return e;
  return NULL;
}

lp_cache *lp_cache_new(const lp_cache_config *cfg) {
  if (!cfg || cfg->max_event_buffer_size < 1 || cfg->max_category_bytes < 1) return NULL;
  lp_cache *c = calloc(1, sizeof *c);
  if (!c) return NULL;
  c->cfg = *cfg;
  c->nbuckets = 16;
  c->buckets = calloc(c->nbuckets, sizeof *c->buckets);
  c->ids = malloc(LAST_MS_IDS_MAX * sizeof *c->ids);
  lp_store_config wc;
  memset(&wc, 0, sizeof wc);
  wc.max_event_buffer_size = 1;
  wc.max_category_bytes = cfg->max_category_bytes;
  wc.max_waiting_per_category = cfg->max_waiting_per_category;
  c->parked = lp_store_new(&wc);
  if (!c->buckets || !c->ids || !c->parked) {
    lp_cache_free(c);
    return NULL;
  }
  return c;
}

static void drop_entries(lp_cache *c) {
  for (size_t i = 0; i < c->nbuckets; i++) {
    entry *e = c->buckets[i];
    while (e) {
      entry *next = e->next;
      lp_store_free(e->store);
      free(e);
      e = next;
    }
    c->buckets[i] = NULL;
  }
  c->nentries = c->categories = 0;
}

/* Ends every parked wait (its owner learns it: ended). */
static void end_parked(lp_cache *c) {
  if (c->parked) c->nended += lp_store_end_owned(c->parked, lp_waiter_end, NULL);
}

void lp_cache_free(lp_cache *c) {
  if (!c) return;
  end_parked(c);
  if (c->buckets) drop_entries(c);
  free(c->buckets);
  free(c->ids);
  lp_store_free(c->parked);
  lp_woken_free(&c->woken);
  lp_buf_free(&c->json);
  free(c);
}

void lp_cache_reset(lp_cache *c, int counted) {
  end_parked(c);
  drop_entries(c);
  c->valid = 0;
  c->nids = 0;
  if (counted) c->resets++;
}

void lp_cache_start(lp_cache *c, const lp_cache_pos *pos) {
  lp_cache_reset(c, 0);
  c->valid = 1;
  c->base = *pos;
  c->last = *pos;
  /* a Redis that never held an event (in this epoch): everything ever published reaches it */
  c->base_from = pos->seq == 0 ? INT64_MIN : pos->ts == INT64_MAX ? INT64_MAX : pos->ts + 1;
}

int lp_cache_is_valid(const lp_cache *c) { return c->valid; }

static int grow(lp_cache *c) {
  size_t n = c->nbuckets * 2;
  entry **b = calloc(n, sizeof *b);
  if (!b) return LP_ENOMEM;
  for (size_t i = 0; i < c->nbuckets; i++) {
    entry *e = c->buckets[i];
    while (e) {
      entry *next = e->next;
      e->next = b[e->hash & (n - 1)];
      b[e->hash & (n - 1)] = e;
      e = next;
    }
  }
  free(c->buckets);
  c->buckets = b;
  c->nbuckets = n;
  return LP_OK;
}

/* A new entry for category; *out is NULL (and LP_OK) when the cache keeps no more categories:
 * an entry without a store then marks it as Redis's until the next reset. */
static int new_entry(lp_cache *c, lp_slice name, uint64_t h, int64_t hold_from, const lp_cache_pos *last, entry **out) {
  *out = NULL;
  if (c->nentries >= c->nbuckets && grow(c) != LP_OK) return LP_ENOMEM;
  int full = c->cfg.max_categories > 0 && c->categories >= c->cfg.max_categories;
  lp_store *store = NULL;
  if (!full) {
    lp_store_config sc;
    memset(&sc, 0, sizeof sc);
    sc.max_event_buffer_size = c->cfg.max_event_buffer_size;
    sc.max_category_bytes = c->cfg.max_category_bytes;
    store = lp_store_new(&sc);
    if (!store) return LP_ENOMEM;
  }
  entry *e = malloc(sizeof *e + name.len + 1);
  if (!e) {
    lp_store_free(store);
    return LP_ENOMEM;
  }
  e->hash = h;
  e->store = store;
  e->hold_from = full ? INT64_MAX : hold_from;
  e->last = *last;
  e->name_len = name.len;
  memcpy(e->name, name.ptr, name.len);
  e->name[name.len] = 0;
  size_t j = h & (c->nbuckets - 1);
  e->next = c->buckets[j];
  c->buckets[j] = e;
  c->nentries++;
  if (!full) {
    c->categories++;
    *out = e;
  }
  return LP_OK;
}

static void note_id(lp_cache *c, const char *id) {
  if (c->nids == LAST_MS_IDS_MAX || strlen(id) != LP_UUID_LEN) return;
  memcpy(c->ids[c->nids++], id, LP_UUID_LEN + 1);
}

static int seen_in_last_ms(const lp_cache *c, const char *id) {
  for (size_t i = 0; i < c->nids; i++)
    if (memcmp(c->ids[i], id, LP_UUID_LEN) == 0) return 1;
  return 0;
}

/* Wakes the polls parked on category with the event (new to each of them: every poll parked
 * before it arrived, at a position before it, and a read did not put it here). */
static void wake_parked(lp_cache *c, lp_slice category, const char *id, lp_slice data_json, int64_t ts) {
  size_t waiting = lp_store_waiting_in(c->parked, category), count;
  if (waiting == 0) return;
  lp_buf_reset(&c->json);
  /* the engine hands over only events it made JSON of; anything else cannot be answered here */
  if (!lp_uuid_is_valid(id, strlen(id)) || !lp_utf8_is_valid(category.ptr, category.len) ||
      lp_woken_reserve(&c->woken, waiting) != LP_OK ||
      lp_event_json_append(&c->json, category, data_json, id, ts) != LP_OK) {
    end_parked(c); /* none may miss the event: their owners answer them another way */
    return;
  }
  if (lp_store_take_waiters(c->parked, category, lp_woken_add, &c->woken, &count) != LP_OK) {
    end_parked(c);
    return;
  }
  lp_published p;
  memset(&p, 0, sizeof p);
  p.json = c->json.data;
  p.json_len = c->json.len;
  c->nwoken += c->woken.nowned;
  lp_woken_answer(&c->woken, &p);
  if (c->json.cap > (1u << 20)) lp_buf_free(&c->json); /* one huge event should not pin its memory */
}

int lp_cache_add(lp_cache *c, const lp_cache_pos *ev, lp_slice category, const char *id, lp_slice data_json) {
  if (!c->valid) return LP_OK;
  if (after(&c->last, ev)) {
    if (ev->ts > c->last.ts) c->nids = 0;
    c->last = *ev;
  }
  if (ev->ts == c->last.ts) note_id(c, id);
  uint64_t h = hash_name(category);
  entry *e = find(c, category, h);
  if (e && e->store && !after(&e->last, ev)) return LP_OK; /* a read put it here already */
  int rc = LP_OK;
  if (e && !e->store) {
    /* not kept: Redis's until the reset */
  } else if (!e && (rc = new_entry(c, category, h, c->base_from, &c->base, &e)) != LP_OK) {
    end_parked(c); /* cannot tell whether it is new to them: their owners answer them */
    return rc;
  } else if (e) {
    lp_published p;
    rc = lp_store_restore(e->store, category, data_json, id, ev->ts, &p);
    if (rc != LP_OK) e->hold_from = INT64_MAX; /* a category the cache cannot hold: Redis's until the reset */
    e->last = *ev;
  }
  wake_parked(c, category, id, data_json, ev->ts);
  return rc;
}

int lp_cache_wait(lp_cache *c, const lp_slice *categories, size_t n, lp_waiter *owner, uint64_t *handle) {
  if (!c->valid || n == 0 || !owner) return LP_EINVAL;
  return lp_store_wait_owned(c->parked, categories, n, owner, handle);
}

int lp_cache_cancel(lp_cache *c, uint64_t handle) { return lp_store_cancel(c->parked, handle); }

size_t lp_cache_parked_in(const lp_cache *c, lp_slice category) { return lp_store_waiting_in(c->parked, category); }

int lp_cache_warm(lp_cache *c, lp_slice category, int64_t since, const lp_cache_event *events, size_t n, int missed,
                  const lp_cache_pos *pos) {
  if (!c->valid || missed) return 0;
  /* the read must be of this base: Redis's position at or after it, in its epoch */
  if (!same_epoch(&c->base, pos) || after(pos, &c->base)) return 0;
  uint64_t h = hash_name(category);
  if (find(c, category, h)) return 0;
  /* a poll parked on the category waits from a position before the read's: the read's events
   * after it, kept here, would reach the cache by pub/sub as seen already and wake nobody */
  if (lp_store_waiting_in(c->parked, category) > 0) return 0;
  entry *e;
  int64_t hold_from = since < 0 ? INT64_MIN : since == INT64_MAX ? INT64_MAX : since + 1;
  if (new_entry(c, category, h, hold_from, pos, &e) != LP_OK || !e) return 0;
  for (size_t i = 0; i < n; i++) {
    lp_published p;
    if (lp_store_restore(e->store, category, events[i].data_json, events[i].id, events[i].ts, &p) != LP_OK) {
      e->hold_from = INT64_MAX;
      break;
    }
  }
  c->warmed++;
  return 1;
}

/* Whether the cache holds every event the cursor asks for in the category. */
static int covers(const lp_cache *c, const entry *e, int64_t since, const char *last_id) {
  int64_t hold_from = e ? e->hold_from : c->base_from;
  /* with last_id, events stamped since itself may be asked for; without, those after it */
  if (last_id || hold_from == INT64_MIN) return since >= hold_from;
  return since >= hold_from - 1;
}

static int count_only(void *ctx, const lp_event_view *e) {
  (void)ctx;
  (void)e;
  return 0;
}

/* Whether a category answers the same whether the events stamped `since` count or not. */
static int same_ms_is_moot(entry *e, lp_slice name, int64_t since, const char *last_id) {
  size_t with = 0, without = 0;
  int missed_with = 0, missed_without = 0;
  if (lp_store_fetch_each(e->store, &name, 1, since, last_id, 0, count_only, NULL, &with, &missed_with) != LP_OK ||
      lp_store_fetch_each(e->store, &name, 1, since, NULL, 0, count_only, NULL, &without, &missed_without) != LP_OK)
    return 0;
  return with == without && missed_with == missed_without;
}

int lp_cache_now(lp_cache *c, const lp_slice *categories, size_t n, lp_cache_pos *cursor) {
  if (!c->valid || n == 0 || n > ANSWER_MAX_CATEGORIES) return LP_CACHE_MISS;
  for (size_t i = 0; i < n; i++) {
    entry *e = find(c, categories[i], hash_name(categories[i]));
    if (e && after(&c->last, &e->last)) {
      c->misses++;
      return LP_CACHE_MISS;
    }
  }
  *cursor = c->last;
  c->waits++;
  return LP_CACHE_WAIT;
}

int lp_cache_answer(lp_cache *c, const lp_slice *categories, size_t n, int64_t since, const char *last_id, lp_buf *out,
                    lp_cache_pos *cursor) {
  if (!c->valid || n == 0) return LP_CACHE_MISS;
  if (last_id && !lp_uuid_is_valid(last_id, strlen(last_id))) return LP_CACHE_MISS;
  if (since > c->last.ts || (since == c->last.ts && !(last_id && seen_in_last_ms(c, last_id)))) {
    c->misses++; /* the client may have seen more than this node has yet */
    return LP_CACHE_MISS;
  }
  entry *found[ANSWER_MAX_CATEGORIES];
  if (n > ANSWER_MAX_CATEGORIES) return LP_CACHE_MISS;
  for (size_t i = 0; i < n; i++) {
    found[i] = find(c, categories[i], hash_name(categories[i]));
    if (!covers(c, found[i], since, last_id)) {
      c->misses++;
      return LP_CACHE_MISS;
    }
  }
  if (n > 1 && last_id) {
    /* Redis looks last_id up in every category of the cursor, and its position decides which
     * events stamped `since` of all of them come; each store here looks in its own category
     * only. So in each category the answer must be the same with last_id and without it (the
     * events stamped since do not matter there): then Redis's lookup cannot change it. */
    for (size_t i = 0; i < n; i++) {
      if (found[i] && found[i]->store && !same_ms_is_moot(found[i], categories[i], since, last_id)) {
        c->misses++;
        return LP_CACHE_MISS;
      }
    }
  }
  const lp_cache_pos *at = &c->last;
  int with_events = 0;
  for (size_t i = 0; i < n; i++) {
    entry *e = found[i];
    if (!e) continue;
    if (after(at, &e->last)) {
      /* a read put this category's events here beyond what pub/sub brought: with several
       * categories, the others' events up to there may still be on their way (answered, or
       * waited for from there, they would be lost), and from before it this one's would come
       * twice. Redis's to answer. */
      if (n > 1) {
        c->misses++;
        return LP_CACHE_MISS;
      }
      at = &e->last;
    }
    size_t count = 0;
    int missed = 0;
    size_t before = out->len;
    if (lp_store_fetch(e->store, &categories[i], 1, since, last_id, 0, out, &count, &missed) != LP_OK) {
      out->len = before;
      return LP_CACHE_MISS;
    }
    if (count > 0) {
      if (with_events) { /* events in two categories: their one order is Redis's to tell */
        c->misses++;
        return LP_CACHE_MISS;
      }
      with_events = 1;
    }
  }
  *cursor = *at;
  if (with_events) {
    c->hits++;
    return LP_CACHE_EVENTS;
  }
  c->waits++;
  return LP_CACHE_WAIT;
}

void lp_cache_get_stats(const lp_cache *c, lp_cache_stats *st) {
  st->valid = c->valid;
  st->categories = c->categories;
  st->hits = c->hits;
  st->waits = c->waits;
  st->misses = c->misses;
  st->warmed = c->warmed;
  st->resets = c->resets;
  lp_store_stats ws;
  lp_store_get_stats(c->parked, &ws);
  st->parked = ws.waiting;
  st->woken = c->nwoken;
  st->ended = c->nended;
}
