//! The paired ablation of docs/model.md §6.8: per seed, one teacher, then seven students (plain,
//! each distillation term alone on top of plain, full MGKD, full without re-weighting), each
//! evaluated on the test split; and the paired summary (per variant the mean ± std of its test AUC
//! and KS over seeds, and of its per-seed difference to the plain student, with the number of seeds
//! on which it improved).
//!
//! Paired means: for a given seed every variant trains on the same split (the dataset's),
//! under the same teacher (trained once per seed), from the same initialisation seed and on
//! the same batches in the same order (the batch order depends only on the seed, the epoch
//! and the sequence lengths, see [`crate::train::batching`]), so the split's and the
//! seed's own noise cancel in the differences.

use std::path::PathBuf;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::backend::{Backend, Precision};
use crate::data::Dataset;
use crate::loss::{class_weights, LossConfig};
use crate::metrics;
use crate::model::config::Widths;
use crate::model::{checkpoint, Model, ModelConfig, Role, Teacher, TeacherCache};
use crate::train::resume::{self, resume_path, Every, ResumeOptions};
use crate::train::{
    cache_teacher, labels_of, score_rows, sigmoid, train, CacheOutcome, RunOptions, Stage,
    TrainConfig, TrainingRecord, TEST, TRAIN,
};
use crate::{Error, Result};

/// The students of the ablation, in table order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Variant {
    /// `L_hard` only, re-weighted: the baseline every difference is taken against.
    Plain,
    /// Plain + `L_soft`.
    Soft,
    /// Plain + `L_coarse`.
    Coarse,
    /// Plain + `L_fine`.
    Fine,
    /// Plain + `L_self`.
    #[serde(rename = "self")]
    SelfDistill,
    /// Every term, re-weighted (MGKD).
    Full,
    /// Every term, without class re-weighting.
    FullNoReweight,
}

impl Variant {
    /// Every student variant, in table order.
    pub const ALL: [Variant; 7] = [
        Variant::Plain,
        Variant::Soft,
        Variant::Coarse,
        Variant::Fine,
        Variant::SelfDistill,
        Variant::Full,
        Variant::FullNoReweight,
    ];

    /// The name used in `results.json`, the report and file names.
    pub fn name(self) -> &'static str {
        match self {
            Variant::Plain => "plain",
            Variant::Soft => "soft",
            Variant::Coarse => "coarse",
            Variant::Fine => "fine",
            Variant::SelfDistill => "self",
            Variant::Full => "full",
            Variant::FullNoReweight => "full-no-reweight",
        }
    }

    /// The variant of a name (as [`Variant::name`]).
    pub fn from_name(name: &str) -> Option<Variant> {
        Variant::ALL.into_iter().find(|v| v.name() == name)
    }

    /// A human description (report rows).
    pub fn label(self) -> &'static str {
        match self {
            Variant::Plain => "plain (hard, re-weighted)",
            Variant::Soft => "+ soft",
            Variant::Coarse => "+ coarse",
            Variant::Fine => "+ fine",
            Variant::SelfDistill => "+ self",
            Variant::Full => "full MGKD",
            Variant::FullNoReweight => "full, no re-weighting",
        }
    }

    /// The loss of this variant: `base`'s coefficients (α, β, γ, δ, τ, ρ, cosine form) with
    /// the switches of the variant (plain and the one-term variants are re-weighted).
    pub fn loss(self, base: &LossConfig) -> LossConfig {
        let only = |soft, coarse, fine, self_distill, reweight| LossConfig {
            hard: true,
            soft,
            coarse,
            fine,
            self_distill,
            reweight,
            ..base.clone()
        };
        match self {
            Variant::Plain => only(false, false, false, false, true),
            Variant::Soft => only(true, false, false, false, true),
            Variant::Coarse => only(false, true, false, false, true),
            Variant::Fine => only(false, false, true, false, true),
            Variant::SelfDistill => only(false, false, false, true, true),
            Variant::Full => only(true, true, true, true, true),
            Variant::FullNoReweight => only(true, true, true, true, false),
        }
    }
}

/// Name of the teacher's rows in the results.
pub const TEACHER: &str = "teacher";

/// Settings of an ablation.
#[derive(Debug, Clone, PartialEq)]
pub struct AblationConfig {
    /// The seeds; each gives one teacher and a student per variant.
    pub seeds: Vec<u64>,
    /// The student variants to train, in [`Variant::ALL`] order; must include
    /// [`Variant::Plain`], the baseline of every paired difference.
    pub variants: Vec<Variant>,
    /// Widths of every model.
    pub widths: Widths,
    /// The students' optimisation (its `seed` is replaced by each seed in turn).
    pub train: TrainConfig,
    /// The students' coefficients (the switches are set per variant).
    pub loss: LossConfig,
    /// The teachers' optimisation (its `seed` is replaced by each seed in turn).
    pub teacher_train: TrainConfig,
    /// The teachers' loss settings (the teacher stage reads `rho` and `reweight`).
    pub teacher_loss: LossConfig,
    /// Keep each run's best checkpoint in this directory (`seed{S}-{variant}.safetensors`).
    pub checkpoints: Option<PathBuf>,
    /// The dataset directory as given (recorded in checkpoints).
    pub data: PathBuf,
    /// Progress bars during training.
    pub progress: bool,
    /// Resume checkpoints of every run (beside its checkpoint, so only with
    /// `checkpoints`), and what an interrupted ablation left.
    pub resume: Option<AblationResume>,
    /// Memory budget in bytes of each seed's teacher cache, shared by that seed's students
    /// ([`crate::train::teacher_cache`]; 0: the teacher runs on every batch).
    pub teacher_cache: u64,
    /// The plain student's own settings, when they are not the other students'
    /// (`ablation --plain-config`); `None`: the plain student trains with `widths`, `train`
    /// and `loss` like every variant.
    pub plain: Option<PlainSettings>,
}

/// Settings of a plain student trained apart from the other variants' (e.g. `tune`'s
/// `tuned-plain.toml`), so that every paired difference is against a plain student tuned on
/// its own: same seeds, split and initialisation seed; the same batches when `train.batch`
/// is the variants' batch. The plain student reads no teacher output, so its width may
/// differ from the teacher's.
#[derive(Debug, Clone, PartialEq)]
pub struct PlainSettings {
    /// Its widths.
    pub widths: Widths,
    /// Its optimisation (its `seed` is replaced by each seed in turn).
    pub train: TrainConfig,
    /// Its loss settings (ρ and re-weighting; the distillation switches are off).
    pub loss: LossConfig,
}

/// Resuming an ablation: the runs that finished are kept, an unfinished one continues from
/// its resume checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct AblationResume {
    /// How often each run writes its resume checkpoint within an epoch.
    pub every: Every,
    /// Continue the runs that have a resume checkpoint (else they start afresh).
    pub resume: bool,
    /// Runs an earlier, interrupted ablation finished: each is kept (its model is read from
    /// its checkpoint where needed: a teacher, the curves' models) and not trained again;
    /// one whose settings differ from this ablation's is an error.
    pub finished: Vec<RunResult>,
}

impl AblationConfig {
    /// Checks what [`run_ablation`] needs: at least one seed, and the plain student among
    /// the variants.
    pub fn validate(&self) -> Result<()> {
        if self.resume.is_some() && self.checkpoints.is_none() {
            return Err(Error::invalid(
                "ablation: resuming needs the checkpoints (each run's resume checkpoint lies \
                 beside it, and a finished run's model is read back from it)",
            ));
        }
        if self.seeds.is_empty() {
            return Err(Error::invalid("ablation: at least one seed is needed"));
        }
        if !self.variants.contains(&Variant::Plain) {
            return Err(Error::invalid(
                "ablation: the variants must include plain, the baseline of every paired difference",
            ));
        }
        Ok(())
    }
}

/// The settings one run used (stored with each result).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunConfig {
    /// Widths.
    pub model: Widths,
    /// Optimisation settings (with this run's seed).
    pub train: TrainConfig,
    /// Loss settings (with this variant's switches).
    pub loss: LossConfig,
    /// Storage type of the activations (absent in results written before the precision
    /// scheme, which ran in f32).
    #[serde(default)]
    pub precision: Precision,
}

/// One trained model's test metrics (one row of `results.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunResult {
    /// `teacher` or a [`Variant::name`].
    pub variant: String,
    /// Seed.
    pub seed: u64,
    /// Test AUC.
    pub test_auc: f64,
    /// Test KS.
    pub test_ks: f64,
    /// Test log-loss.
    pub test_log_loss: f64,
    /// Test PR-AUC.
    pub test_pr_auc: f64,
    /// Best validation epoch (1-based; its parameters were evaluated).
    pub best_epoch: usize,
    /// Epochs run (fewer than configured after an early stop).
    pub epochs_run: usize,
    /// Validation AUC after each epoch.
    pub valid_auc: Vec<f64>,
    /// Wall-clock seconds of training plus test scoring.
    pub seconds: f64,
    /// Training throughput over the epochs run (rows per second of training time; 0 in
    /// results written before it was recorded).
    #[serde(default)]
    pub samples_per_s: f64,
    /// Settings of the run.
    pub config: RunConfig,
    /// A student's test AUC against the plain student's of the same seed, on the same rows,
    /// by DeLong's paired test (absent for the teacher and the plain student, and in results
    /// written before it was recorded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vs_plain: Option<VsPlain>,
}

impl RunResult {
    /// The validation AUC of its best epoch (the one early stopping kept); an error when
    /// the run records none.
    pub fn best_valid_auc(&self) -> Result<f64> {
        self.best_epoch
            .checked_sub(1)
            .and_then(|e| self.valid_auc.get(e))
            .copied()
            .ok_or_else(|| {
                Error::invalid(format!(
                    "seed {} {}: no validation AUC recorded for its best epoch {}",
                    self.seed, self.variant, self.best_epoch
                ))
            })
    }
}

/// DeLong's paired comparison of a student's test AUC with the plain student's of the same
/// seed ([`metrics::paired_auc`]).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct VsPlain {
    /// Test AUC of the student − test AUC of the plain student.
    pub diff: f64,
    /// DeLong's standard error of that difference.
    pub se: f64,
    /// Two-sided p-value (normal approximation).
    pub p: f64,
}

/// Significance level of [`VariantSummary::significant`].
pub const SIGNIFICANCE: f64 = 0.05;

/// The test scores of the first seed's teacher, plain and full students (for the curves).
#[derive(Debug, Clone, PartialEq)]
pub struct CurveScores {
    /// Seed they belong to.
    pub seed: u64,
    /// Test labels.
    pub labels: Vec<u8>,
    /// `(name, probabilities)` of teacher, plain and full students.
    pub models: Vec<(String, Vec<f64>)>,
}

/// Everything an ablation produced.
#[derive(Debug, Clone, PartialEq)]
pub struct AblationOutcome {
    /// One row per run: per seed the teacher then the chosen variants in [`Variant::ALL`]
    /// order.
    pub runs: Vec<RunResult>,
    /// Scores for the ROC and KS curves (first seed).
    pub curves: CurveScores,
}

/// A kept teacher checkpoint: its path and SHA-256 (hex).
type TeacherFile = (PathBuf, String);

/// Runs the ablation on `ds` with backend `be`; `on_run` is called after each run (progress
/// lines); an error it returns stops the ablation.
pub fn run_ablation<B: Backend>(
    be: &B,
    ds: &Dataset,
    cfg: &AblationConfig,
    mut on_run: impl FnMut(&RunResult) -> Result<()>,
) -> Result<AblationOutcome> {
    cfg.validate()?;
    let test_rows = ds.rows_of_split(TEST);
    let test_labels = labels_of(ds, &test_rows, "the ablation's test evaluation")?;
    let pos = test_labels.iter().filter(|&&y| y == 1).count();
    if pos < 2 || test_labels.len() - pos < 2 {
        return Err(Error::invalid(format!(
            "the test split of {} has {} rows and {pos} defaults: the paired comparison of \
             test AUCs needs at least 2 rows of each class",
            ds.dir().display(),
            test_labels.len()
        )));
    }
    let train_rows = ds.rows_of_split(TRAIN);
    let train_labels = labels_of(ds, &train_rows, "training")?;
    let n_pos = train_labels.iter().filter(|&&y| y == 1).count() as u64;
    let n_neg = train_labels.len() as u64 - n_pos;
    // The run of `name` and `seed` an interrupted ablation finished, if any.
    let finished = |name: &str, seed: u64| {
        cfg.resume
            .iter()
            .flat_map(|r| &r.finished)
            .find(|r| r.variant == name && r.seed == seed)
    };
    let mut runs = Vec::new();
    let mut curves = CurveScores {
        seed: cfg.seeds[0],
        labels: test_labels.clone(),
        models: Vec::new(),
    };
    for (k, &seed) in cfg.seeds.iter().enumerate() {
        let mut teacher: Option<(Model<B>, Option<TeacherFile>)> = None;
        // The teacher's outputs, cached when its first student needs them.
        let mut cache: Option<Option<TeacherCache<B>>> = None;
        // The plain student's test probabilities, the baseline of the paired tests.
        let mut plain_scores: Option<Vec<f64>> = None;
        let stages: Vec<Option<Variant>> = std::iter::once(None)
            .chain(
                Variant::ALL
                    .into_iter()
                    .filter(|v| cfg.variants.contains(v))
                    .map(Some),
            )
            .collect();
        for &variant in &stages {
            let t0 = Instant::now();
            let (role, loss, name, train_cfg, w) = match (variant, &cfg.plain) {
                (None, _) => (
                    Role::Teacher,
                    cfg.teacher_loss.clone(),
                    TEACHER,
                    &cfg.teacher_train,
                    cfg.widths,
                ),
                (Some(Variant::Plain), Some(p)) => (
                    Role::Student,
                    Variant::Plain.loss(&p.loss),
                    Variant::Plain.name(),
                    &p.train,
                    p.widths,
                ),
                (Some(v), _) => (
                    Role::Student,
                    v.loss(&cfg.loss),
                    v.name(),
                    &cfg.train,
                    cfg.widths,
                ),
            };
            let tc = TrainConfig {
                seed,
                ..train_cfg.clone()
            };
            let mc = ModelConfig::new(role, ds.schema(), w.d, w.heads, w.blocks, w.d_cat)?;
            let file = cfg
                .checkpoints
                .as_ref()
                .map(|d| d.join(format!("seed{seed}-{name}.safetensors")));
            let run_config = RunConfig {
                model: w,
                train: tc.clone(),
                loss: loss.clone(),
                precision: be.precision(),
            };
            if let (Some(done), Some(path)) = (finished(name, seed), &file) {
                if done.config != run_config {
                    let diff = resume::differences(
                        &serde_json::to_value(&done.config).unwrap_or_default(),
                        &serde_json::to_value(&run_config).unwrap_or_default(),
                    );
                    return Err(Error::invalid(format!(
                        "ablation: seed {seed} {name} finished earlier with other settings \
                         (earlier → now): {}; resume with the interrupted ablation's settings",
                        diff.join("; ")
                    )));
                }
                let curve =
                    k == 0 && matches!(variant, None | Some(Variant::Plain | Variant::Full));
                // The plain student's scores, where a student of this seed still trains.
                let baseline = variant == Some(Variant::Plain)
                    && stages
                        .iter()
                        .flatten()
                        .any(|v| finished(v.name(), seed).is_none());
                if variant.is_none() || curve || baseline {
                    let model = checkpoint::load(be, path, Some(&mc))?;
                    if curve || baseline {
                        let z = score_rows(be, ds, &model, &test_rows)?;
                        let p: Vec<f64> = z.iter().map(|&z| sigmoid(z)).collect();
                        if baseline {
                            plain_scores = Some(p.clone());
                        }
                        if curve {
                            curves.models.push((name.to_string(), p));
                        }
                    }
                    if variant.is_none() {
                        let sha = crate::data::writer::sha256_hex(
                            &std::fs::read(path).map_err(|e| Error::io(path, e))?,
                        );
                        teacher = Some((model, Some((path.clone(), sha))));
                    }
                }
                runs.push(done.clone());
                continue;
            }
            let mut model = Model::new(be, mc, seed)?;
            let metadata = match &file {
                None => Default::default(),
                Some(_) => TrainingRecord {
                    stage: role,
                    train: tc.clone(),
                    loss: loss.clone(),
                    class_weights: class_weights(n_neg, n_pos, loss.rho, loss.reweight)?,
                    dataset: cfg.data.display().to_string(),
                    train_rows: train_rows.len() as u64,
                    teacher: teacher
                        .as_ref()
                        .and_then(|(_, f)| f.as_ref())
                        .map(|(p, _)| p.display().to_string()),
                    teacher_sha256: teacher
                        .as_ref()
                        .and_then(|(_, f)| f.as_ref())
                        .map(|(_, s)| s.clone()),
                    precision: be.precision(),
                    soft_labels: None,
                    soft_labels_sha256: None,
                }
                .to_metadata()?,
            };
            let opts = RunOptions {
                checkpoint: file.clone(),
                metadata,
                log: None,
                progress: cfg.progress,
                eager: false,
                resume: match (&cfg.resume, &file) {
                    (Some(r), Some(f)) => {
                        let path = resume_path(f);
                        Some(ResumeOptions {
                            resume: r.resume && path.exists(),
                            path,
                            every: r.every,
                        })
                    }
                    _ => None,
                },
            };
            let report = match (&teacher, variant) {
                (_, None) => train(be, ds, &mut model, &Stage::Teacher, &loss, &tc, &opts)?,
                (Some((t, _)), Some(_)) => {
                    if cache.is_none() {
                        let losses: Vec<LossConfig> =
                            stages.iter().flatten().map(|v| v.loss(&cfg.loss)).collect();
                        let (c, outcome) =
                            cache_teacher(be, t, ds, &losses, cfg.train.batch, cfg.teacher_cache)?;
                        if cfg.progress && outcome != CacheOutcome::Off {
                            crate::noteln!("seed {seed}: {outcome}");
                        }
                        cache = Some(c);
                    }
                    let teacher = Teacher {
                        model: t,
                        cache: cache.as_ref().and_then(Option::as_ref),
                    };
                    train(
                        be,
                        ds,
                        &mut model,
                        &Stage::Student(teacher),
                        &loss,
                        &tc,
                        &opts,
                    )?
                }
                (None, Some(_)) => return Err(Error::invalid("ablation: no teacher")),
            };
            let z = score_rows(be, ds, &model, &test_rows)?;
            let p: Vec<f64> = z.iter().map(|&z| sigmoid(z)).collect();
            let vs_plain = match variant {
                None => None,
                Some(Variant::Plain) => {
                    plain_scores = Some(p.clone());
                    None
                }
                Some(_) => {
                    let base = plain_scores.as_ref().ok_or_else(|| {
                        Error::invalid(format!("ablation: seed {seed} has no plain student"))
                    })?;
                    let c = metrics::paired_auc(&p, base, &test_labels)?;
                    Some(VsPlain {
                        diff: c.diff,
                        se: c.se,
                        p: c.p,
                    })
                }
            };
            let result = RunResult {
                variant: name.to_string(),
                seed,
                test_auc: metrics::auc(&p, &test_labels)?,
                test_ks: metrics::ks(&p, &test_labels)?,
                test_log_loss: metrics::log_loss_from_logits(&z, &test_labels)?,
                test_pr_auc: metrics::pr_auc(&p, &test_labels)?,
                best_epoch: report.best.epoch,
                epochs_run: report.history.len(),
                valid_auc: report.history.iter().map(|e| e.valid_auc).collect(),
                seconds: t0.elapsed().as_secs_f64(),
                samples_per_s: report.samples_per_s,
                config: run_config,
                vs_plain,
            };
            on_run(&result)?;
            runs.push(result);
            if k == 0 && matches!(variant, None | Some(Variant::Plain) | Some(Variant::Full)) {
                curves.models.push((name.to_string(), p));
            }
            if variant.is_none() {
                let sha = match &file {
                    Some(f) => Some((
                        f.clone(),
                        crate::data::writer::sha256_hex(
                            &std::fs::read(f).map_err(|e| Error::io(f, e))?,
                        ),
                    )),
                    None => None,
                };
                teacher = Some((model, sha));
            }
        }
    }
    Ok(AblationOutcome { runs, curves })
}

/// Mean and sample standard deviation (n − 1 in the denominator; 0 for a single value).
pub fn mean_std(xs: &[f64]) -> (f64, f64) {
    if xs.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    if xs.len() < 2 {
        return (mean, 0.0);
    }
    let var = xs.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / (n - 1.0);
    (mean, var.sqrt())
}

/// Mean ± std of one metric over seeds, and of its paired difference to the plain student.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricSummary {
    /// Mean over seeds.
    pub mean: f64,
    /// Sample standard deviation over seeds.
    pub std: f64,
    /// Mean of the per-seed difference `variant − plain` (`None` for the teacher).
    pub diff_mean: Option<f64>,
    /// Sample standard deviation of that difference.
    pub diff_std: Option<f64>,
    /// Seeds on which the variant beat plain (difference > 0).
    pub improved: Option<usize>,
}

/// One row of the summary table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VariantSummary {
    /// `teacher` or a [`Variant::name`].
    pub variant: String,
    /// Seeds it was run on.
    pub seeds: usize,
    /// Test AUC.
    pub auc: MetricSummary,
    /// Test KS.
    pub ks: MetricSummary,
    /// Seeds on which the student's test AUC is above / below the plain student's by
    /// DeLong's paired test at p < [`SIGNIFICANCE`] (`None` for the teacher and the plain
    /// student, and where a run has no [`RunResult::vs_plain`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub significant: Option<[usize; 2]>,
    /// Validation AUC of the best epoch (the early-stopping pick, so a little optimistic;
    /// absent in summaries written before it was recorded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub valid_auc: Option<MetricSummary>,
}

/// The summary of `runs`: the teacher, then each variant present, in table order. The
/// paired differences are taken seed by seed against the plain student's run of the same
/// seed; a variant's seed without a plain run is an error.
pub fn summarize(runs: &[RunResult]) -> Result<Vec<VariantSummary>> {
    let plain_of = |seed: u64| {
        runs.iter()
            .find(|r| r.variant == Variant::Plain.name() && r.seed == seed)
    };
    let names = std::iter::once(TEACHER).chain(Variant::ALL.iter().map(|v| v.name()));
    let mut out = Vec::new();
    for name in names {
        let rows: Vec<&RunResult> = runs.iter().filter(|r| r.variant == name).collect();
        if rows.is_empty() {
            continue;
        }
        let metric = |get: fn(&RunResult) -> Result<f64>| -> Result<MetricSummary> {
            let values = rows.iter().map(|r| get(r)).collect::<Result<Vec<f64>>>()?;
            let (mean, std) = mean_std(&values);
            if name == TEACHER {
                return Ok(MetricSummary {
                    mean,
                    std,
                    diff_mean: None,
                    diff_std: None,
                    improved: None,
                });
            }
            let diffs = rows
                .iter()
                .map(|r| {
                    let p = plain_of(r.seed).ok_or_else(|| {
                        Error::invalid(format!("seed {} has no plain student", r.seed))
                    })?;
                    Ok(get(r)? - get(p)?)
                })
                .collect::<Result<Vec<f64>>>()?;
            let (dm, ds) = mean_std(&diffs);
            Ok(MetricSummary {
                mean,
                std,
                diff_mean: Some(dm),
                diff_std: Some(ds),
                improved: Some(diffs.iter().filter(|&&d| d > 0.0).count()),
            })
        };
        // `rows` is not empty, so `None` here means a run without a test.
        let tests: Option<Vec<VsPlain>> = rows.iter().map(|r| r.vs_plain).collect();
        let significant = tests.map(|t| {
            let count = |above: bool| {
                t.iter()
                    .filter(|c| c.p < SIGNIFICANCE && (c.diff > 0.0) == above)
                    .count()
            };
            [count(true), count(false)]
        });
        out.push(VariantSummary {
            variant: name.to_string(),
            seeds: rows.len(),
            auc: metric(|r| Ok(r.test_auc))?,
            ks: metric(|r| Ok(r.test_ks))?,
            significant,
            valid_auc: Some(metric(RunResult::best_valid_auc)?),
        });
    }
    Ok(out)
}
