//! `mgkd-train quickstart [--seed S] [--workdir DIR]`: the whole workflow on a small synthetic
//! cohort in a few minutes on a laptop CPU: synthesise a dataset, train the teacher on
//! in-service behaviour, a plain student (hard labels, re-weighted) and an MGKD student (all
//! terms) on pre-service data, and print their test metrics side by side.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::Args;

use crate::backend::cpu::CpuBackend;
use crate::cli::train::{in_pool, training_record, Resolved, Widths};
use crate::data::synth::{synthesize, SynthConfig};
use crate::data::Dataset;
use crate::loss::LossConfig;
use crate::metrics;
use crate::model::{Model, ModelConfig, Role};
use crate::train::{labels_of, score_rows, sigmoid, train, RunOptions, Stage, TrainConfig, TEST};
use crate::{Error, Result};

/// Quickstart defaults, chosen to finish in under 3 minutes on 2 cores.
pub mod defaults {
    /// Synthetic users.
    pub const USERS: u64 = 16000;
    /// Default rate of the synthetic cohort (higher than the generator's 4 % so that the
    /// small test split holds enough defaulters for a stable AUC).
    pub const DEFAULT_RATE: f64 = 0.1;
    /// In-service length limit.
    pub const IN_LEN: usize = 32;
    /// Pre-service length limit.
    pub const PRE_LEN: usize = 16;
    /// Model width.
    pub const D: usize = 32;
    /// Attention heads.
    pub const HEADS: usize = 2;
    /// Transformer blocks.
    pub const BLOCKS: usize = 2;
    /// Profile embedding width.
    pub const D_CAT: usize = 8;
    /// Epochs per model.
    pub const EPOCHS: usize = 6;
    /// Rows per batch.
    pub const BATCH: usize = 128;
    /// Peak learning rate.
    pub const LR: f64 = 1e-3;
    /// α of the MGKD student (the synthetic ablation's setting, docs/results.md).
    pub const ALPHA: f64 = 0.5;
    /// β of the MGKD student.
    pub const BETA: f64 = 1.0;
    /// γ of the MGKD student (L_fine's gradient is large early: below the library's 1).
    pub const GAMMA: f64 = 0.1;
    /// δ of the MGKD student (L_self did not help alone in the ablation).
    pub const DELTA: f64 = 0.1;
    /// τ of the MGKD student.
    pub const TAU: f64 = 2.0;
}

/// Arguments of `mgkd-train quickstart`.
#[derive(Debug, Clone, Args)]
pub struct QuickstartArgs {
    /// Seed of the synthetic data and of training.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Keep the dataset, checkpoints and logs in this directory (default: a temporary
    /// directory, removed at the end).
    #[arg(long)]
    pub workdir: Option<PathBuf>,
    /// Synthetic users.
    #[arg(long, default_value_t = defaults::USERS)]
    pub users: u64,
    /// Epochs per model.
    #[arg(long, default_value_t = defaults::EPOCHS)]
    pub epochs: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = defaults::LR)]
    pub lr: f64,
    /// Model width d.
    #[arg(long, default_value_t = defaults::D)]
    pub d: usize,
    /// Worker threads (default: RAYON_NUM_THREADS or all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// No progress bars.
    #[arg(long)]
    pub quiet: bool,
}

/// One row of the comparison table.
#[derive(Debug, Clone)]
pub struct QuickRow {
    /// Model name.
    pub name: &'static str,
    /// Test AUC.
    pub auc: f64,
    /// Test KS.
    pub ks: f64,
    /// Test log-loss.
    pub log_loss: f64,
    /// Best validation epoch.
    pub best_epoch: usize,
    /// Training seconds.
    pub seconds: f64,
}

/// Removes the temporary directory on every exit path.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        // Best effort: a leftover temporary directory is not an error of the quickstart.
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn test_row(
    be: &CpuBackend<f32>,
    ds: &Dataset,
    model: &Model<CpuBackend<f32>>,
    name: &'static str,
    best_epoch: usize,
    seconds: f64,
) -> Result<QuickRow> {
    let rows = ds.rows_of_split(TEST);
    let labels = labels_of(ds, &rows, "the test evaluation")?;
    let z = score_rows(be, ds, model, &rows)?;
    let p: Vec<f64> = z.iter().map(|&z| sigmoid(z)).collect();
    let r = metrics::evaluate(&p, &labels)?;
    Ok(QuickRow {
        name,
        auc: r.auc,
        ks: r.ks,
        log_loss: r.log_loss,
        best_epoch,
        seconds,
    })
}

/// Runs the quickstart in `dir` (which must exist) and returns the table rows.
pub fn quickstart_in(dir: &Path, args: &QuickstartArgs) -> Result<Vec<QuickRow>> {
    let data = dir.join("data");
    let synth = SynthConfig {
        users: args.users,
        seed: args.seed,
        default_rate: defaults::DEFAULT_RATE,
        in_len: defaults::IN_LEN,
        pre_len: defaults::PRE_LEN,
        ..SynthConfig::default()
    };
    let t = Instant::now();
    synthesize(&data, &synth)?;
    println!(
        "synthesised {} users into {} in {:.1} s",
        args.users,
        data.display(),
        t.elapsed().as_secs_f64()
    );
    let ds = Dataset::open(&data)?;
    let be = CpuBackend::<f32>::new();
    let widths = Widths {
        d: args.d,
        heads: defaults::HEADS,
        blocks: defaults::BLOCKS,
        d_cat: defaults::D_CAT,
    };
    let tc = TrainConfig {
        epochs: args.epochs,
        batch: defaults::BATCH,
        lr: args.lr,
        seed: args.seed,
        ..TrainConfig::default()
    };
    let progress = !args.quiet && std::io::stderr().is_terminal();
    let schema = ds.schema();
    let mut rows = Vec::new();
    let plain = LossConfig {
        soft: false,
        coarse: false,
        fine: false,
        self_distill: false,
        ..LossConfig::default()
    };
    let mgkd = LossConfig {
        alpha: defaults::ALPHA,
        beta: defaults::BETA,
        gamma: defaults::GAMMA,
        delta: defaults::DELTA,
        tau: defaults::TAU,
        ..LossConfig::default()
    };
    let runs: [(&'static str, Role, LossConfig); 3] = [
        ("teacher (in-service)", Role::Teacher, LossConfig::default()),
        ("student, plain", Role::Student, plain),
        ("student, MGKD", Role::Student, mgkd),
    ];
    let mut teacher: Option<Model<CpuBackend<f32>>> = None;
    for (i, (name, role, loss)) in runs.into_iter().enumerate() {
        let out = dir.join(format!("model-{i}-{role}.safetensors"));
        let r = Resolved {
            widths,
            train: tc.clone(),
            loss: loss.clone(),
        };
        let cfg = ModelConfig::new(
            role,
            schema,
            widths.d,
            widths.heads,
            widths.blocks,
            widths.d_cat,
        )?;
        let mut model = Model::new(&be, cfg, tc.seed)?;
        let teacher_ref = match (role, &teacher) {
            (Role::Teacher, _) => None,
            (Role::Student, Some(t)) => Some(t),
            (Role::Student, None) => return Err(Error::invalid("quickstart: no teacher")),
        };
        let teacher_file = dir.join("model-0-teacher.safetensors");
        let sha = match teacher_ref {
            Some(_) => Some((
                teacher_file.as_path(),
                crate::data::writer::sha256_hex(
                    &std::fs::read(&teacher_file).map_err(|e| Error::io(&teacher_file, e))?,
                ),
            )),
            None => None,
        };
        let rec = training_record(&ds, &data, &r, role, sha)?;
        let opts = RunOptions {
            checkpoint: Some(out.clone()),
            metadata: rec.to_metadata()?,
            log: Some(crate::cli::train::default_log(&out)),
            progress,
        };
        let stage = match teacher_ref {
            Some(t) => Stage::Student(t),
            None => Stage::Teacher,
        };
        let rep = train(&be, &ds, &mut model, &stage, &loss, &tc, &opts)?;
        println!(
            "{name}: best epoch {} (valid AUC {:.4}), {:.1} s, {:.0} samples/s",
            rep.best.epoch, rep.best.valid_auc, rep.seconds, rep.samples_per_s
        );
        rows.push(test_row(
            &be,
            &ds,
            &model,
            name,
            rep.best.epoch,
            rep.seconds,
        )?);
        if role == Role::Teacher {
            teacher = Some(model);
        }
    }
    Ok(rows)
}

/// `mgkd-train quickstart`.
pub fn run(args: &QuickstartArgs) -> Result<()> {
    let start = Instant::now();
    let (dir, _guard) = match &args.workdir {
        Some(d) => {
            std::fs::create_dir_all(d).map_err(|e| Error::io(d, e))?;
            (d.clone(), None)
        }
        None => {
            let d = std::env::temp_dir().join(format!(
                "mgkd-quickstart-{}-{}",
                std::process::id(),
                args.seed
            ));
            std::fs::create_dir_all(&d).map_err(|e| Error::io(&d, e))?;
            (d.clone(), Some(TempDir(d)))
        }
    };
    let rows = in_pool(args.threads, || quickstart_in(&dir, args))?;
    println!(
        "\n{:<22} {:>8} {:>7} {:>9} {:>5} {:>8}",
        "model (test split)", "AUC", "KS", "log-loss", "best", "train s"
    );
    for r in &rows {
        println!(
            "{:<22} {:>8.4} {:>7.4} {:>9.5} {:>5} {:>8.1}",
            r.name, r.auc, r.ks, r.log_loss, r.best_epoch, r.seconds
        );
    }
    println!(
        "\nThe teacher reads in-service behaviour (not available when scoring applicants); the students read only \
         pre-service data. Total {:.0} s.",
        start.elapsed().as_secs_f64()
    );
    if args.workdir.is_some() {
        println!("dataset, checkpoints and logs kept in {}", dir.display());
    }
    Ok(())
}
