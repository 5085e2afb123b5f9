/* lp_fingerprint: a 128-bit hash of a list of strings, as 32 hex characters (the fingerprint
 * of a publish under an Idempotency-Key: its category and data). Sans-I/O. */
#ifndef LP_FINGERPRINT_H
#define LP_FINGERPRINT_H

#include <stddef.h>
#include <stdint.h>

#define LP_FINGERPRINT_LEN 32

typedef struct lp_fingerprint {
  uint64_t a; /* FNV-1a, 64 bits */
  uint64_t b; /* a multiply-xorshift mix over 8-byte words */
} lp_fingerprint;

void lp_fingerprint_init(lp_fingerprint *st);
/* Adds one string (its length first). */
void lp_fingerprint_add(lp_fingerprint *st, const char *s, size_t len);
/* The fingerprint of the strings added so far, NUL-terminated. */
void lp_fingerprint_hex(const lp_fingerprint *st, char out[LP_FINGERPRINT_LEN + 1]);

#endif
