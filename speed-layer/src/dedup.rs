//! Duplicate events dropped by event id. Producers retry, so one event can arrive twice, with
//! the same id and the same event time, at different offsets. Each partition remembers the
//! ids it applied whose event time is within `window` of the newest event time it has seen,
//! in one-minute slots of event time, as 64-bit hashes; an id seen again in its slot is a
//! duplicate. What it can still count twice: a copy whose event time is older than the
//! window at its arrival (a retry that late), or two ids whose hashes collide (about n²/2⁶⁵
//! for n ids in the window). The next batch run counts every event once either way (the
//! master dataset keeps every message; a view's batch rows are what they are).

use std::collections::{BTreeMap, HashSet};

use datafusion::arrow::array::{Array, BooleanArray, StringArray, TimestampMicrosecondArray};
use tandem_core::codec::{Malformed, Put, Reader};

const SLOT_US: i64 = 60_000_000;

/// The ids are hashes already: a set of them needs no hashing of its own.
#[derive(Debug, Clone, Copy, Default)]
struct Identity(u64);

impl std::hash::Hasher for Identity {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 << 8) | *b as u64;
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

type Ids = HashSet<u64, std::hash::BuildHasherDefault<Identity>>;

/// The ids one partition saw within the window.
#[derive(Debug, Clone, Default)]
pub struct Dedup {
    window_us: i64,
    newest_us: i64,
    slots: BTreeMap<i64, Ids>,
}

/// FNV-1a, then a final mix: stable across builds and versions, since the hashes are kept in
/// checkpoints.
fn hash(id: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in id.as_bytes() {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^ (h >> 33)
}

impl Dedup {
    pub fn new(window_us: i64) -> Self {
        Dedup {
            window_us,
            newest_us: i64::MIN,
            slots: BTreeMap::new(),
        }
    }

    /// Marks the rows that repeat an id seen within the window (`true`: drop), remembering
    /// the others. `None` when there are none.
    pub fn check(
        &mut self,
        ids: &StringArray,
        times: &TimestampMicrosecondArray,
    ) -> (Option<BooleanArray>, u64) {
        let mut dups: Option<Vec<bool>> = None;
        let mut count = 0;
        for row in 0..ids.len() {
            if ids.is_null(row) || ids.value(row).is_empty() {
                continue;
            }
            let t = times.value(row);
            if t < self.newest_us.saturating_sub(self.window_us) {
                // Older than the window: its slot is gone, so it cannot be told apart.
                continue;
            }
            self.newest_us = self.newest_us.max(t);
            let fresh = self
                .slots
                .entry(t.div_euclid(SLOT_US))
                .or_default()
                .insert(hash(ids.value(row)));
            if !fresh {
                dups.get_or_insert_with(|| vec![false; ids.len()])[row] = true;
                count += 1;
            }
        }
        let oldest = self
            .newest_us
            .saturating_sub(self.window_us)
            .div_euclid(SLOT_US);
        while self
            .slots
            .first_key_value()
            .is_some_and(|(&s, _)| s < oldest)
        {
            self.slots.pop_first();
        }
        (dups.map(BooleanArray::from), count)
    }

    /// Ids held.
    pub fn len(&self) -> usize {
        self.slots.values().map(Ids::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        out.put_i64(self.window_us);
        out.put_i64(self.newest_us);
        out.put_u32(self.slots.len() as u32);
        for (slot, ids) in &self.slots {
            out.put_i64(*slot);
            out.put_u32(ids.len() as u32);
            for id in ids {
                out.put_u64(*id);
            }
        }
    }

    pub fn decode(r: &mut Reader<'_>) -> Result<Self, Malformed> {
        let window_us = r.i64()?;
        let newest_us = r.i64()?;
        let mut slots = BTreeMap::new();
        for _ in 0..r.count(12)? {
            let slot = r.i64()?;
            let n = r.count(8)?;
            let ids = (0..n).map(|_| r.u64()).collect::<Result<Ids, _>>()?;
            slots.insert(slot, ids);
        }
        Ok(Dedup {
            window_us,
            newest_us,
            slots,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeated_id_within_the_window_is_a_duplicate_and_reads_back() {
        let mut d = Dedup::new(10 * 60_000_000);
        let t0 = 1_795_694_400_000_000;
        let ids = StringArray::from(vec!["a", "b", "a", "c"]);
        let times = TimestampMicrosecondArray::from(vec![t0, t0, t0, t0 + 1]);
        let (mask, n) = d.check(&ids, &times);
        assert_eq!(n, 1);
        assert_eq!(
            mask.unwrap(),
            BooleanArray::from(vec![false, false, true, false])
        );
        let mut bytes = Vec::new();
        d.encode(&mut bytes);
        let mut back = Dedup::decode(&mut Reader::new(&bytes)).unwrap();
        // After a restore, "b" is still known; "d" is new.
        let (mask, n) = back.check(
            &StringArray::from(vec!["b", "d"]),
            &TimestampMicrosecondArray::from(vec![t0, t0]),
        );
        assert_eq!((n, mask.unwrap().value(0)), (1, true));
        // An hour later, the old slots are gone: "a" passes again.
        let later = t0 + 3_600_000_000;
        back.check(
            &StringArray::from(vec!["x"]),
            &TimestampMicrosecondArray::from(vec![later]),
        );
        assert_eq!(back.len(), 1);
        let (mask, _) = back.check(
            &StringArray::from(vec!["a"]),
            &TimestampMicrosecondArray::from(vec![later]),
        );
        assert!(mask.is_none());
    }
}
