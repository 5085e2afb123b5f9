/* lp_keys: the bounded table of Idempotency-Keys (see lp_keys.h). */
#include "lp_keys.h"

#include <stdlib.h>
#include <string.h>

typedef struct rec {
  struct rec *next; /* the map's chain */
  uint64_t hash;
  uint64_t ticket;
  int64_t expires;
  int64_t timestamp;
  size_t cost;
  int live; /* in the map; a record that is not stays in the ring until its turn comes */
  char *id; /* NULL while busy; owned */
  size_t id_len;
  size_t key_len, fp_len;
  char bytes[]; /* the key, then the fingerprint */
} rec;

struct lp_keys {
  size_t max_keys, max_bytes;
  int64_t window_ms;
  rec **ring; /* records oldest first: ring[head .. head + n - 1] (mod cap) */
  size_t cap, head, n;
  rec **buckets;   /* the map: key -> its live record */
  size_t nbuckets; /* a power of two */
  uint64_t next_ticket;
  lp_keys_stats st;
};

static uint64_t hash_of(lp_slice key) {
  uint64_t h = UINT64_C(0xcbf29ce484222325);
  for (size_t i = 0; i < key.len; i++) {
    h ^= (unsigned char)key.ptr[i];
    h *= UINT64_C(0x100000001b3);
  }
  return h;
}

static int same(const char *p, size_t n, lp_slice s) { return n == s.len && (n == 0 || memcmp(p, s.ptr, n) == 0); }

static rec **slot_of(const lp_keys *k, lp_slice key, uint64_t h) {
  rec **at = &k->buckets[h & (k->nbuckets - 1)];
  while (*at && !((*at)->hash == h && same((*at)->bytes, (*at)->key_len, key))) at = &(*at)->next;
  return at;
}

static rec *find(const lp_keys *k, lp_slice key) { return *slot_of(k, key, hash_of(key)); }

/* Doubles the map when it is fuller than one record per bucket; a failed growth only makes the
 * chains longer. */
static void map_grow(lp_keys *k) {
  if (k->st.keys < k->nbuckets) return;
  size_t nb = k->nbuckets * 2;
  rec **b = calloc(nb, sizeof *b);
  if (!b) return;
  for (size_t i = 0; i < k->nbuckets; i++) {
    rec *r = k->buckets[i];
    while (r) {
      rec *next = r->next;
      r->next = b[r->hash & (nb - 1)];
      b[r->hash & (nb - 1)] = r;
      r = next;
    }
  }
  free(k->buckets);
  k->buckets = b;
  k->nbuckets = nb;
}

/* Takes r out of the map and the figures (it stays in the ring). */
static void forget(lp_keys *k, rec *r) {
  lp_slice key = {r->bytes, r->key_len};
  rec **at = slot_of(k, key, r->hash);
  if (*at == r) *at = r->next;
  r->next = NULL;
  r->live = 0;
  k->st.keys--;
  k->st.bytes -= r->cost;
}

/* Takes the oldest record off the ring and frees it; returns whether it was live. */
static int pop_oldest(lp_keys *k) {
  rec *r = k->ring[k->head];
  int live = r->live;
  if (live) forget(k, r);
  free(r->id);
  free(r);
  k->ring[k->head] = NULL;
  k->head = (k->head + 1) % k->cap;
  k->n--;
  return live;
}

static int ring_grow(lp_keys *k) {
  size_t cap = k->cap < 8 ? 16 : k->cap * 2;
  rec **ring = malloc(cap * sizeof *ring);
  if (!ring) return -1;
  for (size_t i = 0; i < k->n; i++) ring[i] = k->ring[(k->head + i) % k->cap];
  free(k->ring);
  k->ring = ring;
  k->cap = cap;
  k->head = 0;
  return 0;
}

int lp_keys_check(lp_slice value, lp_slice *key) {
  if (value.len >= 2 && value.ptr[0] == '"' && value.ptr[value.len - 1] == '"') {
    value.ptr++;
    value.len -= 2;
    if (memchr(value.ptr, '"', value.len) || memchr(value.ptr, '\\', value.len)) return -1;
  }
  if (value.len < 1 || value.len > 255) return -1;
  for (size_t i = 0; i < value.len; i++)
    if ((unsigned char)value.ptr[i] < 32 || (unsigned char)value.ptr[i] > 126) return -1;
  *key = value;
  return 0;
}

lp_keys *lp_keys_new(size_t max_keys, size_t max_bytes, int64_t window_ms) {
  lp_keys *k = calloc(1, sizeof *k);
  if (!k) return NULL;
  k->max_keys = max_keys ? max_keys : 1;
  k->max_bytes = max_bytes ? max_bytes : 1;
  k->window_ms = window_ms > 0 ? window_ms : 1;
  k->nbuckets = 16;
  k->buckets = calloc(k->nbuckets, sizeof *k->buckets);
  if (!k->buckets) {
    free(k);
    return NULL;
  }
  return k;
}

void lp_keys_free(lp_keys *k) {
  if (!k) return;
  while (k->n > 0) pop_oldest(k);
  free(k->ring);
  free(k->buckets);
  free(k);
}

void lp_keys_expire(lp_keys *k, int64_t now) {
  while (k->n > 0) {
    rec *r = k->ring[k->head];
    if (r->live && r->expires > now) return;
    pop_oldest(k);
  }
}

int lp_keys_begin(lp_keys *k, lp_slice key, lp_slice fingerprint, int64_t now, uint64_t *ticket, lp_keys_prior *prior) {
  lp_keys_expire(k, now);
  uint64_t h = hash_of(key);
  rec *r = *slot_of(k, key, h);
  if (r) {
    if (!same(r->bytes + r->key_len, r->fp_len, fingerprint)) {
      k->st.conflicts++;
      return LP_KEYS_MISMATCH;
    }
    if (!r->id) return LP_KEYS_BUSY;
    k->st.replays++;
    prior->id = (lp_slice){r->id, r->id_len};
    prior->timestamp = r->timestamp;
    return LP_KEYS_REPLAY;
  }
  size_t cost = key.len + fingerprint.len + 36 + LP_KEYS_RECORD_COST;
  r = malloc(sizeof *r + key.len + fingerprint.len);
  if (!r) return LP_KEYS_NOMEM;
  /* over a bound: the oldest keys go first (a retry of theirs would publish again) */
  while ((k->st.keys + 1 > k->max_keys || k->st.bytes + cost > k->max_bytes) && k->n > 0)
    if (pop_oldest(k)) k->st.evicted++;
  if (k->n == k->cap && ring_grow(k) != 0) {
    free(r);
    return LP_KEYS_NOMEM;
  }
  memset(r, 0, sizeof *r);
  if (key.len) memcpy(r->bytes, key.ptr, key.len);
  if (fingerprint.len) memcpy(r->bytes + key.len, fingerprint.ptr, fingerprint.len);
  r->key_len = key.len;
  r->fp_len = fingerprint.len;
  r->hash = h;
  r->ticket = ++k->next_ticket;
  r->expires = now > INT64_MAX - k->window_ms ? INT64_MAX : now + k->window_ms;
  r->cost = cost;
  r->live = 1;
  k->ring[(k->head + k->n) % k->cap] = r;
  k->n++;
  k->st.keys++;
  k->st.bytes += cost;
  rec **at = &k->buckets[h & (k->nbuckets - 1)];
  r->next = *at;
  *at = r;
  map_grow(k);
  *ticket = r->ticket;
  return LP_KEYS_NEW;
}

int lp_keys_commit(lp_keys *k, uint64_t ticket, lp_slice key, lp_slice id, int64_t timestamp) {
  rec *r = find(k, key);
  if (!r || r->ticket != ticket || r->id) return 0;
  char *copy = malloc(id.len + 1);
  if (!copy) {
    forget(k, r);
    return -1;
  }
  if (id.len) memcpy(copy, id.ptr, id.len);
  copy[id.len] = '\0';
  r->id = copy;
  r->id_len = id.len;
  r->timestamp = timestamp;
  return 0;
}

void lp_keys_abort(lp_keys *k, uint64_t ticket, lp_slice key) {
  rec *r = find(k, key);
  if (r && r->ticket == ticket) forget(k, r);
}

void lp_keys_get_stats(const lp_keys *k, lp_keys_stats *st) { *st = k->st; }
