#!/usr/bin/env bash
# longpoll nodes sharing events through Redis (docs/scaling.md): publish on any node, subscribe on
# any other. Each node also serves the demo page. Three setups:
#
#   examples/cluster.sh            three nodes on the Redis at REDIS_URL (one Redis)
#   examples/cluster.sh sentinel   starts a Redis master, a replica and three sentinels (ports
#                                  6390-6394 by default), then two nodes with --redis-sentinel,
#                                  --redis-master mymaster and --redis-wait 1. Try a failover:
#                                  kill -9 the master (its pid is printed); publishes get 503 for
#                                  a few seconds, then go on, and nothing acknowledged is lost.
#   examples/cluster.sh sharded    starts three Redis masters (6390-6392) and two nodes with
#                                  --redis-shards: each category lives on one master.
#
# Run from the repository root after `make`; then open http://127.0.0.1:8101/ and
# http://127.0.0.1:8102/ side by side; Ctrl-C stops everything this script started.
# Environment: REDIS_URL (redis://127.0.0.1:6379/0, one-Redis setup), PORTS ("8101 8102 8103";
#   0 picks free ports), PREFIX (key prefix, default longpoll:), REDIS_BASE_PORT (6390).
set -u
cd "$(dirname "$0")/.."
MODE=${1:-single}
REDIS_URL=${REDIS_URL:-redis://127.0.0.1:6379/0}
PREFIX=${PREFIX:-longpoll:}
BASE=${REDIS_BASE_PORT:-6390}
TMP=$(mktemp -d)

pids=()     # longpoll nodes
redis=()    # Redis processes this script started
stop() {
  trap - INT TERM
  [ ${#pids[@]} -gt 0 ] && kill -TERM "${pids[@]}" 2>/dev/null
  wait "${pids[@]}" 2>/dev/null # each node answers its waiting polls and exits within seconds
  [ ${#redis[@]} -gt 0 ] && kill -TERM "${redis[@]}" 2>/dev/null
  rm -rf "$TMP"
  exit "${1:-0}"
}
trap 'stop 0' INT TERM

# wait_redis PORT PID: until it answers (or stop, if it died: port taken?).
wait_redis() {
  until redis-cli -p "$1" PING >/dev/null 2>&1; do
    kill -0 "$2" 2>/dev/null || { echo "cluster: Redis on port $1 did not start (port taken?)" >&2; stop 2; }
    sleep 0.1
  done
}

# start_redis NAME PORT [redis-server arguments...]: a redis-server in $TMP/NAME.
start_redis() {
  local name=$1 port=$2
  shift 2
  mkdir -p "$TMP/$name"
  redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no --dir "$TMP/$name" \
    --logfile "$TMP/$name/log" "$@" &
  redis+=("$!")
  wait_redis "$port" "$!"
}

start_sentinel() {
  local name=$1 port=$2 master=$3
  mkdir -p "$TMP/$name"
  cat > "$TMP/$name/sentinel.conf" <<EOF
port $port
bind 127.0.0.1
dir $TMP/$name
logfile $TMP/$name/log
sentinel monitor mymaster 127.0.0.1 $master 2
sentinel down-after-milliseconds mymaster 1000
sentinel failover-timeout mymaster 5000
EOF
  redis-sentinel "$TMP/$name/sentinel.conf" &
  redis+=("$!")
  wait_redis "$port" "$!"
}

case "$MODE" in
  single)
    PORTS=${PORTS:-8101 8102 8103}
    flags=(--redis "$REDIS_URL" --redis-prefix "$PREFIX")
    ;;
  sentinel)
    PORTS=${PORTS:-8101 8102}
    start_redis master "$BASE"
    start_redis replica "$((BASE + 1))" --replicaof 127.0.0.1 "$BASE"
    echo "waiting for the replica's first sync (Redis waits 5 s for more replicas before it)"
    until redis-cli -p "$((BASE + 1))" INFO replication | grep -q master_link_status:up; do sleep 0.2; done
    for i in 2 3 4; do start_sentinel "sentinel$i" "$((BASE + i))" "$BASE"; done
    echo "master 127.0.0.1:$BASE (pid ${redis[0]}), replica 127.0.0.1:$((BASE + 1)),"\
      "sentinels on $((BASE + 2))-$((BASE + 4))"
    flags=(--redis-sentinel "127.0.0.1:$((BASE + 2)),127.0.0.1:$((BASE + 3)),127.0.0.1:$((BASE + 4))"
      --redis-master mymaster --redis-wait 1 --redis-prefix "$PREFIX")
    ;;
  sharded)
    PORTS=${PORTS:-8101 8102}
    urls=()
    for i in 0 1 2; do
      start_redis "shard$i" "$((BASE + i))"
      urls+=("redis://127.0.0.1:$((BASE + i))/0")
    done
    echo "shards: ${urls[*]}"
    flags=(--redis-shards "$(IFS=,; echo "${urls[*]}")" --redis-prefix "$PREFIX")
    ;;
  *)
    echo "usage: examples/cluster.sh [single|sentinel|sharded]" >&2
    exit 2
    ;;
esac

for port in $PORTS; do
  lua5.4 bin/longpoll serve "${flags[@]}" --host 127.0.0.1 --port "$port" --static examples/demo &
  pids+=("$!")
done

# A node that exits by itself (Redis unreachable, port taken) takes the others down with it.
wait -n "${pids[@]}"
status=$?
echo "cluster: a node exited with status $status; stopping the rest" \
  "(one-Redis setup: is Redis answering at $REDIS_URL? try: redis-server --port 6379)" >&2
stop "$status"
