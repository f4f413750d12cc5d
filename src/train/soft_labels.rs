//! Soft labels from a file (`mgkd-train student --soft-labels CSV`): the targets of L_soft
//! (docs/model.md §5.4) read from another model's scores instead of computed by the frozen
//! teacher, e.g. an ensemble of teachers, a model the user already has, or, on synthetic
//! data, the generator's true default probability (`synth --latents`). The file is in
//! `mgkd-train predict`'s format: a key column (`user_id` when the dataset has user ids, else
//! `row`, the dataset row index) and a `logit` column; every train row needs a finite logit.
//! The logits replace the teacher's in its cache ([`crate::model::TeacherCache`]), so the
//! other terms still read the teacher's representations.

use std::collections::HashMap;
use std::path::Path;

use crate::backend::{Backend, Float, Mut, Ref};
use crate::data::writer::sha256_hex;
use crate::data::Dataset;
use crate::model::TeacherCache;
use crate::train::TRAIN;
use crate::{Error, Result};

/// Logits of the train rows read from a soft-label file.
#[derive(Debug, Clone, PartialEq)]
pub struct SoftLabels {
    /// Dataset row → logit, one entry per train row.
    pub logit_of_row: HashMap<u64, f64>,
    /// Lower-case hex SHA-256 of the file.
    pub sha256: String,
}

impl SoftLabels {
    /// Reads `path` for the train rows of `ds`. Rows of other splits may be in the file and
    /// are ignored; a key that is not a row of the dataset, a key given twice, a logit that
    /// is not a finite number or a train row without one is an error naming the file (and
    /// the line).
    pub fn read(path: &Path, ds: &Dataset) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let fail = |msg: String| Error::format(path, msg);
        let ids = ds.manifest().has_user_id;
        let key_column = if ids { "user_id" } else { "row" };
        let key_of = |row: u64| -> Result<String> {
            Ok(match ds.user_id(row)? {
                Some(u) if ids => u.to_string(),
                _ => row.to_string(),
            })
        };
        let mut row_of_key = HashMap::with_capacity(ds.rows() as usize);
        for row in 0..ds.rows() {
            row_of_key.insert(key_of(row)?, row);
        }
        let train = ds.rows_of_split(TRAIN);
        let is_train: std::collections::HashSet<u64> = train.iter().copied().collect();
        let mut r = csv::ReaderBuilder::new()
            .has_headers(true)
            .from_reader(bytes.as_slice());
        let header = r
            .headers()
            .map_err(|e| fail(format!("cannot be read as CSV: {e}")))?
            .clone();
        let shown = || header.iter().collect::<Vec<_>>().join(",");
        let col = |name: &str| header.iter().position(|h| h == name);
        let key_at = col(key_column).ok_or_else(|| {
            fail(format!(
                "no `{key_column}` column (header: {}); the dataset's rows are keyed by \
                 {key_column}",
                shown()
            ))
        })?;
        let logit_at = col("logit").ok_or_else(|| {
            fail(format!(
                "no `logit` column (header: {}); the file is in `mgkd-train predict`'s format",
                shown()
            ))
        })?;
        let mut logit_of_row = HashMap::with_capacity(train.len());
        let mut line_of_row: HashMap<u64, u64> = HashMap::new();
        for rec in r.records() {
            let rec = rec.map_err(|e| fail(format!("{e}")))?;
            let line = rec.position().map_or(0, |p| p.line());
            let key = rec.get(key_at).unwrap_or_default();
            let Some(&row) = row_of_key.get(key) else {
                return Err(fail(format!(
                    "line {line}: {key_column} {key} is not a row of {}",
                    ds.dir().display()
                )));
            };
            if let Some(first) = line_of_row.insert(row, line) {
                return Err(fail(format!(
                    "line {line}: {key_column} {key} again (first on line {first})"
                )));
            }
            let field = rec.get(logit_at).unwrap_or_default();
            let logit = field
                .parse::<f64>()
                .ok()
                .filter(|x| x.is_finite())
                .ok_or_else(|| {
                    fail(format!(
                        "line {line}: logit `{field}` is not a finite number"
                    ))
                })?;
            if is_train.contains(&row) {
                logit_of_row.insert(row, logit);
            }
        }
        if let Some(&row) = train.iter().find(|r| !logit_of_row.contains_key(r)) {
            return Err(fail(format!(
                "{} train rows have no logit, e.g. {key_column} {}",
                train.len() - logit_of_row.len(),
                key_of(row)?
            )));
        }
        Ok(SoftLabels {
            logit_of_row,
            sha256: sha256_hex(&bytes),
        })
    }

    /// Writes these logits over the teacher's in `cache`, slot by slot (each rounded once to
    /// the backend's element type). Errors on a cached row without a logit.
    pub fn apply<B: Backend>(&self, be: &B, cache: &mut TeacherCache<B>) -> Result<()> {
        let rows = cache.index.rows_by_slot();
        let logits = rows
            .iter()
            .map(|row| {
                self.logit_of_row
                    .get(row)
                    .map(|&z| B::F::from_f64(z))
                    .ok_or_else(|| {
                        Error::invalid(format!("internal: no soft label for cached row {row}"))
                    })
            })
            .collect::<Result<Vec<B::F>>>()?;
        if logits.is_empty() {
            return Ok(());
        }
        let host = be.upload(&logits)?;
        be.copy(
            logits.len(),
            Ref::whole(&host),
            Mut::at(&mut cache.logits, 0),
        );
        be.synchronize()
    }
}
