#!/usr/bin/env bash
# Redis's own test suite (the units type/string, keyspace, expire and
# type/incr) against kvstore's RESP port. NOT run by CI: it needs a redis
# (or valkey) source checkout and tclsh 8.5+ (`apt-get install tcl`).
#
#   cargo build --release --bins
#   tests/redis-suite/run.sh REDIS_SRC [KVSTORE_BIN] [extra runtest args...]
#
# REDIS_SRC is a checkout of github.com/redis/redis at a 7.2 tag (7.2.6 was
# used): kvstore answers as Redis 7.2.0, and skip.txt names the tests of that
# version. (A newer suite also runs; Redis 8.0 changed GETRANGE with an end
# before the string's start, and its two GETRANGE value tests then fail on
# kvstore as they fail on Redis 7.2.) KVSTORE_BIN defaults to
# target/release/kvstore and must have --resp-allow-flush: runtest sends
# FLUSHALL before each unit and the tests send FLUSHDB. Extra arguments go
# to runtest, e.g. `--only 'SETNX target key missing'` or `--verbose`.
#
# It starts kvstore on a fresh temporary data dir (RESP on
# 127.0.0.1:$KVSTORE_SUITE_PORT, default 7191, HTTP on the port below it),
# runs the four units in external-server mode with the skip list
# skip.txt next to this script, stops kvstore and prints the counts:
#   passed  - tests that ran and passed
#   failed  - tests that ran and failed (kvstore bugs, or the suite's flakes)
#   skipped - tests on skip.txt (a reason for each is in the file)
#   ignored - tests runtest leaves out by tag: needs:debug, needs:repl,
#             needs:config, external:skip, singledb:skip
# It exits non-zero when a test failed. runtest runs with --durable, so that
# a test that gets an error reply (an unknown command) counts as failed
# instead of ending its unit, and with --clients 1 (one server, one keyspace).
#
# The suite runs on a copy of REDIS_SRC/tests with two changes to the
# harness (not to any test), both printed below when applied:
#  - `r function flush`, which runtest sends before each unit on an external
#    server, is allowed to fail: kvstore has no FUNCTION (no scripting).
#  - config_set, which unit/keyspace calls outside any test to tune list
#    encodings, ignores a refused CONFIG SET on an external server, instead
#    of aborting the rest of the unit: kvstore refuses every CONFIG SET.
#    Tests that call CONFIG SET themselves are tagged needs:config or are on
#    the skip list.
set -euo pipefail

if [[ $# -lt 1 ]]; then
  sed -n '2,18p' "$0" >&2
  exit 2
fi
HERE=$(cd "$(dirname "$0")" && pwd)
SRC=$(cd "$1" && pwd)
BIN=${2:-$HERE/../../target/release/kvstore}
shift $(( $# >= 2 ? 2 : 1 ))
BIN=$(cd "$(dirname "$BIN")" && pwd)/$(basename "$BIN")
PORT=${KVSTORE_SUITE_PORT:-7191}
HTTP_PORT=$((PORT - 1))

[[ -x $BIN ]] || { echo "no kvstore binary at $BIN (cargo build --release --bins)" >&2; exit 2; }
[[ -f $SRC/tests/test_helper.tcl ]] || { echo "$SRC is not a redis/valkey source checkout" >&2; exit 2; }
# runtest sends FLUSHALL before each unit, and the tests FLUSHDB.
if ! "$BIN" serve --help | grep -q -- '--resp-allow-flush'; then
  echo "$BIN has no --resp-allow-flush (FLUSHDB/FLUSHALL), which runtest needs" >&2
  exit 2
fi
TCLSH=""
for v in 8.5 8.6 8.7; do
  if command -v "tclsh$v" >/dev/null; then TCLSH=tclsh$v; fi
done
[[ -n $TCLSH ]] || { echo "runtest needs tclsh 8.5+ (apt-get install tcl)" >&2; exit 2; }

WORK=$(mktemp -d)
SERVER=""
cleanup() {
  if [[ -n $SERVER ]]; then
    kill "$SERVER" 2>/dev/null || true
    wait "$SERVER" 2>/dev/null || true
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT

# The harness copy, and its two changes (see the top of this file).
mkdir "$WORK/suite"
cp -R "$SRC/tests" "$WORK/suite/tests"
patch_harness() {
  local file=$1 from=$2 to=$3
  grep -qF -- "$from" "$file" || { echo "harness changed: no '$from' in $file" >&2; exit 2; }
  FROM=$from TO=$to perl -0pi -e 's/\Q$ENV{FROM}\E/$ENV{TO}/g' "$file"
  echo "harness: $(basename "$file"): '$from' -> '$to'"
}
patch_harness "$WORK/suite/tests/support/server.tcl" \
  'r function flush' 'catch {r function flush}'
patch_harness "$WORK/suite/tests/support/util.tcl" \
  'if {!$mayfail} {' 'if {!$mayfail && !$::external} {'

# The skip list without its comment lines: runtest reads every line as a name.
grep -v -e '^#' -e '^[[:space:]]*$' "$HERE/skip.txt" > "$WORK/skip.txt" || true

"$BIN" serve --data-dir "$WORK/data" --listen "127.0.0.1:$HTTP_PORT" \
  --resp-listen "127.0.0.1:$PORT" --resp-allow-flush >"$WORK/kvstore.log" 2>&1 &
SERVER=$!
up=0
for _ in $(seq 1 100); do
  if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then up=1; break; fi
  kill -0 "$SERVER" 2>/dev/null || break
  sleep 0.1
done
if [[ $up != 1 ]]; then
  echo "kvstore did not open 127.0.0.1:$PORT:" >&2
  cat "$WORK/kvstore.log" >&2
  exit 1
fi

rc=0
(
  cd "$WORK/suite"
  "$TCLSH" tests/test_helper.tcl --host 127.0.0.1 --port "$PORT" \
    --singledb --ignore-encoding --ignore-digest --durable --clients 1 \
    --tags -needs:debug --tags -needs:repl --tags -needs:config \
    --skipfile "$WORK/skip.txt" \
    --single unit/type/string --single unit/keyspace \
    --single unit/expire --single unit/type/incr "$@"
) 2>&1 | tee "$WORK/runtest.log" || rc=$?

kill "$SERVER" 2>/dev/null || true
wait "$SERVER" 2>/dev/null || true
SERVER=""

# Counts, from runtest's own lines ("[ok]: name", "[err]: name", ...).
sed 's/\x1b\[[0-9;]*m//g' "$WORK/runtest.log" > "$WORK/plain.log"
count() { grep -c "^\[$1\]: " "$WORK/plain.log" || true; }
echo
echo "kvstore against Redis's test suite (string, keyspace, expire, incr):"
echo "  passed  $(count ok)"
echo "  failed  $(count err)"
echo "  skipped $(count skip) (skip.txt)"
# "[ignore]: name: reason" is a test; "[ignore]: reason" a whole server block.
echo "  ignored $(grep -c '^\[ignore\]: .*: \(Tag: \|Not supported\)' "$WORK/plain.log" || true) (by tag; and $(grep -c '^\[ignore\]: \(Tag: \|Not supported\)' "$WORK/plain.log" || true) server blocks of tests)"
if grep -q '^\[err\]: ' "$WORK/plain.log"; then
  echo "failed tests:"
  grep '^\[err\]: ' "$WORK/plain.log" | sed 's/^\[err\]: /  /'
fi
if grep -q '^\[exception\]: ' "$WORK/plain.log"; then
  echo "runtest stopped on an exception:"
  grep -A5 '^\[exception\]: ' "$WORK/plain.log"
fi
exit "$rc"
