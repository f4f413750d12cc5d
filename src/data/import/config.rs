//! The import configuration file (TOML), documented for users in `docs/import.md`.
//!
//! Every table rejects unknown keys, so a misspelt key is an error naming the key rather than
//! a silently ignored setting. [`ImportConfig::load`] parses the file and resolves relative
//! paths against the config file's directory; the column names are checked against the CSV
//! headers when the files are read.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use jiff::tz::TimeZone;
use serde::Deserialize;

use super::times::{self, Unit};
use crate::{Error, Result};

/// The layout of the input files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Layout {
    /// A users file (one row per user) and an events file (one row per event).
    Long,
    /// One row per user; groups of columns are the time steps of the event sequence.
    Wide,
}

/// The whole import configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImportConfig {
    /// `long` or `wide`.
    pub layout: Layout,
    /// Whether the users file has a label column (false: applicants to be scored).
    #[serde(default = "default_true")]
    pub has_label: bool,
    /// Default minimum train-split count for a categorical value to get its own id.
    #[serde(default = "default_min_count")]
    pub min_count: u64,
    /// Pre-service length limit Lp (default: the longest pre-service sequence, at least 1).
    pub pre_len: Option<usize>,
    /// In-service length limit L (default: the longest in-service sequence, at least 1).
    pub in_len: Option<usize>,
    /// The users file and its id/label/time columns.
    pub users: UsersConfig,
    /// The events file (long layout only).
    pub events: Option<EventsConfig>,
    /// The time steps (wide layout only), oldest first.
    #[serde(default)]
    pub steps: Vec<StepConfig>,
    /// Wide layout: a step whose cells are all empty is no event (instead of an error).
    #[serde(default)]
    pub skip_empty_steps: bool,
    /// IANA time zone (`"Europe/Paris"`) of times written without offset; default UTC.
    pub timezone: Option<String>,
    /// Numeric profile columns.
    #[serde(default)]
    pub profile_num: Vec<NumConfig>,
    /// Categorical profile columns.
    #[serde(default)]
    pub profile_cat: Vec<CatConfig>,
    /// Categorical event fields.
    #[serde(default)]
    pub event_cat: Vec<CatConfig>,
    /// Numeric event fields.
    #[serde(default)]
    pub event_num: Vec<NumConfig>,
    /// Fields derived from the times (`[features]`), each switchable off.
    #[serde(default)]
    pub features: FeaturesConfig,
    /// How rows are split into train/valid/test (default: stratified random 80/10/10, seed 0).
    #[serde(default)]
    pub split: SplitConfig,
    /// A dataset directory made by an earlier import whose vocabularies (`vocab.json`),
    /// numeric statistics and length limits are reused instead of fitted (for scoring data
    /// that must be encoded exactly like the training data).
    pub encoding_from: Option<PathBuf>,
    /// Directory of the config file; relative paths are resolved against it.
    #[serde(skip)]
    pub base_dir: PathBuf,
    /// The config file itself (named in configuration errors).
    #[serde(skip)]
    pub path: PathBuf,
}

/// The fields derived from the times (`[features]`). Unset means on wherever it applies:
/// event fields need event times (the long layout), `hour_of_day` needs event times with a
/// time of day, `activation_month` needs `users.time`. Setting one to `true` where it does
/// not apply is an error.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeaturesConfig {
    /// Numeric event field `log_seconds_since_previous`: `log1p` of the seconds since the
    /// user's previous event (0 for the first).
    pub time_since_previous: Option<bool>,
    /// Numeric event field `log_seconds_since_activation`: `log1p` of the seconds between
    /// the event and the activation (before it, for pre-service events).
    pub time_since_activation: Option<bool>,
    /// Categorical event field `hour_of_day` (`00` … `23`, in the import's time zone).
    pub hour_of_day: Option<bool>,
    /// Categorical event field `day_of_week` (`Mon` … `Sun`).
    pub day_of_week: Option<bool>,
    /// Categorical profile field `activation_month` (`Jan` … `Dec`).
    pub activation_month: Option<bool>,
}

/// A field computed from the times rather than read from a column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Derived {
    /// Seconds since the user's previous event (numeric event field, log1p).
    SincePrevious,
    /// Seconds between the event and the activation (numeric event field, log1p).
    SinceActivation,
    /// Hour of day of the event (categorical event field).
    HourOfDay,
    /// Day of week of the event (categorical event field).
    DayOfWeek,
    /// Month of the activation (categorical profile field).
    ActivationMonth,
}

impl Derived {
    /// The field's name in the schema.
    pub fn field_name(self) -> &'static str {
        match self {
            Derived::SincePrevious => "log_seconds_since_previous",
            Derived::SinceActivation => "log_seconds_since_activation",
            Derived::HourOfDay => "hour_of_day",
            Derived::DayOfWeek => "day_of_week",
            Derived::ActivationMonth => "activation_month",
        }
    }

    /// The `[features]` key that switches it.
    pub fn key(self) -> &'static str {
        match self {
            Derived::SincePrevious => "features.time_since_previous",
            Derived::SinceActivation => "features.time_since_activation",
            Derived::HourOfDay => "features.hour_of_day",
            Derived::DayOfWeek => "features.day_of_week",
            Derived::ActivationMonth => "features.activation_month",
        }
    }
}

/// The users file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsersConfig {
    /// Path of the CSV file (relative to the config file's directory).
    pub file: PathBuf,
    /// User id column.
    pub id: String,
    /// Label column (0/1); required when `has_label`, forbidden otherwise.
    pub label: Option<String>,
    /// Activation time column: required in the long layout; used by time-based splits.
    pub time: Option<String>,
    /// The form of the activation times (default `days`).
    pub time_form: Option<TimeFormName>,
    /// A strftime-like pattern of the activation times (instead of `time_form`).
    pub time_format: Option<String>,
}

/// The events file (long layout).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventsConfig {
    /// Path of the CSV file (relative to the config file's directory).
    pub file: PathBuf,
    /// User id column (ids as in the users file).
    pub id: String,
    /// Event time column.
    pub time: String,
    /// The form of the event times (default `days`).
    pub time_form: Option<TimeFormName>,
    /// A strftime-like pattern of the event times (instead of `time_form`).
    pub time_format: Option<String>,
    /// In-service window: events at or after `activation + window` are dropped. A number
    /// counts the unit of the column's numeric form; text is a duration (`"180d"`).
    pub window: Option<TimeValue>,
}

/// The named forms of a time column (`time_form`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimeFormName {
    /// Numbers of days since 1970-01-01 (the default; any number, passed through).
    Days,
    /// Numbers of seconds since the Unix epoch.
    UnixS,
    /// Numbers of milliseconds since the Unix epoch.
    UnixMs,
    /// `YYYY-MM-DD` dates.
    Date,
    /// ISO 8601 date-times, with or without offset.
    Datetime,
}

/// The form of a time column: a named form or a strftime-like pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TimeForm {
    /// Numbers of days since 1970-01-01.
    Days,
    /// Numbers of seconds since the Unix epoch.
    UnixS,
    /// Numbers of milliseconds since the Unix epoch.
    UnixMs,
    /// `YYYY-MM-DD` dates (midnight in the import's time zone).
    Date,
    /// ISO 8601 date-times; without offset they are in the import's time zone.
    DateTime,
    /// A strftime-like pattern (`%d/%m/%Y %H:%M`), parsed by `jiff::fmt::strtime`.
    Format(String),
}

impl TimeForm {
    fn from_config(name: Option<TimeFormName>, format: &Option<String>) -> TimeForm {
        match (name, format) {
            (_, Some(p)) => TimeForm::Format(p.clone()),
            (None | Some(TimeFormName::Days), None) => TimeForm::Days,
            (Some(TimeFormName::UnixS), None) => TimeForm::UnixS,
            (Some(TimeFormName::UnixMs), None) => TimeForm::UnixMs,
            (Some(TimeFormName::Date), None) => TimeForm::Date,
            (Some(TimeFormName::Datetime), None) => TimeForm::DateTime,
        }
    }
}

/// A time setting written as a number or as text (a duration such as `"180d"`, a date such as
/// `"2023-07-01"`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum TimeValue {
    /// A plain number, in the unit of the column's numeric form.
    Number(f64),
    /// Text: a duration (window) or a date / date-time (cut-offs).
    Text(String),
}

/// Which service phase a wide-layout step belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Before activation.
    Pre,
    /// At or after activation.
    In,
}

/// One time step of the wide layout: one event per user.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepConfig {
    /// `pre` or `in`.
    pub phase: Phase,
    /// Event field name → CSV column holding that field at this step; every field of
    /// `event_cat` and `event_num` must appear.
    pub columns: BTreeMap<String, String>,
}

/// A numeric column or event field.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NumConfig {
    /// CSV column (profile fields and long-layout event fields).
    pub column: Option<String>,
    /// Field name in the schema (default: the column); required for wide-layout event fields.
    pub name: Option<String>,
    /// Apply the signed log1p `sign(x)·ln(1+|x|)` before standardising.
    #[serde(default)]
    pub log1p: bool,
    /// Raw value used for empty, NaN or infinite cells (default: such cells are an error).
    pub fill: Option<f64>,
    /// Set when the field is computed from the times (`[features]`), not read.
    #[serde(skip)]
    pub derived: Option<Derived>,
}

/// A categorical column or event field.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CatConfig {
    /// CSV column (profile fields and long-layout event fields).
    pub column: Option<String>,
    /// Field name in the schema (default: the column); required for wide-layout event fields.
    pub name: Option<String>,
    /// Minimum train-split count for a value to get its own id (default: the global one).
    pub min_count: Option<u64>,
    /// Value used for empty cells (default: an empty cell is an error).
    pub fill: Option<String>,
    /// Map empty cells to id 0 (unknown) instead of failing; excludes `fill`.
    #[serde(default)]
    pub empty_is_unknown: bool,
    /// Set when the field is computed from the times (`[features]`), not read.
    #[serde(skip)]
    pub derived: Option<Derived>,
}

/// How rows are assigned to splits.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SplitConfig {
    /// `random` (stratified by label), `column` or `time`.
    #[serde(default)]
    pub method: SplitMethod,
    /// Random: the seed.
    pub seed: Option<u64>,
    /// Random: train/valid/test fractions (default 0.8, 0.1, 0.1), summing to 1.
    pub fractions: Option<[f64; 3]>,
    /// Column: the users-file column holding 0/1/2 or train/valid/test.
    pub column: Option<String>,
    /// Time: activation times at or after this are valid (or test): a number read like a
    /// cell of the activation-time column, or a date / ISO 8601 date-time.
    pub valid_from: Option<TimeValue>,
    /// Time: activation times at or after this are test (written like `valid_from`).
    pub test_from: Option<TimeValue>,
}

impl Default for SplitConfig {
    fn default() -> Self {
        SplitConfig {
            method: SplitMethod::Random,
            seed: None,
            fractions: None,
            column: None,
            valid_from: None,
            test_from: None,
        }
    }
}

/// The split method.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SplitMethod {
    /// Stratified random by seed.
    #[default]
    Random,
    /// From a column of the users file.
    Column,
    /// By cut-offs on the users' activation time.
    Time,
}

fn default_true() -> bool {
    true
}

fn default_min_count() -> u64 {
    1
}

impl ImportConfig {
    /// Reads, parses and checks the config at `path`; relative paths inside are resolved
    /// against its directory. Errors name the config file and the key.
    pub fn load(path: &Path) -> Result<ImportConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::parse(&text, path)
    }

    /// Parses config text as if read from `path` (used for relative paths and messages).
    pub fn parse(text: &str, path: &Path) -> Result<ImportConfig> {
        let mut config: ImportConfig =
            toml::from_str(text).map_err(|e| Error::format(path, e.to_string()))?;
        config.path = path.to_path_buf();
        config.base_dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        config.users.file = config.base_dir.join(&config.users.file);
        if let Some(events) = &mut config.events {
            events.file = config.base_dir.join(&events.file);
        }
        if let Some(dir) = &mut config.encoding_from {
            *dir = config.base_dir.join(&*dir);
        }
        config.check()?;
        Ok(config)
    }

    /// A configuration error naming this config file and `key`.
    pub fn error(&self, key: &str, msg: impl std::fmt::Display) -> Error {
        Error::format(&self.path, format!("key `{key}`: {msg}"))
    }

    /// Consistency checks that serde cannot express.
    fn check(&self) -> Result<()> {
        if self.min_count == 0 {
            return Err(self.error("min_count", "must be at least 1"));
        }
        for (key, len) in [("pre_len", self.pre_len), ("in_len", self.in_len)] {
            if len == Some(0) {
                return Err(self.error(key, "must be at least 1"));
            }
        }
        match (self.has_label, &self.users.label) {
            (true, None) => return Err(self.error(
                "users.label",
                "missing: a labelled import (has_label = true, the default) needs the label column",
            )),
            (false, Some(_)) => {
                return Err(self.error("users.label", "given, but has_label = false"))
            }
            _ => {}
        }
        let wide_event_fields = self.layout == Layout::Wide;
        for (i, f) in self.profile_num.iter().enumerate() {
            self.check_column(&format!("profile_num[{i}]"), &f.column, true)?;
            self.check_fill(&format!("profile_num[{i}].fill"), f.fill)?;
        }
        for (i, f) in self.profile_cat.iter().enumerate() {
            self.check_column(&format!("profile_cat[{i}]"), &f.column, true)?;
            self.check_cat(&format!("profile_cat[{i}]"), f)?;
        }
        for (i, f) in self.event_num.iter().enumerate() {
            let key = format!("event_num[{i}]");
            self.check_column(&key, &f.column, !wide_event_fields)?;
            if wide_event_fields && f.name.is_none() {
                return Err(self.error(&format!("{key}.name"), "missing (wide layout)"));
            }
            self.check_fill(&format!("{key}.fill"), f.fill)?;
        }
        for (i, f) in self.event_cat.iter().enumerate() {
            let key = format!("event_cat[{i}]");
            self.check_column(&key, &f.column, !wide_event_fields)?;
            if wide_event_fields && f.name.is_none() {
                return Err(self.error(&format!("{key}.name"), "missing (wide layout)"));
            }
            self.check_cat(&key, f)?;
        }
        self.check_unique_names()?;
        match self.layout {
            Layout::Long => {
                if self.events.is_none() {
                    return Err(
                        self.error("events", "missing: the long layout needs an events file")
                    );
                }
                if self.users.time.is_none() {
                    return Err(self.error(
                        "users.time",
                        "missing: the long layout needs the users' activation time",
                    ));
                }
                if !self.steps.is_empty() {
                    return Err(self.error("steps", "only for the wide layout"));
                }
                if self.skip_empty_steps {
                    return Err(self.error("skip_empty_steps", "only for the wide layout"));
                }
                if let Some(events) = &self.events {
                    self.check_form("events", events.time_form, &events.time_format)?;
                    if let Some(w) = &events.window {
                        self.window(w)?;
                    }
                }
            }
            Layout::Wide => {
                if self.events.is_some() {
                    return Err(self.error("events", "only for the long layout"));
                }
                self.check_steps()?;
            }
        }
        self.time_zone()?;
        self.check_form("users", self.users.time_form, &self.users.time_format)?;
        if self.users.time.is_none()
            && (self.users.time_form.is_some() || self.users.time_format.is_some())
        {
            return Err(self.error("users.time_form", "given, but users.time is not"));
        }
        self.check_split()
    }

    fn check_form(
        &self,
        table: &str,
        name: Option<TimeFormName>,
        format: &Option<String>,
    ) -> Result<()> {
        if name.is_some() && format.is_some() {
            return Err(self.error(
                &format!("{table}.time_format"),
                "give either time_form or time_format (a pattern), not both",
            ));
        }
        if format.as_deref().is_some_and(|p| !p.contains('%')) {
            return Err(self.error(
                &format!("{table}.time_format"),
                "a pattern needs conversions such as %Y-%m-%d %H:%M",
            ));
        }
        Ok(())
    }

    /// Appends the derived fields that are on (see [`FeaturesConfig`]) to the field lists,
    /// after the configured ones. `event_time_of_day`: whether the event times have a time
    /// of day (`None`: there are no event times, the wide layout).
    pub(crate) fn add_derived(&mut self, event_time_of_day: Option<bool>) -> Result<()> {
        let f = self.features.clone();
        let applies = |d: Derived| -> std::result::Result<(), &'static str> {
            match d {
                Derived::ActivationMonth if self.users.time.is_none() => {
                    Err("needs users.time (the activation times)")
                }
                Derived::ActivationMonth => Ok(()),
                _ if event_time_of_day.is_none() => {
                    Err("needs event times (the long layout; wide-layout steps have none)")
                }
                Derived::HourOfDay if event_time_of_day == Some(false) => Err(
                    "needs event times with a time of day (the events' form is days, a date, \
                     or a pattern without hours)",
                ),
                _ => Ok(()),
            }
        };
        let mut on = Vec::new();
        for (d, set) in [
            (Derived::HourOfDay, f.hour_of_day),
            (Derived::DayOfWeek, f.day_of_week),
            (Derived::SincePrevious, f.time_since_previous),
            (Derived::SinceActivation, f.time_since_activation),
            (Derived::ActivationMonth, f.activation_month),
        ] {
            match (set, applies(d)) {
                (Some(false), _) => {}
                (Some(true), Err(why)) => return Err(self.error(d.key(), why)),
                (None, Err(_)) => {}
                (_, Ok(())) => on.push(d),
            }
        }
        for d in on {
            let name = d.field_name().to_string();
            let (list, taken) = match d {
                Derived::SincePrevious | Derived::SinceActivation => (
                    "event_num",
                    self.event_num.iter().position(|c| c.field_name() == name),
                ),
                Derived::HourOfDay | Derived::DayOfWeek => (
                    "event_cat",
                    self.event_cat.iter().position(|c| c.field_name() == name),
                ),
                Derived::ActivationMonth => (
                    "profile_cat",
                    self.profile_cat.iter().position(|c| c.field_name() == name),
                ),
            };
            if let Some(i) = taken {
                return Err(self.error(
                    d.key(),
                    format!(
                        "the derived field `{name}` has the name of {list}[{i}]: rename that \
                         field or set {} = false",
                        d.key()
                    ),
                ));
            }
            match d {
                Derived::SincePrevious | Derived::SinceActivation => {
                    self.event_num.push(NumConfig {
                        column: None,
                        name: Some(name),
                        log1p: true,
                        fill: None,
                        derived: Some(d),
                    })
                }
                _ => {
                    let cat = CatConfig {
                        column: None,
                        name: Some(name),
                        min_count: None,
                        fill: None,
                        empty_is_unknown: true,
                        derived: Some(d),
                    };
                    if d == Derived::ActivationMonth {
                        self.profile_cat.push(cat);
                    } else {
                        self.event_cat.push(cat);
                    }
                }
            }
        }
        Ok(())
    }

    /// The time zone of times written without offset (`timezone`, default UTC), from the
    /// tz database bundled into the binary.
    pub fn time_zone(&self) -> Result<TimeZone> {
        match &self.timezone {
            None => Ok(TimeZone::UTC),
            Some(name) => TimeZone::get(name).map_err(|e| {
                self.error(
                    "timezone",
                    format!("{name:?} is not an IANA time zone such as \"Europe/Paris\": {e}"),
                )
            }),
        }
    }

    /// `events.window` as a value and the unit it counts: a number counts the unit of the
    /// events' numeric time form, text is a duration in seconds.
    pub(crate) fn window(&self, w: &TimeValue) -> Result<(f64, Unit)> {
        let form = self
            .events
            .as_ref()
            .map(EventsConfig::time_form)
            .unwrap_or(TimeForm::Days);
        let (x, unit) = match w {
            TimeValue::Number(x) => {
                let unit = form.number_unit().ok_or_else(|| {
                    self.error(
                        "events.window",
                        format!(
                            "a plain number needs a numeric time form (days, unix_s, unix_ms); \
                             the events' times are {}: write a duration such as \"180d\"",
                            form.expected()
                        ),
                    )
                })?;
                (*x, unit)
            }
            TimeValue::Text(t) => (
                times::duration_seconds(t).map_err(|e| self.error("events.window", e))?,
                Unit::Seconds,
            ),
        };
        if !(x.is_finite() && x > 0.0) {
            return Err(self.error("events.window", "must be a positive finite number"));
        }
        Ok((x, unit))
    }

    /// A split cut-off as a value and the unit it counts: a number is read like a cell of
    /// the activation-time column's numeric form, text is a date or date-time.
    pub(crate) fn cutoff(&self, key: &str, v: &TimeValue) -> Result<(f64, Unit)> {
        let form = self.users.time_form();
        match v {
            TimeValue::Number(x) => {
                let unit = form.number_unit().ok_or_else(|| {
                    self.error(
                        key,
                        format!(
                            "a plain number needs a numeric time form (days, unix_s, unix_ms); \
                             users.time holds {}: write a date such as \"2023-07-01\"",
                            form.expected()
                        ),
                    )
                })?;
                if !x.is_finite() {
                    return Err(self.error(key, "must be finite"));
                }
                Ok((*x, unit))
            }
            TimeValue::Text(t) => {
                let ts = times::cutoff_timestamp(t, &self.time_zone()?)
                    .map_err(|e| self.error(key, e))?;
                Ok((Unit::Seconds.of_timestamp(ts), Unit::Seconds))
            }
        }
    }

    fn check_column(&self, key: &str, column: &Option<String>, required: bool) -> Result<()> {
        match (column, required) {
            (None, true) => Err(self.error(&format!("{key}.column"), "missing")),
            (Some(_), false) => Err(self.error(
                &format!("{key}.column"),
                "not used in the wide layout: name the field and give its columns in `steps`",
            )),
            _ => Ok(()),
        }
    }

    fn check_fill(&self, key: &str, fill: Option<f64>) -> Result<()> {
        match fill {
            Some(v) if !v.is_finite() => Err(self.error(key, "must be a finite number")),
            _ => Ok(()),
        }
    }

    fn check_cat(&self, key: &str, f: &CatConfig) -> Result<()> {
        if f.min_count == Some(0) {
            return Err(self.error(&format!("{key}.min_count"), "must be at least 1"));
        }
        if f.min_count.is_some() && self.encoding_from.is_some() {
            return Err(self.error(
                &format!("{key}.min_count"),
                "not used with `encoding_from` (the vocabulary comes from that dataset)",
            ));
        }
        if f.fill.is_some() && f.empty_is_unknown {
            return Err(self.error(
                &format!("{key}.empty_is_unknown"),
                "cannot be combined with `fill`",
            ));
        }
        Ok(())
    }

    /// Field names must be unique within each of the four field lists.
    fn check_unique_names(&self) -> Result<()> {
        let lists: [(&str, Vec<String>); 4] = [
            (
                "profile_num",
                self.profile_num.iter().map(NumConfig::field_name).collect(),
            ),
            (
                "profile_cat",
                self.profile_cat.iter().map(CatConfig::field_name).collect(),
            ),
            (
                "event_num",
                self.event_num.iter().map(NumConfig::field_name).collect(),
            ),
            (
                "event_cat",
                self.event_cat.iter().map(CatConfig::field_name).collect(),
            ),
        ];
        for (list, names) in &lists {
            for (i, name) in names.iter().enumerate() {
                if names[..i].contains(name) {
                    return Err(self.error(
                        &format!("{list}[{i}]"),
                        format!("field name `{name}` is used twice"),
                    ));
                }
            }
        }
        Ok(())
    }

    fn check_steps(&self) -> Result<()> {
        let fields: Vec<String> = self
            .event_cat
            .iter()
            .map(CatConfig::field_name)
            .chain(self.event_num.iter().map(NumConfig::field_name))
            .collect();
        if !self.steps.is_empty() && fields.is_empty() {
            return Err(self.error("steps", "steps are given but no event_cat/event_num fields"));
        }
        let mut seen_in = false;
        for (k, step) in self.steps.iter().enumerate() {
            if step.phase == Phase::Pre && seen_in {
                return Err(self.error(
                    &format!("steps[{k}].phase"),
                    "a pre-service step after an in-service step (list the steps oldest first)",
                ));
            }
            seen_in |= step.phase == Phase::In;
            for key in step.columns.keys() {
                if !fields.contains(key) {
                    return Err(self.error(
                        &format!("steps[{k}].columns.{key}"),
                        "not an event field (declare it in event_cat or event_num)",
                    ));
                }
            }
            for f in &fields {
                if !step.columns.contains_key(f) {
                    return Err(self.error(
                        &format!("steps[{k}].columns.{f}"),
                        "missing: every event field needs a column at every step",
                    ));
                }
            }
        }
        Ok(())
    }

    fn check_split(&self) -> Result<()> {
        let s = &self.split;
        let unused = |key: &str, given: bool| -> Result<()> {
            if given {
                Err(self.error(
                    &format!("split.{key}"),
                    format!("not used by split method {:?}", s.method),
                ))
            } else {
                Ok(())
            }
        };
        match s.method {
            SplitMethod::Random => {
                unused("column", s.column.is_some())?;
                unused("valid_from", s.valid_from.is_some())?;
                unused("test_from", s.test_from.is_some())?;
                if let Some(f) = s.fractions {
                    let sum: f64 = f.iter().sum();
                    if f.iter().any(|x| !(x.is_finite() && *x >= 0.0)) || (sum - 1.0).abs() > 1e-9 {
                        return Err(self.error(
                            "split.fractions",
                            "must be three non-negative numbers summing to 1",
                        ));
                    }
                }
            }
            SplitMethod::Column => {
                unused("seed", s.seed.is_some())?;
                unused("fractions", s.fractions.is_some())?;
                unused("valid_from", s.valid_from.is_some())?;
                unused("test_from", s.test_from.is_some())?;
                if s.column.is_none() {
                    return Err(self.error("split.column", "missing (split method column)"));
                }
            }
            SplitMethod::Time => {
                unused("seed", s.seed.is_some())?;
                unused("fractions", s.fractions.is_some())?;
                unused("column", s.column.is_some())?;
                let (Some(v), Some(t)) = (&s.valid_from, &s.test_from) else {
                    return Err(self.error(
                        "split.valid_from",
                        "the time split needs both valid_from and test_from",
                    ));
                };
                if self.users.time.is_none() {
                    return Err(self.error("users.time", "missing: the time split needs it"));
                }
                let (v, vu) = self.cutoff("split.valid_from", v)?;
                let (t, tu) = self.cutoff("split.test_from", t)?;
                if v * vu.seconds() > t * tu.seconds() {
                    return Err(self.error(
                        "split.test_from",
                        "valid_from and test_from must be finite with valid_from <= test_from",
                    ));
                }
            }
        }
        Ok(())
    }
}

impl UsersConfig {
    /// The form of the activation times.
    pub fn time_form(&self) -> TimeForm {
        TimeForm::from_config(self.time_form, &self.time_format)
    }
}

impl EventsConfig {
    /// The form of the event times.
    pub fn time_form(&self) -> TimeForm {
        TimeForm::from_config(self.time_form, &self.time_format)
    }
}

impl NumConfig {
    /// The field's schema name: `name`, else the column.
    pub fn field_name(&self) -> String {
        self.name
            .clone()
            .or_else(|| self.column.clone())
            .unwrap_or_default()
    }
}

impl CatConfig {
    /// The field's schema name: `name`, else the column.
    pub fn field_name(&self) -> String {
        self.name
            .clone()
            .or_else(|| self.column.clone())
            .unwrap_or_default()
    }
}
