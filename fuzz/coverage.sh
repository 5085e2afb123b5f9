#!/bin/sh
# Line and branch coverage of src/ by the fuzzers' corpora (seeds plus what
# fuzz/run.sh found in build/fuzz/corpus/), with clang's source coverage.
# Usage: fuzz/coverage.sh        (report in build/fuzz/coverage/)
set -eu
root=$(cd "$(dirname "$0")/.." && pwd)
out="$root/build/fuzz/coverage"
mkdir -p "$out"
core="$root/src/lp_buf.c $root/src/lp_json.c $root/src/lp_store.c $root/src/lp_uuid.c $root/src/lp_http.c"
for f in json store http; do
  extra=
  [ "$f" != json ] && extra="-Wl,--wrap=malloc -Wl,--wrap=calloc -Wl,--wrap=realloc"
  # shellcheck disable=SC2086
  clang -std=c11 -D_GNU_SOURCE -g -O1 -fsanitize=fuzzer -fprofile-instr-generate -fcoverage-mapping \
    ${FUZZ_CFLAGS:-} -I"$root/src" "$root/fuzz/fuzz_$f.c" $core $extra -o "$out/fuzz_$f"
  mkdir -p "$root/build/fuzz/corpus/$f"
  LLVM_PROFILE_FILE="$out/$f.profraw" "$out/fuzz_$f" -runs=0 "$root/build/fuzz/corpus/$f" "$root/fuzz/corpus/$f" \
    >"$out/$f.log" 2>&1
  llvm-profdata merge -sparse "$out/$f.profraw" -o "$out/$f.profdata"
  echo "fuzz/coverage.sh: src/ covered by the $f corpus"
  llvm-cov report "$out/fuzz_$f" -instr-profile="$out/$f.profdata" $core | sed 's/^/  /'
done
