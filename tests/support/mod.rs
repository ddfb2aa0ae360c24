//! What the end-to-end tests share: running the real binary (a child process killed when the
//! test ends, its served address, HTTP helpers), and a harness of the layers in process (the
//! mock Kafka cluster, the consumers started as production starts them, the batch layer, the
//! API router called without a socket), plus an oracle that recomputes the reference views
//! directly from the generated events, independently of Tandem's code.

#![allow(dead_code, unreachable_pub)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use rdkafka::config::ClientConfig;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use serde_json::Value;
use tandem_batch::{BatchLayer, DeltaBatchViews, RunRequest};
use tandem_core::storage::Storage;
use tandem_core::time::{format_us, Clock, MockClock};
use tandem_core::view::{Granularity, DAY_US};
use tandem_core::Catalog;
use tandem_serving::{router, ApiMetrics, AppState, Shared};
use tandem_speed::{
    ArchiverConfig, ArchiverStats, ConsumerName, ConsumerOptions, KafkaConfig, SpeedLayer,
};
use tandem_workload::Event;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

/// The `tandem` binary run in `dir`, with no `TANDEM_*` setting of the environment and the
/// reference definitions of the repository.
pub fn binary(dir: &Path) -> std::process::Command {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_tandem"));
    c.current_dir(dir).env("RUST_LOG", "warn");
    for (k, _) in std::env::vars() {
        if k.starts_with("TANDEM_") {
            c.env_remove(k);
        }
    }
    let repo = env!("CARGO_MANIFEST_DIR");
    c.args([
        "--schemas",
        &format!("{repo}/schemas"),
        "--jobs",
        &format!("{repo}/jobs"),
    ]);
    c
}

/// Runs `c`, which must succeed: its stdout and stderr.
pub fn succeeds(c: &mut std::process::Command) -> (String, String) {
    let out = c.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{c:?} failed:\n{stderr}");
    (String::from_utf8(out.stdout).unwrap(), stderr)
}

/// Runs `c`, which must fail: its stderr.
pub fn fails(c: &mut std::process::Command) -> String {
    let out = c.output().unwrap();
    assert!(!out.status.success(), "{c:?} should fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A child process killed when the test ends, passing or not.
pub struct Killed(pub Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Reads a server's log until it names the address it serves on, and keeps draining the log
/// afterwards so the server never blocks on a full pipe.
pub fn serving_address(stderr: ChildStderr) -> String {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(i) = line.find("address=") {
                let addr = line[i + 8..].split_whitespace().next().unwrap_or_default();
                let _ = tx.send(addr.to_string());
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(60))
        .expect("the server logs its address")
}

/// GET `url`; the body and its JSON.
pub fn get_json(url: &str) -> (String, Value) {
    get_json_as(url, None)
}

/// GET `url` with an API key (if given); the body and its JSON.
pub fn get_json_as(url: &str, key: Option<&str>) -> (String, Value) {
    let mut req = ureq::get(url);
    if let Some(k) = key {
        req = req.header("Authorization", &format!("Bearer {k}"));
    }
    let body = req.call().unwrap().into_body().read_to_string().unwrap();
    let json = serde_json::from_str(&body).unwrap();
    (body, json)
}

/// The sum of the integer metric `name` over an answer's rows.
pub fn sum_of(answer: &Value, name: &str) -> u64 {
    answer["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["metrics"][name].as_u64().unwrap())
        .sum()
}

/// `YYYY-MM-DD`, `days` from today (UTC).
pub fn day(days: i64) -> String {
    (chrono::Utc::now() + chrono::Duration::days(days))
        .format("%Y-%m-%d")
        .to_string()
}

pub const TOPIC: &str = "app_events";
/// "Now" in every test: 2026-11-26T12:00:00Z.
pub const NOW_US: i64 = 1_795_694_400_000_000;

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The repository's definitions, optionally with extra view files added to a copy of `jobs/`.
pub fn definitions(extra_views: &[(&str, &str)]) -> (tempfile::TempDir, Catalog) {
    let dir = tempfile::tempdir().unwrap();
    let jobs = dir.path().join("jobs");
    std::fs::create_dir(&jobs).unwrap();
    for entry in std::fs::read_dir(repo().join("jobs")).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, jobs.join(p.file_name().unwrap())).unwrap();
    }
    for (name, text) in extra_views {
        std::fs::write(jobs.join(name), text).unwrap();
    }
    let catalog = Catalog::load(&repo().join("schemas"), &jobs).unwrap();
    (dir, catalog)
}

pub struct Harness {
    pub cluster: MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
    pub producer: BaseProducer,
    pub catalog: Arc<Catalog>,
    pub storage: Storage,
    pub clock: MockClock,
    pub speed: Arc<SpeedLayer>,
    pub archiver: Arc<ArchiverStats>,
    pub tasks: JoinSet<(ConsumerName, tandem_speed::Result<()>)>,
    pub shutdown: CancellationToken,
    pub produced: usize,
    pub data: tempfile::TempDir,
    _defs: tempfile::TempDir,
}

impl Harness {
    pub async fn start(extra_views: &[(&str, &str)], partitions: i32) -> Harness {
        let (defs, catalog) = definitions(extra_views);
        let catalog = Arc::new(catalog);
        let cluster = MockCluster::new(1).unwrap();
        cluster.create_topic(TOPIC, partitions, 1).unwrap();
        let brokers = cluster.bootstrap_servers();
        let producer: BaseProducer = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set("linger.ms", "1")
            .create()
            .unwrap();
        let data = tempfile::tempdir().unwrap();
        let storage =
            Storage::new(tandem_core::paths::Layout::local(data.path()).unwrap()).unwrap();
        let clock = MockClock::new(NOW_US);
        let dyn_clock: Arc<dyn Clock> = Arc::new(clock.clone());
        let kafka_config = KafkaConfig {
            max_batch: 2_000,
            batch_wait: Duration::from_millis(20),
            ..KafkaConfig::new(&brokers)
        };
        let shutdown = CancellationToken::new();
        // The consumers start as in production, with short flush intervals.
        let options = ConsumerOptions {
            archiver: ArchiverConfig {
                flush_interval: Duration::from_millis(300),
                flush_rows: 5_000,
                ..Default::default()
            },
            archive_tick: Duration::from_millis(100),
            speed_tick: Duration::from_millis(100),
            ..Default::default()
        };
        let consumers = tandem_speed::start(
            &catalog,
            &storage,
            &kafka_config,
            Arc::clone(&dyn_clock),
            &shutdown,
            &options,
        )
        .await
        .unwrap();
        let speed = Arc::clone(consumers.speed.get("app_events").unwrap());
        let archiver_stats = Arc::clone(&consumers.archiver_stats["app_events"]);
        let tasks = consumers.tasks;
        Harness {
            cluster,
            producer,
            catalog,
            storage,
            clock,
            speed,
            archiver: archiver_stats,
            tasks,
            shutdown,
            produced: 0,
            data,
            _defs: defs,
        }
    }

    /// Produces raw payloads (keyed so that a device's events share a partition).
    pub fn produce_raw(&mut self, records: &[(String, Vec<u8>)]) {
        for (key, payload) in records {
            let mut rec = BaseRecord::to(TOPIC)
                .key(key.as_str())
                .payload(payload.as_slice());
            loop {
                match self.producer.send(rec) {
                    Ok(()) => break,
                    Err((_, r)) => {
                        rec = r;
                        self.producer.poll(Duration::from_millis(10));
                    }
                }
            }
            self.producer.poll(Duration::ZERO);
        }
        self.producer.flush(Duration::from_secs(30)).unwrap();
        self.produced += records.len();
    }

    pub fn produce(&mut self, events: &[Event]) {
        let records: Vec<_> = events
            .iter()
            .map(|e| (e.device_id.clone(), e.to_json().into_bytes()))
            .collect();
        self.produce_raw(&records);
    }

    /// Waits until both consumers have seen every produced message.
    pub async fn settle(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let speed: i64 = self.speed.offsets().values().sum();
            let archived = self.archiver.archived.load(Ordering::Relaxed)
                + self.archiver.dead_lettered.load(Ordering::Relaxed);
            if speed as usize >= self.produced && archived as usize >= self.produced {
                return;
            }
            if let Some(r) = self.tasks.try_join_next() {
                panic!("a consumer stopped: {r:?}");
            }
            assert!(
                Instant::now() < deadline,
                "consumers did not catch up: speed {speed}, archive {archived}, produced {}",
                self.produced
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn batch(&self) -> BatchLayer {
        BatchLayer::new(
            self.storage.clone(),
            Arc::clone(&self.catalog),
            Arc::new(self.clock.clone()),
        )
    }

    /// Runs the batch layer over the closed days, once the archiver has said it is caught up
    /// (a day closes on the archiver's progress, not on the clock alone).
    pub async fn run_batch(&self) {
        let today = tandem_core::time::day_of(self.clock.now_us());
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.batch().first_open_day(TOPIC).await.unwrap() < today {
            assert!(
                Instant::now() < deadline,
                "the archiver never reported being caught up"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let reports = self
            .batch()
            .run(None, &RunRequest::default())
            .await
            .unwrap();
        assert!(reports.iter().all(|r| !r.days.is_empty()), "{reports:?}");
    }

    pub fn router(&self) -> axum::Router {
        self.router_with_auth(Default::default())
    }

    /// The API with these keys.
    pub fn router_with_auth(&self, auth: Arc<tandem_serving::auth::Auth>) -> axum::Router {
        router(AppState::from(Shared {
            catalog: Arc::clone(&self.catalog),
            batch: Arc::new(
                DeltaBatchViews::new(self.storage.clone()).with_refresh(Duration::ZERO),
            ),
            speed: Arc::clone(&self.speed) as _,
            clock: Arc::new(self.clock.clone()),
            metrics: Arc::new(ApiMetrics::default()),
            readiness: Default::default(),
            answers: Default::default(),
            auth,
            compute: None,
        }))
    }

    pub async fn get(&self, uri: &str) -> (StatusCode, Value) {
        let resp = self
            .router()
            .oneshot(Request::get(uri).body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = resp.status();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    /// GET `uri` with an `Accept` header; the status and the raw body.
    pub async fn get_bytes(&self, uri: &str, accept: &str) -> (StatusCode, Vec<u8>) {
        let resp = self
            .router()
            .oneshot(
                Request::get(uri)
                    .header("accept", accept)
                    .body(Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        let status = resp.status();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        (status, bytes.to_vec())
    }

    /// Every row of `view` at its own granularity, grouped by all its dimensions.
    pub async fn all_rows(&self, view: &str) -> Vec<Value> {
        let v = &self.catalog.views[view];
        let uri = format!(
            "/v1/views/{view}/query?from={}&to={}&group_by={}&limit=100000",
            format_us(NOW_US - 10 * DAY_US),
            format_us(NOW_US + DAY_US),
            v.dimensions.join(",")
        );
        let (status, body) = self.get(&uri).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["meta"]["truncated"], false);
        body["rows"].as_array().unwrap().clone()
    }

    pub async fn stop(mut self) {
        self.shutdown.cancel();
        while let Some(r) = self.tasks.join_next().await {
            let (name, result) = r.unwrap();
            result.unwrap_or_else(|e| panic!("the {name} failed: {e}"));
        }
    }
}

/// Exact aggregates of one group.
#[derive(Debug, Default, Clone)]
pub struct Truth {
    pub count: u64,
    /// Sum in millionths (the schema's decimal scale).
    pub revenue_units: i128,
    pub max_units: Option<i128>,
    pub devices: HashSet<String>,
}

pub type Key = (String, Vec<Option<String>>);

/// The reference views recomputed from the events: view -> (bucket, dims) -> truth.
pub fn oracle(events: &[Event]) -> BTreeMap<&'static str, HashMap<Key, Truth>> {
    let mut out: BTreeMap<&'static str, HashMap<Key, Truth>> = BTreeMap::new();
    for e in events {
        let hour = format_us(Granularity::Hour.floor(e.event_time));
        let day = format_us(Granularity::Day.floor(e.event_time));
        let s = |x: &str| Some(x.to_string());
        let mut add = |view: &'static str, key: Key| {
            let t = out.entry(view).or_default().entry(key).or_default();
            t.count += 1;
            if let Some(r) = e.revenue_usd {
                let units = (r * 1e6).round() as i128;
                t.revenue_units += units;
                t.max_units = Some(t.max_units.map_or(units, |m| m.max(units)));
            }
            t.devices.insert(e.device_id.clone());
        };
        if e.event_name == "install" {
            add(
                "installs_hourly",
                (
                    hour,
                    vec![
                        s(&e.app_id),
                        s(e.media_source),
                        e.campaign.clone(),
                        s(e.country),
                    ],
                ),
            );
        }
        if e.event_name == "purchase" {
            add(
                "purchases_daily",
                (day.clone(), vec![s(&e.app_id), s(e.country)]),
            );
        }
        add("active_devices_daily", (day, vec![s(&e.app_id)]));
    }
    out
}

/// A served row's key, in the view's dimension order.
pub fn row_key(row: &Value, dims: &[String]) -> Key {
    let bucket = row["bucket"].as_str().unwrap().to_string();
    let d = dims
        .iter()
        .map(|k| row["dims"][k].as_str().map(str::to_string))
        .collect();
    (bucket, d)
}

pub fn units(v: &Value) -> i128 {
    (v.as_f64().unwrap() * 1e6).round() as i128
}

pub fn within(estimate: f64, exact: usize, rse: f64, sigmas: f64) -> bool {
    let exact = exact as f64;
    (estimate - exact).abs() <= (sigmas * rse * exact).max(1.0)
}

pub fn repo_path(p: &str) -> PathBuf {
    repo().join(Path::new(p))
}
