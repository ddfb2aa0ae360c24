//! SQL jobs: an analyst's query over the master datasets, the published views and other jobs'
//! outputs, run for a date (`{{date}}`), on a cron schedule, into a Delta table partitioned by
//! that date.
//!
//! ```toml
//! # jobs/daily_buyers.toml -> output table `daily_buyers`, one partition per run date
//! kind = "sql"
//! schedule = "0 4 * * *"          # cron; UTC unless `timezone = "Europe/Paris"`
//! sql = "SELECT app_id, count(DISTINCT device_id) AS buyers FROM app_events WHERE dt = '{{date}}' GROUP BY app_id"
//! ```
//!
//! Parameters: `{{date}}` (the run's date, `YYYY-MM-DD`), `{{date+N}}` / `{{date-N}}` (N days
//! after or before it), `{{from}}` / `{{to}}` (the window of `window_days` days ending on the
//! date, inclusive). A scheduled run's date is the last day that is whole before the tick, in
//! the job's time zone, less `lag_days`: a job that reads a week after its date (retention on
//! D+7) says `lag_days = 7`, and the run for D waits until D+7 is final in its inputs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use chrono::{NaiveDate, TimeZone as _};
use croner::Cron;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::error::{CoreError, Result};

/// The partition column of a job's output table: the run's date.
pub const JOB_DATE_COLUMN: &str = "date";

/// An SQL job, parsed and checked (its SQL is planned against the tables by the batch layer).
#[derive(Debug, Clone)]
pub struct JobDef {
    pub name: String,
    pub path: PathBuf,
    /// The query, with its `{{...}}` parameters still in it.
    pub sql: String,
    /// When it runs; `None` runs only by hand (`tandem batch run --job`).
    pub schedule: Option<Schedule>,
    /// Days after the date its inputs must be final through.
    pub lag_days: i64,
    /// Days of the `{{from}}`..`{{to}}` window (ending on the date).
    pub window_days: i64,
    /// Attempts of a scheduled run before it is recorded as failed.
    pub max_attempts: u32,
    /// Wait before the first retry; doubled each time.
    pub retry_backoff_secs: u64,
    /// SHA-256 of the SQL and the keys that change what a run computes.
    pub definition_hash: String,
}

/// A cron schedule in a time zone.
#[derive(Debug, Clone)]
pub struct Schedule {
    pub cron: Cron,
    pub expr: String,
    pub timezone: chrono_tz::Tz,
}

impl Schedule {
    /// Parses a cron expression (5 fields, or 6 with seconds first) in `timezone`.
    pub fn parse(expr: &str, timezone: chrono_tz::Tz) -> std::result::Result<Self, String> {
        let cron = Cron::from_str(expr).map_err(|e| format!("`{expr}`: {e}"))?;
        Ok(Schedule {
            cron,
            expr: expr.to_string(),
            timezone,
        })
    }

    /// The newest tick at or before `now_us`, if there is one in the last 400 days.
    pub fn last_tick(&self, now_us: i64) -> Option<i64> {
        let now = self.timezone.timestamp_micros(now_us).single()?;
        let t = self.cron.find_previous_occurrence(&now, true).ok()?;
        let us = t.timestamp_micros();
        (now_us - us <= 400 * 86_400_000_000).then_some(us)
    }

    /// The first tick after `after_us`.
    pub fn next_tick(&self, after_us: i64) -> Option<i64> {
        let t = self.timezone.timestamp_micros(after_us).single()?;
        Some(
            self.cron
                .find_next_occurrence(&t, false)
                .ok()?
                .timestamp_micros(),
        )
    }

    /// The date of the last whole day before the tick at `tick_us`, in the schedule's zone.
    pub fn day_before(&self, tick_us: i64) -> Option<NaiveDate> {
        let local = self.timezone.timestamp_micros(tick_us).single()?;
        local.date_naive().pred_opt()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JobFile {
    kind: String,
    sql: String,
    schedule: Option<String>,
    timezone: Option<String>,
    lag_days: Option<i64>,
    window_days: Option<i64>,
    max_attempts: Option<u32>,
    retry_backoff_secs: Option<u64>,
}

impl JobDef {
    /// Parses a job from TOML text. Its SQL is checked by planning it (the batch layer).
    pub fn from_toml(path: &Path, text: &str) -> Result<Self> {
        let name = crate::schema::stem(path)?;
        let file: JobFile = toml::from_str(text).map_err(|e| CoreError::Definition {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        if file.kind != "sql" {
            return Err(CoreError::key(
                path,
                "kind",
                format!("`{}` is not an SQL job (expected \"sql\")", file.kind),
            ));
        }
        if !name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            || name.starts_with(|c: char| c.is_ascii_digit())
        {
            return Err(CoreError::Definition {
                path: path.to_path_buf(),
                message: format!(
                    "`{name}` cannot name the job's output table: use lowercase letters, digits and _"
                ),
            });
        }
        let timezone = match &file.timezone {
            None => chrono_tz::UTC,
            Some(tz) => tz.parse().map_err(|_| {
                CoreError::key(path, "timezone", format!("`{tz}` is not an IANA time zone"))
            })?,
        };
        let schedule = file
            .schedule
            .as_deref()
            .map(|s| Schedule::parse(s, timezone).map_err(|m| CoreError::key(path, "schedule", m)))
            .transpose()?;
        let positive = |v: Option<i64>, key: &str, default: i64| match v {
            None => Ok(default),
            Some(n) if (0..=3660).contains(&n) => Ok(n),
            Some(n) => Err(CoreError::key(
                path,
                key,
                format!("{n} is out of range (0 to 3660 days)"),
            )),
        };
        let lag_days = positive(file.lag_days, "lag_days", 0)?;
        let window_days = positive(file.window_days, "window_days", 1)?;
        if window_days == 0 {
            return Err(CoreError::key(path, "window_days", "must be at least 1"));
        }
        let max_attempts = file.max_attempts.unwrap_or(3);
        if max_attempts == 0 {
            return Err(CoreError::key(path, "max_attempts", "must be at least 1"));
        }
        // The parameters are checked here; the query itself when it is planned.
        render(&file.sql, NaiveDate::default(), window_days)
            .map_err(|m| CoreError::key(path, "sql", m))?;
        let mut hash = Sha256::new();
        hash.update(file.sql.as_bytes());
        hash.update(window_days.to_le_bytes());
        let definition_hash = crate::codec::hex(&hash.finalize());
        Ok(JobDef {
            name,
            path: path.to_path_buf(),
            sql: file.sql,
            schedule,
            lag_days,
            window_days,
            max_attempts,
            retry_backoff_secs: file.retry_backoff_secs.unwrap_or(60),
            definition_hash,
        })
    }

    /// The job's SQL for the run of `date`, parameters replaced.
    pub fn sql_for(&self, date: NaiveDate) -> Result<String> {
        render(&self.sql, date, self.window_days).map_err(|m| CoreError::key(&self.path, "sql", m))
    }

    /// The date a run at tick `tick_us` computes.
    pub fn date_for_tick(&self, tick_us: i64) -> Option<NaiveDate> {
        let schedule = self.schedule.as_ref()?;
        let d = schedule.day_before(tick_us)?;
        d.checked_sub_days(chrono::Days::new(self.lag_days as u64))
    }
}

/// Replaces the `{{...}}` parameters of `sql` for the run of `date`.
fn render(sql: &str, date: NaiveDate, window_days: i64) -> std::result::Result<String, String> {
    let mut out = String::with_capacity(sql.len());
    let mut rest = sql;
    while let Some(open) = rest.find("{{") {
        out.push_str(&rest[..open]);
        let after = &rest[open + 2..];
        let close = after
            .find("}}")
            .ok_or_else(|| "a `{{` is never closed by `}}`".to_string())?;
        let name: String = after[..close]
            .chars()
            .filter(|c| !c.is_whitespace())
            .collect();
        let shifted = |days: i64| {
            date.checked_add_signed(chrono::TimeDelta::days(days))
                .map(|d| d.format("%Y-%m-%d").to_string())
                .ok_or_else(|| format!("`{{{{{name}}}}}` is out of the calendar's range"))
        };
        let value = match name.as_str() {
            "date" | "to" => shifted(0)?,
            "from" => shifted(1 - window_days)?,
            n => match n
                .strip_prefix("date+")
                .map(|d| (d, 1))
                .or_else(|| n.strip_prefix("date-").map(|d| (d, -1)))
            {
                Some((d, sign)) => match d.parse::<i64>() {
                    Ok(d) if d <= 3660 => shifted(sign * d)?,
                    _ => return Err(format!("`{{{{{n}}}}}`: expected a number of days")),
                },
                None => {
                    return Err(format!(
                        "unknown parameter `{{{{{n}}}}}` (known: date, date+N, date-N, from, to)"
                    ))
                }
            },
        };
        out.push_str(&value);
        rest = &after[close + 2..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Loads every `kind = "sql"` file of `dir`.
pub fn load_jobs(dir: &Path) -> Result<BTreeMap<String, std::sync::Arc<JobDef>>> {
    let mut out = BTreeMap::new();
    for path in crate::schema::toml_files(dir)? {
        let text = crate::schema::read(&path)?;
        if crate::view::kind_of(&path, &text)?.as_deref() == Some("sql") {
            let job = JobDef::from_toml(&path, &text)?;
            out.insert(job.name.clone(), std::sync::Arc::new(job));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{DateTime, Utc};

    fn utc(us: i64) -> DateTime<Utc> {
        DateTime::from_timestamp_micros(us).unwrap()
    }

    fn job(text: &str) -> Result<JobDef> {
        JobDef::from_toml(Path::new("jobs/daily.toml"), text)
    }

    #[test]
    fn parameters_are_replaced() {
        let j = job("kind = \"sql\"\nwindow_days = 7\nsql = \"SELECT '{{date}}', '{{ date+1 }}', '{{date-7}}', '{{from}}', '{{to}}'\"").unwrap();
        let d = NaiveDate::from_ymd_opt(2026, 3, 1).unwrap();
        assert_eq!(
            j.sql_for(d).unwrap(),
            "SELECT '2026-03-01', '2026-03-02', '2026-02-22', '2026-02-23', '2026-03-01'"
        );
    }

    #[test]
    fn bad_keys_are_named() {
        for (text, key) in [
            ("kind = \"sql\"\nsql = \"SELECT {{day}}\"", "sql"),
            ("kind = \"sql\"\nsql = \"SELECT {{date\"", "sql"),
            (
                "kind = \"sql\"\nsql = \"SELECT 1\"\nschedule = \"every day\"",
                "schedule",
            ),
            (
                "kind = \"sql\"\nsql = \"SELECT 1\"\ntimezone = \"Mars/Olympus\"",
                "timezone",
            ),
            (
                "kind = \"sql\"\nsql = \"SELECT 1\"\nlag_days = -1",
                "lag_days",
            ),
        ] {
            let e = job(text).unwrap_err().to_string();
            assert!(e.contains("daily.toml") && e.contains(key), "{text}: {e}");
        }
        let e = job("kind = \"sql\"\nsql = \"SELECT 1\"\nschedul = \"0 4 * * *\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("schedul"), "{e}");
    }

    #[test]
    fn scheduled_dates_follow_the_zone_and_the_lag() {
        let j = job("kind = \"sql\"\nsql = \"SELECT 1\"\nschedule = \"0 4 * * *\"\ntimezone = \"Asia/Tokyo\"\nlag_days = 1").unwrap();
        let s = j.schedule.as_ref().unwrap();
        // 2026-03-10 20:00 UTC is 2026-03-11 05:00 in Tokyo: the last tick was 04:00 local,
        // 19:00 UTC; its last whole day is the 10th, less a day of lag: the 9th.
        let now = Utc
            .with_ymd_and_hms(2026, 3, 10, 20, 0, 0)
            .unwrap()
            .timestamp_micros();
        let tick = s.last_tick(now).unwrap();
        assert_eq!(
            utc(tick),
            Utc.with_ymd_and_hms(2026, 3, 10, 19, 0, 0).unwrap()
        );
        assert_eq!(j.date_for_tick(tick).unwrap().to_string(), "2026-03-09");
        assert_eq!(
            utc(s.next_tick(tick).unwrap()),
            Utc.with_ymd_and_hms(2026, 3, 11, 19, 0, 0).unwrap()
        );
    }
}
