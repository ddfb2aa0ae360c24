# Shared by the serving benchmarks (sourced): starts the release demo on core 0 and waits until
# it serves and is ready (`/readyz`).
#
#   start_demo WORK_DIR [DEMO ARGS...]   sets $server (its pid) and $base (the API's URL)
#
# Needs $bin, the release binary.
start_demo() {
  local work="$1"
  shift
  taskset -c 0 "$bin" demo --port 0 --data "$work/data" "$@" \
    >"$work/demo.out" 2>"$work/demo.err" &
  server=$!
  for _ in $(seq 1 600); do
    grep -q "is serving" "$work/demo.out" 2>/dev/null && break
    kill -0 "$server" 2>/dev/null || { cat "$work/demo.err" >&2; exit 1; }
    sleep 0.5
  done
  base="$(grep -o 'http://127.0.0.1:[0-9]*' "$work/demo.out" | head -n 1)"
  # Measured once ready, as a load balancer would send it traffic: the published views loaded.
  for _ in $(seq 1 240); do
    [ "$(curl -s -o /dev/null -w '%{http_code}' "$base/readyz")" = 200 ] && break
    sleep 0.5
  done
}
