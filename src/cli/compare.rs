//! `mgkd-train compare --data DIR --split test A.csv B.csv [--json]`: two scorings of the same
//! rows compared by AUC, with DeLong's paired standard error of the difference
//! ([`crate::metrics::paired_auc`]).
//!
//! The files are score CSVs as `mgkd-train predict` writes them: a header naming the key
//! column (`user_id` when the dataset has user ids, else `row`, the dataset row index) and a
//! `logit` column, one line per row; `tools/gbm.py --predictions` writes the same format for
//! the GBM baseline. A file may hold rows of other splits (predict scores every row by
//! default); it must hold every row of the compared split once, and no key the dataset does
//! not have. The ranking is by `logit` (the engine's score before the sigmoid, so that
//! probabilities rounded to 1 do not tie).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use clap::Args;
use serde::Serialize;

use crate::cli::eval::Split;
use crate::data::Dataset;
use crate::metrics::{paired_auc, PairedAuc};
use crate::train::labels_of;
use crate::{Error, Result};

/// Arguments of `mgkd-train compare`.
#[derive(Debug, Clone, Args)]
pub struct CompareArgs {
    /// Dataset directory (labelled) whose rows both files score.
    #[arg(long)]
    pub data: PathBuf,
    /// Split whose rows are compared.
    #[arg(long, value_enum, default_value_t = Split::Test)]
    pub split: Split,
    /// Scores of model A (`mgkd-train predict` CSV: key column, …, `logit`).
    pub a: PathBuf,
    /// Scores of model B, the same format.
    pub b: PathBuf,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// What `compare --json` prints.
#[derive(Debug, Clone, Serialize)]
pub struct CompareOutput {
    /// The dataset directory.
    pub data: String,
    /// The split compared.
    pub split: Split,
    /// Rows compared.
    pub n: usize,
    /// Defaults among them.
    pub positives: usize,
    /// File of model A.
    pub a: String,
    /// File of model B.
    pub b: String,
    /// AUCs, the difference A − B, its standard error, z, p and 95 % interval.
    #[serde(flatten)]
    pub result: PairedAuc,
}

/// The rows of the compared split: their keys (as the files write them) and positions.
struct SplitKeys<'a> {
    /// `user_id` or `row`.
    column: &'static str,
    /// Key → position in the split.
    position: HashMap<String, usize>,
    /// Whether a key outside the split is a row of the dataset.
    known: &'a dyn Fn(&str) -> bool,
    /// The dataset directory (for messages).
    data: &'a Path,
}

/// Reads `path`'s logits for the split's rows, in the split's order.
fn read_scores(path: &Path, keys: &SplitKeys) -> Result<Vec<f64>> {
    let key_column = keys.column;
    let fail = |msg: String| Error::format(path, msg);
    let mut r = csv::ReaderBuilder::new()
        .has_headers(true)
        .from_path(path)
        .map_err(|e| fail(format!("cannot be read as CSV: {e}")))?;
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
    let mut scores = vec![f64::NAN; keys.position.len()];
    let mut seen: HashMap<String, u64> = HashMap::new();
    for rec in r.records() {
        let rec = rec.map_err(|e| fail(format!("{e}")))?;
        let line = rec.position().map_or(0, |p| p.line());
        let key = rec.get(key_at).unwrap_or_default();
        if let Some(first) = seen.insert(key.to_string(), line) {
            return Err(fail(format!(
                "line {line}: {key_column} {key} again (first on line {first})"
            )));
        }
        let field = rec.get(logit_at).unwrap_or_default();
        let logit: f64 = field
            .parse()
            .ok()
            .filter(|x: &f64| x.is_finite())
            .ok_or_else(|| {
                fail(format!(
                    "line {line}: logit `{field}` is not a finite number"
                ))
            })?;
        match keys.position.get(key) {
            Some(&i) => scores[i] = logit,
            None if (keys.known)(key) => {}
            None => {
                return Err(fail(format!(
                    "line {line}: {key_column} {key} is not a row of {}: scores of another \
                     dataset?",
                    keys.data.display()
                )))
            }
        }
    }
    if let Some(i) = scores.iter().position(|x| x.is_nan()) {
        let key = keys
            .position
            .iter()
            .find(|&(_, &j)| j == i)
            .map(|(k, _)| k.as_str());
        let missing = scores.iter().filter(|x| x.is_nan()).count();
        return Err(fail(format!(
            "{missing} rows of the split are not scored, e.g. {key_column} {}",
            key.unwrap_or("?")
        )));
    }
    Ok(scores)
}

/// Compares the two files on the split's rows.
pub fn compare(args: &CompareArgs) -> Result<CompareOutput> {
    let ds = Dataset::open(&args.data)?;
    let rows = ds.rows_of_split(args.split.id());
    let labels = labels_of(&ds, &rows, "compare")?;
    let ids = ds.manifest().has_user_id;
    let mut position = HashMap::with_capacity(rows.len());
    for (i, &row) in rows.iter().enumerate() {
        let key = match ds.user_id(row)? {
            Some(u) if ids => u.to_string(),
            _ => row.to_string(),
        };
        position.insert(key, i);
    }
    // Rows of other splits may be in the files; keys the dataset lacks may not.
    let user_ids: Option<std::collections::HashSet<String>> = ids
        .then(|| {
            (0..ds.rows())
                .map(|r| Ok(ds.user_id(r)?.unwrap_or_default().to_string()))
                .collect::<Result<_>>()
        })
        .transpose()?;
    let known = |key: &str| match &user_ids {
        Some(u) => u.contains(key),
        None => key.parse::<u64>().is_ok_and(|r| r < ds.rows()),
    };
    let keys = SplitKeys {
        column: if ids { "user_id" } else { "row" },
        position,
        known: &known,
        data: &args.data,
    };
    let a = read_scores(&args.a, &keys)?;
    let b = read_scores(&args.b, &keys)?;
    let result = paired_auc(&a, &b, &labels)?;
    Ok(CompareOutput {
        data: args.data.display().to_string(),
        split: args.split,
        n: rows.len(),
        positives: labels.iter().filter(|&&y| y == 1).count(),
        a: args.a.display().to_string(),
        b: args.b.display().to_string(),
        result,
    })
}

/// `mgkd-train compare`.
pub fn run(args: &CompareArgs) -> Result<()> {
    let out = compare(args)?;
    if args.json {
        let j = serde_json::to_string_pretty(&out)
            .map_err(|e| Error::invalid(format!("serialising the comparison: {e}")))?;
        crate::outln!("{j}")?;
        return Ok(());
    }
    let r = &out.result;
    crate::outln!(
        "{} split of {}: {} rows, {} defaults",
        out.split.name(),
        out.data,
        out.n,
        out.positives
    )?;
    crate::outln!("A  AUC {:.4}  {}", r.auc_a, out.a)?;
    crate::outln!("B  AUC {:.4}  {}", r.auc_b, out.b)?;
    crate::outln!(
        "A − B  {:+.4} ± {:.4} (DeLong, paired)  95 % interval [{:+.4}, {:+.4}]  z {:.2}  p {:.3}",
        r.diff,
        r.se,
        r.ci95[0],
        r.ci95[1],
        r.z,
        r.p
    )?;
    Ok(())
}
