//! The real binary: configuration errors at start, and gen → import → batch → serve → query.

mod support;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use support::{day, get_json, get_json_as, serving_address, sum_of, Killed};

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

/// Starts `c`, a command that serves, and waits for the address it serves on; the server is
/// killed when the first value is dropped.
fn served(c: &mut Command) -> (Killed, String) {
    let mut child = c.stderr(Stdio::piped()).spawn().unwrap();
    let stderr = child.stderr.take().unwrap();
    (Killed(child), serving_address(stderr))
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

    // An API key's hash that is not one, and a key naming a view that does not exist.
    std::fs::write(
        dir.path().join("tandem.toml"),
        "[[api.keys]]\nname = \"a\"\nsha256 = \"abc\"\n",
    )
    .unwrap();
    let err = run_err(tandem(dir.path()).args(["config"]));
    assert!(err.contains("api.keys[0].sha256"), "{err}");
}

#[test]
fn without_api_keys_the_api_listens_on_loopback_only() {
    let dir = tempfile::tempdir().unwrap();
    let defs = ["--schemas", &repo("schemas"), "--jobs", &repo("jobs")];
    let serve = |dir: &Path| {
        served(
            tandem(dir)
                .args(defs)
                .args(["--data", "d", "--listen", "0.0.0.0:0", "serve"]),
        )
    };
    let (_server, address) = serve(dir.path());
    assert!(address.starts_with("127.0.0.1:"), "{address}");
    // With a key, the API listens where it is told, and asks for the key.
    let out = run_ok(tandem(dir.path()).args(["apikey", "--name", "grafana"]));
    let key = out
        .lines()
        .next()
        .unwrap()
        .strip_prefix("key: ")
        .unwrap()
        .to_string();
    let entry: String = out.lines().skip(1).collect::<Vec<_>>().join("\n");
    std::fs::write(dir.path().join("tandem.toml"), entry).unwrap();
    let (_server, address) = serve(dir.path());
    assert!(address.starts_with("0.0.0.0:"), "{address}");
    let port = address.rsplit(':').next().unwrap();
    let status = ureq::get(format!("http://127.0.0.1:{port}/v1/views"))
        .call()
        .map(|r| r.status().as_u16())
        .unwrap_or_else(|e| match e {
            ureq::Error::StatusCode(s) => s,
            e => panic!("{e}"),
        });
    assert_eq!(status, 401);
    let (_, views) = get_json_as(&format!("http://127.0.0.1:{port}/v1/views"), Some(&key));
    assert_eq!(views["views"].as_array().unwrap().len(), 3);
}

/// `/readyz` is 503 until every view's published version is loaded: a view whose table
/// cannot be read keeps it so (and says which check), and once the table reads, it is ready.
#[test]
fn readyz_waits_until_the_published_views_are_loaded() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("d/views/installs_hourly/_delta_log");
    std::fs::create_dir_all(&log).unwrap();
    std::fs::write(log.join("00000000000000000000.json"), "not a delta log\n").unwrap();
    let (_server, address) =
        served(tandem(dir.path()).args(["--data", "d", "--listen", "127.0.0.1:0", "serve"]));
    let url = format!("http://{address}/readyz");
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let readyz = || {
        let mut r = agent.get(&url).call().unwrap();
        (r.status().as_u16(), r.body_mut().read_to_string().unwrap())
    };
    std::thread::sleep(Duration::from_secs(3));
    let (status, body) = readyz();
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("batch views: loading the published views"),
        "{body}"
    );
    std::fs::remove_dir_all(dir.path().join("d/views/installs_hourly")).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (status, body) = readyz();
        if status == 200 {
            assert_eq!(body, "ok");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "never ready: {body}");
        std::thread::sleep(Duration::from_millis(300));
    }
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
    // The same file again (here by its directory): skipped, nothing added.
    let out = run_ok(
        tandem(dir.path())
            .args(defs)
            .args(["--data", "d", "import"])
            .arg(dir.path()),
    );
    assert!(
        out.contains("imported 0 events") && out.contains("1 file(s) already imported"),
        "{out}"
    );
    let out = run_ok(tandem(dir.path()).args(defs).args([
        "--data",
        "d",
        "batch",
        "run",
        "--view",
        "installs_hourly",
    ]));
    assert!(out.contains("installs_hourly: published"), "{out}");
    // --json: one object a scheduler reads, with what each day read and computed.
    let out = run_ok(tandem(dir.path()).args(defs).args([
        "--data",
        "d",
        "batch",
        "run",
        "--view",
        "installs_hourly",
        "--full",
        "--json",
        "--memory-limit",
        "64MiB",
    ]));
    let report: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let view = &report["views"][0];
    assert_eq!(view["view"], "installs_hourly");
    let days = view["per_day"].as_array().unwrap();
    assert!(!days.is_empty(), "{out}");
    let read: u64 = days.iter().map(|d| d["rows_read"].as_u64().unwrap()).sum();
    assert_eq!(read, view["rows_read"].as_u64().unwrap());
    assert!(read > 0 && read <= 3000, "{out}");

    // Upkeep: compaction leaves a file per day; a dry run of vacuum lists what the compaction
    // and the republish replaced, and deletes nothing.
    let out = run_ok(
        tandem(dir.path())
            .args(defs)
            .args(["--data", "d", "compact", "--json"]),
    );
    let compacted: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert!(
        compacted["tables"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["table"] == "master/app_events"),
        "{out}"
    );
    let out = run_ok(tandem(dir.path()).args(defs).args([
        "--data",
        "d",
        "vacuum",
        "--retention-hours",
        "0",
        "--dry-run",
    ]));
    assert!(out.contains("views/installs_hourly: would delete"), "{out}");

    // Dead letters: a file with one bad line, listed and (still bad) left by a replay.
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"event_id\":\"only\"}\n").unwrap();
    run_ok(
        tandem(dir.path())
            .args(defs)
            .args(["--data", "d", "import"])
            .arg(&bad),
    );
    let out = run_ok(
        tandem(dir.path())
            .args(defs)
            .args(["--data", "d", "dlq", "list", "--reason", "schema", "--json"]),
    );
    let letter: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(letter["raw"], "{\"event_id\":\"only\"}", "{out}");
    let out = run_ok(
        tandem(dir.path())
            .args(defs)
            .args(["--data", "d", "dlq", "replay"]),
    );
    assert!(out.contains("moved 0 dead letter(s)"), "{out}");
    let err = run_err(
        tandem(dir.path())
            .args(defs)
            .args(["--data", "d", "dlq", "list", "--reason", "nope"]),
    );
    assert!(err.contains("--reason"), "{err}");

    let (_server, address) = served(tandem(dir.path()).args(defs).args([
        "--data",
        "d",
        "--listen",
        "127.0.0.1:0",
        "serve",
    ]));
    let url = format!("http://{address}");
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

#[test]
fn config_says_where_each_value_came_from() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("tandem.toml"),
        "listen = \"127.0.0.1:9100\"\n[kafka]\nbrokers = \"file-broker:9092\"\n",
    )
    .unwrap();
    let out = run_ok(
        tandem(dir.path())
            .env("TANDEM_KAFKA_BROKERS", "env-broker:9092")
            .env("TANDEM_DATA", "from-env")
            .args(["--storage", "memory:///", "config"]),
    );
    let line = |key: &str| {
        out.lines()
            .find(|l| l.starts_with(&format!("{key} ")))
            .unwrap_or_else(|| panic!("no {key} in:\n{out}"))
            .to_string()
    };
    // A flag beats the environment, even when they are spelled differently.
    assert!(line("storage").contains("memory:///"), "{out}");
    assert!(line("storage").contains("flag --storage"), "{out}");
    // The environment beats the file, which beats the default.
    assert!(line("kafka.brokers").contains("env-broker:9092"), "{out}");
    assert!(
        line("kafka.brokers").contains("environment TANDEM_KAFKA_BROKERS"),
        "{out}"
    );
    assert!(line("listen").contains("tandem.toml key `listen`"), "{out}");
    assert!(line("jobs").contains("default"), "{out}");

    let err =
        run_err(tandem(dir.path()).args(["--data", "d", "--storage", "memory:///", "config"]));
    assert!(err.contains("--data") && err.contains("--storage"), "{err}");
}

/// Collects a child's log lines, and says where it serves once it logs that.
fn watch(
    stderr: std::process::ChildStderr,
) -> (
    std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    std::sync::mpsc::Receiver<String>,
) {
    let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let (tx, rx) = std::sync::mpsc::channel();
    let kept = std::sync::Arc::clone(&lines);
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(i) = line.find("address=") {
                let addr = line[i + 8..].split_whitespace().next().unwrap_or_default();
                let _ = tx.send(addr.to_string());
            }
            kept.lock().unwrap().push(line);
        }
    });
    (lines, rx)
}

/// A role that fails for good (here the archiver, whose store is gone) stops the others in
/// order and makes `tandem run` exit non-zero with the error; bad events before that are
/// dead-lettered and fail nothing.
#[test]
fn a_failed_role_stops_the_others_in_order_and_fails_the_process() {
    use rdkafka::config::ClientConfig;
    use rdkafka::mocking::MockCluster;
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};

    let dir = tempfile::tempdir().unwrap();
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic("app_events", 1, 1).unwrap();
    let brokers = cluster.bootstrap_servers();
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()
        .unwrap();
    let produce = |payloads: &[String]| {
        for p in payloads {
            producer
                .send(BaseRecord::<str, str>::to("app_events").payload(p))
                .unwrap();
        }
        producer.flush(Duration::from_secs(10)).unwrap();
    };
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let event = |i: usize| {
        format!(
            r#"{{"event_id":"e{i}","event_time":"{now}","app_id":"a","event_name":"launch","media_source":"organic","country":"DE","platform":"ios","device_id":"d{i}"}}"#
        )
    };
    let mut first: Vec<String> = (0..50).map(event).collect();
    first.extend(["{not json".to_string(), r#"{"event_id":"x"}"#.to_string()]);
    produce(&first);

    let data = dir.path().join("data");
    let mut child = tandem(dir.path())
        .args(["--schemas", &repo("schemas"), "--jobs", &repo("jobs")])
        .arg("--data")
        .arg(&data)
        .args(["--brokers", &brokers, "--listen", "127.0.0.1:0", "run"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (log, address) = watch(child.stderr.take().unwrap());
    let mut server = Killed(child);
    let address = address.recv_timeout(Duration::from_secs(60)).unwrap();

    // The good events are served and archived, the bad ones dead-lettered; nothing failed.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let dead_letters = data.join("dead_letter/app_events/_delta_log/00000000000000000001.json");
    loop {
        let (_, json) = get_json(&format!(
            "http://{address}/v1/views/active_devices_daily/query?from={}&to={}&metrics=events",
            day(-1),
            day(1)
        ));
        if sum_of(&json, "events") == 50 && dead_letters.exists() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "not consumed: {json}");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        server.0.try_wait().unwrap().is_none(),
        "bad events failed the process"
    );

    // The store goes away for good: its directory becomes a file.
    std::fs::rename(&data, dir.path().join("gone")).unwrap();
    std::fs::write(&data, "not a directory").unwrap();
    produce(&(50..60).map(event).collect::<Vec<_>>());

    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = server.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "tandem run did not stop"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    std::thread::sleep(Duration::from_millis(200));
    let log = log.lock().unwrap().join("\n");
    assert!(!status.success(), "{log}");
    let at = |needle: &str| {
        log.find(needle)
            .unwrap_or_else(|| panic!("`{needle}` is not in the log:\n{log}"))
    };
    // The failure, then the speed layer drained, then the HTTP server, then the error.
    let failed = at("a role failed");
    let speed_stopped = at("speed layer of `app_events`");
    let http_stopped = at("HTTP server stopped");
    let error = at("error: the archiver of `app_events` failed");
    assert!(
        failed < speed_stopped && speed_stopped < http_stopped && http_stopped < error,
        "{log}"
    );
    drop(cluster);
}

/// A server killed with SIGKILL leaves its port in TIME_WAIT; its replacement binds it at once.
#[test]
fn a_killed_server_restarts_on_its_port_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    let start = || {
        let mut child = tandem(dir.path())
            .args(["--schemas", &repo("schemas"), "--jobs", &repo("jobs")])
            .args(["--data", "data", "--listen", &listen, "serve"])
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (log, address) = watch(child.stderr.take().unwrap());
        let server = Killed(child);
        match address.recv_timeout(Duration::from_secs(60)) {
            Ok(a) => (server, a),
            Err(_) => panic!("no address: {}", log.lock().unwrap().join("\n")),
        }
    };
    let (mut first, address) = start();
    // A finished request on an open connection: the server's side closes first when killed.
    let (body, _) = get_json(&format!("http://{address}/v1/views"));
    assert!(body.contains("installs_hourly"));
    let mut conn = std::net::TcpStream::connect(&address).unwrap();
    use std::io::{Read, Write};
    write!(conn, "GET /livez HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut buf = [0u8; 256];
    let n = conn.read(&mut buf).unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).contains("200"));
    first.0.kill().unwrap();
    first.0.wait().unwrap();
    let (_second, again) = start();
    assert_eq!(again, address);
    let (body, _) = get_json(&format!("http://{again}/v1/views"));
    assert!(body.contains("installs_hourly"));
}
