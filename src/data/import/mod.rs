//! CSV import (`mgkd-train import`): turns a users file (+ an events file, *long* layout) or
//! a one-row-per-user file whose column groups are time steps (*wide* layout) into a dataset
//! directory (docs/model.md §3). The configuration format is in [`config`] and `docs/import.md`.
//!
//! The import runs in two phases. First everything is read, parsed and checked in memory
//! ([`long`] / [`wide`] produce the same intermediate table): any bad cell is an [`Error`]
//! naming the file, the 1-based line (the header is line 1) and the column, and nothing has
//! been created yet. Then the splits are assigned, the encodings are fitted on the train
//! split and the rows are written through [`DatasetWriter`], followed by `vocab.json`.
//!
//! Encodings, fitted on the train split only:
//! - categorical: values (as strings) seen at least `min_count` times in train get ids
//!   `1..` by descending train frequency, ties by value (byte order); everything else,
//!   including values never seen in train, is id 0 (unknown). The value → id maps are written
//!   to `vocab.json` next to the manifest.
//! - numeric: `f(x) = sign(x)·ln(1+|x|)` when `log1p`, else `x`; stored as
//!   `(f(x) − mean) / std` with the train mean and population standard deviation of `f(x)`
//!   (std 1 when it is 0 or there is no train value); recorded in the schema's [`NumField`].
//!   Event statistics are over all events (pre- and in-service) of train users.

pub mod config;
mod long;
mod quotes;
mod source;
mod times;
mod wide;

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

pub use config::ImportConfig;
use config::{CatConfig, Derived, Layout, NumConfig, SplitMethod};
use jiff::civil::DateTime;
use jiff::Timestamp;

use super::manifest::{Manifest, TimeSpans, WindowSpan, MANIFEST_FILE};
use super::schema::{CatField, NumField, Schema};
use super::writer::{write_atomic, DatasetWriter, RowData, WriterOptions};
use crate::{Error, Result};
use source::{Cell, Role, Source};
use times::{Raw, Time, TimeReader, Unit};

/// File name of the vocabulary sidecar written next to `dataset.json`.
pub const VOCAB_FILE: &str = "vocab.json";

/// Default random-split seed when the config gives none.
pub const DEFAULT_SEED: u64 = 0;

/// Default random-split fractions (train, valid, test).
pub const DEFAULT_FRACTIONS: [f64; 3] = [0.8, 0.1, 0.1];

/// The vocabulary of one categorical field as stored in `vocab.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldVocab {
    /// Field name, as in the schema.
    pub name: String,
    /// Vocabulary size including the reserved id 0 (equals the schema's `vocab`).
    pub vocab: u32,
    /// Value (as the string read from the CSV, trimmed) → id (1..vocab).
    pub ids: BTreeMap<String, u32>,
}

/// Contents of `vocab.json`: the value → id maps of every categorical field, in schema order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vocabularies {
    /// Categorical profile fields.
    pub profile_cat: Vec<FieldVocab>,
    /// Categorical event fields.
    pub event_cat: Vec<FieldVocab>,
}

impl Vocabularies {
    /// Reads `dir/vocab.json`.
    pub fn load(dir: &Path) -> Result<Vocabularies> {
        let path = dir.join(VOCAB_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        serde_json::from_str(&text)
            .map_err(|e| Error::format(&path, format!("not a valid vocabulary file: {e}")))
    }
}

/// What an import produced.
#[derive(Debug, Clone)]
pub struct ImportSummary {
    /// The manifest written to `dataset.json`.
    pub manifest: Manifest,
    /// Long layout: events dropped for falling at or after `activation + window`.
    pub dropped_events: u64,
    /// Warnings about the input, e.g. times that look misread (the command prints them).
    pub warnings: Vec<String>,
}

/// Imports the dataset described by the config file at `config_path` into `out`
/// (see the module documentation). `shard_rows` bounds the rows per shard.
pub fn import(config_path: &Path, out: &Path, shard_rows: Option<usize>) -> Result<ImportSummary> {
    let config = ImportConfig::load(config_path)?;
    import_config(&config, out, shard_rows)
}

/// Imports with an already loaded config.
pub fn import_config(
    config: &ImportConfig,
    out: &Path,
    shard_rows: Option<usize>,
) -> Result<ImportSummary> {
    // The config with the derived fields (`[features]`) appended to its field lists.
    let mut config = config.clone();
    let table = match config.layout {
        Layout::Long => long::parse(&mut config)?,
        Layout::Wide => wide::parse(&mut config)?,
    };
    let config = &config;
    let splits = assign_splits(config, &table)?;
    let (encoded, reference_lens) = match &config.encoding_from {
        Some(dir) => {
            let (enc, schema) = Encoding::from_reference(config, &table, dir)?;
            (enc, Some((schema.pre_len, schema.in_len)))
        }
        None => (Encoding::fit(config, &table, &splits)?, None),
    };
    let schema = Schema {
        profile_num: encoded.profile_num.clone(),
        profile_cat: field_vocab_schema(&encoded.vocab.profile_cat),
        event_cat: field_vocab_schema(&encoded.vocab.event_cat),
        event_num: encoded.event_num.clone(),
        pre_len: config
            .pre_len
            .or(reference_lens.map(|l| l.0))
            .unwrap_or_else(|| table.pre.longest().max(1)),
        in_len: config
            .in_len
            .or(reference_lens.map(|l| l.1))
            .unwrap_or_else(|| table.inn.longest().max(1)),
    };
    let source = format!(
        "mgkd-train import: {} layout, config {}, users {}{}{}; categorical vocabularies in {VOCAB_FILE}",
        match config.layout {
            Layout::Long => "long",
            Layout::Wide => "wide",
        },
        config.path.display(),
        config.users.file.display(),
        config
            .events
            .as_ref()
            .map(|e| format!(", events {}", e.file.display()))
            .unwrap_or_default(),
        config
            .encoding_from
            .as_ref()
            .map(|d| format!(", encoding from {}", d.display()))
            .unwrap_or_default(),
    );
    let options = WriterOptions {
        shard_rows,
        has_label: config.has_label,
        has_user_id: true,
        source,
        ..WriterOptions::default()
    };
    let existed = out.exists();
    let mut writer = DatasetWriter::create(out, schema, options)?;
    if let Some(times) = time_spans(&table) {
        writer.set_times(times);
    }
    let vocab_path = out.join(VOCAB_FILE);
    writer.adopt(&vocab_path);
    let result = (|| {
        write_rows(&mut writer, &table, &splits, &encoded)?;
        let text = serde_json::to_string_pretty(&encoded.vocab)
            .map_err(|e| Error::invalid(format!("internal: vocabulary: {e}")))?;
        write_atomic(&vocab_path, text.as_bytes())
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&vocab_path);
        return Err(e);
    }
    match writer.finish() {
        Ok(manifest) => Ok(ImportSummary {
            manifest,
            dropped_events: table.dropped_events,
            warnings: table.warnings,
        }),
        Err(e) => {
            // The writer removed its shards; remove the sidecar and the directory we made.
            let _ = std::fs::remove_file(&vocab_path);
            let _ = std::fs::remove_file(out.join(MANIFEST_FILE));
            if !existed {
                let _ = std::fs::remove_dir(out);
            }
            Err(e)
        }
    }
}

fn field_vocab_schema(v: &[FieldVocab]) -> Vec<CatField> {
    v.iter()
        .map(|f| CatField {
            name: f.name.clone(),
            vocab: f.vocab,
        })
        .collect()
}

/// Raw id of a categorical cell that maps to id 0 whatever the vocabulary (an empty cell of a
/// field with `empty_is_unknown`).
pub(crate) const UNKNOWN_RAW: u32 = u32::MAX;

/// Distinct values of one categorical field in order of first appearance; cells are stored
/// as indices into it (raw ids) until the vocabulary is fitted.
#[derive(Debug, Default)]
pub(crate) struct Interner {
    map: HashMap<String, u32>,
    values: Vec<String>,
}

impl Interner {
    /// Raw id of `value`, adding it if new.
    fn intern(&mut self, value: &str) -> Option<u32> {
        if let Some(&id) = self.map.get(value) {
            return Some(id);
        }
        let id = u32::try_from(self.values.len())
            .ok()
            .filter(|&id| id < UNKNOWN_RAW - 1)?;
        self.map.insert(value.to_string(), id);
        self.values.push(value.to_string());
        Some(id)
    }
}

/// A ragged sequence column in CSR form, raw (not yet encoded) values.
#[derive(Debug)]
pub(crate) struct Seq {
    /// `offsets[i]..offsets[i+1]` are the events of row i.
    offsets: Vec<usize>,
    /// Raw categorical ids, `[events, E_c]`.
    cat: Vec<u32>,
    /// Transformed (log1p where configured) numbers, `[events, E_d]`.
    num: Vec<f64>,
}

impl Seq {
    fn new() -> Seq {
        Seq {
            offsets: vec![0],
            cat: Vec::new(),
            num: Vec::new(),
        }
    }

    /// Ends the current row's sequence.
    fn close_row(&mut self, events: usize) {
        let last = self.offsets[self.offsets.len() - 1];
        self.offsets.push(last + events);
    }

    fn events(&self, row: usize) -> std::ops::Range<usize> {
        self.offsets[row]..self.offsets[row + 1]
    }

    /// The longest row sequence.
    fn longest(&self) -> usize {
        self.offsets
            .windows(2)
            .map(|w| w[1] - w[0])
            .max()
            .unwrap_or(0)
    }
}

/// Everything read from the input, checked, before splitting and encoding.
#[derive(Debug)]
pub(crate) struct Table {
    /// Users file (for messages).
    users_file: PathBuf,
    /// User ids in file order.
    user_ids: Vec<String>,
    /// Line (CSV) or row (Parquet) of each user in the users file.
    user_lines: Vec<u64>,
    /// `line` or `row`.
    users_word: &'static str,
    /// Labels, when the import is labelled.
    labels: Option<Vec<u8>>,
    /// Activation times (long layout, or wide with `users.time`), in `unit`.
    times: Option<Vec<f64>>,
    /// The unit of the times.
    unit: Unit,
    /// Splits read from the split column, when that is the method.
    split_column: Option<Vec<u8>>,
    /// Profile numbers `[n, F_d]`, transformed.
    profile_num: Vec<f64>,
    /// Profile raw categorical ids `[n, F_c]`.
    profile_cat: Vec<u32>,
    /// Interners of the profile categorical fields.
    profile_interners: Vec<Interner>,
    /// Interners of the event categorical fields (shared by pre and in).
    event_interners: Vec<Interner>,
    /// Pre-service sequences.
    pre: Seq,
    /// In-service sequences.
    inn: Seq,
    /// Events dropped by the in-service window.
    dropped_events: u64,
    /// The windows' spans (long layout).
    event_spans: Option<EventSpans>,
    /// Warnings about the input (printed by the command, not fatal).
    warnings: Vec<String>,
}

/// The spans of the windows' events, in days from their user's activation.
#[derive(Debug)]
pub(crate) struct EventSpans {
    /// The in-service window, in days.
    window_days: Option<f64>,
    /// Pre-service events, days before activation.
    pre: WindowSpan,
    /// In-service events, days after activation.
    inn: WindowSpan,
}

/// A median distance from the activation beyond which the times are probably misread
/// (ten years, in days).
pub(crate) const TOO_FAR_DAYS: f64 = 3652.5;

/// The span of `days`, sorted ascending.
pub(crate) fn window_span(days: &[f64]) -> WindowSpan {
    let n = days.len();
    WindowSpan {
        events: n as u64,
        min_days: days.first().copied(),
        median_days: (n > 0).then(|| {
            if n % 2 == 1 {
                days[n / 2]
            } else {
                (days[n / 2 - 1] + days[n / 2]) / 2.0
            }
        }),
        max_days: days.last().copied(),
    }
}

/// The (upper) median of `|x|` over `xs`, which it reorders; `None` when empty.
pub(crate) fn median_abs(xs: &mut [f64]) -> Option<f64> {
    if xs.is_empty() {
        return None;
    }
    for x in xs.iter_mut() {
        *x = x.abs();
    }
    let mid = xs.len() / 2;
    Some(*xs.select_nth_unstable_by(mid, f64::total_cmp).1)
}

/// The manifest's `times`: the activations' span and, in the long layout, the windows'.
fn time_spans(table: &Table) -> Option<TimeSpans> {
    let times = table.times.as_ref()?;
    let first = times.iter().copied().min_by(f64::total_cmp)?;
    let last = times.iter().copied().max_by(f64::total_cmp)?;
    let iso = |v: f64| {
        let ns = v * table.unit.seconds() * 1e9;
        match Timestamp::from_nanosecond(ns.round() as i128) {
            Ok(ts) if ns.abs() < 1e30 => ts.to_string(),
            _ => format!("{v} (out of the calendar's range)"),
        }
    };
    let spans = table.event_spans.as_ref();
    Some(TimeSpans {
        activation_first: iso(first),
        activation_last: iso(last),
        window_days: spans.and_then(|s| s.window_days),
        pre: spans.map(|s| s.pre.clone()),
        in_service: spans.map(|s| s.inn.clone()),
    })
}

impl Table {
    fn rows(&self) -> usize {
        self.user_ids.len()
    }
}

/// A resolved column: its index in the record and its name (for messages).
#[derive(Debug, Clone)]
pub(crate) struct Col {
    index: usize,
    name: String,
}

/// The location of a cell: file and line (or row); errors add the column.
#[derive(Debug, Clone, Copy)]
pub(crate) struct At<'a> {
    file: &'a Path,
    line: u64,
    /// `line` (CSV) or `row` (Parquet).
    word: &'static str,
}

impl<'a> At<'a> {
    /// The current position of `src`, at `line`.
    fn of(src: &'a Source, line: u64) -> At<'a> {
        At {
            file: src.path(),
            line,
            word: src.position_word(),
        }
    }

    /// An error about the cell in column `col` on this line.
    fn err(&self, col: &Col, msg: impl std::fmt::Display) -> Error {
        Error::format(
            self.file,
            format!("{} {}, column `{}`: {msg}", self.word, self.line, col.name),
        )
    }

    /// The cell.
    fn cell<'s>(&self, src: &'s Source, col: &Col) -> Result<Cell<'s>> {
        src.cell(col).map_err(|e| self.err(col, e))
    }

    /// The cell as text (id, label, split, category; a Parquet integer in decimal).
    fn text<'s>(&self, src: &'s Source, col: &Col) -> Result<Cow<'s, str>> {
        Ok(match self.cell(src, col)? {
            Cell::Empty => Cow::Borrowed(""),
            Cell::Text(s) => Cow::Borrowed(s),
            Cell::Int(i) => Cow::Owned(i.to_string()),
            other => return Err(self.err(col, format!("internal: {other:?} is not text"))),
        })
    }

    /// A time in the column's form, never filled.
    fn time(&self, src: &Source, col: &Col, reader: &TimeReader) -> Result<Time> {
        let raw = match self.cell(src, col)? {
            Cell::Empty => {
                return Err(self.err(
                    col,
                    format!(
                        "empty cell, a time is required ({})",
                        reader.form().expected()
                    ),
                ))
            }
            Cell::Text(s) => Raw::Text(s),
            Cell::Int(i) => Raw::Number(i as f64),
            Cell::Float(x) => Raw::Number(x),
            Cell::Instant(t) => Raw::Instant(t),
            Cell::Civil(dt) => Raw::Civil(dt),
            Cell::Date(d) => Raw::Date(d),
        };
        reader.read(raw).map_err(|e| self.err(col, e))
    }

    /// A numeric field: parsed, filled where configured, transformed by log1p if set.
    fn number(&self, src: &Source, col: &Col, cfg: &NumConfig) -> Result<f64> {
        let v = match self.cell(src, col)? {
            Cell::Empty => cfg.fill.ok_or_else(|| {
                self.err(
                    col,
                    "empty cell and the column's config names no `fill` value",
                )
            })?,
            Cell::Text(s) => {
                let v: f64 = s
                    .parse()
                    .map_err(|_| self.err(col, format!("cannot parse {s:?} as a number")))?;
                self.finite_or_fill(col, cfg, v, s)?
            }
            Cell::Int(i) => i as f64,
            Cell::Float(x) => self.finite_or_fill(col, cfg, x, &x.to_string())?,
            other => return Err(self.err(col, format!("internal: {other:?} is not a number"))),
        };
        Ok(if cfg.log1p { signed_log1p(v) } else { v })
    }

    fn finite_or_fill(&self, col: &Col, cfg: &NumConfig, v: f64, s: &str) -> Result<f64> {
        if v.is_finite() {
            return Ok(v);
        }
        cfg.fill.ok_or_else(|| {
            self.err(
                col,
                format!("{s:?} is not finite and the column's config names no `fill` value"),
            )
        })
    }

    /// A categorical field: the raw id of the value (or of `fill` for an empty cell).
    fn category(
        &self,
        src: &Source,
        col: &Col,
        cfg: &CatConfig,
        interner: &mut Interner,
    ) -> Result<u32> {
        let s = self.text(src, col)?;
        let s: &str = if s.is_empty() {
            if cfg.empty_is_unknown {
                return Ok(UNKNOWN_RAW);
            }
            cfg.fill.as_deref().ok_or_else(|| {
                self.err(
                    col,
                    "empty categorical cell and the column's config has neither `fill` nor `empty_is_unknown`",
                )
            })?
        } else {
            &s
        };
        interner
            .intern(s)
            .ok_or_else(|| self.err(col, "more distinct values than a u32 vocabulary holds"))
    }
}

/// The raw id of a derived calendar field's value at `civil` (hour `00`…`23`, day `Mon`…
/// `Sun`, month `Jan`…`Dec`); unknown when the time is outside the calendar's range.
pub(crate) fn calendar_cell(d: Derived, civil: Option<DateTime>, interner: &mut Interner) -> u32 {
    const DAYS: [&str; 7] = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    const HOURS: [&str; 24] = [
        "00", "01", "02", "03", "04", "05", "06", "07", "08", "09", "10", "11", "12", "13", "14",
        "15", "16", "17", "18", "19", "20", "21", "22", "23",
    ];
    let Some(dt) = civil else {
        return UNKNOWN_RAW;
    };
    let value = match d {
        Derived::HourOfDay => HOURS[dt.hour() as usize],
        Derived::DayOfWeek => DAYS[dt.weekday().to_monday_zero_offset() as usize],
        Derived::ActivationMonth => MONTHS[dt.month() as usize - 1],
        Derived::SincePrevious | Derived::SinceActivation => return UNKNOWN_RAW,
    };
    // At most 24 values: the interner cannot overflow.
    interner.intern(value).unwrap_or(UNKNOWN_RAW)
}

/// `sign(x)·ln(1+|x|)`.
pub fn signed_log1p(x: f64) -> f64 {
    x.signum() * x.abs().ln_1p()
}

/// The users-file columns shared by both layouts, resolved against the header.
pub(crate) struct UserColumns {
    id: Col,
    label: Option<Col>,
    time: Option<(Col, TimeReader)>,
    split: Option<Col>,
    profile_num: Vec<Col>,
    profile_cat: Vec<Col>,
}

impl UserColumns {
    /// The columns of `config` in `csv`'s header; activation times are read into `unit`.
    fn resolve(config: &ImportConfig, src: &mut Source, unit: Unit) -> Result<UserColumns> {
        let u = &config.users;
        let tz = config.time_zone()?;
        let opt = |src: &mut Source, key: &str, name: &Option<String>, role: Role| {
            name.as_ref()
                .map(|n| src.column(config, key, n, role))
                .transpose()
        };
        let id = src.column(config, "users.id", &u.id, Role::Text)?;
        let label = opt(src, "users.label", &u.label, Role::Text)?;
        let time = opt(src, "users.time", &u.time, Role::Time(u.time_form()))?
            .map(|col| (col, TimeReader::new(u.time_form(), tz, unit)));
        let split = match config.split.method {
            SplitMethod::Column => opt(src, "split.column", &config.split.column, Role::Text)?,
            _ => None,
        };
        let mut profile_num = Vec::new();
        for (i, f) in config.profile_num.iter().enumerate() {
            let key = format!("profile_num[{i}].column");
            let name = f.column.as_deref().unwrap_or_default();
            profile_num.push(src.column(config, &key, name, Role::Number)?);
        }
        let mut profile_cat = Vec::new();
        for (i, f) in config.profile_cat.iter().enumerate() {
            let key = format!("profile_cat[{i}].column");
            let name = f.column.as_deref().unwrap_or_default();
            profile_cat.push(src.column(config, &key, name, Role::Text)?);
        }
        Ok(UserColumns {
            id,
            label,
            time,
            split,
            profile_num,
            profile_cat,
        })
    }
}

impl Table {
    /// An empty table for `config`'s fields.
    fn new(config: &ImportConfig, users: &Source, cols: &UserColumns, unit: Unit) -> Table {
        Table {
            users_file: users.path().to_path_buf(),
            user_ids: Vec::new(),
            user_lines: Vec::new(),
            users_word: users.position_word(),
            labels: cols.label.as_ref().map(|_| Vec::new()),
            times: cols.time.as_ref().map(|_| Vec::new()),
            unit,
            split_column: cols.split.as_ref().map(|_| Vec::new()),
            profile_num: Vec::new(),
            profile_cat: Vec::new(),
            profile_interners: config
                .profile_cat
                .iter()
                .map(|_| Interner::default())
                .collect(),
            event_interners: config
                .event_cat
                .iter()
                .map(|_| Interner::default())
                .collect(),
            pre: Seq::new(),
            inn: Seq::new(),
            dropped_events: 0,
            event_spans: None,
            warnings: Vec::new(),
        }
    }

    /// Parses the user part of a users-file record (id, label, time, split, profile) and
    /// appends it. `ids` maps user ids seen so far to their row (duplicates are an error).
    fn push_user(
        &mut self,
        config: &ImportConfig,
        cols: &UserColumns,
        at: At<'_>,
        src: &Source,
        ids: &mut HashMap<String, usize>,
    ) -> Result<()> {
        let id = at.text(src, &cols.id)?;
        if id.is_empty() {
            return Err(at.err(&cols.id, "empty user id"));
        }
        let row = self.user_ids.len();
        if let Some(&first) = ids.get(id.as_ref()) {
            return Err(at.err(
                &cols.id,
                format!(
                    "duplicate user id {id:?} (first on {} {})",
                    at.word, self.user_lines[first]
                ),
            ));
        }
        ids.insert(id.to_string(), row);
        if let (Some(col), Some(labels)) = (&cols.label, &mut self.labels) {
            let label = match at.text(src, col)?.as_ref() {
                "0" => 0,
                "1" => 1,
                s => return Err(at.err(col, format!("label {s:?} is not 0 or 1"))),
            };
            labels.push(label);
        }
        let mut civil = None;
        if let (Some((col, reader)), Some(times)) = (&cols.time, &mut self.times) {
            let time = at.time(src, col, reader)?;
            times.push(time.value);
            civil = time.civil;
        }
        if let (Some(col), Some(splits)) = (&cols.split, &mut self.split_column) {
            let s = at.text(src, col)?;
            let split = match s.to_ascii_lowercase().as_str() {
                "0" | "train" => 0,
                "1" | "valid" => 1,
                "2" | "test" => 2,
                _ => {
                    return Err(at.err(col, format!("split {s:?} is not 0/1/2 or train/valid/test")))
                }
            };
            splits.push(split);
        }
        for (col, cfg) in cols.profile_num.iter().zip(&config.profile_num) {
            self.profile_num.push(at.number(src, col, cfg)?);
        }
        for ((col, cfg), interner) in cols
            .profile_cat
            .iter()
            .zip(&config.profile_cat)
            .zip(&mut self.profile_interners)
        {
            self.profile_cat.push(at.category(src, col, cfg, interner)?);
        }
        let n = cols.profile_cat.len();
        for (cfg, interner) in config.profile_cat[n..]
            .iter()
            .zip(&mut self.profile_interners[n..])
        {
            if let Some(d) = cfg.derived {
                self.profile_cat.push(calendar_cell(d, civil, interner));
            }
        }
        self.user_ids.push(id.to_string());
        self.user_lines.push(at.line);
        Ok(())
    }
}

/// Split id of every row, per the config's method.
fn assign_splits(config: &ImportConfig, table: &Table) -> Result<Vec<u8>> {
    let n = table.rows();
    match config.split.method {
        SplitMethod::Column => table
            .split_column
            .clone()
            .ok_or_else(|| Error::invalid("internal: split column not read")),
        SplitMethod::Time => {
            let times = table
                .times
                .as_ref()
                .ok_or_else(|| Error::invalid("internal: activation times not read"))?;
            let cutoff = |key: &str, v: &Option<config::TimeValue>| -> Result<f64> {
                match v {
                    Some(v) => {
                        let (x, from) = config.cutoff(key, v)?;
                        Ok(table.unit.convert(x, from))
                    }
                    None => Ok(f64::INFINITY),
                }
            };
            let v = cutoff("split.valid_from", &config.split.valid_from)?;
            let t = cutoff("split.test_from", &config.split.test_from)?;
            Ok(times
                .iter()
                .map(|&x| {
                    if x >= t {
                        2
                    } else if x >= v {
                        1
                    } else {
                        0
                    }
                })
                .collect())
        }
        SplitMethod::Random => {
            let fractions = config.split.fractions.unwrap_or(DEFAULT_FRACTIONS);
            let mut rng = ChaCha8Rng::seed_from_u64(config.split.seed.unwrap_or(DEFAULT_SEED));
            let mut splits = vec![0u8; n];
            let strata: Vec<Vec<usize>> = match &table.labels {
                Some(labels) => (0..2u8)
                    .map(|c| (0..n).filter(|&i| labels[i] == c).collect())
                    .collect(),
                None => vec![(0..n).collect()],
            };
            for mut rows in strata {
                rows.shuffle(&mut rng);
                let m = rows.len() as f64;
                let train_end = (m * fractions[0]).round() as usize;
                let valid_end = ((m * (fractions[0] + fractions[1])).round() as usize)
                    .clamp(train_end, rows.len());
                for (k, &row) in rows.iter().enumerate() {
                    splits[row] = if k < train_end {
                        0
                    } else if k < valid_end {
                        1
                    } else {
                        2
                    };
                }
            }
            Ok(splits)
        }
    }
}

/// The fitted encodings: vocabularies (raw id → id) and numeric statistics.
struct Encoding {
    vocab: Vocabularies,
    /// Per profile categorical field, raw id → id.
    profile_map: Vec<Vec<u32>>,
    /// Per event categorical field, raw id → id.
    event_map: Vec<Vec<u32>>,
    profile_num: Vec<NumField>,
    event_num: Vec<NumField>,
}

impl Encoding {
    fn fit(config: &ImportConfig, table: &Table, splits: &[u8]) -> Result<Encoding> {
        let train: Vec<usize> = (0..table.rows()).filter(|&i| splits[i] == 0).collect();
        let (fc, ec) = (config.profile_cat.len(), config.event_cat.len());
        let (fd, ed) = (config.profile_num.len(), config.event_num.len());
        // Train-split value counts.
        let mut profile_counts: Vec<Vec<u64>> = table
            .profile_interners
            .iter()
            .map(|i| vec![0; i.values.len()])
            .collect();
        let mut event_counts: Vec<Vec<u64>> = table
            .event_interners
            .iter()
            .map(|i| vec![0; i.values.len()])
            .collect();
        let count = |counts: &mut [Vec<u64>], cells: &[u32], width: usize| {
            for (k, &raw) in cells.iter().enumerate() {
                if let Some(c) = counts[k % width].get_mut(raw as usize) {
                    *c += 1;
                }
            }
        };
        let mut profile_stats = vec![Moments::default(); fd];
        let mut event_stats = vec![Moments::default(); ed];
        for &i in &train {
            if fc > 0 {
                count(
                    &mut profile_counts,
                    &table.profile_cat[i * fc..(i + 1) * fc],
                    fc,
                );
            }
            for (j, s) in profile_stats.iter_mut().enumerate() {
                s.add(table.profile_num[i * fd + j]);
            }
            for seq in [&table.pre, &table.inn] {
                let ev = seq.events(i);
                if ec > 0 {
                    count(&mut event_counts, &seq.cat[ev.start * ec..ev.end * ec], ec);
                }
                for (k, &x) in seq.num[ev.start * ed..ev.end * ed].iter().enumerate() {
                    event_stats[k % ed].add(x);
                }
            }
        }
        let fit_vocab = |names: Vec<String>,
                         min_counts: Vec<u64>,
                         interners: &[Interner],
                         counts: &[Vec<u64>]|
         -> Result<(Vec<FieldVocab>, Vec<Vec<u32>>)> {
            let mut vocabs = Vec::new();
            let mut maps = Vec::new();
            for (((name, min), interner), counts) in
                names.into_iter().zip(min_counts).zip(interners).zip(counts)
            {
                let mut kept: Vec<usize> =
                    (0..counts.len()).filter(|&r| counts[r] >= min).collect();
                kept.sort_by(|&a, &b| {
                    counts[b]
                        .cmp(&counts[a])
                        .then_with(|| interner.values[a].cmp(&interner.values[b]))
                });
                let vocab = u32::try_from(kept.len() + 1).map_err(|_| {
                    Error::invalid(format!("field `{name}`: vocabulary too large for u32 ids"))
                })?;
                let mut map = vec![0u32; counts.len()];
                let mut ids = BTreeMap::new();
                for (k, &raw) in kept.iter().enumerate() {
                    map[raw] = k as u32 + 1;
                    ids.insert(interner.values[raw].clone(), k as u32 + 1);
                }
                vocabs.push(FieldVocab { name, vocab, ids });
                maps.push(map);
            }
            Ok((vocabs, maps))
        };
        let min_of = |c: &CatConfig| c.min_count.unwrap_or(config.min_count);
        let (profile_vocab, profile_map) = fit_vocab(
            config
                .profile_cat
                .iter()
                .map(CatConfig::field_name)
                .collect(),
            config.profile_cat.iter().map(min_of).collect(),
            &table.profile_interners,
            &profile_counts,
        )?;
        let (event_vocab, event_map) = fit_vocab(
            config.event_cat.iter().map(CatConfig::field_name).collect(),
            config.event_cat.iter().map(min_of).collect(),
            &table.event_interners,
            &event_counts,
        )?;
        let num_fields = |cfgs: &[NumConfig], stats: Vec<Moments>| -> Result<Vec<NumField>> {
            cfgs.iter()
                .zip(stats)
                .map(|(c, s)| {
                    let (mean, std) = s.mean_std();
                    if !(mean.is_finite() && std.is_finite()) {
                        return Err(Error::invalid(format!(
                            "field `{}`: train-split mean/std overflow (values too large; consider log1p = true)",
                            c.field_name()
                        )));
                    }
                    Ok(NumField {
                        name: c.field_name(),
                        mean,
                        std,
                        log1p: c.log1p,
                    })
                })
                .collect()
        };
        Ok(Encoding {
            vocab: Vocabularies {
                profile_cat: profile_vocab,
                event_cat: event_vocab,
            },
            profile_map,
            event_map,
            profile_num: num_fields(&config.profile_num, profile_stats)?,
            event_num: num_fields(&config.event_num, event_stats)?,
        })
    }
}

impl Encoding {
    /// The encoding of an earlier import in `dir`: its `vocab.json` and its schema's numeric
    /// statistics. The config's fields must match that schema (names, order, log1p); values
    /// missing from its vocabularies map to 0. Returns the reference schema too.
    fn from_reference(
        config: &ImportConfig,
        table: &Table,
        dir: &Path,
    ) -> Result<(Encoding, Schema)> {
        let manifest = Manifest::load(dir)?;
        let vocab = Vocabularies::load(dir)?;
        let schema = manifest.schema;
        let vocab_path = dir.join(VOCAB_FILE);
        let same = |list: &str, ours: Vec<String>, theirs: Vec<&str>| -> Result<()> {
            if ours.iter().map(String::as_str).eq(theirs.iter().copied()) {
                Ok(())
            } else {
                Err(config.error(
                    list,
                    format!(
                        "fields {ours:?} differ from those of the encoding_from dataset {}: {theirs:?}",
                        dir.display()
                    ),
                ))
            }
        };
        same(
            "profile_num",
            config
                .profile_num
                .iter()
                .map(NumConfig::field_name)
                .collect(),
            schema.profile_num.iter().map(|f| f.name.as_str()).collect(),
        )?;
        same(
            "event_num",
            config.event_num.iter().map(NumConfig::field_name).collect(),
            schema.event_num.iter().map(|f| f.name.as_str()).collect(),
        )?;
        same(
            "profile_cat",
            config
                .profile_cat
                .iter()
                .map(CatConfig::field_name)
                .collect(),
            schema.profile_cat.iter().map(|f| f.name.as_str()).collect(),
        )?;
        same(
            "event_cat",
            config.event_cat.iter().map(CatConfig::field_name).collect(),
            schema.event_cat.iter().map(|f| f.name.as_str()).collect(),
        )?;
        for (list, cfgs, fields) in [
            ("profile_num", &config.profile_num, &schema.profile_num),
            ("event_num", &config.event_num, &schema.event_num),
        ] {
            for (i, (c, f)) in cfgs.iter().zip(fields).enumerate() {
                if c.log1p != f.log1p {
                    return Err(config.error(
                        &format!("{list}[{i}].log1p"),
                        format!("is {}, the encoding_from dataset has {}", c.log1p, f.log1p),
                    ));
                }
            }
        }
        let maps = |vocabs: &[FieldVocab],
                    fields: &[CatField],
                    interners: &[Interner]|
         -> Result<Vec<Vec<u32>>> {
            if vocabs.len() != fields.len() {
                return Err(Error::format(
                    &vocab_path,
                    "the categorical fields do not match dataset.json",
                ));
            }
            vocabs
                .iter()
                .zip(fields)
                .zip(interners)
                .map(|((v, f), interner)| {
                    if v.name != f.name
                        || v.vocab != f.vocab
                        || v.ids.values().any(|&id| id == 0 || id >= v.vocab)
                    {
                        return Err(Error::format(
                            &vocab_path,
                            format!(
                                "field `{}`: does not match dataset.json (vocab {}) or has ids outside 1..vocab",
                                v.name, f.vocab
                            ),
                        ));
                    }
                    Ok(interner
                        .values
                        .iter()
                        .map(|value| v.ids.get(value).copied().unwrap_or(0))
                        .collect())
                })
                .collect()
        };
        let encoding = Encoding {
            profile_map: maps(
                &vocab.profile_cat,
                &schema.profile_cat,
                &table.profile_interners,
            )?,
            event_map: maps(&vocab.event_cat, &schema.event_cat, &table.event_interners)?,
            profile_num: schema.profile_num.clone(),
            event_num: schema.event_num.clone(),
            vocab,
        };
        Ok((encoding, schema))
    }
}

/// Running sums for a mean and a population standard deviation; Welford's update keeps
/// `m2 = Σ(x − mean)²` accurate without a second pass.
#[derive(Debug, Clone, Copy, Default)]
struct Moments {
    n: u64,
    mean: f64,
    m2: f64,
}

impl Moments {
    fn add(&mut self, x: f64) {
        self.n += 1;
        let d = x - self.mean;
        self.mean += d / self.n as f64;
        self.m2 += d * (x - self.mean);
    }

    /// `(mean, std)`, with `std = 1` when it is 0 (or there were no values, mean 0 then).
    fn mean_std(&self) -> (f64, f64) {
        if self.n == 0 {
            return (0.0, 1.0);
        }
        let std = (self.m2 / self.n as f64).sqrt();
        (self.mean, if std > 0.0 { std } else { 1.0 })
    }
}

/// Encodes each row and pushes it to the writer, in users-file order.
fn write_rows(
    writer: &mut DatasetWriter,
    table: &Table,
    splits: &[u8],
    enc: &Encoding,
) -> Result<()> {
    let (fd, fc) = (enc.profile_num.len(), enc.profile_map.len());
    let (ed, ec) = (enc.event_num.len(), enc.event_map.len());
    let mut buf = RowBuffers::default();
    for (i, &split) in splits.iter().enumerate() {
        let what = |field: &str| {
            format!(
                "{} {}: user {:?}, field `{field}`",
                table.users_word, table.user_lines[i], table.user_ids[i]
            )
        };
        buf.clear();
        standardise(
            &table.profile_num[i * fd..(i + 1) * fd],
            &enc.profile_num,
            &mut buf.profile_num,
        )
        .map_err(|f| Error::format(&table.users_file, format!("{}: {}", what(f), TOO_LARGE)))?;
        map_cats(
            &table.profile_cat[i * fc..(i + 1) * fc],
            &enc.profile_map,
            &mut buf.profile_cat,
        );
        for (seq, cat, num) in [
            (&table.pre, &mut buf.pre_cat, &mut buf.pre_num),
            (&table.inn, &mut buf.in_cat, &mut buf.in_num),
        ] {
            let ev = seq.events(i);
            map_cats(&seq.cat[ev.start * ec..ev.end * ec], &enc.event_map, cat);
            standardise(&seq.num[ev.start * ed..ev.end * ed], &enc.event_num, num).map_err(
                |f| Error::format(&table.users_file, format!("{}: {}", what(f), TOO_LARGE)),
            )?;
        }
        writer.push(&RowData {
            label: table.labels.as_ref().map(|l| l[i]),
            split,
            user_id: Some(&table.user_ids[i]),
            profile_num: &buf.profile_num,
            profile_cat: &buf.profile_cat,
            pre_cat: &buf.pre_cat,
            pre_num: &buf.pre_num,
            in_cat: &buf.in_cat,
            in_num: &buf.in_num,
        })?;
    }
    Ok(())
}

const TOO_LARGE: &str = "standardised value does not fit an f32 (consider log1p = true)";

#[derive(Default)]
struct RowBuffers {
    profile_num: Vec<f32>,
    profile_cat: Vec<u32>,
    pre_cat: Vec<u32>,
    pre_num: Vec<f32>,
    in_cat: Vec<u32>,
    in_num: Vec<f32>,
}

impl RowBuffers {
    fn clear(&mut self) {
        self.profile_num.clear();
        self.profile_cat.clear();
        self.pre_cat.clear();
        self.pre_num.clear();
        self.in_cat.clear();
        self.in_num.clear();
    }
}

/// Appends `(x − mean) / std` per field (cycling through `fields`); on an f32 overflow,
/// returns the field's name.
fn standardise<'f>(xs: &[f64], fields: &'f [NumField], out: &mut Vec<f32>) -> Result<(), &'f str> {
    for (k, &x) in xs.iter().enumerate() {
        let f = &fields[k % fields.len()];
        let v = ((x - f.mean) / f.std) as f32;
        if !v.is_finite() {
            return Err(&f.name);
        }
        out.push(v);
    }
    Ok(())
}

/// Appends the fitted ids of raw categorical cells (cycling through the fields' maps).
fn map_cats(raw: &[u32], maps: &[Vec<u32>], out: &mut Vec<u32>) {
    for (k, &r) in raw.iter().enumerate() {
        out.push(maps[k % maps.len()].get(r as usize).copied().unwrap_or(0));
    }
}
