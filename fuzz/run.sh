#!/bin/sh
# Builds and runs each fuzzer for SECONDS (default 60), one after the other.
# Exits non-zero when a fuzzer finds a crash, a leak or a broken invariant;
# the input that did it is left in build/fuzz/findings/.
# Usage: fuzz/run.sh [SECONDS]
#   FUZZ_JOBS=2 runs the fuzzers at once; FUZZERS="store" runs only those named;
#   FUZZ_CFLAGS is passed to build.sh.
set -u
secs=${1:-60}
root=$(cd "$(dirname "$0")/.." && pwd)
out="$root/build/fuzz"
"$root/fuzz/build.sh" || exit 2
mkdir -p "$out/findings"

# The reproducers of bugs found before (fuzz/repro/<fuzzer>-*.bin) replay first: a fix that
# comes undone fails here at once.
for f in "$root"/fuzz/repro/*-*.bin; do
  [ -f "$f" ] || continue
  name=$(basename "$f" | cut -d- -f1)
  if ! "$out/fuzz_$name" "$f" >"$out/replay.log" 2>&1; then
    echo "fuzz/run.sh: reproducer $f fails again:"
    grep -aE 'ERROR|invariant failed|SUMMARY' "$out/replay.log" | head -n 5 | sed 's/^/  /'
    exit 1
  fi
done
echo "fuzz/run.sh: every reproducer in fuzz/repro/ replays clean"

run_one() {
  name=$1
  # New inputs go to a scratch corpus under build/; fuzz/corpus/ holds only the seeds.
  mkdir -p "$out/corpus/$name"
  dict=
  [ -f "$root/fuzz/$name.dict" ] && dict="-dict=$root/fuzz/$name.dict"
  echo "fuzz/run.sh: fuzz_$name for ${secs}s (log: $out/fuzz_$name.log)"
  touch "$out/findings/.start-$name"
  "$out/fuzz_$name" -max_total_time="$secs" -print_final_stats=1 -max_len="$2" -timeout=10 -rss_limit_mb=2048 $dict \
    -artifact_prefix="$out/findings/${name}-" "$out/corpus/$name" "$root/fuzz/corpus/$name" >"$out/fuzz_$name.log" 2>&1 &
  pid=$!
  # progress: the latest status line every 30 seconds
  while kill -0 "$pid" 2>/dev/null; do
    sleep 30 &
    wait $! 2>/dev/null
    kill -0 "$pid" 2>/dev/null || break
    line=$(grep -aE '^#[0-9]+' "$out/fuzz_$name.log" | tail -n 1)
    [ -n "$line" ] && echo "  fuzz_$name: $line"
  done
  wait "$pid"
  rc=$?
  grep -aE '^#[0-9]+[[:space:]]+DONE' "$out/fuzz_$name.log" | tail -n 1 | sed "s/^/  fuzz_$name: /"
  grep -aE '^(stat::number_of_executed_units|stat::peak_rss_mb|Done )' "$out/fuzz_$name.log" | sed "s/^/  fuzz_$name: /"
  if [ "$rc" -ne 0 ]; then
    echo "fuzz/run.sh: fuzz_$name FAILED (exit $rc); reproducer in $out/findings/:"
    find "$out/findings" -name "$name-*" -newer "$out/findings/.start-$name" | sed 's/^/  /'
    grep -aE 'ERROR|invariant failed|SUMMARY' "$out/fuzz_$name.log" | head -n 5 | sed 's/^/  /'
    echo "  rerun: $out/fuzz_$name <file>"
  fi
  return "$rc"
}

status=0
pids=
for name in ${FUZZERS:-json store http conn cache static keys}; do
  if [ "${FUZZ_JOBS:-1}" -ge 2 ]; then
    run_one "$name" 4096 &
    pids="$pids $!"
  else
    run_one "$name" 4096 || status=1
  fi
done
for pid in $pids; do wait "$pid" || status=1; done
[ "$status" -eq 0 ] && echo "fuzz/run.sh: no findings" || echo "fuzz/run.sh: FINDINGS (see above)"
exit "$status"
