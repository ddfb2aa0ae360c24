"""Reads Tandem's Delta tables with other engines and checks them against what Tandem says.

Usage: interop.py DATA_DIR EXPECTED.json
Polars (through the `deltalake` package) reads the master dataset, the dead-letter table and a
view; DuckDB reads the Parquet files of the master's current Delta version; Apache
DataSketches reads the view's HLL sketches. Exits non-zero, saying why, on any difference.
"""

import json
import sys
from decimal import Decimal

import datasketches
import duckdb
import polars as pl
from deltalake import DeltaTable

data, expected_path = sys.argv[1], sys.argv[2]
want = json.load(open(expected_path))
failures = []


def check(what, got, expected):
    if got != expected:
        failures.append(f"{what}: got {got!r}, Tandem says {expected!r}")


master = f"{data}/master/app_events"
m = pl.read_delta(master)
check("master rows (polars)", m.height, want["master_rows"])
check("master revenue (polars)", str(Decimal(str(m["revenue_usd"].sum())).quantize(Decimal("0.000001"))), want["master_revenue"])
files = [f.removeprefix("file://") for f in DeltaTable(master).file_uris()]
rows = duckdb.connect().execute("SELECT count(*) FROM read_parquet(?)", [files]).fetchone()[0]
check("master rows (duckdb)", rows, want["master_rows"])

dlq = pl.read_delta(f"{data}/dead_letter/app_events")
check("dead letters (polars)", dlq.height, want["dead_letters"])
check("dead letters keep their bytes", dlq["raw"].null_count(), 0)

view = pl.read_delta(f"{data}/views/installs_hourly").filter(pl.col("rollup") == "base")
check("view rows (polars)", view.height, want["view_rows"])
check("view installs (polars)", int(view["installs"].sum()), want["view_installs"])
worst = 0.0
for exact, sketch in zip(view["devices"].to_list(), view["devices__hll"].to_list()):
    estimate = datasketches.hll_sketch.deserialize(bytes(sketch)).get_estimate()
    worst = max(worst, abs(estimate - exact) / max(exact, 1))
if worst > 0.05:
    failures.append(f"a sketch's estimate is {worst:.1%} off its row's exact count")

if failures:
    print("\n".join(failures))
    sys.exit(1)
print(json.dumps({"ok": True, "worst_sketch_error": worst}))
