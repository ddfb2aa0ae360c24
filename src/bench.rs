//! `tandem bench`: decode and decode+aggregate throughput of the speed layer on the reference
//! events, and the Python peer's parse+aggregate loop on the same events, in the same run, so
//! the number comes with its ratio.

use std::io::Write;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use tandem_workload::bench::{checkpoint, decode_aggregate, reference_payloads};

use crate::config::Config;
use crate::roles::catalog;

/// The inner loop of `shared/bench/speed_consumer_ck.py` on a file instead of a topic.
const PYTHON_PEER: &str = include_str!("../bench/python_parse_aggregate.py");

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Number of reference events.
    #[arg(long, default_value_t = 1_000_000)]
    pub events: usize,
    /// Rounds; the best is reported.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Seed of the generated events.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// The Python interpreter of the peer; `none` skips the peer.
    #[arg(long, default_value = "python3")]
    pub python: String,
    /// Also time a checkpoint of the aggregated state and its restore (to a local directory).
    #[arg(long)]
    pub checkpoint: bool,
    /// Print the figures as one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Time a consumer end to end from a real broker (`--brokers`) instead: `archive` (into a
    /// fresh master dataset) or `speed` (aggregating every view, checkpointing), on one runtime
    /// thread, next to a consumer that only counts the same messages.
    #[arg(long, value_enum)]
    pub consume: Option<crate::bench_broker::Consumed>,
    /// With --consume: partitions of the benchmark's topic.
    #[arg(long, default_value_t = 1)]
    pub partitions: i32,
    /// With --consume: the shared benchmarks' Python consumer (`speed_consumer_ck.py`), run on
    /// the same topic with --python.
    #[arg(long)]
    pub python_consumer: Option<std::path::PathBuf>,
    /// With --consume: produce the first --events lines of this JSON-lines file (such as
    /// `gen_events.py --jsonl`'s, which the Python consumer expects) instead of generated events.
    #[arg(long)]
    pub jsonl: Option<std::path::PathBuf>,
}

pub async fn run(config: &Config, args: BenchArgs) -> Result<()> {
    if args.events == 0 {
        bail!("--events must be at least 1");
    }
    if let Some(consumer) = args.consume {
        let settings = crate::bench_broker::Settings {
            consumer,
            events: args.events,
            partitions: args.partitions,
            seed: args.seed,
            python_peer: args.python_consumer.map(|p| (args.python.clone(), p)),
            jsonl: args.jsonl,
        };
        let r = crate::bench_broker::run(config, settings).await?;
        if args.json {
            println!("{}", serde_json::to_string(&r)?);
            return Ok(());
        }
        println!(
            "reference events:   {:>10} ({:.0} MB of JSON) on {} partition(s)",
            r.events,
            r.json_bytes as f64 / 1e6,
            r.partitions
        );
        println!(
            "produce:            {:>10.0} events/s",
            r.produce_events_per_s
        );
        println!(
            "raw consume:        {:>10.0} events/s  (the same client, counting only)",
            r.raw_consume_events_per_s
        );
        if let Some(p) = r.python_peer_events_per_s {
            println!("python consumer:    {p:>10.0} events/s  (speed_consumer_ck.py --mode agg)");
        }
        let what = match (r.commits, r.state_keys) {
            (Some(c), _) => format!(
                "{c} commits, {} files, {:.0} MB of Parquet",
                r.master_files.unwrap_or_default(),
                r.master_bytes.unwrap_or_default() as f64 / 1e6
            ),
            (_, Some(k)) => format!(
                "{k} state keys, {:.0} MB",
                r.state_bytes.unwrap_or_default() as f64 / 1e6
            ),
            _ => String::new(),
        };
        println!(
            "{:<20}{:>10.0} events/s  ({what})",
            format!("{:?}:", r.consumer).to_lowercase(),
            r.events_per_s
        );
        println!("ratio to raw:       {:>10.2}x", r.ratio_to_raw);
        if let Some(x) = r.ratio_to_python_peer {
            println!("ratio to python:    {x:>10.1}x");
        }
        return Ok(());
    }
    let catalog = catalog(config)?;
    let schema = catalog
        .schemas
        .keys()
        .next()
        .context("no schema defined")?
        .clone();
    let t = Instant::now();
    let payloads = reference_payloads(args.events, args.seed);
    eprintln!(
        "generated {} reference events in {:.1}s",
        payloads.len(),
        t.elapsed().as_secs_f64()
    );
    let with_checkpoint = args.checkpoint;
    let (payloads, r, ck) = tokio::task::spawn_blocking(move || {
        let r = decode_aggregate(&catalog, &schema, &payloads, args.rounds);
        let ck = with_checkpoint.then(|| checkpoint(&catalog, &schema, &payloads));
        (payloads, r, ck)
    })
    .await?;
    let r = r?;
    let ck = ck.transpose()?;
    if args.json {
        let peer = match args.python.as_str() {
            "none" => None,
            python => python_peer(python, &payloads).ok(),
        };
        let mut out = serde_json::json!({
            "events": r.events,
            "json_bytes": r.bytes,
            "views": r.views,
            "decode_events_per_s": r.decode_events_per_s(),
            "decode_aggregate_events_per_s": r.aggregate_events_per_s(),
            "python_peer_events_per_s": peer,
            "ratio_to_python_peer": peer.map(|p| r.aggregate_events_per_s() / p),
        });
        if let Some(c) = &ck {
            out["checkpoint"] = serde_json::json!({
                "keys": c.keys,
                "state_bytes": c.state_bytes,
                "state_bytes_per_key": c.state_bytes as f64 / c.keys.max(1) as f64,
                "checkpoint_bytes": c.checkpoint_bytes,
                "checkpoint_bytes_per_key": c.checkpoint_bytes as f64 / c.keys.max(1) as f64,
                "checkpoint_seconds": c.checkpoint_s,
                "restore_seconds": c.restore_s,
            });
        }
        println!("{out}");
        return Ok(());
    }
    if let Some(c) = &ck {
        println!(
            "speed state:        {:>10} keys, {:.0} MB in memory ({:.0} bytes a key)",
            c.keys,
            c.state_bytes as f64 / 1e6,
            c.state_bytes as f64 / c.keys.max(1) as f64
        );
        println!(
            "checkpoint:         {:>10.2} s to encode and write {:.0} MB ({:.0} bytes a key); restore {:.2} s",
            c.checkpoint_s,
            c.checkpoint_bytes as f64 / 1e6,
            c.checkpoint_bytes as f64 / c.keys.max(1) as f64,
            c.restore_s
        );
    }
    println!(
        "reference events:   {:>10} ({:.0} MB of JSON, {:.0} bytes each)",
        r.events,
        r.bytes as f64 / 1e6,
        r.bytes as f64 / r.events as f64
    );
    println!(
        "decode:             {:>10.0} events/s  {:>6.0} MB/s",
        r.decode_events_per_s(),
        r.bytes as f64 / r.decode_s / 1e6
    );
    println!(
        "decode + aggregate: {:>10.0} events/s  ({} views, one core, best of {})",
        r.aggregate_events_per_s(),
        r.views,
        args.rounds.max(1)
    );
    if args.python == "none" {
        return Ok(());
    }
    match python_peer(&args.python, &payloads) {
        Ok(peer) => {
            println!(
                "python peer:        {peer:>10.0} events/s  (json.loads + dicts, same events)"
            );
            println!(
                "ratio:              {:>10.1}x  (decode + aggregate / python peer)",
                r.aggregate_events_per_s() / peer
            );
        }
        Err(e) => println!("python peer not run: {e:#}"),
    }
    Ok(())
}

/// Runs the Python peer on `payloads` written as JSON lines; its events/s.
fn python_peer(python: &str, payloads: &[String]) -> Result<f64> {
    let dir = tempfile::tempdir()?;
    let events = dir.path().join("events.jsonl");
    let script = dir.path().join("python_parse_aggregate.py");
    std::fs::write(&script, PYTHON_PEER)?;
    let mut w = std::io::BufWriter::new(std::fs::File::create(&events)?);
    for p in payloads {
        writeln!(w, "{p}")?;
    }
    w.flush()?;
    drop(w);
    let out = std::process::Command::new(python)
        .arg(&script)
        .arg(&events)
        .output()
        .with_context(|| format!("starting {python}"))?;
    if !out.status.success() {
        bail!("{}", String::from_utf8_lossy(&out.stderr).trim());
    }
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("unexpected peer output: {text}"))
}
