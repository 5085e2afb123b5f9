/* lp_fingerprint: a 128-bit hash of a list of strings as 32 hex characters, each string
 * preceded by its length, so ("ab", "c") and ("a", "bc") differ. It tells a retried publish from a
 * different one under the same Idempotency-Key; it is not a cryptographic hash (the key's owner is
 * the only one who could aim for a collision, and would only fool itself). Sans-I/O. */
#include "lp_fingerprint.h"

#include <string.h>

static void fp_bytes(lp_fingerprint *st, const unsigned char *p, size_t n) {
  uint64_t a = st->a, b = st->b;
  for (size_t i = 0; i < n; i++) {
    a ^= p[i];
    a *= UINT64_C(0x100000001b3);
  }
  while (n >= 8) {
    uint64_t k;
    memcpy(&k, p, 8);
    b = (b ^ k) * UINT64_C(0xbf58476d1ce4e5b9);
    b ^= b >> 31;
    p += 8, n -= 8;
  }
  uint64_t k = 0;
  memcpy(&k, p, n);
  b = (b ^ k ^ ((uint64_t)n << 56)) * UINT64_C(0x94d049bb133111eb);
  b ^= b >> 29;
  st->a = a, st->b = b;
}

void lp_fingerprint_init(lp_fingerprint *st) {
  st->a = UINT64_C(0xcbf29ce484222325);
  st->b = UINT64_C(0x9e3779b97f4a7c15);
}

void lp_fingerprint_add(lp_fingerprint *st, const char *s, size_t len) {
  unsigned char lenbytes[8];
  for (int j = 0; j < 8; j++) lenbytes[j] = (unsigned char)((uint64_t)len >> (8 * j));
  fp_bytes(st, lenbytes, sizeof lenbytes);
  fp_bytes(st, (const unsigned char *)s, len);
}

void lp_fingerprint_hex(const lp_fingerprint *st, char out[LP_FINGERPRINT_LEN + 1]) {
  uint64_t b = st->b * UINT64_C(0xbf58476d1ce4e5b9);
  b ^= b >> 32;
  static const char hex[] = "0123456789abcdef";
  for (int j = 0; j < 16; j++) {
    out[j] = hex[(st->a >> (60 - 4 * j)) & 15];
    out[16 + j] = hex[(b >> (60 - 4 * j)) & 15];
  }
  out[LP_FINGERPRINT_LEN] = '\0';
}
