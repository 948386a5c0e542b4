#!/usr/bin/env bash
# Expiry's numbers (docs/performance.md, "Expiry"), in one run on one server:
#
# - durable PUTs with and without `ttl_ms` under wrk, 16 connections, the two
#   interleaved ROUNDS times, so that the machine's noise hits both alike;
# - the expiry lag while 16 connections write keys with TTLs;
# - KEYS keys that expire at the same instant, with GET and PUT latency
#   before it and while they are deleted.
#
#   cargo build --release --bins --examples && scripts/expiry-benchmark.sh [DURATION] [ROUNDS] [KEYS]
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh
D=${1:-8s}
ROUNDS=${2:-4}
KEYS=${3:-1000000}
BIN=target/release/kvstore
PORT=7089
DATA=$(mktemp -d)
export KVSTORE_URL=http://127.0.0.1:$PORT
"$BIN" serve --data-dir "$DATA" --listen 127.0.0.1:$PORT 2>/dev/null & SERVER=$!
trap 'kill $SERVER 2>/dev/null || true; rm -rf "$DATA" "$DATA".*.lua' EXIT
wait_ready

put_script "$DATA.plain.lua"
# An hour: the keys do not expire during the run, so this is the write's cost.
put_script "$DATA.ttl.lua" '"ttl_ms":3600000'
for round in $(seq 1 "$ROUNDS"); do
  echo "round $round, durable PUT, 16 connections: $(wrk_row -t2 -c16 -d"$D" -s "$DATA.plain.lua" "$KVSTORE_URL")"
  echo "round $round, durable PUT with ttl_ms, 16 connections: $(wrk_row -t2 -c16 -d"$D" -s "$DATA.ttl.lua" "$KVSTORE_URL")"
done
target/release/examples/expiry_bench lag "$KVSTORE_URL" 20 16
target/release/examples/expiry_bench mass "$KVSTORE_URL" "$KEYS"
