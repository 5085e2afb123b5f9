/* lp_lua_stream: SSE streams served by the HTTP engine in C: the manager's SSE handler
 * (core.native_sse), as longpoll.sse serves it in memory mode, with the same bytes. A stream's
 * subscription is an owned waiter on the store (lp_store_wait_owned): whoever publishes hands it
 * the event (stream_woken, which writes the message, built once per event for every stream) and
 * then lets it wait again (stream_after). Its heartbeat is its deadline in the server's set;
 * the manager's shutdown finishes it. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lp_lua_engine.h"
#include "lp_sse.h"

static void stream_unlink(sconn *s) {
  native_handler *nh = s->stream_by;
  if (s->stream_prev)
    s->stream_prev->stream_next = s->stream_next;
  else
    nh->streams = s->stream_next;
  if (s->stream_next) s->stream_next->stream_prev = s->stream_prev;
  s->stream_prev = s->stream_next = NULL;
  nh->nstreams--;
}

/* Forgets the stream of s (its client left, a write failed, it was finished): its wait ends;
 * the response is left as it is. Nothing when s has no stream. */
void lp_lua_stream_end(sconn *s) {
  if (!s->stream_by) return;
  if (s->stream_handle) lp_store_cancel(s->stream_store, s->stream_handle);
  s->stream_handle = 0;
  stream_unlink(s);
  lp_deadlines_remove(&s->srv->deadlines, &s->deadline);
  free(s->stream_categories);
  s->stream_categories = NULL;
  s->stream_ncategories = 0;
  s->stream_by = NULL;
  s->stream_store = NULL;
}

/* Writes one piece of the stream's body (a chunk on HTTP/1.1, whose size line is size when
 * given); a failure (the client is gone or let too much pile up: the connection is closed) ends
 * the stream. 0 or -1. */
static int stream_write_sized(sconn *s, const char *data, size_t len, const char *size_line) {
  char size[24];
  lp_slice bufs[3] = {{data, len}};
  size_t n = 1;
  if (s->stream_chunked) {
    if (!size_line) {
      snprintf(size, sizeof size, "%zx\r\n", len);
      size_line = size;
    }
    bufs[0] = (lp_slice){size_line, strlen(size_line)};
    bufs[1] = (lp_slice){data, len};
    bufs[2] = (lp_slice){"\r\n", 2};
    n = 3;
  }
  if (lp_conn_write(&s->conn, bufs, n) != 0) {
    lp_lua_stream_end(s);
    return -1;
  }
  return 0;
}

static int stream_write(sconn *s, const char *data, size_t len) { return stream_write_sized(s, data, len, NULL); }

/* Ends the stream's response cleanly (the last chunk; an HTTP/1.0 stream ends with its
 * connection): the manager shuts down, or the stream cannot wait again. */
static void stream_finish(sconn *s) {
  if (!s->stream_by) return;
  int keep = s->stream_keep;
  if (s->stream_chunked && lp_conn_write(&s->conn, &(lp_slice){"0\r\n\r\n", 5}, 1) != 0) keep = 0;
  lp_lua_stream_end(s);
  lp_conn_response_done(&s->conn, keep, now_ms(s->srv));
}

void lp_lua_stream_heartbeat(sconn *s) {
  if (stream_write(s, LP_SSE_HEARTBEAT, sizeof LP_SSE_HEARTBEAT - 1) != 0) return;
  if (lp_deadlines_add(&s->srv->deadlines, &s->deadline, s->stream_by->heartbeat_ms, now_ms(s->srv)) != 0)
    stream_finish(s); /* no memory for its heartbeats: the browser reconnects */
}

/* The SSE message of the event, built once per event for every stream it wakes (all of them
 * write the same bytes); NULL when memory ran out. The event's id says whose message is kept:
 * a store freed and another made at its address counts its seq from 1 again, ids never repeat. */
static const lp_buf *stream_message(server *srv, const lp_store *store, const lp_published *p) {
  lp_buf *m = &srv->stream_frame;
  if (srv->stream_frame_store == store && srv->stream_frame_seq == p->seq && m->len > 0 &&
      memcmp(srv->stream_frame_id, p->id, sizeof srv->stream_frame_id) == 0)
    return m;
  srv->stream_frame_store = NULL;
  lp_buf_reset(m);
  if (lp_sse_message_append(m, p->json, p->json_len, p->timestamp, p->id) != 0) return NULL;
  srv->stream_frame_store = store;
  srv->stream_frame_seq = p->seq;
  memcpy(srv->stream_frame_id, p->id, sizeof srv->stream_frame_id);
  snprintf(srv->stream_frame_size, sizeof srv->stream_frame_size, "%zx\r\n", m->len);
  return m;
}

static void stream_woken(lp_waiter *w, const lp_published *p) {
  sconn *s = CONTAINER(w, sconn, waiter);
  if (!s->stream_by) return;
  s->stream_handle = 0; /* the publish ended the subscription: stream_after waits again */
  const lp_buf *m = stream_message(s->srv, s->stream_store, p);
  if (!m) {
    lp_lua_stream_end(s);
    lp_conn_abort(&s->conn); /* never a stream with a hole: the browser resumes after its last id */
    return;
  }
  stream_write_sized(s, m->data, m->len, s->srv->stream_frame_size);
}

/* Every stream the publish woke was written to: this one waits for the next event. */
static void stream_after(lp_waiter *w) {
  sconn *s = CONTAINER(w, sconn, waiter);
  if (!s->stream_by || s->stream_handle) return;
  if (lp_store_wait_owned(s->stream_store, s->stream_categories, s->stream_ncategories, &s->waiter,
                          &s->stream_handle) != LP_OK) {
    s->stream_handle = 0;
    lp_lua_engine_log(s->srv, "warn", "sse stream ended: cannot wait", NULL, 0);
    stream_finish(s);
  }
}

/* The store closed under the stream (the manager finishes its streams before; the backstop). */
static void stream_ended(lp_waiter *w) {
  sconn *s = CONTAINER(w, sconn, waiter);
  s->stream_handle = 0;
  stream_finish(s);
}

static const lp_waiter_ops STREAM_OPS = {.ended = stream_ended, .woken_event = stream_woken, .after = stream_after};

/* Appends one event of a catch-up to the buffer (ctx); an lp_event_fn. */
static int append_message(void *ctx, const lp_event_view *e) {
  return lp_sse_message_append(ctx, e->json, e->json_len, e->timestamp, e->id);
}

/* An owned copy of the categories (slices and names in one block), or NULL. */
static lp_slice *copy_categories(const lp_fast_sub *sub) {
  size_t bytes = sub->ncategories * sizeof(lp_slice);
  for (size_t i = 0; i < sub->ncategories; i++) bytes += sub->categories[i].len;
  lp_slice *list = malloc(bytes ? bytes : 1);
  if (!list) return NULL;
  char *names = (char *)(list + sub->ncategories);
  for (size_t i = 0; i < sub->ncategories; i++) {
    memcpy(names, sub->categories[i].ptr, sub->categories[i].len);
    list[i] = (lp_slice){names, sub->categories[i].len};
    names += sub->categories[i].len;
  }
  return list;
}

/* The request's Last-Event-ID in *value (ptr NULL when absent); 0 when it is there twice (the
 * Lua handler reads the headers' joined value). */
static int last_event_id(const lp_http_event *head, lp_slice *value) {
  size_t seen;
  *value = lp_lua_native_header(head, "last-event-id", &seen);
  return seen <= 1;
}

/* A GET to the manager's SSE handler, served here: the stream's head, its preamble, the events
 * after its cursor, and from then on each event as it is published. 1 when served, 0 when the Lua
 * handler must run (an error, anything unusual, a stream the store will not take). */
int lp_lua_stream_serve(sconn *s, native_handler *nh, lp_store *store, const lp_http_event *head, lp_slice query) {
  server *srv = s->srv;
  lp_fast_sub sub;
  lp_slice resume;
  if (!store || s->reserve || srv->closing || s->parked_by || s->stream_by || !last_event_id(head, &resume) ||
      lp_fast_parse_stream(query, resume, &nh->limits, &srv->fast_scratch, &sub) != 1)
    return 0;
  int allowed;
  if (lp_lua_native_cors_lines(nh, head, &srv->fast_extra, &allowed) != 0) return 0;
  lp_slice *categories = copy_categories(&sub);
  if (!categories) return 0;
  /* waiting first: when the store refuses (max_waiting_per_category), nothing was taken yet */
  s->waiter.ops = &STREAM_OPS;
  uint64_t handle;
  if (lp_store_wait_owned(store, categories, sub.ncategories, &s->waiter, &handle) != LP_OK) {
    free(categories);
    return 0;
  }
  int64_t now = wall_clock_ms();
  lp_buf *body = &srv->fast_body;
  lp_buf_reset(body);
  int missed = 0, rc = 0;
  if (sub.has_since) {
    size_t count = 0;
    if (lp_buf_append_str(body, LP_SSE_MISSED) != 0) rc = -1; /* kept only if missed */
    if (rc == 0 &&
        lp_store_fetch_each(store, categories, sub.ncategories, sub.since, sub.has_last_id ? sub.last_id : NULL, now,
                            append_message, body, &count, &missed) != LP_OK)
      rc = -1;
  }
  if (rc == 0 && lp_deadlines_add(&srv->deadlines, &s->deadline, nh->heartbeat_ms, now_ms(srv)) != 0) rc = -1;
  if (rc != 0) {
    lp_store_cancel(store, handle);
    free(categories);
    return 0; /* nothing was delivered (fetch_each counts only a whole read) */
  }
  s->stream_by = nh;
  s->stream_store = store;
  s->stream_handle = handle;
  s->stream_categories = categories;
  s->stream_ncategories = sub.ncategories;
  s->stream_chunked = head->minor == 1;
  s->stream_keep = s->stream_chunked && head->keep_alive && lp_conn_may_keep_alive(&s->conn);
  s->stream_prev = NULL;
  s->stream_next = nh->streams;
  if (nh->streams) nh->streams->stream_prev = s;
  nh->streams = s;
  nh->nstreams++;
  lp_lua_native_timer_arm(srv);
  srv->fast_answers++;
  /* the head, as response.lua's write_head builds it */
  lp_buf *h = &srv->fast_head;
  lp_slice extra = {srv->fast_extra.data, srv->fast_extra.len}, block = {nh->block, nh->block_len};
  rc = lp_lua_native_head(h, srv, "HTTP/1.1 200 OK\r\n", extra, block,
                          s->stream_chunked ? "Transfer-Encoding: chunked\r\n" : "", s->stream_keep, 0);
  /* the preamble, in the CORS lines' buffer (they are in the head now) */
  lp_buf *pre = &srv->fast_extra;
  lp_buf_reset(pre);
  if (rc == 0)
    rc = lp_sse_preamble_append(pre, (int64_t)nh->retry_ms, !sub.has_since,
                                sub.has_since ? 0 : lp_store_mark_time(store, now));
  if (rc != 0) {
    lp_lua_stream_end(s);
    lp_conn_abort(&s->conn);
    return 1;
  }
  if (lp_conn_write(&s->conn, &(lp_slice){h->data, h->len}, 1) != 0) {
    lp_lua_stream_end(s);
    return 1;
  }
  if (stream_write(s, pre->data, pre->len) != 0) return 1;
  /* the catch-up as longpoll.sse writes it: one piece, the missed notice first */
  size_t skip = missed ? 0 : sizeof LP_SSE_MISSED - 1;
  if (body->len > skip) stream_write(s, body->data + skip, body->len - skip);
  if (body->cap > (1u << 20)) lp_buf_free(body);
  return 1;
}

/* Every stream of nh ends cleanly now (the manager shutting down). */
void lp_lua_stream_finish_all(native_handler *nh) {
  while (nh->streams) stream_finish(nh->streams);
}
