/* lp_static: the rules of static file mounts (server:static), sans-I/O: which mount a request
 * path falls in (routes come first, the longest prefix wins), which paths are refused before the
 * disk is asked (NUL, backslash, "..", hidden files, over-long names), the file's path, whether a
 * resolved path stays inside the mount, what a failed lookup means, single byte ranges, content
 * types and the bytes of the answers' heads. The I/O (libuv's file requests on luv's loop) is
 * src/lp_lua_static.c. The mounts own their strings. */
#ifndef LP_STATIC_H
#define LP_STATIC_H

#include <stddef.h>
#include <stdint.h>

#include "lp_buf.h"
#include "lp_store.h" /* lp_slice */

/* Files up to this size go out in one read; larger ones in pieces of this size. */
#define LP_STATIC_PIECE 65536
/* The next piece is read once at most this much output waits for the client. */
#define LP_STATIC_LOW_WATER (4 * LP_STATIC_PIECE)
/* A path segment longer than this cannot name a file (NAME_MAX): 404 without asking the disk. */
#define LP_STATIC_NAME_MAX 255

typedef struct lp_static_mount {
  char *prefix; /* starts and ends with '/', owned */
  size_t prefix_len;
  char *dir; /* as given, without trailing slashes, owned */
  size_t dir_len;
  char *root; /* dir's real path, owned; NULL until it could be resolved */
  size_t root_len;
  int follow_symlinks; /* serve symlinks whose target lies outside root */
} lp_static_mount;

typedef struct lp_static_mounts {
  lp_static_mount **mounts; /* longest prefix first; each keeps its address until lp_static_free */
  size_t nmounts;
  lp_slice *routes; /* the paths routes own (copied, owned): no mount takes them */
  size_t nroutes;
} lp_static_mounts;

#define LP_STATIC_MOUNTS_INIT \
  { NULL, 0, NULL, 0 }

/* Adds a mount (prefix gets a trailing '/' when it has none; dir loses its trailing slashes,
 * unless it is "/"); a mount with the same prefix is changed in place. root: dir's real path, or NULL
 * when it cannot be resolved yet. Everything is copied. 0, or -1 when memory ran out (nothing
 * changed). */
int lp_static_add_mount(lp_static_mounts *m, const char *prefix, size_t prefix_len, const char *dir, size_t dir_len,
                        const char *root, int follow_symlinks);
/* Records that a route owns path (exact, decoded): no mount answers it. 0, or -1 (memory). */
int lp_static_add_route(lp_static_mounts *m, const char *path, size_t len);
/* Sets a mount's root (copied) once it could be resolved. 0, or -1 (memory). */
int lp_static_set_root(lp_static_mount *mount, const char *root, size_t len);
/* Frees what m owns; m is empty (and reusable) afterwards. */
void lp_static_free(lp_static_mounts *m);

/* The mount that answers the decoded path, or NULL (a route's path, or under no prefix). */
lp_static_mount *lp_static_match(const lp_static_mounts *m, lp_slice path);

/* The checks that need no disk, on rel (the decoded path after the mount's prefix): 0 when it
 * may name a file; 400 (a NUL byte or a backslash: "invalid path"); 404 (a segment that starts
 * with '.', or longer than LP_STATIC_NAME_MAX). */
int lp_static_check(lp_slice rel);
/* Sets out (emptied first) to the file's path, NUL-terminated: dir "/" rel, with "index.html"
 * after a rel that is empty or ends in '/'. 0, or -1 (memory). */
int lp_static_file_path(const lp_static_mount *mount, lp_slice rel, lp_buf *out);
/* Whether the resolved path real may be served: the mount follows symlinks, or real lies under
 * its root (unknown root: no). */
int lp_static_inside(const lp_static_mount *mount, const char *real, size_t len);
/* What a failed lookup (errno value err, positive) means for the client: 404 "not found"
 * (ENOENT, ENOTDIR, ENAMETOOLONG, ELOOP), 403 "forbidden" (EACCES, EPERM), else 500 "cannot
 * read file". *message: a static string. */
int lp_static_lookup_status(int err, const char **message);
/* The Content-Type of a file path, by its extension (a static string; application/octet-stream
 * when unknown). */
const char *lp_static_content_type(const char *path, size_t len);

/* A Range header's value, parsed before the file's size is known. */
enum { LP_RANGE_NONE = 0, LP_RANGE_FROM, LP_RANGE_SUFFIX };
typedef struct lp_static_range {
  int kind;      /* LP_RANGE_NONE: none, or not one we serve (several, malformed): the whole file */
  uint64_t a, b; /* FROM: first byte a, last b (has_b) or the end; SUFFIX: the last b bytes */
  int has_b;
} lp_static_range;

/* Parses value (ptr NULL: no header; several Range headers count as malformed): a single
 * "bytes=a-b", "bytes=a-" or "bytes=-b", blanks allowed around each part, at most 15 digits. */
void lp_static_range_parse(lp_slice value, int count, lp_static_range *r);
/* Applies r to a file of size bytes: 0 for the whole file, 1 for [*first, *last] (206), -1 when
 * it cannot be satisfied (416). */
int lp_static_range_apply(const lp_static_range *r, uint64_t size, uint64_t *first, uint64_t *last);

/* "Sun, 06 Nov 1994 08:49:37 GMT" for Unix time t, NUL-terminated (the C locale's names). */
void lp_static_http_date(int64_t t, char out[64]);

/* What every answer's framing needs to know about its request and connection. */
typedef struct lp_static_reply {
  const char *date_line; /* "Date: ...\r\n", or NULL */
  int keep;              /* the connection stays open afterwards */
  int http10;            /* the request was HTTP/1.0 (keep-alive is then said) */
} lp_static_reply;

/* Appends the head of a file answer to out: status 200 (whole) or 206 (Content-Range first-last
 * of size), Content-Type, Last-Modified (mtime), Accept-Ranges, Content-Length, Date, Connection.
 * 0, or -1 (memory). */
int lp_static_file_head(lp_buf *out, int status, const char *content_type, int64_t mtime, uint64_t size, uint64_t first,
                        uint64_t last, const lp_static_reply *reply);
/* Appends a whole 416 answer for a file of size bytes (Content-Range "bytes *\/size"). */
int lp_static_unsatisfiable(lp_buf *out, int64_t mtime, uint64_t size, int head_only, const lp_static_reply *reply);
/* Appends a whole error answer: status {"error": message} as JSON, with an Allow line when allow
 * is not NULL; no body when head_only (a HEAD request). 0, or -1 (memory). */
int lp_static_error(lp_buf *out, int status, const char *message, const char *allow, int head_only,
                    const lp_static_reply *reply);

#endif
