/* lp_lua_server.h: what the HTTP engine (lp_lua_server.c) offers the parts of it kept in other
 * files (lp_lua_static.c): a connection's state machine, loop, queue and clock, and a C task that
 * produces the pending response's body as the client reads it. Internal to longpoll.core. */
#ifndef LP_LUA_SERVER_H
#define LP_LUA_SERVER_H

#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "lp_conn.h"

typedef struct sconn lp_lua_conn; /* one connection of the engine; owned by it */

/* The producer of a pending response's body, in C. The connection calls drain once its queued
 * output fell to the level asked for (lp_lua_conn_wait_drain), and gone once if the client
 * leaves or the connection closes first: the task must not touch the connection afterwards. */
typedef struct lp_lua_task lp_lua_task;
struct lp_lua_task {
  void (*drain)(lp_lua_task *t);
  void (*gone)(lp_lua_task *t);
};

/* Attaches t (not owned) to the pending response of c, or detaches (NULL, no call made). */
void lp_lua_conn_set_task(lp_lua_conn *c, lp_lua_task *t);
/* The attached task's drain runs once at most `below` bytes are queued (after a write completes;
 * the caller checks lp_lua_conn_queued itself first: this never calls at once). */
void lp_lua_conn_wait_drain(lp_lua_conn *c, size_t below);

lp_conn *lp_lua_conn_state(lp_lua_conn *c);
uv_loop_t *lp_lua_conn_loop(lp_lua_conn *c);
/* Output bytes the socket has not taken yet. */
size_t lp_lua_conn_queued(lp_lua_conn *c);
/* The loop's time in ms (the deadlines' clock). */
uint64_t lp_lua_conn_now(lp_lua_conn *c);
/* "Date: ...\r\n", formatted once a second. */
const char *lp_lua_conn_date(lp_lua_conn *c);
/* Counts an answer given without entering Lua (server:fast_answers). */
void lp_lua_conn_count_fast(lp_lua_conn *c);

#endif
