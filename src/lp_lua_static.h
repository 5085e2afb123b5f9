/* lp_lua_static.h: static file mounts served by the HTTP engine in C (lp_lua_static.c), for
 * lp_lua_server.c: the mounts of one server, the Lua methods that set them, and the request
 * hook. Internal to longpoll.core. */
#ifndef LP_LUA_STATIC_H
#define LP_LUA_STATIC_H

#include <lua.h>

#include "lp_http.h"
#include "lp_lua_server.h"

typedef struct lp_lua_statics lp_lua_statics; /* a server's mounts; owned by the server */

/* server:static_mount(prefix, dir[, follow_symlinks]) on *statics (made on first use). */
int lp_lua_static_mount(lua_State *L, lp_lua_statics **statics);
/* server:route_path(path): a route owns path, no mount answers it. */
int lp_lua_static_route(lua_State *L, lp_lua_statics **statics);
/* A request to c: 1 when a mount takes it (answered now, or its file is being looked up and
 * sent), 0 when it is not a mount's (or its target does not decode: Lua answers 400). */
int lp_lua_static_request(lp_lua_statics *statics, lp_lua_conn *c, const lp_http_event *head);
/* Frees the mounts (NULL is fine). The server's connections are closed by then: the files still
 * being read no longer point at them. */
void lp_lua_static_free(lp_lua_statics *statics);

#endif
