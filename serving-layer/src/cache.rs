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
//!
//! The first request that sees a new speed generation computes its answer; requests that
//! arrive while it does are answered with the newest answer of the same query, batch version
//! and definition ([`AnswerCache::newest`]) if it was computed at most [`MAX_BEHIND`] ago, with
//! the freshness it was computed at (`meta.speed_lag_ms` grown by its age), and never wait.
//! So new events never stall dashboards (each event otherwise made every request in flight
//! wait for one recomputation); an answer is at most one recomputation behind the speed layer
//! and never behind a publish; and one client asking again sees what it saw before, or newer.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tandem_core::query::{Coverage, ViewQuery};
use tandem_core::view::ViewDef;

use crate::answer::{Answered, Settled};

/// Answers, and the batch's settled parts of answers, by what they were computed from.
/// Cloned with every request's state: one reference count.
#[derive(Clone)]
pub struct AnswerCache(Arc<Caches>);

struct Caches {
    answers: moka::sync::Cache<String, Arc<Answered>>,
    settled: moka::sync::Cache<String, Arc<Settled>>,
    /// By settled key: the newest answer computed, at any speed generation.
    newest: moka::sync::Cache<String, Arc<Newest>>,
}

/// The newest answer of a query at one batch version, and the speed generation it was
/// computed at.
#[derive(Debug)]
pub struct Newest {
    pub generation: u64,
    pub answered: Arc<Answered>,
    /// Whether the answer of a newer generation is being computed.
    refreshing: AtomicBool,
}

impl Newest {
    /// Whether the caller is the first to ask for the newer answer (and so computes it).
    pub fn claim_refresh(&self) -> bool {
        !self.refreshing.swap(true, Ordering::AcqRel)
    }

    /// Whether it may still be served while a newer one is computed.
    pub fn servable(&self) -> bool {
        self.answered.computed_at.elapsed() <= MAX_BEHIND
    }
}

/// How long after it was computed an answer may still be served while the answer of newer
/// speed state is computed; past it, queries wait for the new one.
pub const MAX_BEHIND: Duration = Duration::from_millis(500);

impl std::fmt::Debug for AnswerCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AnswerCache")
            .field("answers", &self.0.answers.entry_count())
            .field("settled", &self.0.settled.entry_count())
            .field("newest", &self.0.newest.entry_count())
            .field(
                "bytes",
                &(self.0.answers.weighted_size()
                    + self.0.settled.weighted_size()
                    + self.0.newest.weighted_size()),
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
    /// A cache of at most `max_bytes` (0: nothing is cached), half for settled parts, a
    /// quarter for answers by generation and a quarter for the newest answers (which share
    /// most of their rows with the former).
    pub fn new(max_bytes: u64) -> Self {
        AnswerCache(Arc::new(Caches {
            newest: moka::sync::Cache::builder()
                .max_capacity(max_bytes / 4)
                .weigher(|_, n: &Arc<Newest>| weight(n.answered.weight()))
                .time_to_idle(IDLE)
                .build(),
            answers: moka::sync::Cache::builder()
                .max_capacity(max_bytes / 4)
                .weigher(|_, a: &Arc<Answered>| weight(a.weight()))
                .time_to_idle(IDLE)
                .build(),
            settled: moka::sync::Cache::builder()
                .max_capacity(max_bytes / 2)
                .weigher(|_, s: &Arc<Settled>| weight(s.weight()))
                .time_to_idle(SETTLED_IDLE)
                .build(),
        }))
    }

    /// The key of the batch's part of `q` on `view` at `coverage`. `q`'s range must be
    /// [`normalized`].
    pub fn settled_key(view: &ViewDef, q: &ViewQuery, coverage: &Coverage) -> String {
        format!(
            "{}\u{1}{}\u{1}{:?}\u{1}{:?}\u{1}{q:?}",
            view.name, view.definition_hash, coverage.version, coverage.days,
        )
    }

    /// The key of the answer of `settled_key`'s query at speed `generation`.
    pub fn at_generation(settled_key: &str, generation: u64) -> String {
        format!("{settled_key}\u{1}{generation}")
    }

    /// The cached answer of `key`, if there is one.
    pub fn get(&self, key: &str) -> Option<Arc<Answered>> {
        self.0.answers.get(key)
    }

    /// The newest answer of the query of `settled_key`, at any generation.
    pub fn newest(&self, settled_key: &str) -> Option<Arc<Newest>> {
        self.0.newest.get(settled_key)
    }

    /// Records `answered`, computed at `generation`, as the newest of its query unless a
    /// newer one is recorded.
    pub fn set_newest(&self, settled_key: String, generation: u64, answered: Arc<Answered>) {
        let newer = self
            .0
            .newest
            .get(&settled_key)
            .is_some_and(|n| n.generation > generation);
        if !newer {
            let newest = Newest {
                generation,
                answered,
                refreshing: AtomicBool::new(false),
            };
            self.0.newest.insert(settled_key, Arc::new(newest));
        }
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
        self.0.answers.try_get_with(key, || compute().map(Arc::new))
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
        self.0.settled.try_get_with(key, || compute().map(Arc::new))
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
