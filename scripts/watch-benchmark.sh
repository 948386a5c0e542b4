#!/usr/bin/env bash
# The watch numbers of docs/performance.md, in one round:
# - durable PUTs at 16 connections under wrk (the Lua script of
#   benchmark.sh), with no watcher and with 100 watchers of every written
#   key (curl reading each stream), and, given a second binary, the same
#   on a build without the change log, in the same round;
# - delivery latency from a PUT's answer to its event at a watcher, with 1,
#   100 and 10,000 watchers (each on a prefix of its own; writes go to the
#   first 100), and the server's memory per open watcher;
# - with KVSTORE_BENCH_POSTGRES_URL set, the same latency across two servers
#   on one PostgreSQL schema (watchers on one, 16 writers on the other).
#
#   cargo build --release --bins --examples
#   scripts/watch-benchmark.sh [DURATION] [BASELINE_BINARY]
#
# Needs wrk and curl. Run it three times and quote medians.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh
D=${1:-8s}
BASELINE=${2:-}
BIN=target/release/kvstore
PORT=7088
export KVSTORE_URL=http://127.0.0.1:$PORT
DATA=$(mktemp -d)
PUT_SCRIPT="$DATA.put.lua"
put_script "$PUT_SCRIPT"
WATCHERS=()
trap 'kill ${SERVER:-} "${WATCHERS[@]}" 2>/dev/null || true; rm -rf "$DATA" "$PUT_SCRIPT"' EXIT

# serve BINARY: a server on a fresh data directory.
serve() {
  rm -rf "$DATA/data"
  "$1" serve --data-dir "$DATA/data" --listen 127.0.0.1:$PORT --max-connections 20000 2>/dev/null &
  SERVER=$!
  wait_ready
}
stop() {
  kill -INT "$SERVER"
  wait "$SERVER" || true
}

if [ -n "$BASELINE" ]; then
  serve "$BASELINE"
  echo "durable PUT, 16 connections, build without the change log: $(wrk_row -t2 -c16 -d"$D" -s "$PUT_SCRIPT" "$KVSTORE_URL")"
  stop
fi

serve "$BIN"
echo "durable PUT, 16 connections, no watcher: $(wrk_row -t2 -c16 -d"$D" -s "$PUT_SCRIPT" "$KVSTORE_URL")"
# 100 watchers: on prefixes of their own (the writer's cost of having them),
# then of every write (each write sent 100 times, to 100 curl processes on
# the same cores).
for watched in "their own prefixes" "every write"; do
  for i in $(seq 1 100); do
    if [ "$watched" = "every write" ]; then prefix=wrk/; else prefix=idle$i/; fi
    curl -sN "$KVSTORE_URL/v1/watch?prefix=$prefix" >/dev/null &
    WATCHERS+=($!)
  done
  sleep 1
  echo "durable PUT, 16 connections, 100 watchers of $watched: $(wrk_row -t2 -c16 -d"$D" -s "$PUT_SCRIPT" "$KVSTORE_URL")"
  kill "${WATCHERS[@]}" 2>/dev/null || true
  WATCHERS=()
done
stop

for n in 1 100 10000; do
  serve "$BIN"
  echo "== $n watchers, 4 writers"
  target/release/examples/watch_latency "$KVSTORE_URL" "$KVSTORE_URL" "$n" "$((n < 100 ? n : 100))" 4000 4 "$SERVER"
  stop
done

# Across servers on PostgreSQL, when KVSTORE_BENCH_POSTGRES_URL is set: 100
# watchers on one server, 16 writers on the other, both on one schema.
if [ -n "${KVSTORE_BENCH_POSTGRES_URL:-}" ]; then
  SCHEMA=kvstore_watch_bench_$$
  PG=(--backend postgres --postgres-url "$KVSTORE_BENCH_POSTGRES_URL" --postgres-schema "$SCHEMA"
      --cursor-secret "a secret the two servers of this benchmark share")
  "$BIN" serve "${PG[@]}" --listen 127.0.0.1:$PORT --max-connections 20000 2>/dev/null & SERVER=$!
  wait_ready
  "$BIN" serve "${PG[@]}" --listen 127.0.0.1:$((PORT + 1)) 2>/dev/null & SERVER_B=$!
  KVSTORE_URL=http://127.0.0.1:$((PORT + 1)) wait_ready
  echo "== PostgreSQL: 100 watchers on one server, 16 writers on the other"
  target/release/examples/watch_latency "$KVSTORE_URL" "http://127.0.0.1:$((PORT + 1))" 100 100 4000 16
  kill -INT "$SERVER_B"; wait "$SERVER_B" || true
  stop
  psql "$KVSTORE_BENCH_POSTGRES_URL" -qc "DROP SCHEMA $SCHEMA CASCADE" >/dev/null
fi
