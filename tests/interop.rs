//! Tandem's tables read by other engines: Polars and DuckDB read the master dataset, the
//! dead-letter table and a view with the contents Tandem reports, and Apache DataSketches
//! reads the view's sketches with the estimates of their rows. Needs Python with `polars`,
//! `deltalake`, `duckdb` and `datasketches` (`.ci/run` installs them).

mod support;

use std::path::Path;
use std::process::Command;

use support::succeeds;

fn tandem(dir: &Path) -> Command {
    let mut c = support::binary(dir);
    c.args(["--data", "d"]);
    c
}

/// One value of `tandem sql` (CSV, without its header).
fn value(dir: &Path, q: &str) -> String {
    let (out, _) = succeeds(tandem(dir).args(["sql", q, "--format", "csv"]));
    out.lines().nth(1).unwrap().to_string()
}

#[test]
fn polars_duckdb_and_datasketches_read_what_tandem_wrote() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let file = d.join("events.jsonl");
    succeeds(
        tandem(d)
            .args([
                "gen", "--events", "5000", "--days", "4", "--seed", "3", "--out",
            ])
            .arg(&file),
    );
    // A few lines no schema accepts, for the dead-letter table.
    let mut text = std::fs::read_to_string(&file).unwrap();
    text.push_str("not json\n{\"event_id\": 5}\n");
    std::fs::write(&file, text).unwrap();
    succeeds(tandem(d).arg("import").arg(&file));
    succeeds(tandem(d).args(["batch", "run", "--view", "installs_hourly"]));

    let (dlq, _) = succeeds(tandem(d).args(["dlq", "list", "--json"]));
    let expected = serde_json::json!({
        "master_rows": value(d, "SELECT count(*) FROM app_events").parse::<u64>().unwrap(),
        "master_revenue": value(d, "SELECT CAST(sum(revenue_usd) AS VARCHAR) FROM app_events"),
        "dead_letters": dlq.lines().count(),
        "view_rows": value(d, "SELECT count(*) FROM installs_hourly").parse::<u64>().unwrap(),
        "view_installs": value(d, "SELECT sum(installs) FROM installs_hourly").parse::<u64>().unwrap(),
    });
    assert_eq!(expected["dead_letters"], 2);
    let path = d.join("expected.json");
    std::fs::write(&path, expected.to_string()).unwrap();
    let out = Command::new("python3")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/interop.py"))
        .arg(d.join("d"))
        .arg(&path)
        .output()
        .expect("python3 with polars, deltalake, duckdb and datasketches (pip install them)");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
