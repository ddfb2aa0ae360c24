//! tandem-speed: everything that consumes Kafka.
//!
//! Two consumer groups read each event topic. The [`archiver`] writes every valid event into
//! the master dataset (a Delta table partitioned by event day) and every rejected message into
//! the dead-letter table, exactly once, with the Kafka offsets stored in the same commits
//! (through core's `MasterWriter`). The [`speed`] aggregation keeps every view of the topic's
//! schema per Kafka partition, for the buckets no batch covers yet, and answers the serving
//! layer through core's `RealtimeView`. [`kafka`] holds the consumer loop both share;
//! [`aggregate`] is a view compiled for incremental, per-batch application; [`consumers`]
//! starts them all, for production and tests alike.

pub mod aggregate;
pub mod archiver;
pub mod checkpoint;
pub mod consumers;
pub mod dedup;
pub mod error;
pub mod kafka;
mod partition_queues;
pub mod speed;

#[cfg(test)]
mod archiver_tests;
#[cfg(test)]
mod kafka_tests;
#[cfg(test)]
mod tests;

pub use archiver::{Archiver, ArchiverConfig, ArchiverStats};
pub use checkpoint::CheckpointStore;
pub use consumers::{start, ConsumerName, ConsumerOptions, Consumers};
pub use error::{Result, SpeedError};
pub use kafka::KafkaConfig;
pub use speed::{SpeedLayer, SpeedLayers, SpeedSink};
