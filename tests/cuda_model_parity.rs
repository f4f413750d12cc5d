//! Whole-model parity of the CUDA backend with the CPU reference (the per-op checks are in
//! `tests/cuda_parity.rs`).
//!
//! Fixture: a randomised teacher and student (d = 12, 3 heads, 2 blocks, profile embeddings
//! of width 5; parameters drawn by `model_common::random_values`, f32-exact) and one batch of
//! 7 rows with an empty pre-service row, an empty in-service row and a row at both length
//! limits (pre-service 4, in-service 6), uploaded to every backend.
//!
//! 1. **Training steps.** 3 steps of the student stage (teacher forward + student forward
//!    and backward with all five losses + global-norm clipping + AdamW, `Optimizer::step`),
//!    and separately 3 steps of the teacher stage, on the GPU and on `CpuBackend<f32>`. Every
//!    step's loss terms, gradient norm and clipping factor agree within [`STEP_TOL`]
//!    relative; after 3 steps, over the elements with a gradient, the parameters agree within
//!    [`PARAM_TOL`] (`‖p_gpu − p_cpu‖₂ / ‖p_cpu‖₂`) and the updates `p_after − p_before`
//!    within [`UPDATE_TOL`]. The elements whose exact gradient is 0 ([`null_elements`]) are
//!    held only to what AdamW can move them (see [`NULL_MOVE`]): their updates follow the sign
//!    of each backend's rounding noise. The norm over all elements and the per-element
//!    maxima are printed. The GPU run is repeated and must give bit-identical parameters (no
//!    atomics, docs/model.md §6.5).
//! 2. **Objective gradient.** The gradient of the whole student objective (all five terms)
//!    and of the teacher objective, on the GPU in f32 against `CpuBackend<f64>` holding the
//!    same f32-exact parameters: per parameter tensor
//!    `‖g_gpu − g_64‖₂ ≤ GRAD_TOL·‖g_64‖₂ + GRAD_FLOOR` (see [`GRAD_TOL`]).
//!
//! Without a usable GPU every test prints that it skipped and passes; with
//! `MGKD_REQUIRE_GPU=1` a missing GPU is a failure. `MGKD_PARITY_SELFTEST=1` (no GPU) runs
//! the same comparisons with `CpuBackend<f32>` in place of the GPU; in test 1 its reference is
//! then `CpuBackend<f64>` (an f32 CPU against itself would agree to the bit and check
//! nothing), which also shows that the bounds hold for f32 rounding of another summation
//! order, the difference the GPU brings.

mod cuda_common;
mod kernel_emu;
mod model_common;
mod skip;

use cuda_common::{gpu, selftest};
use mgkd::backend::cpu::CpuBackend;
use mgkd::backend::{Backend, Float};
use mgkd::data::Batch;
use mgkd::loss::{class_weights, student_objective, teacher_objective, LossConfig, Term};
use mgkd::model::{DeviceBatch, Model, ModelConfig, ParamStore, ParamTable, Role, Teacher};
use mgkd::optim::{AdamWConfig, Optimizer};
use model_common::{batch, random_values, schema};

/// Model width (3 heads of width 4: an odd head count, a width that is not a power of 2).
const D: usize = 12;
/// Attention heads.
const HEADS: usize = 3;
/// Transformer blocks of both networks (≥ 2, so the student has L_self).
const BLOCKS: usize = 2;
/// Width of each profile embedding.
const D_CAT: usize = 5;
/// Training steps per run.
const STEPS: usize = 3;
/// Learning rate of every step (constant; the schedule belongs to the trainer). AdamW moves
/// every element with a non-zero gradient by about `LR` per step, so after 3 steps the
/// parameters have moved by ≈ 1e-2 of their norm (8e-3 measured). A sign-flipped gradient
/// of one 12-element bias in the last step alone moves the difference to 1.04e-4 (measured
/// in the self-test), just over [`PARAM_TOL`]; [`UPDATE_TOL`] sees it as 1.3e-2.
const LR: f64 = 1e-3;
/// Bound on `‖p_gpu − p_cpu‖ / ‖p_cpu‖` after [`STEPS`] steps over the elements with a
/// gradient (the bound; f32 against f64 gives 7e-8).
const PARAM_TOL: f64 = 1e-4;
/// Bound on `‖u_gpu − u_cpu‖ / ‖u_cpu‖` for the updates `u = p_after − p_before` of the
/// elements with a gradient: a sharper view than [`PARAM_TOL`], which the parameters' own
/// size dilutes. An update is `LR·m̂/(√v̂ + ε)` per step, a ratio of moments that inherits
/// the gradient's relative error (≈ 1e-6, test 2) except where `|g|` is near ε; 1e-3 leaves
/// two orders of magnitude over the f32-vs-f64 difference of the self-test (≈ 9e-6).
const UPDATE_TOL: f64 = 1e-3;
/// Elements without a gradient ([`null_elements`]) get AdamW updates of the sign of the
/// backend's rounding noise (`g/(|g| + ε)` with `|g|` ≈ ε), legitimately different on the
/// two backends: they are held only to what AdamW can do, `|Δ| ≤ NULL_MOVE·STEPS·LR` (each
/// of the two runs moves an undecayed element by at most `LR·|m̂|/√v̂ ≤ 1.004·LR` per step
/// in its first 3 steps, by Cauchy–Schwarz over the moments' weights).
const NULL_MOVE: f64 = 2.1;
/// Bound on the relative difference of each step's loss terms, gradient norm and clipping
/// factor: the f32 losses are sums of O(1) terms over the batch, agreeing to ≈ 1e-6, and the
/// parameters they are evaluated at (steps 2 and 3) differ by far less than `PARAM_TOL`.
const STEP_TOL: f64 = 1e-4;
/// Per-tensor bound on the objective gradient in f32 against f64, relative to the tensor's
/// gradient norm. Each gradient element is an f32 sum over the batch's rows and tokens
/// (≤ 7·6 terms) at the end of a chain of some 30 ops through the two blocks and the loss
/// heads, each adding a relative rounding error of a few f32 ulps (6e-8) times the local
/// condition: the f32 CPU lands at 1.3e-6 at worst here. 1e-4 leaves two orders of magnitude
/// for the GPU's other summation orders (cuBLAS tiles, warp trees) and is the bound of the
/// CPU's own f32-vs-f64 test (`model_gradcheck.rs`).
const GRAD_TOL: f64 = 1e-4;
/// Absolute floor of the gradient bound, ≈ 10 f32 ulps of an O(1) gradient: for tensors whose
/// exact gradient is 0 but computed as rounding noise ([`null_elements`]: the attention key
/// biases; ≈ 1e-8 per element in f32).
const GRAD_FLOOR: f64 = 1e-6;

/// The batch: rows 0 (no pre-service event) and 1 (no in-service event), row 5 at both
/// length limits, the other rows in between.
fn fixture() -> Batch {
    batch(
        71,
        &[0, 4, 2, 3, 1, 4, 2],
        &[6, 0, 3, 5, 1, 6, 2],
        &[1, 0, 1, 0, 0, 1, 0],
    )
}

/// Class weights of the batch's labels (ρ = 0.5, re-weighting on: unequal weights).
fn weights(b: &Batch) -> [f64; 2] {
    let l = b.labels.as_ref().expect("labels");
    let pos = l.iter().filter(|&&y| y == 1).count() as u64;
    class_weights(l.len() as u64 - pos, pos, 0.5, true).expect("class weights")
}

/// A model of `role` on `be` with the f32-exact random parameters of `seed`.
fn build<B: Backend>(be: &B, role: Role, seed: u64) -> Model<B> {
    let cfg = ModelConfig::new(role, &schema(), D, HEADS, BLOCKS, D_CAT).expect("config");
    let table = ParamTable::new(&cfg);
    let v: Vec<B::F> = random_values(&table, seed)
        .into_iter()
        .map(<B::F as Float>::from_f64)
        .collect();
    let store = ParamStore::from_values(be, table, &v).expect("parameters");
    Model::with_params(cfg, store).expect("model")
}

/// A buffer on the host as f64.
fn host<B: Backend>(be: &B, buf: &B::Buf) -> Vec<f64> {
    be.download(buf)
        .expect("download")
        .into_iter()
        .map(<B::F as Float>::to_f64)
        .collect()
}

/// Which objective a run optimises.
#[derive(Clone, Copy, Debug)]
enum Stage {
    /// The teacher alone (weighted BCE).
    Teacher,
    /// The student with all five terms against the frozen teacher.
    Student,
}

/// The networks of one stage on one backend, with the uploaded batch.
struct Setup<B: Backend> {
    batch: DeviceBatch<B>,
    class_w: [f64; 2],
    teacher: Model<B>,
    student: Model<B>,
}

impl<B: Backend> Setup<B> {
    fn new(be: &B) -> Self {
        let b = fixture();
        Setup {
            batch: DeviceBatch::upload(be, &b, &schema()).expect("batch"),
            class_w: weights(&b),
            teacher: build(be, Role::Teacher, 1),
            student: build(be, Role::Student, 2),
        }
    }

    /// Zeroes the trained model's gradients, runs the objective with backward and returns its
    /// named terms (the last one the total).
    fn objective(&mut self, be: &B, stage: Stage) -> Vec<(&'static str, f64)> {
        match stage {
            Stage::Teacher => {
                self.teacher.params.zero_grads(be);
                let l = teacher_objective(be, self.class_w, &mut self.teacher, &self.batch, true)
                    .expect("teacher objective");
                vec![("L_T", l)]
            }
            Stage::Student => {
                self.student.params.zero_grads(be);
                let l = student_objective(
                    be,
                    // Every term at a sizeable weight.
                    &LossConfig::spec_starting(),
                    self.class_w,
                    Teacher::live(&self.teacher),
                    &mut self.student,
                    &self.batch,
                    true,
                )
                .expect("student objective");
                let terms = [
                    ("L_hard", l.hard),
                    ("L_soft", l.soft),
                    ("L_coarse", l.coarse),
                    ("L_fine", l.fine),
                    ("L_self", l.self_distill),
                ];
                let mut out = Vec::new();
                for (name, t) in terms {
                    match t {
                        Term::On(v) => out.push((name, v)),
                        other => panic!("{name} is {other:?}: every term must be on"),
                    }
                }
                out.push(("L", l.total));
                out
            }
        }
    }

    /// The model `stage` trains.
    fn trained(&mut self, stage: Stage) -> &mut Model<B> {
        match stage {
            Stage::Teacher => &mut self.teacher,
            Stage::Student => &mut self.student,
        }
    }
}

/// What one optimizer step saw.
struct StepRecord {
    /// Named loss terms and the total.
    terms: Vec<(&'static str, f64)>,
    /// ‖g‖ before clipping.
    grad_norm: f64,
    /// The clipping factor applied.
    scale: f64,
}

/// A finished training run.
struct Run {
    steps: Vec<StepRecord>,
    /// Parameters before the first step.
    initial: Vec<f64>,
    /// Parameters after the last step.
    params: Vec<f64>,
    table: ParamTable,
}

/// [`STEPS`] optimizer steps of `stage` on `be`.
fn train<B: Backend>(be: &B, stage: Stage) -> Run {
    let mut s = Setup::new(be);
    let initial = host(be, &s.trained(stage).params.values);
    let mut opt = Optimizer::new(AdamWConfig::default());
    let mut steps = Vec::new();
    for _ in 0..STEPS {
        let terms = s.objective(be, stage);
        let info = opt
            .step(be, &mut s.trained(stage).params, LR)
            .expect("optimizer step");
        steps.push(StepRecord {
            terms,
            grad_norm: info.grad_norm,
            scale: info.scale,
        });
    }
    let m = s.trained(stage);
    Run {
        steps,
        initial,
        params: host(be, &m.params.values),
        table: m.params.table.clone(),
    }
}

/// `|a − b| / |b|` (absolute when `b` is 0).
fn rel(a: f64, b: f64) -> f64 {
    let d = (a - b).abs();
    if b == 0.0 {
        d
    } else {
        d / b.abs()
    }
}

/// `‖a − b‖₂ / ‖b‖₂` (absolute when `b` is 0).
fn norm_rel(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let num: f64 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
    let den: f64 = b.iter().map(|y| y * y).sum();
    if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    }
}

/// Name of the tensor holding flat element `i`.
fn tensor_of(table: &ParamTable, i: usize) -> String {
    table
        .entries()
        .iter()
        .find(|e| (e.offset..e.offset + e.numel()).contains(&i))
        .map_or_else(|| "?".into(), |e| format!("{}[{}]", e.name, i - e.offset))
}

/// Checks a device run against a reference run (see the module documentation).
fn compare_runs(label: &str, stage: Stage, dev: &Run, reference: &Run) {
    assert_eq!(dev.steps.len(), reference.steps.len());
    assert!(
        dev.initial == reference.initial,
        "{label}: runs start from different parameters"
    );
    // The fixture must exercise clipping: the first step's gradient norm exceeds 1.
    assert!(
        reference.steps[0].scale < 1.0,
        "{label}: no clipping at step 1 (‖g‖ = {})",
        reference.steps[0].grad_norm
    );
    for (k, (a, b)) in dev.steps.iter().zip(&reference.steps).enumerate() {
        let mut worst = 0.0f64;
        for ((name, x), (name_ref, y)) in a.terms.iter().zip(&b.terms) {
            assert_eq!(name, name_ref);
            assert!(
                x.is_finite() && rel(*x, *y) <= STEP_TOL,
                "{label}: step {}: {name} = {x:e}, reference {y:e}",
                k + 1
            );
            worst = worst.max(rel(*x, *y));
        }
        for (name, x, y) in [
            ("‖g‖", a.grad_norm, b.grad_norm),
            ("clipping factor", a.scale, b.scale),
        ] {
            assert!(
                rel(x, y) <= STEP_TOL,
                "{label}: step {}: {name} = {x:e}, reference {y:e}",
                k + 1
            );
            worst = worst.max(rel(x, y));
        }
        let terms: Vec<String> = b.terms.iter().map(|(n, v)| format!("{n} {v:.6}")).collect();
        println!(
            "{label}: step {}: {}, ‖g‖ {:.4}; worst relative difference {worst:.2e}",
            k + 1,
            terms.join(", "),
            b.grad_norm
        );
    }
    let (p, q) = (&dev.params, &reference.params);
    let null = null_elements(stage, &reference.table);
    let nulls = null.iter().filter(|n| **n).count();
    // Parameters and updates of the elements with a gradient.
    let live = |v: &[f64]| -> Vec<f64> {
        v.iter()
            .zip(&null)
            .filter(|(_, n)| !**n)
            .map(|(x, _)| *x)
            .collect()
    };
    let update = |r: &Run| -> Vec<f64> {
        let (after, before) = (live(&r.params), live(&r.initial));
        after.iter().zip(&before).map(|(a, b)| a - b).collect()
    };
    let err = norm_rel(&live(p), &live(q));
    let update_err = norm_rel(&update(dev), &update(reference));
    let moved = norm_rel(q, &reference.initial);
    let err_all = norm_rel(p, q);
    // Largest element difference, among the elements with a gradient and among the others.
    let (mut max_live, mut max_null) = ((0.0f64, 0usize), (0.0f64, 0usize));
    for (i, (x, y)) in p.iter().zip(q).enumerate() {
        let m = if null[i] {
            &mut max_null
        } else {
            &mut max_live
        };
        if (x - y).abs() >= m.0 {
            *m = ((x - y).abs(), i);
        }
    }
    println!(
        "{label}: parameters after {STEPS} steps ({} elements, moved by {moved:.2e} relative): \
         ‖p_dev − p_ref‖/‖p_ref‖ = {err:.2e} over the {} with a gradient (max |Δ| {:.2e} at \
         {}), updates differ by {update_err:.2e}; over all elements {err_all:.2e}, max |Δ| \
         {:.2e} at {} among the {nulls} without a gradient",
        p.len(),
        p.len() - nulls,
        max_live.0,
        tensor_of(&reference.table, max_live.1),
        max_null.0,
        tensor_of(&reference.table, max_null.1),
    );
    assert!(
        err <= PARAM_TOL,
        "{label}: parameters after {STEPS} steps differ by {err:.3e} > {PARAM_TOL:.0e} relative"
    );
    assert!(
        update_err <= UPDATE_TOL,
        "{label}: the {STEPS} steps' updates differ by {update_err:.3e} > {UPDATE_TOL:.0e} relative"
    );
    assert!(
        max_null.0 <= NULL_MOVE * STEPS as f64 * LR,
        "{label}: {} (no gradient) differs by {:.3e}, more than AdamW can move it",
        tensor_of(&reference.table, max_null.1),
        max_null.0
    );
    assert!(
        moved > 10.0 * PARAM_TOL,
        "{label}: the steps moved the parameters by only {moved:.2e}: the bound checks nothing"
    );
}

/// Marks the elements whose gradient is 0 in exact arithmetic: where the f64 gradient of the
/// stage's objective at the initial parameters is below `1e-12·max|g|` (f64 rounding noise
/// is ≈ 1e-16 relative). These are the attention key biases (adding a vector to every key
/// adds the same amount to all scores of a query, which the softmax ignores), `fine.k.bias`
/// (the same invariance; its gradient is exactly 0 on every backend, the fine loss never
/// forming its keys, so it does not move at all), and embedding rows of ids absent from the batch; the invariances hold at every
/// parameter value, so the elements stay gradient-free over the steps.
fn null_elements(stage: Stage, table: &ParamTable) -> Vec<bool> {
    let (_, g, t) = gradient(&CpuBackend::<f64>::new(), stage);
    assert!(t == *table, "parameter tables differ");
    let max = g.iter().fold(0.0f64, |a, x| a.max(x.abs()));
    g.iter().map(|x| x.abs() <= 1e-12 * max).collect()
}

/// Test 1 for one stage: the GPU (or, in the self-test, the f32 CPU) against its reference,
/// and the GPU twice for determinism.
fn training_parity(stage: Stage) {
    let label = format!("{stage:?} stage");
    let Some(g) = gpu() else {
        if selftest() {
            let dev = train(&CpuBackend::<f32>::new(), stage);
            let reference = train(&CpuBackend::<f64>::new(), stage);
            compare_runs(
                &format!("{label}, cpu-f32 vs cpu-f64"),
                stage,
                &dev,
                &reference,
            );
        }
        return;
    };
    let reference = train(&CpuBackend::<f32>::new(), stage);
    let dev = train(g, stage);
    compare_runs(&format!("{label}, gpu vs cpu-f32"), stage, &dev, &reference);
    let again = train(g, stage);
    let same = dev
        .params
        .iter()
        .zip(&again.params)
        .all(|(a, b)| a.to_bits() == b.to_bits());
    assert!(same, "{label}: parameters differ between two GPU runs");
}

#[test]
fn student_training_steps_match_cpu() {
    training_parity(Stage::Student);
}

#[test]
fn teacher_training_steps_match_cpu() {
    training_parity(Stage::Teacher);
}

/// The objective's value and gradient (flat, table order) at the fixture's parameters.
fn gradient<B: Backend>(be: &B, stage: Stage) -> (f64, Vec<f64>, ParamTable) {
    let mut s = Setup::new(be);
    let terms = s.objective(be, stage);
    let total = terms.last().expect("total").1;
    let m = s.trained(stage);
    (total, host(be, &m.params.grads), m.params.table.clone())
}

/// Test 2 for one stage: `dev` (f32) against the f64 CPU, per tensor.
fn compare_gradients<B: Backend>(label: &str, dev: &B, stage: Stage) {
    let (l, g, table) = gradient(dev, stage);
    let (l64, g64, _) = gradient(&CpuBackend::<f64>::new(), stage);
    assert!(
        rel(l, l64) <= STEP_TOL,
        "{label}: objective {l:e}, f64 reference {l64:e}"
    );
    let (mut worst, mut worst_at) = (0.0f64, String::new());
    for e in table.entries() {
        let r = e.offset..e.offset + e.numel();
        let (a, b) = (&g[r.clone()], &g64[r]);
        assert!(
            a.iter().all(|x| x.is_finite()),
            "{label}: {}: non-finite gradient",
            e.name
        );
        let n64 = b.iter().map(|x| x * x).sum::<f64>().sqrt();
        let diff = a
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y) * (x - y))
            .sum::<f64>()
            .sqrt();
        assert!(
            diff <= GRAD_TOL * n64 + GRAD_FLOOR,
            "{label}: {}: gradient difference {diff:e}, f64 norm {n64:e} (relative {:.2e})",
            e.name,
            diff / n64.max(f64::MIN_POSITIVE)
        );
        if n64 > 1e-3 && diff / n64 > worst {
            (worst, worst_at) = (diff / n64, e.name.clone());
        }
    }
    let zero = g64.iter().filter(|x| **x == 0.0).count();
    assert!(
        zero * 2 < g64.len(),
        "{label}: {zero} of {} gradient elements are 0: the fixture reaches too little",
        g64.len()
    );
    println!(
        "{label}: objective {l:.6} (f64 {l64:.6}); {} tensors, worst relative gradient \
         difference {worst:.2e} ({worst_at})",
        table.entries().len()
    );
}

/// Test 2 for one stage on the GPU, or on the f32 CPU in the self-test.
fn gradient_parity(stage: Stage) {
    let label = format!("{stage:?} objective gradient");
    match gpu() {
        Some(g) => compare_gradients(&format!("{label}, gpu vs cpu-f64"), g, stage),
        None if selftest() => compare_gradients(
            &format!("{label}, cpu-f32 vs cpu-f64"),
            &CpuBackend::<f32>::new(),
            stage,
        ),
        None => {}
    }
}

#[test]
fn student_objective_gradient_matches_f64() {
    gradient_parity(Stage::Student);
}

#[test]
fn teacher_objective_gradient_matches_f64() {
    gradient_parity(Stage::Teacher);
}
