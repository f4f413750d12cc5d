//! `mgkd-train predict --data DIR --model M.safetensors --out scores.csv [--split S]`:
//! default probabilities and logits for every row (or one split) of a dataset, labelled or
//! not. A student needs only pre-service data, so new applicants can be scored.

use std::path::PathBuf;

use clap::Args;

use crate::backend::Backend;
use crate::cli::eval::Split;
use crate::cli::train::{check_schema, in_pool, require_in_service, Device};
use crate::data::writer::write_atomic;
use crate::data::Dataset;
use crate::io::output::{Input, OutputKind, OutputPath};
use crate::model::{checkpoint, Role};
use crate::train::{score_rows, sigmoid};
use crate::{Error, Result};

/// Arguments of `mgkd-train predict`.
#[derive(Debug, Clone, Args)]
pub struct PredictArgs {
    /// Dataset directory (labels and in-service events not needed for a student).
    #[arg(long)]
    pub data: PathBuf,
    /// Checkpoint (a student, or a teacher on data with in-service events).
    #[arg(long)]
    pub model: PathBuf,
    /// Output CSV, written atomically: `user_id,probability,logit` (`row,…` when the
    /// dataset has no user ids; `row` is the dataset row index). A regular file outside the
    /// dataset; links, devices and FIFOs are refused.
    #[arg(long)]
    pub out: PathBuf,
    /// Score only this split (default: every row).
    #[arg(long, value_enum)]
    pub split: Option<Split>,
    /// Worker threads.
    #[arg(long)]
    pub threads: Option<usize>,
    /// Backend: auto (CUDA when one works, else CPU), cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: Device,
}

/// Scores the selected rows on `be` and returns the CSV text and the number of rows.
pub fn predict_on<B: Backend>(be: &B, args: &PredictArgs) -> Result<(Vec<u8>, usize)> {
    let ds = Dataset::open(&args.data)?;
    let ck = checkpoint::read(&args.model)?;
    if let Some(w) = ck.unverified_warning(&args.model) {
        crate::noteln!("{w}");
    }
    check_schema(&args.model, &ck.config, &ds)?;
    if ck.config.role == Role::Teacher {
        require_in_service(&ds, "scoring with a teacher")?;
    }
    let model = ck.into_model(be)?;
    let rows: Vec<u64> = match args.split {
        Some(s) => ds.rows_of_split(s.id()),
        None => (0..ds.rows()).collect(),
    };
    let z = score_rows(be, &ds, &model, &rows)?;
    let ids = ds.manifest().has_user_id;
    let mut w = csv::Writer::from_writer(Vec::new());
    let csv_err = |e: csv::Error| Error::invalid(format!("writing {}: {e}", args.out.display()));
    w.write_record([if ids { "user_id" } else { "row" }, "probability", "logit"])
        .map_err(csv_err)?;
    for (&row, &zi) in rows.iter().zip(&z) {
        let id = match ds.user_id(row)? {
            Some(u) if ids => u.to_string(),
            _ => row.to_string(),
        };
        w.write_record([id, sigmoid(zi).to_string(), zi.to_string()])
            .map_err(csv_err)?;
    }
    let bytes = w
        .into_inner()
        .map_err(|e| Error::invalid(format!("writing {}: {e}", args.out.display())))?;
    Ok((bytes, rows.len()))
}

/// `mgkd-train predict`.
pub fn run(args: &PredictArgs) -> Result<()> {
    let _out = OutputPath::prepare(
        "--out",
        &args.out,
        OutputKind::File,
        &[
            Input::dataset("--data", &args.data),
            Input::file("--model", &args.model),
        ],
    )?;
    let (bytes, n) = in_pool(
        args.threads,
        || crate::with_backend!(args.device, be => predict_on(be, args)),
    )?;
    write_atomic(&args.out, &bytes)?;
    crate::outln!("scored {n} rows into {}", args.out.display())?;
    Ok(())
}
