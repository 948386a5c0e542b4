#!/usr/bin/env bash
# One round of the README's benchmark table, with the floors measured in the
# same round: the bare HTTP server (benches/floors/http_floor.rs) under wrk, and
# fdatasync on the data directory's disk (benches/floors/fsync_floor.rs), and Redis
# with every write synced and synced once a second, when it is installed (the
# durable PUT rows give their ratio to it). Hot GETs, durable PUTs and a
# range of 100 are also measured with wrk, the floor's own client, for
# like-for-like ratios.
#
#   cargo build --release --bins --examples && scripts/benchmark.sh [DURATION]
#
# Needs wrk (Debian package `wrk`). Run it three times and quote medians:
# the machines this runs on are shared and noisy.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh
D=${1:-8s}
BIN=target/release/kvstore
PORT=7087
DATA=$(mktemp -d)
export KVSTORE_URL=http://127.0.0.1:$PORT

bench_row() {
  local name=$1; shift
  printf '%s: ' "$name"
  "$BIN" bench --records 100000 --skip-load --json "$@" 2>/dev/null | python3 -c '
import json, sys
r = json.load(sys.stdin); t = r["total"]; l = t["latency_us"]; c = r["client_cpu"]
print("%.0f ops/s, p50 %.3f ms, p99 %.3f ms, p99.9 %.3f ms (client %.0f%% of the cores, machine %.0f%% busy)"
      % (t["ops_per_sec"], l["p50"] / 1e3, l["p99"] / 1e3, l["p99_9"] / 1e3, c["share"] * 100, c["machine_busy"] * 100))'
}

target/release/examples/http_floor 127.0.0.1:7099 2>/dev/null & FLOOR=$!
trap 'kill $FLOOR ${SERVER:-} 2>/dev/null || true; redis-cli -p 7098 shutdown nosave >/dev/null 2>&1 || true; rm -rf "$DATA"' EXIT
sleep 0.3
FLOOR1=$(wrk_row -t1 -c1 -d"$D" http://127.0.0.1:7099/)
echo "HTTP floor, 1 connection: $FLOOR1"
echo "HTTP floor, 16 connections: $(wrk_row -t2 -c16 -d"$D" http://127.0.0.1:7099/)"
kill $FLOOR

# The durable store users would otherwise pick, on the same disk, when Redis
# is installed: SETs of 100 bytes to 100,000 keys with redis-benchmark, with
# every write synced (appendfsync always) and synced once a second
# (everysec), at 1, 16 and 64 connections. The durable PUT rows below give
# their ratio to these.
declare -A REDIS
if command -v redis-server >/dev/null && command -v redis-benchmark >/dev/null; then
  for policy in always everysec; do
    mkdir "$DATA/redis"
    redis-server --port 7098 --bind 127.0.0.1 --dir "$DATA/redis" --appendonly yes \
      --appendfsync $policy --save "" --daemonize yes --logfile "$DATA/redis/log"
    sleep 0.3
    for c in 1 16 64; do
      # CSV: "SET",rps,avg,min,p50,p95,p99,max (milliseconds).
      row=$(redis-benchmark -p 7098 -c $c -n $((c == 1 ? 20000 : 150000)) -t set -d 100 -r 100000 --csv \
        | awk -F'"' '/^"SET"/{print $4, $10, $14}')
      read -r rps p50 p99 <<<"$row"
      REDIS[$policy,$c]=$rps
      echo "Redis, appendfsync $policy, $c connection$( ((c > 1)) && echo s): $rps SETs/s, p50 ${p50} ms, p99 ${p99} ms"
    done
    redis-cli -p 7098 shutdown nosave >/dev/null 2>&1 || true
    rm -rf "$DATA/redis"
  done
fi

# The p50 of a wrk_row line, in µs.
p50_micros() {
  sed -E 's/.*p50 ([0-9.]+)(us|ms|s),.*/\1 \2/' <<<"$1" |
    awk '{print $2 == "ms" ? $1 * 1000 : ($2 == "s" ? $1 * 1e6 : $1)}'
}

# A durable PUT row under wrk at C connections, with its ratio to Redis's
# rows of the same connections.
put_row() {
  local c=$1 row rps
  row=$(wrk_row -t$((c == 1 ? 1 : 2)) -c"$c" -d"$D" -s "$PUT_SCRIPT" "$KVSTORE_URL")
  rps=${row%% req/s*}
  if ((c == 1)); then PUT1=$row; fi
  for policy in always everysec; do
    if [ -n "${REDIS[$policy,$c]:-}" ]; then
      row="$row, $(awk -v a="$rps" -v b="${REDIS[$policy,$c]}" 'BEGIN{printf "%.2f", a / b}')x Redis $policy"
    fi
  done
  echo "durable PUT under wrk, $c connection$( ((c > 1)) && echo s): $row"
}

"$BIN" serve --data-dir "$DATA" --listen 127.0.0.1:$PORT 2>/dev/null & SERVER=$!
wait_ready
FSYNC=$(target/release/examples/fsync_floor "$DATA")
echo "$FSYNC"
"$BIN" bench read --records 100000 --operations 1000 --concurrency 16 >/dev/null 2>&1
# The same client as the HTTP floor, on one hot key: a like-for-like ratio.
VALUE=$(printf 'x%.0s' $(seq 1 100))
curl -sf -X PUT -H 'content-type: application/json' -d "{\"value\":\"$VALUE\"}" \
  "$KVSTORE_URL/v1/kv/wrk/hot" >/dev/null
echo "GET under wrk, 1 connection: $(wrk_row -t1 -c1 -d"$D" "$KVSTORE_URL/v1/kv/wrk/hot")"
echo "GET under wrk, 16 connections: $(wrk_row -t2 -c16 -d"$D" "$KVSTORE_URL/v1/kv/wrk/hot")"
# Durable PUTs of 100,000 keys and one range of 100 loaded records, with the
# same client: what the server adds to the floors, without the bench client's
# own encoding and decoding.
PUT_SCRIPT="$DATA.put.lua"
put_script "$PUT_SCRIPT"
for c in 1 16 64; do put_row $c; done
rm -f "$PUT_SCRIPT"
# The target of a durable PUT at one connection: fdatasync's p50 plus the
# HTTP floor's plus 10 µs, against each of the floor's two writes (fjall's
# journal is a preallocated file; see benches/floors/fsync_floor.rs).
http1=$(p50_micros "$FLOOR1")
put1=$(p50_micros "$PUT1")
while read -r what sync; do
  echo "durable PUT under wrk, 1 connection, p50 ${put1} us against fdatasync ($what) + HTTP floor + 10 us: $(awk -v s="$sync" -v h="$http1" 'BEGIN{print s + h + 10}') us"
done < <(sed -nE 's/fdatasync of a 128-byte (append|write into a preallocated file), .* p50 ([0-9.]+) us.*/\1 \2/p' <<<"$FSYNC" |
  sed 's/^write into a preallocated file/preallocated/')
echo "range of 100 under wrk, 1 connection: $(wrk_row -t1 -c1 -d"$D" "$KVSTORE_URL/v1/kv?start=bench/user0&limit=100")"
bench_row "GET, 1 connection" read --concurrency 1 --duration "$D"
bench_row "GET, 16 connections" read --concurrency 16 --duration "$D"
bench_row "durable PUT, 1 connection" write --concurrency 1 --duration "$D"
bench_row "durable PUT, 16 connections" write --concurrency 16 --duration "$D"
bench_row "batch of 100 puts, 1 connection" batch --batch-size 100 --concurrency 1 --duration "$D"
bench_row "range of 100, 1 connection" range --batch-size 100 --concurrency 1 --duration "$D"
for w in a b c f d e; do
  bench_row "YCSB ${w^^}, 16 connections" "ycsb-$w" --concurrency 16 --duration "$D"
done
target/release/examples/fsync_floor "$DATA"
kill -INT $SERVER; wait $SERVER

# A cold GET: a server started afresh on the loaded data; 20,000 uniform reads
# of 100,000 keys are mostly first reads, which miss the cache.
"$BIN" serve --data-dir "$DATA" --listen 127.0.0.1:$PORT 2>/dev/null & SERVER=$!
wait_ready
bench_row "cold GET, 1 connection" read --concurrency 1 --operations 20000
kill -INT $SERVER; wait $SERVER
