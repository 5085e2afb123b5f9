/* lp_lua_stderr: log lines to stderr that never block the event loop (core.stderr_write). A
 * pipe nobody reads must not freeze the server: stderr is opened a second time, non-blocking
 * (its own open file description, so the flag does not leak to whoever shares fd 2), and what
 * it cannot take now waits in a small buffer; beyond that, whole lines are dropped and counted.
 * The writer's state is an upvalue of the function, as the style asks. */
#include <errno.h>
#include <fcntl.h>
#include <lauxlib.h>
#include <lua.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "lp_buf.h"

#define PENDING_MAX 65536

typedef struct writer {
  int fd;              /* -1 until opened; -2 when it cannot be */
  lp_buf pending;      /* bytes stderr did not take yet (whole lines' tails) */
  lua_Integer dropped; /* lines dropped since the last one written */
} writer;

static void open_writer(writer *w) {
  /* /proc/self/fd/2 opens the same pipe, tty or file anew: O_NONBLOCK stays ours */
  int fd = open("/proc/self/fd/2", O_WRONLY | O_NONBLOCK | O_APPEND | O_CLOEXEC);
  w->fd = fd >= 0 ? fd : -2;
}

/* Writes what is pending; 1 when nothing is left. */
static int flush(writer *w) {
  size_t off = 0;
  while (off < w->pending.len) {
    ssize_t n = write(w->fd, w->pending.data + off, w->pending.len - off);
    if (n <= 0) break; /* EAGAIN (full pipe), or an error: kept for the next line */
    off += (size_t)n;
  }
  if (off > 0) {
    memmove(w->pending.data, w->pending.data + off, w->pending.len - off);
    w->pending.len -= off;
  }
  return w->pending.len == 0;
}

/* core.stderr_write(line) -> true when written or queued, false when dropped */
static int l_stderr_write(lua_State *L) {
  writer *w = lua_touserdata(L, lua_upvalueindex(1));
  size_t len;
  const char *line = luaL_checklstring(L, 1, &len);
  if (w->fd == -1) open_writer(w);
  if (w->fd == -2) { /* no /proc: the plain stream (may block, as before) */
    fwrite(line, 1, len, stderr);
    lua_pushboolean(L, 1);
    return 1;
  }
  int empty = flush(w);
  if (empty && w->dropped > 0) {
    char note[96];
    int n =
        snprintf(note, sizeof note, "longpoll: %lld log lines dropped (stderr was not read)\n", (long long)w->dropped);
    if (lp_buf_append(&w->pending, note, (size_t)n) == 0) w->dropped = 0;
    empty = flush(w);
  }
  if (w->pending.len + len > PENDING_MAX || lp_buf_append(&w->pending, line, len) != 0) {
    w->dropped++;
    lua_pushboolean(L, 0);
    return 1;
  }
  flush(w);
  lua_pushboolean(L, 1);
  return 1;
}

static int writer_gc(lua_State *L) {
  writer *w = lua_touserdata(L, 1);
  if (w->fd >= 0) {
    flush(w);
    close(w->fd);
  }
  w->fd = -2;
  lp_buf_free(&w->pending);
  return 0;
}

/* Adds core.stderr_write to the module table on top of the stack. */
void lp_lua_stderr_open(lua_State *L) {
  writer *w = lua_newuserdatauv(L, sizeof *w, 0);
  memset(w, 0, sizeof *w);
  w->fd = -1;
  lua_createtable(L, 0, 1);
  lua_pushcfunction(L, writer_gc);
  lua_setfield(L, -2, "__gc");
  lua_setmetatable(L, -2);
  lua_pushcclosure(L, l_stderr_write, 1);
  lua_setfield(L, -2, "stderr_write");
}
