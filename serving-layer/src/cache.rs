//! Answers reused while nothing they were computed from has changed.
//!
//! Two kinds of entries: the batch's settled part of an answer ([`Settled`]), which depends on
//! the view's definition, the batch version and the query only, and whole answers, which also
//! depend on the speed state. A new event makes a new answer from the settled part and the
//! speed's few rows; a new publish makes everything new.
//!
//! An answer depends on the view's definition, the batch version it was answered from, the
//! view's speed state (its generation, `RealtimeView::generation`, an atomic read that takes
//! no lock ingestion needs) and the query. The key holds all four, so a cached answer is
//! exactly the answer a recomputation would give: a new publish or an event of the view makes
//! a new key, and the old entry is never served again (it ages out); events of other views
//! leave it standing.
//! The range enters the key as the view buckets it selects, so dashboards asking "the last 7
//! days" with a moving `to` share one entry per bucket. The rows are kept printed as JSON and as
//! an Arrow batch; the freshness in `meta` (speed lag) is each request's own. With a speed layer
//! without generations whole answers are never cached. The cache is bounded by the
//! bytes it holds ([`AnswerCache::new`]); an answer lives at most 10 s unused, a settled part
//! two minutes.

use std::sync::Arc;
use std::time::Duration;

use tandem_core::query::{Coverage, ViewQuery};
use tandem_core::view::ViewDef;

use crate::answer::{Answered, Settled};

/// Answers, and the batch's settled parts of answers, by what they were computed from.
#[derive(Clone)]
pub struct AnswerCache {
    answers: moka::sync::Cache<String, Arc<Answered>>,
    settled: moka::sync::Cache<String, Arc<Settled>>,
}

impl std::fmt::Debug for AnswerCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AnswerCache")
            .field("answers", &self.answers.entry_count())
            .field("settled", &self.settled.entry_count())
            .field(
                "bytes",
                &(self.answers.weighted_size() + self.settled.weighted_size()),
            )
            .finish()
    }
}

/// How long an answer stays unasked before it is dropped: an answer of a past generation is
/// never asked again, so it should not wait for the byte bound to push it out.
const IDLE: Duration = Duration::from_secs(10);

/// How long a settled part stays unasked: it stands until the next publish.
const SETTLED_IDLE: Duration = Duration::from_secs(120);

/// The bytes the cache holds at most by default.
pub const DEFAULT_CACHE_BYTES: u64 = 64 * 1024 * 1024;

impl Default for AnswerCache {
    fn default() -> Self {
        Self::new(DEFAULT_CACHE_BYTES)
    }
}

fn weight(bytes: usize) -> u32 {
    u32::try_from(bytes).unwrap_or(u32::MAX)
}

impl AnswerCache {
    /// A cache of at most `max_bytes` (0: nothing is cached), half for answers, half for
    /// settled parts.
    pub fn new(max_bytes: u64) -> Self {
        AnswerCache {
            answers: moka::sync::Cache::builder()
                .max_capacity(max_bytes / 2)
                .weigher(|_, a: &Arc<Answered>| weight(a.weight()))
                .time_to_idle(IDLE)
                .build(),
            settled: moka::sync::Cache::builder()
                .max_capacity(max_bytes / 2)
                .weigher(|_, s: &Arc<Settled>| weight(s.weight()))
                .time_to_idle(SETTLED_IDLE)
                .build(),
        }
    }

    /// The key of the batch's part of `q` on `view` at `coverage`. `q`'s range must be
    /// [`normalized`].
    pub fn settled_key(view: &ViewDef, q: &ViewQuery, coverage: &Coverage) -> String {
        format!(
            "{}\u{1}{}\u{1}{:?}\u{1}{:?}\u{1}{q:?}",
            view.name, view.definition_hash, coverage.version, coverage.days,
        )
    }

    /// The key of `q` on `view` answered at `coverage` and speed `generation`. `q`'s range must
    /// be [`normalized`].
    pub fn key(view: &ViewDef, q: &ViewQuery, coverage: &Coverage, generation: u64) -> String {
        format!("{}\u{1}{generation}", Self::settled_key(view, q, coverage))
    }

    /// The cached answer of `key`, if there is one.
    pub fn get(&self, key: &str) -> Option<Arc<Answered>> {
        self.answers.get(key)
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
        self.answers.try_get_with(key, || compute().map(Arc::new))
    }

    /// The cached settled part of `key`, or the one `compute` makes (once, as
    /// [`Self::get_or_compute`]).
    pub fn settled<E>(
        &self,
        key: String,
        compute: impl FnOnce() -> Result<Settled, E>,
    ) -> Result<Arc<Settled>, Arc<E>>
    where
        E: Send + Sync + 'static,
    {
        self.settled.try_get_with(key, || compute().map(Arc::new))
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
