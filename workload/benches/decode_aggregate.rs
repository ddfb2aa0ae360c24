//! Decode and decode+aggregate throughput of the speed layer on the reference events, without
//! Kafka. Run with `cargo bench -p tandem-workload`; `tandem bench` measures the same and also
//! runs the Python peer on the same events for the ratio.
//!
//! TANDEM_BENCH_EVENTS sets the number of events (default 1,000,000).

use std::path::PathBuf;

use tandem_core::Catalog;
use tandem_workload::bench::{decode_aggregate, reference_payloads};

fn main() {
    let n: usize = std::env::var("TANDEM_BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let catalog = Catalog::load(&root.join("schemas"), &root.join("jobs")).expect("definitions");
    let payloads = reference_payloads(n, 42);
    let r = decode_aggregate(&catalog, "app_events", &payloads, 3).expect("benchmark");
    println!(
        "reference events: {} ({:.0} MB of JSON)",
        r.events,
        r.bytes as f64 / 1e6
    );
    println!(
        "decode:             {:>10.0} events/s",
        r.decode_events_per_s()
    );
    println!(
        "decode + aggregate: {:>10.0} events/s  ({} views, one core)",
        r.aggregate_events_per_s(),
        r.views
    );
}
