//! `tandem replay --group speed|archive --from-time T`: rewinds a consumer group to the
//! offsets of a time (Kafka's offsets-for-times), with every instance of the group stopped.
//!
//! The speed layer resumes from its checkpoints, not from the group's offsets, so its rewind
//! rewrites each partition's checkpoint: every view's buckets from T on are discarded and the
//! partition resumes at the offset for the earliest of those buckets' starts; offsets it had
//! already applied count again only in the discarded buckets, so nothing doubles. The
//! archiver's group is simply moved back: the master dataset's transaction ids skip what it
//! already holds.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use tandem_core::storage::Storage;
use tandem_core::time::parse_instant;
use tandem_speed::{CheckpointStore, SpeedLayer};

use crate::config::Config;
use crate::roles::{catalog, clock};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Group {
    Speed,
    Archive,
}

#[derive(Debug, Args)]
pub struct ReplayArgs {
    /// Which consumer group to rewind.
    #[arg(long, value_enum)]
    pub group: Group,
    /// The time to replay from (RFC 3339 or YYYY-MM-DD, UTC).
    #[arg(long)]
    pub from_time: String,
    /// The event schema whose topic to rewind (default: every schema).
    #[arg(long)]
    pub schema: Option<String>,
}

const TIMEOUT: Duration = Duration::from_secs(10);

pub async fn run(config: &Config, args: ReplayArgs) -> Result<()> {
    let from_us = parse_instant(&args.from_time)
        .with_context(|| format!("--from-time `{}`", args.from_time))?;
    let catalog = catalog(config)?;
    let kafka = config.kafka()?;
    let group = match args.group {
        Group::Speed => "speed",
        Group::Archive => "archive",
    };
    let schemas: Vec<String> = match &args.schema {
        Some(s) if catalog.schemas.contains_key(s) => vec![s.clone()],
        Some(s) => bail!("--schema: no schema `{s}`"),
        None => catalog.schemas.keys().cloned().collect(),
    };
    let consumer: BaseConsumer = kafka
        .client_config(group)
        .create()
        .context("creating a Kafka client")?;
    let group_id = format!("{}-{group}", kafka.group_prefix);
    match consumer.fetch_group_list(Some(&group_id), TIMEOUT) {
        Ok(groups) => {
            if let Some(g) = groups.groups().iter().find(|g| !g.members().is_empty()) {
                bail!(
                    "group `{group_id}` has {} active member(s); stop every instance that consumes it (`tandem run`, `tandem {}`) before replaying",
                    g.members().len(),
                    if args.group == Group::Speed { "speed" } else { "archive" }
                );
            }
        }
        // Some brokers (librdkafka's mock cluster among them) do not list groups. A speed
        // instance still running is fenced by the rewind's claim and drops the partitions.
        Err(e) => tracing::warn!(
            group = %group_id,
            error = %e,
            "cannot check that the group has no active member; stop its instances before replaying"
        ),
    }
    let storage = Storage::new(config.layout.clone())?;
    for schema in schemas {
        let topic = &catalog.schemas[&schema].topic;
        let metadata = consumer
            .fetch_metadata(Some(topic), TIMEOUT)
            .with_context(|| format!("reading the metadata of topic `{topic}`"))?;
        let partitions: Vec<i32> = metadata
            .topics()
            .iter()
            .flat_map(|t| t.partitions().iter().map(|p| p.id()))
            .collect();
        if partitions.is_empty() {
            bail!("topic `{topic}` has no partitions (does it exist?)");
        }
        let layer = SpeedLayer::new(&catalog, &schema, clock())?.with_checkpoints(
            CheckpointStore::new(storage.objects()?, &schema, config.checkpoint_keep),
        );
        // The speed layer must re-read every event of the buckets it discards: from the
        // earliest cutoff of its views.
        let cutoffs = layer.cutoffs(from_us);
        let since_us = match args.group {
            Group::Speed => cutoffs.iter().copied().min().unwrap_or(from_us),
            Group::Archive => from_us,
        };
        let mut wanted = TopicPartitionList::new();
        for &p in &partitions {
            wanted.add_partition_offset(topic, p, Offset::Offset(since_us / 1000))?;
        }
        let found = consumer
            .offsets_for_times(wanted, TIMEOUT)
            .context("asking the broker for the offsets of that time")?;
        let mut commit = TopicPartitionList::new();
        for e in found.elements() {
            let p = e.partition();
            let offset = match e.offset() {
                Offset::Offset(o) if o >= 0 => o,
                // Nothing that late, says the broker; but some brokers (librdkafka's mock
                // cluster) do not search by time: read the timestamps to be sure.
                _ => offset_by_reading(&kafka, topic, p, since_us / 1000)?,
            };
            commit.add_partition_offset(topic, p, Offset::Offset(offset))?;
            match args.group {
                Group::Speed => match layer.rewind(p, &cutoffs, offset).await? {
                    Some((held, discarded)) => println!(
                        "{topic}/{p}: speed state rewound from offset {held} to {offset}; {discarded} groups discarded and counted again"
                    ),
                    None => println!("{topic}/{p}: nothing to rewind (the state holds nothing from then)"),
                },
                Group::Archive => println!("{topic}/{p}: archive group moved to offset {offset}"),
            }
        }
        match (consumer.commit(&commit, CommitMode::Sync), args.group) {
            (Ok(()), _) => {}
            // The speed layer resumes from its checkpoints; its group's offsets only report.
            (Err(e), Group::Speed) => {
                tracing::warn!(error = %e, "the speed group's offsets were not moved (they only report progress)")
            }
            (Err(e), Group::Archive) => {
                return Err(e).context("committing the archive group's new offsets")
            }
        }
    }
    Ok(())
}

/// The first offset of `partition` whose broker timestamp is at or after `ms` (its end if
/// none is), by reading messages' timestamps: a binary search, for brokers that cannot answer
/// offsets-for-times. Timestamps grow with offsets (append order).
fn offset_by_reading(
    kafka: &tandem_speed::KafkaConfig,
    topic: &str,
    partition: i32,
    ms: i64,
) -> Result<i64> {
    let mut config = rdkafka::ClientConfig::new();
    config
        .set("bootstrap.servers", &kafka.brokers)
        // Assigned, never subscribed nor committed: the group is only a name librdkafka wants.
        .set("group.id", format!("{}-replay-probe", kafka.group_prefix))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false");
    for (k, v) in &kafka.extra {
        config.set(k, v);
    }
    let probe: BaseConsumer = config.create().context("creating a Kafka client")?;
    let (mut lo, mut hi) = probe.fetch_watermarks(topic, partition, TIMEOUT)?;
    let end = hi;
    let timestamp_at = |offset: i64| -> Result<i64> {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, partition, Offset::Offset(offset))?;
        probe.assign(&tpl)?;
        let deadline = std::time::Instant::now() + TIMEOUT;
        loop {
            if let Some(m) = probe.poll(Duration::from_millis(200)) {
                let m = m?;
                use rdkafka::Message as _;
                if m.offset() >= offset {
                    return m.timestamp().to_millis().with_context(|| {
                        format!("{topic}/{partition} offset {} has no timestamp", m.offset())
                    });
                }
            }
            if std::time::Instant::now() > deadline {
                bail!("{topic}/{partition}: offset {offset} could not be read");
            }
        }
    };
    if lo >= hi || timestamp_at(hi - 1)? < ms {
        return Ok(end);
    }
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if timestamp_at(mid)? >= ms {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    Ok(lo)
}
