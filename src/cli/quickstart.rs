//! `mgkd-train quickstart [--seed S] [--workdir DIR]`: the whole workflow on a small synthetic
//! cohort in one to two minutes on a laptop CPU: synthesise a dataset, train the teacher on
//! in-service behaviour, a plain student (hard labels, re-weighted) and an MGKD student (all
//! terms, the default coefficients) on pre-service data, and print their test metrics side by
//! side. It is a one-seed run of the paired ablation ([`crate::train::ablation`]) with the
//! plain and full students only.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::Args;

use crate::backend::cpu::CpuBackend;
use crate::cli::ablation::label_of;
use crate::cli::train::{
    in_pool, resolve, CoefArgs, Device, FileConfig, HyperArgs, Resolved, SwitchArgs, Widths,
};
use crate::data::synth::{synthesize, SynthConfig};
use crate::data::Dataset;
use crate::io::cleanup::{self, Registration, Removal};
use crate::io::output::{OutputKind, OutputPath};
use crate::train::ablation::{run_ablation, AblationConfig, RunResult, Variant};
use crate::{Error, Result};

/// The shipped settings of the synthetic cohort, `tools/configs/synthetic.toml`, built into
/// the binary: the quickstart trains with exactly the widths, schedule and coefficients
/// under which docs/results.md measures the ablation (there 5 training seeds per cohort, here
/// one).
pub const SYNTHETIC_CONFIG: &str = include_str!("../../tools/configs/synthetic.toml");

/// The cohort the quickstart synthesises: the one of `tools/configs/synthetic.toml`'s
/// header and docs/results.md.
pub mod defaults {
    /// Synthetic users.
    pub const USERS: u64 = 80_000;
    /// Train, valid and test percentages: a training cohort of 16 000 users, and valid and
    /// test splits large enough that one seed's comparison is not drowned in the split's
    /// sampling noise (docs/results.md).
    pub const SPLIT: [u32; 3] = [20, 20, 60];
    /// Default rate of the synthetic cohort (higher than the generator's 4 % so that the
    /// test split holds enough defaulters for a stable AUC).
    pub const DEFAULT_RATE: f64 = 0.1;
    /// In-service length limit.
    pub const IN_LEN: usize = 64;
    /// Pre-service length limit.
    pub const PRE_LEN: usize = 16;
}

/// Arguments of `mgkd-train quickstart`.
#[derive(Debug, Clone, Args)]
pub struct QuickstartArgs {
    /// Seed of the synthetic data and of training.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Keep the dataset and the checkpoints in this directory (default: a temporary
    /// directory, removed at the end).
    #[arg(long)]
    pub workdir: Option<PathBuf>,
    /// Synthetic users (20 % train, 20 % valid, 60 % test).
    #[arg(long, default_value_t = defaults::USERS)]
    pub users: u64,
    /// Epochs per model [default: the built-in tools/configs/synthetic.toml's].
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Peak learning rate [default: the built-in tools/configs/synthetic.toml's].
    #[arg(long)]
    pub lr: Option<f64>,
    /// Model width d [default: the built-in tools/configs/synthetic.toml's].
    #[arg(long)]
    pub d: Option<usize>,
    /// Worker threads (default: RAYON_NUM_THREADS or all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// No progress bars.
    #[arg(long)]
    pub quiet: bool,
}

/// Removes the temporary directory on every exit path; registered with
/// [`crate::io::cleanup`], so SIGINT/SIGTERM remove it too.
struct TempDir(PathBuf, Option<Registration>);

impl Drop for TempDir {
    fn drop(&mut self) {
        // Best effort: a leftover temporary directory is not an error of the quickstart.
        let _ = std::fs::remove_dir_all(&self.0);
        self.1.take();
    }
}

/// Runs the quickstart in `dir` (which must exist): the dataset goes to `dir/data`, the
/// checkpoints to `dir/checkpoints/seed{S}-{teacher,plain,full}.safetensors`. Returns the
/// teacher's, the plain student's and the MGKD student's runs.
pub fn quickstart_in(dir: &Path, args: &QuickstartArgs) -> Result<Vec<RunResult>> {
    let data = dir.join("data");
    let synth = SynthConfig {
        users: args.users,
        seed: args.seed,
        default_rate: defaults::DEFAULT_RATE,
        in_len: defaults::IN_LEN,
        pre_len: defaults::PRE_LEN,
        split: defaults::SPLIT,
        ..SynthConfig::default()
    };
    // Settings first: a bad flag is refused before anything is synthesised.
    let Resolved {
        widths: w,
        train,
        loss,
        teacher_train,
        teacher_loss,
    } = settings(args)?;
    synth.validate()?;
    let t = Instant::now();
    synthesize(&data, &synth)?;
    crate::outln!(
        "synthesised {} users into {} in {:.1} s",
        args.users,
        data.display(),
        t.elapsed().as_secs_f64()
    )?;
    let ds = Dataset::open(&data)?;
    let checkpoints = dir.join("checkpoints");
    std::fs::create_dir_all(&checkpoints).map_err(|e| Error::io(&checkpoints, e))?;
    let cfg = AblationConfig {
        seeds: vec![args.seed],
        variants: vec![Variant::Plain, Variant::Full],
        widths: w,
        train,
        loss,
        teacher_train,
        teacher_loss,
        checkpoints: Some(checkpoints),
        data: data.clone(),
        progress: !args.quiet && std::io::stderr().is_terminal(),
        resume: None,
        teacher_cache: crate::cli::train::mib_bytes(
            "the teacher cache",
            crate::train::teacher_cache::DEFAULT_BUDGET_MIB,
        )?,
        plain: None,
    };
    let be = CpuBackend::<f32>::new();
    let outcome = run_ablation(&be, &ds, &cfg, |r| {
        crate::outln!(
            "{}: best epoch {}/{} (valid AUC {:.4}), {:.1} s, {:.0} samples/s",
            label_of(&r.variant),
            r.best_epoch,
            r.epochs_run,
            r.valid_auc[r.best_epoch - 1],
            r.seconds,
            r.samples_per_s
        )
    })?;
    Ok(outcome.runs)
}

/// The settings of the run: [`SYNTHETIC_CONFIG`], with `--epochs`, `--lr`, `--d` and `--seed`
/// over it (the same defaults ← file ← flags rules as `teacher`, `student` and `ablation`).
fn settings(args: &QuickstartArgs) -> Result<Resolved> {
    let file = FileConfig::parse(
        SYNTHETIC_CONFIG,
        Path::new("tools/configs/synthetic.toml (built in)"),
    )?;
    resolve(
        &file,
        &hyper_of(args),
        Some(args.seed),
        false,
        SwitchArgs::default(),
        &CoefArgs::default(),
        Widths::defaults(),
    )
}

/// The quickstart's flags as the training flags they stand for (no config file: the
/// built-in one is passed to [`resolve`] directly).
fn hyper_of(args: &QuickstartArgs) -> HyperArgs {
    HyperArgs {
        config: None,
        epochs: args.epochs,
        batch: None,
        lr: args.lr,
        patience: None,
        no_bucket: false,
        d: args.d,
        heads: None,
        blocks: None,
        d_cat: None,
        rho: None,
        threads: None,
        device: Device::Cpu,
        precision: crate::backend::Precision::F32,
    }
}

/// `mgkd-train quickstart`.
pub fn run(args: &QuickstartArgs) -> Result<()> {
    let start = Instant::now();
    let (dir, _guard, _lock) = match &args.workdir {
        Some(d) => {
            let lock = OutputPath::prepare("--workdir", d, OutputKind::Dir, &[])?;
            std::fs::create_dir_all(d).map_err(|e| Error::io(d, e))?;
            (d.clone(), None, Some(lock))
        }
        None => {
            let d = std::env::temp_dir().join(format!(
                "mgkd-quickstart-{}-{}",
                std::process::id(),
                args.seed
            ));
            let ((), registration) =
                cleanup::create(&d, Removal::Tree, |p| std::fs::create_dir_all(p))
                    .map_err(|e| Error::io(&d, e))?;
            (d.clone(), Some(TempDir(d, Some(registration))), None)
        }
    };
    let runs = in_pool(args.threads, || quickstart_in(&dir, args))?;
    crate::outln!(
        "\n{:<26} {:>8} {:>7} {:>9} {:>5} {:>8}",
        "model (test split)",
        "AUC",
        "KS",
        "log-loss",
        "best",
        "s"
    )?;
    for r in &runs {
        crate::outln!(
            "{:<26} {:>8.4} {:>7.4} {:>9.5} {:>5} {:>8.1}",
            label_of(&r.variant),
            r.test_auc,
            r.test_ks,
            r.test_log_loss,
            r.best_epoch,
            r.seconds
        )?;
    }
    crate::outln!(
        "\nThe teacher reads in-service behaviour (not available when scoring applicants); the students read only \
         pre-service data. Total {:.0} s.",
        start.elapsed().as_secs_f64()
    )?;
    if args.workdir.is_some() {
        crate::outln!("dataset and checkpoints kept in {}", dir.display())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The quickstart trains what `ablation --config tools/configs/synthetic.toml` trains, and
    /// its flags override the file.
    #[test]
    fn quickstart_settings_are_the_shipped_synthetic_config() {
        let args = QuickstartArgs {
            seed: 3,
            workdir: None,
            users: defaults::USERS,
            epochs: None,
            lr: None,
            d: None,
            threads: None,
            quiet: true,
        };
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/configs/synthetic.toml");
        let from_file = resolve(
            &FileConfig::load(&path).expect("shipped config loads"),
            &hyper_of(&args),
            Some(3),
            false,
            SwitchArgs::default(),
            &CoefArgs::default(),
            Widths::defaults(),
        )
        .expect("shipped config resolves");
        assert_eq!(settings(&args).expect("built-in config"), from_file);
        assert_ne!(
            from_file.widths,
            Widths::defaults(),
            "the file was not applied"
        );

        let flagged = settings(&QuickstartArgs {
            epochs: Some(2),
            lr: Some(3e-4),
            d: Some(8),
            ..args
        })
        .expect("flags resolve");
        assert_eq!(
            (flagged.train.epochs, flagged.train.lr, flagged.widths.d),
            (2, 3e-4, 8)
        );
        assert_eq!(flagged.widths.heads, from_file.widths.heads);
    }
}
