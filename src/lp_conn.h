/* lp_conn: one server-side HTTP/1.x connection as a state machine, sans-I/O. Received bytes,
 * the peer's FIN, write progress and the time go in; requests, writes, closes and deadlines come
 * out through a host (lp_conn_host). It owns the connection's rules: requests strictly one at a
 * time in arrival order (pipelined ones wait in the parser), keep-alive, the limits of lp_http
 * (413/414/431/400), the header/body/keep-alive deadlines (408 or a silent close), 100-continue,
 * pausing while too much output is queued, an output budget, and a graceful close whose linger
 * time counts from the moment our FIN went out. Nothing here reads a clock or a socket. */
#ifndef LP_CONN_H
#define LP_CONN_H

#include <stddef.h>
#include <stdint.h>

#include "lp_buf.h"
#include "lp_http.h"

typedef struct lp_conn_config {
  lp_http_limits limits;
  uint64_t header_timeout_ms;    /* a started head or a stalled body: 408 after this */
  uint64_t keepalive_timeout_ms; /* an idle keep-alive connection, or output not read: closed */
  uint64_t linger_ms;            /* after our FIN: the client's leftovers are read and dropped */
  size_t high_water;             /* pipelined requests wait while more output than this is queued */
  size_t output_budget;          /* a write while more than this is queued cuts the connection */
} lp_conn_config;

/* What the connection asks of the I/O layer. Every function gets the host's ud. */
typedef struct lp_conn_host {
  /* A whole request. head's slices (and body) live until the call returns. The application
   * answers now or later through lp_conn_write and lp_conn_response_done. */
  void (*request)(void *ud, const lp_http_event *head, lp_slice body);
  /* Queues bytes for the socket, in order, copying what it cannot write at once. */
  void (*write)(void *ud, const lp_slice *bufs, size_t nbufs);
  /* Bytes given to write that the socket has not taken yet. */
  size_t (*queued)(void *ud);
  /* After the queued bytes, send FIN; call lp_conn_fin_sent once it went out. */
  void (*shutdown)(void *ud);
  /* Close now, dropping queued output. The connection makes no call to the host afterwards. */
  void (*close)(void *ud);
  /* Call lp_conn_resume from the event loop soon, never from inside this call. */
  void (*schedule)(void *ud);
  /* The client of the response still pending is gone (the application's on_close). */
  void (*gone)(void *ud);
  /* "Date: ...\r\n" for error answers, or NULL for none. */
  const char *(*date)(void *ud);
} lp_conn_host;

enum {
  LP_CONN_READING = 0, /* no request out: reading the next one */
  LP_CONN_ANSWERING,   /* a request is with the application */
  LP_CONN_CLOSING,     /* our answer is flushed, then FIN, then lingering */
  LP_CONN_CLOSED       /* host->close was called */
};

/* What the deadline means when it passes. */
enum { LP_DL_NONE = 0, LP_DL_IDLE, LP_DL_HEAD, LP_DL_BODY, LP_DL_STALL, LP_DL_LINGER };

typedef struct lp_conn {
  const lp_conn_config *config; /* not owned; outlives the connection */
  const lp_conn_host *host;     /* not owned */
  void *ud;
  lp_http_parser parser;
  int phase;
  int deadline_kind;
  uint64_t deadline;         /* ms, in the host's clock; meaningful when deadline_kind != LP_DL_NONE */
  unsigned paused : 1;       /* output above high_water: the next request waits for a drain */
  unsigned scheduled : 1;    /* host->schedule was called and lp_conn_resume has not run */
  unsigned peer_eof : 1;     /* the client sent FIN */
  unsigned fin_sent : 1;     /* our FIN went out */
  unsigned continued : 1;    /* "100 Continue" was sent for the request being read */
  unsigned no_keepalive : 1; /* the server is closing: answers end the connection */
  unsigned keep : 1;         /* the pending request allows keep-alive */
  unsigned in_request : 1;   /* inside host->request */
  /* The head of a request whose body is still arriving: the parser's buffer moves as bytes are
   * pushed, so its slices are copied here (ev.headers points into head_headers). */
  lp_http_event head;
  lp_buf head_bytes;
  lp_http_header *head_headers;
  size_t head_headers_cap;
  int has_head;
} lp_conn;

/* Starts a freshly accepted connection: it must send a request within header_timeout_ms. */
void lp_conn_init(lp_conn *c, const lp_conn_config *config, const lp_conn_host *host, void *ud, uint64_t now);
/* Frees what c owns. Call once, after host->close (or instead of using it further). */
void lp_conn_free(lp_conn *c);

/* Bytes from the socket. */
void lp_conn_received(lp_conn *c, const char *data, size_t len, uint64_t now);
/* The client sent FIN. */
void lp_conn_peer_eof(lp_conn *c, uint64_t now);
/* The socket failed (reset, write error): closed at once. */
void lp_conn_abort(lp_conn *c);
/* Some queued output was written (host->queued() is smaller). */
void lp_conn_wrote(lp_conn *c, uint64_t now);
/* Our FIN went out (host->shutdown completed): the linger time starts. */
void lp_conn_fin_sent(lp_conn *c, uint64_t now);
/* The scheduled turn (host->schedule): the next pipelined request, if any, is read. */
void lp_conn_resume(lp_conn *c, uint64_t now);
/* Acts on a deadline that has passed (408, a silent close, the end of lingering). */
void lp_conn_tick(lp_conn *c, uint64_t now);

/* The application's side. Output for the pending request: 0, or -1 when the connection is
 * closed or went over its output budget (it is closed then). */
int lp_conn_write(lp_conn *c, const lp_slice *bufs, size_t nbufs);
/* The pending response is complete; keep: the connection may serve the next request. The next
 * request is never read from inside this call: it is scheduled (host->schedule). */
void lp_conn_response_done(lp_conn *c, int keep, uint64_t now);
/* Answers status {"error": message} with Connection: close, then closes gracefully. Used for
 * refusals (503 at the connection cap) and by the application for a broken response. */
void lp_conn_fail(lp_conn *c, int status, const char *message, uint64_t now);
/* The server stops: an idle connection closes now, a pending answer ends the connection. */
void lp_conn_server_closing(lp_conn *c, uint64_t now);

/* 1 when a response may keep the connection (not closing). */
int lp_conn_may_keep_alive(const lp_conn *c);
/* 1 when the connection is still usable for the pending response. */
int lp_conn_is_open(const lp_conn *c);

/* The reason phrase for a status ("Unknown" for those not listed). */
const char *lp_http_reason(int status);

#endif
