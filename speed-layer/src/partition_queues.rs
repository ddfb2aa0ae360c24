//! The assigned partitions' fetched messages, each partition on a queue of its own, taken a
//! batch at a time.
//!
//! rust-rdkafka hands over one message per poll of the consumer's queue, and each poll reads
//! the clock three or four times and takes several locks: at a million messages a second that
//! was a fifth of the consuming core. So each assigned partition is split off the consumer's
//! queue (librdkafka's `rd_kafka_queue_get_partition` with no forward, done before the
//! partition is assigned, so no fetched message can take the other way) and its messages are
//! taken up to a batch at a time (`rd_kafka_consume_batch_queue`), paying those costs once a
//! batch. The consumer's queue keeps the group's own events (rebalances, errors, statistics),
//! served by rust-rdkafka as before. A revoked partition's queue is forwarded back to the
//! consumer's queue, where librdkafka discards the messages its unassignment made outdated.

#![allow(unsafe_code)]

use std::collections::BTreeMap;
use std::ffi::{c_void, CString};
use std::ptr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use rdkafka::bindings as rdsys;
use rdkafka::types::RDKafkaErrorCode;
use tokio::sync::Notify;

use crate::kafka::MessageBatch;

/// Most messages asked of librdkafka in one call.
const CHUNK: usize = 1024;

/// Called by librdkafka, under the queue's lock, when a split queue turns non-empty: it must
/// only wake the consumer loop.
unsafe extern "C" fn nonempty(_rk: *mut rdsys::rd_kafka_t, opaque: *mut c_void) {
    // SAFETY: `opaque` is `PartitionQueues::notify`, alive for as long as a queue has this
    // callback: `release` disables the callback before the handle goes, and the consumer loop
    // releases every handle before it drops the consumer (and with it the `PartitionQueues`).
    let notify = unsafe { &*(opaque as *const Notify) };
    notify.notify_one();
}

/// A handle on one partition's queue, owned (destroyed on release).
#[derive(Debug)]
struct Queue(*mut rdsys::rd_kafka_queue_t);

// SAFETY: librdkafka's queues are locked internally and may be used from any thread.
unsafe impl Send for Queue {}

/// The split queues of one consumer's assigned partitions.
#[derive(Debug)]
pub(crate) struct PartitionQueues {
    topic: CString,
    queues: Mutex<BTreeMap<i32, Queue>>,
    /// Woken when a queue turns non-empty (and by `split`, for what was already fetched).
    notify: Arc<Notify>,
    /// Which queue the next drain starts at, so a busy partition cannot starve the others.
    turn: AtomicUsize,
}

impl PartitionQueues {
    /// No queue split yet. A topic name with a NUL byte cannot be split (every partition then
    /// stays on the consumer's queue).
    pub(crate) fn new(topic: &str) -> Self {
        PartitionQueues {
            topic: CString::new(topic).unwrap_or_default(),
            queues: Mutex::new(BTreeMap::new()),
            notify: Arc::new(Notify::new()),
            turn: AtomicUsize::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<i32, Queue>> {
        self.queues.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Woken when a split queue has messages.
    pub(crate) fn notify(&self) -> &Notify {
        &self.notify
    }

    /// Splits `partition`'s fetched messages off the consumer's queue of `client`. Call it
    /// before the partition is assigned. False if librdkafka refused (the partition's messages
    /// then keep coming through the consumer's queue).
    pub(crate) fn split(&self, client: *mut rdsys::rd_kafka_t, partition: i32) -> bool {
        if self.topic.as_bytes().is_empty() || client.is_null() {
            return false;
        }
        // SAFETY: `client` is a live consumer handle (the caller's), `topic` a C string.
        let queue =
            unsafe { rdsys::rd_kafka_queue_get_partition(client, self.topic.as_ptr(), partition) };
        if queue.is_null() {
            return false;
        }
        // SAFETY: `queue` was just returned to us and is not destroyed before `release`;
        // `notify` outlives the callback (see `nonempty`).
        unsafe {
            rdsys::rd_kafka_queue_forward(queue, ptr::null_mut());
            rdsys::rd_kafka_queue_cb_event_enable(
                queue,
                Some(nonempty),
                Arc::as_ptr(&self.notify) as *mut c_void,
            );
        }
        let old = self.lock().insert(partition, Queue(queue));
        if let Some(old) = old {
            release(client, old);
        }
        // Messages may have been fetched before the callback was set.
        self.notify.notify_one();
        true
    }

    /// Hands `partitions` back to the consumer's queue of `client` (after they were revoked).
    pub(crate) fn unsplit(&self, client: *mut rdsys::rd_kafka_t, partitions: &[i32]) {
        let taken: Vec<Queue> = {
            let mut queues = self.lock();
            partitions.iter().filter_map(|p| queues.remove(p)).collect()
        };
        for q in taken {
            release(client, q);
        }
    }

    /// Hands every partition back to the consumer's queue of `client`.
    pub(crate) fn unsplit_all(&self, client: *mut rdsys::rd_kafka_t) {
        let taken = std::mem::take(&mut *self.lock());
        for q in taken.into_values() {
            release(client, q);
        }
    }

    /// Moves up to `room` fetched messages of the split queues into `batch` (each partition's
    /// in offset order), without waiting; true if `room` ran out before every queue was empty
    /// (drain again without waiting: a queue wakes the loop only once it was empty). A message
    /// that carries an error (a fetch failure librdkafka reports on the partition) is logged
    /// and skipped, as the consumer's queue's errors are.
    pub(crate) fn drain(&self, batch: &mut MessageBatch, room: usize) -> bool {
        let queues = self.lock();
        if queues.is_empty() || room == 0 {
            return !queues.is_empty();
        }
        let start = self.turn.fetch_add(1, Ordering::Relaxed) % queues.len();
        let mut taken = 0;
        let mut buf = [ptr::null_mut::<rdsys::rd_kafka_message_t>(); CHUNK];
        let order = queues
            .values()
            .skip(start)
            .chain(queues.values().take(start));
        for q in order {
            loop {
                let want = (room - taken).min(CHUNK);
                if want == 0 {
                    return true;
                }
                // SAFETY: `q.0` is a live queue handle; `buf` has room for `want` pointers.
                let n =
                    unsafe { rdsys::rd_kafka_consume_batch_queue(q.0, 0, buf.as_mut_ptr(), want) };
                let Ok(n) = usize::try_from(n) else {
                    break;
                };
                for &m in &buf[..n] {
                    // SAFETY: librdkafka returned `n` valid messages, each ours to destroy
                    // (once, below, after the last use of its payload).
                    let msg = unsafe { &*m };
                    if msg.err == rdsys::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
                        let payload = (!msg.payload.is_null()).then(|| {
                            // SAFETY: a message's payload is `len` bytes, valid until it is
                            // destroyed; `push` copies them.
                            unsafe { std::slice::from_raw_parts(msg.payload as *const u8, msg.len) }
                        });
                        let mut kind =
                            rdsys::rd_kafka_timestamp_type_t::RD_KAFKA_TIMESTAMP_NOT_AVAILABLE;
                        // SAFETY: `m` is a valid message.
                        let ts = unsafe { rdsys::rd_kafka_message_timestamp(m, &mut kind) };
                        let ts = (kind
                            != rdsys::rd_kafka_timestamp_type_t::RD_KAFKA_TIMESTAMP_NOT_AVAILABLE
                            && ts != -1)
                            .then_some(ts);
                        batch.push(msg.partition, msg.offset, ts, payload);
                        taken += 1;
                    } else {
                        tracing::warn!(
                            partition = msg.partition,
                            error = %RDKafkaErrorCode::from(msg.err),
                            "kafka fetch failed"
                        );
                    }
                    // SAFETY: see above; not used after this.
                    unsafe { rdsys::rd_kafka_message_destroy(m) };
                }
                if n < want {
                    break;
                }
            }
        }
        false
    }
}

/// Stops `queue`'s callback, forwards what it holds (and anything fetched later) back to the
/// consumer's queue of `client`, and destroys the handle.
fn release(client: *mut rdsys::rd_kafka_t, queue: Queue) {
    // SAFETY: `queue.0` is a live handle that nothing else uses after this; `client` is the
    // live client it belongs to; the consumer queue's handle is destroyed after forwarding
    // (the forward keeps its own reference).
    unsafe {
        rdsys::rd_kafka_queue_cb_event_enable(queue.0, None, ptr::null_mut());
        let consumer = rdsys::rd_kafka_queue_get_consumer(client);
        rdsys::rd_kafka_queue_forward(queue.0, consumer);
        if !consumer.is_null() {
            rdsys::rd_kafka_queue_destroy(consumer);
        }
        rdsys::rd_kafka_queue_destroy(queue.0);
    }
}
