#!/usr/bin/env bash
# The serving load benchmark: the demo with a week of history (ingesting its live stream), and
# dashboards asking the 7-day hourly breakdown of `installs_hourly` by `media_source` with all
# metrics from 50 connections (wrk). The server runs on core 0 and wrk on core 1. Beside it, in
# the same run, DuckDB answers the closest query it can from the view's Parquet files (sums of
# the stored per-row counts; it cannot merge the DataSketches), one client, for the ratio.
#
#   bench/serving_load.sh [DAYS] [SECONDS] [CONNECTIONS]
#
# Needs: a release build (cargo build --release), wrk (Debian: wrk), python3 with duckdb
# (pip install duckdb).
set -euo pipefail
cd "$(dirname "$0")/.."

days="${1:-7}"
seconds="${2:-20}"
connections="${3:-50}"
bin="${CARGO_TARGET_DIR:-target}/release/tandem"
[ -x "$bin" ] || { echo "build first: cargo build --release ($bin is missing)" >&2; exit 1; }
command -v wrk >/dev/null || { echo "wrk is missing (apt-get install wrk)" >&2; exit 1; }

work="$(mktemp -d)"
trap 'kill "$server" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"' EXIT
taskset -c 0 "$bin" demo --port 0 --data "$work/data" --history-days "$days" \
  >"$work/demo.out" 2>"$work/demo.err" &
server=$!
for _ in $(seq 1 600); do
  grep -q "is serving" "$work/demo.out" 2>/dev/null && break
  kill -0 "$server" 2>/dev/null || { cat "$work/demo.err" >&2; exit 1; }
  sleep 0.5
done
base="$(grep -o 'http://127.0.0.1:[0-9]*' "$work/demo.out" | head -n 1)"
from=$(( ($(date +%s) - days * 86400) * 1000 ))
url="$base/v1/views/installs_hourly/query?from=$from&group_by=media_source"
rows=$(curl -s "$url" | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["rows"]))')
echo "demo: $days days of history; the query answers $rows rows"
rss_kb=$(awk '/VmRSS/ {print $2}' "/proc/$server/status")
echo "tandem resident memory before the load: $((rss_kb / 1024)) MiB"

echo "--- Tandem, $connections connections, ${seconds}s (server on core 0, wrk on core 1)"
taskset -c 1 wrk -t1 -c"$connections" -d"${seconds}s" --latency "$url" | sed -n '/Latency Distribution/,$p'
rss_kb=$(awk '/VmRSS/ {print $2}' "/proc/$server/status")
echo "tandem resident memory after the load: $((rss_kb / 1024)) MiB"

echo "--- DuckDB on the view's Parquet files, one client"
taskset -c 0 python3 - "$work/data/views/installs_hourly" "$from" <<'PY'
import sys, time, statistics
import duckdb
path, from_ms = sys.argv[1], int(sys.argv[2])
con = duckdb.connect()
con.execute("SET threads = 1")
sql = f"""
  SELECT bucket, media_source, sum(installs) AS installs, sum(devices) AS devices
  FROM read_parquet('{path}/**/*.parquet', hive_partitioning = true)
  WHERE bucket >= to_timestamp({from_ms} / 1000.0)
  GROUP BY bucket, media_source ORDER BY bucket, media_source
"""
rows = len(con.execute(sql).fetchall())
times = []
for _ in range(30):
    t = time.perf_counter()
    con.execute(sql).fetchall()
    times.append(time.perf_counter() - t)
times.sort()
print(f"duckdb: {rows} rows; median {statistics.median(times) * 1000:.1f} ms, "
      f"p90 {times[int(len(times) * 0.9) - 1] * 1000:.1f} ms over {len(times)} runs")
PY
