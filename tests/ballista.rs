//! The oracle of the Ballista engine: views recomputed on a Ballista scheduler and two
//! executors (separate processes, on loopback) equal the in-process recompute, and serving
//! answers identically from either.

mod support;

use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::{day, get_json, serving_address, Killed};

fn tandem(dir: &Path, data: &str) -> Command {
    let mut c = support::binary(dir);
    c.env("RUST_LOG", "info").args(["--data", data]);
    c
}

fn run_ok(c: &mut Command) -> String {
    support::succeeds(c).0
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_for_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {port}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A view's rows as `tandem sql` prints them, in a fixed order.
fn rows(dir: &Path, data: &str, view: &str) -> Vec<String> {
    let out = run_ok(tandem(dir, data).args([
        "sql",
        &format!("SELECT * FROM {view}"),
        "--format",
        "csv",
    ]));
    let mut lines: Vec<String> = out.lines().map(str::to_string).collect();
    lines.sort();
    lines
}

#[test]
fn views_computed_on_a_ballista_cluster_equal_the_in_process_ones_and_serve_alike() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let file = d.join("events.jsonl");
    run_ok(
        tandem(d, "local")
            .args([
                "gen", "--events", "6000", "--days", "4", "--seed", "13", "--out",
            ])
            .arg(&file),
    );
    // A producer's retries: some events again, in a second file.
    let text = std::fs::read_to_string(&file).unwrap();
    let again = d.join("again.jsonl");
    std::fs::write(
        &again,
        text.lines()
            .step_by(9)
            .map(|l| format!("{l}\n"))
            .collect::<String>(),
    )
    .unwrap();
    for data in ["local", "cluster"] {
        run_ok(tandem(d, data).arg("import").arg(&file).arg(&again));
    }

    // A scheduler and two executors, each a process of its own.
    let sched = free_port();
    let scheduler = Killed(
        tandem(d, "cluster")
            .args(["ballista", "scheduler", "--port", &sched.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for_port(sched);
    let mut executors = Vec::new();
    let mut logs = Vec::new();
    for i in 0..2 {
        let (port, grpc) = (free_port(), free_port());
        let log = d.join(format!("executor-{i}.log"));
        executors.push(Killed(
            tandem(d, "cluster")
                .args(["ballista", "executor", "--concurrency", "1"])
                .args([
                    "--port",
                    &port.to_string(),
                    "--grpc-port",
                    &grpc.to_string(),
                ])
                .args(["--scheduler", &format!("127.0.0.1:{sched}")])
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).unwrap())
                .spawn()
                .unwrap(),
        ));
        logs.push(log);
        wait_for_port(grpc);
    }
    // Registered once they have said hello to the scheduler.
    std::thread::sleep(Duration::from_secs(1));

    let engine = format!("ballista://127.0.0.1:{sched}");
    run_ok(tandem(d, "cluster").args(["batch", "run", "--full", "--engine", &engine]));
    run_ok(tandem(d, "local").args(["batch", "run", "--full"]));
    let tasks: usize = logs
        .iter()
        .map(|l| {
            std::fs::read_to_string(l)
                .unwrap()
                .matches("Execute task")
                .count()
        })
        .sum();
    assert!(tasks > 0, "the executors ran the recompute's tasks");
    drop(executors);
    drop(scheduler);

    for view in ["installs_hourly", "purchases_daily", "active_devices_daily"] {
        let (local, cluster) = (rows(d, "local", view), rows(d, "cluster", view));
        assert!(local.len() > 10, "{view}: {} rows", local.len());
        let only_local: Vec<_> = local
            .iter()
            .filter(|r| !cluster.contains(r))
            .take(5)
            .collect();
        let only_cluster: Vec<_> = cluster
            .iter()
            .filter(|r| !local.contains(r))
            .take(5)
            .collect();
        assert!(
            only_local.is_empty() && only_cluster.is_empty() && local.len() == cluster.len(),
            "{view}: {} rows in-process, {} on the cluster; only in-process: {only_local:?}; only on the cluster: {only_cluster:?}",
            local.len(),
            cluster.len()
        );
    }

    // Served alike, rollups and sketch unions included.
    let serve = |data: &str| {
        let mut child = tandem(d, data)
            .args(["--listen", "127.0.0.1:0", "serve"])
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        (Killed(child), format!("http://{}", serving_address(stderr)))
    };
    let (_a, local) = serve("local");
    let (_b, cluster) = serve("cluster");
    for q in [
        format!(
            "installs_hourly/query?from={}&to={}&granularity=day&group_by=media_source",
            day(-5),
            day(1)
        ),
        format!(
            "active_devices_daily/query?from={}&to={}&granularity=all",
            day(-5),
            day(1)
        ),
        format!(
            "purchases_daily/query?from={}&to={}&group_by=country",
            day(-5),
            day(1)
        ),
    ] {
        let (_, a) = get_json(&format!("{local}/v1/views/{q}"));
        let (_, b) = get_json(&format!("{cluster}/v1/views/{q}"));
        assert!(!a["rows"].as_array().unwrap().is_empty(), "{q}: {a}");
        assert_eq!(a["rows"], b["rows"], "{q}");
    }
}
