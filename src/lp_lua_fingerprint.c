/* lp_lua_fingerprint: core.fingerprint(s1, s2, ...) -> 32 hex characters, lp_fingerprint of
 * the strings. */
#include <lauxlib.h>
#include <lua.h>

#include "lp_fingerprint.h"

int lp_lua_fingerprint(lua_State *L) {
  int n = lua_gettop(L);
  lp_fingerprint st;
  lp_fingerprint_init(&st);
  for (int i = 1; i <= n; i++) {
    size_t len;
    const char *s = luaL_checklstring(L, i, &len);
    lp_fingerprint_add(&st, s, len);
  }
  char out[LP_FINGERPRINT_LEN + 1];
  lp_fingerprint_hex(&st, out);
  lua_pushlstring(L, out, LP_FINGERPRINT_LEN);
  return 1;
}
