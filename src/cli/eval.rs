//! `mgkd-train eval --data DIR --model M.safetensors [--split test] [--json]`: the metrics of
//! docs/model.md §6.6 of a teacher or student checkpoint on one split of a labelled dataset.

use std::path::PathBuf;

use clap::{Args, ValueEnum};
use serde::Serialize;

use crate::backend::Backend;
use crate::cli::train::{check_schema, in_pool, require_in_service, Device};
use crate::data::Dataset;
use crate::metrics::{self, Report};
use crate::model::{checkpoint, Role};
use crate::train::{best_from_metadata, labels_of, score_rows, sigmoid, BestEpoch};
use crate::{Error, Result};

/// A dataset split.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    /// Split 0.
    Train,
    /// Split 1.
    Valid,
    /// Split 2.
    Test,
}

impl Split {
    /// The split's name (`train`, `valid`, `test`).
    pub fn name(self) -> &'static str {
        crate::data::manifest::SPLIT_NAMES[usize::from(self.id())]
    }

    /// The split id stored in the shards.
    pub fn id(self) -> u8 {
        match self {
            Split::Train => 0,
            Split::Valid => 1,
            Split::Test => 2,
        }
    }
}

/// Arguments of `mgkd-train eval`.
#[derive(Debug, Clone, Args)]
pub struct EvalArgs {
    /// Dataset directory (labelled).
    #[arg(long)]
    pub data: PathBuf,
    /// Checkpoint (teacher or student).
    #[arg(long)]
    pub model: PathBuf,
    /// Split to evaluate.
    #[arg(long, value_enum, default_value_t = Split::Test)]
    pub split: Split,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
    /// Worker threads.
    #[arg(long)]
    pub threads: Option<usize>,
    /// Backend: auto (CUDA when one works, else CPU), cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: Device,
}

/// What `eval --json` prints: the checkpoint, the split and every metric of [`Report`].
#[derive(Debug, Clone, Serialize)]
pub struct EvalOutput {
    /// Checkpoint path.
    pub model: String,
    /// Teacher or student.
    pub role: Role,
    /// Evaluated split.
    pub split: Split,
    /// Validation metrics recorded at training time, when present.
    pub trained_best: Option<BestEpoch>,
    /// The metrics.
    #[serde(flatten)]
    pub report: Report,
}

/// Scores the split with the checkpoint on `be` and evaluates it.
pub fn evaluate_on<B: Backend>(be: &B, args: &EvalArgs) -> Result<EvalOutput> {
    let ds = Dataset::open(&args.data)?;
    let ck = checkpoint::read(&args.model)?;
    if let Some(w) = ck.unverified_warning(&args.model) {
        crate::noteln!("{w}");
    }
    check_schema(&args.model, &ck.config, &ds)?;
    let role = ck.config.role;
    if role == Role::Teacher {
        require_in_service(&ds, "evaluating a teacher")?;
    }
    let best = best_from_metadata(&args.model, &ck.metadata)?;
    let model = ck.into_model(be)?;
    let rows = ds.rows_of_split(args.split.id());
    if rows.is_empty() {
        return Err(Error::invalid(format!(
            "the {} split of {} has no rows",
            args.split.name(),
            ds.dir().display()
        )));
    }
    let labels = labels_of(&ds, &rows, "eval")?;
    let z = score_rows(be, &ds, &model, &rows)?;
    let p: Vec<f64> = z.iter().map(|&z| sigmoid(z)).collect();
    Ok(EvalOutput {
        model: args.model.display().to_string(),
        role,
        split: args.split,
        trained_best: best,
        report: metrics::evaluate(&p, &labels)?,
    })
}

fn opt(x: Option<f64>, prec: usize) -> String {
    x.map_or_else(|| "-".into(), |v| format!("{v:.prec$}"))
}

/// Prints the report as tables.
pub fn print_report(o: &EvalOutput) -> Result<()> {
    let r = &o.report;
    crate::outln!(
        "{} {} on split {}: {} rows, {} defaults ({:.2}%)",
        o.role,
        o.model,
        o.split.name(),
        r.n,
        r.positives,
        100.0 * r.bad_rate
    )?;
    crate::outln!(
        "AUC {:.4}  KS {:.4}  log-loss {:.5}  PR-AUC {:.4}",
        r.auc,
        r.ks,
        r.log_loss,
        r.pr_auc
    )?;
    crate::outln!("\napproval rate  approved  bad  bad rate  cut score")?;
    for a in &r.approval {
        crate::outln!(
            "{:>12.0}% {:>9} {:>4} {:>9} {:>10}",
            100.0 * a.rate,
            a.approved,
            a.bad,
            opt(a.bad_rate.map(|b| 100.0 * b), 2) + "%",
            opt(a.cut_score, 4)
        )?;
    }
    crate::outln!("\ndecile  rows  defaults  bad rate  cum capture   lift  score range")?;
    for d in &r.deciles {
        crate::outln!(
            "{:>6} {:>5} {:>9} {:>9} {:>12.1}% {:>6} {}..{}",
            d.decile,
            d.count,
            d.positives,
            opt(d.bad_rate.map(|b| 100.0 * b), 2) + "%",
            100.0 * d.cum_capture,
            opt(d.lift, 2),
            opt(d.min_score, 4),
            opt(d.max_score, 4)
        )?;
    }
    Ok(())
}

/// `mgkd-train eval`.
pub fn run(args: &EvalArgs) -> Result<()> {
    let out = in_pool(
        args.threads,
        || crate::with_backend!(args.device, be => evaluate_on(be, args)),
    )?;
    if args.json {
        let j = serde_json::to_string_pretty(&out)
            .map_err(|e| Error::invalid(format!("report to JSON: {e}")))?;
        crate::outln!("{j}")?;
    } else {
        print_report(&out)?;
    }
    Ok(())
}
