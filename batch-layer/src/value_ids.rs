//! Numbers for a column's distinct values, equal values the same number: what the cube pass
//! counts a group's distinct values by, exactly, with no value compared twice.
//!
//! A day's events repeat their distinct values (a device comes back all day), and an exact
//! count must tell two values apart by their bytes, not a hash. Each value is compared once,
//! here, with the values seen before; a group's values are then told apart by their numbers,
//! in a sort of (group, number) pairs (`crate::cube`), not by comparing texts again, and each
//! row's coupon is the coupon of its number, hashed once a value rather than once a row.

use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, AsArray};
use datafusion::arrow::datatypes::{DataType, Decimal128Type};
use hashbrown::HashTable;
use tandem_core::metric::{Coupon, DistinctState};

use crate::error::{BatchError, Result};
use crate::hll::{for_each_value, Value};

/// A value's coupon, as a sketch's list image holds it (its bits, 0 for none) and as a sketch
/// takes it (none for a value sketches skip, the empty text).
pub(crate) type CouponOf = (u32, Option<Coupon>);

/// The numbers of the values of some columns.
pub(crate) struct ValueIds {
    /// Per column, each row's number (0 for a null).
    pub(crate) ids: Vec<Vec<u32>>,
    /// Per number, its value's coupon (the first, of number 0, is none).
    pub(crate) coupons: Vec<CouponOf>,
}

/// Numbers the values of `columns` (each a list of arrays, read as one column), on `threads`
/// threads.
///
/// Each column's values are first copied to small partitions by a hash of their bytes, every
/// column on a thread of its own; then each partition's values are numbered, every
/// partition by one thread, against a hash table of that partition's values alone. A table of
/// a day's values (a million texts) is larger than the caches, and its every probe and
/// every comparison missed them; a partition's table and values stay in a core's own cache.
pub(crate) fn number(columns: &[Vec<&ArrayRef>], threads: usize) -> Result<ValueIds> {
    let rows: usize = columns.iter().flatten().map(|a| a.len()).sum();
    let parts = rows
        .div_ceil(PARTITION_ROWS)
        .next_power_of_two()
        .clamp(1, 1 << 10);
    let threads = threads.max(1);
    // Each column's values, partitioned.
    let partitioned: Vec<Result<Vec<Partition>>> =
        each_on(threads, columns.len(), |c| partition(&columns[c], parts));
    let partitioned = partitioned.into_iter().collect::<Result<Vec<_>>>()?;
    let out: Vec<Vec<AtomicU32>> = columns
        .iter()
        .map(|arrays| {
            let rows = arrays.iter().map(|a| a.len()).sum();
            (0..rows).map(|_| AtomicU32::new(0)).collect()
        })
        .collect();
    let numbered: Vec<Result<Vec<CouponOf>>> = each_on(threads, parts, |part| {
        number_partition(&partitioned, &out, part, parts)
    });
    let numbered = numbered.into_iter().collect::<Result<Vec<_>>>()?;
    // Number `local` of partition `part` is `local * parts + part + 1`.
    let most = numbered.iter().map(Vec::len).max().unwrap_or(0);
    let mut coupons = vec![(0, None); most * parts + 1];
    for (part, share) in numbered.iter().enumerate() {
        for (local, &c) in share.iter().enumerate() {
            coupons[local * parts + part + 1] = c;
        }
    }
    let ids = out
        .into_iter()
        .map(|ids| ids.into_iter().map(AtomicU32::into_inner).collect())
        .collect();
    Ok(ValueIds { ids, coupons })
}

/// The value numbers of a day's arrays of one column, numbered once for every view that
/// reads them: a view's events taken from the day's shared read hold the very same arrays
/// (a projection passes a column on as it is), found again here by their address.
pub(crate) struct NumberedArrays {
    /// Each array numbered, with its rows' numbers.
    arrays: Vec<(ArrayRef, Vec<u32>)>,
    /// Each array's place in `arrays`, by its address.
    by_address: std::collections::HashMap<usize, usize>,
    coupons: Vec<CouponOf>,
}

impl NumberedArrays {
    /// Numbers the values of `arrays` (one column) on `threads` threads.
    pub(crate) fn of(arrays: Vec<ArrayRef>, threads: usize) -> Result<Self> {
        // Numbered in chunks of about a quarter million rows (partitioning each small array
        // alone would make a partition of every few rows).
        let mut chunks: Vec<Vec<&ArrayRef>> = Vec::new();
        let mut rows = usize::MAX;
        for a in &arrays {
            if rows >= 1 << 18 {
                chunks.push(Vec::new());
                rows = 0;
            }
            if let Some(chunk) = chunks.last_mut() {
                chunk.push(a);
            }
            rows += a.len();
        }
        let numbered = number(&chunks, threads)?;
        let mut ids_of_arrays = Vec::with_capacity(arrays.len());
        for (chunk, ids) in chunks.iter().zip(&numbered.ids) {
            let mut at = 0;
            for a in chunk {
                ids_of_arrays.push(ids[at..at + a.len()].to_vec());
                at += a.len();
            }
        }
        let arrays: Vec<(ArrayRef, Vec<u32>)> = arrays.into_iter().zip(ids_of_arrays).collect();
        let by_address = arrays
            .iter()
            .enumerate()
            .map(|(i, (a, _))| (address(a), i))
            .collect();
        Ok(NumberedArrays {
            arrays,
            by_address,
            coupons: numbered.coupons,
        })
    }

    /// The numbers of `array`'s rows, if it is one of the arrays numbered.
    pub(crate) fn ids_of(&self, array: &ArrayRef) -> Option<&[u32]> {
        let &i = self.by_address.get(&address(array))?;
        let (a, ids) = &self.arrays[i];
        (Arc::ptr_eq(a, array) && a.len() == array.len()).then_some(ids.as_slice())
    }

    /// Per number, its value's coupon.
    pub(crate) fn coupons(&self) -> &[CouponOf] {
        &self.coupons
    }
}

/// Where `array` lives: the same while it does (the numbered arrays are held).
fn address(array: &ArrayRef) -> usize {
    Arc::as_ptr(array) as *const () as usize
}

/// About the rows of a column whose values a partition holds: few enough that its distinct
/// values and its table stay in a core's cache.
const PARTITION_ROWS: usize = 1 << 15;

/// `work` on each of `0..n`, `threads` at a time, each item by the next free thread; the
/// results in item order.
pub(crate) fn each_on<T: Send>(
    threads: usize,
    n: usize,
    work: impl Fn(usize) -> T + Sync,
) -> Vec<T> {
    let next = AtomicUsize::new(0);
    let results: Vec<std::sync::Mutex<Option<T>>> =
        (0..n).map(|_| std::sync::Mutex::new(None)).collect();
    std::thread::scope(|scope| {
        for _ in 0..threads.max(1).min(n) {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                let r = work(i);
                *results[i].lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
            });
        }
    });
    results
        .into_iter()
        .map(|r| {
            r.into_inner()
                .unwrap_or_else(|e| e.into_inner())
                .expect("every item is worked on")
        })
        .collect()
}

/// How a column's value bytes make its coupon.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Text,
    /// An integer's 8 bytes.
    Int,
    /// A decimal's 16 bytes, of which a sketch hashes the lower 8.
    Decimal,
}

/// The values of one column that fall in one partition, in row order.
#[derive(Default)]
struct Partition {
    kind: Option<Kind>,
    /// Per value: its row in the column, its hash, and where its bytes end in `bytes`.
    rows: Vec<u32>,
    hashes: Vec<u64>,
    ends: Vec<u32>,
    bytes: Vec<u8>,
}

fn hasher() -> foldhash::fast::FixedState {
    foldhash::fast::FixedState::with_seed(0x7661_6c75_6573)
}

/// The values of `arrays` (one column), each copied to the partition of its hash.
fn partition(arrays: &[&ArrayRef], parts: usize) -> Result<Vec<Partition>> {
    use std::hash::BuildHasher;
    let hasher = hasher();
    let rows: usize = arrays.iter().map(|a| a.len()).sum();
    let room = rows / parts + rows / parts / 4 + 16;
    let mut partitions: Vec<Partition> = (0..parts)
        .map(|_| Partition {
            rows: Vec::with_capacity(room),
            hashes: Vec::with_capacity(room),
            ends: Vec::with_capacity(room),
            ..Partition::default()
        })
        .collect();
    let mut at = 0usize;
    let mut too_large = false;
    for values in arrays {
        each_key(values, |row, key, kind| {
            let hash = hasher.hash_one(key);
            let p = &mut partitions[partition_of(hash, parts)];
            p.kind = Some(kind);
            p.bytes.extend_from_slice(key);
            match (u32::try_from(at + row), u32::try_from(p.bytes.len())) {
                (Ok(row), Ok(end)) => {
                    p.rows.push(row);
                    p.hashes.push(hash);
                    p.ends.push(end);
                }
                _ => too_large = true,
            }
        })?;
        at += values.len();
    }
    if too_large {
        return Err(BatchError::BadRequest(
            "a chunk of the cube pass holds more than 4 GiB of distinct values".into(),
        ));
    }
    Ok(partitions)
}

/// Numbers partition `part` of every column, its values in the order they first come (so the
/// numbers, and what is built from them, are the same run after run), each row's written to
/// `out`. Returns the coupon of each of the partition's values.
fn number_partition(
    columns: &[Vec<Partition>],
    out: &[Vec<AtomicU32>],
    part: usize,
    parts: usize,
) -> Result<Vec<CouponOf>> {
    let mut index: HashTable<u32> = HashTable::new();
    // Per number of the partition: its value's hash, where its bytes end in `bytes`, and its
    // coupon.
    let mut hashes: Vec<u64> = Vec::new();
    let mut ends: Vec<usize> = vec![0];
    let mut bytes: Vec<u8> = Vec::new();
    let mut coupons: Vec<CouponOf> = Vec::new();
    let step = u32::try_from(parts).unwrap_or(u32::MAX);
    let offset = u32::try_from(part + 1).unwrap_or(u32::MAX);
    for (partitions, out) in columns.iter().zip(out) {
        let Some(p) = partitions.get(part) else {
            continue;
        };
        let kind = p.kind.unwrap_or(Kind::Text);
        let mut start = 0usize;
        for ((&row, &hash), &end) in p.rows.iter().zip(&p.hashes).zip(&p.ends) {
            let key = &p.bytes[start..end as usize];
            start = end as usize;
            let found = index.find(hash, |&n| {
                let n = n as usize;
                &bytes[ends[n]..ends[n + 1]] == key
            });
            let local = match found {
                Some(&n) => n,
                None => {
                    let n = u32::try_from(coupons.len()).map_err(|_| too_many())?;
                    hashes.push(hash);
                    bytes.extend_from_slice(key);
                    ends.push(bytes.len());
                    coupons.push(coupon_of_bytes(kind, key));
                    index.insert_unique(hash, n, |&n| hashes[n as usize]);
                    n
                }
            };
            let id = local
                .checked_mul(step)
                .and_then(|n| n.checked_add(offset))
                .ok_or_else(too_many)?;
            out[row as usize].store(id, Ordering::Relaxed);
        }
    }
    Ok(coupons)
}

fn too_many() -> BatchError {
    BatchError::BadRequest(
        "a day holds more distinct values than the cube pass numbers (2^32)".into(),
    )
}

/// Which of `parts` (a power of two up to 2^16) partitions a value of hash `hash` falls in:
/// by 16 bits that the hash table's bucket index (low bits) and its tag (the top seven) do
/// not use.
#[inline]
fn partition_of(hash: u64, parts: usize) -> usize {
    ((((hash >> 40) & 0xffff) * parts as u64) >> 16) as usize
}

/// The coupon of a value of `kind` whose bytes are `key` (as [`each_key`] gives them).
fn coupon_of_bytes(kind: Kind, key: &[u8]) -> CouponOf {
    let low = || {
        let mut word = [0u8; 8];
        let n = key.len().min(8);
        word[..n].copy_from_slice(&key[..n]);
        i64::from_le_bytes(word)
    };
    match kind {
        Kind::Int | Kind::Decimal => coupon_of(Value::I64(low())),
        Kind::Text => match std::str::from_utf8(key) {
            Ok(s) => coupon_of(Value::Str(s)),
            Err(_) => (0, None),
        },
    }
}

/// Calls `f` with each row's value that is not null: its bytes (what tells values apart: the
/// text, an integer's 8 bytes, a decimal's 16) and how they make its coupon.
fn each_key(values: &ArrayRef, mut f: impl FnMut(usize, &[u8], Kind)) -> Result<()> {
    if let DataType::Decimal128(..) = values.data_type() {
        // A sketch takes a decimal's lower 8 bytes; the exact count tells all 16 apart.
        let decimals = values.as_primitive::<Decimal128Type>();
        for (row, x) in decimals.iter().enumerate() {
            if let Some(x) = x {
                f(row, &x.to_le_bytes(), Kind::Decimal);
            }
        }
        return Ok(());
    }
    for_each_value(values, None, |row, value| match value {
        Value::I64(x) => f(row, &x.to_le_bytes(), Kind::Int),
        Value::Str(s) => f(row, s.as_bytes(), Kind::Text),
    })?;
    Ok(())
}

/// The coupon `value` adds to a sketch.
pub(crate) fn coupon_of(value: Value<'_>) -> CouponOf {
    match value {
        Value::I64(x) => (
            DistinctState::coupon_bits_of_i64(x),
            Some(DistinctState::coupon_of_i64(x)),
        ),
        Value::Str(x) => (
            DistinctState::coupon_bits_of_str(x).unwrap_or(0),
            DistinctState::coupon_of_str(x),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::{
        Decimal128Array, Int32Array, StringArray, StringViewArray, UInt32Array,
    };

    /// Whether `ids` give equal numbers exactly to equal values of `values` (as `equal`
    /// compares two rows), 0 exactly to nulls, and each number the coupon of its value.
    fn numbers_follow_values(values: &ArrayRef, ids: &ValueIds) {
        let ids_of = &ids.ids[0];
        assert_eq!(ids_of.len(), values.len());
        let compare = datafusion::arrow::array::make_comparator(
            values.as_ref(),
            values.as_ref(),
            Default::default(),
        )
        .unwrap();
        for a in 0..values.len() {
            assert_eq!(ids_of[a] == 0, values.is_null(a), "row {a}");
            for b in 0..values.len() {
                if values.is_valid(a) && values.is_valid(b) {
                    assert_eq!(
                        ids_of[a] == ids_of[b],
                        compare(a, b).is_eq(),
                        "rows {a} and {b}"
                    );
                }
            }
        }
        let mut expected = vec![None; values.len()];
        for_each_value(values, None, |row, v| expected[row] = Some(coupon_of(v))).unwrap();
        for (row, want) in expected.into_iter().enumerate() {
            if let Some(want) = want {
                assert_eq!(ids.coupons[ids_of[row] as usize].0, want.0, "row {row}");
            }
        }
    }

    #[test]
    fn equal_values_get_one_number_whatever_the_threads() {
        let texts: Vec<Option<String>> = (0..500)
            .map(|i| match i % 11 {
                0 => None,
                1 => Some(String::new()),
                // Values that share a prefix, and ones longer than a short string's 12 bytes.
                k => Some(format!("device-{:0>20}", (i * 7) % (k * 13))),
            })
            .collect();
        let utf8: ArrayRef = Arc::new(StringArray::from(texts.clone()));
        let view: ArrayRef = Arc::new(StringViewArray::from(texts));
        let ints: ArrayRef = Arc::new(Int32Array::from_iter(
            (0..400).map(|i| (i % 9 != 0).then_some((i * 31) % 97 - 40)),
        ));
        // Decimals equal in their lower 8 bytes, not in all 16, are two values.
        let wide = 1i128 << 64;
        let decimals: ArrayRef = Arc::new(
            Decimal128Array::from_iter((0..300).map(|i| {
                (i % 7 != 0).then_some(match i % 3 {
                    0 => i128::from(i % 10),
                    1 => wide + i128::from(i % 10),
                    _ => -i128::from(i % 5),
                })
            }))
            .with_precision_and_scale(38, 2)
            .unwrap(),
        );
        let unsigned: ArrayRef = Arc::new(UInt32Array::from_iter_values((0..200).map(|i| i % 17)));
        for values in [utf8, view, ints, decimals, unsigned] {
            for threads in [1, 2, 3] {
                let ids = number(&[vec![&values]], threads).unwrap();
                numbers_follow_values(&values, &ids);
            }
        }
    }

    #[test]
    fn a_column_in_several_arrays_is_numbered_as_one() {
        let a: ArrayRef = Arc::new(StringArray::from(vec![Some("x"), None, Some("y")]));
        let b: ArrayRef = Arc::new(StringArray::from(vec![Some("y"), Some("z"), Some("x")]));
        let c: ArrayRef = Arc::new(StringArray::from(vec![Some("z")]));
        for threads in [1, 2] {
            let ids = number(&[vec![&a, &b], vec![&c]], threads).unwrap();
            let (first, second) = (&ids.ids[0], &ids.ids[1]);
            assert_eq!(first[0], first[5], "x");
            assert_eq!(first[2], first[3], "y");
            assert_eq!(first[4], second[0], "z");
            assert_eq!(first[1], 0);
            let distinct: std::collections::HashSet<u32> = [first[0], first[2], first[4]].into();
            assert_eq!(distinct.len(), 3);
        }
    }

    #[test]
    fn arrays_numbered_once_are_found_again_by_themselves_only() {
        let a: ArrayRef = Arc::new(StringArray::from(vec![Some("x"), None, Some("y")]));
        let b: ArrayRef = Arc::new(StringArray::from(vec![Some("y"), Some("x")]));
        let numbered = NumberedArrays::of(vec![Arc::clone(&a), Arc::clone(&b)], 2).unwrap();
        let (ids_a, ids_b) = (numbered.ids_of(&a).unwrap(), numbered.ids_of(&b).unwrap());
        assert_eq!((ids_a[0], ids_a[2]), (ids_b[1], ids_b[0]));
        assert_eq!(ids_a[1], 0);
        assert_ne!(ids_a[0], ids_a[2]);
        let x = DistinctState::coupon_bits_of_str("x").unwrap();
        assert_eq!(numbered.coupons()[ids_a[0] as usize].0, x);
        // An equal array that is not one of them, or a slice of one, is not found.
        let copy: ArrayRef = Arc::new(StringArray::from(vec![Some("x"), None, Some("y")]));
        assert!(numbered.ids_of(&copy).is_none());
        assert!(numbered.ids_of(&a.slice(0, 2)).is_none());
    }
}
