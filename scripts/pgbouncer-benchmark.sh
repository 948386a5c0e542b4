#!/usr/bin/env bash
# What `--postgres-pooler transaction` costs: `kvstore bench` GETs and PUTs at
# 1 and 16 connections against three servers on one PostgreSQL, in
# interleaved rounds (so that a noisy neighbour hurts all three alike):
#
#   direct      the default: direct connections, cached prepared statements
#   unnamed     direct connections with --postgres-pooler transaction
#               (unnamed statements, BEGIN; SET LOCAL .. / statement / COMMIT)
#   pgbouncer   the same through a PgBouncer in transaction pooling mode
#               (tests/tools/pgbouncer/start)
#
#   cargo build --release --bin kvstore && scripts/pgbouncer-benchmark.sh [ROUNDS] [DURATION]
#
# Needs a PostgreSQL that trusts local connections at $PG (default
# postgres://postgres@127.0.0.1:5432/test) and Debian's pgbouncer. Prints one
# line per run, then the medians.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh
ROUNDS=${1:-3}
D=${2:-8s}
PG=${PG:-postgres://postgres@127.0.0.1:5432/test}
BIN=target/release/kvstore
OUT=$(mktemp -d)
PIDS=()
started=$(tests/tools/pgbouncer/start)
PGB_DIR=$(sed -n 1p <<<"$started")
PGB_URL=$(sed -n 2p <<<"$started")
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  tests/tools/pgbouncer/stop "$PGB_DIR"
  for config in direct unnamed pgbouncer; do
    psql -X -q "$PG" -c "DROP SCHEMA IF EXISTS bench_$config CASCADE" 2>/dev/null || true
  done
  rm -rf "$OUT"
}
trap cleanup EXIT

declare -A PORT=([direct]=7181 [unnamed]=7182 [pgbouncer]=7183)
start() {
  local config=$1; shift
  "$BIN" serve --listen "127.0.0.1:${PORT[$config]}" --data-dir "$OUT/$config" \
    --backend postgres --postgres-schema "bench_$config" \
    --cursor-secret "the secret every server of this benchmark shares" "$@" 2>"$OUT/$config.log" &
  PIDS+=($!)
  KVSTORE_URL="http://127.0.0.1:${PORT[$config]}" wait_ready
}
start direct --postgres-url "$PG"
start unnamed --postgres-url "$PG" --postgres-pooler transaction --postgres-listen-url "$PG"
start pgbouncer --postgres-url "$PGB_URL" --postgres-pooler transaction --postgres-listen-url "$PG"

for config in direct unnamed pgbouncer; do
  "$BIN" bench write --url "http://127.0.0.1:${PORT[$config]}" --records 20000 \
    --operations 1 --concurrency 1 >/dev/null 2>&1
done

for round in $(seq 1 "$ROUNDS"); do
  for run in "read 1" "read 16" "write 1" "write 16"; do
    read -r workload connections <<<"$run"
    for config in direct unnamed pgbouncer; do
      "$BIN" bench "$workload" --url "http://127.0.0.1:${PORT[$config]}" --records 20000 \
        --skip-load --concurrency "$connections" --duration "$D" --json 2>/dev/null |
        python3 -c '
import json, sys
r = json.load(sys.stdin); t = r["total"]
print(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], "%.0f" % t["ops_per_sec"],
      "%.3f" % (t["latency_us"]["p50"] / 1e3))' "$round" "$workload" "$connections" "$config" |
        tee -a "$OUT/runs"
    done
  done
done

echo "medians over $ROUNDS rounds of $D (ops/s, p50 ms):"
python3 - "$OUT/runs" <<'PY'
import statistics, sys
runs = {}
for line in open(sys.argv[1]):
    _, workload, connections, config, ops, p50 = line.split()
    runs.setdefault((workload, int(connections)), {}).setdefault(config, []).append((float(ops), float(p50)))
for (workload, connections), configs in sorted(runs.items()):
    cells = []
    for config in ("direct", "unnamed", "pgbouncer"):
        results = configs[config]
        ops = statistics.median(r[0] for r in results)
        p50 = statistics.median(r[1] for r in results)
        cells.append("%s %.0f/s p50 %.3f" % (config, ops, p50))
    print("%-5s x%-2d  %s" % (workload.upper() if workload == "read" else "put", connections, " | ".join(cells)))
PY
