#!/usr/bin/env bash
# Two builds of kvstore against each other, and against Redis with every write
# synced (`appendfsync always`) on the same disk, taking turns in each round
# so that the machine's noise hits them alike: durable PUTs of 100 bytes to
# 100,000 keys under wrk (scripts/lib.sh's PUT script) at 1, 16 and 64
# connections, and RESP SETs under redis-benchmark at 50 connections, alone
# and in pipelines of 16. Each round starts with the fdatasync floor of the
# disk, and the builds swap places from round to round. Quote every round:
# the machines this runs on are shared and noisy.
#
#   git worktree add /tmp/before <commit>
#   (cd /tmp/before && CARGO_TARGET_DIR=/tmp/before-target cargo build --release --bin kvstore)
#   cargo build --release --bins --examples
#   scripts/compare-builds.sh /tmp/before-target/release/kvstore [ROUNDS] [DURATION]
#
# Needs wrk, redis-server and redis-benchmark (Debian packages `wrk` and
# `redis-server`).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh
BEFORE=${1:?usage: scripts/compare-builds.sh BEFORE_BINARY [ROUNDS] [DURATION]}
ROUNDS=${2:-3}
D=${3:-5s}
AFTER=target/release/kvstore
PORT=7085
RESP_PORT=7086
REDIS_PORT=7084
DATA=$(mktemp -d)
export KVSTORE_URL=http://127.0.0.1:$PORT
trap 'kill ${SERVER:-} 2>/dev/null || true; redis-cli -p $REDIS_PORT shutdown nosave >/dev/null 2>&1 || true; rm -rf "$DATA"' EXIT
PUT_SCRIPT="$DATA.put.lua"
put_script "$PUT_SCRIPT"

# redis-benchmark's SET rate at the given settings, as "rps, p50 ms".
resp_set() {
  local port=$1; shift
  redis-benchmark -p "$port" -t set -d 100 -r 100000 "$@" --csv |
    awk -F'"' '/^"SET"/{print $4 " SETs/s, p50 " $10 " ms"}'
}

for round in $(seq 1 "$ROUNDS"); do
  echo "round $round: $(target/release/examples/fsync_floor "$DATA")"
  mkdir "$DATA/redis"
  redis-server --port $REDIS_PORT --bind 127.0.0.1 --dir "$DATA/redis" --appendonly yes \
    --appendfsync always --save "" --daemonize yes --logfile "$DATA/redis/log"
  sleep 0.3
  for c in 1 16 64; do
    echo "  Redis always, SET, $c connection$( ((c > 1)) && echo s): $(resp_set $REDIS_PORT -c $c -n $((c == 1 ? 10000 : 80000)))"
  done
  redis-cli -p $REDIS_PORT shutdown nosave >/dev/null 2>&1 || true
  rm -rf "$DATA/redis"
  # The order alternates: the second server of a round meets the disk the
  # first one left busy.
  order="before after"
  ((round % 2 == 0)) && order="after before"
  for build in $order; do
    bin=$BEFORE
    [ $build = after ] && bin=$AFTER
    "$bin" serve --data-dir "$DATA/kv" --listen 127.0.0.1:$PORT \
      --resp-listen 127.0.0.1:$RESP_PORT 2>/dev/null & SERVER=$!
    wait_ready
    for c in 1 16 64; do
      echo "  $build, PUT under wrk, $c connection$( ((c > 1)) && echo s): $(wrk_row -t$((c == 1 ? 1 : 2)) -c$c -d"$D" -s "$PUT_SCRIPT" "$KVSTORE_URL")"
    done
    echo "  $build, RESP SET, 50 connections: $(resp_set $RESP_PORT -c 50 -n 60000)"
    echo "  $build, RESP SET, pipelines of 16: $(resp_set $RESP_PORT -c 50 -P 16 -n 200000)"
    kill -INT $SERVER; wait $SERVER || true
    rm -rf "$DATA/kv"
  done
done
