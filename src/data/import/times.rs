//! Times in the import: the forms a time column may take (`time_form`, `time_format`), their
//! parsing with [`jiff`], durations (`events.window`) and cut-offs (`split.valid_from`,
//! `split.test_from`), and the common unit in which the importer compares times.
//!
//! A time is kept as an `f64` in one [`Unit`] for the whole import: days when every time
//! column has the `days` form (the plain numbers of earlier versions, passed through
//! unchanged, so such imports give the same bytes as before), milliseconds when a column
//! counts milliseconds, seconds otherwise. Whole seconds (and whole milliseconds) are exact
//! in that unit, so an event exactly at `activation + window` is compared exactly.
//!
//! Beside its value a time keeps its civil (calendar) reading in the import's time zone, for
//! the calendar fields derived from it: hour of day, day of week, month.

use jiff::civil::{Date, DateTime};
use jiff::fmt::strtime;
use jiff::tz::TimeZone;
use jiff::{Span, SpanTotal, Timestamp, Unit as JiffUnit};

use super::config::TimeForm;

/// Seconds in a day.
const DAY: f64 = 86_400.0;

/// The unit of the import's internal time values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Unit {
    /// Days (every time column has the `days` form).
    Days,
    /// Seconds since 1970-01-01T00:00:00Z.
    Seconds,
    /// Milliseconds since 1970-01-01T00:00:00Z.
    Millis,
}

impl Unit {
    /// Seconds in one unit.
    pub(crate) fn seconds(self) -> f64 {
        match self {
            Unit::Days => DAY,
            Unit::Seconds => 1.0,
            Unit::Millis => 0.001,
        }
    }

    /// The common unit of columns whose own units are `units`.
    pub(crate) fn common(units: &[Unit]) -> Unit {
        if units.iter().all(|&u| u == Unit::Days) {
            Unit::Days
        } else if units.contains(&Unit::Millis) {
            Unit::Millis
        } else {
            Unit::Seconds
        }
    }

    /// `x` counted in `from` units, in this unit (exact for whole numbers: the factors are
    /// integers, except from a finer to a coarser unit, which [`Unit::common`] never asks).
    pub(crate) fn convert(self, x: f64, from: Unit) -> f64 {
        match (from, self) {
            (a, b) if a == b => x,
            (Unit::Days, Unit::Seconds) => x * DAY,
            (Unit::Days, Unit::Millis) => x * DAY * 1000.0,
            (Unit::Seconds, Unit::Millis) => x * 1000.0,
            (from, to) => x * from.seconds() / to.seconds(),
        }
    }

    /// The value of instant `ts` in this unit.
    pub(crate) fn of_timestamp(self, ts: Timestamp) -> f64 {
        match self {
            Unit::Seconds => ts.as_second() as f64 + f64::from(ts.subsec_nanosecond()) * 1e-9,
            Unit::Millis => {
                let ms = ts.as_millisecond();
                let rest = ts.as_nanosecond() - i128::from(ms) * 1_000_000;
                ms as f64 + rest as f64 * 1e-6
            }
            Unit::Days => (ts.as_second() as f64 + f64::from(ts.subsec_nanosecond()) * 1e-9) / DAY,
        }
    }
}

/// One value of a time column before interpretation.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Raw<'a> {
    /// Text (a CSV cell, a Parquet string), trimmed, not empty.
    Text(&'a str),
    /// A number (a Parquet integer or float).
    Number(f64),
    /// An instant (a Parquet timestamp with a time zone).
    Instant(Timestamp),
    /// A civil date and time without zone (a Parquet timestamp without time zone).
    Civil(DateTime),
    /// A calendar date (a Parquet date).
    Date(Date),
}

/// A parsed time.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Time {
    /// In the import's [`Unit`].
    pub value: f64,
    /// The civil date and time in the import's time zone (`None` when out of the range of
    /// years −9999 to 9999, where calendar fields are unknown).
    pub civil: Option<DateTime>,
}

/// How one time column is read: its form, the import's time zone and common unit.
#[derive(Debug, Clone)]
pub(crate) struct TimeReader {
    form: TimeForm,
    tz: TimeZone,
    unit: Unit,
}

impl TimeForm {
    /// The unit plain numbers of this form count (`None`: numbers are not this form).
    pub(crate) fn number_unit(&self) -> Option<Unit> {
        match self {
            TimeForm::Days => Some(Unit::Days),
            TimeForm::UnixS => Some(Unit::Seconds),
            TimeForm::UnixMs => Some(Unit::Millis),
            TimeForm::Date | TimeForm::DateTime | TimeForm::Format(_) => None,
        }
    }

    /// The unit a column of this form is best compared in.
    pub(crate) fn unit(&self) -> Unit {
        self.number_unit().unwrap_or(Unit::Seconds)
    }

    /// Whether values of this form carry a time of day (hour of day is meaningful).
    pub(crate) fn has_time_of_day(&self) -> bool {
        match self {
            TimeForm::UnixS | TimeForm::UnixMs | TimeForm::DateTime => true,
            TimeForm::Days | TimeForm::Date => false,
            TimeForm::Format(pattern) => pattern_has_time_of_day(pattern),
        }
    }

    /// What a cell of this form looks like, for messages.
    pub(crate) fn expected(&self) -> String {
        match self {
            TimeForm::Days => {
                "a number of days since 1970-01-01 (time_form = \"days\", the default)".into()
            }
            TimeForm::UnixS => {
                "a number of seconds since 1970-01-01T00:00:00Z (time_form = \"unix_s\")".into()
            }
            TimeForm::UnixMs => {
                "a number of milliseconds since 1970-01-01T00:00:00Z (time_form = \"unix_ms\")"
                    .into()
            }
            TimeForm::Date => "a date YYYY-MM-DD such as 2023-07-01 (time_form = \"date\")".into(),
            TimeForm::DateTime => "an ISO 8601 date-time such as 2023-07-01T14:30:00, \
                 2023-07-01 14:30:00 or 2023-07-01T14:30:00+02:00 (time_form = \"datetime\")"
                .into(),
            TimeForm::Format(p) => format!("a time in the pattern {p:?} (time_format)"),
        }
    }
}

/// Whether a strftime pattern has a conversion for the hour (or a whole time, or a Unix
/// timestamp): `%H %I %k %l %T %R %r %c %X %s`, possibly with flags or a width.
fn pattern_has_time_of_day(pattern: &str) -> bool {
    let mut chars = pattern.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            continue;
        }
        for d in chars.by_ref() {
            match d {
                '-' | '_' | '0' | '^' | '#' | ':' | '1'..='9' => continue,
                'H' | 'I' | 'k' | 'l' | 'T' | 'R' | 'r' | 'c' | 'X' | 's' => return true,
                _ => break,
            }
        }
    }
    false
}

impl TimeReader {
    /// A reader of `form` in time zone `tz`, giving values in `unit`.
    pub(crate) fn new(form: TimeForm, tz: TimeZone, unit: Unit) -> TimeReader {
        TimeReader { form, tz, unit }
    }

    /// The column's form.
    pub(crate) fn form(&self) -> &TimeForm {
        &self.form
    }

    /// Reads one value; the error is the reason, to be placed after file, line and column.
    pub(crate) fn read(&self, raw: Raw<'_>) -> Result<Time, String> {
        match raw {
            Raw::Instant(ts) => Ok(self.instant(ts)),
            Raw::Civil(dt) => self.civil(dt),
            Raw::Date(d) => self.civil(d.to_datetime(jiff::civil::Time::midnight())),
            Raw::Number(x) => self.number(x),
            Raw::Text(s) => self.text(s),
        }
    }

    fn instant(&self, ts: Timestamp) -> Time {
        Time {
            value: self.unit.of_timestamp(ts),
            civil: Some(self.tz.to_datetime(ts)),
        }
    }

    /// A civil datetime in the import's zone (a gap of a daylight-saving change resolves
    /// to the later time, a fold to the earlier one).
    fn civil(&self, dt: DateTime) -> Result<Time, String> {
        let ts = self.tz.to_timestamp(dt).map_err(|e| {
            format!(
                "{dt} does not exist in the time zone {}: {e}",
                tz_name(&self.tz)
            )
        })?;
        Ok(Time {
            value: self.unit.of_timestamp(ts),
            civil: Some(dt),
        })
    }

    fn number(&self, x: f64) -> Result<Time, String> {
        if !x.is_finite() {
            return Err(format!("{x} is not a finite time"));
        }
        let Some(from) = self.form.number_unit() else {
            return Err(format!(
                "a number ({x}), but the column's form expects {}",
                self.form.expected()
            ));
        };
        let civil = match from {
            // Days count civil days: the calendar reading ignores the time zone.
            Unit::Days => seconds_to_timestamp(x * DAY).map(|ts| TimeZone::UTC.to_datetime(ts)),
            _ => seconds_to_timestamp(x * from.seconds()).map(|ts| self.tz.to_datetime(ts)),
        };
        Ok(Time {
            value: self.unit.convert(x, from),
            civil,
        })
    }

    fn text(&self, s: &str) -> Result<Time, String> {
        let bad = |detail: String| {
            format!(
                "cannot read {s:?} as a time: expected {}{detail}",
                self.form.expected()
            )
        };
        match &self.form {
            TimeForm::Days | TimeForm::UnixS | TimeForm::UnixMs => {
                let x: f64 = s.parse().map_err(|_| bad(String::new()))?;
                if !x.is_finite() {
                    return Err(bad(" (a finite number)".into()));
                }
                self.number(x)
            }
            TimeForm::Date => {
                let d: Date = s.parse().map_err(|e| bad(format!(" ({e})")))?;
                if s.len() != 10 {
                    return Err(bad(String::new()));
                }
                self.read(Raw::Date(d))
            }
            TimeForm::DateTime => {
                if let Ok(ts) = s.parse::<Timestamp>() {
                    return Ok(self.instant(ts));
                }
                let dt: DateTime = s.parse().map_err(|e| bad(format!(" ({e})")))?;
                self.civil(dt)
            }
            TimeForm::Format(pattern) => {
                let tm = strtime::parse(pattern, s).map_err(|e| bad(format!(" ({e})")))?;
                if tm.offset().is_some() || tm.timestamp().is_some() {
                    let ts = tm.to_timestamp().map_err(|e| bad(format!(" ({e})")))?;
                    return Ok(self.instant(ts));
                }
                let dt = tm.to_datetime().map_err(|e| bad(format!(" ({e})")))?;
                self.civil(dt)
            }
        }
    }
}

/// The instant `secs` seconds after the Unix epoch, if within jiff's range.
fn seconds_to_timestamp(secs: f64) -> Option<Timestamp> {
    let ns = secs * 1e9;
    if ns.is_nan() || ns.abs() >= 1e30 {
        return None;
    }
    Timestamp::from_nanosecond(ns.round() as i128).ok()
}

/// The zone's name, for messages.
pub(crate) fn tz_name(tz: &TimeZone) -> String {
    tz.iana_name().unwrap_or("UTC").to_string()
}

/// A duration written as text (`"180d"`, `"12h"`, `"1d 6h"`, `"P180D"`; days are 24 hours,
/// months and years are refused), in seconds.
pub(crate) fn duration_seconds(s: &str) -> Result<f64, String> {
    let span: Span = s.parse().map_err(|e| {
        format!("cannot read {s:?} as a duration such as \"180d\", \"12h\" or \"90m\": {e}")
    })?;
    let secs = span
        .total(SpanTotal::from(JiffUnit::Second).days_are_24_hours())
        .map_err(|e| {
            format!("{s:?}: give the duration in weeks, days, hours, minutes or seconds ({e})")
        })?;
    if !(secs.is_finite() && secs > 0.0) {
        return Err(format!("{s:?}: the duration must be positive"));
    }
    Ok(secs)
}

/// A cut-off written as text: a date (`2023-07-01`, midnight) or an ISO 8601 date-time
/// (with or without offset), in time zone `tz`.
pub(crate) fn cutoff_timestamp(s: &str, tz: &TimeZone) -> Result<Timestamp, String> {
    if let Ok(ts) = s.parse::<Timestamp>() {
        return Ok(ts);
    }
    let dt = if let (10, Ok(d)) = (s.len(), s.parse::<Date>()) {
        d.to_datetime(jiff::civil::Time::midnight())
    } else {
        s.parse::<DateTime>().map_err(|e| {
            format!(
                "cannot read {s:?} as a date (2023-07-01) or an ISO 8601 date-time \
                 (2023-07-01T00:00:00, with or without offset): {e}"
            )
        })?
    };
    tz.to_timestamp(dt)
        .map_err(|e| format!("{s:?} does not exist in the time zone {}: {e}", tz_name(tz)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reader(form: TimeForm, tz: &str, unit: Unit) -> TimeReader {
        TimeReader::new(form, TimeZone::get(tz).unwrap(), unit)
    }

    #[test]
    fn forms_agree_on_one_instant() {
        // 2023-07-01T12:30:00Z = 1688214600 s.
        let s = 1_688_214_600.0;
        let utc = |f: TimeForm, text: &str| {
            reader(f, "UTC", Unit::Seconds)
                .read(Raw::Text(text))
                .unwrap()
        };
        assert_eq!(utc(TimeForm::UnixS, "1688214600").value, s);
        assert_eq!(utc(TimeForm::UnixMs, "1688214600000").value, s);
        assert_eq!(utc(TimeForm::DateTime, "2023-07-01T12:30:00Z").value, s);
        assert_eq!(
            utc(TimeForm::DateTime, "2023-07-01T14:30:00+02:00").value,
            s
        );
        assert_eq!(utc(TimeForm::DateTime, "2023-07-01 12:30:00").value, s);
        let f = TimeForm::Format("%d/%m/%Y %H:%M".into());
        assert_eq!(utc(f, "01/07/2023 12:30").value, s);
        assert_eq!(utc(TimeForm::Date, "2023-07-01").value, s - 12.5 * 3600.0);
        assert_eq!(utc(TimeForm::Days, "19539.5").value, s - 0.5 * 3600.0);
        // A naive time is read in the config's zone (Paris is UTC+2 in July).
        let paris = reader(TimeForm::DateTime, "Europe/Paris", Unit::Seconds);
        let t = paris.read(Raw::Text("2023-07-01T14:30:00")).unwrap();
        assert_eq!(t.value, s);
        assert_eq!(t.civil.unwrap().hour(), 14);
        // An instant is shown in the config's zone.
        let t = paris.read(Raw::Text("2023-07-01T12:30:00Z")).unwrap();
        assert_eq!(t.civil.unwrap().hour(), 14);
        // Milliseconds unit: whole milliseconds exact.
        let ms = reader(TimeForm::DateTime, "UTC", Unit::Millis);
        let t = ms.read(Raw::Text("2023-07-01T12:30:00.123Z")).unwrap();
        assert_eq!(t.value, 1_688_214_600_123.0);
    }

    #[test]
    fn errors_say_what_was_expected() {
        let r = reader(TimeForm::Date, "UTC", Unit::Seconds);
        for bad in [
            "2023-7-1",
            "01/07/2023",
            "2023-07-01T00:00:00",
            "2023-02-30",
        ] {
            let e = r.read(Raw::Text(bad)).unwrap_err();
            assert!(e.contains("YYYY-MM-DD") && e.contains(bad), "{e}");
        }
        let r = reader(TimeForm::Days, "UTC", Unit::Days);
        assert!(r.read(Raw::Text("soon")).unwrap_err().contains("days"));
        let r = reader(TimeForm::Format("%d/%m/%Y".into()), "UTC", Unit::Seconds);
        assert!(r
            .read(Raw::Text("2023-07-01"))
            .unwrap_err()
            .contains("%d/%m/%Y"));
        let r = reader(TimeForm::DateTime, "UTC", Unit::Seconds);
        assert!(r.read(Raw::Number(5.0)).unwrap_err().contains("datetime"));
    }

    #[test]
    fn durations_and_cutoffs() {
        assert_eq!(duration_seconds("180d").unwrap(), 180.0 * DAY);
        assert_eq!(duration_seconds("12h").unwrap(), 43_200.0);
        assert_eq!(duration_seconds("1w 1d").unwrap(), 8.0 * DAY);
        assert!(duration_seconds("6mo").is_err());
        assert!(duration_seconds("soon").is_err());
        assert!(duration_seconds("0d").is_err());
        let utc = TimeZone::UTC;
        assert_eq!(
            cutoff_timestamp("2023-07-01", &utc).unwrap().as_second(),
            1_688_169_600
        );
        let paris = TimeZone::get("Europe/Paris").unwrap();
        assert_eq!(
            cutoff_timestamp("2023-07-01", &paris).unwrap().as_second(),
            1_688_169_600 - 7200
        );
        assert!(cutoff_timestamp("July", &utc).is_err());
        assert!(pattern_has_time_of_day("%d/%m/%Y %-H:%M"));
        assert!(!pattern_has_time_of_day("%d/%m/%Y"));
    }
}
