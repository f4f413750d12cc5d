//! `mgkd-train teacher` and `mgkd-train student`: train a model on a dataset directory and
//! keep the checkpoint of the best validation AUC (docs/model.md §6.4).
//!
//! Settings come from the defaults, then the `--config` TOML file (sections `[model]`,
//! `[train]`, `[loss]`; an unknown key is an error naming it), then the flags. The whole
//! resolved configuration is stored in the checkpoint, so `eval` and `predict` need no flags.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use clap::Args;
use serde::Deserialize;

use crate::backend::{Backend, Precision};
use crate::cli::bounds;
use crate::data::writer::sha256_hex;
use crate::data::Dataset;
use crate::dist::Comm;
use crate::io::output::{Input, OutputKind, OutputPath};
use crate::loss::LossConfig;
pub use crate::model::config::Widths;
use crate::model::{checkpoint, Model, ModelConfig, Role, Teacher};
use crate::train::resume::{self, Every, ResumeOptions};
use crate::train::soft_labels::SoftLabels;
use crate::train::{
    cache_teacher, train_distributed, CacheOutcome, RunOptions, Stage, TrainConfig, TrainReport,
    TrainingRecord,
};
use crate::{Error, Result};

pub use crate::backend::device::DeviceChoice as Device;

/// Runs `$body` with `$be` bound to the backend that `$device` (a
/// [`DeviceChoice`](crate::backend::device::DeviceChoice)) selects: the one place that maps a
/// device to a backend type. `auto` takes CUDA device 0 when it works and otherwise says in
/// one line (stderr) why it runs on the CPU; an explicit `cuda[:N]` that cannot be used is an
/// error. Evaluates to the body's `Result`. With a [`Precision`] as well, `bf16` selects the
/// bf16 scheme's backend: on the CPU its reference,
/// [`CpuBf16Backend`](crate::backend::cpu_bf16::CpuBf16Backend); on CUDA the backend with
/// bf16 activations ([`CudaBackend::with_precision`](crate::backend::cuda::CudaBackend::with_precision)).
#[macro_export]
macro_rules! with_backend {
    ($device:expr, $precision:expr, $be:ident => $body:expr) => {
        match $precision {
            $crate::backend::Precision::F32 => $crate::with_backend!($device, $be => $body),
            $crate::backend::Precision::Bf16 => match $crate::backend::device::resolve($device) {
                Err(e) => Err(e),
                Ok($crate::backend::device::Resolved::Cpu { reason }) => {
                    if let Some(why) = reason {
                        $crate::noteln!("device: cpu (no CUDA device: {why})");
                    }
                    $crate::noteln!(
                        "precision: bf16 on the CPU, the scheme's reference (f32 arithmetic, \
                         bf16 storage): for checking, slower than f32"
                    );
                    match $crate::backend::cpu_bf16::CpuBf16Backend::from_env() {
                        Err(e) => Err(e),
                        Ok(backend) => {
                            let $be = &backend;
                            $body
                        }
                    }
                }
                Ok($crate::backend::device::Resolved::Cuda(info)) => {
                    match $crate::backend::cuda::CudaBackend::with_precision(
                        info.index,
                        $crate::backend::Precision::Bf16,
                    ) {
                        Err(e) => Err(e),
                        Ok(backend) => {
                            $crate::noteln!(
                                "device: {} (bf16 activations, f32 master weights)",
                                $crate::backend::Backend::name(&backend)
                            );
                            let $be = &backend;
                            $body
                        }
                    }
                }
            },
        }
    };
    ($device:expr, $be:ident => $body:expr) => {
        match $crate::backend::device::resolve($device) {
            Err(e) => Err(e),
            Ok($crate::backend::device::Resolved::Cpu { reason }) => {
                if let Some(why) = reason {
                    $crate::noteln!("device: cpu (no CUDA device: {why})");
                }
                let $be = &$crate::backend::cpu::CpuBackend::<f32>::new();
                $body
            }
            Ok($crate::backend::device::Resolved::Cuda(info)) => {
                match $crate::backend::cuda::CudaBackend::new(info.index) {
                    Err(e) => Err(e),
                    Ok(backend) => {
                        $crate::noteln!("device: {}", $crate::backend::Backend::name(&backend));
                        let $be = &backend;
                        $body
                    }
                }
            }
        }
    };
}

/// Model and training flags shared by `teacher`, `student` and `ablation`.
#[derive(Debug, Clone, Args)]
pub struct HyperArgs {
    /// TOML file with every hyper-parameter (`[model]`, `[train]`, `[loss]`, and `[teacher]` for
    /// the teacher's own optimisation and ρ); flags override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Maximum epochs.
    #[arg(long, help = help::train("Maximum epochs", TrainConfig::default().epochs))]
    pub epochs: Option<usize>,
    /// Rows per batch.
    #[arg(long, help = help::train("Rows per batch", TrainConfig::default().batch))]
    pub batch: Option<usize>,
    /// Peak learning rate.
    #[arg(long, help = help::train("Peak learning rate", TrainConfig::default().lr))]
    pub lr: Option<f64>,
    /// Early-stopping patience in validations.
    #[arg(long, help = help::train("Early-stopping patience in validations", TrainConfig::default().patience))]
    pub patience: Option<usize>,
    /// Plain shuffled batches instead of length-bucketed ones.
    #[arg(long)]
    pub no_bucket: bool,
    /// Model width d (a student defaults to its teacher's).
    #[arg(long, help = help::width("Model width d", Widths::defaults().d))]
    pub d: Option<usize>,
    /// Attention heads.
    #[arg(long, help = help::width("Attention heads", Widths::defaults().heads))]
    pub heads: Option<usize>,
    /// Transformer blocks.
    #[arg(long, help = help::width("Transformer blocks", Widths::defaults().blocks))]
    pub blocks: Option<usize>,
    /// Width of each profile categorical embedding.
    #[arg(long, help = help::width("Width of each profile categorical embedding", Widths::defaults().d_cat))]
    pub d_cat: Option<usize>,
    /// Class re-weighting exponent ρ.
    #[arg(long, help = help::train("Class re-weighting exponent ρ", LossConfig::default().rho))]
    pub rho: Option<f64>,
    /// Worker threads (default: RAYON_NUM_THREADS or all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Backend: auto (CUDA when one works, else CPU), cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: Device,
    /// Storage type of activations and matrix inputs: f32, or bf16 (parameters, optimizer
    /// state, LayerNorm statistics, logits and losses stay f32; on CUDA tensor-core products
    /// with f32 accumulation; on the CPU the scheme's reference, slower than f32).
    #[arg(long, default_value = "f32")]
    pub precision: Precision,
}

/// `--help` texts that show the defaults of flags whose unset value comes from the
/// `--config` file first (so clap's own `default_value` cannot be used).
mod help {
    /// A training setting: its library default, unless the config file sets it.
    pub fn train(what: &str, default: impl std::fmt::Display) -> String {
        format!("{what} [default: {default}, unless the --config file sets it]")
    }

    /// A width: its library default; a student's default is its teacher's.
    pub fn width(what: &str, default: usize) -> String {
        format!("{what} [default: {default}, or the --config file's; a student's: its teacher's]")
    }
}

/// Loss coefficients shared by `student` and `ablation` (unset: config file, then defaults).
#[derive(Debug, Clone, Default, Args)]
pub struct CoefArgs {
    /// L_coarse as cosine distance.
    #[arg(long)]
    pub coarse_cosine: bool,
    /// α, weight of L_soft.
    #[arg(long, help = help::train("α, weight of L_soft", LossConfig::default().alpha))]
    pub alpha: Option<f64>,
    /// β, weight of L_coarse.
    #[arg(long, help = help::train("β, weight of L_coarse", LossConfig::default().beta))]
    pub beta: Option<f64>,
    /// γ, weight of L_fine.
    #[arg(long, help = help::train("γ, weight of L_fine", LossConfig::default().gamma))]
    pub gamma: Option<f64>,
    /// δ, weight of L_self.
    #[arg(long, help = help::train("δ, weight of L_self", LossConfig::default().delta))]
    pub delta: Option<f64>,
    /// Temperature τ.
    #[arg(long, help = help::train("Temperature τ", LossConfig::default().tau))]
    pub tau: Option<f64>,
}

/// The student's loss switches (the ablation's variants set them themselves).
#[derive(Debug, Clone, Copy, Default, Args)]
pub struct SwitchArgs {
    /// Switch L_soft off.
    #[arg(long)]
    pub no_soft: bool,
    /// Switch L_coarse off.
    #[arg(long)]
    pub no_coarse: bool,
    /// Switch L_fine off.
    #[arg(long)]
    pub no_fine: bool,
    /// Switch L_self off.
    #[arg(long)]
    pub no_self: bool,
}

/// Options shared by `teacher` and `student`.
#[derive(Debug, Clone, Args)]
pub struct CommonArgs {
    /// Dataset directory.
    #[arg(long)]
    pub data: PathBuf,
    /// Output checkpoint (safetensors), written atomically whenever validation AUC improves.
    /// A regular file outside the dataset; links, devices and FIFOs are refused, and a second
    /// run writing the same checkpoint is refused while this one holds its lock.
    #[arg(long)]
    pub out: PathBuf,
    /// JSONL log, one line per epoch (default `<out>.log.jsonl`).
    #[arg(long)]
    pub log: Option<PathBuf>,
    /// No progress bar and no per-epoch table.
    #[arg(long)]
    pub quiet: bool,
    /// Queue every training step kernel by kernel instead of replaying each batch shape's
    /// recorded CUDA graph (the results are the same; graphs save the launch overhead).
    #[arg(long)]
    pub no_graphs: bool,
    /// Continue the interrupted run of this `--out` from its resume checkpoint
    /// (`<out>.resume.safetensors`), with the same settings; the log is appended to.
    #[arg(long)]
    pub resume: bool,
    /// How often, within an epoch, the resume checkpoint `<out>.resume.safetensors` is
    /// written: N optimiser steps, or a time of training (90s, 5m, 1h); it is also written at
    /// every epoch end, and removed when the run completes.
    #[arg(long, value_name = "N|TIME", default_value_t = resume::DEFAULT_EVERY)]
    pub checkpoint_every: Every,
    /// Seed (initialisation, shuffles).
    #[arg(long, help = help::train("Seed (initialisation, shuffles)", TrainConfig::default().seed))]
    pub seed: Option<u64>,
    /// No class re-weighting.
    #[arg(long)]
    pub no_reweight: bool,
    /// Model and training settings.
    #[command(flatten)]
    pub hyper: HyperArgs,
}

/// Arguments of `mgkd-train teacher`.
#[derive(Debug, Clone, Args)]
pub struct TeacherArgs {
    /// Common options.
    #[command(flatten)]
    pub common: CommonArgs,
}

/// Arguments of `mgkd-train student`.
#[derive(Debug, Clone, Args)]
pub struct StudentArgs {
    /// Common options.
    #[command(flatten)]
    pub common: CommonArgs,
    /// The frozen teacher's checkpoint.
    #[arg(long)]
    pub teacher: PathBuf,
    /// Loss switches.
    #[command(flatten)]
    pub switches: SwitchArgs,
    /// Loss coefficients.
    #[command(flatten)]
    pub coefs: CoefArgs,
    /// Memory budget, in MiB, for the teacher's outputs on the train rows (logits,
    /// representations and, with L_fine, token outputs), computed once and read by every
    /// epoch instead of running the teacher on every batch; over it the teacher runs live.
    /// 0 turns the cache off (results are the same either way).
    #[arg(long, value_name = "MIB", default_value_t = crate::train::teacher_cache::DEFAULT_BUDGET_MIB)]
    pub teacher_cache_mib: u64,
    /// L_soft's targets from this CSV instead of the teacher's logits: another model's
    /// scores in `predict`'s format (`row` or `user_id`, and `logit`), every train row
    /// scored; e.g. an ensemble of teachers, or the generator's true probability of `synth
    /// --latents`. The teacher still gives the coarse and fine targets; its outputs must be
    /// cached (--teacher-cache-mib). The checkpoint records the file and its SHA-256.
    #[arg(long, value_name = "CSV")]
    pub soft_labels: Option<PathBuf>,
}

/// `[model]` section of the config file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// Model width.
    pub d: Option<usize>,
    /// Attention heads.
    pub heads: Option<usize>,
    /// Transformer blocks.
    pub blocks: Option<usize>,
    /// Profile embedding width.
    pub d_cat: Option<usize>,
}

/// `[train]` section of the config file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSection {
    /// Maximum epochs.
    pub epochs: Option<usize>,
    /// Rows per batch.
    pub batch: Option<usize>,
    /// Peak learning rate.
    pub lr: Option<f64>,
    /// Seed.
    pub seed: Option<u64>,
    /// Early-stopping patience.
    pub patience: Option<usize>,
    /// Length-bucketed batches.
    pub bucket: Option<bool>,
    /// Warm-up share of the steps.
    pub warmup: Option<f64>,
    /// AdamW weight decay.
    pub weight_decay: Option<f64>,
    /// Gradient clipping threshold.
    pub clip: Option<f64>,
}

/// `[loss]` section of the config file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LossSection {
    /// α.
    pub alpha: Option<f64>,
    /// β.
    pub beta: Option<f64>,
    /// γ.
    pub gamma: Option<f64>,
    /// δ.
    pub delta: Option<f64>,
    /// τ.
    pub tau: Option<f64>,
    /// ρ.
    pub rho: Option<f64>,
    /// L_soft on.
    pub soft: Option<bool>,
    /// L_coarse on.
    pub coarse: Option<bool>,
    /// L_fine on.
    pub fine: Option<bool>,
    /// L_self on.
    pub self_distill: Option<bool>,
    /// Re-weighting on.
    pub reweight: Option<bool>,
    /// Cosine form of L_coarse.
    pub coarse_cosine: Option<bool>,
}

/// `[teacher]` section of the config file: the teacher stage's own optimisation and class
/// weighting, over `[train]` and `[loss]` (a key it leaves out is theirs). Widths are shared:
/// the student's alignment terms compare its vectors with the teacher's at the same d.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TeacherSection {
    /// Maximum epochs.
    pub epochs: Option<usize>,
    /// Rows per batch.
    pub batch: Option<usize>,
    /// Peak learning rate.
    pub lr: Option<f64>,
    /// Early-stopping patience.
    pub patience: Option<usize>,
    /// Length-bucketed batches.
    pub bucket: Option<bool>,
    /// Warm-up share of the steps.
    pub warmup: Option<f64>,
    /// AdamW weight decay.
    pub weight_decay: Option<f64>,
    /// Gradient clipping threshold.
    pub clip: Option<f64>,
    /// Class re-weighting exponent ρ.
    pub rho: Option<f64>,
    /// Re-weighting on.
    pub reweight: Option<bool>,
}

impl TeacherSection {
    /// The `[train]` section `t` with this section's keys over it.
    fn over(&self, t: &TrainSection) -> TrainSection {
        TrainSection {
            epochs: self.epochs.or(t.epochs),
            batch: self.batch.or(t.batch),
            lr: self.lr.or(t.lr),
            seed: t.seed,
            patience: self.patience.or(t.patience),
            bucket: self.bucket.or(t.bucket),
            warmup: self.warmup.or(t.warmup),
            weight_decay: self.weight_decay.or(t.weight_decay),
            clip: self.clip.or(t.clip),
        }
    }
}

/// A settings file (`--config`, or `ablation --plain-config`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Model widths.
    #[serde(default)]
    pub model: ModelSection,
    /// Optimisation.
    #[serde(default)]
    pub train: TrainSection,
    /// Loss coefficients and switches.
    #[serde(default)]
    pub loss: LossSection,
    /// The teacher's own settings, over `[train]` and `[loss]`.
    #[serde(default)]
    pub teacher: TeacherSection,
    /// The flag that named the file, for messages (`None`: `--config`).
    #[serde(skip)]
    pub flag: Option<&'static str>,
}

impl FileConfig {
    /// Reads and parses `path` (errors name the file and the offending key).
    pub fn load(path: &Path) -> Result<FileConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        FileConfig::parse(&text, path)
    }

    /// The file `--config` names, or the empty configuration when there is none.
    pub fn from_flag(config: Option<&Path>) -> Result<FileConfig> {
        config.map_or_else(|| Ok(FileConfig::default()), FileConfig::load)
    }

    /// Parses the TOML `text`; errors name `origin` (the file it came from).
    pub fn parse(text: &str, origin: &Path) -> Result<FileConfig> {
        toml::from_str(text).map_err(|e| Error::format(origin, e.to_string()))
    }
}

/// The settings of one run after defaults, config file and flags.
#[derive(Debug, Clone, PartialEq)]
pub struct Resolved {
    /// Model widths.
    pub widths: Widths,
    /// Optimisation (the student's; the teacher's where `[teacher]` is silent).
    pub train: TrainConfig,
    /// Loss (the student's; the teacher reads its `rho` and `reweight` where `[teacher]` is
    /// silent).
    pub loss: LossConfig,
    /// The teacher stage's optimisation: `[train]` with `[teacher]`'s keys over it, flags
    /// over both.
    pub teacher_train: TrainConfig,
    /// The teacher stage's loss settings: `loss` with `[teacher]`'s `rho` and `reweight`
    /// over it, flags over both.
    pub teacher_loss: LossConfig,
}

/// Resolves defaults ← `file` ← flags (`hyper.config` is not read here: pass
/// [`FileConfig::from_flag`] of it, or a configuration parsed elsewhere); `base` are the
/// default widths (the teacher's for a student).
pub fn resolve(
    file: &FileConfig,
    hyper: &HyperArgs,
    seed: Option<u64>,
    no_reweight: bool,
    switches: SwitchArgs,
    coefs: &CoefArgs,
    base: Widths,
) -> Result<Resolved> {
    let pick = |flag: Option<usize>, file: Option<usize>, def: usize| flag.or(file).unwrap_or(def);
    let (m, t, l, th) = (&file.model, &file.train, &file.loss, &file.teacher);
    let in_file = format!("in the {} file", file.flag.unwrap_or("--config"));
    // Sizes that could exhaust the machine, named by where they came from.
    use crate::model::config::{MAX_BLOCKS, MAX_D, MAX_D_CAT, MAX_HEADS};
    use crate::train::{MAX_BATCH, MAX_EPOCHS};
    for (flag, key, from_flag, from_file, max) in [
        (
            "--epochs",
            "[train] epochs",
            hyper.epochs,
            t.epochs,
            MAX_EPOCHS,
        ),
        ("--batch", "[train] batch", hyper.batch, t.batch, MAX_BATCH),
        (
            "--patience",
            "[train] patience",
            hyper.patience,
            t.patience,
            MAX_EPOCHS,
        ),
        (
            "--epochs",
            "[teacher] epochs",
            hyper.epochs,
            th.epochs,
            MAX_EPOCHS,
        ),
        (
            "--batch",
            "[teacher] batch",
            hyper.batch,
            th.batch,
            MAX_BATCH,
        ),
        (
            "--patience",
            "[teacher] patience",
            hyper.patience,
            th.patience,
            MAX_EPOCHS,
        ),
        ("--d", "[model] d", hyper.d, m.d, MAX_D),
        ("--heads", "[model] heads", hyper.heads, m.heads, MAX_HEADS),
        (
            "--blocks",
            "[model] blocks",
            hyper.blocks,
            m.blocks,
            MAX_BLOCKS,
        ),
        ("--d-cat", "[model] d_cat", hyper.d_cat, m.d_cat, MAX_D_CAT),
    ] {
        match (from_flag, from_file) {
            (Some(v), _) => bounds::check(flag, v, 1..=max, "")?,
            (None, Some(v)) => bounds::check(&format!("`{key}` ="), v, 1..=max, &in_file)?,
            (None, None) => {}
        }
    }
    if let Some(n) = hyper.threads {
        bounds::check_threads(n)?;
    }
    let widths = Widths {
        d: pick(hyper.d, m.d, base.d),
        heads: pick(hyper.heads, m.heads, base.heads),
        blocks: pick(hyper.blocks, m.blocks, base.blocks),
        d_cat: pick(hyper.d_cat, m.d_cat, base.d_cat),
    };
    let td = TrainConfig::default();
    // Defaults ← a `[train]` section ← flags (the teacher's: `[teacher]` over `[train]`).
    let train_config = |t: &TrainSection| TrainConfig {
        epochs: pick(hyper.epochs, t.epochs, td.epochs),
        batch: pick(hyper.batch, t.batch, td.batch),
        lr: hyper.lr.or(t.lr).unwrap_or(td.lr),
        seed: seed.or(t.seed).unwrap_or(td.seed),
        patience: pick(hyper.patience, t.patience, td.patience),
        bucket: !hyper.no_bucket && t.bucket.unwrap_or(td.bucket),
        warmup: t.warmup.unwrap_or(td.warmup),
        weight_decay: t.weight_decay.unwrap_or(td.weight_decay),
        clip: t.clip.unwrap_or(td.clip),
    };
    let train = train_config(t);
    let teacher_train = train_config(&th.over(t));
    let ld = LossConfig::default();
    let f = |flag: Option<f64>, file: Option<f64>, def: f64| flag.or(file).unwrap_or(def);
    let off = |flag: bool, file: Option<bool>, def: bool| !flag && file.unwrap_or(def);
    let loss = LossConfig {
        alpha: f(coefs.alpha, l.alpha, ld.alpha),
        beta: f(coefs.beta, l.beta, ld.beta),
        gamma: f(coefs.gamma, l.gamma, ld.gamma),
        delta: f(coefs.delta, l.delta, ld.delta),
        tau: f(coefs.tau, l.tau, ld.tau),
        rho: f(hyper.rho, l.rho, ld.rho),
        hard: true,
        soft: off(switches.no_soft, l.soft, ld.soft),
        coarse: off(switches.no_coarse, l.coarse, ld.coarse),
        fine: off(switches.no_fine, l.fine, ld.fine),
        self_distill: off(switches.no_self, l.self_distill, ld.self_distill),
        reweight: off(no_reweight, l.reweight, ld.reweight),
        coarse_cosine: coefs.coarse_cosine || l.coarse_cosine.unwrap_or(ld.coarse_cosine),
    };
    // The teacher's ρ and re-weighting: defaults ← [loss] ← [teacher] ← flags.
    let teacher_loss = LossConfig {
        rho: hyper.rho.or(th.rho).or(l.rho).unwrap_or(ld.rho),
        reweight: !no_reweight && th.reweight.or(l.reweight).unwrap_or(ld.reweight),
        ..loss.clone()
    };
    for (what, train, loss) in [
        ("", &train, &loss),
        ("[teacher]: ", &teacher_train, &teacher_loss),
    ] {
        let named = |e: Error| Error::invalid(format!("{what}{e}"));
        train.validate().map_err(named)?;
        loss.validate().map_err(named)?;
    }
    Ok(Resolved {
        widths,
        train,
        loss,
        teacher_train,
        teacher_loss,
    })
}

/// Runs `f` in a rayon pool of `threads` threads (the global pool when `None`); `threads`
/// must be 1 to [`bounds::max_threads`].
pub fn in_pool<T: Send>(threads: Option<usize>, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    match threads {
        None => f(),
        Some(n) => {
            bounds::check_threads(n)?;
            rayon::ThreadPoolBuilder::new()
                .num_threads(n)
                .build()
                .map_err(|e| Error::invalid(format!("thread pool of {n}: {e}")))?
                .install(f)
        }
    }
}

/// Total in-service events stored in the dataset.
pub fn in_service_events(ds: &Dataset) -> u64 {
    ds.manifest().shards.iter().map(|s| s.in_events).sum()
}

/// An error when `ds` has no in-service event at all (a teacher cannot read it).
pub fn require_in_service(ds: &Dataset, what: &str) -> Result<()> {
    if in_service_events(ds) == 0 {
        return Err(Error::invalid(format!(
            "{what} needs in-service events (the teacher reads them), and the dataset {} has none",
            ds.dir().display()
        )));
    }
    Ok(())
}

/// Checks that a checkpoint's configuration `found` (read from `file`) was built for the
/// schema of `ds`; otherwise an error naming both and every difference.
pub fn check_schema(file: &Path, found: &ModelConfig, ds: &Dataset) -> Result<()> {
    let w = Widths::of(found);
    let wanted = ModelConfig::new(found.role, ds.schema(), w.d, w.heads, w.blocks, w.d_cat)?;
    let diff = found.diff(&wanted);
    if diff.is_empty() {
        return Ok(());
    }
    Err(Error::format(
        file,
        format!(
            "this {} was trained on data of another schema than the dataset {} (checkpoint here, dataset wanted): {}",
            found.role,
            ds.dir().display(),
            diff.join("; ")
        ),
    ))
}

/// The default log path `<out>.log.jsonl`.
pub fn default_log(out: &Path) -> PathBuf {
    let mut s = out.as_os_str().to_owned();
    s.push(".log.jsonl");
    PathBuf::from(s)
}

/// Prints the per-epoch table and the best epoch.
pub fn print_summary(report: &TrainReport, out: &Path) -> Result<()> {
    crate::outln!(
        "{:>5} {:>11} {:>9} {:>8} {:>10} {:>11} {:>8}",
        "epoch",
        "train_loss",
        "valid_auc",
        "valid_ks",
        "valid_ll",
        "samples/s",
        "padding"
    )?;
    for e in &report.history {
        crate::outln!(
            "{:>5} {:>11.5} {:>9.4} {:>8.4} {:>10.5} {:>11.0} {:>7.1}%{}",
            e.epoch,
            e.train_loss,
            e.valid_auc,
            e.valid_ks,
            e.valid_log_loss,
            e.samples_per_s,
            100.0 * e.padding,
            if e.best { " *" } else { "" }
        )?;
    }
    crate::outln!(
        "best epoch {}: valid AUC {:.4}, KS {:.4}; {} epochs{} in {:.1} s ({:.0} samples/s); checkpoint {}",
        report.best.epoch,
        report.best.valid_auc,
        report.best.valid_ks,
        report.history.len(),
        if report.stopped_early {
            " (early stop)"
        } else {
            ""
        },
        report.seconds,
        report.samples_per_s,
        out.display()
    )?;
    Ok(())
}

fn run_options(common: &CommonArgs, record: &TrainingRecord) -> Result<RunOptions> {
    Ok(RunOptions {
        checkpoint: Some(common.out.clone()),
        metadata: record.to_metadata()?,
        log: Some(
            common
                .log
                .clone()
                .unwrap_or_else(|| default_log(&common.out)),
        ),
        progress: !common.quiet && std::io::stderr().is_terminal(),
        eager: common.no_graphs,
        resume: Some(ResumeOptions {
            path: resume::resume_path(&common.out),
            every: common.checkpoint_every,
            resume: common.resume,
        }),
    })
}

/// Trains a teacher on `be` as one rank of `comm` (a solo one: on its own) (library entry of
/// `mgkd-train teacher`).
pub fn teacher_on<B: Backend>(
    be: &B,
    args: &TeacherArgs,
    r: &Resolved,
    comm: &Comm,
) -> Result<TrainReport> {
    let c = &args.common;
    let _attached = comm.attach(be)?;
    let ds = Dataset::open(&c.data)?;
    require_in_service(&ds, "training a teacher")?;
    let w = r.widths;
    let cfg = ModelConfig::new(Role::Teacher, ds.schema(), w.d, w.heads, w.blocks, w.d_cat)?;
    let (train, loss) = (&r.teacher_train, &r.teacher_loss);
    let mut model = Model::new(be, cfg, train.seed)?;
    let rec = TrainingRecord::of_run(
        &ds,
        &c.data,
        Role::Teacher,
        train,
        loss,
        None,
        be.precision(),
    )?;
    let opts = run_options(c, &rec)?;
    let stage = Stage::Teacher;
    train_distributed(be, &ds, &mut model, &stage, loss, train, &opts, comm)
}

/// Trains a student under the teacher of `args.teacher` on `be` as one rank of `comm` (a
/// solo one: on its own) (library entry of `mgkd-train student`). The teacher must be a
/// teacher checkpoint of the dataset's schema.
pub fn student_on<B: Backend>(
    be: &B,
    args: &StudentArgs,
    r: &Resolved,
    comm: &Comm,
) -> Result<TrainReport> {
    let c = &args.common;
    let _attached = comm.attach(be)?;
    if c.out == args.teacher {
        return Err(Error::invalid(format!(
            "--out {} is the teacher checkpoint: choose another output",
            c.out.display()
        )));
    }
    let ds = Dataset::open(&c.data)?;
    require_in_service(
        &ds,
        "training a student (its teacher reads in-service events)",
    )?;
    let bytes = std::fs::read(&args.teacher).map_err(|e| Error::io(&args.teacher, e))?;
    let sha = sha256_hex(&bytes);
    drop(bytes);
    let ck = checkpoint::read(&args.teacher)?;
    if let Some(w) = ck.unverified_warning(&args.teacher) {
        crate::noteln!("{w}");
    }
    if ck.config.role != Role::Teacher {
        return Err(Error::format(
            &args.teacher,
            "--teacher needs a teacher checkpoint, this is a student",
        ));
    }
    check_schema(&args.teacher, &ck.config, &ds)?;
    let teacher = ck.into_model(be)?;
    let w = r.widths;
    if w.d != teacher.config.d {
        return Err(Error::invalid(format!(
            "the student's width d = {} must equal its teacher's ({}): the coarse and fine terms compare their representations",
            w.d, teacher.config.d
        )));
    }
    let cfg = ModelConfig::new(Role::Student, ds.schema(), w.d, w.heads, w.blocks, w.d_cat)?;
    let mut model = Model::new(be, cfg, r.train.seed)?;
    let from = Some((args.teacher.as_path(), sha));
    let mut rec = TrainingRecord::of_run(
        &ds,
        &c.data,
        Role::Student,
        &r.train,
        &r.loss,
        from,
        be.precision(),
    )?;
    let soft = match &args.soft_labels {
        None => None,
        Some(path) => {
            if !r.loss.soft {
                return Err(Error::invalid(format!(
                    "--soft-labels {}: L_soft is off (--no-soft or the config's soft = \
                     false), so nothing would read them",
                    path.display()
                )));
            }
            let soft = SoftLabels::read(path, &ds)?;
            rec.soft_labels = Some(path.display().to_string());
            rec.soft_labels_sha256 = Some(soft.sha256.clone());
            Some((path, soft))
        }
    };
    let opts = run_options(c, &rec)?;
    let budget = mib_bytes("--teacher-cache-mib", args.teacher_cache_mib)?;
    let (mut cache, outcome) = cache_teacher(be, &teacher, &ds, [&r.loss], r.train.batch, budget)?;
    if outcome != CacheOutcome::Off {
        crate::noteln!("{outcome}");
    }
    if let Some((path, soft)) = &soft {
        let Some(cache) = cache.as_mut() else {
            return Err(Error::invalid(format!(
                "--soft-labels replaces the teacher's logits in its cache, and the cache was \
                 not built ({outcome}): raise --teacher-cache-mib"
            )));
        };
        soft.apply(be, cache)?;
        crate::noteln!(
            "L_soft's targets: the logits of {} (SHA-256 {}), not the teacher's",
            path.display(),
            &soft.sha256[..12]
        );
    }
    let stage = Stage::Student(Teacher {
        model: &teacher,
        cache: cache.as_ref(),
    });
    train_distributed(be, &ds, &mut model, &stage, &r.loss, &r.train, &opts, comm)
}

/// `mib` MiB in bytes (for `flag`), refusing a budget that overflows.
pub fn mib_bytes(flag: &str, mib: u64) -> Result<u64> {
    mib.checked_mul(1 << 20)
        .ok_or_else(|| Error::invalid(format!("{flag} {mib}: too large")))
}

/// Checks and locks the outputs of a training run: the checkpoint `--out` and the log
/// (`--log`, default `<out>.log.jsonl`), neither inside the dataset `--data` nor equal to the
/// `--teacher` checkpoint or the `--soft-labels` file (see [`crate::io::output`]). The locks
/// hold while the result lives.
pub fn prepare_outputs(
    c: &CommonArgs,
    teacher: Option<&Path>,
    soft_labels: Option<&Path>,
) -> Result<Vec<OutputPath>> {
    let mut inputs = vec![Input::dataset("--data", &c.data)];
    if let Some(t) = teacher {
        inputs.push(Input::file("--teacher", t));
    }
    if let Some(f) = soft_labels {
        inputs.push(Input::file("--soft-labels", f));
    }
    let log = c.log.clone().unwrap_or_else(|| default_log(&c.out));
    if crate::io::output::resolve(&log)? == crate::io::output::resolve(&c.out)? {
        return Err(Error::invalid(format!(
            "--log {} is the checkpoint --out: choose another log file",
            log.display()
        )));
    }
    let checkpoint = OutputPath::prepare("--out", &c.out, OutputKind::File, &inputs)?;
    let log_flag = if c.log.is_some() {
        "--log"
    } else {
        "--log (default <out>.log.jsonl)"
    };
    let log_out = OutputPath::prepare(log_flag, &log, OutputKind::File, &inputs)?;
    let state = resume::resume_path(&c.out);
    crate::io::output::check(
        "--out's resume checkpoint",
        &state,
        OutputKind::File,
        &inputs,
    )?;
    check_resume(&state, c.resume, &log)?;
    Ok(vec![checkpoint, log_out])
}

/// What `--resume` (or its absence) needs of the resume checkpoint `state` and the `log`:
/// `--resume` needs the checkpoint; a fresh run is refused while one exists (it would throw
/// an interrupted run away) and says so when it replaces an earlier run's log.
pub fn check_resume(state: &Path, resume: bool, log: &Path) -> Result<()> {
    let exists = std::fs::symlink_metadata(state).is_ok();
    match (resume, exists) {
        (true, false) => Err(Error::invalid(format!(
            "--resume: there is no resume checkpoint {} to continue from (a run writes it at \
             its first checkpoint interval or epoch end and removes it when it completes): \
             run without --resume to start afresh",
            state.display()
        ))),
        (false, true) => Err(Error::invalid(format!(
            "{} holds the state of an interrupted run of this output: continue it with \
             --resume, or remove the file to start afresh",
            state.display()
        ))),
        (true, true) => Ok(()),
        (false, false) => {
            if std::fs::metadata(log).is_ok_and(|m| m.len() > 0) {
                crate::noteln!(
                    "note: replacing the log {} of an earlier run (a run without --resume \
                     starts a new log)",
                    log.display()
                );
            }
            Ok(())
        }
    }
}

/// Runs `job` as this process's part of the data-parallel job its launcher describes (or on
/// its own: [`Comm::join_job`]); a failure is reported to the other ranks, which stop with
/// an error naming this one. Only rank 0 prints the summary.
fn in_job(c: &CommonArgs, job: impl FnOnce(&Comm) -> Result<TrainReport>) -> Result<()> {
    let comm = Comm::join_job()?;
    match job(&comm) {
        Err(e) => {
            comm.abort(&e.to_string());
            Err(e)
        }
        Ok(report) if comm.rank() == 0 => finish(c, &report),
        Ok(_) => Ok(()),
    }
}

/// `mgkd-train teacher`.
pub fn run_teacher(args: &TeacherArgs) -> Result<()> {
    in_job(&args.common, |comm| teacher_job(args, comm))
}

/// `mgkd-train teacher` as one rank of `comm`: rank 0 checks and locks the outputs.
fn teacher_job(args: &TeacherArgs, comm: &Comm) -> Result<TrainReport> {
    let c = &args.common;
    let _outputs = match comm.rank() {
        0 => prepare_outputs(c, None, None)?,
        _ => Vec::new(),
    };
    let r = resolve(
        &FileConfig::from_flag(c.hyper.config.as_deref())?,
        &c.hyper,
        c.seed,
        c.no_reweight,
        SwitchArgs::default(),
        &CoefArgs::default(),
        Widths::defaults(),
    )?;
    in_pool(
        c.hyper.threads,
        || with_backend!(c.hyper.device, c.hyper.precision, be => teacher_on(be, args, &r, comm)),
    )
}

/// `mgkd-train student`.
pub fn run_student(args: &StudentArgs) -> Result<()> {
    in_job(&args.common, |comm| student_job(args, comm))
}

/// `mgkd-train student` as one rank of `comm`: rank 0 checks and locks the outputs.
fn student_job(args: &StudentArgs, comm: &Comm) -> Result<TrainReport> {
    let c = &args.common;
    let _outputs = match comm.rank() {
        0 => prepare_outputs(c, Some(&args.teacher), args.soft_labels.as_deref())?,
        _ => Vec::new(),
    };
    let base = Widths::of(&checkpoint::read_config(&args.teacher)?);
    let r = resolve(
        &FileConfig::from_flag(c.hyper.config.as_deref())?,
        &c.hyper,
        c.seed,
        c.no_reweight,
        args.switches,
        &args.coefs,
        base,
    )?;
    in_pool(
        c.hyper.threads,
        || with_backend!(c.hyper.device, c.hyper.precision, be => student_on(be, args, &r, comm)),
    )
}

fn finish(c: &CommonArgs, report: &TrainReport) -> Result<()> {
    if c.quiet {
        crate::outln!(
            "best epoch {}: valid AUC {:.4}, KS {:.4}; checkpoint {}",
            report.best.epoch,
            report.best.valid_auc,
            report.best.valid_ks,
            c.out.display()
        )?;
    } else {
        print_summary(report, &c.out)?;
    }
    Ok(())
}
