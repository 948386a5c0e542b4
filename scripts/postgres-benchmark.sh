#!/usr/bin/env bash
# The PostgreSQL backend against pgbench on the same database, in
# interleaved rounds (so that a noisy neighbour hurts both alike): one
# kvstore server (direct connections, `--cache off`, the default) and
# pgbench on a table of its own shaped like kvstore's `kv`, 20,000 keys,
# 100-byte values.
#
#   GET, 1 connection          vs  pgbench primary-key SELECT, 1 client
#   PUT, 1 connection          vs  pgbench INSERT .. ON CONFLICT DO UPDATE, 1 client
#   PUT, 16 connections        vs  the same upsert, 16 clients
#   batch of 100 PUTs, 1 conn  vs  one 100-row upsert (unnest), 1 client
#
#   cargo build --release --bin kvstore && scripts/postgres-benchmark.sh [ROUNDS] [SECONDS] [BASELINE_BINARY]
#
# Given a second binary, a server of it (on a schema of its own) runs the
# same kvstore figures in the same rounds, as `base-*`.
#
# Needs a PostgreSQL that trusts local connections at $PG (default
# postgres://postgres@127.0.0.1:5432/test) and pgbench. pgbench runs with
# `-M prepared` (kvstore keeps its statements prepared too); its p50 comes
# from its per-transaction log. Prints one line per run, the load average
# at its start, then the medians.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh
ROUNDS=${1:-3}
SECS=${2:-5}
PG=${PG:-postgres://postgres@127.0.0.1:5432/test}
BASELINE=${3:-}
BIN=${BIN:-target/release/kvstore}
OUT=$(mktemp -d)
PGB=bench_pgbench_$$
SERVERS=()
cleanup() {
  for pid in "${SERVERS[@]}"; do kill "$pid" 2>/dev/null || true; done
  psql -X -q "$PG" -c "DROP SCHEMA IF EXISTS bench_pg_$$ CASCADE" \
    -c "DROP SCHEMA IF EXISTS bench_pg_base_$$ CASCADE" -c "DROP SCHEMA IF EXISTS $PGB CASCADE" \
    2>/dev/null || true
  rm -rf "$OUT"
}
trap cleanup EXIT

# serve BINARY PORT SCHEMA: a server with 20,000 keys loaded.
serve() {
  "$1" serve --listen "127.0.0.1:$2" --data-dir "$OUT/$3" --backend postgres \
    --postgres-url "$PG" --postgres-schema "$3" \
    --cursor-secret "the secret of this benchmark" 2>"$OUT/$3.log" &
  SERVERS+=($!)
  KVSTORE_URL=http://127.0.0.1:$2 wait_ready
  "$1" bench write --url "http://127.0.0.1:$2" --records 20000 --operations 1 --concurrency 1 \
    >/dev/null 2>&1
}
serve "$BIN" 7191 "bench_pg_$$"
[ -n "$BASELINE" ] && serve "$BASELINE" 7192 "bench_pg_base_$$"

psql -X -q "$PG" <<SQL
CREATE SCHEMA $PGB;
CREATE TABLE $PGB.kv (key bytea PRIMARY KEY, value bytea NOT NULL, version int8 NOT NULL,
  revision int8 NOT NULL, created_at_us int8 NOT NULL, updated_at_us int8 NOT NULL);
INSERT INTO $PGB.kv SELECT convert_to('k' || g, 'UTF8'), convert_to(repeat('y', 100), 'UTF8'), 1, 0, 0, 0
  FROM generate_series(0, 19999) g;
VACUUM ANALYZE $PGB.kv;
SQL
cat >"$OUT/select.sql" <<SQL
\set k random(0, 19999)
SELECT value, version, revision FROM $PGB.kv WHERE key = convert_to('k' || :k, 'UTF8');
SQL
cat >"$OUT/upsert.sql" <<SQL
\set k random(0, 19999)
INSERT INTO $PGB.kv (key, value, version, revision, created_at_us, updated_at_us)
VALUES (convert_to('k' || :k, 'UTF8'), convert_to(repeat('y', 100), 'UTF8'), 1, 0, 0, 0)
ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value, version = kv.version + 1 RETURNING version;
SQL
cat >"$OUT/batch.sql" <<SQL
\set k random(0, 19899)
INSERT INTO $PGB.kv (key, value, version, revision, created_at_us, updated_at_us)
SELECT convert_to('k' || g, 'UTF8'), convert_to(repeat('y', 100), 'UTF8'), 1, 0, 0, 0
FROM generate_series(:k, :k + 99) g
ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value, version = kv.version + 1;
SQL

# kv ROUND NAME WORKLOAD CONNECTIONS [ARGS..]: one `kvstore bench` run
# against this build's server, then the baseline's.
kv() {
  kv_on 7191 "$@"
  [ -z "$BASELINE" ] || kv_on 7192 "$1" "base-$2" "${@:3}"
}
kv_on() {
  local port=$1 round=$2 name=$3 workload=$4 connections=$5
  shift 5
  "$BIN" bench "$workload" --url "http://127.0.0.1:$port" --records 20000 --skip-load \
    --concurrency "$connections" --duration "${SECS}s" --json "$@" 2>/dev/null |
    python3 -c '
import json, sys
t = json.load(sys.stdin)["total"]
print(*sys.argv[1:], "%.0f" % t["ops_per_sec"], "%.3f" % (t["latency_us"]["p50"] / 1e3))' \
      "$round" "$name" "$(load)" | tee -a "$OUT/runs"
}
# pg ROUND NAME SCRIPT CLIENTS: one pgbench run, p50 from its log.
pg() {
  local round=$1 name=$2 script=$3 clients=$4
  rm -f "$OUT"/pgbench_log.*
  (cd "$OUT" && pgbench -n -M prepared -f "$script" -c "$clients" -j "$((clients > 1 ? 2 : 1))" \
    -T "$SECS" -l "$PG" >/dev/null 2>&1)
  cat "$OUT"/pgbench_log.* | python3 -c '
import statistics, sys
lat = [int(line.split()[2]) for line in sys.stdin]
print(*sys.argv[2:], "%.0f" % (len(lat) / float(sys.argv[1])), "%.3f" % (statistics.median(lat) / 1e3))' \
    "$SECS" "$round" "$name" "$(load)" | tee -a "$OUT/runs"
}
load() { cut -d' ' -f1 /proc/loadavg; }

for round in $(seq 1 "$ROUNDS"); do
  kv "$round" "get-c1" read 1
  pg "$round" "pgbench-select-c1" select.sql 1
  kv "$round" "put-c1" write 1
  pg "$round" "pgbench-upsert-c1" upsert.sql 1
  kv "$round" "put-c16" write 16
  pg "$round" "pgbench-upsert-c16" upsert.sql 16
  kv "$round" "batch100-c1" batch 1 --batch-size 100
  pg "$round" "pgbench-batch100-c1" batch.sql 1
done

echo "medians over $ROUNDS rounds of ${SECS}s (ops/s, p50 ms, load average at the start of each run):"
python3 - "$OUT/runs" <<'PY'
import statistics, sys
runs = {}
for line in open(sys.argv[1]):
    round_, name, load, ops, p50 = line.split()
    runs.setdefault(name, []).append((float(ops), float(p50), load))
for name, rs in runs.items():
    print("%-20s %8.0f/s  p50 %.3f ms  (loads %s)" % (
        name, statistics.median(r[0] for r in rs), statistics.median(r[1] for r in rs),
        " ".join(r[2] for r in rs)))
PY
