/* lp_lua_static: static file mounts (server:static) served by the HTTP engine, in C, on luv's
 * loop: the file is looked up, checked and read with libuv's file requests (the loop's thread
 * pool, never the loop itself), in pieces of LP_STATIC_PIECE as the client reads them (the next
 * one once at most LP_STATIC_LOW_WATER bytes wait), never whole in memory. The rules (paths,
 * ranges, types, heads) are lp_static.c's; the connection is lp_lua_server.c's. */
#include "lp_lua_static.h"

#include <fcntl.h>
#include <lauxlib.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "lp_static.h"

struct lp_lua_statics {
  lp_static_mounts mounts;
  lp_buf path;   /* the decoded path of the request being routed */
  lp_buf answer; /* the answer being written (its bytes are copied by the write) */
};

/* One file being answered. It lives until its last file request completed and the file is
 * closed, which may be after its client left (c is NULL from then on). */
typedef struct job {
  lp_lua_task task; /* first: the connection's handle on it */
  lp_lua_conn *c;   /* NULL once the client left or the answer is over */
  lp_lua_statics *st;
  lp_static_mount *mount; /* valid while c is (the mounts outlive the connections) */
  uv_loop_t *loop;
  uv_fs_t req;
  int in_flight; /* req is with libuv */
  int running;   /* inside one of the job's callbacks: it settles at the end of it */
  uv_file fd;    /* -1 when not open */
  char *real;    /* the resolved path, owned */
  char *piece;   /* the read buffer, owned */
  size_t piece_len;
  lp_static_range range;
  int head_only, keep_alive, http10;
  int keep; /* decided with the head: the connection stays open afterwards */
  uint64_t offset, left;
  size_t path_len;
  char path[]; /* the file's path as asked (its extension names the type) */
} job;

static void job_free(job *j) {
  free(j->real);
  free(j->piece);
  free(j);
}

static void on_closed(uv_fs_t *req) {
  uv_fs_req_cleanup(req);
  job_free(req->data);
}

/* The job is over (c is NULL) and no request is in flight: the file is closed, then freed. */
static void job_end(job *j) {
  if (j->fd >= 0) {
    uv_file fd = j->fd;
    j->fd = -1;
    j->in_flight = 1;
    if (uv_fs_close(j->loop, &j->req, fd, on_closed) == 0) return;
  }
  job_free(j);
}

/* After each of the job's callbacks: frees the job once it is over and idle. */
static void settle(job *j) {
  j->running = 0;
  if (!j->c && !j->in_flight) job_end(j);
}

/* Ends the job's hold on its connection (no more calls from it). */
static lp_lua_conn *release(job *j) {
  lp_lua_conn *c = j->c;
  if (c) lp_lua_conn_set_task(c, NULL);
  j->c = NULL;
  return c;
}

static void task_gone(lp_lua_task *t) {
  job *j = (job *)t;
  j->c = NULL;
  if (!j->running && !j->in_flight) job_end(j);
}

/* Writes a whole answer from b and completes the response. */
static void send_whole(lp_lua_conn *c, lp_buf *b, int keep, int built) {
  lp_conn *conn = lp_lua_conn_state(c);
  if (built != 0) {
    lp_conn_fail(conn, 503, "out of memory", lp_lua_conn_now(c));
    return;
  }
  lp_slice s = {b->data, b->len};
  if (lp_conn_write(conn, &s, 1) != 0) return; /* closed */
  lp_lua_conn_count_fast(c);
  lp_conn_response_done(conn, keep, lp_lua_conn_now(c));
}

static lp_static_reply reply_for(lp_lua_conn *c, int keep_alive, int http10) {
  lp_static_reply r;
  r.date_line = lp_lua_conn_date(c);
  r.keep = keep_alive && lp_conn_may_keep_alive(lp_lua_conn_state(c));
  r.http10 = http10;
  return r;
}

static void send_error(lp_lua_statics *st, lp_lua_conn *c, int status, const char *message, const char *allow,
                       int head_only, int keep_alive, int http10) {
  lp_static_reply r = reply_for(c, keep_alive, http10);
  lp_buf_reset(&st->answer);
  int built = lp_static_error(&st->answer, status, message, allow, head_only, &r);
  send_whole(c, &st->answer, r.keep, built);
}

/* The job's answer is an error: status {"error": message}. */
static void job_error(job *j, int status, const char *message) {
  lp_lua_statics *st = j->st;
  lp_lua_conn *c = release(j);
  if (c) send_error(st, c, status, message, NULL, j->head_only, j->keep_alive, j->http10);
}

static void job_lookup_failed(job *j, ssize_t result) {
  const char *message;
  int status = lp_static_lookup_status((int)-result, &message);
  job_error(j, status, message);
}

static void on_read(uv_fs_t *req);

/* Reads the next piece; its callback writes it. */
static void read_piece(job *j) {
  size_t n = j->left < j->piece_len ? (size_t)j->left : j->piece_len;
  uv_buf_t b = uv_buf_init(j->piece, (unsigned)n);
  j->in_flight = 1;
  if (uv_fs_read(j->loop, &j->req, j->fd, &b, 1, (int64_t)j->offset, on_read) == 0) return;
  j->in_flight = 0;
  lp_lua_conn *c = release(j);
  if (c) lp_conn_abort(lp_lua_conn_state(c)); /* fewer bytes than announced: no whole answer */
}

static void task_drain(lp_lua_task *t) {
  job *j = (job *)t;
  j->running = 1;
  if (j->c) read_piece(j);
  settle(j);
}

static void on_read(uv_fs_t *req) {
  job *j = req->data;
  ssize_t n = req->result;
  uv_fs_req_cleanup(req);
  j->in_flight = 0;
  j->running = 1;
  if (!j->c) {
    settle(j);
    return;
  }
  lp_lua_conn *c = j->c;
  lp_conn *conn = lp_lua_conn_state(c);
  if (n <= 0) { /* the file shrank or failed: the client must not take this as the whole body */
    release(j);
    lp_conn_abort(conn);
    settle(j);
    return;
  }
  if ((uint64_t)n > j->left) n = (ssize_t)j->left; /* it grew: what was announced, no more */
  j->offset += (uint64_t)n;
  j->left -= (uint64_t)n;
  lp_slice s = {j->piece, (size_t)n};
  if (lp_conn_write(conn, &s, 1) != 0) { /* closed, or over its output budget */
    release(j);
    settle(j);
    return;
  }
  if (j->left == 0) {
    release(j);
    lp_conn_response_done(conn, j->keep, lp_lua_conn_now(c));
  } else if (lp_lua_conn_queued(c) <= LP_STATIC_LOW_WATER) {
    read_piece(j);
  } else {
    lp_lua_conn_wait_drain(c, LP_STATIC_LOW_WATER);
  }
  settle(j);
}

/* The file is open and checked: the head, then the body piece by piece. */
static void send_file(job *j, uint64_t size, int64_t mtime) {
  lp_lua_statics *st = j->st;
  lp_lua_conn *c = j->c;
  lp_static_reply r = reply_for(c, j->keep_alive, j->http10);
  uint64_t first = 0, last = size ? size - 1 : 0;
  int rc = lp_static_range_apply(&j->range, size, &first, &last);
  lp_buf_reset(&st->answer);
  if (rc < 0) {
    release(j);
    send_whole(c, &st->answer, r.keep, lp_static_unsatisfiable(&st->answer, mtime, size, j->head_only, &r));
    return;
  }
  const char *type = lp_static_content_type(j->path, j->path_len);
  if (lp_static_file_head(&st->answer, rc ? 206 : 200, type, mtime, size, first, last, &r) != 0) {
    release(j);
    lp_conn_fail(lp_lua_conn_state(c), 503, "out of memory", lp_lua_conn_now(c));
    return;
  }
  uint64_t length = size ? last - first + 1 : 0;
  lp_conn *conn = lp_lua_conn_state(c);
  lp_slice s = {st->answer.data, st->answer.len};
  if (lp_conn_write(conn, &s, 1) != 0) {
    release(j);
    return;
  }
  lp_lua_conn_count_fast(c);
  if (j->head_only || length == 0) {
    release(j);
    lp_conn_response_done(conn, r.keep, lp_lua_conn_now(c));
    return;
  }
  j->keep = r.keep;
  j->offset = first;
  j->left = length;
  j->piece_len = length < LP_STATIC_PIECE ? (size_t)length : LP_STATIC_PIECE;
  j->piece = malloc(j->piece_len);
  if (!j->piece) {
    release(j);
    lp_conn_abort(conn); /* the head is out: no other answer fits now */
    return;
  }
  read_piece(j);
}

static void on_fstat(uv_fs_t *req) {
  job *j = req->data;
  ssize_t result = req->result;
  uv_stat_t st = req->statbuf;
  uv_fs_req_cleanup(req);
  j->in_flight = 0;
  j->running = 1;
  if (j->c) {
    /* checked again on the open file: the name may point elsewhere by now */
    if (result < 0 || !S_ISREG(st.st_mode))
      job_error(j, 404, "not found");
    else
      send_file(j, st.st_size, (int64_t)st.st_mtim.tv_sec);
  }
  settle(j);
}

static void on_open(uv_fs_t *req) {
  job *j = req->data;
  ssize_t result = req->result;
  uv_fs_req_cleanup(req);
  j->in_flight = 0;
  j->running = 1;
  if (result >= 0) j->fd = (uv_file)result; /* closed by job_end, whatever happens next */
  if (j->c) {
    if (result < 0) {
      job_lookup_failed(j, result);
    } else {
      j->in_flight = 1;
      if (uv_fs_fstat(j->loop, &j->req, j->fd, on_fstat) != 0) {
        j->in_flight = 0;
        job_error(j, 500, "cannot read file");
      }
    }
  }
  settle(j);
}

static void on_stat(uv_fs_t *req) {
  job *j = req->data;
  ssize_t result = req->result;
  int regular = result >= 0 && S_ISREG(req->statbuf.st_mode);
  uv_fs_req_cleanup(req);
  j->in_flight = 0;
  j->running = 1;
  if (j->c) {
    if (result < 0) {
      job_lookup_failed(j, result);
    } else if (!regular) { /* opening a FIFO (or a device) could hold a thread of the pool for good */
      job_error(j, 404, "not found");
    } else {
      j->in_flight = 1;
      if (uv_fs_open(j->loop, &j->req, j->real, O_RDONLY | O_NONBLOCK, 0, on_open) != 0) {
        j->in_flight = 0;
        job_error(j, 500, "cannot read file");
      }
    }
  }
  settle(j);
}

static void on_realpath(uv_fs_t *req) {
  job *j = req->data;
  j->in_flight = 0;
  j->running = 1;
  if (!j->c) {
    uv_fs_req_cleanup(req);
    settle(j);
    return;
  }
  if (req->result < 0) {
    ssize_t result = req->result;
    uv_fs_req_cleanup(req);
    job_lookup_failed(j, result);
    settle(j);
    return;
  }
  const char *real = req->ptr;
  size_t len = strlen(real);
  lp_static_mount *mount = j->mount;
  if (!mount->root && !mount->follow_symlinks) {
    /* once: a directory made after the mount (POSIX realpath, on the loop, as at mount time) */
    char *root = realpath(mount->dir, NULL);
    if (root) lp_static_set_root(mount, root, strlen(root));
    free(root);
  }
  int inside = lp_static_inside(mount, real, len);
  j->real = inside ? malloc(len + 1) : NULL;
  if (j->real) memcpy(j->real, real, len + 1);
  uv_fs_req_cleanup(req);
  if (!inside) {
    job_error(j, 404, "not found"); /* a symlink out of the directory */
  } else if (!j->real) {
    job_error(j, 503, "out of memory");
  } else {
    j->in_flight = 1;
    if (uv_fs_stat(j->loop, &j->req, j->real, on_stat) != 0) {
      j->in_flight = 0;
      job_error(j, 500, "cannot read file");
    }
  }
  settle(j);
}

/* The value of the request's Range header and how many there were. */
static lp_slice range_header(const lp_http_event *head, int *count) {
  lp_slice value = {NULL, 0};
  *count = 0;
  for (size_t i = 0; i < head->nheaders; i++) {
    lp_slice n = head->headers[i].name;
    if (n.len == 5 && memcmp(n.ptr, "range", 5) == 0) {
      if (++*count == 1) value = head->headers[i].value;
    }
  }
  return value;
}

static int is_method(lp_slice m, const char *name) { return m.len == strlen(name) && memcmp(m.ptr, name, m.len) == 0; }

int lp_lua_static_request(lp_lua_statics *st, lp_lua_conn *c, const lp_http_event *head) {
  if (!st || st->mounts.nmounts == 0) return 0;
  lp_slice path, query;
  if (lp_http_split_target(head->target, &path, &query) != 0) return 0;
  if (memchr(path.ptr, '%', path.len)) {
    lp_buf_reset(&st->path);
    if (lp_buf_reserve(&st->path, path.len) != 0) return 0;
    ssize_t n = lp_http_decode(path.ptr, path.len, st->path.data, 0);
    if (n < 0) return 0; /* Lua's 400 */
    path = (lp_slice){st->path.data, (size_t)n};
  }
  lp_static_mount *mount = lp_static_match(&st->mounts, path);
  if (!mount) return 0;
  if (query.len && memchr(query.ptr, '%', query.len)) { /* a query that does not decode: Lua's 400 */
    lp_buf_reset(&st->answer);
    if (lp_buf_reserve(&st->answer, query.len) != 0 || lp_http_decode(query.ptr, query.len, st->answer.data, 1) < 0)
      return 0;
  }
  int head_only = is_method(head->method, "HEAD");
  int http10 = head->minor == 0;
  if (!head_only && !is_method(head->method, "GET")) {
    send_error(st, c, 405, "method not allowed", "GET, HEAD", 0, head->keep_alive, http10);
    return 1;
  }
  lp_slice rel = {path.ptr + mount->prefix_len, path.len - mount->prefix_len};
  int status = lp_static_check(rel);
  if (status != 0) {
    send_error(st, c, status, status == 400 ? "invalid path" : "not found", NULL, head_only, head->keep_alive, http10);
    return 1;
  }
  lp_buf file = LP_BUF_INIT;
  job *j = NULL;
  if (lp_static_file_path(mount, rel, &file) == 0) j = calloc(1, sizeof *j + file.len + 1);
  if (!j) {
    lp_buf_free(&file);
    lp_conn_fail(lp_lua_conn_state(c), 503, "out of memory", lp_lua_conn_now(c));
    return 1;
  }
  memcpy(j->path, file.data, file.len + 1);
  j->path_len = file.len;
  lp_buf_free(&file);
  j->task.drain = task_drain;
  j->task.gone = task_gone;
  j->c = c;
  j->st = st;
  j->mount = mount;
  j->loop = lp_lua_conn_loop(c);
  j->fd = -1;
  j->req.data = j;
  j->head_only = head_only;
  j->keep_alive = head->keep_alive;
  j->http10 = http10;
  int count;
  lp_slice range = range_header(head, &count);
  lp_static_range_parse(range, count, &j->range);
  j->in_flight = 1;
  if (uv_fs_realpath(j->loop, &j->req, j->path, on_realpath) != 0) {
    job_free(j);
    send_error(st, c, 500, "cannot read file", NULL, head_only, head->keep_alive, http10);
    return 1;
  }
  lp_lua_conn_set_task(c, &j->task);
  return 1;
}

static lp_lua_statics *statics_of(lua_State *L, lp_lua_statics **statics) {
  if (!*statics) {
    *statics = calloc(1, sizeof **statics);
    if (!*statics) luaL_error(L, "out of memory");
  }
  return *statics;
}

int lp_lua_static_mount(lua_State *L, lp_lua_statics **statics) {
  size_t plen, dlen;
  const char *prefix = luaL_checklstring(L, 2, &plen);
  const char *dir = luaL_checklstring(L, 3, &dlen);
  int follow = lua_toboolean(L, 4);
  luaL_argcheck(L, plen > 0 && prefix[0] == '/', 2, "must start with '/'");
  luaL_argcheck(L, dlen > 0 && strlen(dir) == dlen, 3, "a directory path expected");
  lp_lua_statics *st = statics_of(L, statics);
  /* resolved once, now (the directory itself may be a symlink); NULL when it does not exist
   * (yet): it is tried again when a file is asked for */
  char *root = realpath(dir, NULL);
  int rc = lp_static_add_mount(&st->mounts, prefix, plen, dir, dlen, root, follow);
  free(root);
  if (rc != 0) return luaL_error(L, "out of memory");
  return 0;
}

int lp_lua_static_route(lua_State *L, lp_lua_statics **statics) {
  size_t len;
  const char *path = luaL_checklstring(L, 2, &len);
  if (lp_static_add_route(&statics_of(L, statics)->mounts, path, len) != 0) return luaL_error(L, "out of memory");
  return 0;
}

void lp_lua_static_free(lp_lua_statics *st) {
  if (!st) return;
  lp_static_free(&st->mounts);
  lp_buf_free(&st->path);
  lp_buf_free(&st->answer);
  free(st);
}
