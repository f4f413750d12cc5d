//! `mgkd-train compare --data DIR --split test A.csv B.csv [--json]`: two scorings of the same
//! rows compared by AUC, with DeLong's paired standard error of the difference
//! ([`crate::metrics::paired_auc`]).
//!
//! The files are score CSVs as `mgkd-train predict` writes them (format and checks:
//! [`crate::data::scores`]); `tools/gbm.py --predictions` writes the same format for the GBM
//! baseline. The ranking is by `logit` (the engine's score before the sigmoid, so that
//! probabilities rounded to 1 do not tie).

use std::path::PathBuf;

use clap::Args;
use serde::Serialize;

use crate::cli::eval::Split;
use crate::data::scores::SplitKeys;
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

/// Compares the two files on the split's rows.
pub fn compare(args: &CompareArgs) -> Result<CompareOutput> {
    let ds = Dataset::open(&args.data)?;
    let rows = ds.rows_of_split(args.split.id());
    let labels = labels_of(&ds, &rows, "compare")?;
    let keys = SplitKeys::of_split(&ds, args.split.id())?;
    let a = keys.read_logits(&args.a)?;
    let b = keys.read_logits(&args.b)?;
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
