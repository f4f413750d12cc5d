//! `mgkd-train synth`: writes a synthetic dataset (generator model: `docs/synth.md`).

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::data::synth::{synthesize_with_latents, synthesize_with_progress, SynthConfig};
use crate::data::writer::write_atomic;
use crate::io::output::{resolve, OutputKind, OutputPath};
use crate::{Error, Result};

/// Arguments of `mgkd-train synth`.
#[derive(Debug, Clone, Args)]
pub struct SynthArgs {
    /// Output dataset directory (created; must not already hold a dataset).
    #[arg(long)]
    pub out: PathBuf,
    /// Number of users (rows).
    #[arg(long)]
    pub users: u64,
    /// Random seed: the same seed gives byte-identical shards whatever the thread count.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Expected default rate, strictly between 0 and 1.
    #[arg(long, default_value_t = 0.04)]
    pub default_rate: f64,
    /// In-service length limit L.
    #[arg(long, default_value_t = 128)]
    pub in_len: usize,
    /// Pre-service length limit Lp.
    #[arg(long, default_value_t = 32)]
    pub pre_len: usize,
    /// Close a shard after this many rows (besides the size bound).
    #[arg(long)]
    pub shard_rows: Option<usize>,
    /// Target shard size in MiB.
    #[arg(long, default_value_t = 256)]
    pub shard_mib: u64,
    /// Train, valid and test shares in whole percent, summing to 100 (stratified by label),
    /// e.g. 20,5,75 for a small training cohort measured on a large test split.
    #[arg(long, value_delimiter = ',', num_args = 1, default_value = "80,10,10")]
    pub split: Vec<u32>,
    /// Draw a drifted cohort: the latent risk's mean, in standard deviations (riskier
    /// applicants for > 0). Schema, normalisation and label model stay the standard
    /// cohort's, so a model trained on that cohort scores this one (see `monitor`).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub risk_shift: f64,
    /// Draw a drifted cohort: the activity latent's mean (longer pre-service histories
    /// and more volume for > 0), as `--risk-shift`.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub activity_shift: f64,
    /// Also write the generator's hidden truth to this CSV, one line per dataset row: the
    /// row, its split, its label, the latent risk r, style s and activity a, and the true
    /// default probability σ(A·r + b) (docs/synth.md). No model reads it; it is for
    /// analysis, e.g. what a perfect teacher's soft labels would give (`tools/gbm.py
    /// --soft-labels`). Written atomically, outside the dataset directory.
    #[arg(long)]
    pub latents: Option<PathBuf>,
}

impl SynthArgs {
    /// The generator configuration these arguments describe (not yet validated).
    pub fn config(&self) -> Result<SynthConfig> {
        let shard_bytes = self.shard_mib.checked_mul(1 << 20).ok_or_else(|| {
            Error::invalid(format!("--shard-mib {} is too large", self.shard_mib))
        })?;
        let split: [u32; 3] = self.split.as_slice().try_into().map_err(|_| {
            Error::invalid(format!(
                "--split takes three percentages (train,valid,test), got {}",
                self.split.len()
            ))
        })?;
        Ok(SynthConfig {
            users: self.users,
            seed: self.seed,
            default_rate: self.default_rate,
            in_len: self.in_len,
            pre_len: self.pre_len,
            shard_rows: self.shard_rows,
            shard_bytes,
            split,
            risk_shift: self.risk_shift,
            activity_shift: self.activity_shift,
        })
    }
}

/// Runs the subcommand: progress bar on stderr (only on a terminal), one summary line on
/// stdout.
pub fn run(args: &SynthArgs) -> Result<()> {
    let cfg = args.config()?;
    cfg.validate()?;
    let _out = OutputPath::prepare("--out", &args.out, OutputKind::Dir, &[])?;
    let _latents = match &args.latents {
        Some(path) => {
            if resolve(path)?.starts_with(resolve(&args.out)?) {
                return Err(Error::invalid(format!(
                    "--latents {}: lies inside the dataset directory --out {}; write it \
                     outside the dataset",
                    path.display(),
                    args.out.display()
                )));
            }
            Some(OutputPath::prepare(
                "--latents",
                path,
                OutputKind::File,
                &[],
            )?)
        }
        None => None,
    };
    let bar = if std::io::stderr().is_terminal() {
        let bar = ProgressBar::with_draw_target(Some(cfg.users), ProgressDrawTarget::stderr());
        if let Ok(style) = ProgressStyle::with_template(
            "{spinner} synth [{elapsed_precise}] {wide_bar} {pos}/{len} users ({per_sec}, eta {eta})",
        ) {
            bar.set_style(style);
        }
        bar
    } else {
        ProgressBar::hidden()
    };
    let start = Instant::now();
    let progress = |done| bar.set_position(done);
    let manifest = match &args.latents {
        Some(path) => {
            let (manifest, table) = synthesize_with_latents(&args.out, &cfg, &progress)?;
            write_atomic(path, table.as_bytes())?;
            manifest
        }
        None => synthesize_with_progress(&args.out, &cfg, &progress)?,
    };
    bar.finish_and_clear();
    let secs = start.elapsed().as_secs_f64();
    let rates: Vec<String> = manifest
        .splits
        .iter()
        .map(|s| format!("{} {:.4} ({} rows)", s.name, s.default_rate, s.rows))
        .collect();
    let latents = match &args.latents {
        Some(path) => format!("; latents in {}", path.display()),
        None => String::new(),
    };
    crate::outln!(
        "synth: {} users in {:.2} s ({:.0} users/s), {} shards in {}; default rate {}{latents}",
        manifest.rows,
        secs,
        manifest.rows as f64 / secs.max(1e-9),
        manifest.shards.len(),
        args.out.display(),
        rates.join(", ")
    )?;
    Ok(())
}
