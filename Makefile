# longpoll: `make run` starts the demo, `make test` runs every test.
# Both install what is missing first (Debian packages, with sudo when not root).

LUA       ?= lua5.4
LUA_INC   ?= /usr/include/lua5.4
CC        ?= gcc
CFLAGS    ?= -O2 -g
WARN      := -std=c11 -D_GNU_SOURCE -Wall -Wextra -Wshadow -Wstrict-prototypes -Werror=implicit-function-declaration
CORE_SRC  := src/lp_buf.c src/lp_json.c src/lp_store.c src/lp_uuid.c src/lp_http.c src/lp_conn.c src/lp_fast.c \
             src/lp_waiter.c src/lp_deadlines.c src/lp_cors.c src/lp_cache.c src/lp_sse.c src/lp_static.c src/lp_keys.c src/lp_stats.c src/lp_fingerprint.c \
             src/lp_resp.c src/lp_redis_publish.c
# the Lua binding; the server engine runs on luv's libuv loop
LUA_SRC   := src/lp_lua.c src/lp_lua_json.c src/lp_lua_http.c src/lp_lua_server.c src/lp_lua_native.c src/lp_lua_stream.c src/lp_lua_stderr.c \
             src/lp_lua_fingerprint.c src/lp_lua_cache.c src/lp_lua_static.c src/lp_lua_keys.c src/lp_lua_stats.c \
             src/lp_lua_redis_publish.c
LUV_LIBS  := -llua5.4-luv -luv
CORE_HDR  := $(wildcard src/*.h)
BUILD     := build
MODULE    := $(BUILD)/longpoll/core.so
# the Redis engine's protocol module (hiredis), separate so the core never links it
HIREDIS   := $(BUILD)/longpoll/hiredis.so
SANITIZE  := -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=all
HOST      ?= 127.0.0.1
PORT      ?= 8101

DEBIAN_PACKAGES := lua5.4 liblua5.4-dev lua-cjson lua-luv lua-luv-dev libuv1-dev lua-busted luarocks \
                   gcc make valgrind libhiredis-dev lua-check clang-format clang libclang-rt-14-dev \
                   redis-server redis-sentinel chromium nodejs npm stress-ng

.PHONY: all deps build test test-c test-lua test-asan test-stress valgrind run bench soak fuzz lint clean

all: build

deps:
	@scripts/install-deps $(DEBIAN_PACKAGES)

# Besides the modules, links (git-ignored) let `lua5.4 -e 'require "longpoll"'`
# work from the repository root with Lua's default search paths.
build: $(MODULE) $(HIREDIS)
	@ln -sfn lua/longpoll longpoll
	@ln -sf ../../$(MODULE) lua/longpoll/core.so
	@ln -sf ../../$(HIREDIS) lua/longpoll/hiredis.so

$(MODULE): $(CORE_SRC) $(LUA_SRC) $(CORE_HDR)
	@mkdir -p $(dir $@)
	$(CC) $(WARN) $(CFLAGS) -fPIC -shared -I$(LUA_INC) $(CORE_SRC) $(LUA_SRC) -o $@ $(LUV_LIBS)

$(HIREDIS): src/lp_hiredis.c
	@mkdir -p $(dir $@)
	$(CC) $(WARN) $(CFLAGS) -fPIC -shared -I$(LUA_INC) src/lp_hiredis.c -o $@ -lhiredis

$(BUILD)/test_core: tests/test_core.c tests/tap.h $(CORE_SRC) $(CORE_HDR)
	@mkdir -p $(BUILD)
	$(CC) $(WARN) -O1 -g $(SANITIZE) -Isrc tests/test_core.c $(CORE_SRC) -o $@

$(BUILD)/test_core_plain: tests/test_core.c tests/tap.h $(CORE_SRC) $(CORE_HDR)
	@mkdir -p $(BUILD)
	$(CC) $(WARN) -O1 -g -Isrc tests/test_core.c $(CORE_SRC) -o $@

$(BUILD)/test_http: tests/test_http.c tests/tap.h $(CORE_SRC) $(CORE_HDR)
	@mkdir -p $(BUILD)
	$(CC) $(WARN) -O1 -g $(SANITIZE) -Isrc tests/test_http.c $(CORE_SRC) -o $@

$(BUILD)/test_http_plain: tests/test_http.c tests/tap.h $(CORE_SRC) $(CORE_HDR)
	@mkdir -p $(BUILD)
	$(CC) $(WARN) -O1 -g -Isrc tests/test_http.c $(CORE_SRC) -o $@

$(BUILD)/test_conn: tests/test_conn.c tests/tap.h $(CORE_SRC) $(CORE_HDR)
	@mkdir -p $(BUILD)
	$(CC) $(WARN) -O1 -g $(SANITIZE) -Isrc tests/test_conn.c $(CORE_SRC) -o $@

$(BUILD)/test_conn_plain: tests/test_conn.c tests/tap.h $(CORE_SRC) $(CORE_HDR)
	@mkdir -p $(BUILD)
	$(CC) $(WARN) -O1 -g -Isrc tests/test_conn.c $(CORE_SRC) -o $@

$(BUILD)/test_cache: tests/test_cache.c tests/tap.h tests/cache_model.h $(CORE_SRC) $(CORE_HDR)
	@mkdir -p $(BUILD)
	$(CC) $(WARN) -O1 -g $(SANITIZE) -Isrc tests/test_cache.c $(CORE_SRC) -o $@

$(BUILD)/test_cache_plain: tests/test_cache.c tests/tap.h tests/cache_model.h $(CORE_SRC) $(CORE_HDR)
	@mkdir -p $(BUILD)
	$(CC) $(WARN) -O1 -g -Isrc tests/test_cache.c $(CORE_SRC) -o $@

$(BUILD)/test_static: tests/test_static.c tests/tap.h $(CORE_SRC) $(CORE_HDR)
	@mkdir -p $(BUILD)
	$(CC) $(WARN) -O1 -g $(SANITIZE) -Isrc tests/test_static.c $(CORE_SRC) -o $@

$(BUILD)/test_static_plain: tests/test_static.c tests/tap.h $(CORE_SRC) $(CORE_HDR)
	@mkdir -p $(BUILD)
	$(CC) $(WARN) -O1 -g -Isrc tests/test_static.c $(CORE_SRC) -o $@

$(BUILD)/test_keys: tests/test_keys.c tests/tap.h $(CORE_SRC) $(CORE_HDR)
	@mkdir -p $(BUILD)
	$(CC) $(WARN) -O1 -g $(SANITIZE) -Isrc tests/test_keys.c $(CORE_SRC) -o $@

$(BUILD)/test_keys_plain: tests/test_keys.c tests/tap.h $(CORE_SRC) $(CORE_HDR)
	@mkdir -p $(BUILD)
	$(CC) $(WARN) -O1 -g -Isrc tests/test_keys.c $(CORE_SRC) -o $@

$(BUILD)/test_stats: tests/test_stats.c tests/tap.h $(CORE_SRC) $(CORE_HDR)
	@mkdir -p $(BUILD)
	$(CC) $(WARN) -O1 -g $(SANITIZE) -Isrc tests/test_stats.c $(CORE_SRC) -o $@

$(BUILD)/test_stats_plain: tests/test_stats.c tests/tap.h $(CORE_SRC) $(CORE_HDR)
	@mkdir -p $(BUILD)
	$(CC) $(WARN) -O1 -g -Isrc tests/test_stats.c $(CORE_SRC) -o $@

$(BUILD)/test_resp: tests/test_resp.c tests/tap.h $(CORE_SRC) $(CORE_HDR)
	@mkdir -p $(BUILD)
	$(CC) $(WARN) -O1 -g $(SANITIZE) -Isrc tests/test_resp.c $(CORE_SRC) -o $@

$(BUILD)/test_resp_plain: tests/test_resp.c tests/tap.h $(CORE_SRC) $(CORE_HDR)
	@mkdir -p $(BUILD)
	$(CC) $(WARN) -O1 -g -Isrc tests/test_resp.c $(CORE_SRC) -o $@

C_TESTS := $(BUILD)/test_core $(BUILD)/test_core_plain $(BUILD)/test_http $(BUILD)/test_http_plain \
           $(BUILD)/test_conn $(BUILD)/test_conn_plain $(BUILD)/test_cache $(BUILD)/test_cache_plain \
           $(BUILD)/test_static $(BUILD)/test_static_plain $(BUILD)/test_keys $(BUILD)/test_keys_plain \
           $(BUILD)/test_stats $(BUILD)/test_stats_plain $(BUILD)/test_resp $(BUILD)/test_resp_plain

test-c: $(C_TESTS)
	@scripts/run-tests c

test-lua: build
	@scripts/run-tests lua

# `make test`: deps, build, C tests (ASan+UBSan, then valgrind), every busted spec, one summary line.
test: deps build $(C_TESTS)
	@scripts/run-tests all

$(BUILD)/asan/longpoll/core.so: $(CORE_SRC) $(LUA_SRC) $(CORE_HDR)
	@mkdir -p $(dir $@)
	$(CC) $(WARN) -O1 -g $(SANITIZE) -fPIC -shared -I$(LUA_INC) $(CORE_SRC) $(LUA_SRC) -o $@ $(LUV_LIBS)

$(BUILD)/asan/longpoll/hiredis.so: src/lp_hiredis.c
	@mkdir -p $(dir $@)
	$(CC) $(WARN) -O1 -g $(SANITIZE) -fPIC -shared -I$(LUA_INC) src/lp_hiredis.c -o $@ -lhiredis

test-asan: deps $(BUILD)/asan/longpoll/core.so $(BUILD)/asan/longpoll/hiredis.so
	@scripts/run-tests asan

# The busted suite (plain and ASan) while stress-ng loads both cores, RUNS times in a row
# (default 3): the suite must not depend on an idle machine.
test-stress: deps build $(BUILD)/asan/longpoll/core.so $(BUILD)/asan/longpoll/hiredis.so
	@scripts/stress-suite $(or $(RUNS),3)

# Long-running jobs, not part of `make test`; each prints progress as it goes.
bench: deps build
	@bench/run

soak: deps build
	@scripts/soak 10

fuzz:
	@fuzz/run.sh 600

run: deps build
	$(LUA) bin/longpoll serve --host $(HOST) --port $(PORT) --static examples/demo

lint:
	@scripts/test-lint

clean:
	rm -rf $(BUILD)
