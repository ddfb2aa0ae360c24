//! The real binary: configuration errors at start, and gen → import → batch → serve → query.

mod support;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use support::{day, get_json, serving_address, sum_of, Killed};

fn tandem(dir: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tandem"));
    c.current_dir(dir)
        .env_remove("RUST_LOG")
        .env("RUST_LOG", "info");
    for (k, _) in std::env::vars() {
        if k.starts_with("TANDEM_") {
            c.env_remove(k);
        }
    }
    c
}

fn repo(p: &str) -> String {
    format!("{}/{p}", env!("CARGO_MANIFEST_DIR"))
}

fn run_ok(c: &mut Command) -> String {
    let out = c.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{c:?} failed:\n{stderr}");
    String::from_utf8(out.stdout).unwrap()
}

fn run_err(c: &mut Command) -> String {
    let out = c.output().unwrap();
    assert!(!out.status.success(), "{c:?} should fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn bad_configuration_fails_at_start_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("tandem.toml"),
        "storage = \"memory:///\"\n[kafka]\nbroker = \"localhost:9092\"\n",
    )
    .unwrap();
    let err = run_err(tandem(dir.path()).args(["batch", "run"]));
    assert!(
        err.contains("tandem.toml") && err.contains("broker"),
        "{err}"
    );

    let err = run_err(tandem(dir.path()).args([
        "--storage",
        "ftp://x",
        "--config",
        "/dev/null",
        "batch",
        "run",
    ]));
    assert!(err.contains("--storage") && err.contains("ftp"), "{err}");

    let jobs = dir.path().join("jobs");
    std::fs::create_dir(&jobs).unwrap();
    std::fs::write(jobs.join("broken.toml"), "kind = \"view\"\nsource = \"app_events\"\ngranularity = \"fortnight\"\nmetrics = [{ name = \"n\", kind = \"count\" }]\n").unwrap();
    std::fs::remove_file(dir.path().join("tandem.toml")).unwrap();
    let err = run_err(tandem(dir.path()).args([
        "--schemas",
        &repo("schemas"),
        "--jobs",
        "jobs",
        "batch",
        "run",
    ]));
    assert!(
        err.contains("broken.toml") && err.contains("granularity") && err.contains("fortnight"),
        "{err}"
    );
}

#[test]
fn gen_import_batch_serve_and_query_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let defs = ["--schemas", &repo("schemas"), "--jobs", &repo("jobs")];
    let file = dir.path().join("events.jsonl");
    run_ok(
        tandem(dir.path())
            .args([
                "gen", "--events", "3000", "--days", "3", "--seed", "5", "--out",
            ])
            .arg(&file),
    );
    let a = std::fs::read_to_string(&file).unwrap();
    assert_eq!(a.lines().count(), 3000);

    let out = run_ok(
        tandem(dir.path())
            .args(defs)
            .args(["--data", "d", "import"])
            .arg(&file),
    );
    assert!(out.contains("imported 3000 events"), "{out}");
    let out = run_ok(tandem(dir.path()).args(defs).args([
        "--data",
        "d",
        "batch",
        "run",
        "--view",
        "installs_hourly",
    ]));
    assert!(out.contains("installs_hourly: published"), "{out}");

    let mut child = tandem(dir.path())
        .args(defs)
        .args(["--data", "d", "--listen", "127.0.0.1:0", "serve"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let _server = Killed(child);
    let url = format!("http://{}", serving_address(stderr));
    let (from, to) = (day(-10), day(1));
    let out = run_ok(tandem(dir.path()).args([
        "query",
        "installs_hourly",
        "--url",
        &url,
        "--from",
        &from,
        "--to",
        &to,
        "--granularity",
        "day",
        "--format",
        "csv",
    ]));
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "bucket,source,installs,devices");
    assert!(
        lines.len() >= 3 && lines[1..].iter().all(|l| l.contains(",batch,")),
        "{out}"
    );

    let err = run_err(tandem(dir.path()).args([
        "query",
        "installs_hourly",
        "--url",
        &url,
        "--metrics",
        "nope",
    ]));
    assert!(
        err.contains("400") && err.contains("no metric `nope`"),
        "{err}"
    );
}

/// The mock broker keeps only the newest 5 MB of a partition; 40,000 events (about 13 MB) on one
/// partition are more than it keeps, so the demo must pace its history to lose none of them.
/// Ctrl-C then stops the demo cleanly.
#[test]
fn demo_serves_every_history_event_and_stops_on_ctrl_c() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = tandem(dir.path())
        .args(["--data", "d", "demo", "--port", "0", "--partitions", "1"])
        .args(["--history-events", "40000", "--rate", "0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (stdout, stderr) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let mut server = Killed(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(url) = line.strip_prefix("Tandem demo is serving at ") {
                let _ = tx.send(url.trim().to_string());
            }
        }
    });
    let log = std::thread::spawn(move || {
        BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .collect::<Vec<_>>()
            .join("\n")
    });
    let url = rx
        .recv_timeout(Duration::from_secs(600))
        .expect("the demo says where it serves");
    let (body, json) = get_json(&format!(
        "{url}/v1/views/active_devices_daily/query?from={}&to={}&metrics=events",
        day(-10),
        day(2)
    ));
    assert_eq!(sum_of(&json, "events"), 40_000, "{body}");
    let rows = json["rows"].as_array().unwrap();
    assert!(rows.iter().any(|r| r["source"] == "batch"), "{body}");
    assert!(rows.iter().any(|r| r["source"] == "speed"), "{body}");

    let pid = server.0.id().to_string();
    assert!(Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap()
        .success());
    let status = server.0.wait().unwrap();
    let log = log.join().unwrap();
    assert!(status.success(), "the demo did not stop cleanly:\n{log}");
    assert!(!log.contains("never delivered"), "{log}");
}
