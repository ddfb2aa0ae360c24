//! The analysts' and engineers' commands on the real binary: SQL jobs and `tandem sql`, the
//! runs table, a view's history and rollback, and a backfill killed mid-range and resumed.

mod support;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

use support::{day, fails as run_err, succeeds as run_ok};

fn tandem(dir: &Path) -> Command {
    let mut c = support::binary(dir);
    c.args(["--data", "d"]);
    c
}

/// Generates `events` over `days` days up to now and imports them; the events per day.
fn history(dir: &Path, events: usize, days: u32, seed: u64) -> BTreeMap<String, u64> {
    let file = dir.join("events.jsonl");
    run_ok(
        tandem(dir)
            .args(["gen", "--late-share", "0", "--events", &events.to_string()])
            .args([
                "--days",
                &days.to_string(),
                "--seed",
                &seed.to_string(),
                "--out",
            ])
            .arg(&file),
    );
    run_ok(tandem(dir).arg("import").arg(&file));
    let mut per_day = BTreeMap::new();
    for line in std::fs::read_to_string(&file).unwrap().lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let t = v["event_time"].as_str().unwrap();
        *per_day.entry(t[..10].to_string()).or_insert(0) += 1;
    }
    per_day
}

/// `tandem sql` as CSV, without its header.
fn sql_rows(dir: &Path, q: &str) -> Vec<Vec<String>> {
    let (out, _) = run_ok(tandem(dir).args(["sql", q, "--format", "csv"]));
    out.lines()
        .skip(1)
        .map(|l| l.split(',').map(str::to_string).collect())
        .collect()
}

#[test]
fn jobs_sql_runs_history_and_rollback_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let per_day = history(d, 6_000, 9, 7);

    // An SQL job by hand, for a date; its output is a table `tandem sql` reads. (The events
    // span the last 9 days up to now: 8 days ago is covered whole at any time of day.)
    let date = day(-8);
    let (out, _) = run_ok(tandem(d).args([
        "batch",
        "run",
        "--job",
        "install_retention",
        "--date",
        &date,
    ]));
    assert!(out.contains(&format!("install_retention {date}:")), "{out}");
    let rows = sql_rows(
        d,
        "SELECT date, sum(installs), sum(retained_d1) FROM install_retention GROUP BY date",
    );
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0][0], date);
    assert!(rows[0][1].parse::<u64>().unwrap() > 0);
    let (out, _) =
        run_ok(tandem(d).args(["batch", "runs", "--job", "install_retention", "--json"]));
    let run: serde_json::Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    assert_eq!(run["status"], "succeeded");
    assert_eq!(run["trigger"], "manual");
    assert_eq!(run["date"], date.as_str());
    let (failed, _) = run_ok(tandem(d).args(["batch", "runs", "--failed"]));
    assert!(failed.trim().is_empty(), "{failed}");

    // tandem sql: every format.
    let total: u64 = per_day.values().sum();
    assert_eq!(
        sql_rows(d, "SELECT count(*) AS n FROM app_events"),
        [[total.to_string()]]
    );
    let (out, _) = run_ok(tandem(d).args(["sql", "SELECT count(*) AS n FROM app_events"]));
    assert!(
        out.contains("| n ") && out.contains(&total.to_string()),
        "{out}"
    );
    let (out, _) = run_ok(tandem(d).args([
        "sql",
        "SELECT event_name, count(*) AS n FROM app_events GROUP BY event_name",
        "--format",
        "json",
    ]));
    let sum: u64 = out
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["n"]
                .as_u64()
                .unwrap()
        })
        .sum();
    assert_eq!(sum, total);
    let parquet = d.join("out.parquet");
    run_ok(
        tandem(d)
            .args([
                "sql",
                "SELECT * FROM app_events LIMIT 10",
                "--format",
                "parquet",
                "--output",
            ])
            .arg(&parquet),
    );
    assert_eq!(&std::fs::read(&parquet).unwrap()[..4], b"PAR1");
    // A bad query is refused with the reason; a write is refused.
    let e = run_err(tandem(d).args(["sql", "SELECT nope FROM app_events"]));
    assert!(e.contains("nope"), "{e}");
    let e = run_err(tandem(d).args(["sql", "DROP TABLE app_events"]));
    assert!(
        e.to_lowercase().contains("not allowed") || e.contains("DDL"),
        "{e}"
    );

    // Two publishes of a view, then a rollback to the first: its rows and its coverage.
    let view = "active_devices_daily";
    run_ok(tandem(d).args([
        "batch",
        "run",
        "--view",
        view,
        "--from",
        &day(-8),
        "--to",
        &day(-7),
    ]));
    let q = "SELECT count(DISTINCT dt), sum(events) FROM active_devices_daily";
    let first = sql_rows(d, q);
    run_ok(tandem(d).args([
        "batch",
        "run",
        "--view",
        view,
        "--from",
        &day(-6),
        "--to",
        &day(-1),
    ]));
    assert_ne!(sql_rows(d, q), first);
    let (out, _) = run_ok(tandem(d).args(["batch", "history", "--view", view, "--json"]));
    let entries: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(entries.len(), 2);
    assert_eq!(entries[1]["days"], serde_json::json!([day(-8), day(-7)]));
    let v1 = entries[1]["version"].as_i64().unwrap();
    let (out, _) = run_ok(tandem(d).args([
        "batch",
        "rollback",
        "--view",
        view,
        "--to-version",
        &v1.to_string(),
    ]));
    assert!(out.contains("rolled back"), "{out}");
    assert_eq!(sql_rows(d, q), first);
    let (out, _) = run_ok(tandem(d).args(["batch", "history", "--view", view]));
    assert!(
        out.lines()
            .next()
            .unwrap()
            .contains(&format!("rollback to version {v1}")),
        "{out}"
    );
    assert_eq!(
        first[0][1],
        (per_day[&day(-8)] + per_day[&day(-7)]).to_string()
    );
}

#[test]
fn a_killed_backfill_resumes_and_publishes_every_day_once() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let per_day = history(d, 24_000, 24, 11);
    let (from, to) = (day(-22), day(-1));
    let args = [
        "backfill",
        "--view",
        "active_devices_daily",
        "--from",
        &from,
        "--to",
        &to,
        "--chunk-days",
        "1",
    ];
    // Killed (SIGKILL) once its first chunk is published.
    let mut child = tandem(d)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        first.contains("published") && first.contains("ETA"),
        "{first}"
    );

    // Run again: it resumes after the last chunk that landed, with progress as log lines.
    let (out, err) = run_ok(tandem(d).args(args));
    assert!(out.contains("resumed"), "{out}");
    assert!(
        !out.contains("published 0 day(s)"),
        "killed before it ended: {out}"
    );
    assert!(
        err.lines()
            .any(|l| l.starts_with("backfill active_devices_daily: ")),
        "{err}"
    );
    assert!(!err.contains('\r'), "no progress bar off a terminal");

    // Every day published exactly once over both runs, and equal to the events of that day.
    let (out, _) = run_ok(tandem(d).args([
        "batch",
        "history",
        "--view",
        "active_devices_daily",
        "--json",
    ]));
    let mut published: BTreeMap<String, usize> = BTreeMap::new();
    for l in out.lines() {
        let e: serde_json::Value = serde_json::from_str(l).unwrap();
        for day in e["days"].as_array().unwrap() {
            *published
                .entry(day.as_str().unwrap().to_string())
                .or_default() += 1;
        }
    }
    let days: Vec<String> = (-22..=-1).map(day).collect();
    assert_eq!(published.keys().cloned().collect::<Vec<_>>(), days);
    assert!(published.values().all(|&n| n == 1), "{published:?}");
    let rows = sql_rows(
        d,
        "SELECT dt, sum(events) FROM active_devices_daily GROUP BY dt ORDER BY dt",
    );
    let got: BTreeMap<String, u64> = rows
        .iter()
        .map(|r| (r[0].clone(), r[1].parse().unwrap()))
        .collect();
    let want: BTreeMap<String, u64> = days
        .iter()
        .map(|d| (d.clone(), per_day.get(d).copied().unwrap_or(0)))
        .filter(|(_, n)| *n > 0)
        .collect();
    assert_eq!(got, want);

    // On a terminal (a pseudo-terminal here), progress is a bar with a rate and an ETA.
    let bin = env!("CARGO_BIN_EXE_tandem");
    let repo = env!("CARGO_MANIFEST_DIR");
    let command = format!(
        "{bin} --schemas {repo}/schemas --jobs {repo}/jobs --data d backfill --view active_devices_daily --from {} --to {} --chunk-days 2 --restart",
        day(-6),
        day(-1)
    );
    let out = Command::new("script")
        .args(["-qefc", &command, "/dev/null"])
        .current_dir(d)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .expect("`script` (bsdutils) runs a command on a pseudo-terminal");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("6/6 days") && text.contains("ETA"), "{text}");
    assert!(
        !text.contains("backfill active_devices_daily: "),
        "a bar, not log lines: {text}"
    );
}
