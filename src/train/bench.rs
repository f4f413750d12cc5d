//! The training-step benchmark behind `mgkd-train bench`: the whole student step (teacher
//! forward + student forward/backward with all five losses + clipping + AdamW) and the
//! teacher step, on random batches drawn like the reference configuration (docs/model.md §8), on
//! any backend.
//!
//! Batches: in-service lengths uniform in `1..=L`, pre-service lengths uniform in `1..=Lp`
//! with 10 % of rows empty, 10 % positives, ids uniform in `1..vocab`, numbers standard
//! normal. A pool of [`BenchConfig::pool`] batches is drawn and uploaded before timing, so the
//! step is measured alone; the steps cycle through the pool.
//! - **padded**: every batch padded to the length limits (the shape the PyTorch twin,
//!   `tools/torch_twin.py`, runs);
//! - **bucketed**: the pool's rows sorted by the stage's cost key
//!   ([`crate::train::cost_key`]) and cut into batches, each padded to its own longest row
//!   (what training does).
//!
//! A step queues its work without waiting (loss terms and the gradient norm stay on the
//! device) and ends with [`Backend::synchronize`] for the timing; the median step time gives
//! the padded samples/s, the total time of the timed steps the bucketed one (its batches
//! differ). The loss of the last step is read back and must be finite.

use std::time::Instant;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;
use serde::{Deserialize, Serialize};

use crate::backend::Backend;
use crate::backend::{Float, Mut, Ref};
use crate::data::{Batch, CatField, EventBatch, NumField, Schema};
use crate::loss::{class_weights, LossConfig, StudentSlots};
use crate::model::{DeviceBatch, Model, ModelConfig, Role, Teacher};
use crate::optim::{AdamWConfig, Optimizer};
use crate::train::{cost_key, queue_objective, Stage};
use crate::{Error, Result};

/// Vocabularies of the §8 event categorical fields.
pub const EVENT_VOCABS: [u32; 4] = [64, 1024, 16, 168];
/// Numeric event fields (§8).
pub const EVENT_NUM: usize = 2;
/// Categorical profile fields (§8), each of vocabulary [`PROFILE_VOCAB`].
pub const PROFILE_CAT: usize = 16;
/// Vocabulary of every categorical profile field (§8).
pub const PROFILE_VOCAB: u32 = 100;
/// Numeric profile fields (§8).
pub const PROFILE_NUM: usize = 32;
/// Share of rows with an empty pre-service sequence.
pub const EMPTY_PRE_SHARE: f64 = 0.1;
/// Share of positive (defaulting) rows.
pub const POSITIVE_SHARE: f64 = 0.1;
/// Learning rate of the benchmark's AdamW steps.
const BENCH_LR: f64 = 1e-4;

/// What to benchmark: the model's widths, the length limits and the timing loop.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BenchConfig {
    /// Rows per batch.
    pub batch: usize,
    /// Model width d.
    pub d: usize,
    /// Attention heads.
    pub heads: usize,
    /// Transformer blocks per encoder.
    pub blocks: usize,
    /// Width of each profile embedding.
    pub d_cat: usize,
    /// In-service length limit L.
    pub in_len: usize,
    /// Pre-service length limit Lp.
    pub pre_len: usize,
    /// Timed steps.
    pub steps: usize,
    /// Untimed steps first.
    pub warmup: usize,
    /// Seed of the batches and the initialisation.
    pub seed: u64,
    /// Batches drawn and uploaded before timing.
    pub pool: usize,
}

impl Default for BenchConfig {
    /// The reference configuration of docs/model.md §8: batch 1024, d 128, 4 heads, 2 blocks, d_cat
    /// 16, L 128, Lp 32; 30 timed steps after 5 warm-up steps, seed 0, a pool of 8 batches.
    fn default() -> Self {
        BenchConfig {
            batch: 1024,
            d: 128,
            heads: 4,
            blocks: 2,
            d_cat: 16,
            in_len: 128,
            pre_len: 32,
            steps: 30,
            warmup: 5,
            seed: 0,
            pool: 8,
        }
    }
}

/// Which step is timed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum BenchStage {
    /// Teacher forward (frozen) + student forward/backward with all five losses + AdamW.
    Student,
    /// Teacher forward/backward with its weighted BCE + AdamW.
    Teacher,
}

/// How a step is issued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum BenchMode {
    /// Each step's work queued as the step runs.
    Eager,
    /// Each batch shape's step recorded once as a graph and replayed (CUDA only).
    Graphs,
}

/// How the batches are padded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Batching {
    /// Every batch padded to the length limits.
    Padded,
    /// Rows sorted by the stage's cost key, each batch padded to its longest row.
    Bucketed,
}

/// One measured (stage, batching): the fields `tools/torch_twin.py` writes too.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BenchRow {
    /// `student` or `teacher`.
    pub stage: BenchStage,
    /// `padded` or `bucketed`.
    pub batching: Batching,
    /// How the steps were issued (the twin writes `eager`, `compile`, `graphs`).
    pub mode: BenchMode,
    /// Element type of activations: `f32`.
    pub precision: String,
    /// Median wall time of one step, ms.
    pub ms_per_step: f64,
    /// 10th percentile of the step time, ms.
    pub ms_p10: f64,
    /// 90th percentile of the step time, ms.
    pub ms_p90: f64,
    /// Rows per second: `batch / median` padded, rows over total time bucketed.
    pub samples_per_s: f64,
    /// Analytic GEMM FLOPs of one step at the padded shape ([`step_flops`]); bucketed: the
    /// mean over the timed steps' shapes.
    pub flops_per_step: f64,
    /// `flops_per_step` per second of step time, in TFLOP/s.
    pub tflops: f64,
    /// Peak device memory of the backend's buffers during the timed steps (bytes), where the
    /// backend can tell.
    pub peak_mem_bytes: Option<u64>,
    /// Bytes of the activation arena after the timed steps, where the backend keeps one.
    #[serde(default)]
    pub arena_bytes: Option<u64>,
    /// Buffer requests of the timed steps that the activation arena could not serve (each
    /// an allocation inside a step; 0 in steady state), where the backend keeps one.
    #[serde(default)]
    pub arena_misses: Option<u64>,
    /// Device operations one step queues (kernels, library products, copies, fills), where
    /// the backend counts them: eager, those of the timed steps per step; graphs, those
    /// recorded in a step's graph (the mean over the recorded shapes) plus those queued
    /// around each replay (copying the batch in, the optimizer's constants).
    #[serde(default)]
    pub launches_per_step: Option<f64>,
    /// Share of padded in-service slots over the timed steps.
    pub padding: f64,
    /// Loss of the last step.
    pub loss: f64,
}

/// The §8 schema with length limits `in_len` and `pre_len`.
pub fn reference_schema(in_len: usize, pre_len: usize) -> Schema {
    let num = |i: usize| NumField {
        name: format!("n{i}"),
        mean: 0.0,
        std: 1.0,
        log1p: false,
    };
    let cat = |name: String, vocab: u32| CatField { name, vocab };
    Schema {
        profile_num: (0..PROFILE_NUM).map(num).collect(),
        profile_cat: (0..PROFILE_CAT)
            .map(|i| cat(format!("p{i}"), PROFILE_VOCAB))
            .collect(),
        event_cat: EVENT_VOCABS
            .iter()
            .enumerate()
            .map(|(i, &v)| cat(format!("e{i}"), v))
            .collect(),
        event_num: (0..EVENT_NUM).map(num).collect(),
        pre_len,
        in_len,
    }
}

/// One drawn row before padding.
struct RowDraw {
    label: u8,
    profile_num: Vec<f32>,
    profile_cat: Vec<u32>,
    pre: (usize, Vec<u32>, Vec<f32>),
    in_service: (usize, Vec<u32>, Vec<f32>),
}

/// An id uniform in `1..vocab` (id 0 is reserved; every §8 vocabulary is at least 16).
fn draw_id(rng: &mut ChaCha8Rng, vocab: u32) -> u32 {
    rng.gen_range(1..vocab)
}

fn draw_events(rng: &mut ChaCha8Rng, s: &Schema, len: usize) -> (usize, Vec<u32>, Vec<f32>) {
    let mut cat = Vec::with_capacity(len * s.e_cat());
    for _ in 0..len {
        cat.extend(s.event_cat.iter().map(|f| draw_id(rng, f.vocab)));
    }
    let num = (0..len * s.e_num())
        .map(|_| rng.sample::<f32, _>(StandardNormal))
        .collect();
    (len, cat, num)
}

fn draw_row(rng: &mut ChaCha8Rng, s: &Schema) -> RowDraw {
    let label = u8::from(rng.gen_bool(POSITIVE_SHARE));
    let profile_num = (0..s.f_num())
        .map(|_| rng.sample::<f32, _>(StandardNormal))
        .collect();
    let profile_cat = s
        .profile_cat
        .iter()
        .map(|f| draw_id(rng, f.vocab))
        .collect();
    let pre_len = if rng.gen_bool(EMPTY_PRE_SHARE) {
        0
    } else {
        rng.gen_range(1..=s.pre_len)
    };
    let in_len = rng.gen_range(1..=s.in_len);
    let pre = draw_events(rng, s, pre_len);
    let in_service = draw_events(rng, s, in_len);
    RowDraw {
        label,
        profile_num,
        profile_cat,
        pre,
        in_service,
    }
}

/// Pads the rows' events of one kind to `max_len` slots.
fn pad(s: &Schema, seqs: &[&(usize, Vec<u32>, Vec<f32>)], max_len: usize) -> EventBatch {
    let (ec, ed) = (s.e_cat(), s.e_num());
    let mut cat = vec![0u32; seqs.len() * max_len * ec];
    let mut num = vec![0f32; seqs.len() * max_len * ed];
    for (r, (len, c, n)) in seqs.iter().enumerate() {
        cat[r * max_len * ec..][..len * ec].copy_from_slice(c);
        num[r * max_len * ed..][..len * ed].copy_from_slice(n);
    }
    EventBatch {
        max_len,
        lens: seqs.iter().map(|(l, _, _)| *l as u32).collect(),
        cat,
        num,
    }
}

/// Assembles `rows` into a batch, padded to the limits or to the longest rows.
fn assemble(s: &Schema, rows: &[&RowDraw], padded: bool) -> Batch {
    let pre: Vec<_> = rows.iter().map(|r| &r.pre).collect();
    let ins: Vec<_> = rows.iter().map(|r| &r.in_service).collect();
    let longest = |v: &[&(usize, Vec<u32>, Vec<f32>)]| v.iter().map(|e| e.0).max().unwrap_or(0);
    let (pre_max, in_max) = if padded {
        (s.pre_len, s.in_len)
    } else {
        (longest(&pre), longest(&ins))
    };
    Batch {
        rows: rows.len(),
        row_index: (0..rows.len() as u64).collect(),
        labels: Some(rows.iter().map(|r| r.label).collect()),
        profile_num: rows.iter().flat_map(|r| r.profile_num.clone()).collect(),
        profile_cat: rows.iter().flat_map(|r| r.profile_cat.clone()).collect(),
        pre: pad(s, &pre, pre_max),
        in_service: pad(s, &ins, in_max),
    }
}

/// The pool of batches for `stage` and `batching`, drawn from `cfg.seed`: `cfg.pool` batches
/// of `cfg.batch` rows.
pub fn draw_batches(
    cfg: &BenchConfig,
    stage: BenchStage,
    batching: Batching,
) -> Result<Vec<Batch>> {
    let s = reference_schema(cfg.in_len, cfg.pre_len);
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let rows: Vec<RowDraw> = (0..cfg.pool * cfg.batch)
        .map(|_| draw_row(&mut rng, &s))
        .collect();
    let mut order: Vec<&RowDraw> = rows.iter().collect();
    if batching == Batching::Bucketed {
        let role = match stage {
            BenchStage::Student => Role::Student,
            BenchStage::Teacher => Role::Teacher,
        };
        order.sort_by_key(|r| cost_key(role, (r.pre.0 as u32, r.in_service.0 as u32)));
    }
    let batches: Vec<Batch> = order
        .chunks(cfg.batch)
        .map(|c| assemble(&s, c, batching == Batching::Padded))
        .collect();
    if batches.is_empty() {
        return Err(Error::invalid("bench: the pool holds no batch"));
    }
    Ok(batches)
}

/// Analytic GEMM FLOPs (`2·m·n·k` per product) of one forward of an encoder network over
/// `rows` rows of padded length `len` (docs/model.md §4): the numeric event projection, per block
/// the Q/K/V, output and FFN projections (`24·T·d²`, `T = rows·len`) and the attention products
/// (`4·rows·len²·d`), the profile projection, the fusion and the head.
pub fn network_forward_flops(cfg: &BenchConfig, rows: usize, len: usize) -> f64 {
    let (b, d, l) = (rows as f64, cfg.d as f64, len as f64);
    let t = b * l;
    let profile_in = (PROFILE_NUM + PROFILE_CAT * cfg.d_cat) as f64;
    2.0 * t * d * EVENT_NUM as f64
        + cfg.blocks as f64 * (24.0 * t * d * d + 4.0 * b * l * l * d)
        + 2.0 * b * d * profile_in
        + 2.0 * b * 2.0 * d * d
        + 2.0 * b * d
}

/// Analytic GEMM FLOPs of one step on a batch of `rows` rows padded to `pre_len` / `in_len`:
/// teacher step `3·F_T` (forward, and a backward counted as twice the forward); student step
/// `F_T + 3·F_S`, where `F_S` adds to the student network's forward its auxiliary heads,
/// the coarse projection, the fine projections (q, v on the student tokens, k on the
/// teacher's) and the fine attention products. These are the FLOPs of the model as
/// docs/model.md §5.6 writes it, the formula `tools/torch_twin.py` uses too, so that the two
/// TFLOP/s figures compare the same work; the engine computes the fine term without the key
/// projection of the teacher tokens (queries mapped by `W_kᵀ` instead, §5.6), which runs
/// `6·rows·(in_len − pre_len)·d²` fewer FLOPs than counted here, and its block backward
/// recomputes the FFN's pre-activation (`fc1` again, `8·tokens·d²` per trained block),
/// which runs more.
pub fn step_flops(
    cfg: &BenchConfig,
    stage: BenchStage,
    rows: usize,
    pre_len: usize,
    in_len: usize,
) -> f64 {
    let teacher_fwd = network_forward_flops(cfg, rows, in_len);
    match stage {
        BenchStage::Teacher => 3.0 * teacher_fwd,
        BenchStage::Student => {
            let (b, d, lk) = (rows as f64, cfg.d as f64, in_len as f64);
            let lq = pre_len.max(1) as f64;
            let student_fwd = network_forward_flops(cfg, rows, pre_len.max(1))
                + cfg.blocks.saturating_sub(1) as f64 * 2.0 * b * 2.0 * d
                + 2.0 * b * d * d
                + 2.0 * (2.0 * b * lq * d * d)
                + 2.0 * b * lk * d * d
                + 4.0 * b * lq * lk * d;
            teacher_fwd + 3.0 * student_fwd
        }
    }
}

/// Parameter counts of the teacher and the student at `cfg`'s widths.
pub fn param_counts(cfg: &BenchConfig) -> Result<(usize, usize)> {
    let s = reference_schema(cfg.in_len, cfg.pre_len);
    let count = |role| -> Result<usize> {
        let c = ModelConfig::new(role, &s, cfg.d, cfg.heads, cfg.blocks, cfg.d_cat)?;
        Ok(crate::model::ParamTable::new(&c).count())
    };
    Ok((count(Role::Teacher)?, count(Role::Student)?))
}

/// The `q`-quantile of sorted `v` (nearest rank).
fn quantile(v: &[f64], q: f64) -> f64 {
    let i = ((v.len() - 1) as f64 * q).round() as usize;
    v[i.min(v.len() - 1)]
}

/// The models, optimizer and device scalars of one benchmarked stage.
struct StepState<B: Backend> {
    teacher: Model<B>,
    student: Option<Model<B>>,
    opt: Optimizer,
    loss: LossConfig,
    cw: [f64; 2],
    terms: B::Buf,
    sum_sq: B::Buf,
    sched: B::Buf,
}

impl<B: Backend> StepState<B> {
    /// Queues one whole step on `db` (nothing waits). `recorded`: the optimizer's device half
    /// only, reading lr and the bias corrections from `sched` (what a graph records; the
    /// host half is [`Optimizer::advance_recorded`] before each replay).
    fn queue(&mut self, be: &B, db: &DeviceBatch<B>, recorded: bool) -> Result<()> {
        let out = Mut::whole(&mut self.terms);
        let (stage, model) = match self.student.as_mut() {
            Some(st) => (Stage::Student(Teacher::live(&self.teacher)), st),
            None => (Stage::Teacher, &mut self.teacher),
        };
        queue_objective(be, &stage, model, &self.loss, self.cw, None, db, out)?;
        let ss = Mut::whole(&mut self.sum_sq);
        if recorded {
            let sched = Ref::whole(&self.sched);
            self.opt
                .apply_recorded(be, &mut model.params, BENCH_LR, ss, sched)
        } else {
            self.opt.step_queued(be, &mut model.params, BENCH_LR, ss)
        }
    }
}

/// Times `cfg.steps` steps of `stage` on `batching` batches after `cfg.warmup` untimed ones;
/// with [`BenchMode::Graphs`], each batch shape's step is recorded once as a graph (before the warm-up)
/// and replayed on a staging batch that each step's batch is copied into (an error where the
/// backend cannot record). `progress` is called after every step with (steps done, steps in
/// all).
pub fn run<B: Backend>(
    be: &B,
    cfg: &BenchConfig,
    stage: BenchStage,
    batching: Batching,
    mode: BenchMode,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<BenchRow> {
    if cfg.batch == 0 || cfg.steps == 0 || cfg.pool == 0 {
        return Err(Error::invalid(
            "bench: batch, steps and pool must be at least 1",
        ));
    }
    let graphs = mode == BenchMode::Graphs;
    let s = reference_schema(cfg.in_len, cfg.pre_len);
    let host = draw_batches(cfg, stage, batching)?;
    let batches = host
        .iter()
        .map(|b| DeviceBatch::upload(be, b, &s))
        .collect::<Result<Vec<_>>>()?;
    let positives: u64 = host
        .iter()
        .flat_map(|b| b.labels.iter().flatten())
        .map(|&y| u64::from(y))
        .sum();
    let all = (host.len() * cfg.batch) as u64;
    let loss = LossConfig::default();
    let widths = |role| ModelConfig::new(role, &s, cfg.d, cfg.heads, cfg.blocks, cfg.d_cat);
    let student = match stage {
        BenchStage::Student => Some(Model::new(be, widths(Role::Student)?, cfg.seed + 1)?),
        BenchStage::Teacher => None,
    };
    let slots = student.as_ref().map(|st| StudentSlots::new(&loss, st));
    let mut st = StepState {
        teacher: Model::new(be, widths(Role::Teacher)?, cfg.seed)?,
        student,
        opt: Optimizer::new(AdamWConfig::default()),
        cw: class_weights(all - positives, positives, 0.5, true)?,
        loss,
        terms: be.zeros(slots.as_ref().map_or(1, StudentSlots::len))?,
        sum_sq: be.zeros(1)?,
        sched: be.zeros(3)?,
    };
    // Graphs: one staging batch and one recorded step per batch shape, each shape's step run
    // once unrecorded first (that sizes the backend's scratch buffers, which a recording
    // must not grow).
    type Shape = (usize, usize, usize);
    let shape = |b: &Batch| (b.rows, b.pre.max_len, b.in_service.max_len);
    let mut recorded: Vec<(Shape, DeviceBatch<B>, B::Graph)> = Vec::new();
    let mut launches_recorded = 0u64;
    if graphs {
        let mut firsts: Vec<usize> = Vec::new();
        for (k, h) in host.iter().enumerate() {
            if !firsts.iter().any(|&f| shape(&host[f]) == shape(h)) {
                firsts.push(k);
                st.queue(be, &batches[k], false)?;
            }
        }
        be.synchronize()?;
        for k in firsts {
            let staging = DeviceBatch::upload(be, &host[k], &s)?;
            let before = be.launch_count();
            let graph = be
                .capture(&mut || st.queue(be, &staging, true))?
                .ok_or_else(|| {
                    Error::invalid(format!(
                        "bench: {} cannot record graphs (use --modes eager)",
                        be.name()
                    ))
                })?;
            if let (Some(a), Some(b)) = (before, be.launch_count()) {
                launches_recorded += b - a;
            }
            recorded.push((shape(&host[k]), staging, graph));
        }
    }
    let total = cfg.warmup + cfg.steps;
    let (mut times, mut flops, mut slots_all, mut filled) = (Vec::new(), 0.0, 0u64, 0u64);
    let (mut misses_before, mut launches_before) = (None, None);
    be.synchronize()?;
    for i in 0..total {
        if i == cfg.warmup {
            be.synchronize()?;
            be.reset_peak_memory();
            misses_before = be.arena_stats().map(|a| a.misses);
            launches_before = be.launch_count();
        }
        let k = i % batches.len();
        let (db, hb) = (&batches[k], &host[k]);
        let t0 = Instant::now();
        if graphs {
            let (_, staging, graph) = recorded
                .iter_mut()
                .find(|(sh, _, _)| *sh == shape(hb))
                .ok_or_else(|| Error::invalid("bench: no graph for a batch shape"))?;
            staging.copy_from(be, db)?;
            st.opt
                .advance_recorded(be, BENCH_LR, Mut::whole(&mut st.sched))?;
            be.replay(graph)?;
        } else {
            st.queue(be, db, false)?;
        }
        be.synchronize()?;
        let dt = t0.elapsed().as_secs_f64();
        if i >= cfg.warmup {
            times.push(dt);
            flops += step_flops(cfg, stage, hb.rows, hb.pre.max_len, hb.in_service.max_len);
            slots_all += (hb.rows * hb.in_service.max_len) as u64;
            filled += hb
                .in_service
                .lens
                .iter()
                .map(|&l| u64::from(l))
                .sum::<u64>();
        }
        progress(i + 1, total);
    }
    let peak = be.peak_memory();
    let arena = be.arena_stats();
    let arena_misses = arena
        .zip(misses_before)
        .map(|(a, before)| a.misses - before);
    let per_graph = launches_recorded as f64 / recorded.len().max(1) as f64;
    let launches_per_step = be
        .launch_count()
        .zip(launches_before)
        .map(|(after, before)| {
            (after - before) as f64 / cfg.steps as f64 + if graphs { per_graph } else { 0.0 }
        });
    let v: Vec<f64> = be.download(&st.terms)?.iter().map(|x| x.to_f64()).collect();
    let last_loss = slots.as_ref().map_or(v[0], |s| s.read(&v).total);
    if !last_loss.is_finite() {
        return Err(Error::invalid(format!(
            "bench: the {stage:?} step gave a non-finite loss {last_loss}"
        )));
    }
    let timed_secs: f64 = times.iter().sum();
    let mean_flops = flops / times.len() as f64;
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    let median = quantile(&sorted, 0.5);
    let (samples_per_s, secs_per_step) = match batching {
        Batching::Padded => (cfg.batch as f64 / median, median),
        Batching::Bucketed => (
            (times.len() * cfg.batch) as f64 / timed_secs,
            timed_secs / times.len() as f64,
        ),
    };
    Ok(BenchRow {
        stage,
        batching,
        mode,
        precision: be.precision().to_string(),
        ms_per_step: 1e3 * median,
        ms_p10: 1e3 * quantile(&sorted, 0.1),
        ms_p90: 1e3 * quantile(&sorted, 0.9),
        samples_per_s,
        flops_per_step: mean_flops,
        tflops: mean_flops / secs_per_step / 1e12,
        peak_mem_bytes: peak,
        arena_bytes: arena.map(|a| a.capacity as u64),
        arena_misses,
        launches_per_step,
        padding: 1.0 - filled as f64 / slots_all.max(1) as f64,
        loss: last_loss,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> BenchConfig {
        BenchConfig {
            batch: 8,
            d: 8,
            heads: 2,
            blocks: 2,
            d_cat: 4,
            in_len: 6,
            pre_len: 3,
            steps: 2,
            warmup: 1,
            seed: 3,
            pool: 3,
        }
    }

    #[test]
    fn padded_batches_have_the_limits_and_bucketed_ones_their_longest_rows() {
        let cfg = small();
        let p = draw_batches(&cfg, BenchStage::Student, Batching::Padded).unwrap();
        assert_eq!(p.len(), 3);
        for b in &p {
            assert_eq!((b.pre.max_len, b.in_service.max_len), (3, 6));
            assert!(b.in_service.lens.iter().all(|&l| (1..=6).contains(&l)));
            assert!(b.pre.lens.iter().all(|&l| l <= 3));
        }
        let q = draw_batches(&cfg, BenchStage::Teacher, Batching::Bucketed).unwrap();
        let longest: Vec<usize> = q.iter().map(|b| b.in_service.max_len).collect();
        for (b, &m) in q.iter().zip(&longest) {
            assert_eq!(m as u32, *b.in_service.lens.iter().max().unwrap());
        }
        assert!(longest.windows(2).all(|w| w[0] <= w[1]), "{longest:?}");
        // The same rows in both: the same seed draws the same pool.
        let count = |v: &[Batch]| v.iter().map(|b| b.rows).sum::<usize>();
        assert_eq!(count(&p), count(&q));
    }

    #[test]
    fn drawn_ids_are_inside_their_vocabularies_and_shares_are_near_the_targets() {
        let cfg = BenchConfig {
            batch: 1000,
            pool: 4,
            ..small()
        };
        let b = draw_batches(&cfg, BenchStage::Student, Batching::Padded).unwrap();
        let rows: f64 = (cfg.batch * cfg.pool) as f64;
        let empty = b
            .iter()
            .flat_map(|b| &b.pre.lens)
            .filter(|&&l| l == 0)
            .count();
        let pos: usize = b
            .iter()
            .flat_map(|b| b.labels.iter().flatten())
            .map(|&y| y as usize)
            .sum();
        assert!((empty as f64 / rows - EMPTY_PRE_SHARE).abs() < 0.02);
        assert!((pos as f64 / rows - POSITIVE_SHARE).abs() < 0.02);
        for batch in &b {
            for (i, &id) in batch.in_service.cat.iter().enumerate() {
                assert!(id < EVENT_VOCABS[i % 4]);
            }
            assert!(batch.profile_cat.iter().all(|&id| id < PROFILE_VOCAB));
        }
    }

    #[test]
    fn flops_follow_the_formula_at_the_reference_configuration() {
        let cfg = BenchConfig::default();
        // Teacher forward at §8: 2·131072·128·2 + 2·(24·131072·128² + 4·1024·128²·128)
        // + 2·1024·128·288 + 2·1024·256·128 + 2·1024·128.
        let t = 67_108_864.0
            + 2.0 * (51_539_607_552.0 + 8_589_934_592.0)
            + 75_497_472.0
            + 67_108_864.0
            + 262_144.0;
        assert_eq!(network_forward_flops(&cfg, 1024, 128), t);
        assert_eq!(
            step_flops(&cfg, BenchStage::Teacher, 1024, 32, 128),
            3.0 * t
        );
        let s = step_flops(&cfg, BenchStage::Student, 1024, 32, 128);
        assert!(s > t + 3.0 * network_forward_flops(&cfg, 1024, 32));
    }

    #[test]
    fn the_cpu_runs_both_steps_and_reports_finite_numbers() {
        let be = crate::backend::cpu::CpuBackend::<f32>::new();
        let cfg = small();
        for stage in [BenchStage::Student, BenchStage::Teacher] {
            for batching in [Batching::Padded, Batching::Bucketed] {
                let mut calls = 0;
                let mode = BenchMode::Eager;
                let r = run(&be, &cfg, stage, batching, mode, &mut |_, _| calls += 1).unwrap();
                assert_eq!(calls, 3);
                assert!(r.ms_per_step > 0.0 && r.samples_per_s > 0.0 && r.tflops > 0.0);
                assert!(r.loss.is_finite());
                assert!((0.0..1.0).contains(&r.padding));
                // The counting allocator is not installed in the unit tests.
                assert_eq!(r.peak_mem_bytes, None);
                assert_eq!((r.arena_bytes, r.arena_misses), (None, None));
                assert_eq!(r.launches_per_step, None);
            }
        }
    }
}
