/* lp_lua_native: the manager's handlers served by the HTTP engine in C, without entering Lua
 * (OpenResty's model: Lua runs only where an application hooks): catch-up long polls answered
 * from the store (or in Redis mode from the node-local cache), polls with nothing to answer
 * parked in C until a publish, an event or their timeout answers them, publishes that wake no
 * Lua waiter, CORS preflights; and the native handler objects the manager makes
 * (core.native_subscription and its kin) and server:native_route registers. */
#include <lauxlib.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lp_fingerprint.h"
#include "lp_json.h"
#include "lp_keys.h"
#include "lp_lua_engine.h"

static native_route *find_route(server *srv, int post, lp_slice path) {
  for (size_t i = 0; i < srv->nroutes; i++) {
    native_route *r = &srv->routes[i];
    if (r->post == post && r->path_len == path.len && memcmp(r->path, path.ptr, path.len) == 0) return r;
  }
  return NULL;
}

void *lp_lua_native_route_object(server *srv, native_route *r, void *(*of)(lua_State *L, int idx)) {
  lua_State *L = srv->L;
  lua_rawgeti(L, LUA_REGISTRYINDEX, r->ref);
  lua_getiuservalue(L, -1, 1);
  void *object = of(L, -1);
  lua_pop(L, 2);
  return object;
}

static void *store_of(lua_State *L, int idx) { return lp_lua_store_of(L, idx); }
static void *cache_of(lua_State *L, int idx) { return lp_lua_cache_of(L, idx); }
static lp_store *route_store(server *srv, native_route *r) { return lp_lua_native_route_object(srv, r, store_of); }
static lp_cache *route_cache(server *srv, native_route *r) { return lp_lua_native_route_object(srv, r, cache_of); }

int lp_lua_native_head(lp_buf *h, server *srv, const char *status_line, lp_slice extra, lp_slice block,
                       const char *framing, int keep, int http10) {
  lp_buf_reset(h);
  int rc = lp_buf_append_str(h, status_line);
  if (rc == 0 && extra.len) rc = lp_buf_append(h, extra.ptr, extra.len);
  if (rc == 0 && block.len) rc = lp_buf_append(h, block.ptr, block.len);
  if (rc == 0) rc = lp_buf_append_str(h, framing);
  if (rc == 0) rc = lp_buf_append_str(h, lp_lua_engine_date(srv));
  if (rc == 0 && !keep) rc = lp_buf_append_str(h, "Connection: close\r\n");
  if (rc == 0 && keep && http10) rc = lp_buf_append_str(h, "Connection: keep-alive\r\n");
  if (rc == 0) rc = lp_buf_append_str(h, "\r\n");
  return rc;
}

void lp_lua_native_answer(sconn *s, const char *status_line, lp_slice block, int keep_alive, int http10, lp_slice extra,
                          const lp_slice *body, size_t nbody) {
  server *srv = s->srv;
  lp_buf *h = &srv->fast_head;
  int keep = keep_alive && lp_conn_may_keep_alive(&s->conn);
  size_t len = 0;
  for (size_t i = 0; i < nbody; i++) len += body[i].len;
  char length[48];
  snprintf(length, sizeof length, "Content-Length: %zu\r\n", len);
  if (lp_lua_native_head(h, srv, status_line, extra, block, length, keep, http10) != 0) {
    lp_conn_abort(&s->conn); /* done already (events taken, event stored): no half answer */
    return;
  }
  lp_slice bufs[8] = {{h->data, h->len}};
  for (size_t i = 0; i < nbody && i < 7; i++) bufs[i + 1] = body[i];
  lp_conn_write(&s->conn, bufs, 1 + (nbody < 7 ? nbody : 7));
  srv->fast_answers++;
  lp_conn_response_done(&s->conn, keep, now_ms(srv));
}

/* A 200 with the handler's header block. */
static void answer_200(sconn *s, const native_handler *nh, int keep_alive, int http10, lp_slice extra,
                       const lp_slice *body, size_t nbody) {
  lp_slice block = {nh->block, nh->block_len};
  lp_lua_native_answer(s, "HTTP/1.1 200 OK\r\n", block, keep_alive, http10, extra, body, nbody);
}

/* ---------------------------------------------------------------------------------------------
 * Long polls parked in C: a poll with nothing to answer yet waits on its store subscription
 * (lp_store_wait_owned, the connection's lp_waiter is the owner) with its timeout in the
 * server's lp_deadlines, until a publish wakes it (parked_woken, called by whoever published:
 * the store's Lua binding or fast_publish), its time is up (time_out) or its client leaves
 * (unpark from host_gone / host_close). No Lua runs on any of these paths.
 * In Redis mode (NATIVE_CACHED) the poll waits on the engine's node-local cache instead
 * (lp_cache_wait): the pub/sub event the engine hands the cache wakes it (cache:add, the same
 * parked_woken); a reset of the cache ends it (parked_ended: the timeout answer with its floor);
 * its timeout needs a Redis mark, so it waits in its handler's expiring list, still parked, for
 * the one mark its batch asks Lua for (expire_cached, ask_mark, settle_marks). */

static void poll_timer_arm(server *srv);

/* Takes s out of its handler's expiring list, if it is in it. */
static void exp_remove(sconn *s) {
  native_handler *nh = s->parked_by;
  if (!s->mark_batch) return;
  if (s->exp_prev)
    s->exp_prev->exp_next = s->exp_next;
  else
    nh->exp_head = s->exp_next;
  if (s->exp_next)
    s->exp_next->exp_prev = s->exp_prev;
  else
    nh->exp_tail = s->exp_prev;
  s->exp_prev = s->exp_next = NULL;
  s->mark_batch = 0;
}

/* Takes s out of its handler's list and the timeouts; cancel: the store subscription is still
 * there (the client left, the time is up). */
static void unpark(sconn *s, int cancel) {
  native_handler *nh = s->parked_by;
  if (!nh) return;
  if (cancel && s->parked_cache)
    lp_cache_cancel(s->parked_cache, s->parked_handle);
  else if (cancel)
    lp_store_cancel(s->parked_store, s->parked_handle);
  exp_remove(s);
  if (s->park_prev)
    s->park_prev->park_next = s->park_next;
  else
    nh->parked = s->park_next;
  if (s->park_next) s->park_next->park_prev = s->park_prev;
  s->park_prev = s->park_next = NULL;
  nh->nparked--;
  lp_deadlines_remove(&s->srv->deadlines, &s->deadline);
  s->parked_by = NULL;
  s->parked_store = NULL;
  s->parked_cache = NULL;
  free(s->parked_extra); /* unless taken before (take_extra) */
  s->parked_extra = NULL;
  s->parked_extra_len = 0;
}

/* The parked poll's own header lines, handed over to the caller (free them after the answer);
 * taken before unpark, which frees what is left. */
static lp_slice take_extra(sconn *s) {
  lp_slice extra = {s->parked_extra, s->parked_extra_len};
  s->parked_extra = NULL;
  s->parked_extra_len = 0;
  return extra;
}

static void parked_woken(lp_waiter *w, const lp_slice *answer, size_t n) {
  sconn *s = CONTAINER(w, sconn, waiter);
  native_handler *nh = s->parked_by;
  if (!nh) return;
  lp_slice extra = take_extra(s);
  unpark(s, 0); /* the publish ended the subscription */
  answer_200(s, nh, s->parked_keep, s->parked_http10, extra, answer, n);
  free((char *)extra.ptr);
}

/* The golongpoll timeout answer with timestamp T. cancel: the wait is still there. */
static void answer_timeout_at(sconn *s, int64_t T, int cancel) {
  native_handler *nh = s->parked_by;
  lp_slice extra = take_extra(s);
  unpark(s, cancel);
  char body[96];
  int len = snprintf(body, sizeof body, "{\"timeout\":\"no events before timeout\",\"timestamp\":%lld}", (long long)T);
  lp_slice piece = {body, (size_t)len};
  answer_200(s, nh, s->parked_keep, s->parked_http10, extra, &piece, 1);
  free((char *)extra.ptr);
}

/* The store closed under the poll (the manager answers its polls before it closes the store;
 * this is the backstop): the manager's 503. A cache ended the wait (a reset: pub/sub lost, a
 * gap, a new epoch, the engine closing): events may have been missed, so the timeout answer
 * with the poll's floor, from which the client's next poll reads what it missed. */
static void parked_ended(lp_waiter *w) {
  sconn *s = CONTAINER(w, sconn, waiter);
  if (!s->parked_by) return;
  if (s->parked_cache) return answer_timeout_at(s, s->parked_floor, 0);
  unpark(s, 0);
  lp_conn_fail(&s->conn, 503, "manager is shut down", now_ms(s->srv));
}

static const lp_waiter_ops PARKED_OPS = {.woken = parked_woken, .ended = parked_ended};

/* The golongpoll timeout answer, with a timestamp no later event reaches (the store's mark; in
 * Redis mode the poll's floor: use this only when no Redis mark can be had). */
static void answer_timeout(sconn *s) {
  int64_t T = s->parked_cache ? s->parked_floor : lp_store_mark_time(s->parked_store, wall_clock_ms());
  answer_timeout_at(s, T, 1);
}

/* Every poll of nh's expiring list that joined batch b or an earlier one gets the timeout answer:
 * with T, the batch's Redis mark (has_T), or its floor. Those still parked when the mark came got
 * no event published before it (the marker follows every such event on pub/sub). */
static void settle_marks(native_handler *nh, uint64_t b, int has_T, int64_t T) {
  sconn *s;
  while ((s = nh->exp_head) != NULL && s->mark_batch <= b)
    answer_timeout_at(s, has_T && T > s->parked_floor ? T : s->parked_floor, 1);
}

/* Asks the manager's mark function (on L, protected; errors logged through srv when given) for
 * the mark of nh's open batch, and opens the next; without the function, or when the call fails,
 * the batch is answered with its polls' floors. */
static void ask_mark(lua_State *L, server *srv, native_handler *nh) {
  nh->mark_wanted = 0;
  uint64_t b = nh->batch;
  if (!nh->exp_head || nh->exp_tail->mark_batch != b) return; /* answered meanwhile */
  nh->batch = b + 1; /* polls timing out while the mark is asked for join the next batch */
  int status = LUA_ERRRUN;
  if (nh->mark_ref != LUA_NOREF) {
    lua_rawgeti(L, LUA_REGISTRYINDEX, nh->mark_ref);
    lua_pushinteger(L, (lua_Integer)b);
    status = lp_lua_engine_pcall(L, srv, 1);
  }
  if (status != LUA_OK) settle_marks(nh, b, 0, 0);
}

/* A poll parked on a cache whose time is up: it joins its handler's open batch (kept parked). */
static void expire_cached(sconn *s, native_handler **wanted) {
  native_handler *nh = s->parked_by;
  if (s->mark_batch) return;
  s->mark_batch = nh->batch;
  s->exp_next = NULL;
  s->exp_prev = nh->exp_tail;
  if (nh->exp_tail)
    nh->exp_tail->exp_next = s;
  else
    nh->exp_head = s;
  nh->exp_tail = s;
  if (!nh->mark_wanted) {
    nh->mark_wanted = 1;
    nh->mark_next = *wanted;
    *wanted = nh;
  }
}

static void on_poll_timer(uv_timer_t *t) {
  server *srv = SERVER_OF(t, poll_timer);
  srv->poll_timer_at = 0;
  uint64_t now = now_ms(srv);
  lp_deadline *e;
  native_handler *wanted = NULL;
  while ((e = lp_deadlines_pop_expired(&srv->deadlines, now)) != NULL) {
    sconn *s = CONTAINER(e, sconn, deadline);
    if (s->parked_by && s->parked_cache)
      expire_cached(s, &wanted);
    else if (s->parked_by)
      answer_timeout(s);
    else if (s->stream_by)
      lp_lua_stream_heartbeat(s);
  }
  while (wanted) { /* one mark per handler and turn */
    native_handler *nh = wanted;
    wanted = nh->mark_next;
    ask_mark(srv->L, srv, nh);
  }
  poll_timer_arm(srv);
}

/* Sets the timer for the earliest timeout, unless it fires before that already. */
static void poll_timer_arm(server *srv) {
  uint64_t at;
  if (!lp_deadlines_next(&srv->deadlines, &at)) return;
  if (srv->poll_timer_at != 0 && srv->poll_timer_at <= at) return;
  uint64_t now = now_ms(srv);
  srv->poll_timer_at = at > 0 ? at : 1;
  uv_timer_start(&srv->poll_timer, on_poll_timer, at > now ? at - now : 0, 0);
}

/* Parks the poll of s on store, or on cache (Redis mode, with its timeout floor): 1 when it waits
 * now, 0 when the Lua handler must take it (a connection above the cap may not wait; the store
 * refused, e.g. max_waiting_per_category: Lua says why). */
static int park(sconn *s, native_handler *nh, lp_store *store, lp_cache *cache, int64_t floor,
                const lp_http_event *head, lp_slice extra, const lp_fast_sub *sub) {
  server *srv = s->srv;
  if (s->reserve || srv->closing || s->parked_by) return 0;
  char *extra_copy = NULL;
  if (extra.len) {
    extra_copy = malloc(extra.len);
    if (!extra_copy) return 0;
    memcpy(extra_copy, extra.ptr, extra.len);
  }
  s->waiter.ops = &PARKED_OPS;
  uint64_t handle;
  int rc = cache ? lp_cache_wait(cache, sub->categories, sub->ncategories, &s->waiter, &handle)
                 : lp_store_wait_owned(store, sub->categories, sub->ncategories, &s->waiter, &handle);
  if (rc != LP_OK) {
    free(extra_copy);
    return 0;
  }
  if (lp_deadlines_add(&srv->deadlines, &s->deadline, (uint64_t)sub->timeout_s * 1000, now_ms(srv)) != 0) {
    if (cache)
      lp_cache_cancel(cache, handle);
    else
      lp_store_cancel(store, handle);
    free(extra_copy);
    return 0;
  }
  s->parked_extra = extra_copy;
  s->parked_extra_len = extra.len;
  s->parked_by = nh;
  s->parked_store = store;
  s->parked_cache = cache;
  s->parked_floor = floor;
  s->mark_batch = 0;
  s->parked_handle = handle;
  s->parked_keep = head->keep_alive != 0;
  s->parked_http10 = head->minor == 0;
  s->park_prev = NULL;
  s->park_next = nh->parked;
  if (nh->parked) nh->parked->park_prev = s;
  nh->parked = s;
  nh->nparked++;
  poll_timer_arm(srv);
  return 1;
}

/* Every poll parked on nh gets the timeout answer now (the manager shuts down). */
static void answer_parked(native_handler *nh) {
  while (nh->parked) answer_timeout(nh->parked);
}

/* ---------------------------------------------------------------------------------------------
 * CORS, as longpoll.cors wraps the manager's handlers */

lp_slice lp_lua_native_header(const lp_http_event *head, const char *name, size_t *count) {
  size_t len = strlen(name), n = 0;
  lp_slice value = {NULL, 0};
  for (size_t i = 0; i < head->nheaders; i++) {
    lp_slice h = head->headers[i].name;
    if (h.len == len && memcmp(h.ptr, name, len) == 0 && n++ == 0) value = head->headers[i].value;
  }
  if (count) *count = n;
  return value;
}

static lp_slice header_value(const lp_http_event *head, const char *name) {
  return lp_lua_native_header(head, name, NULL);
}

/* The handler's CORS lines for this request into out (emptied first; lp_cors_lines); *allowed:
 * whether its Origin is allowed. 0, or -1 when memory ran out. */
int lp_lua_native_cors_lines(const native_handler *nh, const lp_http_event *head, lp_buf *out, int *allowed) {
  lp_buf_reset(out);
  lp_slice origin = header_value(head, "origin");
  *allowed = !nh->cors.on || lp_cors_allowed(&nh->cors, origin);
  return lp_cors_lines(&nh->cors, origin, out);
}

/* An allowed preflight (OPTIONS with Origin and Access-Control-Request-Method) to a route of a
 * handler under the policy: 204 with the policy's headers. 1 when answered, 0 when the Lua
 * handler decides (not allowed, not a preflight). */
static int fast_preflight(sconn *s, const native_handler *nh, const lp_http_event *head) {
  server *srv = s->srv;
  int allowed;
  if (!nh->cors.on || !header_value(head, "origin").ptr || !header_value(head, "access-control-request-method").ptr)
    return 0;
  if (lp_lua_native_cors_lines(nh, head, &srv->fast_extra, &allowed) != 0 || !allowed) return 0;
  int keep = head->keep_alive && lp_conn_may_keep_alive(&s->conn);
  lp_buf *h = &srv->fast_head;
  lp_slice extra = {srv->fast_extra.data, srv->fast_extra.len}, lines = {nh->cors.preflight, nh->cors.preflight_len};
  if (lp_lua_native_head(h, srv, "HTTP/1.1 204 No Content\r\n", extra, lines, "", keep, head->minor == 0) != 0)
    return 0;
  lp_slice bufs[1] = {{h->data, h->len}};
  lp_conn_write(&s->conn, bufs, 1);
  srv->fast_answers++;
  lp_conn_response_done(&s->conn, keep, now_ms(srv));
  return 1;
}

/* The answer to a keyed publish, naming its event ({"success":true,"id":..,"timestamp":..}), the
 * same for the first request and its replays; the answer's own lines are in srv->fast_extra. */
static void answer_keyed(sconn *s, native_handler *nh, const lp_http_event *head, lp_slice id, int64_t timestamp) {
  server *srv = s->srv;
  static const char HEAD[] = "{\"success\":true,\"id\":\"";
  char tail[64];
  snprintf(tail, sizeof tail, "\",\"timestamp\":%lld}", (long long)timestamp);
  lp_slice pieces[3] = {{HEAD, sizeof HEAD - 1}, id, {tail, strlen(tail)}};
  lp_slice extra = {srv->fast_extra.data, srv->fast_extra.len};
  answer_200(s, nh, head->keep_alive, head->minor == 0, extra, pieces, 3);
}

/* An Idempotency-Key's answer when the key was seen before (a replay: the first event's answer
 * with Idempotent-Replayed; a mismatch: 422), as publish_request in manager.lua writes it. */
static void answer_seen_key(sconn *s, native_handler *nh, const lp_http_event *head, int code,
                            const lp_keys_prior *prior) {
  server *srv = s->srv;
  if (code == LP_KEYS_REPLAY) {
    if (lp_buf_append_str(&srv->fast_extra, "Idempotent-Replayed: true\r\n") != 0) {
      lp_conn_abort(&s->conn); /* counted as a replay already: no half answer */
      return;
    }
    answer_keyed(s, nh, head, prior->id, prior->timestamp);
    return;
  }
  lp_slice extra = {srv->fast_extra.data, srv->fast_extra.len}, block = {nh->block, nh->block_len};
  lp_slice answer = {nh->mismatch_body, strlen(nh->mismatch_body)};
  lp_lua_native_answer(s, "HTTP/1.1 422 Unprocessable Content\r\n", block, head->keep_alive, head->minor == 0, extra,
                       &answer, 1);
}

/* A publish to the manager's handler stored here: 1 when answered, 0 when the Lua handler must
 * run. Only publishes that wake no Lua waiter (no Lua long poll, stream or watcher waits on the
 * category; the polls parked here are answered here) are taken: the manager registers this
 * handler only when it has no add-on to tell. An Idempotency-Key is looked up and set here, in
 * the engine's table (lp_keys), once nothing else can send the publish to Lua. */
static int fast_publish(sconn *s, native_route *r, const lp_http_event *head, lp_slice body) {
  server *srv = s->srv;
  native_handler *nh = r->h;
  size_t nkeys;
  lp_slice header = lp_lua_native_header(head, "idempotency-key", &nkeys);
  lp_slice key = {NULL, 0};
  if (nkeys > 0 && (nkeys > 1 || !nh->keys || lp_keys_check(header, &key) != 0)) return 0; /* Lua says why */
  lp_publish_body pb;
  const char *err;
  if (lp_json_parse_publish(body.ptr ? body.ptr : "", body.len, &pb, &err) != 0) return 0;
  int ok = pb.has_category && pb.category.len >= 1 && pb.category.len <= nh->limits.max_category_bytes && pb.has_data;
  lp_store *store = ok ? route_store(srv, r) : NULL;
  lp_slice category = {pb.category.data, pb.category.len};
  lp_store_stats st;
  if (store) lp_store_get_stats(store, &st);
  int allowed;
  if (!store || lp_store_unowned_waiting_in(store, category) > 0 ||
      lp_woken_reserve(&srv->fast_woken, st.waiting) != LP_OK ||
      lp_lua_native_cors_lines(nh, head, &srv->fast_extra, &allowed) != 0) {
    lp_buf_free(&pb.category);
    return 0;
  }
  lp_slice data = {pb.data, pb.data_len};
  uint64_t ticket = 0;
  if (key.ptr) {
    lp_fingerprint fp;
    lp_fingerprint_init(&fp);
    lp_fingerprint_add(&fp, category.ptr, category.len);
    lp_fingerprint_add(&fp, data.ptr, data.len);
    char hex[LP_FINGERPRINT_LEN + 1];
    lp_fingerprint_hex(&fp, hex);
    lp_keys_prior prior;
    int code = lp_keys_begin(nh->keys, key, (lp_slice){hex, LP_FINGERPRINT_LEN}, wall_clock_ms(), &ticket, &prior);
    if (code != LP_KEYS_NEW) {
      lp_buf_free(&pb.category);
      /* busy (counted nowhere) and out of memory: the Lua handler begins again and says so */
      if (code != LP_KEYS_REPLAY && code != LP_KEYS_MISMATCH) return 0;
      answer_seen_key(s, nh, head, code, &prior);
      return 1;
    }
  }
  lp_published out;
  int rc = lp_store_publish(store, category, data, wall_clock_ms(), lp_woken_add, &srv->fast_woken, &out);
  if (rc != LP_OK) { /* refused, nothing stored: the Lua handler says why (the key is free again) */
    if (key.ptr) lp_keys_abort(nh->keys, ticket, key);
    lp_buf_free(&pb.category);
    return 0;
  }
  lp_buf_free(&pb.category);
  lp_woken_answer(&srv->fast_woken, &out);
  lp_slice extra = {srv->fast_extra.data, srv->fast_extra.len};
  if (!key.ptr) {
    static const lp_slice SUCCESS = {"{\"success\":true}", 16};
    answer_200(s, nh, head->keep_alive, head->minor == 0, extra, &SUCCESS, 1);
    return 1;
  }
  lp_slice id = {out.id, strlen(out.id)};
  if (lp_keys_commit(nh->keys, ticket, key, id, out.timestamp) != 0) lp_keys_abort(nh->keys, ticket, key);
  answer_keyed(s, nh, head, id, out.timestamp);
  return 1;
}

/* A long poll to the manager's handler, served here: answered from the store when events after
 * its cursor exist, else parked (when may_park) until one is published. 1 when served, 0 when
 * the Lua handler must run (an error, anything unusual, a poll that may not be parked). */
static int fast_subscription(sconn *s, native_handler *nh, lp_store *store, const lp_http_event *head, lp_slice query,
                             int may_park) {
  server *srv = s->srv;
  lp_fast_sub sub;
  if (!store || lp_fast_parse_subscription(query, &nh->limits, &srv->fast_scratch, &sub) != 1) return 0;
  int allowed;
  if (lp_lua_native_cors_lines(nh, head, &srv->fast_extra, &allowed) != 0) return 0;
  lp_slice extra = {srv->fast_extra.data, srv->fast_extra.len};
  if (sub.has_since) {
    lp_buf *body = &srv->fast_body;
    lp_buf_reset(body);
    size_t count = 0;
    int missed = 0;
    int rc = lp_store_fetch(store, sub.categories, sub.ncategories, sub.since, sub.has_last_id ? sub.last_id : NULL,
                            wall_clock_ms(), body, &count, &missed);
    if (rc != LP_OK) return 0;
    if (count > 0) {
      lp_slice answer = {body->data, body->len};
      answer_200(s, nh, head->keep_alive, head->minor == 0, extra, &answer, 1);
      /* one huge answer should not pin its memory */
      if (body->cap > (1u << 20)) lp_buf_free(body);
      return 1;
    }
  }
  return may_park && park(s, nh, store, NULL, 0, head, extra, &sub);
}

/* Whether a poll on sub's categories may park on the cache under max_waiting_per_category, which
 * counts the polls parked there and the engine's own waiters together; 0: the Lua handler decides
 * (and refuses when the category is full). */
static int room_to_park(server *srv, const native_handler *nh, const lp_cache *cache, const lp_fast_sub *sub) {
  if (nh->max_waiting == 0) return 1;
  lua_State *L = srv->L;
  lua_rawgeti(L, LUA_REGISTRYINDEX, nh->waiting_ref);
  const lp_store *waiting = lp_lua_store_of(L, -1);
  lua_pop(L, 1);
  for (size_t i = 0; i < sub->ncategories; i++) {
    size_t n = lp_cache_parked_in(cache, sub->categories[i]);
    if (waiting) n += lp_store_waiting_in(waiting, sub->categories[i]);
    if (n >= nh->max_waiting) return 0;
  }
  return 1;
}

/* A long poll to the manager's handler in Redis mode, served here when the engine's node-local
 * cache (lp_cache) can tell: answered when the cache holds its events, parked on the cache (when
 * may_park) when nothing comes after its cursor up to the cache's position (an LP_CACHE_WAIT; a
 * poll without a cursor waits from that position). 1 when served, 0 when the Lua handler must run
 * (the cache cannot tell: a read from Redis; an error, anything unusual). */
static int fast_cached(sconn *s, native_handler *nh, lp_cache *cache, const lp_http_event *head, lp_slice query,
                       int may_park) {
  server *srv = s->srv;
  lp_fast_sub sub;
  if (!cache || lp_fast_parse_subscription(query, &nh->limits, &srv->fast_scratch, &sub) != 1) return 0;
  lp_buf *body = &srv->fast_body;
  lp_buf_reset(body);
  lp_cache_pos cursor;
  /* without since_time the poll waits for what comes after the node's position, as the Redis
   * engine's Lua waiter does (Waiters:add) */
  int r = !sub.has_since ? lp_cache_now(cache, sub.categories, sub.ncategories, &cursor)
                         : lp_cache_answer(cache, sub.categories, sub.ncategories, sub.since,
                                           sub.has_last_id ? sub.last_id : NULL, body, &cursor);
  if (r != LP_CACHE_EVENTS && r != LP_CACHE_WAIT) return 0;
  int allowed;
  if (lp_lua_native_cors_lines(nh, head, &srv->fast_extra, &allowed) != 0) return 0;
  lp_slice extra = {srv->fast_extra.data, srv->fast_extra.len};
  if (r == LP_CACHE_WAIT) {
    /* The floor: the cache knows every event of these categories up to cursor and none comes after
     * the client's; some stamped cursor.ts may still come (a later seq). Continuing from the floor
     * skips none, and repeats none the client got unless cursor.ts is its since_time. */
    int64_t floor = !sub.has_since || cursor.ts - 1 > sub.since ? cursor.ts - 1 : sub.since;
    return may_park && room_to_park(srv, nh, cache, &sub) && park(s, nh, NULL, cache, floor, head, extra, &sub);
  }
  lp_slice answer = {body->data, body->len};
  answer_200(s, nh, head->keep_alive, head->minor == 0, extra, &answer, 1);
  if (body->cap > (1u << 20)) lp_buf_free(body);
  return 1;
}

/* ---------------------------------------------------------------------------------------------
 * The way in: host_request and conn:native (lp_lua_server.c) */

int lp_lua_native_serve(sconn *s, const lp_http_event *head, lp_slice body) {
  server *srv = s->srv;
  if (srv->nroutes > 0) {
    int get = head->method.len == 3 && memcmp(head->method.ptr, "GET", 3) == 0;
    int post = head->method.len == 4 && memcmp(head->method.ptr, "POST", 4) == 0;
    int options = head->method.len == 7 && memcmp(head->method.ptr, "OPTIONS", 7) == 0;
    lp_slice path, query;
    if ((get || post || options) && lp_http_split_target(head->target, &path, &query) == 0 &&
        !memchr(path.ptr, '%', path.len)) {
      native_route *r = find_route(srv, options ? ROUTE_OPTIONS : post ? ROUTE_POST : ROUTE_GET, path);
      if (r && r->h->enabled) {
        int served = options                       ? fast_preflight(s, r->h, head)
                     : r->h->kind == NATIVE_CACHED ? fast_cached(s, r->h, route_cache(srv, r), head, query, 1)
                     : r->h->kind == NATIVE_SSE    ? lp_lua_stream_serve(s, r->h, route_store(srv, r), head, query)
                     : r->h->kind == NATIVE_STATS  ? lp_lua_stats_serve(s, r->h, route_store(srv, r), head, path, query)
                     : r->h->kind == NATIVE_SUBSCRIPTION
                         ? fast_subscription(s, r->h, route_store(srv, r), head, query, 1)
                     : r->h->kind == NATIVE_REDIS_PUBLISH ? lp_lua_redis_publish_serve(s, r, head, body)
                                                          : fast_publish(s, r, head, body);
        if (served) return 1;
        s->native_declined = 1; /* the Lua handler it falls to need not ask again (res:native) */
      }
    }
  }
  return 0;
}

int lp_lua_native_handback(sconn *s, native_handler *h, lp_store *store, lp_cache *cache, const lp_http_event *head,
                           lp_slice path, lp_slice query, int watched) {
  return h->kind == NATIVE_CACHED  ? fast_cached(s, h, cache, head, query, !watched)
         : h->kind == NATIVE_SSE   ? !watched && lp_lua_stream_serve(s, h, store, head, query)
         : h->kind == NATIVE_STATS ? lp_lua_stats_serve(s, h, store, head, path, query)
                                   : fast_subscription(s, h, store, head, query, !watched);
}

void lp_lua_native_unpark(sconn *s) {
  unpark(s, 1);
  lp_lua_redis_publish_forget(s);
}

void lp_lua_native_timer_arm(server *srv) { poll_timer_arm(srv); }

/* ---------------------------------------------------------------------------------------------
 * Native handlers */

static size_t opt_size_at(lua_State *L, int t, const char *k) {
  lua_getfield(L, t, k);
  int ok;
  lua_Integer v = lua_tointegerx(L, -1, &ok);
  if (!ok || v < 1) luaL_error(L, "option '%s' must be a positive integer", k);
  lua_pop(L, 1);
  return (size_t)v;
}

/* cors = { any = bool, origins = { origin, ... }, credentials = bool, preflight = "header
 * lines" } (made by longpoll.cors Policy:native). The handler's userdata owns what is read here
 * from the moment it is set (its __gc frees it), even on an error. */
static void read_cors(lua_State *L, int t, lp_cors *c) {
  luaL_checktype(L, t, LUA_TTABLE);
  c->on = 1;
  lua_getfield(L, t, "any");
  c->any = lua_toboolean(L, -1);
  lua_getfield(L, t, "credentials");
  c->credentials = lua_toboolean(L, -1);
  lua_getfield(L, t, "preflight");
  size_t len;
  const char *lines = luaL_checklstring(L, -1, &len);
  if (lp_cors_set_preflight(c, lines, len) != 0) luaL_error(L, "out of memory");
  lua_getfield(L, t, "origins");
  luaL_checktype(L, -1, LUA_TTABLE);
  size_t n = (size_t)lua_rawlen(L, -1);
  for (size_t i = 0; i < n; i++) {
    lua_rawgeti(L, -1, (lua_Integer)i + 1);
    const char *origin = luaL_checklstring(L, -1, &len);
    if (lp_cors_add_origin(c, origin, len) != 0) luaL_error(L, "out of memory");
    lua_pop(L, 1);
  }
  lua_pop(L, 4);
}

/* core.native_subscription(store, { max_category_bytes, max_categories_per_subscription,
 *   max_longpoll_timeout_seconds, header_block[, cors] }) -> handler: what a server needs to answer the
 * manager's catch-up long polls itself (see longpoll.http.native). handler:disable() sends
 * every later request to the Lua handler (the manager shutting down). */
static int make_native(lua_State *L, int kind) {
  if (kind == NATIVE_CACHED)
    luaL_argcheck(L, lp_lua_cache_of(L, 1) != NULL, 1, "a cache expected");
  else if (kind == NATIVE_REDIS_PUBLISH)
    luaL_argcheck(L, lp_lua_redis_publisher_check(L, 1), 1, "a Redis publisher expected");
  else
    luaL_argcheck(L, lp_lua_store_of(L, 1) != NULL, 1, "an open store expected");
  luaL_checktype(L, 2, LUA_TTABLE);
  native_handler *h = lua_newuserdatauv(L, sizeof *h, 2);
  memset(h, 0, sizeof *h);
  h->mark_ref = h->waiting_ref = LUA_NOREF;
  h->batch = 1;
  luaL_setmetatable(L, NATIVE_MT);
  h->kind = kind;
  if (kind != NATIVE_STATS) h->limits.max_category_bytes = opt_size_at(L, 2, "max_category_bytes");
  if (h->kind != NATIVE_PUBLISH && h->kind != NATIVE_REDIS_PUBLISH && h->kind != NATIVE_STATS)
    h->limits.max_categories = opt_size_at(L, 2, "max_categories_per_subscription");
  if (h->kind == NATIVE_SUBSCRIPTION || h->kind == NATIVE_CACHED)
    h->limits.max_timeout_s = (int64_t)opt_size_at(L, 2, "max_longpoll_timeout_seconds");
  if (h->kind == NATIVE_SSE) {
    h->heartbeat_ms = opt_size_at(L, 2, "heartbeat_ms");
    h->retry_ms = opt_size_at(L, 2, "retry_ms");
  }
  lua_getfield(L, 2, "header_block");
  size_t len;
  const char *block = luaL_checklstring(L, -1, &len);
  h->block = malloc(len + 1);
  if (!h->block) return luaL_error(L, "out of memory");
  memcpy(h->block, block, len + 1);
  h->block_len = len;
  lua_pop(L, 1);
  lua_getfield(L, 2, "cors");
  if (!lua_isnil(L, -1)) read_cors(L, lua_gettop(L), &h->cors);
  lua_pop(L, 1);
  if (kind == NATIVE_CACHED) {
    lua_getfield(L, 2, "mark");
    if (lua_isfunction(L, -1))
      h->mark_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    else
      lua_pop(L, 1);
    lua_getfield(L, 2, "max_waiting_per_category");
    h->max_waiting = (size_t)luaL_optinteger(L, -1, 0);
    lua_pop(L, 1);
    lua_getfield(L, 2, "waiting_store");
    if (lp_lua_store_of(L, -1))
      h->waiting_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    else
      lua_pop(L, 1);
  }
  if (kind == NATIVE_PUBLISH) {
    lua_getfield(L, 2, "keys");
    h->keys = lp_lua_keys_of(L, -1);
    if (h->keys) {
      lua_setiuservalue(L, -2, 2); /* keeps them alive */
      size_t n;
      lua_getfield(L, 2, "mismatch_body");
      const char *m = luaL_checklstring(L, -1, &n);
      if (!(h->mismatch_body = strdup(m))) return luaL_error(L, "out of memory");
      lua_pop(L, 1);
    } else {
      lua_pop(L, 1);
    }
  }
  if (kind == NATIVE_STATS) {
    lp_lua_stats_read(L, 2, h);
    lua_pushvalue(L, 2); /* keeps what h->stats points at alive */
    lua_setiuservalue(L, -2, 2);
  }
  lua_pushvalue(L, 1);
  lua_setiuservalue(L, -2, 1);
  h->enabled = 1;
  return 1;
}

static int l_native_subscription(lua_State *L) { return make_native(L, NATIVE_SUBSCRIPTION); }

/* core.native_cached_subscription(cache, { as native_subscription, mark = function(batch),
 *   max_waiting_per_category, waiting_store = the engine's store of waiters }) ->
 * handler: the manager's long-poll handler in Redis mode, for the catch-ups the engine's
 * node-local cache (core.new_cache) answers with events and the polls it parks on that cache
 * (nothing after the cursor); everything else goes to Lua. A parked poll whose time is up gets
 * the timeout answer once mark(batch) handed the batch's Redis mark to handler:marked(batch, T)
 * (without mark, or with T nil: its floor, see fast_cached). */
static int l_native_cached_subscription(lua_State *L) { return make_native(L, NATIVE_CACHED); }

/* core.native_publish(store, { max_category_bytes, header_block[, cors][, keys, mismatch_body] })
 * -> handler: the manager's publish handler, for publishes that wake nobody (the manager
 * registers it only when it has no add-on to tell). keys: the engine's Idempotency-Keys
 * (core.new_keys), so keyed publishes are served too; mismatch_body: the 422 answer's body. */
static int l_native_publish(lua_State *L) { return make_native(L, NATIVE_PUBLISH); }

/* core.native_redis_publish(publisher, { max_category_bytes, header_block[, cors] }) -> handler:
 * the manager's publish handler in Redis mode, for publishes its publisher (core.redis_publisher)
 * sends to Redis from C (lp_lua_redis_publish.c). */
static int l_native_redis_publish(lua_State *L) { return make_native(L, NATIVE_REDIS_PUBLISH); }

/* core.native_sse(store, { max_category_bytes, max_categories_per_subscription, heartbeat_ms,
 *   retry_ms, header_block[, cors] }) -> handler: the manager's SSE handler in memory mode, whose
 * streams the engine serves in C (HEAD and errors go to Lua). header_block: the stream's header
 * lines (longpoll.answers STREAM). */
static int l_native_sse(lua_State *L) { return make_native(L, NATIVE_SSE); }

/* core.native_stats(store, { header_block (JSON), prometheus_block, page_block, page_before,
 *   page_after (the dashboard page around its stats URL), categories (stats_categories),
 *   keys (core.new_keys), polls, streams (the native long-poll and SSE handlers), lua_polls,
 *   lua_streams (gauges: the long polls and streams Lua serves)[, cors] }) -> handler: the
 * manager's stats handler in memory mode; HEAD and errors go to Lua. */
static int l_native_stats(lua_State *L) { return make_native(L, NATIVE_STATS); }

/* handler:disable(): every later request goes to the Lua handler, the polls parked on the
 * handler get the timeout answer now (in Redis mode once the mark they all wait for came,
 * handler:marked) and its streams end (the manager shutting down). */
static int native_disable(lua_State *L) {
  native_handler *h = luaL_checkudata(L, 1, NATIVE_MT);
  h->enabled = 0;
  if (h->kind == NATIVE_CACHED && h->mark_ref != LUA_NOREF) {
    native_handler *ignored = NULL;
    for (sconn *s = h->parked; s; s = s->park_next) expire_cached(s, &ignored);
    ask_mark(L, NULL, h);
    luaL_unref(L, LUA_REGISTRYINDEX, h->mark_ref); /* it holds the manager: no more marks */
    h->mark_ref = LUA_NOREF;
    return 0; /* answered when the mark comes, or when the engine closes the cache (floors) */
  }
  answer_parked(h);
  lp_lua_stream_finish_all(h);
  return 0;
}

/* handler:streams() -> how many SSE streams it serves now. */
static int native_streams(lua_State *L) {
  native_handler *h = luaL_checkudata(L, 1, NATIVE_MT);
  lua_pushinteger(L, (lua_Integer)h->nstreams);
  return 1;
}

/* handler:marked(batch, T | nil): the Redis mark of a batch of timed-out parked polls (nil: none
 * could be had): those still parked get the timeout answer (T, or their floor). */
static int native_marked(lua_State *L) {
  native_handler *h = luaL_checkudata(L, 1, NATIVE_MT);
  lua_Integer b = luaL_checkinteger(L, 2);
  int has_T = !lua_isnoneornil(L, 3);
  lua_Integer T = has_T ? luaL_checkinteger(L, 3) : 0;
  if (b > 0) settle_marks(h, (uint64_t)b, has_T, (int64_t)T);
  return 0;
}

/* handler:parked() -> how many long polls wait parked on it. */
static int native_parked(lua_State *L) {
  native_handler *h = luaL_checkudata(L, 1, NATIVE_MT);
  lua_pushinteger(L, (lua_Integer)h->nparked);
  return 1;
}

static int native_gc(lua_State *L) {
  native_handler *h = luaL_checkudata(L, 1, NATIVE_MT);
  answer_parked(h);
  lp_lua_stream_finish_all(h);
  luaL_unref(L, LUA_REGISTRYINDEX, h->mark_ref);
  luaL_unref(L, LUA_REGISTRYINDEX, h->waiting_ref);
  h->mark_ref = h->waiting_ref = LUA_NOREF;
  lp_cors_free(&h->cors);
  lp_lua_stats_free(h->stats);
  h->stats = NULL;
  free(h->mismatch_body);
  h->mismatch_body = NULL;
  h->keys = NULL;
  free(h->block);
  h->block = NULL;
  h->enabled = 0;
  return 0;
}

static void drop_route(lua_State *L, server *srv, size_t i) {
  luaL_unref(L, LUA_REGISTRYINDEX, srv->routes[i].ref);
  free(srv->routes[i].path);
  srv->routes[i] = srv->routes[--srv->nroutes];
}

/* server:native_route(method, path, handler | nil): a GET (a subscription handler) or POST (a
 * publish handler) to path is answered by the native handler when it can, and an OPTIONS
 * preflight by a handler under a CORS policy (nil: never). */
int lp_lua_native_route(lua_State *L, server *srv) {
  const char *method = luaL_checkstring(L, 2);
  int post = strcmp(method, "POST") == 0 ? ROUTE_POST : strcmp(method, "OPTIONS") == 0 ? ROUTE_OPTIONS : ROUTE_GET;
  luaL_argcheck(L, post != ROUTE_GET || strcmp(method, "GET") == 0, 2, "GET, POST or OPTIONS");
  size_t len;
  const char *path = luaL_checklstring(L, 3, &len);
  native_handler *h = lua_isnoneornil(L, 4) ? NULL : luaL_checkudata(L, 4, NATIVE_MT);
  if (h && post == ROUTE_OPTIONS && !h->cors.on) h = NULL; /* only preflights are answered */
  if (h && post != ROUTE_OPTIONS &&
      (post == ROUTE_POST) != (h->kind == NATIVE_PUBLISH || h->kind == NATIVE_REDIS_PUBLISH))
    h = NULL; /* not for this method */
  lp_slice p = {path, len};
  native_route *r = find_route(srv, post, p);
  if (r) drop_route(L, srv, (size_t)(r - srv->routes));
  if (!h) return 0;
  native_route *grown = realloc(srv->routes, (srv->nroutes + 1) * sizeof *grown);
  if (!grown) return luaL_error(L, "out of memory");
  srv->routes = grown;
  char *copy = malloc(len + 1);
  if (!copy) return luaL_error(L, "out of memory");
  memcpy(copy, path, len + 1);
  lua_pushvalue(L, 4);
  native_route *nr = &srv->routes[srv->nroutes++];
  nr->post = post;
  nr->path = copy;
  nr->path_len = len;
  nr->h = h;
  nr->ref = luaL_ref(L, LUA_REGISTRYINDEX);
  return 0;
}

void lp_lua_native_free(lua_State *L, server *srv) {
  while (srv->nroutes > 0) drop_route(L, srv, srv->nroutes - 1);
  free(srv->routes);
  srv->routes = NULL;
  lp_buf_free(&srv->fast_scratch);
  lp_buf_free(&srv->fast_body);
  lp_buf_free(&srv->fast_head);
  lp_buf_free(&srv->fast_extra);
  lp_woken_free(&srv->fast_woken);
  lp_buf_free(&srv->stream_frame);
  lp_deadlines_free(&srv->deadlines);
  lp_lua_static_free(srv->statics);
  srv->statics = NULL;
}

static const luaL_Reg functions[] = {{"native_subscription", l_native_subscription},
                                     {"native_publish", l_native_publish},
                                     {"native_redis_publish", l_native_redis_publish},
                                     {"native_cached_subscription", l_native_cached_subscription},
                                     {"native_sse", l_native_sse},
                                     {"native_stats", l_native_stats},
                                     {NULL, NULL}};

void lp_lua_native_open(lua_State *L) {
  if (luaL_newmetatable(L, NATIVE_MT)) {
    lua_createtable(L, 0, 4);
    lua_pushcfunction(L, native_disable);
    lua_setfield(L, -2, "disable");
    lua_pushcfunction(L, native_parked);
    lua_setfield(L, -2, "parked");
    lua_pushcfunction(L, native_streams);
    lua_setfield(L, -2, "streams");
    lua_pushcfunction(L, native_marked);
    lua_setfield(L, -2, "marked");
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, native_gc);
    lua_setfield(L, -2, "__gc");
  }
  lua_pop(L, 1);
  luaL_setfuncs(L, functions, 0);
  lp_lua_stats_open(L);
}
