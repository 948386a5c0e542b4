#!/usr/bin/env bash
# A CPU profile of the server under one scenario of the README's table, as a
# flame graph: builds kvstore with frame pointers and line tables (in
# target/profiling), starts it on a fresh data directory, loads 100,000
# records of 100 bytes, and records `perf record -g` of the server while
# `kvstore bench` runs the scenario.
#
#   scripts/profile.sh SCENARIO [SECONDS]
#
# SCENARIO is one of get1, get16, put1, put16, batch, range, ycsb-a, or open
# (a restart after SIGKILL, profiled from start to ready). Writes
# docs/profiles/SCENARIO.svg; open it in a browser, where frames can be
# clicked into and searched.
#
# Needs perf (Debian package linux-perf) and inferno (`cargo install inferno`).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh
SCENARIO=${1:?usage: scripts/profile.sh SCENARIO [SECONDS]}
SECONDS_TO_RECORD=${2:-8}
case $SCENARIO in
  get1) LOAD=(read --concurrency 1) ;;
  get16) LOAD=(read --concurrency 16) ;;
  put1) LOAD=(write --concurrency 1) ;;
  put16) LOAD=(write --concurrency 16) ;;
  batch) LOAD=(batch --batch-size 100 --concurrency 1) ;;
  range) LOAD=(range --batch-size 100 --concurrency 1) ;;
  ycsb-a) LOAD=(ycsb-a --concurrency 16) ;;
  open) LOAD=(batch --batch-size 100 --concurrency 2) ;;
  *) echo "unknown scenario '$SCENARIO'" >&2; exit 2 ;;
esac
for tool in perf inferno-collapse-perf inferno-flamegraph; do
  command -v "$tool" >/dev/null || { echo "$tool is not installed" >&2; exit 1; }
done

RUSTFLAGS="-C force-frame-pointers=yes" CARGO_PROFILE_RELEASE_DEBUG=line-tables-only \
  cargo build --release --bin kvstore --target-dir target/profiling
BIN=target/profiling/release/kvstore
PORT=7088
DATA=$(mktemp -d)
PERF_DATA=$(mktemp)
FOLDED=$(mktemp)
OUT=docs/profiles
mkdir -p "$OUT"
export KVSTORE_URL=http://127.0.0.1:$PORT
trap 'kill ${SERVER:-} 2>/dev/null || true; rm -rf "$DATA" "$PERF_DATA" "$FOLDED"' EXIT


"$BIN" serve --data-dir "$DATA" --listen 127.0.0.1:$PORT 2>/dev/null & SERVER=$!
wait_ready
"$BIN" bench read --records 100000 --operations 1000 --concurrency 16 >/dev/null

if [ "$SCENARIO" = open ]; then
  # Fill the journal with batches, kill the server without warning, and
  # profile the next start until it answers.
  "$BIN" bench --records 100000 --skip-load --duration "${SECONDS_TO_RECORD}s" "${LOAD[@]}" >/dev/null
  kill -KILL $SERVER; wait $SERVER 2>/dev/null || true
  perf record -F 4999 -g -o "$PERF_DATA" -- \
    "$BIN" serve --data-dir "$DATA" --listen 127.0.0.1:$PORT 2>/dev/null & SERVER=$!
  wait_ready
  kill -INT $SERVER; wait $SERVER || true
else
  "$BIN" bench --records 100000 --skip-load --duration "$((SECONDS_TO_RECORD + 4))s" \
    "${LOAD[@]}" >/dev/null &
  BENCH=$!
  sleep 2
  perf record -F 4999 -g -p $SERVER -o "$PERF_DATA" -- sleep "$SECONDS_TO_RECORD"
  wait $BENCH
fi

perf script -i "$PERF_DATA" 2>/dev/null | inferno-collapse-perf >"$FOLDED"
inferno-flamegraph --title "kvstore: $SCENARIO (${LOAD[*]})" <"$FOLDED" >"$OUT/$SCENARIO.svg"
echo "$OUT/$SCENARIO.svg"
