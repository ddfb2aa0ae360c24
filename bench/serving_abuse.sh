#!/usr/bin/env bash
# The serving abuse benchmark: the demo (a week of history, ingesting its live stream) under
# 1,000 concurrent heavy queries, 1,100 idle connections and 500 slow clients at once, for
# ABUSE_SECONDS. Before, during and for a minute after, it reports the benchmark query's p99 (the 7-day
# hourly breakdown of `installs_hourly` by `media_source`, 50 connections), what /livez and
# /readyz said on the admin listener (and whether the API's port could answer /readyz at all),
# and how many commits the archiver made to the master dataset, so that one can
# see that ingestion kept committing, the process stayed up and the p99 came back.
#
#   bench/serving_abuse.sh [ABUSE_SECONDS]
#
# Needs: a release build, wrk (Debian: wrk), python3. The server runs on core 0, the clients on
# core 1.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/demo.sh

abuse="${1:-30}"
bin="${CARGO_TARGET_DIR:-target}/release/tandem"
[ -x "$bin" ] || { echo "build first: cargo build --release ($bin is missing)" >&2; exit 1; }
command -v wrk >/dev/null || { echo "wrk is missing (apt-get install wrk)" >&2; exit 1; }
ulimit -n 65536 2>/dev/null || ulimit -n 8192

work="$(mktemp -d)"
trap 'kill $(jobs -p) 2>/dev/null || true; kill "$server" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"' EXIT
admin_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
start_demo "$work" --admin-port "$admin_port" --history-days 7
host="${base#http://}"
# The probes are asked on the admin listener, which has connections of its own.
admin="http://127.0.0.1:$admin_port"
from=$(( ($(date +%s) - 7 * 86400) * 1000 ))
bench_url="$base/v1/views/installs_hourly/query?from=$from&group_by=media_source"
heavy_url="$base/v1/views/installs_hourly/query?from=$from&group_by=app_id,media_source,campaign,country"
commits() { ls "$work/data/master/app_events/_delta_log" | grep -c '\.json$'; }
# The benchmark query's p99, as is and gzipped (as dashboards ask).
p99() {
  taskset -c 1 wrk -t1 -c50 -d"$1s" -H "Accept-Encoding: ${2:-identity}" --latency "$bench_url" |
    awk '$1 == "99%" {p = $2} /Requests\/sec/ {r = $2} /Non-2xx|Socket errors/ {e = e $0 "; "}
         END {printf "p99 %s, %s req/s %s\n", p, r, e}'
}
rss() { echo "$(( $(awk '/VmRSS/ {print $2}' "/proc/$server/status") / 1024 )) MiB"; }

echo "before: gzip $(p99 10 gzip); as is $(p99 10); resident $(rss); master commits $(commits)"

# 1,100 idle connections and 500 slow clients (a header line every 5 s; a chunked body that
# never ends), each reconnecting when the server closes it.
taskset -c 1 python3 - "$host" "$abuse" >"$work/clients.out" 2>&1 <<'PY' &
import asyncio, sys, time
host, port = sys.argv[1].split(":")
until = time.monotonic() + float(sys.argv[2])
closed = {"idle": 0, "slow": 0, "chunked": 0}

async def client(kind):
    while time.monotonic() < until:
        try:
            r, w = await asyncio.open_connection(host, int(port))
            if kind == "slow":
                w.write(b"GET /v1/views HTTP/1.1\r\nHost: x\r\n")
            elif kind == "chunked":
                w.write(b"POST /v1/views/installs_hourly/query HTTP/1.1\r\nHost: x\r\n"
                        b"Transfer-Encoding: chunked\r\nContent-Type: application/json\r\n\r\n1\r\n{\r\n")
            while time.monotonic() < until:
                if kind != "idle":
                    w.write(b"X-Slow: 1\r\n" if kind == "slow" else b"1\r\n \r\n")
                    await w.drain()
                try:
                    if await asyncio.wait_for(r.read(1024), 5) == b"":
                        break
                except asyncio.TimeoutError:
                    pass
            closed[kind] += 1
            w.close()
        except OSError:
            closed[kind] += 1
            await asyncio.sleep(0.5)

async def main():
    kinds = ["idle"] * 1100 + ["slow"] * 250 + ["chunked"] * 250
    await asyncio.gather(*(client(k) for k in kinds))
    print("connections the server closed or refused:", closed)

asyncio.run(main())
PY
clients=$!
# 1,000 concurrent heavy queries (every dimension: ~50,000 rows an answer).
taskset -c 1 wrk -t1 -c1000 -d"${abuse}s" --timeout 30s "$heavy_url" >"$work/heavy.out" 2>&1 &
heavy=$!

start_commits=$(commits)
for i in $(seq 1 $(( abuse / 5 ))); do
  sleep 5
  kill -0 "$server" 2>/dev/null || { echo "the server died"; cat "$work/demo.err" >&2; exit 1; }
  live=$(curl -s -o /dev/null -w '%{http_code}' -m 3 "$admin/livez" || true)
  ready=$(curl -s -m 3 -w ' %{http_code}' "$admin/readyz" || true)
  api_ready=$(curl -s -o /dev/null -m 3 -w '%{http_code}' "$base/readyz" || true)
  echo "during, ${i}: admin livez ${live:-none}; admin readyz ${ready:-none}; API port readyz ${api_ready:-none}; master commits $(commits); resident $(rss)"
done
wait "$heavy" || true
wait "$clients" || true
echo "heavy queries: $(awk '/requests in/ {print $1 " answered"} /Non-2xx/ {print $0} /Socket errors/ {print $0}' "$work/heavy.out" | paste -sd ';')"
cat "$work/clients.out"
echo "master commits during the abuse: $(( $(commits) - start_commits ))"
# How the benchmark query comes back: 5-s runs of each encoding, one after the other, for a
# minute from 5 s after the end (with the sockets the abuse left in TIME_WAIT, which the
# kernel keeps for 60 s and must look through for every packet).
sleep 5
for i in 1 2 3 4 5 6; do
  echo "after, ${i}: gzip $(p99 5 gzip); as is $(p99 5); $(ss -Htan state time-wait | wc -l) sockets in TIME_WAIT; resident $(rss)"
done
echo "readyz after: $(curl -s -m 3 "$admin/readyz")"
