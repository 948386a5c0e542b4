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
