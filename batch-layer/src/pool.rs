//! The memory pool of a recompute under a memory limit: DataFusion's [`FairSpillPool`] for
//! the operators that spill (aggregates, sorts), with repartitioning's in-flight batches
//! counted but never refused.
//!
//! DataFusion 55 answers a refused repartition reservation by writing the batch to a spill
//! file that the receiving partition reads back in order; when two input partitions spill
//! at once, the reader waits on the older file for a batch that is in the newer one, and
//! every worker parks for good (apache/datafusion#24883, fixed after 55.2). Repartitioning
//! holds a bounded number of batches per channel (its senders wait while every channel
//! has data), so leaving it out of the fair shares keeps the limit's meaning for the
//! operators that hold a query's working set, and no query waits forever.

use std::fmt::{Display, Formatter};
use std::sync::atomic::{AtomicUsize, Ordering};

use datafusion::common::Result;
use datafusion::execution::memory_pool::{
    FairSpillPool, MemoryConsumer, MemoryLimit, MemoryPool, MemoryReservation,
};

/// [`FairSpillPool`] of `limit` bytes, repartitioning's buffers counted beside it.
#[derive(Debug)]
pub(crate) struct BatchPool {
    fair: FairSpillPool,
    /// Bytes of repartitioned batches in flight.
    exchanged: AtomicUsize,
}

impl BatchPool {
    pub(crate) fn new(limit: usize) -> Self {
        BatchPool {
            fair: FairSpillPool::new(limit),
            exchanged: AtomicUsize::new(0),
        }
    }
}

/// Whether the consumer holds repartitioning's in-flight batches.
fn exchanges(consumer: &MemoryConsumer) -> bool {
    consumer.name().starts_with("RepartitionExec")
}

impl MemoryPool for BatchPool {
    fn name(&self) -> &str {
        "tandem-batch"
    }

    fn register(&self, consumer: &MemoryConsumer) {
        if !exchanges(consumer) {
            self.fair.register(consumer);
        }
    }

    fn unregister(&self, consumer: &MemoryConsumer) {
        if !exchanges(consumer) {
            self.fair.unregister(consumer);
        }
    }

    fn grow(&self, reservation: &MemoryReservation, additional: usize) {
        match exchanges(reservation.consumer()) {
            true => {
                self.exchanged.fetch_add(additional, Ordering::Relaxed);
            }
            false => self.fair.grow(reservation, additional),
        }
    }

    fn shrink(&self, reservation: &MemoryReservation, shrink: usize) {
        match exchanges(reservation.consumer()) {
            true => {
                self.exchanged.fetch_sub(shrink, Ordering::Relaxed);
            }
            false => self.fair.shrink(reservation, shrink),
        }
    }

    fn try_grow(&self, reservation: &MemoryReservation, additional: usize) -> Result<()> {
        match exchanges(reservation.consumer()) {
            true => {
                self.grow(reservation, additional);
                Ok(())
            }
            false => self.fair.try_grow(reservation, additional),
        }
    }

    fn reserved(&self) -> usize {
        self.fair.reserved() + self.exchanged.load(Ordering::Relaxed)
    }

    fn memory_limit(&self) -> MemoryLimit {
        self.fair.memory_limit()
    }
}

impl Display for BatchPool {
    fn fmt(&self, f: &mut Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} over {}", self.name(), self.fair)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn repartition_buffers_are_counted_never_refused_and_others_keep_the_limit() {
        let pool: Arc<dyn MemoryPool> = Arc::new(BatchPool::new(1000));
        let exchange = MemoryConsumer::new("RepartitionExec[0]")
            .with_can_spill(true)
            .register(&pool);
        let aggregate = MemoryConsumer::new("GroupedHashAggregateStream[0]")
            .with_can_spill(true)
            .register(&pool);
        exchange.try_grow(5000).unwrap();
        assert_eq!(pool.reserved(), 5000);
        // The aggregate alone is the one spiller: the whole limit is its share.
        aggregate.try_grow(900).unwrap();
        assert!(aggregate.try_grow(200).is_err());
        assert_eq!(pool.reserved(), 5900);
        exchange.shrink(5000);
        drop(aggregate);
        assert_eq!(pool.reserved(), 0);
    }
}
