/* lp_store: categories, bounded event buffers, cursors, TTL and waiting
 * subscriptions. Ownership: the store owns every category, event and
 * subscription; callers hold only handles (integers) and borrowed slices. */
#include "lp_store.h"

#include <stdlib.h>
#include <string.h>

#include "lp_json.h"

typedef struct lp_category lp_category;
typedef struct lp_event lp_event;
typedef struct lp_sub lp_sub;

/* One event: its JSON text is built once at publish and then only copied. */
struct lp_event {
  lp_event *older, *newer; /* the store-wide list, in publish order */
  lp_category *category;
  uint64_t seq;
  int64_t timestamp;
  char id[LP_UUID_LEN + 1];
  size_t json_len;
  char json[]; /* NUL-terminated */
};

/* A subscription's link into one category's list of waiters. */
typedef struct lp_wait {
  struct lp_wait *prev, *next;
  lp_category *category;
  lp_sub *sub;
} lp_wait;

struct lp_sub {
  uint64_t handle;
  void *owner; /* lp_store_wait_owned's owner, NULL for lp_store_wait */
  size_t nwaits;
  lp_wait waits[];
};

struct lp_category {
  lp_category *hnext; /* hash chain */
  uint64_t hash;
  lp_event **ring; /* events oldest first, from ring[head]; grows up to the buffer size */
  size_t ring_cap, head, count;
  size_t bytes;           /* JSON bytes of its events */
  size_t cost;            /* what max_buffered_bytes counts for it: 0 without events */
  size_t heap_pos;        /* index + 1 in the store's by-cost heap; 0 when not in it */
  size_t max_events;      /* its buffer size (per-category rules, or the store's) */
  int delete_after_first; /* its delete-after-first */
  unsigned ttl_class;     /* index of its TTL in the store's expiry lists */
  lp_wait *waiters;
  size_t nwaiters;
  size_t nowned; /* of those, subscriptions with an owner */
  /* The newest event dropped by size or TTL, to tell a client it missed some. */
  int has_dropped;
  int64_t dropped_timestamp;
  uint64_t dropped_seq;
  char dropped_id[LP_UUID_LEN + 1];
  size_t name_len;
  char name[];
};

/* Subscription handles are (generation << 32 | slot): O(1) lookup, and a
 * stale handle never reaches a reused slot. */
typedef struct sub_slot {
  lp_sub *sub;
  uint32_t generation;
} sub_slot;

/* The events of every category with one TTL, in publish order (which is
 * timestamp order), so the expired ones are a prefix. */
typedef struct ttl_list {
  int64_t ttl_ms; /* 0: never expire */
  lp_event *oldest, *newest;
} ttl_list;

struct lp_store {
  lp_store_config cfg;
  ttl_list ttls[LP_TTL_CLASSES]; /* [0] has the store's TTL */
  unsigned nttls;
  lp_category **buckets;
  size_t nbuckets, ncategories;
  uint64_t hash_seed;
  lp_event *retired; /* a delivered, unbuffered event kept alive until the next call */
  sub_slot *slots;
  size_t nslots, slots_cap;
  uint32_t *free_slots;
  size_t nfree;
  uint64_t next_seq;
  int64_t last_timestamp; /* the largest timestamp issued */
  int64_t min_next_timestamp;
  lp_store_stats stats;
  lp_buf scratch;
  /* With max_buffered_bytes: categories holding events, largest first (a
   * binary max-heap on cost), so the cap evicts from the largest in O(log n). */
  lp_category **heap;
  size_t heap_len, heap_cap;
  lp_category *publishing; /* the category being published to: make_room must not free it */
};

const char *lp_strerror(int code) {
  switch (code) {
    case LP_OK: return "ok";
    case LP_ENOMEM: return "out of memory";
    case LP_EINVAL: return "invalid category: must be 1 to max bytes";
    case LP_EUTF8: return "category is not valid UTF-8";
    case LP_EORDER: return "event is older than the events already stored";
    case LP_ERANDOM: return "the OS random source failed";
    case LP_ELIMIT: return "limit reached";
    case LP_ECATEGORIES: return "too many categories (max_categories)";
    case LP_EWAITERS: return "too many waiting subscribers in this category (max_waiting_per_category)";
    case LP_ETOOBIG: return "event is larger than max_buffered_bytes";
    case LP_ETIME: return "timestamp is not a plausible time (0 to the year 9999 in epoch ms)";
    default: return "unknown error";
  }
}

/* ---- category hash map (seeded, so chosen names cannot flood one chain) ---- */

static uint64_t hash_bytes(uint64_t seed, const char *p, size_t n) {
  uint64_t h = seed ^ (n * 0x9e3779b97f4a7c15ull);
  while (n >= 8) {
    uint64_t k;
    memcpy(&k, p, 8);
    h = (h ^ k) * 0xbf58476d1ce4e5b9ull;
    h ^= h >> 31;
    p += 8, n -= 8;
  }
  uint64_t k = 0;
  memcpy(&k, p, n);
  h = (h ^ k) * 0x94d049bb133111ebull;
  h ^= h >> 29;
  h *= 0xbf58476d1ce4e5b9ull;
  return h ^ (h >> 32);
}

static int rehash(lp_store *s, size_t nbuckets) {
  lp_category **nb = calloc(nbuckets, sizeof *nb);
  if (!nb) return -1;
  for (size_t i = 0; i < s->nbuckets; i++) {
    lp_category *c = s->buckets[i];
    while (c) {
      lp_category *next = c->hnext;
      size_t j = c->hash & (nbuckets - 1);
      c->hnext = nb[j];
      nb[j] = c;
      c = next;
    }
  }
  free(s->buckets);
  s->buckets = nb;
  s->nbuckets = nbuckets;
  return 0;
}

static lp_category *find_category(const lp_store *s, lp_slice name, uint64_t h) {
  for (lp_category *c = s->buckets[h & (s->nbuckets - 1)]; c; c = c->hnext)
    if (c->hash == h && c->name_len == name.len && memcmp(c->name, name.ptr, name.len) == 0) return c;
  return NULL;
}

static int check_name(const lp_store *s, lp_slice name) {
  if (name.len == 0 || name.len > s->cfg.max_category_bytes) return LP_EINVAL;
  if (!lp_utf8_is_valid(name.ptr, name.len)) return LP_EUTF8;
  return LP_OK;
}

static int get_category(lp_store *s, lp_slice name, lp_category **out) {
  uint64_t h = hash_bytes(s->hash_seed, name.ptr, name.len);
  lp_category *c = find_category(s, name, h);
  if (c) {
    *out = c;
    return LP_OK;
  }
  if (s->cfg.max_categories && s->ncategories >= s->cfg.max_categories) return LP_ECATEGORIES;
  if (s->ncategories >= s->nbuckets && rehash(s, s->nbuckets * 2) != 0) return LP_ENOMEM;
  lp_category_limits lim = {s->cfg.max_event_buffer_size, s->cfg.event_ttl_ms, s->cfg.delete_after_first};
  if (s->cfg.category_limits) {
    lp_category_limits asked = lim;
    s->cfg.category_limits(s->cfg.category_limits_ctx, name, &asked);
    if (asked.max_event_buffer_size >= 1) lim.max_event_buffer_size = asked.max_event_buffer_size;
    if (asked.event_ttl_ms >= 0) lim.event_ttl_ms = asked.event_ttl_ms;
    lim.delete_after_first = asked.delete_after_first != 0;
  }
  unsigned tc = 0;
  while (tc < s->nttls && s->ttls[tc].ttl_ms != lim.event_ttl_ms) tc++;
  if (tc == s->nttls) {
    if (s->nttls == LP_TTL_CLASSES) return LP_ELIMIT;
    s->ttls[s->nttls++].ttl_ms = lim.event_ttl_ms; /* kept for the store's life: a handful */
  }
  c = calloc(1, sizeof *c + name.len + 1);
  if (!c) return LP_ENOMEM;
  c->max_events = lim.max_event_buffer_size;
  c->delete_after_first = lim.delete_after_first;
  c->ttl_class = tc;
  c->hash = h;
  c->name_len = name.len;
  memcpy(c->name, name.ptr, name.len);
  size_t j = h & (s->nbuckets - 1);
  c->hnext = s->buckets[j];
  s->buckets[j] = c;
  s->ncategories++;
  s->stats.categories = s->ncategories;
  *out = c;
  return LP_OK;
}

static void free_category(lp_store *s, lp_category *c) {
  lp_category **pp = &s->buckets[c->hash & (s->nbuckets - 1)];
  while (*pp != c) pp = &(*pp)->hnext;
  *pp = c->hnext;
  free(c->ring);
  free(c);
  s->ncategories--;
  s->stats.categories = s->ncategories;
  /* Shrinking the table too is what brings memory back to its baseline. */
  if (s->nbuckets > 64 && s->ncategories < s->nbuckets / 8) rehash(s, s->nbuckets / 2);
}

static void free_category_if_unused(lp_store *s, lp_category *c) {
  if (c->count == 0 && c->nwaiters == 0) free_category(s, c);
}

/* ---- the by-size heap (only with max_buffered_bytes) ---- */

static void heap_set(lp_store *s, size_t i, lp_category *c) {
  s->heap[i] = c;
  c->heap_pos = i + 1;
}

static void heap_up(lp_store *s, size_t i) {
  lp_category *c = s->heap[i];
  while (i > 0 && s->heap[(i - 1) / 2]->cost < c->cost) {
    heap_set(s, i, s->heap[(i - 1) / 2]);
    i = (i - 1) / 2;
  }
  heap_set(s, i, c);
}

static void heap_down(lp_store *s, size_t i) {
  lp_category *c = s->heap[i];
  for (;;) {
    size_t l = 2 * i + 1, r = l + 1, big = i;
    size_t big_cost = c->cost;
    if (l < s->heap_len && s->heap[l]->cost > big_cost) big = l, big_cost = s->heap[l]->cost;
    if (r < s->heap_len && s->heap[r]->cost > big_cost) big = r;
    if (big == i) break;
    heap_set(s, i, s->heap[big]);
    i = big;
  }
  heap_set(s, i, c);
}

static void heap_remove(lp_store *s, lp_category *c) {
  size_t i = c->heap_pos - 1;
  c->heap_pos = 0;
  lp_category *last = s->heap[--s->heap_len];
  if (last == c) return;
  heap_set(s, i, last);
  heap_up(s, i);
  heap_down(s, last->heap_pos - 1);
}

/* Makes sure c can join the heap without allocating: called before an event
 * is linked anywhere, so running out of memory changes nothing. */
static int heap_reserve(lp_store *s, const lp_category *c) {
  if (!s->cfg.max_buffered_bytes || c->heap_pos || s->heap_len < s->heap_cap) return LP_OK;
  size_t cap = s->heap_cap ? s->heap_cap * 2 : 64;
  lp_category **h = realloc(s->heap, cap * sizeof *h);
  if (!h) return LP_ENOMEM;
  s->heap = h;
  s->heap_cap = cap;
  return LP_OK;
}

/* Re-positions c after its cost changed; never allocates (see heap_reserve). */
static void heap_update(lp_store *s, lp_category *c) {
  if (!s->cfg.max_buffered_bytes) return;
  if (c->count == 0) {
    if (c->heap_pos) heap_remove(s, c);
    return;
  }
  if (!c->heap_pos) heap_set(s, s->heap_len++, c);
  heap_up(s, c->heap_pos - 1);
  heap_down(s, c->heap_pos - 1);
}

/* ---- events ---- */

static size_t event_cost(size_t json_len) { return json_len + LP_EVENT_COST; }
static size_t category_cost(size_t name_len) { return name_len + LP_CATEGORY_COST; }

/* Adds (or, with sign < 0, takes away) an event of c to the byte counts; the
 * category's own cost counts while it holds events. */
static void count_event(lp_store *s, lp_category *c, size_t json_len, int sign) {
  size_t cost = event_cost(json_len);
  if (sign > 0 && c->count == 1) cost += category_cost(c->name_len); /* its first event */
  if (sign < 0 && c->count == 0) cost += category_cost(c->name_len); /* its last one */
  if (sign > 0) {
    c->bytes += json_len, c->cost += cost;
    s->stats.event_bytes += json_len, s->stats.buffered_bytes += cost;
  } else {
    c->bytes -= json_len, c->cost -= cost;
    s->stats.event_bytes -= json_len, s->stats.buffered_bytes -= cost;
  }
}

static lp_event *ring_at(const lp_category *c, size_t i) { return c->ring[(c->head + i) % c->ring_cap]; }

static void unlink_global(lp_store *s, lp_event *e) {
  ttl_list *l = &s->ttls[e->category->ttl_class];
  if (e->older)
    e->older->newer = e->newer;
  else
    l->oldest = e->newer;
  if (e->newer)
    e->newer->older = e->older;
  else
    l->newest = e->older;
}

/* Takes e out of the store-wide list and the byte counts, then frees it; the
 * caller has already removed it from its category's ring. */
static void forget_event(lp_store *s, lp_event *e) {
  unlink_global(s, e);
  count_event(s, e->category, e->json_len, -1);
  s->stats.events--;
  heap_update(s, e->category);
  free(e);
}

/* Drops the oldest event of c, remembering it as missed for old cursors. */
static void drop_oldest(lp_store *s, lp_category *c) {
  lp_event *e = c->ring[c->head];
  c->head = (c->head + 1) % c->ring_cap;
  c->count--;
  c->has_dropped = 1;
  c->dropped_timestamp = e->timestamp;
  c->dropped_seq = e->seq;
  memcpy(c->dropped_id, e->id, sizeof e->id);
  s->stats.dropped++;
  forget_event(s, e);
}

static int ring_push(lp_store *s, lp_category *c, lp_event *e) {
  if (c->count == c->max_events) drop_oldest(s, c);
  if (c->count == c->ring_cap) {
    size_t cap = c->ring_cap ? c->ring_cap * 2 : 4;
    if (cap > c->max_events) cap = c->max_events;
    lp_event **r = malloc(cap * sizeof *r);
    if (!r) return LP_ENOMEM;
    for (size_t i = 0; i < c->count; i++) r[i] = ring_at(c, i);
    free(c->ring);
    c->ring = r;
    c->ring_cap = cap;
    c->head = 0;
  }
  c->ring[(c->head + c->count) % c->ring_cap] = e;
  c->count++;
  return LP_OK;
}

static void release_retired(lp_store *s) {
  free(s->retired);
  s->retired = NULL;
}

int lp_event_json_append(lp_buf *b, lp_slice category, lp_slice data, const char *id, int64_t ts) {
  if (lp_buf_append_str(b, "{\"timestamp\":") || lp_buf_append_i64(b, ts) || lp_buf_append_str(b, ",\"category\":") ||
      lp_json_append_string(b, category.ptr, category.len) || lp_buf_append_str(b, ",\"data\":") ||
      lp_buf_append(b, data.ptr, data.len) || lp_buf_append_str(b, ",\"id\":\"") || lp_buf_append(b, id, LP_UUID_LEN) ||
      lp_buf_append_str(b, "\"}"))
    return LP_ENOMEM;
  return LP_OK;
}

static lp_event *make_event(lp_store *s, lp_slice category, lp_slice data, const char *id, int64_t ts) {
  lp_buf *b = &s->scratch;
  lp_buf_reset(b);
  if (lp_event_json_append(b, category, data, id, ts) != LP_OK) return NULL;
  lp_event *e = malloc(sizeof *e + b->len + 1);
  if (!e) return NULL;
  memset(e, 0, sizeof *e);
  e->timestamp = ts;
  memcpy(e->id, id, LP_UUID_LEN);
  e->id[LP_UUID_LEN] = '\0';
  e->json_len = b->len;
  memcpy(e->json, b->data, b->len);
  e->json[b->len] = '\0';
  return e;
}

static int buffer_event(lp_store *s, lp_category *c, lp_event *e) {
  int rc = heap_reserve(s, c);
  if (rc == LP_OK) rc = ring_push(s, c, e);
  if (rc != LP_OK) return rc;
  e->category = c;
  ttl_list *l = &s->ttls[c->ttl_class];
  e->older = l->newest;
  if (l->newest)
    l->newest->newer = e;
  else
    l->oldest = e;
  l->newest = e;
  count_event(s, c, e->json_len, +1);
  s->stats.events++;
  heap_update(s, c);
  return LP_OK;
}

/* What buffering an event of json_len bytes in c adds to buffered_bytes. */
static size_t cost_to_add(const lp_category *c, size_t json_len) {
  return event_cost(json_len) + (c->count == 0 ? category_cost(c->name_len) : 0);
}

/* Makes room under max_buffered_bytes for an event of json_len bytes in c
 * (s->publishing) by dropping the oldest events of the largest categories.
 * LP_ETOOBIG when the event alone is over the cap. */
static int make_room(lp_store *s, lp_category *c, size_t json_len) {
  size_t cap = s->cfg.max_buffered_bytes;
  if (!cap) return LP_OK;
  if (event_cost(json_len) + category_cost(c->name_len) > cap) return LP_ETOOBIG;
  while (s->stats.buffered_bytes + cost_to_add(c, json_len) > cap && s->heap_len > 0) {
    lp_category *big = s->heap[0];
    drop_oldest(s, big);
    s->stats.evicted++;
    if (big != s->publishing) free_category_if_unused(s, big);
  }
  return LP_OK;
}

static void fill_published(const lp_event *e, int buffered, lp_published *out) {
  memcpy(out->id, e->id, sizeof out->id);
  out->timestamp = e->timestamp;
  out->seq = e->seq;
  out->json = e->json;
  out->json_len = e->json_len;
  out->buffered = buffered;
}

/* ---- subscriptions ---- */

static void unlink_wait(lp_wait *w) {
  lp_category *c = w->category;
  if (w->prev)
    w->prev->next = w->next;
  else
    c->waiters = w->next;
  if (w->next) w->next->prev = w->prev;
  c->nwaiters--;
  if (w->sub->owner) c->nowned--;
}

/* Removes a subscription from every category and frees it and its slot. */
static void end_sub(lp_store *s, lp_sub *sub) {
  for (size_t i = 0; i < sub->nwaits; i++) unlink_wait(&sub->waits[i]);
  for (size_t i = 0; i < sub->nwaits; i++) free_category_if_unused(s, sub->waits[i].category);
  uint32_t slot = (uint32_t)(sub->handle & 0xffffffffu);
  s->slots[slot].sub = NULL;
  s->slots[slot].generation++;
  s->free_slots[s->nfree++] = slot;
  s->stats.waiting--;
  free(sub);
}

static int alloc_slot(lp_store *s, uint32_t *slot) {
  if (s->nfree > 0) {
    *slot = s->free_slots[--s->nfree];
    return LP_OK;
  }
  if (s->nslots == s->slots_cap) {
    size_t cap = s->slots_cap ? s->slots_cap * 2 : 64;
    if (cap > 0xffffffffu) return LP_ELIMIT;
    sub_slot *ns = realloc(s->slots, cap * sizeof *ns);
    if (!ns) return LP_ENOMEM;
    s->slots = ns;
    uint32_t *nf = realloc(s->free_slots, cap * sizeof *nf);
    if (!nf) return LP_ENOMEM;
    s->free_slots = nf;
    s->slots_cap = cap;
  }
  s->slots[s->nslots].sub = NULL;
  s->slots[s->nslots].generation = 1;
  *slot = (uint32_t)s->nslots++;
  return LP_OK;
}

int lp_store_wait(lp_store *s, const lp_slice *categories, size_t n, uint64_t *handle) {
  return lp_store_wait_owned(s, categories, n, NULL, handle);
}

int lp_store_wait_owned(lp_store *s, const lp_slice *categories, size_t n, void *owner, uint64_t *handle) {
  if (n == 0) return LP_EINVAL;
  for (size_t i = 0; i < n; i++) {
    int rc = check_name(s, categories[i]);
    if (rc != LP_OK) return rc;
  }
  lp_sub *sub = calloc(1, sizeof *sub + n * sizeof(lp_wait));
  if (!sub) return LP_ENOMEM;
  uint32_t slot;
  int rc = alloc_slot(s, &slot);
  if (rc != LP_OK) {
    free(sub);
    return rc;
  }
  s->slots[slot].sub = sub;
  sub->owner = owner;
  sub->handle = ((uint64_t)s->slots[slot].generation << 32) | slot;
  s->stats.waiting++;
  for (size_t i = 0; i < n; i++) {
    lp_category *c;
    rc = get_category(s, categories[i], &c);
    /* a category named twice is waited on once: two links would be unlinked twice */
    int dup = 0;
    for (size_t k = 0; rc == LP_OK && k < sub->nwaits && !dup; k++) dup = sub->waits[k].category == c;
    if (dup) continue;
    if (rc == LP_OK && s->cfg.max_waiting_per_category && c->nwaiters >= s->cfg.max_waiting_per_category) {
      free_category_if_unused(s, c);
      rc = LP_EWAITERS;
    }
    if (rc != LP_OK) {
      end_sub(s, sub); /* unlinks the waits made so far */
      return rc;
    }
    lp_wait *w = &sub->waits[sub->nwaits++];
    w->category = c;
    w->sub = sub;
    w->prev = NULL;
    w->next = c->waiters;
    if (c->waiters) c->waiters->prev = w;
    c->waiters = w;
    c->nwaiters++;
    if (owner) c->nowned++;
  }
  *handle = sub->handle;
  return LP_OK;
}

static lp_sub *sub_of(const lp_store *s, uint64_t handle) {
  uint32_t slot = (uint32_t)(handle & 0xffffffffu);
  uint32_t gen = (uint32_t)(handle >> 32);
  if (slot >= s->nslots || s->slots[slot].generation != gen) return NULL;
  return s->slots[slot].sub;
}

int lp_store_cancel(lp_store *s, uint64_t handle) {
  lp_sub *sub = sub_of(s, handle);
  if (!sub) return 0;
  end_sub(s, sub);
  return 1;
}

/* Ends every subscription waiting on c (and its waits on other categories),
 * calling wake for each; c itself is left for the caller to free. Each waiter
 * has left every list before its callback runs; callbacks must still not call
 * into the store (see lp_wake_fn). */
static size_t wake_waiters(lp_store *s, lp_category *c, lp_wake_fn wake, void *ctx) {
  size_t n = 0;
  while (c->waiters) {
    lp_sub *sub = c->waiters->sub;
    uint64_t handle = sub->handle;
    void *owner = sub->owner;
    for (size_t i = 0; i < sub->nwaits; i++) unlink_wait(&sub->waits[i]);
    for (size_t i = 0; i < sub->nwaits; i++)
      if (sub->waits[i].category != c) free_category_if_unused(s, sub->waits[i].category);
    sub->nwaits = 0;
    end_sub(s, sub);
    n++;
    if (wake) wake(ctx, handle, owner);
  }
  return n;
}

int lp_store_take_waiters(lp_store *s, lp_slice category, lp_wake_fn wake, void *ctx, size_t *count) {
  *count = 0;
  int rc = check_name(s, category);
  if (rc != LP_OK) return rc;
  lp_category *c = find_category(s, category, hash_bytes(s->hash_seed, category.ptr, category.len));
  if (!c) return LP_OK;
  *count = wake_waiters(s, c, wake, ctx);
  free_category_if_unused(s, c);
  return LP_OK;
}

size_t lp_store_waiting_in(const lp_store *s, lp_slice category) {
  const lp_category *c = find_category(s, category, hash_bytes(s->hash_seed, category.ptr, category.len));
  return c ? c->nwaiters : 0;
}

size_t lp_store_unowned_waiting_in(const lp_store *s, lp_slice category) {
  const lp_category *c = find_category(s, category, hash_bytes(s->hash_seed, category.ptr, category.len));
  return c ? c->nwaiters - c->nowned : 0;
}

size_t lp_store_end_owned(lp_store *s, lp_wake_fn fn, void *ctx) {
  size_t n = 0;
  for (size_t i = 0; i < s->nslots; i++) {
    lp_sub *sub = s->slots[i].sub;
    if (!sub || !sub->owner) continue;
    uint64_t handle = sub->handle;
    void *owner = sub->owner;
    end_sub(s, sub);
    n++;
    if (fn) fn(ctx, handle, owner);
  }
  return n;
}

/* ---- time ---- */

static int64_t clamp_time(int64_t t) { return t < 0 ? 0 : t > LP_TIME_MAX ? LP_TIME_MAX : t; }

static int64_t next_timestamp(lp_store *s, int64_t now_ms) {
  int64_t ts = clamp_time(now_ms);
  if (ts < s->last_timestamp) ts = s->last_timestamp;
  if (ts < s->min_next_timestamp) ts = s->min_next_timestamp;
  s->last_timestamp = ts;
  s->stats.last_timestamp = ts;
  return ts;
}

int64_t lp_store_mark_time(lp_store *s, int64_t now_ms) {
  now_ms = clamp_time(now_ms);
  int64_t ts = now_ms > s->last_timestamp ? now_ms : s->last_timestamp;
  if (ts < s->min_next_timestamp - 1) ts = s->min_next_timestamp - 1;
  if (s->min_next_timestamp < ts + 1) s->min_next_timestamp = ts + 1;
  return ts;
}

size_t lp_store_expire(lp_store *s, int64_t now_ms) {
  release_retired(s);
  now_ms = clamp_time(now_ms);
  size_t dropped = 0;
  /* Publish order is timestamp order, so the expired events of a TTL's list
   * are a prefix of it, and each is the oldest of its category. */
  for (unsigned i = 0; i < s->nttls; i++) {
    ttl_list *l = &s->ttls[i];
    if (l->ttl_ms <= 0) continue;
    while (l->oldest && now_ms - l->oldest->timestamp >= l->ttl_ms) {
      lp_category *c = l->oldest->category;
      drop_oldest(s, c);
      free_category_if_unused(s, c);
      dropped++;
    }
  }
  return dropped;
}

/* ---- publish ---- */

int lp_store_publish(lp_store *s, lp_slice category, lp_slice data, int64_t now_ms, lp_wake_fn wake, void *ctx,
                     lp_published *out) {
  lp_store_expire(s, now_ms);
  int rc = check_name(s, category);
  if (rc != LP_OK) return rc;
  char id[LP_UUID_LEN + 1];
  if (lp_uuid_v4(id) != 0) return LP_ERANDOM;
  lp_category *c;
  rc = get_category(s, category, &c);
  if (rc != LP_OK) return rc;
  int64_t ts = next_timestamp(s, now_ms);
  lp_event *e = make_event(s, category, data, id, ts);
  if (!e) {
    free_category_if_unused(s, c);
    return LP_ENOMEM;
  }
  e->seq = ++s->next_seq;
  e->category = c;
  size_t woken = c->nwaiters;
  int buffered = !(c->delete_after_first && woken > 0);
  if (buffered) {
    s->publishing = c;
    rc = make_room(s, c, e->json_len);
    s->publishing = NULL;
    if (rc == LP_OK) rc = buffer_event(s, c, e);
    if (rc != LP_OK) {
      free(e);
      free_category_if_unused(s, c);
      return rc;
    }
  } else {
    s->retired = e; /* the caller still reads its JSON */
  }
  s->stats.published++;
  s->stats.delivered += woken;
  wake_waiters(s, c, wake, ctx);
  fill_published(e, buffered, out);
  if (!buffered) free_category_if_unused(s, c);
  return LP_OK;
}

int lp_store_restore(lp_store *s, lp_slice category, lp_slice data, const char *id, int64_t ts, lp_published *out) {
  release_retired(s);
  int rc = check_name(s, category);
  if (rc != LP_OK) return rc;
  if (!id || !lp_uuid_is_valid(id, strlen(id))) return LP_EINVAL;
  if (ts < 0 || ts > LP_TIME_MAX) return LP_ETIME;
  if (ts < s->last_timestamp) return LP_EORDER;
  char lower[LP_UUID_LEN + 1];
  for (size_t i = 0; i <= LP_UUID_LEN; i++) lower[i] = (char)(id[i] >= 'A' && id[i] <= 'F' ? id[i] + 32 : id[i]);
  lp_category *c;
  rc = get_category(s, category, &c);
  if (rc != LP_OK) return rc;
  lp_event *e = make_event(s, category, data, lower, ts);
  if (!e) {
    free_category_if_unused(s, c);
    return LP_ENOMEM;
  }
  e->seq = ++s->next_seq;
  s->publishing = c;
  rc = make_room(s, c, e->json_len);
  s->publishing = NULL;
  if (rc == LP_OK) rc = buffer_event(s, c, e);
  if (rc != LP_OK) {
    free(e);
    free_category_if_unused(s, c);
    return rc;
  }
  s->last_timestamp = ts;
  s->stats.last_timestamp = ts;
  s->stats.published++;
  fill_published(e, 1, out);
  return LP_OK;
}

/* ---- fetch ---- */

/* How events stamped exactly since_ms are treated. */
enum equal_rule {
  EQUAL_EXCLUDED,  /* no last_id: the client saw that millisecond */
  EQUAL_INCLUDED,  /* last_id given but no longer buffered: all of them are newer */
  EQUAL_AFTER_SEQ, /* last_id found: only those published after it */
};

typedef struct cursor {
  int64_t since;
  enum equal_rule rule;
  uint64_t after_seq;
  const char *last_id;
} cursor;

static int after_cursor(const cursor *cur, int64_t ts, uint64_t seq) {
  if (ts != cur->since) return ts > cur->since;
  if (cur->rule == EQUAL_EXCLUDED) return 0;
  if (cur->rule == EQUAL_INCLUDED) return 1;
  return seq > cur->after_seq;
}

/* First index in c whose timestamp is >= ts (binary search: timestamps never
 * decrease along a buffer). */
static size_t lower_bound(const lp_category *c, int64_t ts) {
  size_t lo = 0, hi = c->count;
  while (lo < hi) {
    size_t mid = lo + (hi - lo) / 2;
    if (ring_at(c, mid)->timestamp < ts)
      lo = mid + 1;
    else
      hi = mid;
  }
  return lo;
}

static size_t first_after(const lp_category *c, const cursor *cur) {
  size_t i = lower_bound(c, cur->since);
  while (i < c->count) {
    lp_event *e = ring_at(c, i);
    if (after_cursor(cur, e->timestamp, e->seq)) break;
    i++;
  }
  return i;
}

static int missed_events(const lp_category *c, const cursor *cur) {
  if (!c->has_dropped) return 0;
  if (cur->rule == EQUAL_INCLUDED && c->dropped_timestamp == cur->since && strcmp(c->dropped_id, cur->last_id) == 0)
    return 0; /* the client saw the newest dropped event itself */
  return after_cursor(cur, c->dropped_timestamp, c->dropped_seq);
}

#define LP_FETCH_MAX_CATEGORIES 64

/* The events of the categories after the cursor, merged by sequence number:
 * emit(ctx, event, index) for each, oldest first, then finish(ctx, missed)
 * when given; either returns non-zero to stop (out of memory), and then nothing
 * in the store changes. Shared by both fetches. */
typedef int (*emit_fn)(void *ctx, const lp_event *e, size_t index);
typedef int (*finish_fn)(void *ctx, int missed);

static int fetch_merge(lp_store *s, const lp_slice *categories, size_t n, int64_t since_ms, const char *last_id,
                       int64_t now_ms, size_t max_bytes, emit_fn emit, finish_fn finish, void *ctx, size_t *count,
                       int *missed) {
  *count = 0;
  *missed = 0;
  lp_store_expire(s, now_ms);
  if (n == 0 || n > LP_FETCH_MAX_CATEGORIES) return LP_EINVAL;
  lp_category *cats[LP_FETCH_MAX_CATEGORIES];
  size_t start[LP_FETCH_MAX_CATEGORIES], pos[LP_FETCH_MAX_CATEGORIES];
  size_t ncats = 0;
  for (size_t i = 0; i < n; i++) {
    int rc = check_name(s, categories[i]);
    if (rc != LP_OK) return rc;
    lp_category *c = find_category(s, categories[i], hash_bytes(s->hash_seed, categories[i].ptr, categories[i].len));
    int dup = 0;
    for (size_t k = 0; k < ncats; k++) dup |= cats[k] == c;
    if (c && c->count > 0 && !dup) cats[ncats++] = c;
  }
  cursor cur = {since_ms, last_id ? EQUAL_INCLUDED : EQUAL_EXCLUDED, 0, last_id};
  if (last_id) {
    /* last_id may belong to any of the categories: sequence numbers are
     * store-wide, so its position orders events of all of them. */
    for (size_t k = 0; k < ncats && cur.rule == EQUAL_INCLUDED; k++) {
      lp_category *c = cats[k];
      for (size_t i = lower_bound(c, since_ms); i < c->count; i++) {
        lp_event *e = ring_at(c, i);
        if (e->timestamp != since_ms) break;
        if (strcmp(e->id, last_id) == 0) {
          cur.rule = EQUAL_AFTER_SEQ;
          cur.after_seq = e->seq;
          break;
        }
      }
    }
  }
  size_t total = 0;
  int any_missed = 0;
  for (size_t k = 0; k < ncats; k++) {
    start[k] = pos[k] = first_after(cats[k], &cur);
    total += cats[k]->count - start[k];
    any_missed |= missed_events(cats[k], &cur);
  }
  if (total == 0) return LP_OK;
  *missed = any_missed;
  /* delete-after-first removes the newest part of each buffer: an answer cut short would
   * leave a hole, so those fetches are never cut */
  for (size_t k = 0; k < ncats; k++)
    if (cats[k]->delete_after_first) max_bytes = 0;
  size_t bytes = 0, handed = 0;
  for (size_t done = 0; done < total; done++) {
    /* merge by sequence number; the number of categories is small */
    size_t best = SIZE_MAX;
    uint64_t best_seq = UINT64_MAX;
    for (size_t k = 0; k < ncats; k++) {
      if (pos[k] < cats[k]->count && ring_at(cats[k], pos[k])->seq < best_seq) {
        best = k;
        best_seq = ring_at(cats[k], pos[k])->seq;
      }
    }
    lp_event *e = ring_at(cats[best], pos[best]);
    if (max_bytes && done > 0 && bytes + e->json_len > max_bytes) break; /* sizes are in memory: no overflow */
    pos[best]++;
    bytes += e->json_len + 1; /* and its comma */
    if (emit(ctx, e, done)) {
      *missed = 0;
      return LP_ENOMEM;
    }
    handed++;
  }
  if (finish && finish(ctx, any_missed)) {
    *missed = 0;
    return LP_ENOMEM;
  }
  *count = handed;
  s->stats.delivered += handed;
  /* delete-after-first (per category): what was handed out is always the newest part of each buffer */
  for (size_t k = 0; k < ncats; k++) {
    lp_category *c = cats[k];
    if (!c->delete_after_first) continue;
    while (c->count > start[k]) {
      lp_event *e = ring_at(c, c->count - 1);
      c->count--;
      forget_event(s, e);
    }
    free_category_if_unused(s, c);
  }
  return LP_OK;
}

static int emit_to_buf(void *ctx, const lp_event *e, size_t index) {
  lp_buf *out = ctx;
  if (index == 0 && lp_buf_append_str(out, "{\"events\":[")) return 1;
  return (index && lp_buf_append_char(out, ',')) || lp_buf_append(out, e->json, e->json_len);
}

static int finish_buf(void *ctx, int missed) { return lp_buf_append_str(ctx, missed ? "],\"missed\":true}" : "]}"); }

int lp_store_fetch(lp_store *s, const lp_slice *categories, size_t n, int64_t since_ms, const char *last_id,
                   int64_t now_ms, lp_buf *out, size_t *count, int *missed) {
  size_t mark = out->len;
  int rc = fetch_merge(s, categories, n, since_ms, last_id, now_ms, s->cfg.max_answer_bytes, emit_to_buf, finish_buf,
                       out, count, missed);
  if (rc != LP_OK) {
    out->len = mark;
    *missed = 0;
  }
  return rc;
}

typedef struct each_ctx {
  lp_event_fn fn;
  void *ctx;
} each_ctx;

static int emit_to_fn(void *ctx, const lp_event *e, size_t index) {
  (void)index;
  each_ctx *c = ctx;
  lp_event_view v = {e->json, e->json_len, e->timestamp, e->id};
  return c->fn(c->ctx, &v);
}

int lp_store_fetch_each(lp_store *s, const lp_slice *categories, size_t n, int64_t since_ms, const char *last_id,
                        int64_t now_ms, lp_event_fn fn, void *ctx, size_t *count, int *missed) {
  each_ctx c = {fn, ctx};
  return fetch_merge(s, categories, n, since_ms, last_id, now_ms, 0, emit_to_fn, NULL, &c, count, missed);
}

/* ---- life cycle and stats ---- */

lp_store *lp_store_new(const lp_store_config *cfg) {
  if (!cfg || cfg->max_event_buffer_size < 1 || cfg->event_ttl_ms < 0 || cfg->max_category_bytes < 1) return NULL;
  lp_store *s = calloc(1, sizeof *s);
  if (!s) return NULL;
  s->cfg = *cfg;
  s->ttls[0].ttl_ms = cfg->event_ttl_ms;
  s->nttls = 1;
  s->nbuckets = 64;
  s->buckets = calloc(s->nbuckets, sizeof *s->buckets);
  if (!s->buckets || lp_random_bytes(&s->hash_seed, sizeof s->hash_seed) != 0) {
    lp_store_free(s);
    return NULL;
  }
  return s;
}

void lp_store_free(lp_store *s) {
  if (!s) return;
  for (size_t i = 0; i < s->nslots; i++) free(s->slots[i].sub);
  for (unsigned i = 0; i < s->nttls; i++) {
    while (s->ttls[i].oldest) {
      lp_event *e = s->ttls[i].oldest;
      s->ttls[i].oldest = e->newer;
      free(e);
    }
  }
  for (size_t i = 0; i < s->nbuckets; i++) {
    lp_category *c = s->buckets ? s->buckets[i] : NULL;
    while (c) {
      lp_category *next = c->hnext;
      free(c->ring);
      free(c);
      c = next;
    }
  }
  free(s->buckets);
  free(s->slots);
  free(s->free_slots);
  free(s->retired);
  free(s->heap);
  lp_buf_free(&s->scratch);
  free(s);
}

void lp_store_get_stats(const lp_store *s, lp_store_stats *st) { *st = s->stats; }

void lp_store_each_category(const lp_store *s, lp_category_fn fn, void *ctx) {
  for (size_t i = 0; i < s->nbuckets; i++)
    for (lp_category *c = s->buckets[i]; c; c = c->hnext)
      fn(ctx, (lp_slice){c->name, c->name_len}, c->count, c->bytes, c->nwaiters);
}

/* ---- ranked categories (stats) ---- */

/* 1 when a ranks before b: more bytes, more waiters, then the smaller name. */
static int ranks_before(const lp_category *a, const lp_category *b) {
  if (a->bytes != b->bytes) return a->bytes > b->bytes;
  if (a->nwaiters != b->nwaiters) return a->nwaiters > b->nwaiters;
  size_t n = a->name_len < b->name_len ? a->name_len : b->name_len;
  int c = memcmp(a->name, b->name, n);
  if (c != 0) return c < 0;
  return a->name_len < b->name_len;
}

/* A heap whose root is the lowest-ranked kept category. */
static void low_sift_down(const lp_category **h, size_t len, size_t i) {
  for (;;) {
    size_t l = 2 * i + 1, r = l + 1, low = i;
    if (l < len && ranks_before(h[low], h[l])) low = l;
    if (r < len && ranks_before(h[low], h[r])) low = r;
    if (low == i) return;
    const lp_category *t = h[i];
    h[i] = h[low];
    h[low] = t;
    i = low;
  }
}

static void low_sift_up(const lp_category **h, size_t i) {
  while (i > 0 && ranks_before(h[(i - 1) / 2], h[i])) {
    const lp_category *t = h[i];
    h[i] = h[(i - 1) / 2];
    h[(i - 1) / 2] = t;
    i = (i - 1) / 2;
  }
}

int lp_store_top_categories(const lp_store *s, size_t offset, size_t limit, lp_category_info *out, size_t *n) {
  *n = 0;
  if (limit == 0 || offset > SIZE_MAX / sizeof(lp_category *) - limit) return LP_EINVAL;
  size_t k = offset + limit;
  if (k > s->ncategories) k = s->ncategories;
  if (k == 0 || offset >= k) return LP_OK;
  const lp_category **h = malloc(k * sizeof *h);
  if (!h) return LP_ENOMEM;
  size_t len = 0;
  for (size_t i = 0; i < s->nbuckets; i++)
    for (const lp_category *c = s->buckets[i]; c; c = c->hnext) {
      if (len < k) {
        h[len++] = c;
        low_sift_up(h, len - 1);
      } else if (ranks_before(c, h[0])) {
        h[0] = c;
        low_sift_down(h, len, 0);
      }
    }
  /* pop the lowest first: h ends up best first from the back */
  for (size_t end = len; end > 1; end--) {
    const lp_category *t = h[0];
    h[0] = h[end - 1];
    h[end - 1] = t;
    low_sift_down(h, end - 1, 0);
  }
  /* h[0] is now the best, h[len - 1] the lowest (a heapsort by the low-heap) */
  for (size_t i = offset; i < len; i++) {
    const lp_category *c = h[i];
    out[*n] = (lp_category_info){{c->name, c->name_len}, c->count, c->bytes, c->nwaiters};
    (*n)++;
  }
  free(h);
  return LP_OK;
}
