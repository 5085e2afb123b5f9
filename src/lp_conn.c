/* lp_conn: the connection state machine (see lp_conn.h). */
#include "lp_conn.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char CONTINUE[] = "HTTP/1.1 100 Continue\r\n\r\n";

const char *lp_http_reason(int status) {
  switch (status) {
    case 100: return "Continue";
    case 101: return "Switching Protocols";
    case 200: return "OK";
    case 201: return "Created";
    case 202: return "Accepted";
    case 204: return "No Content";
    case 206: return "Partial Content";
    case 301: return "Moved Permanently";
    case 302: return "Found";
    case 303: return "See Other";
    case 304: return "Not Modified";
    case 307: return "Temporary Redirect";
    case 308: return "Permanent Redirect";
    case 400: return "Bad Request";
    case 401: return "Unauthorized";
    case 403: return "Forbidden";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 408: return "Request Timeout";
    case 409: return "Conflict";
    case 410: return "Gone";
    case 411: return "Length Required";
    case 413: return "Content Too Large";
    case 414: return "URI Too Long";
    case 415: return "Unsupported Media Type";
    case 416: return "Range Not Satisfiable";
    case 417: return "Expectation Failed";
    case 429: return "Too Many Requests";
    case 431: return "Request Header Fields Too Large";
    case 500: return "Internal Server Error";
    case 501: return "Not Implemented";
    case 502: return "Bad Gateway";
    case 503: return "Service Unavailable";
    case 504: return "Gateway Timeout";
    case 505: return "HTTP Version Not Supported";
    default: return "Unknown";
  }
}

static void set_deadline(lp_conn *c, int kind, uint64_t at) {
  c->deadline_kind = kind;
  c->deadline = at;
}

static void forget_head(lp_conn *c) {
  c->has_head = 0;
  if (c->head_bytes.cap > 4096) lp_buf_free(&c->head_bytes);
  lp_buf_reset(&c->head_bytes);
}

void lp_conn_init(lp_conn *c, const lp_conn_config *config, const lp_conn_host *host, void *ud, uint64_t now) {
  memset(c, 0, sizeof *c);
  c->config = config;
  c->host = host;
  c->ud = ud;
  lp_http_init(&c->parser, &config->limits);
  c->phase = LP_CONN_READING;
  set_deadline(c, LP_DL_IDLE, now + config->header_timeout_ms);
}

void lp_conn_free(lp_conn *c) {
  lp_http_free(&c->parser);
  lp_buf_free(&c->head_bytes);
  free(c->head_headers);
  c->head_headers = NULL;
  c->head_headers_cap = 0;
  c->has_head = 0;
}

/* Closes at once; the pending response (if any) learns that its client is gone first. */
static void close_now(lp_conn *c) {
  if (c->phase == LP_CONN_CLOSED) return;
  int answering = c->phase == LP_CONN_ANSWERING;
  c->phase = LP_CONN_CLOSED;
  c->deadline_kind = LP_DL_NONE;
  lp_http_free(&c->parser);
  forget_head(c);
  if (answering) c->host->gone(c->ud);
  c->host->close(c->ud);
}

static uint64_t stall_ms(const lp_conn *c) {
  const lp_conn_config *k = c->config;
  if (c->no_keepalive && k->linger_ms < k->keepalive_timeout_ms) return k->linger_ms;
  return k->keepalive_timeout_ms;
}

/* Flush, FIN, linger: the queued answer still goes out, nothing more is read into requests. */
static void begin_close(lp_conn *c, uint64_t now) {
  if (c->phase == LP_CONN_CLOSING || c->phase == LP_CONN_CLOSED) return;
  c->phase = LP_CONN_CLOSING;
  c->paused = 0;
  lp_http_free(&c->parser);
  forget_head(c);
  /* A client that never reads holds its output no longer than this without progress. */
  set_deadline(c, LP_DL_STALL, now + stall_ms(c));
  c->host->shutdown(c->ud);
}

void lp_conn_abort(lp_conn *c) { close_now(c); }

/* Appends s to b as the inside of a JSON string. */
static int append_json_text(lp_buf *b, const char *s) {
  for (; *s; s++) {
    unsigned char ch = (unsigned char)*s;
    int rc;
    if (ch == '"' || ch == '\\') {
      char esc[2] = {'\\', (char)ch};
      rc = lp_buf_append(b, esc, 2);
    } else if (ch < 0x20) {
      char esc[7];
      snprintf(esc, sizeof esc, "\\u%04x", ch);
      rc = lp_buf_append(b, esc, 6);
    } else {
      rc = lp_buf_append_char(b, (char)ch);
    }
    if (rc != 0) return -1;
  }
  return 0;
}

void lp_conn_fail(lp_conn *c, int status, const char *message, uint64_t now) {
  if (c->phase == LP_CONN_CLOSING || c->phase == LP_CONN_CLOSED) return;
  lp_buf body = LP_BUF_INIT, head = LP_BUF_INIT;
  int rc = lp_buf_append_str(&body, "{\"error\":\"");
  if (rc == 0) rc = append_json_text(&body, message);
  if (rc == 0) rc = lp_buf_append_str(&body, "\"}");
  char line[160];
  const char *date = c->host->date ? c->host->date(c->ud) : NULL;
  snprintf(line, sizeof line, "HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %zu\r\n", status,
           lp_http_reason(status), body.len);
  if (rc == 0) rc = lp_buf_append_str(&head, line);
  if (rc == 0 && date) rc = lp_buf_append_str(&head, date);
  if (rc == 0) rc = lp_buf_append_str(&head, "Connection: close\r\n\r\n");
  if (rc != 0) {
    lp_buf_free(&body);
    lp_buf_free(&head);
    close_now(c);
    return;
  }
  lp_slice bufs[2] = {{head.data, head.len}, {body.data, body.len}};
  c->host->write(c->ud, bufs, 2);
  lp_buf_free(&body);
  lp_buf_free(&head);
  begin_close(c, now);
}

/* Copies a head whose body is still arriving (see lp_conn.head). */
static int save_head(lp_conn *c, const lp_http_event *ev) {
  lp_buf *b = &c->head_bytes;
  lp_buf_reset(b);
  size_t total = ev->method.len + ev->target.len;
  for (size_t i = 0; i < ev->nheaders; i++) total += ev->headers[i].name.len + ev->headers[i].value.len;
  if (lp_buf_reserve(b, total + 1) != 0) return -1;
  if (ev->nheaders > c->head_headers_cap) {
    lp_http_header *h = realloc(c->head_headers, ev->nheaders * sizeof *h);
    if (!h) return -1;
    c->head_headers = h;
    c->head_headers_cap = ev->nheaders;
  }
  /* b has room for everything: the offsets below stay valid */
  c->head = *ev;
#define COPY(dst, src)                                       \
  do {                                                       \
    (dst).ptr = b->data + b->len;                            \
    (dst).len = (src).len;                                   \
    lp_buf_append(b, (src).ptr ? (src).ptr : "", (src).len); \
  } while (0)
  COPY(c->head.method, ev->method);
  COPY(c->head.target, ev->target);
  for (size_t i = 0; i < ev->nheaders; i++) {
    COPY(c->head_headers[i].name, ev->headers[i].name);
    COPY(c->head_headers[i].value, ev->headers[i].value);
  }
#undef COPY
  c->head.headers = c->head_headers;
  c->has_head = 1;
  return 0;
}

static void dispatch(lp_conn *c, const lp_http_event *head, lp_slice body) {
  c->phase = LP_CONN_ANSWERING;
  c->deadline_kind = LP_DL_NONE;
  c->keep = head->keep_alive ? 1 : 0;
  c->continued = 0;
  c->in_request = 1;
  c->host->request(c->ud, head, body);
  c->in_request = 0;
  if (c->has_head) forget_head(c);
  /* A long poll may wait for minutes: an empty parser keeps no buffers meanwhile. */
  if (c->phase == LP_CONN_ANSWERING && !lp_http_in_progress(&c->parser)) lp_http_free(&c->parser);
}

/* What to wait for when the parser needs more bytes. */
static void arm_read_deadline(lp_conn *c, uint64_t now) {
  const lp_conn_config *k = c->config;
  if (c->has_head) {
    set_deadline(c, LP_DL_BODY, now + k->header_timeout_ms); /* renewed by every read */
  } else if (lp_http_buffered(&c->parser) > 0) {
    if (c->deadline_kind != LP_DL_HEAD) set_deadline(c, LP_DL_HEAD, now + k->header_timeout_ms);
  } else {
    set_deadline(c, LP_DL_IDLE, now + k->keepalive_timeout_ms);
  }
}

/* Reads and dispatches buffered requests, one at a time; stops when one is pending, output is
 * backed up, or more bytes are needed. Every pass dispatches a request or returns. */
static void process(lp_conn *c, uint64_t now) {
  while (c->phase == LP_CONN_READING && !c->paused && !c->scheduled) {
    if (c->host->queued(c->ud) > c->config->high_water) {
      c->paused = 1;
      /* a client that does not read for a keep-alive period is cut, with what it left queued */
      set_deadline(c, LP_DL_STALL, now + c->config->keepalive_timeout_ms);
      return;
    }
    lp_http_event ev;
    int rc = lp_http_parse(&c->parser, &ev);
    if (rc == LP_HTTP_MORE) {
      if (c->peer_eof) {
        /* the client said all it had to say: a half request goes unanswered */
        if (lp_http_buffered(&c->parser) > 0 || c->has_head)
          close_now(c);
        else
          begin_close(c, now);
        return;
      }
      arm_read_deadline(c, now);
      return;
    }
    if (rc == LP_HTTP_ERROR) {
      lp_conn_fail(c, ev.status, ev.message, now);
      return;
    }
    if (rc == LP_HTTP_BODY) { /* the body of the saved head */
      dispatch(c, &c->head, ev.body);
      continue;
    }
    /* LP_HTTP_HEAD: its slices survive the next parse as long as nothing is pushed */
    lp_http_event body;
    rc = lp_http_parse(&c->parser, &body);
    if (rc == LP_HTTP_BODY) {
      dispatch(c, &ev, body.body);
      continue;
    }
    if (rc == LP_HTTP_ERROR) {
      lp_conn_fail(c, body.status, body.message, now);
      return;
    }
    if (save_head(c, &ev) != 0) {
      lp_conn_fail(c, 503, "out of memory", now);
      return;
    }
    if (ev.expect_continue && !c->continued) {
      c->continued = 1;
      lp_slice s = {CONTINUE, sizeof CONTINUE - 1};
      c->host->write(c->ud, &s, 1);
    }
    if (c->peer_eof) {
      close_now(c);
      return;
    }
    arm_read_deadline(c, now);
    return;
  }
}

void lp_conn_received(lp_conn *c, const char *data, size_t len, uint64_t now) {
  if (c->phase == LP_CONN_CLOSING || c->phase == LP_CONN_CLOSED) return; /* lingering: dropped */
  if (lp_http_push(&c->parser, data, len) != 0) {
    lp_conn_fail(c, 503, "out of memory", now);
    return;
  }
  if (c->phase == LP_CONN_ANSWERING || c->paused || c->scheduled) {
    /* Requests pipelined behind a pending answer wait in the parser; more than one maximal
     * request of them is abuse. */
    const lp_http_limits *lim = &c->config->limits;
    if (lp_http_buffered(&c->parser) > lim->max_header_bytes + lim->max_body_bytes) close_now(c);
    return;
  }
  process(c, now);
}

void lp_conn_peer_eof(lp_conn *c, uint64_t now) {
  switch (c->phase) {
    case LP_CONN_CLOSED: return;
    case LP_CONN_CLOSING:
      c->peer_eof = 1;
      if (c->fin_sent) close_now(c);
      return;
    case LP_CONN_ANSWERING: /* the client left while its answer was pending (a long poll) */ close_now(c); return;
    default:
      c->peer_eof = 1;
      if (!c->paused && !c->scheduled) process(c, now);
      return;
  }
}

void lp_conn_wrote(lp_conn *c, uint64_t now) {
  if (c->phase == LP_CONN_CLOSED) return;
  if (c->phase == LP_CONN_CLOSING) {
    if (!c->fin_sent) set_deadline(c, LP_DL_STALL, now + stall_ms(c));
    return;
  }
  if (c->paused && c->host->queued(c->ud) == 0) {
    c->paused = 0;
    if (c->no_keepalive) {
      begin_close(c, now);
      return;
    }
    if (c->phase == LP_CONN_READING) process(c, now);
  }
}

void lp_conn_fin_sent(lp_conn *c, uint64_t now) {
  if (c->phase != LP_CONN_CLOSING) return;
  c->fin_sent = 1;
  if (c->peer_eof || c->no_keepalive) { /* the server is going: no lingering */
    close_now(c);
    return;
  }
  /* counted from the end of the write: a slow reader gets its whole answer */
  set_deadline(c, LP_DL_LINGER, now + c->config->linger_ms);
}

void lp_conn_resume(lp_conn *c, uint64_t now) {
  if (!c->scheduled) return;
  c->scheduled = 0;
  if (c->phase == LP_CONN_READING) process(c, now);
}

void lp_conn_tick(lp_conn *c, uint64_t now) {
  if (c->deadline_kind == LP_DL_NONE || now < c->deadline || c->phase == LP_CONN_CLOSED) return;
  int kind = c->deadline_kind;
  c->deadline_kind = LP_DL_NONE;
  switch (kind) {
    case LP_DL_HEAD:
    case LP_DL_BODY: lp_conn_fail(c, 408, "request timeout", now); return;
    default: close_now(c); return; /* idle, stalled output, end of lingering */
  }
}

int lp_conn_write(lp_conn *c, const lp_slice *bufs, size_t nbufs) {
  if (c->phase == LP_CONN_CLOSED || c->phase == LP_CONN_CLOSING) return -1;
  if (c->host->queued(c->ud) > c->config->output_budget) {
    close_now(c); /* a client that lets this much pile up unread is cut off */
    return -1;
  }
  c->host->write(c->ud, bufs, nbufs);
  return 0;
}

void lp_conn_response_done(lp_conn *c, int keep, uint64_t now) {
  if (c->phase != LP_CONN_ANSWERING) return;
  if (!keep || !c->keep || c->no_keepalive) {
    begin_close(c, now);
    return;
  }
  c->phase = LP_CONN_READING;
  if (c->in_request) return; /* process() goes on once the handler returns */
  if (c->peer_eof || lp_http_buffered(&c->parser) > 0) {
    /* the next request runs on a later turn, never inside whatever answered this one */
    c->scheduled = 1;
    c->host->schedule(c->ud);
    return;
  }
  set_deadline(c, LP_DL_IDLE, now + c->config->keepalive_timeout_ms);
}

void lp_conn_server_closing(lp_conn *c, uint64_t now) {
  c->no_keepalive = 1;
  if (c->phase == LP_CONN_READING) {
    begin_close(c, now);
  } else if (c->phase == LP_CONN_CLOSING && !c->fin_sent && c->deadline_kind == LP_DL_STALL) {
    uint64_t at = now + stall_ms(c);
    if (at < c->deadline) c->deadline = at;
  }
}

int lp_conn_may_keep_alive(const lp_conn *c) { return c->phase == LP_CONN_ANSWERING && c->keep && !c->no_keepalive; }

int lp_conn_is_open(const lp_conn *c) { return c->phase == LP_CONN_ANSWERING || c->phase == LP_CONN_READING; }
