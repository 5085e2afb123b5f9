#!/bin/sh
# Builds the libFuzzer harnesses (ASan + UBSan) into build/fuzz/.
# Usage: fuzz/build.sh            (CC=clang, extra flags in FUZZ_CFLAGS)
set -eu
root=$(cd "$(dirname "$0")/.." && pwd)
out="$root/build/fuzz"
CC=${CC:-clang}
case "$CC" in *clang*) ;; *) CC=clang ;; esac # libFuzzer needs clang, whatever make's CC is
FUZZ_CFLAGS=${FUZZ_CFLAGS:-}
mkdir -p "$out"
core="$root/src/lp_buf.c $root/src/lp_json.c $root/src/lp_store.c $root/src/lp_uuid.c $root/src/lp_http.c $root/src/lp_conn.c $root/src/lp_waiter.c $root/src/lp_cache.c $root/src/lp_fast.c $root/src/lp_static.c $root/src/lp_stats.c $root/src/lp_keys.c"
flags="-std=c11 -D_GNU_SOURCE -g -O1 -fno-omit-frame-pointer -Wall -Wextra -Wshadow
  -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all -I$root/src"
for f in json store http conn cache static keys; do
  extra=
  # fuzz_store and fuzz_http make chosen allocations fail: they wrap the allocator
  case "$f" in store | http) extra="-Wl,--wrap=malloc -Wl,--wrap=calloc -Wl,--wrap=realloc" ;; esac
  echo "fuzz/build.sh: building $out/fuzz_$f"
  # shellcheck disable=SC2086
  $CC $flags $FUZZ_CFLAGS "$root/fuzz/fuzz_$f.c" $core $extra -o "$out/fuzz_$f.new"
  mv "$out/fuzz_$f.new" "$out/fuzz_$f" # a running fuzzer keeps its old binary
done
