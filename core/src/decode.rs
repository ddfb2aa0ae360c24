//! Columnar decoding: a batch of Kafka messages (JSON objects, wire format v1) becomes one Arrow
//! `RecordBatch` of the schema's columns, plus one [`Rejected`] per message that cannot be an
//! event, with its raw bytes and the reason.
//!
//! Each message is parsed once into one reusable slot per field, its strings borrowed from the
//! payload where they can be; unknown keys are skipped without being materialised (forward
//! compatibility). A flat object of plain strings and integers, the common event, is read by a
//! single scan (`flat`); any other JSON by a `serde_json` visitor. A row is checked whole before anything is appended,
//! so a bad message never leaves half a row behind. serde_json's recursion limit (128) bounds
//! nesting.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use chrono::DateTime;
use datafusion::arrow::array::{
    ArrayRef, BooleanBuilder, Decimal128Builder, Float64Builder, Int64Builder, StringBuilder,
    TimestampMicrosecondBuilder,
};
use datafusion::arrow::compute::kernels::cast_utils;
use datafusion::arrow::datatypes::Decimal128Type;
use datafusion::arrow::record_batch::RecordBatch;
use serde::de::{self, Deserialize, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde_json::value::RawValue;

use crate::error::Result;
use crate::schema::{EventSchema, FieldType};

mod flat;

/// One Kafka message as the decoder sees it.
#[derive(Debug, Clone, Copy)]
pub struct Message<'a> {
    /// The value; `None` for a tombstone.
    pub payload: Option<&'a [u8]>,
    pub partition: i32,
    pub offset: i64,
    /// The broker's timestamp in epoch milliseconds, when known.
    pub timestamp_ms: Option<i64>,
}

/// Why a message was rejected; the dead-letter table's `reason` column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RejectReason {
    /// Not a JSON object: empty, truncated, invalid UTF-8, too deep, not an object.
    Decode,
    /// Valid JSON that does not fit the schema: a missing required field or a wrong type.
    Schema,
    /// An event time outside the accepted window (before 1970, or too far in the future).
    EventTime,
}

impl RejectReason {
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::Decode => "decode",
            RejectReason::Schema => "schema",
            RejectReason::EventTime => "event_time",
        }
    }
}

impl fmt::Display for RejectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A message that is not an event, kept whole for the dead-letter table.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejected {
    pub partition: i32,
    pub offset: i64,
    pub timestamp_ms: Option<i64>,
    /// The payload exactly as received (empty for a tombstone).
    pub raw: Vec<u8>,
    pub reason: RejectReason,
    /// What was wrong, for a person.
    pub error: String,
}

/// The events of one decoded batch.
#[derive(Debug, Clone)]
pub struct Decoded {
    /// One row per valid message, the schema's columns in file order.
    pub batch: RecordBatch,
    /// The Kafka partition of each row.
    pub partitions: Vec<i32>,
    /// The Kafka offset of each row.
    pub offsets: Vec<i64>,
    /// The messages that are not events.
    pub rejected: Vec<Rejected>,
}

/// Limits on event time; times outside go to the dead-letter table as `event_time`.
#[derive(Debug, Clone, Copy)]
pub struct TimePolicy {
    /// Events later than `now + max_future_us` are rejected (clocks of devices are wrong).
    pub max_future_us: i64,
}

impl Default for TimePolicy {
    fn default() -> Self {
        TimePolicy {
            max_future_us: crate::time::DAY_US,
        }
    }
}

/// Decodes batches of messages of one schema. Cheap to clone; holds no per-batch state.
#[derive(Debug, Clone)]
pub struct Decoder {
    schema: Arc<EventSchema>,
    index: Arc<HashMap<String, usize>>,
    /// Per field: whether it is a decimal, kept as its JSON text until parsed exactly.
    decimal: Arc<[bool]>,
    policy: TimePolicy,
}

/// A field's raw JSON value, borrowed from the payload where possible.
#[derive(Debug, Clone)]
enum Slot<'de> {
    Missing,
    Null,
    Str(Cow<'de, str>),
    I64(i64),
    U64(u64),
    F64(f64),
    Bool(bool),
    Nested(&'static str),
    /// The JSON text of a decimal field's value, parsed without passing through f64.
    Raw(&'de str),
}

impl Slot<'_> {
    fn json_type(&self) -> &'static str {
        match self {
            Slot::Missing => "nothing",
            Slot::Null => "null",
            Slot::Str(_) => "a string",
            Slot::I64(_) | Slot::U64(_) | Slot::F64(_) => "a number",
            Slot::Bool(_) => "a boolean",
            Slot::Nested(t) => t,
            Slot::Raw(text) => match text.as_bytes().first() {
                Some(b'"') => "a string",
                Some(b'{') => "an object",
                Some(b'[') => "an array",
                Some(b't' | b'f') => "a boolean",
                Some(b'n') => "null",
                _ => "a number",
            },
        }
    }
}

/// A field's checked value, ready to append.
enum Value<'a> {
    Null,
    Str(&'a str),
    I64(i64),
    F64(f64),
    I128(i128),
    Bool(bool),
}

/// A checked value kept from the row's check to its append, so that nothing (a time, a
/// decimal) is parsed twice; a string stays in its slot.
#[derive(Debug, Clone, Copy)]
enum Checked {
    Null,
    Str,
    I64(i64),
    F64(f64),
    I128(i128),
    Bool(bool),
}

impl Checked {
    fn of(v: &Value<'_>) -> Self {
        match *v {
            Value::Null => Checked::Null,
            Value::Str(_) => Checked::Str,
            Value::I64(x) => Checked::I64(x),
            Value::F64(x) => Checked::F64(x),
            Value::I128(x) => Checked::I128(x),
            Value::Bool(x) => Checked::Bool(x),
        }
    }

    /// The value again, its string taken from `slot`, the slot it was checked from.
    fn value<'a>(self, slot: &'a Slot<'_>) -> Value<'a> {
        match (self, slot) {
            (Checked::Str, Slot::Str(s)) => Value::Str(s),
            (Checked::Str | Checked::Null, _) => Value::Null,
            (Checked::I64(x), _) => Value::I64(x),
            (Checked::F64(x), _) => Value::F64(x),
            (Checked::I128(x), _) => Value::I128(x),
            (Checked::Bool(x), _) => Value::Bool(x),
        }
    }
}

enum Builder {
    Str(StringBuilder),
    I64(Int64Builder),
    F64(Float64Builder),
    Dec(Decimal128Builder),
    Bool(BooleanBuilder),
    Ts(TimestampMicrosecondBuilder),
}

impl Builder {
    fn new(ty: FieldType, capacity: usize) -> Self {
        match ty {
            FieldType::String => {
                Builder::Str(StringBuilder::with_capacity(capacity, capacity * 16))
            }
            FieldType::Int => Builder::I64(Int64Builder::with_capacity(capacity)),
            FieldType::Float => Builder::F64(Float64Builder::with_capacity(capacity)),
            FieldType::Decimal { scale } => Builder::Dec(
                Decimal128Builder::with_capacity(capacity)
                    .with_precision_and_scale(38, scale as i8)
                    .expect("scale is checked when the schema loads"),
            ),
            FieldType::Bool => Builder::Bool(BooleanBuilder::with_capacity(capacity)),
            FieldType::Timestamp => Builder::Ts(
                TimestampMicrosecondBuilder::with_capacity(capacity).with_timezone("UTC"),
            ),
        }
    }

    fn append(&mut self, v: &Value<'_>) {
        match (self, v) {
            (Builder::Str(b), Value::Str(s)) => b.append_value(s),
            (Builder::I64(b), Value::I64(x)) => b.append_value(*x),
            (Builder::F64(b), Value::F64(x)) => b.append_value(*x),
            (Builder::Dec(b), Value::I128(x)) => b.append_value(*x),
            (Builder::Bool(b), Value::Bool(x)) => b.append_value(*x),
            (Builder::Ts(b), Value::I64(x)) => b.append_value(*x),
            (Builder::Str(b), _) => b.append_null(),
            (Builder::I64(b), _) => b.append_null(),
            (Builder::F64(b), _) => b.append_null(),
            (Builder::Dec(b), _) => b.append_null(),
            (Builder::Bool(b), _) => b.append_null(),
            (Builder::Ts(b), _) => b.append_null(),
        }
    }

    fn finish(self) -> ArrayRef {
        match self {
            Builder::Str(mut b) => Arc::new(b.finish()),
            Builder::I64(mut b) => Arc::new(b.finish()),
            Builder::F64(mut b) => Arc::new(b.finish()),
            Builder::Dec(mut b) => Arc::new(b.finish()),
            Builder::Bool(mut b) => Arc::new(b.finish()),
            Builder::Ts(mut b) => Arc::new(b.finish()),
        }
    }
}

impl Decoder {
    pub fn new(schema: Arc<EventSchema>) -> Self {
        let index = schema
            .fields
            .iter()
            .enumerate()
            .map(|(i, f)| (f.name.clone(), i))
            .collect();
        let decimal = schema
            .fields
            .iter()
            .map(|f| matches!(f.ty, FieldType::Decimal { .. }))
            .collect();
        Decoder {
            schema,
            index: Arc::new(index),
            decimal,
            policy: TimePolicy::default(),
        }
    }

    pub fn with_time_policy(mut self, policy: TimePolicy) -> Self {
        self.policy = policy;
        self
    }

    /// The latest event time accepted when the wall clock reads `now_us`.
    pub fn latest_event_time(&self, now_us: i64) -> i64 {
        now_us.saturating_add(self.policy.max_future_us)
    }

    pub fn schema(&self) -> &Arc<EventSchema> {
        &self.schema
    }

    fn keys(&self) -> Keys<'_> {
        Keys {
            names: &self.schema.fields,
            index: &self.index,
        }
    }

    /// Decodes `messages`; `now_us` is the wall clock used by the event-time policy.
    pub fn decode(&self, messages: &[Message<'_>], now_us: i64) -> Result<Decoded> {
        let fields = &self.schema.fields;
        let mut builders: Vec<Builder> = fields
            .iter()
            .map(|f| Builder::new(f.ty, messages.len()))
            .collect();
        let mut partitions = Vec::with_capacity(messages.len());
        let mut offsets = Vec::with_capacity(messages.len());
        let mut rejected = Vec::new();
        let mut slots: Vec<Slot<'_>> = Vec::with_capacity(fields.len());
        let mut checked: Vec<Checked> = Vec::with_capacity(fields.len());
        let max_time = self.latest_event_time(now_us);

        for msg in messages {
            let reject = |reason: RejectReason, error: String| Rejected {
                partition: msg.partition,
                offset: msg.offset,
                timestamp_ms: msg.timestamp_ms,
                raw: msg.payload.unwrap_or_default().to_vec(),
                reason,
                error,
            };
            let payload = match msg.payload {
                Some(p) if !p.is_empty() => p,
                Some(_) => {
                    rejected.push(reject(RejectReason::Decode, "empty payload".into()));
                    continue;
                }
                None => {
                    rejected.push(reject(
                        RejectReason::Decode,
                        "null payload (tombstone)".into(),
                    ));
                    continue;
                }
            };
            slots.clear();
            slots.resize(fields.len(), Slot::Missing);
            if let Err(e) = parse_row(payload, &self.keys(), &self.decimal, &mut slots) {
                rejected.push(reject(RejectReason::Decode, e));
                continue;
            }
            // Check the whole row before appending anything.
            let mut failure = None;
            checked.clear();
            for (i, (slot, field)) in slots.iter().zip(fields).enumerate() {
                let value = check(slot, field.ty);
                if let Ok(v) = &value {
                    checked.push(Checked::of(v));
                }
                match value {
                    Ok(Value::Null) if field.required => {
                        failure = Some((
                            RejectReason::Schema,
                            format!("missing required field `{}`", field.name),
                        ));
                    }
                    Ok(Value::I64(t)) if i == self.schema.event_time && (t < 0 || t > max_time) => {
                        failure = Some((
                            RejectReason::EventTime,
                            format!(
                                "event time {} is outside the accepted window",
                                crate::time::format_us(t)
                            ),
                        ));
                    }
                    Ok(_) => {}
                    Err(e) => {
                        failure =
                            Some((RejectReason::Schema, format!("field `{}`: {e}", field.name)))
                    }
                }
                if failure.is_some() {
                    break;
                }
            }
            if let Some((reason, error)) = failure {
                rejected.push(reject(reason, error));
                continue;
            }
            for ((slot, c), b) in slots.iter().zip(&checked).zip(builders.iter_mut()) {
                b.append(&c.value(slot));
            }
            partitions.push(msg.partition);
            offsets.push(msg.offset);
        }
        let columns: Vec<ArrayRef> = builders.into_iter().map(Builder::finish).collect();
        let batch = RecordBatch::try_new(self.schema.arrow_schema(), columns)?;
        Ok(Decoded {
            batch,
            partitions,
            offsets,
            rejected,
        })
    }
}

fn check<'a>(slot: &'a Slot<'_>, ty: FieldType) -> std::result::Result<Value<'a>, String> {
    let wrong = || Err(format!("expected {}, got {}", ty.name(), slot.json_type()));
    Ok(match (ty, slot) {
        (_, Slot::Missing | Slot::Null) => Value::Null,
        (FieldType::String, Slot::Str(s)) => Value::Str(s),
        (FieldType::Int, Slot::I64(x)) => Value::I64(*x),
        (FieldType::Int, Slot::U64(x)) => match i64::try_from(*x) {
            Ok(x) => Value::I64(x),
            Err(_) => return Err(format!("{x} does not fit a 64-bit integer")),
        },
        (FieldType::Float, Slot::I64(x)) => Value::F64(*x as f64),
        (FieldType::Float, Slot::U64(x)) => Value::F64(*x as f64),
        (FieldType::Float, Slot::F64(x)) => Value::F64(*x),
        (FieldType::Decimal { .. }, Slot::Raw("null")) => Value::Null,
        (FieldType::Decimal { scale }, Slot::Raw(text)) => {
            let number = match text.strip_prefix('"').and_then(|t| t.strip_suffix('"')) {
                // A numeric string; an escape cannot be part of a number.
                Some(inner) if !inner.contains('\\') => inner.trim(),
                Some(_) => return wrong(),
                None if text.starts_with(|c: char| c == '-' || c.is_ascii_digit()) => text,
                None => return wrong(),
            };
            Value::I128(parse_decimal(number, scale)?)
        }
        (FieldType::Bool, Slot::Bool(b)) => Value::Bool(*b),
        (FieldType::Timestamp, Slot::Str(s)) => match utc_micros(s) {
            Some(us) => Value::I64(us),
            None => match DateTime::parse_from_rfc3339(s) {
                Ok(t) => Value::I64(t.timestamp_micros()),
                Err(e) => {
                    return Err(format!(
                        "`{}` is not an RFC 3339 time ({e})",
                        truncate(s, 64)
                    ))
                }
            },
        },
        (FieldType::Timestamp, Slot::I64(ms)) => match ms.checked_mul(1000) {
            Some(us) => Value::I64(us),
            None => return Err(format!("{ms} ms is out of range")),
        },
        (FieldType::Timestamp, Slot::U64(ms)) => {
            match i64::try_from(*ms).ok().and_then(|ms| ms.checked_mul(1000)) {
                Some(us) => Value::I64(us),
                None => return Err(format!("{ms} ms is out of range")),
            }
        }
        _ => return wrong(),
    })
}

/// Microseconds since the epoch of an RFC 3339 time in UTC's most common form,
/// `YYYY-MM-DDTHH:MM:SS[.f]Z` with up to nine digits of fraction (truncated to microseconds, as
/// chrono's `timestamp_micros` does), without chrono's general parser; `None` for anything
/// else (another offset, a leap second, a lower-case separator, an impossible date), which is
/// left to chrono.
fn utc_micros(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' || b[13] != b':' {
        return None;
    }
    if b[16] != b':' || *b.last()? != b'Z' {
        return None;
    }
    let num = |from: usize, to: usize| -> Option<i64> {
        b[from..to].iter().try_fold(0i64, |n, &c| {
            c.is_ascii_digit().then(|| n * 10 + i64::from(c - b'0'))
        })
    };
    let (year, month, day) = (num(0, 4)?, num(5, 7)?, num(8, 10)?);
    let (hour, minute, second) = (num(11, 13)?, num(14, 16)?, num(17, 19)?);
    let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
    let days_in_month = match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap => 29,
        2 => 28,
        _ => return None,
    };
    if day < 1 || day > days_in_month || hour > 23 || minute > 59 || second > 59 {
        return None;
    }
    let fraction = &b[19..b.len() - 1];
    let micros = match fraction {
        [] => 0,
        [b'.', digits @ ..] if (1..=9).contains(&digits.len()) => {
            let n = num(20, 20 + digits.len())?;
            // To nanoseconds, then truncated to microseconds.
            n * 10i64.pow(9 - digits.len() as u32) / 1000
        }
        _ => return None,
    };
    // Days since 1970-01-01 of the proleptic Gregorian date (Howard Hinnant's
    // `days_from_civil`).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(((days * 24 + hour) * 60 + minute) * 60_000_000 + second * 1_000_000 + micros)
}

/// A decimal with `scale` digits after the point, in units of its scale, from its text (a JSON
/// number or a numeric string), exactly: the text never passes through f64. A value with more
/// digits after the point than the scale keeps is refused, not rounded.
pub fn parse_decimal(text: &str, scale: u8) -> std::result::Result<i128, String> {
    let shown = truncate(text, 64);
    if !text.contains(['e', 'E']) {
        if let Some((_, fraction)) = text.split_once('.') {
            if fraction.trim_end_matches('0').len() > scale as usize {
                return Err(format!(
                    "`{shown}` has more than {scale} digits after the point"
                ));
            }
        }
    }
    cast_utils::parse_decimal::<Decimal128Type>(text, crate::metric::DECIMAL_PRECISION, scale as i8)
        .map_err(|_| format!("`{shown}` is not a decimal number that fits 38 digits"))
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

fn parse_row<'de>(
    payload: &'de [u8],
    keys: &Keys<'_>,
    decimal: &[bool],
    slots: &mut [Slot<'de>],
) -> std::result::Result<(), String> {
    // Checked as UTF-8 once, whole, so that the parser need not check each string again.
    let text = std::str::from_utf8(payload).map_err(|e| format!("not UTF-8: {e}"))?;
    if flat::scan(text, keys, decimal, slots).is_some() {
        return Ok(());
    }
    slots.fill(Slot::Missing);
    parse_row_general(text, keys, decimal, slots)
}

/// [`parse_row`] by serde_json, for any JSON.
fn parse_row_general<'de>(
    text: &'de str,
    keys: &Keys<'_>,
    decimal: &[bool],
    slots: &mut [Slot<'de>],
) -> std::result::Result<(), String> {
    let mut de = serde_json::Deserializer::from_str(text);
    RowSeed {
        keys,
        decimal,
        slots,
    }
    .deserialize(&mut de)
    .map_err(|e| e.to_string())?;
    de.end().map_err(|e| e.to_string())
}

/// The schema's field names, to find a key's field by.
#[derive(Clone, Copy)]
struct Keys<'s> {
    /// In the schema's order, which is the order producers write them in, as a rule.
    names: &'s [crate::schema::FieldDef],
    index: &'s HashMap<String, usize>,
}

impl Keys<'_> {
    /// The field named `key`, looked for first at `hint` (the field after the previous key):
    /// one comparison for a row written in the schema's order, a hash lookup otherwise.
    fn find(&self, key: &str, hint: usize) -> Option<usize> {
        match self.names.get(hint) {
            Some(f) if f.name == key => Some(hint),
            _ => self.index.get(key).copied(),
        }
    }
}

struct RowSeed<'s, 'de> {
    keys: &'s Keys<'s>,
    decimal: &'s [bool],
    slots: &'s mut [Slot<'de>],
}

impl<'de> DeserializeSeed<'de> for RowSeed<'_, 'de> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> std::result::Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for RowSeed<'_, 'de> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<(), A::Error> {
        let mut hint = 0;
        while let Some(key) = map.next_key_seed(KeySeed(self.keys, hint))? {
            if let Some(i) = key {
                hint = i + 1;
            }
            match key {
                Some(i) if self.decimal[i] => self.slots[i] = map.next_value_seed(RawSeed)?,
                Some(i) => self.slots[i] = map.next_value_seed(SlotSeed)?,
                None => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(())
    }
}

/// Looks a key up without allocating; `None` for keys the schema does not know.
struct KeySeed<'s>(&'s Keys<'s>, usize);

impl<'de> DeserializeSeed<'de> for KeySeed<'_> {
    type Value = Option<usize>;
    fn deserialize<D: Deserializer<'de>>(
        self,
        d: D,
    ) -> std::result::Result<Option<usize>, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeySeed<'_> {
    type Value = Option<usize>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a key")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> std::result::Result<Option<usize>, E> {
        Ok(self.0.find(v, self.1))
    }
}

/// A value kept as its JSON text, borrowed from the payload.
struct RawSeed;

impl<'de> DeserializeSeed<'de> for RawSeed {
    type Value = Slot<'de>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> std::result::Result<Slot<'de>, D::Error> {
        <&'de RawValue>::deserialize(d).map(|raw| Slot::Raw(raw.get()))
    }
}

struct SlotSeed;

impl<'de> DeserializeSeed<'de> for SlotSeed {
    type Value = Slot<'de>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> std::result::Result<Slot<'de>, D::Error> {
        d.deserialize_any(SlotVisitor)
    }
}

struct SlotVisitor;

impl<'de> Visitor<'de> for SlotVisitor {
    type Value = Slot<'de>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> std::result::Result<Slot<'de>, E> {
        Ok(Slot::Str(Cow::Borrowed(v)))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> std::result::Result<Slot<'de>, E> {
        Ok(Slot::Str(Cow::Owned(v.to_owned())))
    }
    fn visit_string<E: de::Error>(self, v: String) -> std::result::Result<Slot<'de>, E> {
        Ok(Slot::Str(Cow::Owned(v)))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> std::result::Result<Slot<'de>, E> {
        Ok(Slot::I64(v))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> std::result::Result<Slot<'de>, E> {
        Ok(Slot::U64(v))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> std::result::Result<Slot<'de>, E> {
        Ok(Slot::F64(v))
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> std::result::Result<Slot<'de>, E> {
        Ok(Slot::Bool(v))
    }
    fn visit_unit<E: de::Error>(self) -> std::result::Result<Slot<'de>, E> {
        Ok(Slot::Null)
    }
    fn visit_none<E: de::Error>(self) -> std::result::Result<Slot<'de>, E> {
        Ok(Slot::Null)
    }
    fn visit_seq<A: de::SeqAccess<'de>>(
        self,
        mut seq: A,
    ) -> std::result::Result<Slot<'de>, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Slot::Nested("an array"))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<Slot<'de>, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Slot::Nested("an object"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::{Array, AsArray};
    use datafusion::arrow::datatypes::{Decimal128Type, Int64Type, TimestampMicrosecondType};
    use std::path::Path;

    fn decoder() -> Decoder {
        let s = EventSchema::from_toml(
            Path::new("ev.toml"),
            r#"
event_time = "ts"
event_id = "id"
fields = [
  { name = "id", type = "string" }, { name = "ts", type = "timestamp" },
  { name = "n", type = "int" }, { name = "price", type = "decimal", scale = 2 },
  { name = "ok", type = "bool" }, { name = "name", type = "string", required = true },
]"#,
        )
        .unwrap();
        Decoder::new(Arc::new(s))
    }

    fn msgs(payloads: &[&[u8]]) -> Vec<Message<'static>> {
        payloads
            .iter()
            .enumerate()
            .map(|(i, p)| Message {
                payload: Some(Box::leak(p.to_vec().into_boxed_slice())),
                partition: 0,
                offset: i as i64,
                timestamp_ms: None,
            })
            .collect()
    }

    const NOW: i64 = 1_800_000_000_000_000;

    /// The single scan gives every row it reads the slots serde_json gives it, and leaves to
    /// serde_json what it cannot read; it reads the common event. Rows are made at random from
    /// pieces chosen to sit on either side of each of its limits.
    #[test]
    fn the_single_scan_reads_rows_as_serde_json_does() {
        let d = decoder();
        let keys = d.keys();
        let read = |text: &str, fast: bool| -> Option<std::result::Result<String, String>> {
            let mut slots = vec![Slot::Missing; d.schema.fields.len()];
            if fast {
                flat::scan(text, &keys, &d.decimal, &mut slots)?;
                Some(Ok(format!("{slots:?}")))
            } else {
                let parsed = parse_row_general(text, &keys, &d.decimal, &mut slots);
                Some(parsed.map(|()| format!("{slots:?}")))
            }
        };
        let common = r#"{"id":"e1","ts":"2026-11-26T00:00:00.050Z","n":12,"price":null,"ok":true,"name":"x"}"#;
        assert!(
            read(common, true).is_some(),
            "the common event takes the scan"
        );

        let keys_pool = [
            "id",
            "ts",
            "n",
            "price",
            "ok",
            "name",
            "unknown",
            "nam",
            "name2",
            r"n\u0061me",
            "",
        ];
        let values = [
            r#""abc""#,
            r#""""#,
            r#""a\"b""#,
            r#""\u00e9""#,
            "\"\u{e9}t\u{e9}\"",
            "\"tab\there\"",
            "\"\u{1}\"",
            r#""2026-11-26T00:00:00.050Z""#,
            r#""12.5""#,
            r#""1234567890abcdef""#,
            "0",
            "-0",
            "12",
            "-12",
            "1.5",
            "1e3",
            "-1.25E-2",
            "9223372036854775807",
            "9223372036854775808",
            "-9223372036854775808",
            "-9223372036854775809",
            "18446744073709551616",
            "01",
            "1.",
            "-",
            ".5",
            "1e",
            "null",
            "true",
            "false",
            "nul",
            "tru",
            r#"{"a":1}"#,
            "[1,2]",
            "[]",
            "{}",
            r#""unterminated"#,
        ];
        let spaces = ["", "", "", " ", "\n\t ", "\r"];
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = |n: usize| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % n as u64) as usize
        };
        let (mut fast, mut left) = (0, 0);
        for _ in 0..20_000 {
            let mut text = String::from(spaces[next(spaces.len())]);
            text.push('{');
            for k in 0..next(8) {
                if k > 0 {
                    text.push(',');
                }
                text.push_str(spaces[next(spaces.len())]);
                // Mostly the schema's order, as producers write it.
                let key = if next(3) > 0 {
                    keys_pool[k.min(5)]
                } else {
                    keys_pool[next(keys_pool.len())]
                };
                text.push_str(&format!("\"{key}\""));
                text.push_str(spaces[next(spaces.len())]);
                text.push(':');
                text.push_str(spaces[next(spaces.len())]);
                text.push_str(values[next(values.len())]);
                text.push_str(spaces[next(spaces.len())]);
            }
            text.push('}');
            text.push_str(spaces[next(spaces.len())]);
            match next(10) {
                0 => {
                    let mut cut = next(text.len() + 1);
                    while !text.is_char_boundary(cut) {
                        cut -= 1;
                    }
                    text.truncate(cut);
                }
                1 => text.push_str(" x"),
                _ => {}
            }
            let general = read(&text, false).expect("the general parser always answers");
            match read(&text, true) {
                Some(scanned) => {
                    fast += 1;
                    assert_eq!(scanned, general, "{text}");
                }
                None if general.is_ok() => left += 1,
                None => {}
            }
        }
        assert!(
            fast > 1_000 && left > 1_000,
            "{fast} rows scanned, {left} valid ones left"
        );
    }

    /// A row's keys in any order, repeated, or among unknown ones decode alike: the lookup
    /// that expects the schema's order only speeds that order up.
    #[test]
    fn keys_decode_alike_in_any_order() {
        let d = decoder();
        let rows: [&[u8]; 5] = [
            br#"{"id":"a","ts":"2026-11-25T10:00:00.25Z","n":3,"price":"1.50","ok":true,"name":"x"}"#,
            br#"{"name":"x","ok":true,"price":"1.50","n":3,"ts":"2026-11-25T10:00:00.25Z","id":"a"}"#,
            br#"{"zz":1,"id":"a","q":{"n":9},"ts":"2026-11-25T10:00:00.25Z","n":3,"id2":"b","price":"1.50","ok":true,"name":"x","ts2":0}"#,
            br#"{"ts":"2026-11-25T10:00:00.25Z","id":"a","n":3,"name":"x","price":"1.50","ok":true}"#,
            br#"{"id":"z","ts":"2026-11-25T10:00:00.25Z","n":3,"price":"1.50","ok":true,"name":"x","id":"a"}"#,
        ];
        let out = d.decode(&msgs(&rows), NOW).unwrap();
        assert!(out.rejected.is_empty(), "{:?}", out.rejected);
        let b = &out.batch;
        for r in 1..rows.len() {
            for c in 0..b.num_columns() {
                assert_eq!(
                    b.column(c).slice(r, 1).to_data(),
                    b.column(c).slice(0, 1).to_data(),
                    "row {r}, column {c}"
                );
            }
        }
        assert_eq!(
            b.column(1)
                .as_primitive::<TimestampMicrosecondType>()
                .value(0),
            parse_instant_us("2026-11-25T10:00:00.25Z")
        );
    }

    fn parse_instant_us(s: &str) -> i64 {
        chrono::DateTime::parse_from_rfc3339(s)
            .unwrap()
            .timestamp_micros()
    }

    /// The fast path for UTC times agrees with chrono on every time it accepts, and leaves to
    /// chrono every text it does not (which chrono then accepts or refuses itself).
    #[test]
    fn utc_times_parse_as_chrono_parses_them() {
        use chrono::{DateTime, Utc};
        let chrono_us = |s: &str| {
            DateTime::parse_from_rfc3339(s)
                .ok()
                .map(|t| t.timestamp_micros())
        };
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let (lo, hi) = (-62_135_596_800_000_000i64, 253_402_300_799_000_000i64);
        let mut fast = 0;
        for _ in 0..20_000 {
            let us = lo + (next() % (hi - lo) as u64) as i64;
            let nanos = next() % 1_000_000_000;
            let t = DateTime::<Utc>::from_timestamp_micros(us).unwrap();
            let base = t.format("%Y-%m-%dT%H:%M:%S").to_string();
            let digits = (next() % 11) as usize;
            let text = match digits {
                0 => format!("{base}Z"),
                10 => format!("{base}+00:00"),
                d => format!("{base}.{}Z", &format!("{nanos:09}")[..d]),
            };
            let got = utc_micros(&text);
            if got.is_some() {
                fast += 1;
            }
            assert!(got.is_none() || got == chrono_us(&text), "{text}: {got:?}");
            assert!(chrono_us(&text).is_some(), "{text}");
        }
        assert!(fast > 15_000, "the fast path took only {fast} of 20,000");
        for text in [
            "2024-02-29T00:00:00Z",
            "1969-12-31T23:59:59.999999Z",
            "1969-12-31T23:59:59.9999999Z",
            "2000-02-29T12:00:00.5Z",
            "0000-01-01T00:00:00Z",
            "9999-12-31T23:59:59.123456789Z",
        ] {
            assert_eq!(utc_micros(text), chrono_us(text), "{text}");
            assert!(utc_micros(text).is_some(), "{text}");
        }
        for text in [
            "2023-02-29T00:00:00Z",
            "1900-02-29T00:00:00Z",
            "2024-04-31T00:00:00Z",
            "2024-13-01T00:00:00Z",
            "2024-00-01T00:00:00Z",
            "2024-01-00T00:00:00Z",
            "2024-01-01T24:00:00Z",
            "2024-01-01T23:60:00Z",
            "2016-12-31T23:59:60Z",
            "2024-01-01t00:00:00Z",
            "2024-01-01T00:00:00z",
            "2024-01-01 00:00:00Z",
            "2024-01-01T00:00:00.Z",
            "2024-01-01T00:00:00.1234567890Z",
            "2024-01-01T00:00:00+01:00",
            "2024-01-01T00:00:00",
            "+2024-01-01T00:00:00Z",
            "2024-1-01T00:00:00Z",
            "2024-01-01T00:00:0xZ",
            "2024-01-01T00:00:00.12a4Z",
            "",
        ] {
            assert_eq!(utc_micros(text), None, "{text}");
        }
    }

    #[test]
    fn decodes_valid_rows_columnar() {
        let d = decoder()
            .decode(
                &msgs(&[
                    br#"{"id":"a","ts":"2026-11-25T13:00:00Z","n":3,"price":4.99,"ok":true,"name":"x","extra":{"deep":[1,2]}}"#,
                    br#"{"id":"b\u00e9","ts":1795611600000,"name":"y"}"#,
                ]),
                NOW,
            )
            .unwrap();
        assert!(d.rejected.is_empty(), "{:?}", d.rejected);
        assert_eq!(d.batch.num_rows(), 2);
        assert_eq!(d.batch.column(0).as_string::<i32>().value(1), "bé");
        let ts = d.batch.column(1).as_primitive::<TimestampMicrosecondType>();
        assert_eq!(ts.value(0), 1_795_611_600_000_000);
        assert_eq!(ts.value(1), 1_795_611_600_000_000);
        assert_eq!(d.batch.column(2).as_primitive::<Int64Type>().value(0), 3);
        assert!(d.batch.column(2).is_null(1));
        assert_eq!(
            d.batch.column(3).as_primitive::<Decimal128Type>().value(0),
            499
        );
        assert_eq!(d.offsets, [0, 1]);
    }

    #[test]
    fn rejects_each_bad_message_with_a_reason_and_keeps_the_rest() {
        let good = br#"{"id":"a","ts":"2026-11-25T13:00:00Z","name":"x"}"#;
        let m = msgs(&[
            br#"{"id":"a","ts":"2026-11-25T13:00"#,           // truncated
            b"{\"id\":\"\xff\xfe\",\"ts\":1,\"name\":\"x\"}", // invalid UTF-8
            good,
            br#"{"id":"a","ts":"2026-11-25T13:00:00Z","name":"x","n":"abc"}"#, // wrong type
            br#"{"id":"a","ts":"2026-11-25T13:00:00Z"}"#,                      // missing required
            br#"[1,2,3]"#,                                                     // not an object
            br#"{"id":"a","ts":"2099-01-01T00:00:00Z","name":"x"}"#,           // far future
            br#"{"id":"a","ts":"yesterday","name":"x"}"#,                      // not a time
            b"",                                                               // empty
            good,
        ]);
        let d = decoder().decode(&m, NOW).unwrap();
        assert_eq!(d.batch.num_rows(), 2);
        assert_eq!(d.offsets, [2, 9]);
        let reasons: Vec<_> = d.rejected.iter().map(|r| (r.offset, r.reason)).collect();
        use RejectReason::*;
        assert_eq!(
            reasons,
            [
                (0, Decode),
                (1, Decode),
                (3, Schema),
                (4, Schema),
                (5, Decode),
                (6, EventTime),
                (7, Schema),
                (8, Decode)
            ]
        );
        assert_eq!(d.rejected[1].raw, m[1].payload.unwrap());
        assert!(
            d.rejected[2].error.contains("`n`"),
            "{}",
            d.rejected[2].error
        );
        assert!(
            d.rejected[3].error.contains("`name`"),
            "{}",
            d.rejected[3].error
        );
    }

    #[test]
    fn deep_nesting_never_overflows_the_stack() {
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        let unknown =
            format!(r#"{{"id":"a","ts":"2026-11-25T13:00:00Z","name":"x","extra":{deep}}}"#);
        let known = format!(r#"{{"id":"a","ts":"2026-11-25T13:00:00Z","name":{deep}}}"#);
        let d = decoder()
            .decode(
                &msgs(&[deep.as_bytes(), unknown.as_bytes(), known.as_bytes()]),
                NOW,
            )
            .unwrap();
        assert_eq!(d.offsets, [1], "an unknown deep field is skipped");
        let reasons: Vec<_> = d.rejected.iter().map(|r| r.reason).collect();
        assert_eq!(reasons, [RejectReason::Decode, RejectReason::Schema]);
    }

    #[test]
    fn decimals_are_parsed_from_their_text_exactly() {
        let row = |price: &str| {
            format!(r#"{{"id":"a","ts":"2026-11-25T13:00:00Z","name":"x","price":{price}}}"#)
        };
        let texts = [
            row("0.1"),
            row("\"0.2\""),
            row("123456789012345678901234567890.12"),
            row("-7"),
            row("1.5e2"),
            row("null"),
            row("4.999"),
            row("\"abc\""),
            row("true"),
        ];
        let payloads: Vec<&[u8]> = texts.iter().map(|t| t.as_bytes()).collect();
        let d = decoder().decode(&msgs(&payloads), NOW).unwrap();
        let price = d.batch.column(3).as_primitive::<Decimal128Type>();
        assert_eq!(price.value(0), 10);
        assert_eq!(price.value(1), 20);
        assert_eq!(price.value(2), 12_345_678_901_234_567_890_123_456_789_012);
        assert_eq!(price.value(3), -700);
        assert_eq!(price.value(4), 15_000);
        assert!(price.is_null(5));
        let rejected: Vec<_> = d.rejected.iter().map(|r| r.offset).collect();
        assert_eq!(rejected, [6, 7, 8]);
        assert!(d.rejected[0].error.contains("digits after the point"));
        assert!(d.rejected[2].error.contains("a boolean"));
    }

    #[test]
    fn tombstones_are_rejected() {
        let m = [Message {
            payload: None,
            partition: 3,
            offset: 7,
            timestamp_ms: Some(1),
        }];
        let d = decoder().decode(&m, NOW).unwrap();
        assert_eq!((d.rejected[0].partition, d.rejected[0].offset), (3, 7));
    }
}
