//! Random search of the student stage's settings on the **validation** split
//! (`mgkd-train tune`; docs/train.md, "Tuning").
//!
//! A trial draws the shared settings (width d, learning rate, epochs, re-weighting exponent
//! ρ) and the distillation coefficients (α, β, γ, δ, τ) from the [`SearchSpace`], by a
//! generator keyed by the search seed and the trial's number (so trial k is the same draw
//! whatever ran before it), and trains, for each seed, the plain student with the shared
//! settings and the full MGKD student with all of them, under the same teacher (one per width
//! and seed, trained once with the base settings and kept as a checkpoint) on the same
//! batches. Its score is each student's best validation AUC (early stopping on the valid
//! split picks the epoch); the paired gain is full − plain seed by seed. Nothing here reads
//! the test split.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::backend::{Backend, Precision};
use crate::data::Dataset;
use crate::loss::LossConfig;
use crate::model::config::Widths;
use crate::model::{checkpoint, Model, ModelConfig, Role, Teacher, TeacherCache};
use crate::train::ablation::{mean_std, Variant};
use crate::train::{cache_teacher, train, RunOptions, Stage, TrainConfig, TrainingRecord};
use crate::{Error, Result};

/// A closed interval searched uniformly, on a log scale when `log`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Range {
    /// Lower end.
    pub lo: f64,
    /// Upper end.
    pub hi: f64,
    /// Draw `exp(U(ln lo, ln hi))` instead of `U(lo, hi)`.
    pub log: bool,
}

impl Range {
    fn draw(&self, rng: &mut ChaCha8Rng) -> f64 {
        let u: f64 = rng.gen();
        if self.log {
            (self.lo.ln() + u * (self.hi.ln() - self.lo.ln())).exp()
        } else {
            self.lo + u * (self.hi - self.lo)
        }
    }

    fn check(&self, what: &str, min: f64, max: f64) -> Result<()> {
        let ok = self.lo.is_finite()
            && self.hi.is_finite()
            && self.lo <= self.hi
            && self.lo >= min
            && self.hi <= max
            && (!self.log || self.lo > 0.0);
        if ok {
            Ok(())
        } else {
            Err(Error::invalid(format!(
                "tune: the {what} range [{}, {}] must lie in [{min}, {max}], low end first{}",
                self.lo,
                self.hi,
                if self.log { ", above 0" } else { "" }
            )))
        }
    }
}

/// What a trial draws from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SearchSpace {
    /// Widths d, one drawn uniformly.
    pub widths: Vec<usize>,
    /// Peak learning rate (log scale).
    pub lr: Range,
    /// Maximum epochs, drawn uniformly from `lo..=hi` (early stopping may end a run sooner).
    pub epochs: (usize, usize),
    /// ρ, the class re-weighting exponent.
    pub rho: Range,
    /// α, weight of L_soft (log scale).
    pub alpha: Range,
    /// β, weight of L_coarse (log scale).
    pub beta: Range,
    /// γ, weight of L_fine (log scale).
    pub gamma: Range,
    /// δ, weight of L_self (log scale).
    pub delta: Range,
    /// τ, the temperature.
    pub tau: Range,
}

impl Default for SearchSpace {
    /// Widths 16 and 32, lr 3e-4–3e-3, 4–16 epochs, ρ 0–1, α 0.25–8, β, γ and δ 0.01–1,
    /// τ 1–4: around the shipped synthetic setting (docs/results.md).
    fn default() -> Self {
        let log = |lo, hi| Range { lo, hi, log: true };
        SearchSpace {
            widths: vec![16, 32],
            lr: log(3e-4, 3e-3),
            epochs: (4, 16),
            rho: Range {
                lo: 0.0,
                hi: 1.0,
                log: false,
            },
            alpha: log(0.25, 8.0),
            beta: log(0.01, 1.0),
            gamma: log(0.01, 1.0),
            delta: log(0.01, 1.0),
            tau: Range {
                lo: 1.0,
                hi: 4.0,
                log: false,
            },
        }
    }
}

/// One trial's settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrialParams {
    /// Width d.
    pub d: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Maximum epochs.
    pub epochs: usize,
    /// ρ.
    pub rho: f64,
    /// α.
    pub alpha: f64,
    /// β.
    pub beta: f64,
    /// γ.
    pub gamma: f64,
    /// δ.
    pub delta: f64,
    /// τ.
    pub tau: f64,
}

impl SearchSpace {
    /// Checks the ranges (positive learning rate and coefficients, ρ in [0, 1], τ > 0, at
    /// least one width, 1 ≤ epochs).
    pub fn validate(&self) -> Result<()> {
        if self.widths.is_empty() {
            return Err(Error::invalid("tune: at least one width is needed"));
        }
        let (e0, e1) = self.epochs;
        if e0 == 0 || e0 > e1 || e1 > crate::train::MAX_EPOCHS {
            return Err(Error::invalid(format!(
                "tune: the epochs range {e0}–{e1} must lie in 1–{}, low end first",
                crate::train::MAX_EPOCHS
            )));
        }
        self.lr.check("learning-rate", 1e-7, 1.0)?;
        self.rho.check("ρ", 0.0, 1.0)?;
        for (what, r) in [
            ("α", self.alpha),
            ("β", self.beta),
            ("γ", self.gamma),
            ("δ", self.delta),
        ] {
            r.check(what, 0.0, 1e3)?;
        }
        self.tau.check("τ", 1e-3, 1e3)
    }

    /// Trial `trial`'s draw under `search_seed` (independent of every other trial's).
    pub fn draw(&self, search_seed: u64, trial: u64) -> TrialParams {
        let mut rng = ChaCha8Rng::seed_from_u64(search_seed);
        rng.set_stream(trial);
        let d = self.widths[rng.gen_range(0..self.widths.len())];
        TrialParams {
            d,
            lr: self.lr.draw(&mut rng),
            epochs: rng.gen_range(self.epochs.0..=self.epochs.1),
            rho: self.rho.draw(&mut rng),
            alpha: self.alpha.draw(&mut rng),
            beta: self.beta.draw(&mut rng),
            gamma: self.gamma.draw(&mut rng),
            delta: self.delta.draw(&mut rng),
            tau: self.tau.draw(&mut rng),
        }
    }
}

/// One finished trial (one line of `trials.jsonl`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrialResult {
    /// Trial number.
    pub trial: u64,
    /// Its settings.
    pub params: TrialParams,
    /// The seeds, in order.
    pub seeds: Vec<u64>,
    /// Best validation AUC of the plain student, per seed.
    pub plain_valid_auc: Vec<f64>,
    /// Best validation AUC of the full student, per seed.
    pub full_valid_auc: Vec<f64>,
    /// Epoch of the plain student's best validation AUC, per seed.
    pub plain_best_epoch: Vec<usize>,
    /// Epoch of the full student's best validation AUC, per seed.
    pub full_best_epoch: Vec<usize>,
    /// Seconds the trial took.
    pub seconds: f64,
    /// Storage type of the activations (absent in trials written before the precision
    /// scheme, which ran in f32).
    #[serde(default)]
    pub precision: Precision,
}

impl TrialResult {
    /// Mean over seeds of the plain student's best validation AUC.
    pub fn plain_mean(&self) -> f64 {
        mean_std(&self.plain_valid_auc).0
    }
    /// Mean over seeds of the full student's best validation AUC.
    pub fn full_mean(&self) -> f64 {
        mean_std(&self.full_valid_auc).0
    }
    /// Paired gain full − plain per seed.
    pub fn gains(&self) -> Vec<f64> {
        self.full_valid_auc
            .iter()
            .zip(&self.plain_valid_auc)
            .map(|(f, p)| f - p)
            .collect()
    }
}

/// Settings of a search.
#[derive(Debug, Clone)]
pub struct TuneConfig {
    /// What trials draw from.
    pub space: SearchSpace,
    /// Trials to run (numbers `0..trials`).
    pub trials: u64,
    /// Start no trial after this much time (finished trials of an earlier run excluded).
    pub time: Option<Duration>,
    /// Seeds of every trial (initialisation and batch order; one teacher per width and seed).
    pub seeds: Vec<u64>,
    /// Seed of the draws.
    pub search_seed: u64,
    /// Heads, blocks and d_cat of every model (d is drawn).
    pub widths: Widths,
    /// The students' other optimisation settings (batch, patience, bucketing, warm-up,
    /// weight decay, clipping; lr, epochs and seed are set per trial).
    pub train: TrainConfig,
    /// Base loss settings (the students' switches and `coarse_cosine`; the coefficients and
    /// ρ are drawn).
    pub loss: LossConfig,
    /// The teachers' optimisation settings (with each seed); the same in every trial.
    pub teacher_train: TrainConfig,
    /// The teachers' loss settings (the teacher stage reads `rho` and `reweight`).
    pub teacher_loss: LossConfig,
    /// Where the teachers' checkpoints are kept (`d{d}-seed{s}.safetensors`, `…-bf16.safetensors` for
    /// a bf16 run's).
    pub teachers: PathBuf,
    /// The dataset directory as given (recorded in the teachers' checkpoints).
    pub data: PathBuf,
    /// Memory budget in bytes of each teacher's output cache.
    pub teacher_cache: u64,
    /// Progress bars.
    pub progress: bool,
}

/// The trial's student settings for `variant`: the base with the trial's draw.
pub fn student_settings(
    cfg: &TuneConfig,
    p: &TrialParams,
    seed: u64,
    variant: Variant,
) -> (TrainConfig, LossConfig) {
    let train = TrainConfig {
        lr: p.lr,
        epochs: p.epochs,
        seed,
        ..cfg.train.clone()
    };
    let drawn = LossConfig {
        alpha: p.alpha,
        beta: p.beta,
        gamma: p.gamma,
        delta: p.delta,
        tau: p.tau,
        rho: p.rho,
        ..cfg.loss.clone()
    };
    (train, variant.loss(&drawn))
}

/// A teacher of one width and seed, with its output cache.
type Kept<B> = (Model<B>, Option<TeacherCache<B>>);

/// Runs the search on `ds`: trials `0..cfg.trials` in order, skipping those in `finished`
/// (which must match this search's draws and seeds) and starting none after `cfg.time`;
/// `on_trial` sees each new trial as it finishes. Returns every finished trial, in order.
pub fn run_tune<B: Backend>(
    be: &B,
    ds: &Dataset,
    cfg: &TuneConfig,
    finished: &[TrialResult],
    mut on_trial: impl FnMut(&TrialResult) -> Result<()>,
) -> Result<Vec<TrialResult>> {
    cfg.space.validate()?;
    if cfg.seeds.is_empty() || cfg.trials == 0 {
        return Err(Error::invalid(
            "tune: at least one seed and one trial are needed",
        ));
    }
    for w in &cfg.space.widths {
        ModelConfig::new(
            Role::Student,
            ds.schema(),
            *w,
            cfg.widths.heads,
            cfg.widths.blocks,
            cfg.widths.d_cat,
        )?;
    }
    for f in finished {
        if f.params != cfg.space.draw(cfg.search_seed, f.trial) || f.seeds != cfg.seeds {
            return Err(Error::invalid(format!(
                "tune: trial {} finished earlier under another search (search seed, space or \
                 seeds differ); resume with the interrupted search's settings",
                f.trial
            )));
        }
        if f.precision != be.precision() {
            return Err(Error::invalid(format!(
                "tune: trial {} finished earlier in {}, this run is in {}; resume with \
                 --precision {}",
                f.trial,
                f.precision,
                be.precision(),
                f.precision
            )));
        }
    }
    let start = Instant::now();
    let mut teachers: HashMap<(usize, u64), Kept<B>> = HashMap::new();
    let mut out = Vec::new();
    for trial in 0..cfg.trials {
        if let Some(done) = finished.iter().find(|f| f.trial == trial) {
            out.push(done.clone());
            continue;
        }
        if cfg.time.is_some_and(|t| start.elapsed() >= t) {
            break;
        }
        let t0 = Instant::now();
        let p = cfg.space.draw(cfg.search_seed, trial);
        let mut r = TrialResult {
            trial,
            params: p.clone(),
            seeds: cfg.seeds.clone(),
            plain_valid_auc: Vec::new(),
            full_valid_auc: Vec::new(),
            plain_best_epoch: Vec::new(),
            full_best_epoch: Vec::new(),
            seconds: 0.0,
            precision: be.precision(),
        };
        for &seed in &cfg.seeds {
            let (model, cache) = match teachers.entry((p.d, seed)) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => {
                    e.insert(teacher(be, ds, cfg, p.d, seed)?)
                }
            };
            let (model, cache) = (&*model, &*cache);
            let mc = ModelConfig::new(
                Role::Student,
                ds.schema(),
                p.d,
                cfg.widths.heads,
                cfg.widths.blocks,
                cfg.widths.d_cat,
            )?;
            for variant in [Variant::Plain, Variant::Full] {
                let (tc, loss) = student_settings(cfg, &p, seed, variant);
                let mut student = Model::new(be, mc.clone(), seed)?;
                let stage = Stage::Student(Teacher {
                    model,
                    cache: cache.as_ref(),
                });
                let opts = RunOptions {
                    progress: cfg.progress,
                    ..RunOptions::default()
                };
                let rep = train(be, ds, &mut student, &stage, &loss, &tc, &opts)?;
                let (aucs, epochs) = match variant {
                    Variant::Plain => (&mut r.plain_valid_auc, &mut r.plain_best_epoch),
                    _ => (&mut r.full_valid_auc, &mut r.full_best_epoch),
                };
                aucs.push(rep.best.valid_auc);
                epochs.push(rep.best.epoch);
            }
        }
        r.seconds = t0.elapsed().as_secs_f64();
        on_trial(&r)?;
        out.push(r);
    }
    Ok(out)
}

/// The teacher of width `d` and `seed`: read from its checkpoint under `cfg.teachers` when
/// an earlier search finished it (one trained with other teacher settings is an error), else
/// trained with `cfg.teacher_train` and `cfg.teacher_loss` (to a temporary file,
/// renamed when training ends, so that an interrupted one is trained again); with the cache
/// of its outputs for the full student.
fn teacher<B: Backend>(
    be: &B,
    ds: &Dataset,
    cfg: &TuneConfig,
    d: usize,
    seed: u64,
) -> Result<Kept<B>> {
    let w = &cfg.widths;
    let mc = ModelConfig::new(Role::Teacher, ds.schema(), d, w.heads, w.blocks, w.d_cat)?;
    // A teacher trained in one precision is not reused by a tuning run in another.
    let tag = match be.precision() {
        Precision::F32 => String::new(),
        p => format!("-{p}"),
    };
    let path = cfg
        .teachers
        .join(format!("d{d}-seed{seed}{tag}.safetensors"));
    let tc = TrainConfig {
        seed,
        ..cfg.teacher_train.clone()
    };
    let model = if path.exists() {
        checkpoint::check_config(&path, &mc)?;
        let kept = checkpoint::read(&path)?;
        check_teacher_settings(&path, &kept.metadata, &tc, &cfg.teacher_loss)?;
        kept.into_model(be)?
    } else {
        let record = TrainingRecord::of_run(
            ds,
            &cfg.data,
            Role::Teacher,
            &tc,
            &cfg.teacher_loss,
            None,
            be.precision(),
        )?;
        let partial = path.with_extension("partial.safetensors");
        let opts = RunOptions {
            checkpoint: Some(partial.clone()),
            metadata: record.to_metadata()?,
            progress: cfg.progress,
            ..RunOptions::default()
        };
        let mut model = Model::new(be, mc, seed)?;
        train(
            be,
            ds,
            &mut model,
            &Stage::Teacher,
            &cfg.teacher_loss,
            &tc,
            &opts,
        )?;
        std::fs::rename(&partial, &path).map_err(|e| Error::io(&path, e))?;
        model
    };
    let full = Variant::Full.loss(&cfg.loss);
    let (cache, _) = cache_teacher(be, &model, ds, [&full], cfg.train.batch, cfg.teacher_cache)?;
    Ok((model, cache))
}

/// Checks that the kept teacher at `path` (its checkpoint `metadata`) was trained with `train`
/// and with `loss`'s class weighting (ρ, re-weighting), as its training record says; an error
/// lists what differs.
fn check_teacher_settings(
    path: &Path,
    metadata: &BTreeMap<String, String>,
    train: &TrainConfig,
    loss: &LossConfig,
) -> Result<()> {
    let record = TrainingRecord::from_metadata(path, metadata)?
        .ok_or_else(|| Error::format(path, "no training record: not a teacher of a search"))?;
    let settings = |t: &TrainConfig, l: &LossConfig| serde_json::json!({ "train": t, "rho": l.rho, "reweight": l.reweight });
    let diff = crate::train::resume::differences(
        &settings(&record.train, &record.loss),
        &settings(train, loss),
    );
    if diff.is_empty() {
        return Ok(());
    }
    Err(Error::format(
        path,
        format!(
            "this teacher was trained with other settings than this search's teachers \
             (kept → now): {}; resume with the earlier settings, or choose another --out",
            diff.join("; ")
        ),
    ))
}
