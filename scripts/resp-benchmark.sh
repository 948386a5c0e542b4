#!/usr/bin/env bash
# kvstore's RESP port against Redis on the same disk, with redis-benchmark:
# SET and GET of 100-byte values over 100,000 random keys, at 1 connection,
# 50 connections, and 50 connections with pipelines of 16. Redis runs with
# `appendonly yes`, once with `appendfsync always` (every write synced, as
# kvstore syncs them) and once with `everysec`. The three servers take turns
# in each round, so that the machine's noise hits them alike.
#
#   cargo build --release --bins && scripts/resp-benchmark.sh [ROUNDS] [REQUESTS]
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-3}
N=${2:-200000}
BIN=target/release/kvstore
DATA=$(mktemp -d)
trap 'kill ${SERVER:-} 2>/dev/null || true; redis-cli -p 7097 shutdown nosave >/dev/null 2>&1 || true; rm -rf "$DATA"' EXIT

# One redis-benchmark run per setting, as "name: SET rps p50 p99, GET rps p50 p99".
measure() {
  local name=$1 port=$2
  for setting in "-c 1" "-c 50" "-c 50 -P 16"; do
    # shellcheck disable=SC2086
    redis-benchmark -p "$port" -t set,get -n "$N" -r 100000 -d 100 $setting --csv 2>/dev/null |
      awk -F'","' -v name="$name" -v setting="$setting" '
        NR > 1 { gsub(/"/, ""); split($0, f, ","); row = row sprintf("%s %s req/s p50 %s ms p99 %s ms; ", f[1], f[2], f[5], f[7]) }
        END { printf "%s, %s: %s\n", name, setting, row }'
  done
}

redis() {
  local fsync=$1
  rm -rf "$DATA/redis" && mkdir "$DATA/redis"
  redis-server --port 7097 --bind 127.0.0.1 --dir "$DATA/redis" --appendonly yes \
    --appendfsync "$fsync" --save "" --daemonize yes --logfile "$DATA/redis/log"
  sleep 0.5
  measure "Redis appendfsync $fsync" 7097
  redis-cli -p 7097 shutdown nosave >/dev/null 2>&1 || true
  sleep 0.3
}

for round in $(seq 1 "$ROUNDS"); do
  echo "round $round"
  rm -rf "$DATA/kv"
  "$BIN" serve --data-dir "$DATA/kv" --listen 127.0.0.1:7095 --resp-listen 127.0.0.1:7096 2>/dev/null & SERVER=$!
  sleep 1
  measure "kvstore (every write synced)" 7096
  kill $SERVER; wait $SERVER 2>/dev/null || true
  redis always
  redis everysec
done
