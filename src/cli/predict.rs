//! `mgkd-train predict --data DIR --model M.safetensors --out scores.csv [--split S]`:
//! default probabilities and logits for every row (or one split) of a dataset, labelled or
//! not. A student needs only pre-service data, so new applicants can be scored.
//!
//! `--reasons K` adds, per row, the K inputs that raised the student's score most, with
//! their contributions (occlusion against a baseline, [`crate::explain`]).

use std::path::PathBuf;

use clap::Args;

use crate::backend::Backend;
use crate::cli::eval::Split;
use crate::cli::train::{check_schema, in_pool, require_in_service, Device};
use crate::data::import::{Vocabularies, VOCAB_FILE};
use crate::data::writer::write_atomic;
use crate::data::Dataset;
use crate::explain::{self, Labeller};
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
    /// Reason codes: add the K inputs that raised each row's score most, as columns
    /// `reason_1, contribution_1, …, reason_K, contribution_K` (a student only; inputs are
    /// profile fields and pre-service event groups; contributions in logit units, by
    /// occlusion against a baseline, docs/deploy.md). Fewer when fewer inputs raised it.
    #[arg(long, value_name = "K")]
    pub reasons: Option<usize>,
    /// The categorical event field that groups pre-service events for `--reasons`
    /// (default: the first one, the event type in the synthetic schema).
    #[arg(long, value_name = "FIELD", requires = "reasons")]
    pub reason_events: Option<String>,
}

/// Rows whose reasons are computed together (each row is scored once per input group).
const REASON_ROWS: usize = 256;

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
    if args.reasons.is_some() && ck.config.role != Role::Student {
        return Err(Error::format(
            &args.model,
            "--reasons explains a student (the deployed model); this is a teacher",
        ));
    }
    let model = ck.into_model(be)?;
    let rows: Vec<u64> = match args.split {
        Some(s) => ds.rows_of_split(s.id()),
        None => (0..ds.rows()).collect(),
    };
    let z = score_rows(be, &ds, &model, &rows)?;
    let reasons = match args.reasons {
        None => None,
        Some(0) => return Err(Error::invalid("--reasons must be at least 1")),
        Some(k) => {
            let vocab_path = ds.dir().join(VOCAB_FILE);
            let vocab = if vocab_path.exists() {
                Some(Vocabularies::load(ds.dir())?)
            } else {
                None
            };
            let labeller =
                Labeller::new(ds.schema(), vocab.as_ref(), args.reason_events.as_deref())?;
            let mut all = Vec::with_capacity(rows.len());
            for chunk in rows.chunks(REASON_ROWS) {
                let batch = ds.gather(chunk)?;
                all.extend(explain::reasons(be, &model, &batch, &labeller, k)?);
            }
            Some((k, all))
        }
    };
    let ids = ds.manifest().has_user_id;
    let mut w = csv::Writer::from_writer(Vec::new());
    let csv_err = |e: csv::Error| Error::invalid(format!("writing {}: {e}", args.out.display()));
    let mut header: Vec<String> = vec![
        if ids { "user_id" } else { "row" }.into(),
        "probability".into(),
        "logit".into(),
    ];
    if let Some((k, _)) = &reasons {
        for j in 1..=*k {
            header.push(format!("reason_{j}"));
            header.push(format!("contribution_{j}"));
        }
    }
    w.write_record(&header).map_err(csv_err)?;
    for (i, (&row, &zi)) in rows.iter().zip(&z).enumerate() {
        let id = match ds.user_id(row)? {
            Some(u) if ids => u.to_string(),
            _ => row.to_string(),
        };
        let mut rec = vec![id, sigmoid(zi).to_string(), zi.to_string()];
        if let Some((k, all)) = &reasons {
            for j in 0..*k {
                match all[i].get(j) {
                    Some(r) => {
                        rec.push(r.input.clone());
                        rec.push(r.contribution.to_string());
                    }
                    None => rec.extend([String::new(), String::new()]),
                }
            }
        }
        w.write_record(&rec).map_err(csv_err)?;
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
