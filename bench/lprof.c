/* lprof: a sampling profiler for Lua 5.4, for bench/profile.lua. SIGPROF
 * (process CPU time) arms a one-instruction count hook; the hook records the
 * Lua call stack. Time spent in a C function is charged to the Lua line that
 * called it (the hook runs when control is back in Lua), time in the event
 * loop to the first Lua line of the next callback.
 *
 *   local lprof = require "lprof"; lprof.start(1000)  -- samples per CPU second
 *   ...; local samples = lprof.stop()                 -- { [stack] = count }
 * A stack is "src:line|fn@src:defined;caller@src:defined;..." (innermost first). */
#include <lauxlib.h>
#include <lua.h>
#include <signal.h>
#include <string.h>
#include <sys/time.h>

#define MAX_DEPTH 12

static lua_State *main_L;
static int table_ref = LUA_NOREF;

static void hook(lua_State *L, lua_Debug *ar) {
  (void)ar;
  lua_sethook(L, NULL, 0, 0);
  luaL_Buffer b;
  luaL_buffinit(L, &b);
  lua_Debug d;
  for (int level = 0; level < MAX_DEPTH && lua_getstack(L, level, &d); level++) {
    lua_getinfo(L, "Snl", &d);
    char frame[256];
    if (level == 0) { /* the line running now, then the functions */
      snprintf(frame, sizeof frame, "%s:%d|", d.short_src, d.currentline);
      luaL_addstring(&b, frame);
    }
    snprintf(frame, sizeof frame, "%s%s@%s:%d", level ? ";" : "", d.name ? d.name : "?", d.short_src, d.linedefined);
    luaL_addstring(&b, frame);
  }
  luaL_pushresult(&b);
  lua_rawgeti(L, LUA_REGISTRYINDEX, table_ref);
  lua_pushvalue(L, -2);
  lua_rawget(L, -2);
  lua_Integer n = lua_tointeger(L, -1);
  lua_pop(L, 1);
  lua_pushvalue(L, -2);
  lua_pushinteger(L, n + 1);
  lua_rawset(L, -3);
  lua_pop(L, 2);
}

static void on_sigprof(int sig) {
  (void)sig;
  if (main_L) lua_sethook(main_L, hook, LUA_MASKCOUNT, 1); /* safe from a signal handler */
}

static int l_start(lua_State *L) {
  lua_Integer hz = luaL_optinteger(L, 1, 1000);
  lua_newtable(L);
  table_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  lua_rawgeti(L, LUA_REGISTRYINDEX, LUA_RIDX_MAINTHREAD);
  main_L = lua_tothread(L, -1);
  lua_pop(L, 1);
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = on_sigprof;
  sa.sa_flags = SA_RESTART;
  sigaction(SIGPROF, &sa, NULL);
  struct itimerval it;
  it.it_interval.tv_sec = 0;
  it.it_interval.tv_usec = (suseconds_t)(1000000 / hz);
  it.it_value = it.it_interval;
  setitimer(ITIMER_PROF, &it, NULL);
  return 0;
}

static int l_stop(lua_State *L) {
  struct itimerval it;
  memset(&it, 0, sizeof it);
  setitimer(ITIMER_PROF, &it, NULL);
  main_L = NULL;
  lua_sethook(L, NULL, 0, 0);
  lua_rawgeti(L, LUA_REGISTRYINDEX, table_ref);
  return 1;
}

int luaopen_lprof(lua_State *L) {
  static const luaL_Reg fns[] = {{"start", l_start}, {"stop", l_stop}, {NULL, NULL}};
  luaL_newlib(L, fns);
  return 1;
}
