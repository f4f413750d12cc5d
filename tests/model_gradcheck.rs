//! Whole-objective gradient checks (f64 CPU) against central finite differences, f32 vs f64
//! agreement, and the frozen teacher.
//!
//! Tolerance of the finite-difference comparison, per element:
//! `|analytic − numeric| ≤ 1e-6·max(|analytic|, |numeric|) + 1e-9`. The absolute floor 1e-9
//! covers the finite difference's own error: step h = 1e-5 on losses of order 1 gives
//! round-off ≈ 1e-16/1e-5 = 1e-11 and truncation ≈ h²·|f'''|/6 ≈ 1e-10.

mod model_common;
use model_common as common;

use common::{batch, batch5, model, upload};
use mgkd::backend::cpu::CpuBackend;
use mgkd::backend::Backend;
use mgkd::data::Batch;
use mgkd::loss::{class_weights, student_objective, teacher_objective, LossConfig, Term};
use mgkd::model::{DeviceBatch, Model, Role, Teacher};
use mgkd::optim::{AdamWConfig, Optimizer};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

type Cpu = CpuBackend<f64>;

const H: f64 = 1e-5;
const REL: f64 = 1e-6;
const FLOOR: f64 = 1e-9;

/// `per` element indices of every tensor of `m`, drawn by `seed` (all of a smaller tensor).
fn sample(m: &Model<Cpu>, per: usize, seed: u64) -> Vec<(String, usize)> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut out = Vec::new();
    for e in m.params.table.entries() {
        let n = e.numel();
        if n <= per {
            out.extend((0..n).map(|i| (e.name.clone(), e.offset + i)));
        } else {
            out.extend((0..per).map(|_| (e.name.clone(), e.offset + rng.gen_range(0..n))));
        }
    }
    out
}

/// Compares the analytic gradient of `loss` (which runs the objective on `m`, accumulating
/// gradients when asked) with central differences on the sampled elements; returns the
/// number of elements checked.
fn check(
    be: &Cpu,
    m: &mut Model<Cpu>,
    per: usize,
    seed: u64,
    what: &str,
    loss: &mut dyn FnMut(&Cpu, &mut Model<Cpu>, bool) -> f64,
) -> usize {
    m.params.zero_grads(be);
    loss(be, m, true);
    let grads = be.download(&m.params.grads).unwrap();
    let base = be.download(&m.params.values).unwrap();
    let picks = sample(m, per, seed);
    let mut worst = (0.0f64, String::new());
    let mut failures = Vec::new();
    for (name, i) in &picks {
        let mut v = base.clone();
        v[*i] = base[*i] + H;
        m.params.set_values(be, &v).unwrap();
        let lp = loss(be, m, false);
        v[*i] = base[*i] - H;
        m.params.set_values(be, &v).unwrap();
        let lm = loss(be, m, false);
        let num = (lp - lm) / (2.0 * H);
        let a = grads[*i];
        let err = (a - num).abs();
        let tol = REL * a.abs().max(num.abs()) + FLOOR;
        let rel = err / a.abs().max(num.abs()).max(1e-300);
        if a.abs().max(num.abs()) > 1e-4 && rel > worst.0 {
            worst = (rel, name.clone());
        }
        if err > tol {
            failures.push(format!("{name}[{}]: analytic {a:e}, numeric {num:e}", i));
        }
    }
    m.params.set_values(be, &base).unwrap();
    eprintln!(
        "{what}: {} elements, worst relative error {:.2e} ({})",
        picks.len(),
        worst.0,
        worst.1
    );
    assert!(
        failures.is_empty(),
        "{what}: {} of {} elements off:\n{}",
        failures.len(),
        picks.len(),
        failures.join("\n")
    );
    picks.len()
}

fn weights(b: &Batch) -> [f64; 2] {
    let l = b.labels.as_ref().unwrap();
    let pos = l.iter().filter(|&&y| y == 1).count() as u64;
    class_weights(l.len() as u64 - pos, pos, 0.5, true).unwrap()
}

#[test]
fn teacher_objective_matches_finite_differences() {
    let (be, mut t) = model::<f64>(Role::Teacher, 2, 1);
    let b = batch5(11);
    let db = upload(&be, &b);
    let cw = weights(&b);
    let n = check(&be, &mut t, 6, 2, "teacher", &mut |be, m, bw| {
        teacher_objective(be, cw, m, &db, bw).unwrap()
    });
    assert!(n >= 200, "only {n} elements checked");
}

fn softplus(x: f64) -> f64 {
    x.max(0.0) + (-x.abs()).exp().ln_1p()
}

/// `τ²·mean_l mean_i KL(Bern(σ(z̄_i/τ)) ‖ Bern(σ(z_l,i/τ)))` with the target `z̄` held fixed:
/// the function whose gradient L_self's stop-gradient defines (a finite difference of
/// L_self itself would also move its target `z_s`).
fn self_fixed_target(
    be: &Cpu,
    m: &Model<Cpu>,
    db: &DeviceBatch<Cpu>,
    zbar: &[f64],
    tau: f64,
) -> f64 {
    let fwd = m.forward(be, db).unwrap();
    let heads = fwd.aux_logits.len() as f64;
    let mut sum = 0.0;
    for zl in &fwd.aux_logits {
        let zl = be.download(zl).unwrap();
        for (t, s) in zbar.iter().zip(&zl) {
            let (t, s) = (t / tau, s / tau);
            let p = 1.0 / (1.0 + (-t).exp());
            // KL = p·(ln p − ln q) + (1−p)·(ln(1−p) − ln(1−q)), ln σ(x) = −softplus(−x)
            sum += p * (softplus(-s) - softplus(-t)) + (1.0 - p) * (softplus(s) - softplus(t));
        }
    }
    tau * tau * sum / (heads * zbar.len() as f64)
}

fn student_check(cfg: &LossConfig, blocks: usize, b: &Batch, what: &str) -> usize {
    let (be, t) = model::<f64>(Role::Teacher, 2, 3);
    let (_, mut s) = model::<f64>(Role::Student, blocks, 4);
    let db = upload(&be, b);
    let cw = weights(b);
    let zbar = be.download(&s.forward(&be, &db).unwrap().logits).unwrap();
    check(&be, &mut s, 5, 5, what, &mut |be, m, bw| {
        let l = student_objective(be, cfg, cw, Teacher::live(&t), m, &db, bw).unwrap();
        match l.self_distill {
            Term::On(v) => {
                l.total - cfg.delta * v + cfg.delta * self_fixed_target(be, m, &db, &zbar, cfg.tau)
            }
            _ => l.total,
        }
    })
}

/// Every term at a sizeable weight, so that each term's gradient weighs in the check.
fn full_weight() -> LossConfig {
    LossConfig::spec_starting()
}

#[test]
fn student_objective_all_terms_matches_finite_differences() {
    let cfg = full_weight();
    let n = student_check(&cfg, 2, &batch5(21), "student, all terms");
    assert!(n >= 200, "only {n} elements checked");
    let cos = LossConfig {
        coarse_cosine: true,
        ..full_weight()
    };
    student_check(&cos, 2, &batch5(22), "student, all terms, cosine coarse");
}

#[test]
fn student_objective_each_term_alone_matches_finite_differences() {
    let none = LossConfig {
        hard: false,
        soft: false,
        coarse: false,
        fine: false,
        self_distill: false,
        ..full_weight()
    };
    let alone: [(&str, LossConfig); 5] = [
        (
            "hard",
            LossConfig {
                hard: true,
                ..none.clone()
            },
        ),
        (
            "soft",
            LossConfig {
                soft: true,
                ..none.clone()
            },
        ),
        (
            "coarse",
            LossConfig {
                coarse: true,
                ..none.clone()
            },
        ),
        (
            "fine",
            LossConfig {
                fine: true,
                ..none.clone()
            },
        ),
        (
            "self",
            LossConfig {
                self_distill: true,
                ..none.clone()
            },
        ),
    ];
    for (name, cfg) in &alone {
        let n = student_check(cfg, 2, &batch5(31), &format!("student, {name} alone"));
        assert!(n >= 200);
    }
}

#[test]
fn student_batch_of_one_and_one_block() {
    let cfg = full_weight();
    student_check(
        &cfg,
        2,
        &batch(41, &[3], &[4], &[1]),
        "student, batch of one",
    );
    student_check(
        &cfg,
        2,
        &batch(42, &[0], &[0], &[0]),
        "student, one empty row",
    );
    student_check(&cfg, 1, &batch5(43), "student, one block");
    // With one block L_self is absent, not a silent 0.
    let (be, t) = model::<f64>(Role::Teacher, 2, 3);
    let (_, mut s) = model::<f64>(Role::Student, 1, 4);
    let b = batch5(44);
    let db = upload(&be, &b);
    let l = student_objective(
        &be,
        &cfg,
        weights(&b),
        Teacher::live(&t),
        &mut s,
        &db,
        false,
    )
    .unwrap();
    assert_eq!(l.self_distill, Term::Absent);
    assert!(matches!(l.fine, Term::On(v) if v > 0.0));
}

/// Relative agreement of two vectors in the Euclidean norm.
fn norm_rel(a: &[f64], b: &[f64]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
    let den: f64 = b.iter().map(|y| y * y).sum();
    (num / den.max(1e-300)).sqrt()
}

#[test]
fn f32_matches_f64_forward_and_backward() {
    let b = batch5(51);
    let cw = weights(&b);
    let cfg = full_weight();
    let (b64, t64) = model::<f64>(Role::Teacher, 2, 6);
    let (_, mut s64) = model::<f64>(Role::Student, 2, 7);
    let (b32, t32) = model::<f32>(Role::Teacher, 2, 6);
    let (_, mut s32) = model::<f32>(Role::Student, 2, 7);
    let (d64, d32) = (upload(&b64, &b), upload(&b32, &b));
    s64.params.zero_grads(&b64);
    s32.params.zero_grads(&b32);
    let l64 = student_objective(&b64, &cfg, cw, Teacher::live(&t64), &mut s64, &d64, true).unwrap();
    let l32 = student_objective(&b32, &cfg, cw, Teacher::live(&t32), &mut s32, &d32, true).unwrap();
    assert!(
        (l64.total - l32.total).abs() <= 1e-4 * l64.total.abs(),
        "{l64:?} vs {l32:?}"
    );
    let z64 = b64
        .download(&s64.forward(&b64, &d64).unwrap().logits)
        .unwrap();
    let z32 = b32
        .download(&s32.forward(&b32, &d32).unwrap().logits)
        .unwrap();
    for (a, b) in z32.iter().zip(&z64) {
        assert!(
            (*a as f64 - b).abs() <= 1e-4 * b.abs().max(1e-2),
            "logit {a} vs {b}"
        );
    }
    // Gradients: per tensor, ‖g32 − g64‖ ≤ 1e-4·‖g64‖ + 1e-6 (per-element ratios are
    // meaningless where an element is a cancellation near 0; the floor, ≈ 10 f32 ulps of an
    // O(1) gradient, covers tensors whose exact gradient is 0 but computed as rounding
    // noise).
    let mut worst = 0.0f64;
    let g64 = b64.download(&s64.params.grads).unwrap();
    let g32: Vec<f64> = b32
        .download(&s32.params.grads)
        .unwrap()
        .iter()
        .map(|&x| x as f64)
        .collect();
    for e in s64.params.table.entries() {
        let r = e.offset..e.offset + e.numel();
        if e.name == "fine.k.bias" {
            // No effect on the loss, and the fine loss never forms the keys: exactly 0 in
            // both precisions, not rounding noise (docs/model.md §5.6).
            assert!(
                g32[r.clone()]
                    .iter()
                    .chain(&g64[r.clone()])
                    .all(|&x| x == 0.0),
                "fine.k.bias has a gradient"
            );
        }
        let rel = norm_rel(&g32[r.clone()], &g64[r.clone()]);
        let n64 = g64[r.clone()].iter().map(|x| x * x).sum::<f64>().sqrt();
        let diff = rel * n64;
        worst = worst.max(rel * (n64 > 1e-3) as u8 as f64);
        assert!(
            diff <= 1e-4 * n64 + 1e-6,
            "{}: gradient difference {diff:e}, norm {n64:e}",
            e.name
        );
    }
    eprintln!("f32 vs f64: worst per-tensor relative gradient difference {worst:.2e}");
}

#[test]
fn teacher_is_frozen_during_a_student_step() {
    let b = batch5(61);
    let (be, t) = model::<f64>(Role::Teacher, 2, 8);
    let (_, mut s) = model::<f64>(Role::Student, 2, 9);
    let db = upload(&be, &b);
    let before: Vec<Vec<f64>> = [&t.params.values, &t.params.grads, &t.params.m, &t.params.v]
        .iter()
        .map(|x| be.download(x).unwrap())
        .collect();
    let s_before = be.download(&s.params.values).unwrap();
    let mut opt = Optimizer::new(AdamWConfig::default());
    s.params.zero_grads(&be);
    student_objective(
        &be,
        &full_weight(),
        weights(&b),
        Teacher::live(&t),
        &mut s,
        &db,
        true,
    )
    .unwrap();
    let info = opt.step(&be, &mut s.params, 1e-3).unwrap();
    assert!(info.grad_norm > 0.0);
    let after: Vec<Vec<f64>> = [&t.params.values, &t.params.grads, &t.params.m, &t.params.v]
        .iter()
        .map(|x| be.download(x).unwrap())
        .collect();
    for (x, y) in before.iter().zip(&after) {
        assert!(x.iter().zip(y).all(|(a, b)| a.to_bits() == b.to_bits()));
    }
    assert_ne!(
        s_before,
        be.download(&s.params.values).unwrap(),
        "student did not move"
    );
}
