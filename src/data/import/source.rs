//! The input files of an import, read row by row: CSV (the default) or Parquet (a file whose
//! name ends in `.parquet`), behind one [`Source`] that the layouts read cells from.
//!
//! **CSV**: a header line, trimmed cells, quotes checked by [`QuoteTracker`]; positions are
//! 1-based lines (the header is line 1).
//!
//! **Parquet**: read through the Arrow reader of the `parquet` crate, one record batch at a
//! time, row group by row group, and only the columns the config uses (a file larger than
//! memory is read in pieces the size of one row group's columns). Positions are 1-based data
//! rows. Each column's Arrow type is checked against its role when the column is resolved: a
//! string where a number is expected is an error naming the column and its Parquet type. A
//! null is an empty cell; strings are trimmed like CSV cells.

use std::fs::File;
use std::path::{Path, PathBuf};

use arrow_array::cast::AsArray;
use arrow_array::types::{
    ArrowDictionaryKeyType, Date32Type, Date64Type, Decimal128Type, Float32Type, Float64Type,
    Int16Type, Int32Type, Int64Type, Int8Type, TimestampMicrosecondType, TimestampMillisecondType,
    TimestampNanosecondType, TimestampSecondType, UInt16Type, UInt32Type, UInt64Type, UInt8Type,
};
use arrow_array::{Array, ArrayRef, RecordBatch};
use arrow_schema::{DataType, TimeUnit};
use jiff::civil::{Date, DateTime};
use jiff::tz::TimeZone;
use jiff::Timestamp;
use parquet::arrow::arrow_reader::{ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder};
use parquet::arrow::ProjectionMask;

use super::config::{ImportConfig, TimeForm};
use super::quotes::QuoteTracker;
use super::times::Unit;
use super::Col;
use crate::{Error, Result};

/// Rows per Parquet record batch.
const BATCH_ROWS: usize = 8192;

/// One cell of the current row.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Cell<'a> {
    /// An empty CSV cell, an empty string or a null.
    Empty,
    /// Text (trimmed, not empty).
    Text(&'a str),
    /// A Parquet integer.
    Int(i64),
    /// A Parquet float or decimal.
    Float(f64),
    /// A Parquet timestamp with a time zone: an instant.
    Instant(Timestamp),
    /// A Parquet timestamp without time zone: a civil (wall-clock) date and time.
    Civil(DateTime),
    /// A Parquet date.
    Date(Date),
}

/// What a column is used for, which decides the Parquet types it may have.
#[derive(Debug, Clone)]
pub(crate) enum Role {
    /// User id, label, split column, categorical field: strings or integers.
    Text,
    /// A numeric field: integers, floats or decimals.
    Number,
    /// A time column of this form: timestamps, dates, strings, or numbers for the numeric
    /// forms.
    Time(TimeForm),
}

/// An input file being read.
pub(crate) enum Source {
    /// A CSV file.
    Csv(Box<Csv>),
    /// A Parquet file.
    Parquet(Box<ParquetFile>),
}

impl Source {
    /// Opens `path`: Parquet when its name ends in `.parquet` (any case), CSV otherwise.
    pub(crate) fn open(path: &Path) -> Result<Source> {
        let parquet = path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| e.eq_ignore_ascii_case("parquet"));
        Ok(if parquet {
            Source::Parquet(Box::new(ParquetFile::open(path)?))
        } else {
            Source::Csv(Box::new(Csv::open(path)?))
        })
    }

    /// The file's path.
    pub(crate) fn path(&self) -> &Path {
        match self {
            Source::Csv(c) => &c.path,
            Source::Parquet(p) => &p.path,
        }
    }

    /// How positions are counted in messages: `line` (CSV) or `row` (Parquet).
    pub(crate) fn position_word(&self) -> &'static str {
        match self {
            Source::Csv(_) => "line",
            Source::Parquet(_) => "row",
        }
    }

    /// The unit in which the time column `name` of `form` is best compared: a Parquet
    /// timestamp's or date's own, else the form's.
    pub(crate) fn time_unit(&self, name: &str, form: &TimeForm) -> Unit {
        if let Source::Parquet(p) = self {
            if let Some(i) = p.headers.iter().position(|h| h == name) {
                match &p.types[i] {
                    DataType::Timestamp(TimeUnit::Millisecond, _) => return Unit::Millis,
                    DataType::Timestamp(..) | DataType::Date32 | DataType::Date64 => {
                        return Unit::Seconds
                    }
                    _ => {}
                }
            }
        }
        form.unit()
    }

    /// Whether the time column `name` of `form` has a time of day: a Parquet timestamp
    /// does, a Parquet date does not, otherwise the form decides.
    pub(crate) fn time_of_day(&self, name: &str, form: &TimeForm) -> bool {
        if let Source::Parquet(p) = self {
            if let Some(i) = p.headers.iter().position(|h| h == name) {
                match &p.types[i] {
                    DataType::Timestamp(..) => return true,
                    DataType::Date32 | DataType::Date64 => return false,
                    _ => {}
                }
            }
        }
        form.has_time_of_day()
    }

    /// Index of column `name` used as `role`; a missing column is a config error naming
    /// `key`, a Parquet column of the wrong type an error naming the column and its type.
    pub(crate) fn column(
        &mut self,
        config: &ImportConfig,
        key: &str,
        name: &str,
        role: Role,
    ) -> Result<Col> {
        let headers = match self {
            Source::Csv(c) => &c.headers,
            Source::Parquet(p) => &p.headers,
        };
        let mut found = headers.iter().enumerate().filter(|(_, h)| *h == name);
        let index = match (found.next(), found.next()) {
            (Some((i, _)), None) => i,
            (None, _) => {
                return Err(config.error(
                    key,
                    format!(
                        "column `{name}` is not in the header of {}",
                        self.path().display()
                    ),
                ))
            }
            (Some(_), Some(_)) => {
                let place = match self {
                    Source::Csv(_) => "line 1, ",
                    Source::Parquet(_) => "",
                };
                return Err(Error::format(
                    self.path(),
                    format!("{place}column `{name}`: the header has this column more than once"),
                ));
            }
        };
        if let Source::Parquet(p) = self {
            p.check_type(index, name, key, &role)?;
            p.used.push(index);
        }
        Ok(Col {
            index,
            name: name.to_string(),
        })
    }

    /// Moves to the next row; returns its position (line or row), or `None` at the end.
    pub(crate) fn next(&mut self) -> Result<Option<u64>> {
        match self {
            Source::Csv(c) => c.next(),
            Source::Parquet(p) => p.next(),
        }
    }

    /// The cell of column `col` in the current row; an error for a CSV record shorter than
    /// its header (the reader refuses those, so this is a safeguard).
    pub(crate) fn cell(&self, col: &Col) -> std::result::Result<Cell<'_>, String> {
        match self {
            Source::Csv(c) => match c.record.get(col.index) {
                Some("") => Ok(Cell::Empty),
                Some(s) => Ok(Cell::Text(s)),
                None => Err("missing cell (record shorter than the header)".into()),
            },
            Source::Parquet(p) => p.cell(col.index),
        }
    }
}

/// A CSV file being read: trimmed cells, a header line, every record as long as the header,
/// quotes balanced (see [`super::quotes`]).
pub(crate) struct Csv {
    path: PathBuf,
    reader: csv::Reader<QuoteTracker<File>>,
    headers: Vec<String>,
    record: csv::StringRecord,
}

impl Csv {
    /// Opens `path` and reads its header (line 1).
    fn open(path: &Path) -> Result<Csv> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let mut reader = csv::ReaderBuilder::new()
            .has_headers(true)
            .trim(csv::Trim::All)
            .from_reader(QuoteTracker::new(file));
        let read = reader.headers().cloned();
        if let Some(p) = reader.get_ref().problem() {
            if p.open_line() < reader.position().line().max(2) {
                return Err(p.to_error(path, &[]));
            }
        }
        let headers: Vec<String> = read
            .map_err(|e| csv_error(path, e))?
            .iter()
            .map(str::to_string)
            .collect();
        if headers.is_empty() || headers.iter().all(String::is_empty) {
            return Err(Error::format(
                path,
                "line 1: empty file, expected a header line",
            ));
        }
        Ok(Csv {
            path: path.to_path_buf(),
            reader,
            headers,
            record: csv::StringRecord::new(),
        })
    }

    /// Reads the next record; returns its 1-based line, or `None` at the end. A quote
    /// problem ([`super::quotes`]) whose opening quote lies in the record (or before the
    /// end) is reported in place of the record, before anything else about it.
    fn next(&mut self) -> Result<Option<u64>> {
        let read = self.reader.read_record(&mut self.record);
        if let Some(p) = self.reader.get_ref().problem() {
            let end = matches!(read, Ok(false));
            if end || p.open_line() < self.reader.position().line() {
                return Err(p.to_error(&self.path, &self.headers));
            }
        }
        match read {
            Ok(true) => Ok(Some(self.record.position().map(|p| p.line()).unwrap_or(0))),
            Ok(false) => Ok(None),
            Err(e) => Err(csv_error(&self.path, e)),
        }
    }
}

fn csv_error(path: &Path, e: csv::Error) -> Error {
    let line = e.position().map(|p| p.line());
    match e.into_kind() {
        csv::ErrorKind::Io(io) => Error::io(path, io),
        csv::ErrorKind::UnequalLengths {
            pos,
            expected_len,
            len,
        } => Error::format(
            path,
            format!(
                "line {}: {len} fields, but the header has {expected_len}",
                pos.map(|p| p.line()).or(line).unwrap_or(0)
            ),
        ),
        csv::ErrorKind::Utf8 { pos, err } => Error::format(
            path,
            format!(
                "line {}, column {}: not valid UTF-8",
                pos.map(|p| p.line()).or(line).unwrap_or(0),
                err.field() + 1
            ),
        ),
        other => Error::format(path, format!("line {}: {:?}", line.unwrap_or(0), other)),
    }
}

/// A Parquet file being read, record batch by record batch.
pub(crate) struct ParquetFile {
    path: PathBuf,
    /// Top-level column names.
    headers: Vec<String>,
    /// Arrow type of each top-level column.
    types: Vec<DataType>,
    /// Parquet type of each top-level column, for messages.
    parquet_types: Vec<String>,
    /// The reader's builder, until the first row is asked for (the projection is only known
    /// once every column has been resolved).
    builder: Option<ParquetRecordBatchReaderBuilder<File>>,
    reader: Option<ParquetRecordBatchReader>,
    /// Columns resolved so far (indices into `headers`).
    used: Vec<usize>,
    /// For each top-level column, its position in the projected batches.
    batch_column: Vec<Option<usize>>,
    batch: Option<RecordBatch>,
    /// Current row within `batch`.
    row_in_batch: usize,
    /// Current 1-based row in the file.
    row: u64,
}

impl ParquetFile {
    fn open(path: &Path) -> Result<ParquetFile> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let builder = ParquetRecordBatchReaderBuilder::try_new(file)
            .map_err(|e| Error::format(path, format!("not a readable Parquet file: {e}")))?;
        let schema = builder.schema().clone();
        let roots = builder.parquet_schema().root_schema().get_fields();
        let parquet_types = roots
            .iter()
            .map(|t| {
                if t.is_primitive() {
                    let logical = t
                        .get_basic_info()
                        .logical_type_ref()
                        .map(|l| format!(" ({l:?})"))
                        .unwrap_or_default();
                    format!("{:?}{logical}", t.get_physical_type())
                } else {
                    "a nested group".to_string()
                }
            })
            .collect();
        Ok(ParquetFile {
            path: path.to_path_buf(),
            headers: schema.fields().iter().map(|f| f.name().clone()).collect(),
            types: schema
                .fields()
                .iter()
                .map(|f| f.data_type().clone())
                .collect(),
            parquet_types,
            builder: Some(builder),
            reader: None,
            used: Vec::new(),
            batch_column: Vec::new(),
            batch: None,
            row_in_batch: 0,
            row: 0,
        })
    }

    /// Checks column `index`'s Arrow type against `role`.
    fn check_type(&self, index: usize, name: &str, key: &str, role: &Role) -> Result<()> {
        let ty = &self.types[index];
        let ok = match role {
            Role::Text => is_text(ty) || is_integer(ty),
            Role::Number => is_integer(ty) || is_float(ty),
            Role::Time(form) => {
                matches!(
                    ty,
                    DataType::Timestamp(..) | DataType::Date32 | DataType::Date64
                ) || is_text(ty)
                    || (form.number_unit().is_some() && (is_integer(ty) || is_float(ty)))
            }
        };
        if ok {
            return Ok(());
        }
        let wanted = match role {
            Role::Text => "text or integers (a user id, label, split or category)".to_string(),
            Role::Number => "numbers (integers, floats or decimals)".to_string(),
            Role::Time(form) => {
                format!("times (a timestamp or date column, or {})", form.expected())
            }
        };
        Err(Error::format(
            &self.path,
            format!(
                "column `{name}` (config key `{key}`): Parquet type {}, read as Arrow {ty}, \
                 but the config uses it for {wanted}",
                self.parquet_types[index]
            ),
        ))
    }

    fn next(&mut self) -> Result<Option<u64>> {
        if let Some(builder) = self.builder.take() {
            let mut used = self.used.clone();
            used.sort_unstable();
            used.dedup();
            self.batch_column = vec![None; self.headers.len()];
            for (k, &i) in used.iter().enumerate() {
                self.batch_column[i] = Some(k);
            }
            let mask = ProjectionMask::roots(builder.parquet_schema(), used);
            let reader = builder
                .with_projection(mask)
                .with_batch_size(BATCH_ROWS)
                .build()
                .map_err(|e| Error::format(&self.path, format!("cannot read: {e}")))?;
            self.reader = Some(reader);
        }
        self.row_in_batch += 1;
        while self
            .batch
            .as_ref()
            .is_none_or(|b| self.row_in_batch >= b.num_rows())
        {
            let Some(reader) = self.reader.as_mut() else {
                return Ok(None);
            };
            match reader.next() {
                None => {
                    self.reader = None;
                    self.batch = None;
                    return Ok(None);
                }
                Some(Ok(batch)) => {
                    self.batch = Some(batch);
                    self.row_in_batch = 0;
                }
                Some(Err(e)) => {
                    return Err(Error::format(
                        &self.path,
                        format!("after row {}: cannot read: {e}", self.row),
                    ))
                }
            }
        }
        self.row += 1;
        Ok(Some(self.row))
    }

    fn column(&self, index: usize) -> Option<&ArrayRef> {
        let k = self.batch_column.get(index).copied().flatten()?;
        self.batch.as_ref().map(|b| b.column(k))
    }

    fn cell(&self, index: usize) -> std::result::Result<Cell<'_>, String> {
        let array = self
            .column(index)
            .ok_or_else(|| "internal: column not read".to_string())?;
        cell_at(array.as_ref(), self.row_in_batch)
    }
}

fn is_text(ty: &DataType) -> bool {
    match ty {
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => true,
        DataType::Dictionary(_, v) => is_text(v),
        _ => false,
    }
}

fn is_integer(ty: &DataType) -> bool {
    matches!(
        ty,
        DataType::Int8
            | DataType::Int16
            | DataType::Int32
            | DataType::Int64
            | DataType::UInt8
            | DataType::UInt16
            | DataType::UInt32
            | DataType::UInt64
    )
}

fn is_float(ty: &DataType) -> bool {
    matches!(
        ty,
        DataType::Float32 | DataType::Float64 | DataType::Decimal128(..)
    )
}

/// The cell at row `r` of `array` (of a type [`ParquetFile::check_type`] accepted).
fn cell_at(array: &dyn Array, r: usize) -> std::result::Result<Cell<'_>, String> {
    if array.is_null(r) {
        return Ok(Cell::Empty);
    }
    Ok(match array.data_type() {
        DataType::Utf8 => text(array.as_string::<i32>().value(r)),
        DataType::LargeUtf8 => text(array.as_string::<i64>().value(r)),
        DataType::Utf8View => text(array.as_string_view().value(r)),
        DataType::Dictionary(key, _) => match key.as_ref() {
            DataType::Int8 => dictionary_cell::<Int8Type>(array, r)?,
            DataType::Int16 => dictionary_cell::<Int16Type>(array, r)?,
            DataType::Int32 => dictionary_cell::<Int32Type>(array, r)?,
            DataType::Int64 => dictionary_cell::<Int64Type>(array, r)?,
            DataType::UInt8 => dictionary_cell::<UInt8Type>(array, r)?,
            DataType::UInt16 => dictionary_cell::<UInt16Type>(array, r)?,
            DataType::UInt32 => dictionary_cell::<UInt32Type>(array, r)?,
            DataType::UInt64 => dictionary_cell::<UInt64Type>(array, r)?,
            other => return Err(format!("unsupported dictionary key type {other}")),
        },
        DataType::Int8 => Cell::Int(array.as_primitive::<Int8Type>().value(r).into()),
        DataType::Int16 => Cell::Int(array.as_primitive::<Int16Type>().value(r).into()),
        DataType::Int32 => Cell::Int(array.as_primitive::<Int32Type>().value(r).into()),
        DataType::Int64 => Cell::Int(array.as_primitive::<Int64Type>().value(r)),
        DataType::UInt8 => Cell::Int(array.as_primitive::<UInt8Type>().value(r).into()),
        DataType::UInt16 => Cell::Int(array.as_primitive::<UInt16Type>().value(r).into()),
        DataType::UInt32 => Cell::Int(array.as_primitive::<UInt32Type>().value(r).into()),
        DataType::UInt64 => {
            let v = array.as_primitive::<UInt64Type>().value(r);
            i64::try_from(v).map_or(Cell::Float(v as f64), Cell::Int)
        }
        DataType::Float32 => Cell::Float(array.as_primitive::<Float32Type>().value(r).into()),
        DataType::Float64 => Cell::Float(array.as_primitive::<Float64Type>().value(r)),
        DataType::Decimal128(_, scale) => {
            // Through decimal text, so the value is the correctly rounded f64 of the
            // decimal, as a CSV cell with the same digits would give.
            let v = array.as_primitive::<Decimal128Type>().value(r);
            let x: f64 = format!("{v}e{}", -i32::from(*scale))
                .parse()
                .map_err(|_| format!("decimal {v} with scale {scale} is not a number"))?;
            Cell::Float(x)
        }
        DataType::Timestamp(unit, tz) => {
            let v = match unit {
                TimeUnit::Second => array.as_primitive::<TimestampSecondType>().value(r),
                TimeUnit::Millisecond => array.as_primitive::<TimestampMillisecondType>().value(r),
                TimeUnit::Microsecond => array.as_primitive::<TimestampMicrosecondType>().value(r),
                TimeUnit::Nanosecond => array.as_primitive::<TimestampNanosecondType>().value(r),
            };
            let per_second: i128 = match unit {
                TimeUnit::Second => 1_000_000_000,
                TimeUnit::Millisecond => 1_000_000,
                TimeUnit::Microsecond => 1_000,
                TimeUnit::Nanosecond => 1,
            };
            let ts = Timestamp::from_nanosecond(i128::from(v) * per_second)
                .map_err(|e| format!("timestamp {v} ({unit:?}) is out of range: {e}"))?;
            // Arrow: a timestamp with a time zone is an instant (stored as UTC); without
            // one it is a wall-clock time, stored as if it were UTC.
            match tz {
                Some(_) => Cell::Instant(ts),
                None => Cell::Civil(TimeZone::UTC.to_datetime(ts)),
            }
        }
        DataType::Date32 => {
            let days = array.as_primitive::<Date32Type>().value(r);
            date_cell(i64::from(days) * 86_400)?
        }
        DataType::Date64 => {
            let ms = array.as_primitive::<Date64Type>().value(r);
            date_cell(ms.div_euclid(1000))?
        }
        other => return Err(format!("unsupported Arrow type {other}")),
    })
}

/// A string cell, trimmed; empty when blank.
fn text(s: &str) -> Cell<'_> {
    match s.trim() {
        "" => Cell::Empty,
        t => Cell::Text(t),
    }
}

/// The date of the UTC day holding second `secs` since the epoch.
fn date_cell(secs: i64) -> std::result::Result<Cell<'static>, String> {
    let ts = Timestamp::from_second(secs).map_err(|e| format!("date out of range: {e}"))?;
    Ok(Cell::Date(TimeZone::UTC.to_datetime(ts).date()))
}

fn dictionary_cell<K: ArrowDictionaryKeyType>(
    array: &dyn Array,
    r: usize,
) -> std::result::Result<Cell<'_>, String> {
    let dict = array.as_dictionary::<K>();
    let k = dict
        .key(r)
        .ok_or_else(|| "null dictionary key".to_string())?;
    let values = dict.values();
    if k >= values.len() {
        return Err(format!("dictionary key {k} out of range"));
    }
    cell_at(values.as_ref(), k)
}
