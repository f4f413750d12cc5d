//! Score files in `mgkd-train predict`'s format, read for the rows of one split of a dataset
//! (`compare` reads two of them, `student --soft-labels` one).
//!
//! A score file is a CSV with a header naming the key column (`user_id` when the dataset has
//! user ids, else `row`, the dataset row index) and a `logit` column, one line per row;
//! `tools/gbm.py --predictions` writes the same format. A file may hold rows of other splits
//! (predict scores every row by default); it must hold every row of the split once, a finite
//! logit for each, and no key the dataset does not have. Every refusal names the file and,
//! where there is one, the line.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use crate::data::manifest::SPLIT_NAMES;
use crate::data::Dataset;
use crate::{Error, Result};

/// The rows of one split as score files key them: the key of each row and its position.
pub struct SplitKeys<'a> {
    /// `user_id` or `row`.
    column: &'static str,
    /// Key → position in the split.
    position: HashMap<String, usize>,
    /// The user ids of the whole dataset (`None` when keys are row indices).
    user_ids: Option<HashSet<String>>,
    /// The dataset's rows (a row index below it is a row of the dataset).
    rows: u64,
    /// The split's name (for messages).
    split: &'static str,
    /// The dataset (for messages).
    ds: &'a Dataset,
}

impl<'a> SplitKeys<'a> {
    /// The keys of the rows of `split` of `ds`, in the order of [`Dataset::rows_of_split`].
    pub fn of_split(ds: &'a Dataset, split: u8) -> Result<Self> {
        let ids = ds.manifest().has_user_id;
        // A row's key: its user id where the dataset has them, else its index.
        let key_of = |row: u64| -> Result<String> {
            if !ids {
                return Ok(row.to_string());
            }
            ds.user_id(row)?.map(str::to_string).ok_or_else(|| {
                Error::format(
                    ds.dir(),
                    format!("row {row} has no user id, though the manifest says rows have them"),
                )
            })
        };
        let position = ds
            .rows_of_split(split)
            .into_iter()
            .enumerate()
            .map(|(i, row)| Ok((key_of(row)?, i)))
            .collect::<Result<HashMap<_, _>>>()?;
        // Rows of other splits may be in the files; keys the dataset lacks may not.
        let user_ids = ids
            .then(|| (0..ds.rows()).map(key_of).collect::<Result<HashSet<_>>>())
            .transpose()?;
        Ok(SplitKeys {
            column: if ids { "user_id" } else { "row" },
            position,
            user_ids,
            rows: ds.rows(),
            split: SPLIT_NAMES.get(usize::from(split)).copied().unwrap_or("?"),
            ds,
        })
    }

    /// Whether `key`, outside the split, is a row of the dataset.
    fn known(&self, key: &str) -> bool {
        match &self.user_ids {
            Some(u) => u.contains(key),
            None => key.parse::<u64>().is_ok_and(|r| r < self.rows),
        }
    }

    /// Reads `path`'s logits for the split's rows, in the split's order.
    pub fn read_logits(&self, path: &Path) -> Result<Vec<f64>> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        self.parse_logits(path, &bytes)
    }

    /// As [`SplitKeys::read_logits`], from the file's content `bytes` (`path` names it in
    /// messages).
    pub fn parse_logits(&self, path: &Path, bytes: &[u8]) -> Result<Vec<f64>> {
        let key_column = self.column;
        let fail = |msg: String| Error::format(path, msg);
        let mut r = csv::ReaderBuilder::new()
            .has_headers(true)
            .from_reader(bytes);
        let header = r
            .headers()
            .map_err(|e| fail(format!("header: {e}")))?
            .clone();
        let col = |name: &str| header.iter().position(|h| h == name);
        let key_at = col(key_column).ok_or_else(|| {
            fail(format!(
                "no `{key_column}` column (header: {}); the dataset's rows are keyed by {key_column}",
                header.iter().collect::<Vec<_>>().join(",")
            ))
        })?;
        let logit_at = col("logit").ok_or_else(|| {
            fail(format!(
                "no `logit` column (header: {})",
                header.iter().collect::<Vec<_>>().join(",")
            ))
        })?;
        let mut scores = vec![f64::NAN; self.position.len()];
        let mut seen: HashMap<String, u64> = HashMap::new();
        for rec in r.records() {
            let rec = rec.map_err(|e| fail(format!("{e}")))?;
            let line = rec.position().map_or(0, |p| p.line());
            // The reader refuses a record whose field count differs from the header's.
            let field_at = |at: usize| {
                rec.get(at)
                    .ok_or_else(|| fail(format!("line {line}: fewer fields than the header")))
            };
            let key = field_at(key_at)?;
            if let Some(first) = seen.insert(key.to_string(), line) {
                return Err(fail(format!(
                    "line {line}: {key_column} {key} again (first on line {first})"
                )));
            }
            let field = field_at(logit_at)?;
            let logit: f64 = field
                .parse()
                .ok()
                .filter(|x: &f64| x.is_finite())
                .ok_or_else(|| {
                    fail(format!(
                        "line {line}: logit `{field}` is not a finite number"
                    ))
                })?;
            match self.position.get(key) {
                Some(&i) => scores[i] = logit,
                None if self.known(key) => {}
                None => {
                    return Err(fail(format!(
                        "line {line}: {key_column} {key} is not a row of {}: scores of another \
                         dataset?",
                        self.ds.dir().display()
                    )))
                }
            }
        }
        if let Some(i) = scores.iter().position(|x| x.is_nan()) {
            let key = self
                .position
                .iter()
                .find(|&(_, &j)| j == i)
                .map(|(k, _)| k.as_str());
            let missing = scores.iter().filter(|x| x.is_nan()).count();
            return Err(fail(format!(
                "{missing} rows of the {} split are not scored, e.g. {key_column} {}",
                self.split,
                key.unwrap_or("?")
            )));
        }
        Ok(scores)
    }
}
