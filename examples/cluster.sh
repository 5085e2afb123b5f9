#!/usr/bin/env bash
# Three longpoll nodes sharing events through Redis (docs/scaling.md): publish on any node,
# subscribe on any other. Each node also serves the demo page.
# Run (from the repository root, after `make`, with Redis on 127.0.0.1:6379):  examples/cluster.sh
#   then open http://127.0.0.1:8101/ and http://127.0.0.1:8102/ side by side; Ctrl-C stops all three.
# Environment: REDIS_URL (redis://127.0.0.1:6379/0), PORTS ("8101 8102 8103"; 0 picks free ports),
#   PREFIX (the key prefix in Redis, default longpoll:).
set -u
cd "$(dirname "$0")/.."
REDIS_URL=${REDIS_URL:-redis://127.0.0.1:6379/0}
PORTS=${PORTS:-8101 8102 8103}
PREFIX=${PREFIX:-longpoll:}

pids=()
stop() {
  trap - INT TERM
  [ ${#pids[@]} -gt 0 ] && kill -TERM "${pids[@]}" 2>/dev/null
  wait # each node answers its waiting polls and exits within seconds
  exit "${1:-0}"
}
trap 'stop 0' INT TERM

for port in $PORTS; do
  lua5.4 bin/longpoll serve --redis "$REDIS_URL" --redis-prefix "$PREFIX" --host 127.0.0.1 --port "$port" \
    --static examples/demo &
  pids+=("$!")
done

# A node that exits by itself (Redis unreachable, port taken) takes the others down with it.
wait -n
status=$?
echo "cluster: a node exited with status $status; stopping the others" \
  "(is Redis answering at $REDIS_URL? try: redis-server --port 6379)" >&2
stop "$status"
