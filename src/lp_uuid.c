/* lp_uuid: UUID v4 from getrandom(2), drawn from a small pool so that one
 * publish does not cost one system call. */
#include "lp_uuid.h"

#include <errno.h>
#include <string.h>
#include <sys/random.h>

/* The pool is per thread: the module may be loaded by several Lua states in
 * several threads, and ids must never repeat between them. */
static _Thread_local unsigned char pool[512];
static _Thread_local size_t pool_left;

int lp_random_bytes(void *p, size_t n) {
  unsigned char *out = p;
  while (n > 0) {
    ssize_t got = getrandom(out, n, 0);
    if (got < 0) {
      if (errno == EINTR) continue;
      return -1;
    }
    out += got;
    n -= (size_t)got;
  }
  return 0;
}

static int take_random(unsigned char *out, size_t n) {
  if (pool_left < n) {
    if (lp_random_bytes(pool, sizeof pool) != 0) return -1;
    pool_left = sizeof pool;
  }
  memcpy(out, pool + sizeof pool - pool_left, n);
  /* Used bytes are wiped so a memory dump cannot predict past ids. */
  memset(pool + sizeof pool - pool_left, 0, n);
  pool_left -= n;
  return 0;
}

int lp_uuid_v4(char out[LP_UUID_LEN + 1]) {
  static const char hex[] = "0123456789abcdef";
  unsigned char b[16];
  if (take_random(b, sizeof b) != 0) return -1;
  b[6] = (unsigned char)((b[6] & 0x0f) | 0x40); /* version 4 */
  b[8] = (unsigned char)((b[8] & 0x3f) | 0x80); /* RFC 4122 variant */
  char *o = out;
  for (int i = 0; i < 16; i++) {
    if (i == 4 || i == 6 || i == 8 || i == 10) *o++ = '-';
    *o++ = hex[b[i] >> 4];
    *o++ = hex[b[i] & 15];
  }
  *o = '\0';
  return 0;
}

int lp_uuid_is_valid(const char *s, size_t len) {
  if (len != LP_UUID_LEN) return 0;
  for (size_t i = 0; i < len; i++) {
    char c = s[i];
    if (i == 8 || i == 13 || i == 18 || i == 23) {
      if (c != '-') return 0;
    } else if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F'))) {
      return 0;
    }
  }
  return 1;
}
