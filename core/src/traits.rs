//! The seams between the layers. Serving sees the speed and batch layers only through these.

use std::collections::{BTreeMap, BTreeSet};

use async_trait::async_trait;

use crate::error::Result;
use crate::query::{AggRow, Coverage, RealtimeStatus, ViewQuery};
use crate::view::ViewDef;

/// The speed layer's views: aggregates of the events no published batch covers yet.
pub trait RealtimeView: Send + Sync + std::fmt::Debug {
    /// Rows for every native bucket in the query's range that this layer holds and `covered`
    /// (the published batch) does not, grouped by the query's dimensions and filtered by its
    /// filters.
    fn query(&self, view: &ViewDef, query: &ViewQuery, covered: &Coverage) -> Result<Vec<AggRow>>;

    /// How fresh the answers are.
    fn status(&self) -> RealtimeStatus;

    /// A number that changes whenever `view`'s answers may change (its events applied, its
    /// state pruned): answers computed at one generation can be reused while it lasts. Read
    /// on every query: it must take no lock. `None`: no
    /// such number; answers are never reused.
    fn generation(&self, _view: &ViewDef) -> Option<u64> {
        None
    }

    /// Per native bucket that [`RealtimeView::query`] would read (in the query's range, held,
    /// not `covered`), a stamp that changes whenever that bucket's state may change: rows of
    /// a bucket read after its stamp can be reused while the stamp lasts. `None`: no stamps.
    fn bucket_stamps(
        &self,
        _view: &ViewDef,
        _query: &ViewQuery,
        _covered: &Coverage,
    ) -> Option<BTreeMap<i64, u64>> {
        None
    }

    /// [`RealtimeView::query`] for `buckets` only.
    fn query_buckets(
        &self,
        view: &ViewDef,
        query: &ViewQuery,
        covered: &Coverage,
        buckets: &[i64],
    ) -> Result<Vec<AggRow>> {
        let wanted: BTreeSet<i64> = buckets.iter().copied().collect();
        let mut rows = self.query(view, query, covered)?;
        rows.retain(|r| wanted.contains(&r.bucket_us));
        Ok(rows)
    }
}

/// The batch layer's published views.
#[async_trait]
pub trait BatchViews: Send + Sync + std::fmt::Debug {
    /// Which buckets of `view` the published batch covers. A batch computed from another
    /// definition of the view (another definition hash) covers nothing.
    async fn coverage(&self, view: &ViewDef) -> Result<Coverage>;

    /// Looks for newer publishes now, rather than at the next interval: for a process that
    /// has just published.
    async fn refresh(&self) -> Result<()> {
        Ok(())
    }

    /// Why published views cannot be kept current (a store that fails), if they cannot.
    fn health(&self) -> Option<String> {
        None
    }

    /// Rows of the covered buckets in the query's range, grouped and filtered as asked.
    async fn query(
        &self,
        view: &ViewDef,
        query: &ViewQuery,
        coverage: &Coverage,
    ) -> Result<Vec<AggRow>>;
}

/// A speed layer that is not there (e.g. `tandem serve` without a speed role): answers nothing
/// and says so, so batch-only serving is honest about it.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoRealtime;

impl RealtimeView for NoRealtime {
    fn query(&self, _: &ViewDef, _: &ViewQuery, _: &Coverage) -> Result<Vec<AggRow>> {
        Ok(Vec::new())
    }
    fn status(&self) -> RealtimeStatus {
        RealtimeStatus {
            available: false,
            ..Default::default()
        }
    }
    fn generation(&self, _: &ViewDef) -> Option<u64> {
        Some(0)
    }
    fn bucket_stamps(
        &self,
        _: &ViewDef,
        _: &ViewQuery,
        _: &Coverage,
    ) -> Option<BTreeMap<i64, u64>> {
        Some(BTreeMap::new())
    }
}
