-- LuaRocks build of longpoll: the C core, the Lua modules, bin/longpoll and the JS client.
package = "longpoll"
version = "scm-1"
source = {
  url = "git+https://github.com/longpoll/longpoll.git",
}
description = {
  summary = "HTTP long-poll pub-sub for Lua 5.4, wire-compatible with golongpoll",
  detailed = [[
    A C core keeps events per category in bounded buffers with TTL; luv-based
    HTTP handlers serve golongpoll's API so its Go and JS clients work
    unchanged. Includes a Lua client, a browser client, file persistence and a
    standalone server (bin/longpoll).
  ]],
  license = "MIT",
}
dependencies = {
  "lua >= 5.4",
  "luv",
  "lua-cjson",
}
-- hiredis (Debian: libhiredis-dev) for the Redis engine's protocol module
-- libuv and luv's C library (Debian: libuv1-dev, lua-luv-dev) for the HTTP engine, which runs on
-- luv's loop
external_dependencies = {
  HIREDIS = { header = "hiredis/hiredis.h", library = "hiredis" },
  LIBUV = { header = "uv.h", library = "uv" },
  LUV = { library = "lua5.4-luv" },
}
build = {
  type = "builtin",
  modules = {
    ["longpoll.core"] = {
      sources = {
        "src/lp_buf.c", "src/lp_json.c", "src/lp_store.c", "src/lp_uuid.c", "src/lp_http.c",
        "src/lp_conn.c", "src/lp_fast.c", "src/lp_lua.c", "src/lp_lua_json.c", "src/lp_lua_http.c", "src/lp_lua_server.c", "src/lp_lua_native.c", "src/lp_lua_stream.c", "src/lp_lua_fingerprint.c",
        "src/lp_lua_stderr.c", "src/lp_waiter.c", "src/lp_deadlines.c", "src/lp_cors.c", "src/lp_cache.c", "src/lp_sse.c", "src/lp_lua_cache.c",
        "src/lp_static.c", "src/lp_lua_static.c", "src/lp_keys.c", "src/lp_lua_keys.c", "src/lp_stats.c",
        "src/lp_lua_stats.c", "src/lp_fingerprint.c", "src/lp_resp.c", "src/lp_redis_publish.c",
        "src/lp_lua_redis_publish.c",
      },
      defines = { "_GNU_SOURCE" },
      incdirs = { "src", "$(LIBUV_INCDIR)" },
      libraries = { "lua5.4-luv", "uv" },
      libdirs = { "$(LIBUV_LIBDIR)", "$(LUV_LIBDIR)" },
    },
    ["longpoll.hiredis"] = {
      sources = { "src/lp_hiredis.c" },
      libraries = { "hiredis" },
      incdirs = { "$(HIREDIS_INCDIR)" },
      libdirs = { "$(HIREDIS_LIBDIR)" },
    },
    ["longpoll"] = "lua/longpoll/init.lua",
    ["longpoll.manager"] = "lua/longpoll/manager.lua",
    ["longpoll.options"] = "lua/longpoll/options.lua",
    ["longpoll.log"] = "lua/longpoll/log.lua",
    ["longpoll.timeouts"] = "lua/longpoll/timeouts.lua",
    ["longpoll.cli"] = "lua/longpoll/cli.lua",
    ["longpoll.server"] = "lua/longpoll/server.lua",
    ["longpoll.http.parser"] = "lua/longpoll/http/parser.lua",
    ["longpoll.http.request"] = "lua/longpoll/http/request.lua",
    ["longpoll.http.response"] = "lua/longpoll/http/response.lua",
    ["longpoll.http.util"] = "lua/longpoll/http/util.lua",
    ["longpoll.http.native"] = "lua/longpoll/http/native.lua",
    ["longpoll.client"] = "lua/longpoll/client.lua",
    ["longpoll.http.client"] = "lua/longpoll/http/client.lua",
    ["longpoll.sse"] = "lua/longpoll/sse.lua",
    ["longpoll.stats"] = "lua/longpoll/stats.lua",
    ["longpoll.cors"] = "lua/longpoll/cors.lua",
    ["longpoll.addons"] = "lua/longpoll/addons/init.lua",
    ["longpoll.addons.file"] = "lua/longpoll/addons/file.lua",
    ["longpoll.sigpipe"] = "lua/longpoll/sigpipe.lua",
    ["longpoll.addons.file.fs"] = "lua/longpoll/addons/file/fs.lua",
    ["longpoll.addons.file.live"] = "lua/longpoll/addons/file/live.lua",
    ["longpoll.addons.file.restore"] = "lua/longpoll/addons/file/restore.lua",
    ["longpoll.addons.file.writer"] = "lua/longpoll/addons/file/writer.lua",
    ["longpoll.addons.file.compaction"] = "lua/longpoll/addons/file/compaction.lua",
    ["longpoll.addons.file.lock"] = "lua/longpoll/addons/file/lock.lua",
    ["longpoll.auth"] = "lua/longpoll/auth.lua",
    ["longpoll.idempotency"] = "lua/longpoll/idempotency.lua",
    ["longpoll.category_rules"] = "lua/longpoll/category_rules.lua",
    ["longpoll.dashboard"] = "lua/longpoll/dashboard.lua",
    ["longpoll.engine.redis"] = "lua/longpoll/engine/redis.lua",
    ["longpoll.engine.redis.cache"] = "lua/longpoll/engine/redis/cache.lua",
    ["longpoll.engine.redis.config"] = "lua/longpoll/engine/redis/config.lua",
    ["longpoll.engine.redis.connection"] = "lua/longpoll/engine/redis/connection.lua",
    ["longpoll.engine.redis.link"] = "lua/longpoll/engine/redis/link.lua",
    ["longpoll.engine.redis.marks"] = "lua/longpoll/engine/redis/marks.lua",
    ["longpoll.engine.redis.position"] = "lua/longpoll/engine/redis/position.lua",
    ["longpoll.engine.redis.scripts"] = "lua/longpoll/engine/redis/scripts.lua",
    ["longpoll.engine.redis.shard"] = "lua/longpoll/engine/redis/shard.lua",
    ["longpoll.engine.redis.waiters"] = "lua/longpoll/engine/redis/waiters.lua",
  },
  install = {
    bin = { longpoll = "bin/longpoll" },
    lua = {
      ["longpoll.js.longpoll"] = "lua/longpoll/js/longpoll.js",
      ["longpoll.js.longpoll_mjs"] = "lua/longpoll/js/longpoll.mjs",
    },
  },
}
