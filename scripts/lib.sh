# Shared by the scripts of this directory; source it, with KVSTORE_URL set.

# Waits up to 10 s for the server at $KVSTORE_URL to be ready.
wait_ready() {
  for _ in $(seq 1 200); do
    curl -sf "$KVSTORE_URL/readyz" >/dev/null && return
    sleep 0.05
  done
  echo "kvstore did not start" >&2
  exit 1
}

# A wrk run on one line; answers other than 2xx and 3xx are counted in it, so
# that a run measuring refusals cannot pass for one measuring the server.
wrk_row() {
  wrk --latency "$@" | awk '/ 50%/{p50=$2} / 99%/{p99=$2} /Requests\/sec/{rps=$2}
    /Non-2xx or 3xx responses/{bad=$NF}
    END{printf "%s req/s, p50 %s, p99 %s%s\n", rps, p50, p99, bad ? ", " bad " non-2xx answers" : ""}'
}

# Writes a wrk script to FILE that PUTs 100-byte values to 100,000 random
# keys, with EXTRA (`"ttl_ms":3600000`, say) added to each JSON body.
put_script() {
  local file=$1 extra=${2:-}
  local value
  value=$(printf 'x%.0s' $(seq 1 100))
  cat >"$file" <<LUA
local body = '{"value":"$value"${extra:+,$extra}}'
local headers = { ["Content-Type"] = "application/json" }
request = function()
  return wrk.format("PUT", string.format("/v1/kv/wrk/k%06d", math.random(0, 99999)), headers, body)
end
LUA
}
