#!/usr/bin/env bash
# The serving load benchmark: the demo with a week of history (ingesting its live stream), and
# dashboards asking the 7-day hourly breakdown of `installs_hourly` by `media_source` with all
# metrics from 50 connections (wrk), then the same by each other dimension, by the day, with
# one metric, and the totals. The server runs on core 0 and wrk on core 1. Beside it, in the
# same run, DuckDB answers the closest query it can from the view's Parquet files (its own
# rows, `rollup=base`: sums of the stored per-row counts; it cannot merge the DataSketches),
# one client, for the ratio.
#
#   [RATE=live events/s, default 200] [WINDOW=days asked, default 7] \
#     bench/serving_load.sh [DAYS of history] [SECONDS] [CONNECTIONS]
#
# The queries ask the last WINDOW days (a week, as the dashboards' panel does) whatever the
# history; with more history than that, the whole history is asked once more at the end.
#
# Needs: a release build (cargo build --release), wrk (Debian: wrk), python3 with duckdb
# (pip install duckdb).
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/demo.sh

days="${1:-7}"
seconds="${2:-20}"
connections="${3:-50}"
bin="${CARGO_TARGET_DIR:-target}/release/tandem"
[ -x "$bin" ] || { echo "build first: cargo build --release ($bin is missing)" >&2; exit 1; }
command -v wrk >/dev/null || { echo "wrk is missing (apt-get install wrk)" >&2; exit 1; }

work="$(mktemp -d)"
trap 'kill "$server" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"' EXIT
start_demo "$work" --history-days "$days" --rate "${RATE:-200}"
window="${WINDOW:-7}"
[ "$window" -le "$days" ] || window="$days"
from=$(( ($(date +%s) - window * 86400) * 1000 ))
url="$base/v1/views/installs_hourly/query?from=$from&group_by=media_source"
rows=$(curl -s "$url" | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["rows"]))')
echo "demo: $days days of history; the $window-day query answers $rows rows"
rss_kb=$(awk '/VmRSS/ {print $2}' "/proc/$server/status")
echo "tandem resident memory before the load: $((rss_kb / 1024)) MiB"

# One load run: prints the answer's size, requests/s, p50, p99 and any errors. ENCODING
# (default identity) is the Accept-Encoding wrk sends; the size is what goes over the wire.
load() {
  local name="$1" url="$2" secs="$3" out rows bytes enc="${ENCODING:-identity}"
  rows=$(curl -s "$url" | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["rows"]))')
  bytes=$(curl -s -H "Accept-Encoding: $enc" "$url" | wc -c)
  out="$(taskset -c 1 wrk -t1 -c"$connections" -d"${secs}s" -H "Accept-Encoding: $enc" --latency "$url")"
  printf '%-44s %6s rows %8s B  %9s req/s  p50 %8s  p99 %8s  %s\n' "$name" "$rows" "$bytes" \
    "$(awk '/Requests\/sec/ {print $2}' <<<"$out")" \
    "$(awk '$1 == "50%" {print $2}' <<<"$out")" \
    "$(awk '$1 == "99%" {print $2}' <<<"$out")" \
    "$(grep -E 'Non-2xx|Socket errors' <<<"$out" | tr -s ' ' | paste -sd ';' || true)"
}

echo "--- Tandem, $connections connections (server on core 0, wrk on core 1)"
q="$base/v1/views/installs_hourly/query?from=$from"
load "by media_source, hourly, all metrics" "$q&group_by=media_source" "$seconds"
ENCODING=gzip load "the same, gzip (as browsers ask)" "$q&group_by=media_source" "$seconds"
load "by media_source, hourly, installs only" "$q&group_by=media_source&metrics=installs" 10
load "by media_source, daily" "$q&group_by=media_source&granularity=day" 10
ENCODING=gzip load "by media_source, daily, gzip" "$q&group_by=media_source&granularity=day" 10
for dim in app_id campaign country; do
  load "by $dim, hourly, all metrics" "$q&group_by=$dim" 10
  ENCODING=gzip load "by $dim, hourly, all metrics, gzip" "$q&group_by=$dim" 10
done
load "totals, hourly" "$q" 10
if [ "$days" -gt "$window" ]; then
  all="$base/v1/views/installs_hourly/query?from=$(( ($(date +%s) - days * 86400) * 1000 ))"
  load "all $days days by media_source, hourly" "$all&group_by=media_source" 10
  ENCODING=gzip load "all $days days by media_source, hourly, gzip" "$all&group_by=media_source" 10
  ENCODING=gzip load "all $days days by media_source, daily, gzip" "$all&group_by=media_source&granularity=day" 10
fi
rss_kb=$(awk '/VmRSS/ {print $2}' "/proc/$server/status")
echo "tandem resident memory after the load: $((rss_kb / 1024)) MiB"
echo "the master dataset's commits so far: $(ls "$work/data/master/app_events/_delta_log" | grep -c json)"

echo "--- DuckDB on the view's Parquet files, one client"
taskset -c 0 python3 - "$work/data/views/installs_hourly" "$from" <<'PY'
import sys, time, statistics
import duckdb
path, from_ms = sys.argv[1], int(sys.argv[2])
con = duckdb.connect()
con.execute("SET threads = 1")
sql = f"""
  SELECT bucket, media_source, sum(installs) AS installs, sum(devices) AS devices
  FROM read_parquet('{path}/rollup=base/**/*.parquet', hive_partitioning = true)
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
