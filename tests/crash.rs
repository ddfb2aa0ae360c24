//! Crashes: `tandem run` killed with SIGKILL while a stream flows, against `tandem broker` in a
//! process of its own, restarted each time on the same storage. The speed layer's answers must
//! end equal to an oracle computed from the produced events, and each restart must resume from
//! a checkpoint at most one checkpoint interval old.
//! Archivers killed and rebalanced the same way must archive every produced offset once.

mod support;

use std::collections::BTreeMap;
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use support::{get_json, oracle, row_key, within, Killed};
use tandem_core::time::{format_us, Clock, SystemClock};
use tandem_core::view::DAY_US;
use tandem_workload::{Event, GenConfig, Generator};

const TOPIC: &str = "app_events";
const PARTITIONS: usize = 3;
const EVENTS: usize = 24_000;
const RATE: usize = 3_000;

fn tandem(dir: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tandem"));
    c.current_dir(dir).env("RUST_LOG", "info");
    for (k, _) in std::env::vars() {
        if k.starts_with("TANDEM_") {
            c.env_remove(k);
        }
    }
    c
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `tandem broker` on a fixed port, up once it accepts connections.
fn broker(dir: &Path) -> (Killed, String) {
    let port = free_port();
    let child = tandem(dir)
        .args(["broker", "--port", &port.to_string()])
        .args(["--partitions", &PARTITIONS.to_string(), "--topic", TOPIC])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let address = format!("127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(&address).is_err() {
        assert!(Instant::now() < deadline, "the broker did not come up");
        std::thread::sleep(Duration::from_millis(100));
    }
    (Killed(child), address)
}

/// `tandem run` on the shared storage; its API's base URL once it serves.
fn run(dir: &Path, brokers: &str) -> (Killed, String) {
    start(dir, "run", brokers)
}

/// `tandem ROLE` (`run` or `speed`) on the shared storage; its API's base URL once it serves.
/// Its log goes to `logs/ROLE-PID.log` in the deployment directory.
fn start(dir: &Path, role: &str, brokers: &str) -> (Killed, String) {
    std::fs::create_dir_all(dir.join("logs")).unwrap();
    let n = std::fs::read_dir(dir.join("logs")).unwrap().count();
    let log = dir.join("logs").join(format!("{n:02}-{role}.log"));
    let child = tandem(dir)
        .args(["--config", "tandem.toml", role, "--brokers", brokers])
        .args(["--data", "data", "--listen", "127.0.0.1:0"])
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let child = Killed(child);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if let Some(i) = text.find("address=") {
            let address = text[i + 8..].split_whitespace().next().unwrap().to_string();
            return (child, format!("http://{address}"));
        }
        assert!(Instant::now() < deadline, "{role} did not start:\n{text}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The speed layer's gauges and counters from `/metrics`, by name and partition label.
fn metrics(base: &str) -> BTreeMap<(String, Option<i64>), f64> {
    let text = ureq::get(&format!("{base}/metrics"))
        .call()
        .unwrap()
        .into_body()
        .read_to_string()
        .unwrap();
    let mut out = BTreeMap::new();
    for line in text.lines().filter(|l| l.starts_with("tandem_speed_")) {
        let Some((key, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let name = key.split('{').next().unwrap().to_string();
        let partition = key
            .split("partition=\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .and_then(|p| p.parse().ok());
        out.insert((name, partition), value.parse().unwrap());
    }
    out
}

/// Each owned partition's `name` gauge.
fn per_partition(m: &BTreeMap<(String, Option<i64>), f64>, name: &str) -> BTreeMap<i64, i64> {
    m.iter()
        .filter(|((n, p), _)| n == name && p.is_some())
        .map(|((_, p), v)| (p.unwrap(), *v as i64))
        .collect()
}

fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Produces `events` at `rate` a second from a thread; counts what was sent.
fn stream(
    brokers: &str,
    events: Vec<Event>,
    rate: usize,
    sent: Arc<AtomicUsize>,
) -> std::thread::JoinHandle<()> {
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "5")
        .create()
        .unwrap();
    std::thread::spawn(move || {
        let started = Instant::now();
        for (i, e) in events.iter().enumerate() {
            let due = started + Duration::from_secs_f64(i as f64 / rate as f64);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            let payload = e.to_json();
            let mut rec = BaseRecord::to(TOPIC)
                .key(e.device_id.as_str())
                .payload(payload.as_str());
            loop {
                match producer.send(rec) {
                    Ok(()) => break,
                    Err((_, r)) => {
                        rec = r;
                        producer.poll(Duration::from_millis(10));
                    }
                }
            }
            producer.poll(Duration::ZERO);
            sent.store(i + 1, Ordering::Relaxed);
        }
        producer.flush(Duration::from_secs(30)).unwrap();
    })
}

/// A deployment directory with its `tandem.toml` (6 s consumer sessions, so that a killed
/// member's partitions move on quickly; checkpoints every second).
fn deployment() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let repo = env!("CARGO_MANIFEST_DIR");
    std::fs::write(
        dir.path().join("tandem.toml"),
        format!(
            "schemas = \"{repo}/schemas\"\njobs = \"{repo}/jobs\"\n\
             [kafka.properties]\n\"session.timeout.ms\" = 6000\n\"heartbeat.interval.ms\" = 500\n\
             [speed]\ncheckpoint_interval_ms = 1000\n"
        ),
    )
    .unwrap();
    dir
}

/// `EVENTS` reference events over the two days before `now`.
fn events(now: i64, seed: u64) -> Vec<Event> {
    Generator::new(GenConfig {
        seed,
        ..Default::default()
    })
    .history(EVENTS, now - 2 * DAY_US, now)
    .collect()
}

/// The partitions a serving process owns (restored or assigned, not provisional).
fn owned(base: &str) -> usize {
    per_partition(&metrics(base), "tandem_speed_next_offset").len()
}

fn signal(child: &Killed, signal: &str) {
    let ok = Command::new("kill")
        .args([signal, &child.0.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {signal}");
}

/// Starts a `tandem speed` instance and waits until it and the instance at `a_url` share
/// the partitions.
fn join(dir: &Path, brokers: &str, a_url: &str) -> (Killed, String) {
    let (b, b_url) = start(dir, "speed", brokers);
    wait_for(
        "the partitions to be shared",
        Duration::from_secs(60),
        || {
            let (x, y) = (owned(a_url), owned(&b_url));
            x > 0 && y > 0 && x + y == PARTITIONS
        },
    );
    (b, b_url)
}

/// Stops `child` with SIGTERM and waits for it to finish its shutdown.
fn stop(mut child: Killed) {
    signal(&child, "-TERM");
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.0.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn kill_9_at_20_50_and_80_percent_loses_nothing_and_counts_nothing_twice() {
    let dir = deployment();
    let (_broker, brokers) = broker(dir.path());
    let now = SystemClock.now_us();
    let events = events(now, 7);
    let sent = Arc::new(AtomicUsize::new(0));

    let (mut server, mut base) = run(dir.path(), &brokers);
    wait_for("the first assignment", Duration::from_secs(60), || {
        per_partition(&metrics(&base), "tandem_speed_next_offset").len() == PARTITIONS
    });
    let producer = stream(&brokers, events.clone(), RATE, Arc::clone(&sent));

    for share in [0.2, 0.5, 0.8] {
        let at = (EVENTS as f64 * share) as usize;
        wait_for(
            "the stream to reach the kill point",
            Duration::from_secs(120),
            || sent.load(Ordering::Relaxed) >= at,
        );
        // What was applied 1.5 s before the kill: a checkpoint written since (every 1 s)
        // holds at least this much.
        let before = per_partition(&metrics(&base), "tandem_speed_next_offset");
        std::thread::sleep(Duration::from_millis(1_500));
        drop(server); // SIGKILL
        (server, base) = run(dir.path(), &brokers);
        wait_for(
            "the partitions to be restored",
            Duration::from_secs(60),
            || {
                let m = metrics(&base);
                per_partition(&m, "tandem_speed_restored_offset").len() == PARTITIONS
                    && m.get(&("tandem_speed_restored_partitions_total".into(), None))
                        == Some(&(PARTITIONS as f64))
            },
        );
        let restored = per_partition(&metrics(&base), "tandem_speed_restored_offset");
        for (p, offset) in &before {
            assert!(
                restored[p] >= *offset,
                "after the kill at {share}: partition {p} restored at {} though {offset} was applied 1.5 s before the kill (checkpoints every 1 s)",
                restored[p]
            );
        }
    }
    producer.join().unwrap();
    assert_matches_oracle(&base, &events, now);
}

/// Once `base` has applied every event, its answers equal the oracle's: counts exactly,
/// distinct counts within three standard errors.
fn assert_matches_oracle(base: &str, events: &[Event], now: i64) {
    wait_for(
        "the speed layer to apply every event",
        Duration::from_secs(120),
        || {
            per_partition(&metrics(base), "tandem_speed_next_offset")
                .values()
                .sum::<i64>()
                >= EVENTS as i64
        },
    );
    let truth = oracle(events);
    let views = [
        (
            "installs_hourly",
            "app_id,media_source,campaign,country",
            "installs",
            "devices",
        ),
        ("active_devices_daily", "app_id", "events", "active_devices"),
    ];
    for (view, dims, count, distinct) in views {
        let url = format!(
            "{base}/v1/views/{view}/query?from={}&to={}&group_by={dims}&limit=100000",
            format_us(now - 5 * DAY_US),
            format_us(now + DAY_US),
        );
        let (_, answer) = get_json(&url);
        assert_eq!(answer["meta"]["stale_partitions"], serde_json::json!([]));
        let dims: Vec<String> = dims.split(',').map(str::to_string).collect();
        let rows = answer["rows"].as_array().unwrap();
        let want = &truth[view];
        assert_eq!(rows.len(), want.len(), "{view}: groups");
        for row in rows {
            let key = row_key(row, &dims);
            let t = &want[&key];
            assert_eq!(
                row["metrics"][count].as_u64().unwrap(),
                t.count,
                "{view} {key:?}"
            );
            let devices = row["metrics"][distinct]["value"].as_f64().unwrap();
            assert!(
                within(devices, t.devices.len(), 1.04 / 64.0, 3.0),
                "{view} {key:?}: {devices} devices, {} exact",
                t.devices.len()
            );
        }
    }
}

#[test]
fn instances_join_and_leave_and_a_zombie_is_fenced_without_changing_a_count() {
    let dir = deployment();
    let (_broker, brokers) = broker(dir.path());
    let now = SystemClock.now_us();
    let events = events(now, 11);
    let sent = Arc::new(AtomicUsize::new(0));
    let at = |share: f64| {
        let n = (EVENTS as f64 * share) as usize;
        let sent = Arc::clone(&sent);
        wait_for("the stream", Duration::from_secs(120), move || {
            sent.load(Ordering::Relaxed) >= n
        });
    };

    let (a, a_url) = run(dir.path(), &brokers);
    wait_for("the first assignment", Duration::from_secs(60), || {
        owned(&a_url) == PARTITIONS
    });
    // Slower, so that the stream still flows through every step below (each rebalance of the
    // mock cluster takes a few seconds).
    let producer = stream(&brokers, events.clone(), RATE / 3, Arc::clone(&sent));

    // A second instance joins mid-stream: the partitions are shared...
    at(0.2);
    let b = join(dir.path(), &brokers, &a_url);
    // ... and leaves again (SIGTERM: its partitions are checkpointed as they are revoked).
    at(0.4);
    stop(b.0);
    wait_for(
        "the partitions to come back",
        Duration::from_secs(60),
        || owned(&a_url) == PARTITIONS,
    );

    // A zombie: `a` sleeps past its session while `c` takes its partitions, then wakes up.
    // Its first write (its next checkpoint, or the one it tries as it learns that its
    // partitions were lost) is refused.
    at(0.55);
    let (c, c_url) = join(dir.path(), &brokers, &a_url);
    signal(&a, "-STOP");
    wait_for(
        "the new owner to take everything",
        Duration::from_secs(60),
        || owned(&c_url) == PARTITIONS,
    );
    signal(&a, "-CONT");
    wait_for("the zombie to be fenced", Duration::from_secs(30), || {
        metrics(&a_url)
            .get(&("tandem_speed_fenced_total".into(), None))
            .is_some_and(|&n| n >= 1.0)
    });

    // `c` leaves; `a` ends with every partition and every event exactly once.
    at(0.8);
    stop(c);
    wait_for(
        "the partitions to come back",
        Duration::from_secs(60),
        || owned(&a_url) == PARTITIONS,
    );
    producer.join().unwrap();
    assert_matches_oracle(&a_url, &events, now);
}

#[test]
fn replaying_the_speed_group_from_a_time_counts_nothing_twice() {
    let dir = deployment();
    let (_broker, brokers) = broker(dir.path());
    let now = SystemClock.now_us();
    let events = events(now, 13);
    let sent = Arc::new(AtomicUsize::new(0));
    let (a, a_url) = run(dir.path(), &brokers);
    wait_for("the first assignment", Duration::from_secs(60), || {
        owned(&a_url) == PARTITIONS
    });
    stream(&brokers, events.clone(), 20 * RATE, Arc::clone(&sent))
        .join()
        .unwrap();
    assert_matches_oracle(&a_url, &events, now);

    let replay = |dir: &Path| {
        tandem(dir)
            .args(["--config", "tandem.toml", "--data", "data", "replay"])
            .args(["--brokers", &brokers, "--group", "speed"])
            .args(["--from-time", &format_us(now - DAY_US)])
            .output()
            .unwrap()
    };
    stop(a);
    let out = replay(dir.path());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("rewound"), "{text}");

    let (_a, a_url) = run(dir.path(), &brokers);
    assert_matches_oracle(&a_url, &events, now);
}

/// `tandem archive` on the shared storage, its log in `logs/`.
fn archiver(dir: &Path, brokers: &str) -> Killed {
    std::fs::create_dir_all(dir.join("logs")).unwrap();
    let n = std::fs::read_dir(dir.join("logs")).unwrap().count();
    let log = dir.join("logs").join(format!("{n:02}-archive.log"));
    Killed(
        tandem(dir)
            .args(["--config", "tandem.toml", "archive", "--brokers", brokers])
            .args(["--data", "data"])
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    )
}

/// The master dataset's rows, and the (partition, offset) pairs held more than once.
fn archived(dir: &Path) -> (u64, String) {
    let sql = |q: &str| {
        let out = tandem(dir)
            .args([
                "--config",
                "tandem.toml",
                "--data",
                "data",
                "sql",
                q,
                "--format",
                "csv",
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let rows = sql("SELECT count(*) FROM app_events")
        .lines()
        .nth(1)
        .and_then(|l| l.parse().ok())
        .unwrap_or(0);
    let twice = sql(
        "SELECT _partition, _offset FROM app_events GROUP BY 1, 2 HAVING count(*) <> 1 LIMIT 5",
    );
    (rows, twice.lines().skip(1).collect::<Vec<_>>().join(" "))
}

/// Two archivers share the topic; one is killed with SIGKILL mid-stream and its partitions
/// move to the other, then a third joins and takes some back: every produced offset is in the
/// master dataset exactly once.
#[test]
fn archivers_killed_and_rebalanced_archive_each_offset_once() {
    let dir = deployment();
    let (_broker, brokers) = broker(dir.path());
    let now = SystemClock.now_us();
    let events = events(now, 11);
    let sent = Arc::new(AtomicUsize::new(0));
    let a = archiver(dir.path(), &brokers);
    let b = archiver(dir.path(), &brokers);
    let producer = stream(&brokers, events.clone(), RATE, Arc::clone(&sent));
    wait_for("a third of the stream", Duration::from_secs(120), || {
        sent.load(Ordering::Relaxed) >= EVENTS / 3
    });
    signal(&a, "-KILL");
    drop(a);
    wait_for("two thirds of the stream", Duration::from_secs(120), || {
        sent.load(Ordering::Relaxed) >= 2 * EVENTS / 3
    });
    let c = archiver(dir.path(), &brokers);
    producer.join().unwrap();
    wait_for("every event archived", Duration::from_secs(120), || {
        archived(dir.path()).0 >= EVENTS as u64
    });
    let (rows, twice) = archived(dir.path());
    assert_eq!(rows, EVENTS as u64);
    assert!(twice.is_empty(), "offsets archived twice: {twice}");
    drop((b, c));
}
