//! The fast path of [`super::parse_row`]: one forward scan of a flat JSON object whose strings
//! hold no escape, whose keys come in the schema's order and whose numbers outside decimal
//! fields are integers, which is what producers of events write almost always. Such a row is
//! read in about half the time serde_json's visitor takes (`docs/performance.md`). Anything
//! else (an escape, a nested value, a fraction or exponent in a non-decimal field, an integer
//! beyond 64 bits, any syntax error) makes the scan give up, having decided nothing, and the
//! row goes to serde_json, which reads it exactly and words its errors. Both paths give a row
//! the same slots (a test holds them to it).

use std::borrow::Cow;

use super::{Keys, Slot};

/// Reads `text`, a JSON object, into `slots`; `None` if the row needs the general parser
/// (`slots` may then hold part of the row and must be reset).
pub(super) fn scan<'de>(
    text: &'de str,
    keys: &Keys<'_>,
    decimal: &[bool],
    slots: &mut [Slot<'de>],
) -> Option<()> {
    let b = text.as_bytes();
    let mut i = skip_ws(b, 0);
    if b.get(i) != Some(&b'{') {
        return None;
    }
    i = skip_ws(b, i + 1);
    if b.get(i) == Some(&b'}') {
        return (skip_ws(b, i + 1) == b.len()).then_some(());
    }
    let mut hint = 0;
    loop {
        if b.get(i) != Some(&b'"') {
            return None;
        }
        // The key: the field expected next (a field name holds no quote), else looked up.
        let field = match keys.names.get(hint).map(|f| f.name.as_bytes()) {
            Some(name)
                if b.get(i + 1..i + 1 + name.len()) == Some(name)
                    && b.get(i + 1 + name.len()) == Some(&b'"') =>
            {
                i += name.len() + 2;
                Some(hint)
            }
            _ => {
                let end = string_end(b, i + 1)?;
                let key = &text[i + 1..end];
                i = end + 1;
                keys.find(key, hint)
            }
        };
        if let Some(f) = field {
            hint = f + 1;
        }
        i = skip_ws(b, i);
        if b.get(i) != Some(&b':') {
            return None;
        }
        i = skip_ws(b, i + 1);
        let start = i;
        let slot = match *b.get(i)? {
            b'"' => {
                let end = string_end(b, i + 1)?;
                i = end + 1;
                Slot::Str(Cow::Borrowed(&text[start + 1..end]))
            }
            b'n' => {
                i = literal(b, i, b"null")?;
                Slot::Null
            }
            b't' => {
                i = literal(b, i, b"true")?;
                Slot::Bool(true)
            }
            b'f' => {
                i = literal(b, i, b"false")?;
                Slot::Bool(false)
            }
            b'-' | b'0'..=b'9' => {
                let (end, integer) = number_end(b, i)?;
                i = end;
                match field {
                    Some(f) if !decimal[f] => {
                        let digits = &text[start..end];
                        // serde_json reads `-0` as a float; leave it to serde_json.
                        if !integer || digits.starts_with("-0") {
                            return None;
                        }
                        // As serde_json reads them: a negative integer as i64, else u64.
                        if digits.starts_with('-') {
                            Slot::I64(digits.parse().ok()?)
                        } else {
                            Slot::U64(digits.parse().ok()?)
                        }
                    }
                    _ => Slot::Missing,
                }
            }
            _ => return None,
        };
        if let Some(f) = field {
            // A decimal keeps its value's JSON text, whatever it is (checked later).
            slots[f] = if decimal[f] {
                Slot::Raw(&text[start..i])
            } else {
                slot
            };
        }
        i = skip_ws(b, i);
        match b.get(i) {
            Some(b',') => i = skip_ws(b, i + 1),
            Some(b'}') => return (skip_ws(b, i + 1) == b.len()).then_some(()),
            _ => return None,
        }
    }
}

fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while matches!(b.get(i), Some(b' ' | b'\n' | b'\r' | b'\t')) {
        i += 1;
    }
    i
}

/// The index after `word` if `b` holds it at `i`.
fn literal(b: &[u8], i: usize, word: &[u8]) -> Option<usize> {
    (b.get(i..i + word.len())? == word).then_some(i + word.len())
}

/// The index of the quote that closes the string whose text begins at `i`; `None` at an
/// escape or a control character (both for serde_json), or if the string does not end.
/// Eight bytes are looked at a time.
fn string_end(b: &[u8], mut i: usize) -> Option<usize> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    // The high bit of each byte of `v` that is zero; exact up to the first such byte.
    let zero = |v: u64| v.wrapping_sub(ONES) & !v & HIGH;
    while let Some(chunk) = b.get(i..i + 8) {
        let v = u64::from_le_bytes(chunk.try_into().ok()?);
        let stops = zero(v ^ (ONES * u64::from(b'"')))
            | zero(v ^ (ONES * u64::from(b'\\')))
            // Bytes below 0x20.
            | (v.wrapping_sub(ONES * 0x20) & !v & HIGH);
        if stops != 0 {
            i += (stops.trailing_zeros() / 8) as usize;
            return (b[i] == b'"').then_some(i);
        }
        i += 8;
    }
    while let Some(&c) = b.get(i) {
        match c {
            b'"' => return Some(i),
            b'\\' | 0..=0x1f => return None,
            _ => i += 1,
        }
    }
    None
}

/// The end of the JSON number at `i` (`-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?`) and
/// whether it is an integer; `None` if no number is there.
fn number_end(b: &[u8], mut i: usize) -> Option<(usize, bool)> {
    let digits = |mut i: usize| {
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        i
    };
    if b.get(i) == Some(&b'-') {
        i += 1;
    }
    i = match b.get(i)? {
        b'0' => i + 1,
        b'1'..=b'9' => digits(i + 1),
        _ => return None,
    };
    let mut integer = true;
    if b.get(i) == Some(&b'.') {
        integer = false;
        let end = digits(i + 1);
        if end == i + 1 {
            return None;
        }
        i = end;
    }
    if matches!(b.get(i), Some(b'e' | b'E')) {
        integer = false;
        i += 1;
        if matches!(b.get(i), Some(b'+' | b'-')) {
            i += 1;
        }
        let end = digits(i);
        if end == i {
            return None;
        }
        i = end;
    }
    Some((i, integer))
}
