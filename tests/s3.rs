//! Tandem on S3: an S3-compatible server (moto) started by the test, two imports committing
//! to the master dataset at the same time, a batch run, and the API serving the published
//! views, all through the real binary.
//!
//! Needs `moto_server` (`pip install 'moto[server]'`; `.ci/run` installs it).

mod support;

use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::{get_json, serving_address, sum_of, Killed};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// moto's S3 on a free port, with `bucket` created.
fn moto(bucket: &str) -> (Killed, String) {
    let port = free_port().to_string();
    let child = Command::new("moto_server")
        .args(["-H", "127.0.0.1", "-p", &port])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .or_else(|_| {
            Command::new("python3")
                .args(["-m", "moto.server", "-H", "127.0.0.1", "-p", &port])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
        })
        .expect("moto is needed for the S3 tests: pip install 'moto[server]'");
    let server = Killed(child);
    let endpoint = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match ureq::put(format!("{endpoint}/{bucket}")).send_empty() {
            Ok(_) => break,
            Err(e) if Instant::now() > deadline => panic!("moto did not start: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
    (server, endpoint)
}

fn tandem_at(dir: &Path, endpoint: &str, storage: &str) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tandem"));
    c.current_dir(dir).env("RUST_LOG", "info");
    for (k, _) in std::env::vars() {
        if k.starts_with("TANDEM_") || k.starts_with("AWS_") {
            c.env_remove(k);
        }
    }
    c.env("AWS_ENDPOINT_URL", endpoint)
        .env("AWS_ALLOW_HTTP", "true")
        .env("AWS_REGION", "us-east-1")
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .args([
            "--schemas",
            concat!(env!("CARGO_MANIFEST_DIR"), "/schemas"),
            "--jobs",
            concat!(env!("CARGO_MANIFEST_DIR"), "/jobs"),
            "--storage",
            storage,
        ]);
    c
}

fn tandem(dir: &Path, endpoint: &str) -> Command {
    tandem_at(dir, endpoint, "s3://tandem-test/prod")
}

fn ok(c: &mut Command) -> String {
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "{c:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn import_batch_and_serve_on_s3() {
    let (_moto, endpoint) = moto("tandem-test");
    let dir = tempfile::tempdir().unwrap();
    let today = support::day(0);

    // Two files, imported at the same time: both commit to the master dataset, and a lost
    // commit would show up as missing events below.
    let files: Vec<_> = [(1, 4000), (2, 5000)]
        .into_iter()
        .map(|(seed, n)| {
            let f = dir.path().join(format!("events-{seed}.jsonl"));
            ok(tandem(dir.path(), &endpoint)
                .args(["gen", "--days", "4", "--seed", &seed.to_string()])
                .args(["--events", &n.to_string(), "--out"])
                .arg(&f));
            f
        })
        .collect();
    let closed: usize = files
        .iter()
        .map(|f| {
            std::fs::read_to_string(f)
                .unwrap()
                .lines()
                .filter(|l| {
                    let v: serde_json::Value = serde_json::from_str(l).unwrap();
                    v["event_time"].as_str().unwrap()[..10] < *today.as_str()
                })
                .count()
        })
        .sum();
    let imports: Vec<_> = files
        .iter()
        .map(|f| {
            tandem(dir.path(), &endpoint)
                .arg("import")
                .arg(f)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for i in imports {
        let out = i.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "import failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    let out = ok(tandem(dir.path(), &endpoint).args(["batch", "run"]));
    assert!(out.contains("active_devices_daily: published"), "{out}");

    let mut child = tandem(dir.path(), &endpoint)
        .args(["--listen", "127.0.0.1:0", "serve"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let _server = Killed(child);
    let addr = serving_address(stderr);
    let (body, json) = get_json(&format!(
        "http://{addr}/v1/views/active_devices_daily/query?from=2026-01-01&to={today}&metrics=events"
    ));
    let rows = json["rows"].as_array().unwrap();
    assert!(rows.iter().all(|r| r["source"] == "batch"), "{body}");
    assert_eq!(sum_of(&json, "events") as usize, closed, "{body}");

    // Without the bucket, a command fails and says why.
    let out = tandem_at(dir.path(), &endpoint, "s3://no-such-bucket/x")
        .args(["batch", "run"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("no-such-bucket") || err.contains("NoSuchBucket"),
        "{err}"
    );
}
