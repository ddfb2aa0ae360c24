//! Time: formatting and parsing of the instants Tandem shows and accepts, and an injectable
//! clock so that bucketing, grace periods and schedules are testable without sleeping.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use chrono::{DateTime, NaiveDate, SecondsFormat, Utc};

/// Microseconds in one minute, hour and day.
pub const MINUTE_US: i64 = 60_000_000;
pub const HOUR_US: i64 = 60 * MINUTE_US;
pub const DAY_US: i64 = 24 * HOUR_US;

/// RFC 3339 in UTC, seconds precision unless there are fractions.
pub fn format_us(us: i64) -> String {
    match DateTime::<Utc>::from_timestamp_micros(us) {
        Some(t) if us % 1_000_000 == 0 => t.to_rfc3339_opts(SecondsFormat::Secs, true),
        Some(t) => t.to_rfc3339_opts(SecondsFormat::AutoSi, true),
        None => us.to_string(),
    }
}

/// Parses an instant given by a user: RFC 3339, a date (`2026-11-25`, midnight UTC) or epoch
/// milliseconds (as Grafana's `${__from}` sends).
/// Instants outside what a calendar date can name are refused.
pub fn parse_instant(s: &str) -> Option<i64> {
    let s = s.trim();
    let us = if let Ok(ms) = s.parse::<i64>() {
        ms.checked_mul(1000)?
    } else if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        t.timestamp_micros()
    } else {
        NaiveDate::parse_from_str(s, "%Y-%m-%d")
            .ok()
            .map(|d| day_start_us(day_number(d)))?
    };
    DateTime::<Utc>::from_timestamp_micros(us).map(|_| us)
}

/// Days since 1970-01-01 of the day holding `us`.
pub fn day_of(us: i64) -> i64 {
    us.div_euclid(DAY_US)
}

/// The UTC calendar date holding `us` (clamped to the dates chrono knows).
pub fn date_of(us: i64) -> NaiveDate {
    DateTime::<Utc>::from_timestamp_micros(us).map_or(
        if us < 0 {
            NaiveDate::MIN
        } else {
            NaiveDate::MAX
        },
        |d| d.date_naive(),
    )
}

/// The UTC offset of `tz` at `us` (microseconds; 0 outside chrono's dates).
pub fn offset_us(tz: chrono_tz::Tz, us: i64) -> i64 {
    use chrono::Offset;
    DateTime::<Utc>::from_timestamp_micros(us).map_or(0, |d| {
        i64::from(d.with_timezone(&tz).offset().fix().local_minus_utc()) * 1_000_000
    })
}

/// The UTC instant of the first moment of local `date` in `tz` (midnight, or the first
/// moment after it where a change of offset skips midnight).
fn local_start_us(tz: chrono_tz::Tz, date: NaiveDate) -> Option<i64> {
    use chrono::TimeZone;
    (0..=3).find_map(|h| {
        let t = date.and_hms_opt(h, 0, 0)?;
        tz.from_local_datetime(&t)
            .earliest()
            .map(|d| d.timestamp_micros())
    })
}

/// The start (a UTC instant) of the day, week (from Monday) or month in `tz` that holds `us`;
/// other granularities floor in UTC.
pub fn local_floor(tz: chrono_tz::Tz, g: crate::view::Granularity, us: i64) -> i64 {
    use crate::view::Granularity;
    use chrono::Datelike;
    let Some(local) = DateTime::<Utc>::from_timestamp_micros(us).map(|d| d.with_timezone(&tz))
    else {
        return g.floor(us);
    };
    let date = local.date_naive();
    let start = match g {
        Granularity::Day => Some(date),
        Granularity::Week => date.checked_sub_days(chrono::Days::new(u64::from(
            date.weekday().num_days_from_monday(),
        ))),
        Granularity::Month => date.with_day(1),
        _ => return g.floor(us),
    };
    start
        .and_then(|d| local_start_us(tz, d))
        .unwrap_or_else(|| g.floor(us))
}

/// The start (a UTC instant) of the local day, week or month in `tz` after the one starting at
/// `start` (saturating); other granularities as in UTC.
pub fn local_next(tz: chrono_tz::Tz, g: crate::view::Granularity, start: i64) -> i64 {
    use crate::view::Granularity;
    // Half a bucket in, so that the local date is the bucket's own whatever the offset.
    let inside = start.saturating_add(12 * 3_600_000_000);
    let Some(date) =
        DateTime::<Utc>::from_timestamp_micros(inside).map(|d| d.with_timezone(&tz).date_naive())
    else {
        return g.next(start);
    };
    let next = match g {
        Granularity::Day => date.checked_add_days(chrono::Days::new(1)),
        Granularity::Week => date.checked_add_days(chrono::Days::new(7)),
        Granularity::Month => date.checked_add_months(chrono::Months::new(1)),
        _ => return g.next(start),
    };
    let next = match (g, next) {
        (Granularity::Week, Some(d)) => Some(d),
        (Granularity::Month, Some(d)) => chrono::Datelike::with_day(&d, 1),
        (_, d) => d,
    };
    next.and_then(|d| local_start_us(tz, d)).unwrap_or(i64::MAX)
}

/// The first microsecond of day number `day`.
pub fn day_start_us(day: i64) -> i64 {
    day * DAY_US
}

/// The day number of a calendar date.
pub fn day_number(d: NaiveDate) -> i64 {
    d.signed_duration_since(NaiveDate::from_ymd_opt(1970, 1, 1).expect("valid"))
        .num_days()
}

/// `YYYY-MM-DD` of a day number (the master dataset's `dt` partition value).
pub fn day_string(day: i64) -> String {
    NaiveDate::from_ymd_opt(1970, 1, 1)
        .and_then(|epoch| epoch.checked_add_signed(chrono::Duration::try_days(day)?))
        .map_or_else(
            || format!("day {day}"),
            |d| d.format("%Y-%m-%d").to_string(),
        )
}

/// Parses a `YYYY-MM-DD` day into its day number.
pub fn parse_day(s: &str) -> Option<i64> {
    NaiveDate::parse_from_str(s.trim(), "%Y-%m-%d")
        .ok()
        .map(day_number)
}

/// A source of "now", in microseconds since the epoch.
pub trait Clock: Send + Sync + std::fmt::Debug {
    fn now_us(&self) -> i64;
}

/// The system clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_us(&self) -> i64 {
        Utc::now().timestamp_micros()
    }
}

/// A clock that only moves when told to, for tests.
#[derive(Debug, Default, Clone)]
pub struct MockClock(Arc<AtomicI64>);

impl MockClock {
    pub fn new(now_us: i64) -> Self {
        MockClock(Arc::new(AtomicI64::new(now_us)))
    }
    pub fn set(&self, now_us: i64) {
        self.0.store(now_us, Ordering::SeqCst)
    }
}

impl Clock for MockClock {
    fn now_us(&self) -> i64 {
        self.0.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_three_forms() {
        let t = 1_795_611_600_000_000;
        assert_eq!(parse_instant("2026-11-25T13:00:00Z"), Some(t));
        assert_eq!(parse_instant("1795611600000"), Some(t));
        assert_eq!(parse_instant("2026-11-25"), Some(t - 13 * 3_600_000_000));
        assert_eq!(parse_instant("yesterday"), None);
        assert_eq!(format_us(t), "2026-11-25T13:00:00Z");
        assert_eq!(day_string(day_of(t)), "2026-11-25");
        assert_eq!(parse_day("2026-11-25"), Some(day_of(t)));
    }
}
