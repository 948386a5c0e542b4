#!/usr/bin/env bash
# How far a read replica lags under write load: a PostgreSQL primary and its
# streaming replica of this script's own (initdb, then pg_basebackup -R, on
# free loopback ports, run as the postgres user, stopped and removed at
# exit), a kvstore server with --postgres-replica-url, and
# `kvstore bench write --concurrency 16` for DURATION while /metrics is
# sampled every 0.25 s. Prints the writes per second, then the replica's lag
# in seconds and in revisions: median, p99 and maximum of the samples.
#
#   cargo build --release --bin kvstore && sudo scripts/replica-lag.sh [DURATION]
#
# Needs root (PostgreSQL runs as postgres) and PostgreSQL's programs under
# /usr/lib/postgresql/*/bin.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh
D=${1:-20s}
BIN=${CARGO_TARGET_DIR:-$PWD/target}/release/kvstore
PGBIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
DIR=$(mktemp -d)
chown postgres: "$DIR"
KV_PID=
as_postgres() { runuser -u postgres -- "$@"; }
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
cleanup() {
  [ -n "$KV_PID" ] && kill "$KV_PID" 2>/dev/null || true
  for data in "$DIR/replica" "$DIR/primary"; do
    [ -f "$data/postmaster.pid" ] && as_postgres "$PGBIN/pg_ctl" -D "$data" -m immediate -w stop >/dev/null 2>&1 || true
  done
  rm -rf "$DIR"
}
trap cleanup EXIT

start_pg() {
  local data=$1 port=$2
  as_postgres "$PGBIN/pg_ctl" -D "$data" -l "$DIR/$port.log" -w -t 60 \
    -o "-p $port -k $DIR -c listen_addresses=127.0.0.1" start >/dev/null
}
PRIMARY_PORT=$(free_port)
REPLICA_PORT=$(free_port)
as_postgres "$PGBIN/initdb" -D "$DIR/primary" -U postgres --auth=trust >/dev/null
start_pg "$DIR/primary" "$PRIMARY_PORT"
as_postgres "$PGBIN/pg_basebackup" -h 127.0.0.1 -p "$PRIMARY_PORT" -U postgres \
  -D "$DIR/replica" -R -X stream -c fast
start_pg "$DIR/replica" "$REPLICA_PORT"

KV_PORT=$(free_port)
export KVSTORE_URL="http://127.0.0.1:$KV_PORT"
"$BIN" serve --listen "127.0.0.1:$KV_PORT" --data-dir "$DIR/kv" --backend postgres \
  --postgres-url "postgres://postgres@127.0.0.1:$PRIMARY_PORT/postgres" \
  --postgres-replica-url "postgres://postgres@127.0.0.1:$REPLICA_PORT/postgres" \
  --cursor-secret "the secret of the replica lag run" 2>"$DIR/kv.log" &
KV_PID=$!
wait_ready

sample() {
  while sleep 0.25; do
    curl -sf "$KVSTORE_URL/metrics" |
      awk '/^kvstore_postgres_replica_lag_seconds/{s=$NF} /^kvstore_postgres_replica_lag_revisions/{r=$NF}
           END{print s, r}'
  done
}
sample >"$DIR/samples" &
SAMPLER=$!
"$BIN" bench write --url "$KVSTORE_URL" --records 20000 --duration "$D" --concurrency 16 |
  grep -E '^(operation|update|write|put) '
kill "$SAMPLER"
summary() {
  sort -g | awk '{v[NR] = $1}
    END {p99 = int(NR * 0.99); if (p99 < 1) p99 = 1
         printf "median %s, p99 %s, max %s (%d samples)\n", v[int((NR + 1) / 2)], v[p99], v[NR], NR}'
}
echo "lag, seconds:   $(cut -d' ' -f1 "$DIR/samples" | summary)"
echo "lag, revisions: $(cut -d' ' -f2 "$DIR/samples" | summary)"
