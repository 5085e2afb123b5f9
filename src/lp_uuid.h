/* lp_uuid: random UUID v4 event ids from the OS random source. */
#ifndef LP_UUID_H
#define LP_UUID_H

#include <stddef.h>

#define LP_UUID_LEN 36 /* text length, without the NUL */

/* Writes a lower-case UUID v4 and a NUL into out (LP_UUID_LEN + 1 bytes).
 * Returns 0, or -1 when the OS random source fails. */
int lp_uuid_v4(char out[LP_UUID_LEN + 1]);
/* Fills p with n random bytes from the OS; 0 or -1. */
int lp_random_bytes(void *p, size_t n);
/* 1 when s[0..len) is a UUID in 8-4-4-4-12 hex form (either case), else 0. */
int lp_uuid_is_valid(const char *s, size_t len);

#endif
