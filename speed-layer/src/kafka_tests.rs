//! The consumer loop against librdkafka's mock cluster: each partition's messages are taken
//! off their own queue, and every offset reaches exactly one owner, in order, with its payload
//! and timestamp, while members join and leave.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientConfig, Offset};
use tokio_util::sync::CancellationToken;

use crate::error::Result;
use crate::kafka::{run, BatchSink, KafkaConfig, MessageBatch, Rebalance};

const TOPIC: &str = "events";
const PARTITIONS: i32 = 4;
/// The first message's timestamp; each partition's `i`-th message is `i` ms later.
const T0: i64 = 1_795_000_000_000;

/// What the members share: each partition's next offset (their checkpoint) and every message
/// an owner took, in the order taken.
#[derive(Debug, Default)]
struct Shared {
    next: Mutex<BTreeMap<i32, i64>>,
    taken: Mutex<Vec<Taken>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Taken {
    partition: i32,
    offset: i64,
    payload: Option<String>,
    timestamp_ms: Option<i64>,
    member: &'static str,
}

/// One consumer of the group: resumes an assigned partition at the shared next offset, and
/// takes only the messages of partitions it owns.
#[derive(Debug)]
struct Member {
    name: &'static str,
    shared: Arc<Shared>,
    owned: Mutex<BTreeSet<i32>>,
}

impl Rebalance for Member {
    fn assigned(&self, partition: i32) -> BoxFuture<'_, Result<Offset>> {
        Box::pin(async move {
            self.owned.lock().unwrap().insert(partition);
            let next = self.shared.next.lock().unwrap().get(&partition).copied();
            Ok(next.map_or(Offset::Beginning, Offset::Offset))
        })
    }

    fn revoked(&self, partition: i32, _lost: bool) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            self.owned.lock().unwrap().remove(&partition);
        })
    }
}

struct Sink(Arc<Member>);

impl BatchSink for Sink {
    async fn handle(&mut self, batch: &MessageBatch) -> Result<Vec<(i32, i64)>> {
        let owned = self.0.owned.lock().unwrap().clone();
        let mut next = self.0.shared.next.lock().unwrap();
        let mut taken = self.0.shared.taken.lock().unwrap();
        for (partition, messages) in batch.by_partition() {
            if !owned.contains(&partition) {
                continue;
            }
            for m in messages {
                taken.push(Taken {
                    partition,
                    offset: m.offset,
                    payload: m.payload.map(|p| String::from_utf8_lossy(p).into_owned()),
                    timestamp_ms: m.timestamp_ms,
                    member: self.0.name,
                });
                next.insert(partition, m.offset + 1);
            }
        }
        Ok(Vec::new())
    }

    async fn flush(&mut self, _final_flush: bool) -> Result<Vec<(i32, i64)>> {
        Ok(Vec::new())
    }

    fn rebalance(&self) -> Option<Arc<dyn Rebalance>> {
        Some(self.0.clone())
    }
}

/// Sends `n` messages round the partitions; the `i`-th of partition `p` says `p:i`.
fn produce(producer: &BaseProducer, sent: &mut BTreeMap<i32, i64>, n: usize) {
    for k in 0..n {
        let p = (k % PARTITIONS as usize) as i32;
        let i = *sent.entry(p).or_default();
        let payload = format!("{p}:{i}");
        let mut record = BaseRecord::<(), _>::to(TOPIC)
            .partition(p)
            .payload(&payload)
            .timestamp(T0 + i);
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((e, r)) if e.rdkafka_error_code() == Some(RDKafkaErrorCode::QueueFull) => {
                    producer.poll(Duration::from_millis(10));
                    record = r;
                }
                Err((e, _)) => panic!("produce failed: {e}"),
            }
        }
        sent.insert(p, i + 1);
    }
    producer.flush(Duration::from_secs(30)).unwrap();
}

async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    while !done() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn member(name: &'static str, shared: &Arc<Shared>) -> Arc<Member> {
    Arc::new(Member {
        name,
        shared: shared.clone(),
        owned: Mutex::new(BTreeSet::new()),
    })
}

fn start(
    config: &KafkaConfig,
    member: &Arc<Member>,
) -> (CancellationToken, tokio::task::JoinHandle<Result<()>>) {
    let token = CancellationToken::new();
    let (config, mut sink, t) = (config.clone(), Sink(member.clone()), token.clone());
    let task = tokio::spawn(async move {
        run(
            &config,
            "split",
            TOPIC,
            &mut sink,
            Duration::from_millis(100),
            t,
        )
        .await
    });
    (token, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_offset_reaches_one_owner_in_order_as_members_join_and_leave() {
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic(TOPIC, PARTITIONS, 1).unwrap();
    let brokers = cluster.bootstrap_servers();
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()
        .unwrap();
    let mut config = KafkaConfig::new(&brokers);
    // Small batches, so most drains fill one and leave messages for the next.
    config.max_batch = 300;
    config.batch_wait = Duration::from_millis(20);
    let shared = Arc::new(Shared::default());
    let count = |shared: &Shared| shared.taken.lock().unwrap().len();
    let mut sent = BTreeMap::new();

    let a = member("a", &shared);
    let (stop_a, task_a) = start(&config, &a);
    produce(&producer, &mut sent, 6_000);
    wait_for("a to take the first messages", || count(&shared) == 6_000).await;

    let b = member("b", &shared);
    let (stop_b, task_b) = start(&config, &b);
    wait_for("b to be assigned partitions", || {
        let (na, nb) = (a.owned.lock().unwrap().len(), b.owned.lock().unwrap().len());
        nb > 0 && na + nb == PARTITIONS as usize
    })
    .await;
    produce(&producer, &mut sent, 6_000);
    wait_for("a and b to take the second messages", || {
        count(&shared) == 12_000
    })
    .await;

    stop_b.cancel();
    task_b.await.unwrap().unwrap();
    wait_for("a to own every partition again", || {
        a.owned.lock().unwrap().len() == PARTITIONS as usize
    })
    .await;
    produce(&producer, &mut sent, 6_000);
    wait_for("a to take the last messages", || count(&shared) == 18_000).await;
    stop_a.cancel();
    task_a.await.unwrap().unwrap();

    let taken = shared.taken.lock().unwrap().clone();
    assert_eq!(taken.len(), 18_000, "a message was taken twice");
    for p in 0..PARTITIONS {
        let got: Vec<&Taken> = taken.iter().filter(|t| t.partition == p).collect();
        assert_eq!(got.len() as i64, sent[&p], "partition {p}");
        for (i, t) in got.iter().enumerate() {
            let i = i as i64;
            assert_eq!(t.offset, i, "partition {p}: offsets out of order");
            assert_eq!(t.payload.as_deref(), Some(format!("{p}:{i}").as_str()));
            assert_eq!(t.timestamp_ms, Some(T0 + i));
        }
    }
    let by_b = taken.iter().filter(|t| t.member == "b").count();
    assert!(
        by_b > 0 && by_b < 6_000,
        "b took {by_b} of the 6,000 messages sent while it was a member"
    );
}
