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
        // The rows to remember, with their slots (ids within the window, in order).
        let mut kept: Vec<(usize, i64)> = Vec::with_capacity(ids.len());
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
            kept.push((row, t.div_euclid(SLOT_US)));
        }
        let mut dups: Option<Vec<bool>> = None;
        let mut count = 0;
        // Rows come mostly in event-time order: a slot is looked up once for each run of rows.
        for run in kept.chunk_by(|a, b| a.1 == b.1) {
            let slot = run[0].1;
            // A new newest slot is sized as the one before it, which the stream's next minute
            // about fills: it is not rebuilt as it grows.
            let size = match self.slots.last_key_value() {
                Some((&last, held)) if last < slot => held.len(),
                _ => 0,
            };
            let set = self
                .slots
                .entry(slot)
                .or_insert_with(|| Ids::with_capacity_and_hasher(size, Default::default()));
            for &(row, _) in run {
                if !set.insert(hash(ids.value(row))) {
                    dups.get_or_insert_with(|| vec![false; ids.len()])[row] = true;
                    count += 1;
                }
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

    /// Batches whose rows run through minutes in order, go back to older minutes and repeat
    /// recent ids: every row is marked as a model keeping the ids themselves by minute marks
    /// it.
    #[test]
    fn duplicates_are_marked_as_a_model_of_minute_slots_marks_them() {
        use std::collections::{BTreeMap, HashSet};
        let window = 5 * SLOT_US;
        let mut d = Dedup::new(window);
        let mut model: (i64, BTreeMap<i64, HashSet<String>>) = (i64::MIN, BTreeMap::new());
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = |n: u64| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state % n
        };
        let t0 = 1_795_694_400_000_000;
        let (mut clock, mut issued) = (t0, 0u64);
        let mut duplicates = 0;
        for _ in 0..300 {
            let rows = 1 + next(40) as usize;
            let (mut ids, mut times) = (Vec::new(), Vec::new());
            for _ in 0..rows {
                clock += next(4_000_000) as i64;
                let t = match next(10) {
                    0 => clock - next(8 * SLOT_US as u64) as i64,
                    _ => clock,
                };
                let id = match next(4) {
                    0 if issued > 0 => format!("e{}", issued - 1 - next(issued.min(50))),
                    _ => {
                        issued += 1;
                        format!("e{}", issued - 1)
                    }
                };
                ids.push(id);
                times.push(t);
            }
            let (mask, n) = d.check(
                &StringArray::from(ids.clone()),
                &TimestampMicrosecondArray::from(times.clone()),
            );
            let mut want = vec![false; rows];
            for row in 0..rows {
                let t = times[row];
                if t < model.0.saturating_sub(window) {
                    continue;
                }
                model.0 = model.0.max(t);
                let slot = model.1.entry(t.div_euclid(SLOT_US)).or_default();
                want[row] = !slot.insert(ids[row].clone());
            }
            let oldest = model.0.saturating_sub(window).div_euclid(SLOT_US);
            model.1.retain(|&s, _| s >= oldest);
            let got: Vec<bool> = match mask {
                Some(m) => m.iter().map(|v| v.unwrap_or(false)).collect(),
                None => vec![false; rows],
            };
            assert_eq!(got, want, "{ids:?} {times:?}");
            assert_eq!(n as usize, want.iter().filter(|&&w| w).count());
            duplicates += n;
            assert_eq!(d.len(), model.1.values().map(HashSet::len).sum::<usize>());
        }
        assert!(duplicates > 100, "{duplicates} duplicates");
    }

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
