//! Answers reused while nothing they were computed from has changed.
//!
//! An answer depends on the view's definition, the batch version it was answered from, the
//! speed layer's state (its generation, `RealtimeView::generation`) and the query. The key holds
//! all four, so a cached answer is exactly the answer a recomputation would give: a new publish
//! or one applied event makes a new key, and the old entry is never served again (it ages out).
//! The range enters the key as the view buckets it selects, so dashboards asking "the last 7
//! days" with a moving `to` share one entry per bucket. The rows are kept printed as JSON and as
//! an Arrow batch; the freshness in `meta` (speed lag) is each request's own. A speed layer
//! without generations (`None`) is never cached. The cache is bounded by the bytes it holds
//! ([`AnswerCache::new`]) and an entry lives at most 10 s unused.

use std::sync::Arc;
use std::time::Duration;

use datafusion::arrow::record_batch::RecordBatch;
use tandem_core::query::{Coverage, QueryResult, ViewQuery};
use tandem_core::view::ViewDef;

/// An answer ready to send: the result (its rows dropped: they are in the batch), its Arrow
/// batch and its rows printed as JSON.
#[derive(Debug)]
pub struct Answered {
    pub result: QueryResult,
    pub batch: RecordBatch,
    pub json_rows: String,
}

impl Answered {
    /// Bytes held, roughly.
    fn weight(&self) -> u32 {
        let bytes = self.json_rows.capacity() + self.batch.get_array_memory_size() + 1024;
        u32::try_from(bytes).unwrap_or(u32::MAX)
    }
}

/// Answers by what they were computed from.
#[derive(Clone)]
pub struct AnswerCache {
    cache: moka::sync::Cache<String, Arc<Answered>>,
}

impl std::fmt::Debug for AnswerCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AnswerCache")
            .field("entries", &self.cache.entry_count())
            .field("bytes", &self.cache.weighted_size())
            .finish()
    }
}

/// How long an answer stays unasked before it is dropped: an answer of a past generation is
/// never asked again, so it should not wait for the byte bound to push it out.
const IDLE: Duration = Duration::from_secs(10);

/// The bytes the cache holds at most by default.
pub const DEFAULT_CACHE_BYTES: u64 = 64 * 1024 * 1024;

impl Default for AnswerCache {
    fn default() -> Self {
        Self::new(DEFAULT_CACHE_BYTES)
    }
}

impl AnswerCache {
    /// A cache of at most `max_bytes` of answers (0: nothing is cached).
    pub fn new(max_bytes: u64) -> Self {
        AnswerCache {
            cache: moka::sync::Cache::builder()
                .max_capacity(max_bytes)
                .weigher(|_, a: &Arc<Answered>| a.weight())
                .time_to_idle(IDLE)
                .build(),
        }
    }

    /// The key of `q` on `view` answered at `coverage` and speed `generation`. `q`'s range must
    /// be [`normalized`].
    pub fn key(view: &ViewDef, q: &ViewQuery, coverage: &Coverage, generation: u64) -> String {
        format!(
            "{}\u{1}{}\u{1}{:?}\u{1}{:?}\u{1}{generation}\u{1}{q:?}",
            view.name,
            view.definition_hash,
            coverage.version,
            coverage.ranges(),
        )
    }

    /// The cached answer of `key`, or the one `compute` makes (computed once however many
    /// ask at once; the others wait for it and share its error, if it fails).
    pub fn get_or_compute<E>(
        &self,
        key: String,
        compute: impl FnOnce() -> Result<Answered, E>,
    ) -> Result<Arc<Answered>, Arc<E>>
    where
        E: Send + Sync + 'static,
    {
        self.cache.try_get_with(key, || compute().map(Arc::new))
    }
}

/// `q` with its range as the view buckets it selects: buckets starting in `[from, to)` are
/// those starting in `[ceil(from), ceil(to))` at the view's granularity, so both ranges have one
/// answer.
pub fn normalized(view: &ViewDef, mut q: ViewQuery) -> ViewQuery {
    q.from_us = view.granularity.ceil(q.from_us);
    q.to_us = view.granularity.ceil(q.to_us);
    q
}
