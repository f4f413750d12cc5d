//! Shared by the bf16 tests (`precision_bf16` on the CPU reference, `cuda_bf16_parity` on a
//! GPU) and by `model_infer` (its models and batches): the bounds of the scheme (derived in tests/precision_bf16.rs), a randomised student
//! and teacher, random batches, the student objective and its gradient on any backend, the
//! per-tensor gradient check and a loss curve over training steps.
#![allow(dead_code)]

use crate::model_common::{batch, random_values, schema};
use mgkd::backend::{Backend, Float};
use mgkd::data::Batch;
use mgkd::loss::{class_weights, student_objective, LossConfig, StudentLoss};
use mgkd::model::{DeviceBatch, Model, ModelConfig, ParamTable, Role, Teacher};
use mgkd::optim::{AdamWConfig, Optimizer};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Bound on each tensor's relative gradient error (see the module documentation).
pub const GRAD_REL: f64 = 5e-2;
/// Bound on the relative error of the objective's value.
pub const LOSS_REL: f64 = 1e-2;

/// A model of `role` (d = 16, 2 heads, `blocks` blocks) on `be` with the randomised values
/// of [`random_values`] (the same numbers on every backend).
pub fn model<B: Backend>(be: &B, role: Role, blocks: usize, seed: u64) -> Model<B> {
    let cfg = ModelConfig::new(role, &schema(), 16, 2, blocks, 3).expect("config");
    let mut m = Model::new(be, cfg, seed).expect("model");
    let v: Vec<B::F> = random_values(&m.params.table, seed)
        .into_iter()
        .map(<B::F as Float>::from_f64)
        .collect();
    m.params.set_values(be, &v).expect("values");
    m
}

/// `rows` rows with random lengths (some empty sequences) and about 30 % positives.
pub fn random_batch(seed: u64, rows: usize) -> Batch {
    let s = schema();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let pre: Vec<u32> = (0..rows)
        .map(|_| rng.gen_range(0..=s.pre_len as u32))
        .collect();
    let ins: Vec<u32> = (0..rows)
        .map(|_| rng.gen_range(0..=s.in_len as u32))
        .collect();
    let labels: Vec<u8> = (0..rows).map(|_| rng.gen_bool(0.3) as u8).collect();
    batch(seed ^ 0xb, &pre, &ins, &labels)
}

pub fn weights(b: &Batch) -> [f64; 2] {
    let l = b.labels.as_ref().expect("labels");
    let pos = l.iter().filter(|&&y| y == 1).count() as u64;
    class_weights(l.len() as u64 - pos, pos, 0.5, true).expect("weights")
}

/// The student objective and its gradient (as f64) on `be`, teacher and student from seeds
/// 3 and 4.
pub fn objective<B: Backend>(be: &B, b: &Batch) -> (StudentLoss, Vec<f64>) {
    let t = model(be, Role::Teacher, 2, 3);
    let mut s = model(be, Role::Student, 2, 4);
    let db = DeviceBatch::upload(be, b, &schema()).expect("upload");
    s.params.zero_grads(be);
    let cfg = LossConfig::spec_starting();
    let l = student_objective(be, &cfg, weights(b), Teacher::live(&t), &mut s, &db, true)
        .expect("objective");
    let g = be.download(&s.params.grads).expect("grads");
    (l, g.iter().map(|x| x.to_f64()).collect())
}

/// `‖a − b‖/‖b‖` over `r`, and `‖b‖` there.
pub fn rel_err(a: &[f64], b: &[f64], r: std::ops::Range<usize>) -> (f64, f64) {
    let num: f64 = a[r.clone()]
        .iter()
        .zip(&b[r.clone()])
        .map(|(x, y)| (x - y) * (x - y))
        .sum();
    let den: f64 = b[r].iter().map(|y| y * y).sum();
    ((num / den.max(1e-300)).sqrt(), den.sqrt())
}

/// The objective over `steps` AdamW steps on `be`, each on a fresh random batch (the same
/// batches on every backend).
pub fn loss_curve<B: Backend>(be: &B, steps: usize) -> Vec<f64> {
    let t = model(be, Role::Teacher, 2, 3);
    let mut s = model(be, Role::Student, 2, 4);
    let cfg = LossConfig::spec_starting();
    let mut opt = Optimizer::new(AdamWConfig::default());
    (0..steps)
        .map(|k| {
            let b = random_batch(1000 + k as u64, 32);
            let db = DeviceBatch::upload(be, &b, &schema()).expect("upload");
            s.params.zero_grads(be);
            let l = student_objective(be, &cfg, weights(&b), Teacher::live(&t), &mut s, &db, true)
                .expect("objective");
            opt.step(be, &mut s.params, 3e-3).expect("step");
            l.total
        })
        .collect()
}

/// Checks `got` (a gradient of the student of [`model`]) against `want` tensor by tensor:
/// `‖got − want‖ ≤ bound·‖want‖ + 1e-4·‖want_whole‖` for each tensor (the absolute floor
/// covers tensors whose exact gradient is 0 but computed as rounding noise of order u times
/// the gradients it is computed from). Prints the worst tensor and returns the whole gradient's relative error.
pub fn check_gradient(
    label: &str,
    table: &ParamTable,
    got: &[f64],
    want: &[f64],
    bound: f64,
) -> f64 {
    let (_, whole_norm) = rel_err(want, want, 0..want.len());
    let mut worst = (0.0f64, String::new());
    let mut failures = Vec::new();
    for e in table.entries() {
        let r = e.offset..e.offset + e.numel();
        let (rel, norm) = rel_err(got, want, r);
        if rel * norm > bound * norm + 1e-4 * whole_norm {
            failures.push(format!(
                "{label}: {}: relative error {rel:.2e} (norm {norm:.2e}), bound {bound:.0e}",
                e.name
            ));
        }
        if norm > 1e-3 && rel > worst.0 {
            worst = (rel, e.name.clone());
        }
    }
    let (all, _) = rel_err(got, want, 0..want.len());
    eprintln!(
        "{label}: worst per-tensor relative gradient error {:.2e} ({}), whole gradient {all:.2e}",
        worst.0, worst.1
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    all
}
