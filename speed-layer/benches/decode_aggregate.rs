//! Decode and decode+aggregate throughput of the speed layer on the reference events, without
//! Kafka. Run with `cargo bench -p tandem-speed`. Prints events/s; with `python3` on the PATH it
//! also runs the Python peer's parse+aggregate loop (`bench/python_parse_aggregate.py`, the
//! inner loop of shared/bench/speed_consumer_ck.py) on the same events and prints the ratio.
//!
//! TANDEM_BENCH_EVENTS sets the number of events (default 1,000,000).

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use tandem_core::decode::{Decoder, Message};
use tandem_core::gen::{GenConfig, Generator};
use tandem_core::time::{Clock, SystemClock};
use tandem_core::view::DAY_US;
use tandem_core::Catalog;
use tandem_speed::SpeedLayer;

const CHUNK: usize = 10_000;
const PARTITIONS: usize = 4;

fn main() {
    let n: usize = std::env::var("TANDEM_BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let catalog = Catalog::load(&root.join("schemas"), &root.join("jobs")).expect("definitions");
    let schema = Arc::clone(&catalog.schemas["app_events"]);
    let now = SystemClock.now_us();
    let payloads: Vec<String> = Generator::new(GenConfig::default())
        .history(n, now - 3 * DAY_US, now)
        .map(|e| e.to_json())
        .collect();
    let bytes: usize = payloads.iter().map(String::len).sum();
    // Messages as a consumer sees them: partition by position, offsets per partition.
    let messages: Vec<Message<'_>> = payloads
        .iter()
        .enumerate()
        .map(|(i, p)| Message {
            payload: Some(p.as_bytes()),
            partition: (i % PARTITIONS) as i32,
            offset: (i / PARTITIONS) as i64,
            timestamp_ms: None,
        })
        .collect();
    let mut by_partition: Vec<Vec<Message<'_>>> = vec![Vec::new(); PARTITIONS];
    for m in &messages {
        by_partition[m.partition as usize].push(*m);
    }
    println!(
        "reference events: {n} ({:.0} MB of JSON, {:.0} bytes each)",
        bytes as f64 / 1e6,
        bytes as f64 / n as f64
    );

    let decoder = Decoder::new(Arc::clone(&schema));
    let best = |f: &dyn Fn() -> usize| -> f64 {
        (0..3)
            .map(|_| {
                let t = Instant::now();
                let rows = f();
                assert_eq!(rows, n);
                t.elapsed().as_secs_f64()
            })
            .fold(f64::INFINITY, f64::min)
    };
    let decode = best(&|| {
        messages
            .chunks(CHUNK)
            .map(|c| decoder.decode(c, now).expect("decode").batch.num_rows())
            .sum()
    });
    println!(
        "decode:             {:>10.0} events/s  {:>6.0} MB/s",
        n as f64 / decode,
        bytes as f64 / decode / 1e6
    );

    let views = catalog.views.len();
    let aggregate = best(&|| {
        let layer =
            SpeedLayer::new(&catalog, "app_events", Arc::new(SystemClock)).expect("speed layer");
        for (p, msgs) in by_partition.iter().enumerate() {
            for c in msgs.chunks(CHUNK) {
                layer.apply(p as i32, c).expect("apply");
            }
        }
        layer
            .stats
            .events
            .load(std::sync::atomic::Ordering::Relaxed) as usize
    });
    println!(
        "decode + aggregate: {:>10.0} events/s  ({views} reference views, one core)",
        n as f64 / aggregate
    );

    let file = std::env::temp_dir().join("tandem-bench-events.jsonl");
    let mut w = std::io::BufWriter::new(std::fs::File::create(&file).expect("temp file"));
    for p in &payloads {
        writeln!(w, "{p}").expect("write");
    }
    w.flush().expect("flush");
    drop(w);
    let script = root.join("bench/python_parse_aggregate.py");
    match std::process::Command::new("python3")
        .arg(&script)
        .arg(&file)
        .output()
    {
        Ok(out) if out.status.success() => {
            let text = String::from_utf8_lossy(&out.stdout);
            let peer: f64 = text
                .split_whitespace()
                .next()
                .and_then(|v| v.parse().ok())
                .unwrap_or(f64::NAN);
            println!("python json+dict peer: {peer:>7.0} events/s  (same events, same machine)");
            println!(
                "ratio decode+aggregate / peer: {:.1}x",
                n as f64 / aggregate / peer
            );
        }
        Ok(out) => println!(
            "python peer failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(e) => println!("python peer not run: {e}"),
    }
    let _ = std::fs::remove_file(&file);
}
