//! The training loop of docs/model.md §6, generic over the backend: epochs of (optionally
//! length-bucketed) batches over the train split, AdamW with global-norm clipping under the
//! warm-up + cosine schedule, validation AUC/KS after every epoch, early stopping on
//! validation AUC, the best parameters kept (and written atomically as a checkpoint), a
//! progress bar and one JSONL log line per epoch.

use std::collections::BTreeMap;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::{Deserialize, Serialize};

use crate::backend::{Backend, Float};
use crate::backend::{Mut, Ref};
use crate::data::Dataset;
use crate::dist::{batch_part, owned_rows, BatchShare, Comm};
use crate::loss::{
    class_weights, student_objective_queued, teacher_objective_queued, LossConfig, StudentSlots,
};
use crate::metrics;
use crate::model::{checkpoint, DeviceBatch, Model, Role, Teacher};
use crate::optim::{AdamWConfig, Optimizer};
use crate::train::batching::{cost_key, epoch_batches, kept_lengths};
use crate::train::pipeline::Pipeline;
use crate::train::resume::{self, EpochSums, Every, Progress, ResumeOptions, Snapshot};
use crate::train::schedule::lr_at;
use crate::{Error, Result};

/// Checkpoint metadata key holding the [`BestEpoch`] JSON (validation metrics of the kept
/// parameters).
pub const KEY_BEST: &str = "mgkd.best";

/// Most epochs (and the largest patience) a run accepts.
pub const MAX_EPOCHS: usize = 10_000;
/// Largest batch (rows per step).
pub const MAX_BATCH: usize = 65_536;

/// Training steps whose loss terms are read back from the device at once (the progress bar
/// and the divergence check follow at that interval; a step itself never waits).
pub const LOG_INTERVAL: usize = 25;

/// Rows per forward batch when scoring (validation, `eval`, `predict`).
pub const SCORE_BATCH: usize = 512;

/// Split ids.
pub const TRAIN: u8 = 0;
/// Validation split id.
pub const VALID: u8 = 1;
/// Test split id.
pub const TEST: u8 = 2;

/// Hyper-parameters of the optimisation (the defaults of docs/model.md §6.1 and §6.4).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Maximum number of epochs over the train split.
    pub epochs: usize,
    /// Rows per training batch.
    pub batch: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Seed of the initialisation, the row shuffle and the batch order.
    pub seed: u64,
    /// Early stopping: stop after this many validations without a better AUC.
    pub patience: usize,
    /// Length-bucketed batching (see [`crate::train::batching`]).
    pub bucket: bool,
    /// Share of the planned steps spent in linear warm-up.
    pub warmup: f64,
    /// AdamW decoupled weight decay on linear weights.
    pub weight_decay: f64,
    /// Global-norm gradient clipping threshold.
    pub clip: f64,
}

impl Default for TrainConfig {
    /// 20 epochs, batch 256, lr 1e-3, seed 0, patience 8, bucketing on, 5 % warm-up, weight
    /// decay 0.01, clipping at 1.0.
    fn default() -> Self {
        TrainConfig {
            epochs: 20,
            batch: 256,
            lr: 1e-3,
            seed: 0,
            patience: 8,
            bucket: true,
            warmup: 0.05,
            weight_decay: 0.01,
            clip: 1.0,
        }
    }
}

impl TrainConfig {
    /// Checks the values: epochs and patience in 1..=[`MAX_EPOCHS`], batch in
    /// 1..=[`MAX_BATCH`], lr finite and > 0, warm-up share
    /// in [0, 1], weight decay finite and ≥ 0, clip finite and > 0.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::invalid(format!("training config: {m}")));
        if self.epochs == 0 || self.epochs > MAX_EPOCHS {
            return bad(format!(
                "epochs = {} must be 1 to {MAX_EPOCHS}",
                self.epochs
            ));
        }
        if self.batch == 0 || self.batch > MAX_BATCH {
            return bad(format!("batch = {} must be 1 to {MAX_BATCH}", self.batch));
        }
        if self.patience == 0 || self.patience > MAX_EPOCHS {
            return bad(format!(
                "patience = {} must be 1 to {MAX_EPOCHS}",
                self.patience
            ));
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad(format!("lr = {} must be > 0", self.lr));
        }
        if !(0.0..=1.0).contains(&self.warmup) {
            return bad(format!("warmup = {} must be in [0, 1]", self.warmup));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad(format!("weight_decay = {} must be ≥ 0", self.weight_decay));
        }
        if !(self.clip.is_finite() && self.clip > 0.0) {
            return bad(format!("clip = {} must be > 0", self.clip));
        }
        Ok(())
    }
}

/// What a training run optimises.
pub enum Stage<'a, B: Backend> {
    /// Teacher stage: `L_T`, weighted BCE of the teacher (class weights from the loss
    /// config's `rho` and `reweight`).
    Teacher,
    /// Student stage: the full student objective with the loss config under the frozen
    /// teacher (run forward on every batch, or read from its cache).
    Student(Teacher<'a, B>),
}

impl<B: Backend> Stage<'_, B> {
    fn role(&self) -> Role {
        match self {
            Stage::Teacher => Role::Teacher,
            Stage::Student(_) => Role::Student,
        }
    }
}

/// Side effects of a run: where the best checkpoint and the log go, whether to draw a
/// progress bar.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Write the best parameters here (atomically) whenever validation AUC improves.
    pub checkpoint: Option<PathBuf>,
    /// Extra checkpoint metadata (the [`KEY_BEST`] key is added by the trainer).
    pub metadata: BTreeMap<String, String>,
    /// Write one JSON line per epoch here (truncated first by a fresh run; a resumed run
    /// appends).
    pub log: Option<PathBuf>,
    /// Draw a progress bar on stderr.
    pub progress: bool,
    /// Queue every step op by op. Otherwise, where the backend records graphs (CUDA), each
    /// batch shape's step is recorded once and replayed ([`StepGraphs`]): the same kernels
    /// on the same shapes, so the same results, without the per-launch host overhead.
    pub eager: bool,
    /// Resume checkpoints: where, how often, and whether to continue from one.
    pub resume: Option<ResumeOptions>,
}

/// Per-epoch mean of each student-stage term (terms off or absent are `None`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TermMeans {
    /// L_hard.
    pub hard: Option<f64>,
    /// L_soft.
    pub soft: Option<f64>,
    /// L_coarse.
    pub coarse: Option<f64>,
    /// L_fine.
    pub fine: Option<f64>,
    /// L_self.
    #[serde(rename = "self")]
    pub self_distill: Option<f64>,
}

/// One epoch: training loss, validation metrics, speed (one JSONL log line).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochLog {
    /// `teacher` or `student`.
    pub stage: String,
    /// 1-based epoch.
    pub epoch: usize,
    /// Optimizer steps taken so far.
    pub step: u64,
    /// Learning rate of the epoch's last step.
    pub lr: f64,
    /// Mean training loss over the epoch's batches (weighted by rows).
    pub train_loss: f64,
    /// Per-term means (student stage).
    pub terms: Option<TermMeans>,
    /// Validation AUC.
    pub valid_auc: f64,
    /// Validation KS.
    pub valid_ks: f64,
    /// Validation log-loss.
    pub valid_log_loss: f64,
    /// Training throughput, rows per second (training steps only).
    pub samples_per_s: f64,
    /// Seconds spent training this epoch.
    pub train_seconds: f64,
    /// Of `train_seconds`, the seconds the steps waited for their data (the batches are
    /// gathered on a background thread: see [`crate::train::pipeline`]); ≈ 0 when the
    /// gathering keeps up.
    #[serde(default)]
    pub data_seconds: f64,
    /// Seconds the background thread spent gathering and staging this epoch's batches
    /// (overlapped with the steps).
    #[serde(default)]
    pub gather_seconds: f64,
    /// Seconds spent on validation.
    pub valid_seconds: f64,
    /// Share of padded slots among the sequence slots the batches carried (the sequence the
    /// stage's cost key weighs most: in-service for both stages).
    pub padding: f64,
    /// Whether this epoch is the best so far (its parameters were kept).
    pub best: bool,
}

/// Validation metrics of the kept parameters (stored in the checkpoint under [`KEY_BEST`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BestEpoch {
    /// 1-based epoch.
    pub epoch: usize,
    /// Validation AUC.
    pub valid_auc: f64,
    /// Validation KS.
    pub valid_ks: f64,
    /// Validation log-loss.
    pub valid_log_loss: f64,
}

/// The outcome of a run.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainReport {
    /// One entry per epoch run.
    pub history: Vec<EpochLog>,
    /// The best epoch (its parameters are in the model after [`train`] returns).
    pub best: BestEpoch,
    /// Whether early stopping ended the run before the last epoch.
    pub stopped_early: bool,
    /// Rows per second over all training steps.
    pub samples_per_s: f64,
    /// Wall-clock seconds of the whole run.
    pub seconds: f64,
    /// Batch shapes whose step was recorded as a graph and replayed (0 where the backend
    /// runs work as it is queued, or with [`RunOptions::eager`]).
    pub graphs: usize,
}

/// Labels of `rows`; an error naming `what` when the dataset has none.
pub fn labels_of(ds: &Dataset, rows: &[u64], what: &str) -> Result<Vec<u8>> {
    if !ds.manifest().has_label {
        return Err(Error::invalid(format!(
            "{what} needs labels, and the dataset {} has none",
            ds.dir().display()
        )));
    }
    rows.iter()
        .map(|&r| {
            ds.label(r)?
                .ok_or_else(|| Error::format(ds.dir(), format!("row {r} has no label")))
        })
        .collect()
}

/// Logits of `model` on `rows` (returned in the order of `rows`). Rows are scored in
/// batches of [`SCORE_BATCH`] sorted by the model's sequence length (less padding); each
/// row's logit does not depend on its batch-mates. A logit that is not finite is an error
/// naming the row.
pub fn score_rows<B: Backend>(
    be: &B,
    ds: &Dataset,
    model: &Model<B>,
    rows: &[u64],
) -> Result<Vec<f64>> {
    let out = logits_of(be, ds, model, rows)?;
    if let Some(i) = out.iter().position(|z| !z.is_finite()) {
        return Err(Error::invalid(format!(
            "the {} produced a non-finite logit for row {}",
            model.config.role, rows[i]
        )));
    }
    Ok(out)
}

/// [`score_rows`] without the check of the logits.
fn logits_of<B: Backend>(be: &B, ds: &Dataset, model: &Model<B>, rows: &[u64]) -> Result<Vec<f64>> {
    let lens = kept_lengths(ds, rows)?;
    let mut idx: Vec<usize> = (0..rows.len()).collect();
    let role = model.config.role;
    idx.sort_by_key(|&i| match role {
        Role::Teacher => lens[i].1,
        Role::Student => lens[i].0,
    });
    let batches: Vec<Vec<u64>> = idx
        .chunks(SCORE_BATCH)
        .map(|chunk| chunk.iter().map(|&i| rows[i]).collect())
        .collect();
    // Logits in the sorted order stay on the device until the end: no wait per batch.
    let mut sorted = be.zeros(rows.len())?;
    let mut pipeline = Pipeline::new(be, ds.schema(), SCORE_BATCH.min(rows.len()).max(1))?;
    pipeline.run(be, ds, &batches, None, |k, batch| {
        let fwd = model.infer(be, &batch)?;
        be.copy(
            batch.rows,
            Ref::whole(&fwd.logits),
            Mut::at(&mut sorted, k * SCORE_BATCH),
        );
        Ok(())
    })?;
    let mut out = vec![0.0f64; rows.len()];
    for (&i, z) in idx.iter().zip(be.download(&sorted)?) {
        out[i] = Float::to_f64(z);
    }
    Ok(out)
}

/// `σ(z)`, computed without overflow.
pub fn sigmoid(z: f64) -> f64 {
    if z >= 0.0 {
        1.0 / (1.0 + (-z).exp())
    } else {
        let e = z.exp();
        e / (1.0 + e)
    }
}

/// Validation metrics of one epoch.
struct Validation {
    auc: f64,
    ks: f64,
    log_loss: f64,
    /// The probability every row got, when they all got the same one (a collapsed model).
    constant: Option<f64>,
}

/// AUC, KS and log-loss of `model` on `rows` with `labels`, and whether every score is the
/// same; a logit that is not finite is an [`Error::Diverged`] naming the row. In a
/// data-parallel job (`dp`: the job, and the positions in `rows` each rank owns, from
/// [`owned_rows`]) each rank scores its own rows and the logits are gathered in `rows`'
/// order, so every rank computes the metrics of the whole split.
fn validate<B: Backend>(
    be: &B,
    ds: &Dataset,
    model: &Model<B>,
    rows: &[u64],
    labels: &[u8],
    dp: Option<(&Comm, &[Vec<usize>])>,
) -> Result<Validation> {
    let z = if let Some((comm, owned)) = dp {
        let mine: Vec<u64> = owned[comm.rank()].iter().map(|&i| rows[i]).collect();
        let local = match mine.is_empty() {
            true => Vec::new(),
            false => logits_of(be, ds, model, &mine)?,
        };
        let parts = comm.all_gather(&local)?;
        let mut z = vec![f64::NAN; rows.len()];
        for (r, (part, owned)) in parts.iter().zip(owned).enumerate() {
            if owned.len() != part.len() {
                return Err(Error::Distributed(format!(
                    "rank {r} scored {} validation rows, it owns {}",
                    part.len(),
                    owned.len()
                )));
            }
            for (&i, &v) in owned.iter().zip(part) {
                z[i] = v;
            }
        }
        z
    } else {
        logits_of(be, ds, model, rows)?
    };
    if let Some(i) = z.iter().position(|z| !z.is_finite()) {
        return Err(Error::Diverged(format!(
            "the logit of validation row {} is {}",
            rows[i], z[i]
        )));
    }
    let p: Vec<f64> = z.iter().map(|&z| sigmoid(z)).collect();
    Ok(Validation {
        auc: metrics::auc(&p, labels)?,
        ks: metrics::ks(&p, labels)?,
        log_loss: metrics::log_loss_from_logits(&z, labels)?,
        constant: p.first().copied().filter(|&p0| p.iter().all(|&x| x == p0)),
    })
}

/// A progress bar of `len` steps on stderr labelled `prefix`, hidden unless `show`.
pub fn progress_bar(show: bool, len: u64, prefix: String) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
    if let Ok(style) =
        ProgressStyle::with_template("{prefix} [{elapsed_precise}] {wide_bar} {pos}/{len} {msg}")
    {
        bar.set_style(style);
    }
    bar.set_prefix(prefix);
    bar
}

/// The objective part of one training step, queued without waiting: zeroes `model`'s
/// gradients, then runs `stage`'s objective forward and backward on `batch`, its terms stored
/// from `out` on (one slot for the teacher, the [`StudentSlots`] layout for a student). With
/// a data-parallel `share` (device `[rows, fine]`), the batch is this rank's part of a
/// global batch and counts for its share ([`crate::dist::BatchShare`]).
#[allow(clippy::too_many_arguments)]
pub fn queue_objective<B: Backend>(
    be: &B,
    stage: &Stage<'_, B>,
    model: &mut Model<B>,
    loss: &LossConfig,
    class_w: [f64; 2],
    share: Option<Ref<B::Buf>>,
    batch: &DeviceBatch<B>,
    out: Mut<B::Buf>,
) -> Result<()> {
    model.params.zero_grads(be);
    match stage {
        Stage::Teacher => teacher_objective_queued(be, class_w, share, model, batch, true, out),
        Stage::Student(teacher) => {
            student_objective_queued(be, loss, class_w, share, *teacher, model, batch, true, out)
        }
    }
}

/// A batch shape: rows and the padded pre- and in-service lengths.
type Shape = (usize, usize, usize);

/// The training steps of one run, recorded as graphs where the backend can (CUDA), one per
/// batch shape: a shape's first step runs op by op (which also sizes the backend's scratch
/// buffers and its activation arena, which a recording must not grow), its second is
/// recorded with its own batch as the graph's input and replayed, and every later one is
/// copied into that input and replayed (recorded again if the arena has grown since, for a
/// larger shape). A replay runs the kernels an eager step would queue, on the same shapes, so the
/// results are the same; only the host's launch work is saved. The optimizer's per-step
/// constants reach a recorded step through a device buffer
/// ([`Optimizer::advance_recorded`]).
struct StepGraphs<'c, B: Backend> {
    /// Whether to record (off with [`RunOptions::eager`], or once the backend declines).
    enabled: bool,
    /// Shapes whose first step has run.
    seen: std::collections::HashSet<Shape>,
    /// Each recorded shape's input batch and graph.
    recorded: std::collections::HashMap<Shape, (DeviceBatch<B>, B::Graph)>,
    /// Where a recorded step writes its loss terms (copied out after each replay).
    terms: B::Buf,
    /// `[lr, 1 − β1^t, 1 − β2^t]` of the current step, read by a recorded step.
    sched: B::Buf,
    /// `Σ g²` of the current step.
    sum_sq: B::Buf,
    /// Data-parallel runs: the job, and this rank's `[rows, fine]` share of the current
    /// global batch (written before each step, read by a recorded one).
    dp: Option<(&'c Comm, B::Buf)>,
}

impl<'c, B: Backend> StepGraphs<'c, B> {
    /// Steps of `width` loss terms, recorded when `enabled`; a joined `comm` makes them
    /// data-parallel (the gradient summed over the ranks before the optimizer; recorded only
    /// where the backend's all-reduce can be).
    fn new(be: &B, enabled: bool, width: usize, comm: &'c Comm) -> Result<Self> {
        let dp = match comm.joined() {
            true => Some((comm, be.zeros(2)?)),
            false => None,
        };
        Ok(StepGraphs {
            enabled: enabled && (dp.is_none() || be.all_reduce_in_graphs(comm)),
            seen: Default::default(),
            recorded: Default::default(),
            terms: be.zeros(width)?,
            sched: be.zeros(3)?,
            sum_sq: be.zeros(1)?,
            dp,
        })
    }

    /// Sets this rank's share of the next step's global batch (data-parallel runs).
    fn set_share(&mut self, be: &B, share: BatchShare) -> Result<()> {
        match &mut self.dp {
            Some((_, buf)) => {
                let f = <B::F as Float>::from_f64;
                be.write(&[f(share.rows), f(share.fine)], Mut::whole(buf))
            }
            None => Ok(()),
        }
    }

    /// Queues one training step on `batch` (objective, backward, clipped AdamW at `lr`),
    /// its `width` loss terms written to `out`; nothing waits for the device.
    #[allow(clippy::too_many_arguments)]
    fn step(
        &mut self,
        be: &B,
        stage: &Stage<'_, B>,
        model: &mut Model<B>,
        loss: &LossConfig,
        class_w: [f64; 2],
        opt: &mut Optimizer,
        lr: f64,
        batch: DeviceBatch<B>,
        out: Mut<B::Buf>,
    ) -> Result<()> {
        let shape = (batch.rows, batch.pre.len, batch.in_service.len);
        let width = be.len(&self.terms);
        if let Some((_, graph)) = self.recorded.get(&shape) {
            if !be.graph_current(graph) {
                // Recorded before the activation arena grew: record it again on the new one,
                // which frees the old.
                self.recorded.remove(&shape);
            }
        }
        if let Some((input, graph)) = self.recorded.get_mut(&shape) {
            input.copy_from(be, &batch)?;
            opt.advance_recorded(be, lr, Mut::whole(&mut self.sched))?;
            be.replay(graph)?;
            be.copy(width, Ref::whole(&self.terms), out);
            return Ok(());
        }
        if self.enabled && !self.seen.insert(shape) {
            let (terms, sched, sum_sq) = (&mut self.terms, &self.sched, &mut self.sum_sq);
            let dp = self.dp.as_ref().map(|(c, b)| (*c, b));
            let recorded = be.capture(&mut || {
                let out = Mut::whole(&mut *terms);
                objective_summed(be, dp, stage, model, loss, class_w, &batch, out)?;
                let sched = Ref::whole(sched);
                opt.apply_recorded(be, &mut model.params, lr, Mut::whole(sum_sq), sched)
            })?;
            match recorded {
                Some(graph) => {
                    opt.advance_recorded(be, lr, Mut::whole(&mut self.sched))?;
                    be.replay(&graph)?;
                    be.copy(width, Ref::whole(&self.terms), out);
                    self.recorded.insert(shape, (batch, graph));
                    return Ok(());
                }
                // The backend runs work as it is queued: every step runs op by op.
                None => self.enabled = false,
            }
        }
        let dp = self.dp.as_ref().map(|(c, b)| (*c, b));
        objective_summed(be, dp, stage, model, loss, class_w, &batch, out)?;
        opt.step_queued(be, &mut model.params, lr, Mut::whole(&mut self.sum_sq))
    }
}

/// [`queue_objective`], then, in a data-parallel run (`dp`: the job and this rank's share),
/// the gradient summed over the ranks in one all-reduce of the flat buffer: every rank then
/// holds the gradient of the global batch's objective.
#[allow(clippy::too_many_arguments)]
fn objective_summed<B: Backend>(
    be: &B,
    dp: Option<(&Comm, &B::Buf)>,
    stage: &Stage<'_, B>,
    model: &mut Model<B>,
    loss: &LossConfig,
    class_w: [f64; 2],
    batch: &DeviceBatch<B>,
    out: Mut<B::Buf>,
) -> Result<()> {
    let share = dp.map(|(_, s)| Ref::whole(s));
    queue_objective(be, stage, model, loss, class_w, share, batch, out)?;
    if let Some((comm, _)) = dp {
        let n = be.len(&model.params.grads);
        be.all_reduce_sum(comm, n, Mut::whole(&mut model.params.grads))?;
    }
    Ok(())
}

/// Trains `model` on `ds`'s train split for `stage`, validating on the valid split after
/// every epoch. On return the model holds the parameters of the best validation AUC; with
/// `opts.checkpoint` they were written there (atomically) every time they improved.
///
/// Deterministic for a given `cfg.seed` (and backend): batch order from
/// [`epoch_batches`], reductions in a fixed order.
///
/// With `opts.resume`, a resume checkpoint ([`crate::train::resume`]) is written every
/// [`ResumeOptions::every`](crate::train::resume::ResumeOptions) and at the end of every
/// epoch, and removed when the run completes; with its `resume` flag the run continues from
/// it (settings that differ are refused, naming each difference) and ends with the
/// parameters an uninterrupted run would have. The log is then appended to, after dropping
/// any line written past the resume checkpoint (an epoch it does not include, which runs
/// again).
///
/// A run that diverges stops with [`Error::Diverged`], leaving the checkpoint of its best
/// epoch as it was (and removing its resume checkpoint, from which it would diverge again):
/// a training loss that is not finite or exceeds [`EXPLODE`] times the first one read back,
/// a gradient that is not finite (reported by the backend as [`Error::Diverged`]: the CPU
/// at the step, CUDA at the next read of the losses), or a validation in which every row gets the same score (a model collapsed to a constant:
/// AUC 0.5, KS 0).
pub fn train<B: Backend>(
    be: &B,
    ds: &Dataset,
    model: &mut Model<B>,
    stage: &Stage<'_, B>,
    loss: &LossConfig,
    cfg: &TrainConfig,
    opts: &RunOptions,
) -> Result<TrainReport> {
    train_distributed(be, ds, model, stage, loss, cfg, opts, &Comm::solo())
}

/// [`train`] as one rank of the data-parallel job `comm` (docs/cluster.md; a solo `comm` is
/// [`train`] itself). Every rank draws the same global batches as a single process would
/// and runs its part of each ([`batch_part`]) with its share of the batch's means, the flat
/// gradient is summed over the ranks in one all-reduce, and every rank then takes the same
/// clipped AdamW step (the clipping norm is the global gradient's), so the ranks' parameters
/// stay identical. The logged loss terms are summed over the ranks; validation scores each
/// rank's own rows ([`owned_rows`]) and gathers the scores, so the metrics (and early
/// stopping) are those of the whole split on every rank. Only rank 0 writes: checkpoints,
/// the log, resume checkpoints and the progress bar. `N` ranks with batches of `B` rows give
/// the parameters of one process with batches of `B` rows, to rounding.
#[allow(clippy::too_many_arguments)]
pub fn train_distributed<B: Backend>(
    be: &B,
    ds: &Dataset,
    model: &mut Model<B>,
    stage: &Stage<'_, B>,
    loss: &LossConfig,
    cfg: &TrainConfig,
    opts: &RunOptions,
    comm: &Comm,
) -> Result<TrainReport> {
    let writer = comm.rank() == 0;
    cfg.validate()?;
    loss.validate()?;
    let role = stage.role();
    if model.config.role != role {
        return Err(Error::invalid(format!(
            "the {role} stage cannot train a {}",
            model.config.role
        )));
    }
    if let Stage::Student(t) = stage {
        if t.model.config.schema != *ds.schema() || model.config.schema != *ds.schema() {
            return Err(Error::invalid(
                "teacher, student and dataset must share one schema",
            ));
        }
    }
    for path in opts.checkpoint.iter().chain(&opts.log) {
        let parent = path.parent().filter(|p| !p.as_os_str().is_empty());
        if let Some(dir) = parent.filter(|p| !p.is_dir()) {
            return Err(Error::invalid(format!(
                "{}: the directory {} does not exist",
                path.display(),
                dir.display()
            )));
        }
    }
    let start = Instant::now();
    let train_rows = ds.rows_of_split(TRAIN);
    let valid_rows = ds.rows_of_split(VALID);
    if train_rows.is_empty() {
        return Err(Error::invalid(format!(
            "the dataset {} has no train rows",
            ds.dir().display()
        )));
    }
    let train_labels = labels_of(ds, &train_rows, "training")?;
    let valid_labels = labels_of(ds, &valid_rows, "validation")?;
    // The validation rows each rank scores, in a data-parallel job.
    let valid_owned = comm
        .joined()
        .then(|| owned_rows(ds, &valid_rows, comm.world()));
    let valid_dp = valid_owned.as_deref().map(|o| (comm, o));
    let vpos = valid_labels.iter().filter(|&&y| y == 1).count();
    if vpos == 0 || vpos == valid_labels.len() {
        return Err(Error::invalid(format!(
            "the valid split of {} has {} rows and {vpos} defaults: validation AUC needs both classes",
            ds.dir().display(),
            valid_labels.len()
        )));
    }
    let n_pos = train_labels.iter().filter(|&&y| y == 1).count() as u64;
    let n_neg = train_labels.len() as u64 - n_pos;
    let cw = class_weights(n_neg, n_pos, loss.rho, loss.reweight)?;
    let lens = kept_lengths(ds, &train_rows)?;
    let keys: Option<Vec<u64>> = cfg
        .bucket
        .then(|| lens.iter().map(|&l| cost_key(role, l)).collect());
    let len_of: std::collections::HashMap<u64, (u32, u32)> = train_rows
        .iter()
        .copied()
        .zip(lens.iter().copied())
        .collect();
    let steps_per_epoch = train_rows.len().div_ceil(cfg.batch) as u64;
    let total_steps = steps_per_epoch * cfg.epochs as u64;
    let mut opt = Optimizer::new(AdamWConfig {
        weight_decay: cfg.weight_decay,
        clip: cfg.clip,
        ..AdamWConfig::default()
    });
    let settings = run_settings(model, cfg, loss, &opts.metadata)?;
    let mut run = Progress::fresh();
    let mut best_values: Option<Vec<B::F>> = None;
    let resumed = opts.resume.as_ref().filter(|r| r.resume);
    if let Some(r) = resumed {
        let snap = resume::read::<B::F>(&r.path)?;
        let diff = resume::differences(&snap.run, &settings);
        if !diff.is_empty() {
            return Err(Error::format(
                &r.path,
                format!(
                    "this resume checkpoint is of a run with other settings (checkpoint → \
                     this run): {}; resume with the interrupted run's settings, or remove the \
                     file to start afresh",
                    diff.join("; ")
                ),
            ));
        }
        if snap.values.len() != model.params.table.total() || snap.progress.epoch > cfg.epochs + 1 {
            return Err(Error::format(
                &r.path,
                format!(
                    "{} stored values at epoch {}, for a model whose flat parameter buffer holds {} \
                     trained {} epochs (a resume checkpoint of another model, or of another \
                     version of mgkd)",
                    snap.values.len(),
                    snap.progress.epoch,
                    model.params.table.total(),
                    cfg.epochs
                ),
            ));
        }
        model.params.set_values(be, &snap.values)?;
        model.params.m = be.upload(&snap.m)?;
        model.params.v = be.upload(&snap.v)?;
        opt.step = snap.progress.step;
        best_values = snap.best_values;
        run = snap.progress;
    }
    let mut log = match writer {
        true => open_log(opts.log.as_deref(), resumed.is_some(), run.log_bytes)?,
        false => None,
    };
    let student_slots = match stage {
        Stage::Teacher => None,
        Stage::Student(_) => Some(StudentSlots::new(loss, model)),
    };
    let width = student_slots.as_ref().map_or(1, StudentSlots::len);
    let mut pending = be.zeros(LOG_INTERVAL * width)?;
    let mut steps = StepGraphs::new(be, !opts.eager, width, comm)?;
    let mut pipeline = Pipeline::new(be, ds.schema(), cfg.batch)?;
    let saving = opts.resume.as_ref().map(|r| (r.path.as_path(), r.every));
    let mut last_save = Instant::now();
    let mut last_save_step = opt.step;
    while run.epoch <= cfg.epochs && !run.stopped_early {
        let epoch = run.epoch;
        let batches = epoch_batches(
            &train_rows,
            keys.as_deref(),
            cfg.batch,
            cfg.seed,
            epoch as u64,
        )?;
        let order_sha = saving.map(|_| batch_order_sha256(&batches));
        // This rank's part of each global batch and its share of the batch's means.
        let (local, shares) = match comm.joined() {
            false => (std::borrow::Cow::Borrowed(&batches[..]), Vec::new()),
            true => {
                let with_events = |rows: &[u64]| rows.iter().filter(|r| len_of[r].1 > 0).count();
                let mut local = Vec::with_capacity(batches.len());
                let mut shares = Vec::with_capacity(batches.len());
                for b in &batches {
                    let part = batch_part(b, comm.rank(), comm.world());
                    let mine = if part.stand_in {
                        0
                    } else {
                        with_events(&part.rows)
                    };
                    shares.push(BatchShare::of(&part, b.len(), mine, with_events(b)));
                    local.push(part.rows);
                }
                (std::borrow::Cow::Owned(local), shares)
            }
        };
        let skip = run.batch;
        if skip > 0 && (skip >= batches.len() || run.order_sha256 != order_sha) {
            let path = saving.map_or(Path::new(""), |(p, _)| p);
            return Err(Error::format(
                path,
                format!(
                    "the batches of epoch {epoch} are not those of the interrupted run (the \
                     dataset's train split changed): it cannot be resumed"
                ),
            ));
        }
        let bar = progress_bar(
            opts.progress && writer,
            batches.len() as u64,
            format!("{role} epoch {epoch}/{}", cfg.epochs),
        );
        bar.set_position(skip as u64);
        let t0 = Instant::now();
        let earlier_seconds = run.sums.train_seconds;
        let mut lr = 0.0;
        // Each step's loss terms stay on the device (one row of `pending` per step) and are
        // read once per LOG_INTERVAL steps, so a step never waits for the device.
        let mut pending_rows: Vec<usize> = Vec::with_capacity(LOG_INTERVAL);
        let n_batches = batches.len();
        let cache = match stage {
            Stage::Student(t) => t.index(),
            Stage::Teacher => None,
        };
        let fed = pipeline.run(be, ds, &local[skip..], cache, |k, dev| {
            let bi = skip + k;
            let ids = &batches[bi];
            // Padding as this rank saw it; rows counted over the global batch.
            let mine = &local[bi];
            let max_in = mine.iter().map(|r| len_of[r].1).max().unwrap_or(0);
            run.sums.slots += u64::from(max_in) * mine.len() as u64;
            run.sums.filled += mine.iter().map(|r| u64::from(len_of[r].1)).sum::<u64>();
            if let Some(&share) = shares.get(bi) {
                steps.set_share(be, share)?;
            }
            let row = Mut::at(&mut pending, pending_rows.len() * width);
            lr = lr_at(opt.step + 1, total_steps, cfg.lr, cfg.warmup);
            steps
                .step(be, stage, model, loss, cw, &mut opt, lr, dev, row)
                .map_err(|e| {
                    if_diverged(e, opts, run.best.as_ref(), |_| {
                        format!(
                            "{role} training diverged at epoch {epoch}, step {}: the gradient \
                             is not finite (the step was skipped)",
                            opt.step
                        )
                    })
                })?;
            pending_rows.push(ids.len());
            bar.inc(1);
            let flush = pending_rows.len() == LOG_INTERVAL || bi + 1 == n_batches;
            // A multiple of n steps passed since the last save (the step itself, where every
            // step is checked), or the interval's time.
            let interval_passed = match saving {
                None => false,
                Some((_, Every::Steps(n))) => opt.step / n > last_save_step / n,
                Some((_, Every::Seconds(s))) => last_save.elapsed().as_secs() >= s,
            };
            let save_due = bi + 1 < n_batches
                && match comm.joined() {
                    false => interval_passed,
                    // The flush before a save is collective and the ranks' clocks differ: in a
                    // job rank 0 decides, at the flushes only (a save waits for the next
                    // LOG_INTERVAL boundary after its interval).
                    true => {
                        let due = u8::from(flush && writer && interval_passed);
                        flush && comm.broadcast(&[due])?.first() == Some(&1)
                    }
                };
            if flush || save_due {
                // Each rank holds its share of the terms: their sum is the global batch's.
                if comm.joined() {
                    let n = pending_rows.len() * width;
                    be.all_reduce_sum(comm, n, Mut::whole(&mut pending))?;
                }
                // A device that detects a non-finite gradient norm (CUDA: a fault bit of the
                // step's AdamW) reports it at this first read after it.
                let v: Vec<f64> = be
                    .download(&pending)
                    .map_err(|e| {
                        if_diverged(e, opts, run.best.as_ref(), |m| {
                            format!(
                                "{role} training diverged at epoch {epoch}, by step {}: {m}",
                                opt.step
                            )
                        })
                    })?
                    .iter()
                    .map(|x| x.to_f64())
                    .collect();
                for (k, &rows) in pending_rows.iter().enumerate() {
                    let step_terms = &v[k * width..(k + 1) * width];
                    let value = match &student_slots {
                        None => step_terms[0],
                        Some(ss) => {
                            let l = ss.read(step_terms);
                            run.sums.add_terms(
                                [l.hard, l.soft, l.coarse, l.fine, l.self_distill],
                                rows as f64,
                            );
                            l.total
                        }
                    };
                    let step = opt.step - (pending_rows.len() - 1 - k) as u64;
                    let first = *run.first_loss.get_or_insert(value);
                    if !value.is_finite() || value > EXPLODE * first.abs() {
                        return Err(diverged(
                            opts,
                            run.best.as_ref(),
                            format!(
                                "{role} training diverged at epoch {epoch}, step {step}: loss \
                                 {value} (the first step's was {first}; a loss that is not \
                                 finite or above {EXPLODE}× the first stops the run)"
                            ),
                        ));
                    }
                    run.sums.loss += value * rows as f64;
                    run.sums.rows += rows as u64;
                }
                pending_rows.clear();
                let secs = t0.elapsed().as_secs_f64().max(1e-9);
                bar.set_message(format!(
                    "loss {:.4} · {:.0} samples/s",
                    run.sums.loss / run.sums.rows as f64,
                    run.sums.rows as f64 / (earlier_seconds + secs)
                ));
            }
            if let (true, true, Some((path, _))) = (save_due, writer, saving) {
                run.batch = bi + 1;
                run.step = opt.step;
                run.order_sha256 = order_sha.clone();
                run.sums.train_seconds = earlier_seconds + t0.elapsed().as_secs_f64();
                save_resume(be, path, &settings, &run, model, best_values.as_deref())?;
                last_save = Instant::now();
                last_save_step = opt.step;
            }
            Ok(())
        })?;
        bar.finish_and_clear();
        let train_seconds = earlier_seconds + t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        let val = validate(be, ds, model, &valid_rows, &valid_labels, valid_dp).map_err(|e| {
            if_diverged(e, opts, run.best.as_ref(), |m| {
                format!("{role} training diverged at epoch {epoch}: {m}")
            })
        })?;
        let valid_seconds = t1.elapsed().as_secs_f64();
        if let Some(p) = val.constant {
            return Err(diverged(
                opts,
                run.best.as_ref(),
                format!(
                    "{role} training diverged at epoch {epoch}: every validation row gets the \
                     same score ({p}), so AUC is 0.5 and KS 0 (the model collapsed to a \
                     constant)"
                ),
            ));
        }
        let improved = run.best.as_ref().is_none_or(|b| val.auc > b.valid_auc);
        let sums = &run.sums;
        let rows_done = sums.rows as f64;
        let entry = EpochLog {
            stage: role.to_string(),
            epoch,
            step: opt.step,
            lr,
            train_loss: sums.loss / rows_done,
            terms: matches!(stage, Stage::Student(_)).then(|| sums.term_means()),
            valid_auc: val.auc,
            valid_ks: val.ks,
            valid_log_loss: val.log_loss,
            samples_per_s: rows_done / train_seconds.max(1e-9),
            train_seconds,
            data_seconds: fed.wait_seconds,
            gather_seconds: fed.gather_seconds,
            valid_seconds,
            padding: if sums.slots == 0 {
                0.0
            } else {
                1.0 - sums.filled as f64 / sums.slots as f64
            },
            best: improved,
        };
        if improved {
            run.since_best = 0;
            let b = BestEpoch {
                epoch,
                valid_auc: val.auc,
                valid_ks: val.ks,
                valid_log_loss: val.log_loss,
            };
            if let (true, Some(path)) = (writer, &opts.checkpoint) {
                let mut meta = opts.metadata.clone();
                meta.insert(
                    KEY_BEST.into(),
                    serde_json::to_string(&b)
                        .map_err(|e| Error::invalid(format!("best epoch to JSON: {e}")))?,
                );
                checkpoint::save(be, model, &meta, path)?;
            }
            best_values = Some(be.download(&model.params.values)?);
            run.best = Some(b);
        } else {
            run.since_best += 1;
        }
        if let (Some(f), Some(p)) = (log.as_mut(), &opts.log) {
            let line = serde_json::to_string(&entry)
                .map_err(|e| Error::invalid(format!("log line to JSON: {e}")))?;
            writeln!(f, "{line}").map_err(|e| Error::io(p, e))?;
            f.flush().map_err(|e| Error::io(p, e))?;
            run.log_bytes += line.len() as u64 + 1;
        }
        run.train_seconds += train_seconds;
        run.rows += run.sums.rows;
        run.history.push(entry);
        run.stopped_early = run.since_best >= cfg.patience && epoch < cfg.epochs;
        run.epoch += 1;
        run.batch = 0;
        run.step = opt.step;
        run.order_sha256 = None;
        run.sums = EpochSums::default();
        if let (true, Some((path, _))) = (writer, saving) {
            save_resume(be, path, &settings, &run, model, best_values.as_deref())?;
            last_save = Instant::now();
            last_save_step = opt.step;
        }
    }
    let (Some(best), Some(values)) = (run.best.clone(), best_values) else {
        return Err(Error::invalid("no epoch was run"));
    };
    model.params.set_values(be, &values)?;
    if let (true, Some((path, _))) = (writer, saving) {
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(Error::io(path, e)),
            _ => {}
        }
    }
    Ok(TrainReport {
        history: run.history,
        best,
        stopped_early: run.stopped_early,
        samples_per_s: run.rows as f64 / run.train_seconds.max(1e-9),
        seconds: start.elapsed().as_secs_f64(),
        graphs: steps.recorded.len(),
    })
}

/// A training loss above this multiple of the first one read back stops the run as
/// diverged.
pub const EXPLODE: f64 = 1e3;

/// The settings a resume checkpoint must share with the run that continues it: the model
/// configuration, the training and loss configuration and the checkpoint metadata (the
/// training record: dataset, class weights, teacher and its SHA-256).
fn run_settings<B: Backend>(
    model: &Model<B>,
    cfg: &TrainConfig,
    loss: &LossConfig,
    metadata: &BTreeMap<String, String>,
) -> Result<serde_json::Value> {
    let json = |what: &str, v: serde_json::Result<serde_json::Value>| {
        v.map_err(|e| Error::invalid(format!("{what} to JSON: {e}")))
    };
    Ok(serde_json::Value::Object(serde_json::Map::from_iter([
        (
            "model".to_string(),
            json("model config", serde_json::to_value(&model.config))?,
        ),
        (
            "train".to_string(),
            json("training config", serde_json::to_value(cfg))?,
        ),
        (
            "loss".to_string(),
            json("loss config", serde_json::to_value(loss))?,
        ),
        (
            "metadata".to_string(),
            json("metadata", serde_json::to_value(metadata))?,
        ),
    ])))
}

/// SHA-256 (hex) of an epoch's batch order: each batch's row ids (u64 LE) after its length.
fn batch_order_sha256(batches: &[Vec<u64>]) -> String {
    let mut bytes = Vec::new();
    for b in batches {
        bytes.extend_from_slice(&(b.len() as u64).to_le_bytes());
        for r in b {
            bytes.extend_from_slice(&r.to_le_bytes());
        }
    }
    crate::data::writer::sha256_hex(&bytes)
}

/// Writes the resume checkpoint of the run at `run` to `path`.
fn save_resume<B: Backend>(
    be: &B,
    path: &Path,
    settings: &serde_json::Value,
    run: &Progress,
    model: &Model<B>,
    best_values: Option<&[B::F]>,
) -> Result<()> {
    resume::write(
        path,
        &Snapshot {
            run: settings.clone(),
            progress: run.clone(),
            values: be.download(&model.params.values)?,
            m: be.download(&model.params.m)?,
            v: be.download(&model.params.v)?,
            best_values: best_values.map(<[B::F]>::to_vec),
        },
    )
}

/// Opens the JSONL log: a fresh run truncates it; a resumed one keeps its first `bytes`
/// bytes (the lines its resume checkpoint accounts for) and appends.
fn open_log(path: Option<&Path>, resumed: bool, bytes: u64) -> Result<Option<std::fs::File>> {
    let Some(p) = path else {
        return Ok(None);
    };
    if !resumed {
        return std::fs::File::create(p)
            .map(Some)
            .map_err(|e| Error::io(p, e));
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(p)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Error::invalid(format!(
                "{}: the log of the interrupted run is missing; a resumed run appends to it \
                 (restore it, or give its path with --log)",
                p.display()
            )),
            _ => Error::io(p, e),
        })?;
    let len = f.metadata().map_err(|e| Error::io(p, e))?.len();
    if len < bytes {
        return Err(Error::format(
            p,
            format!(
                "the log holds {len} bytes, fewer than the {bytes} its run's resume checkpoint \
                 accounts for: it was changed after the run stopped"
            ),
        ));
    }
    f.set_len(bytes).map_err(|e| Error::io(p, e))?;
    f.seek(SeekFrom::End(0)).map_err(|e| Error::io(p, e))?;
    Ok(Some(f))
}

/// `e` as [`diverged`] when it is an [`Error::Diverged`] (`what` turns its message into
/// the run's), otherwise `e` itself.
fn if_diverged(
    e: Error,
    opts: &RunOptions,
    best: Option<&BestEpoch>,
    what: impl FnOnce(&str) -> String,
) -> Error {
    match e {
        Error::Diverged(m) => diverged(opts, best, what(&m)),
        e => e,
    }
}

/// The error of a diverged run: `what`, then what was kept. Removes the run's resume
/// checkpoint (resuming would diverge again).
fn diverged(opts: &RunOptions, best: Option<&BestEpoch>, what: String) -> Error {
    if let Some(r) = &opts.resume {
        let _ = std::fs::remove_file(&r.path);
    }
    let kept = match (&opts.checkpoint, best) {
        (Some(p), Some(b)) => format!(
            "; {} keeps epoch {} (valid AUC {:.4}), the best before the divergence",
            p.display(),
            b.epoch,
            b.valid_auc
        ),
        (Some(p), None) => format!(
            "; no epoch validated before it, so nothing was written to {}",
            p.display()
        ),
        (None, _) => String::new(),
    };
    Error::Diverged(format!("{what}{kept}; try a lower learning rate"))
}
