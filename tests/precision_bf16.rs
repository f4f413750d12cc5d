//! The bf16 precision scheme (docs/model.md §7) on its CPU reference,
//! [`CpuBf16Backend`]: what is stored in bf16 and what stays f32, the student objective and
//! its gradient against the f64 reference within bounds derived from bf16's unit roundoff,
//! and 200 training steps that follow the f32 run's loss curve.
//!
//! Bounds. A bf16 store keeps 8 significant bits: relative error ≤ u = 2⁻⁸ ≈ 3.9e-3 per
//! stored value (f32's is 2⁻²⁴ ≈ 6e-8). Arithmetic and every reduction run in f32, so a
//! value's error comes from the roundings of the stored values it was computed from, not from
//! the reduction length. Through a forward of two blocks and its backward a gradient element
//! depends on ≈ 40 successive stores; independent rounding errors add in quadrature, so its
//! relative error is of order √40·u/√3 ≈ 1.4e-2 (a rounding error is uniform on [−u, u]:
//! its standard deviation is u/√3). The tests allow 5e-2 in the norm of each tensor's
//! gradient, and 1e-2 on the loss value (a mean over rows, whose errors average out
//! further). The f32 run, in the same measure, is ≈ 1e-6: a bf16 run that was not rounding
//! anything would pass the bounds too, so every test also checks that the
//! bf16 buffers hold bf16 numbers and that the error is well above f32's.

mod bf16_common;
mod model_common;

use bf16_common::{
    check_gradient, loss_curve, model, objective, random_batch, weights, GRAD_REL, LOSS_REL,
};
use mgkd::backend::cpu::CpuBackend;
use mgkd::backend::cpu_bf16::{CpuBf16Backend, TaggedBuf};
use mgkd::backend::precision::round_bf16;
use mgkd::backend::{Backend, Gemm, Mut, Precision, Ref};
use mgkd::loss::{student_objective, LossConfig, StudentLoss};
use mgkd::model::{DeviceBatch, Role, Teacher};
use mgkd::optim::{AdamWConfig, Optimizer};
use model_common::schema;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn is_bf16(x: f32) -> bool {
    round_bf16(x) == x
}

#[test]
fn activations_are_bf16_and_what_the_scheme_keeps_in_f32_is_not_rounded() {
    let be = CpuBf16Backend::new();
    assert_eq!(be.precision(), Precision::Bf16);
    let b = random_batch(1, 24);
    let mut s = model(&be, Role::Student, 2, 4);
    let db = DeviceBatch::upload(&be, &b, &schema()).expect("upload");
    let fwd = s.forward(&be, &db).expect("forward");
    // The pooled representation is an activation: bf16.
    assert_eq!(fwd.hidden.dtype(), Precision::Bf16);
    assert!(fwd.hidden.values().iter().all(|&x| is_bf16(x)));
    // Logits are kept in f32, and they are not all bf16 numbers (a forward that rounded
    // them would make every one of them one).
    assert_eq!(fwd.logits.dtype(), Precision::F32);
    let off = fwd.logits.values().iter().filter(|&&x| !is_bf16(x)).count();
    assert!(
        off > fwd.logits.values().len() / 2,
        "{off} logits are not bf16"
    );
    // The weights' compute copy is the bf16 rounding of the f32 master weights, which keep
    // their full precision.
    let (values, copy) = (&s.params.values, s.params.compute());
    assert_eq!(
        (values.dtype(), copy.dtype()),
        (Precision::F32, Precision::Bf16)
    );
    assert!(values.values().iter().any(|&x| !is_bf16(x)));
    for (v, c) in values.values().iter().zip(copy.values()) {
        assert_eq!(round_bf16(*v), *c);
    }
    // One optimizer step: the moments and the updated values are f32 (an update far below
    // a bf16 ulp still moves the master weights), and the copy follows the values.
    s.params.zero_grads(&be);
    let t = model(&be, Role::Teacher, 2, 3);
    let cfg = LossConfig::spec_starting();
    student_objective(&be, &cfg, weights(&b), Teacher::live(&t), &mut s, &db, true)
        .expect("objective");
    assert!(s.params.grads.values().iter().any(|&x| !is_bf16(x)));
    let before = s.params.values.clone();
    let mut opt = Optimizer::new(AdamWConfig::default());
    opt.step(&be, &mut s.params, 1e-6).expect("step");
    let moved = before
        .values()
        .iter()
        .zip(s.params.values.values())
        .filter(|(a, b)| a != b)
        .count();
    assert!(
        moved > before.values().len() / 2,
        "a step of lr 1e-6 (far below bf16's resolution) moved only {moved} master weights"
    );
    assert_eq!(s.params.m.dtype(), Precision::F32);
    for (v, c) in s
        .params
        .values
        .values()
        .iter()
        .zip(s.params.compute().values())
    {
        assert_eq!(
            round_bf16(*v),
            *c,
            "the compute copy is refreshed after a step"
        );
    }
}

#[test]
fn student_objective_and_gradient_are_within_the_bf16_bounds_of_f64() {
    let b = random_batch(7, 32);
    let (l64, g64) = objective(&CpuBackend::<f64>::new(), &b);
    let (l32, g32) = objective(&CpuBackend::<f32>::new(), &b);
    let (lbf, gbf) = objective(&CpuBf16Backend::new(), &b);
    let loss_err = |l: &StudentLoss| (l.total - l64.total).abs() / l64.total.abs();
    eprintln!(
        "objective: f64 {:.6}, f32 {:.6} (rel {:.1e}), bf16 {:.6} (rel {:.1e})",
        l64.total,
        l32.total,
        loss_err(&l32),
        lbf.total,
        loss_err(&lbf)
    );
    assert!(
        loss_err(&lbf) <= LOSS_REL,
        "bf16 objective {lbf:?} vs {l64:?}"
    );
    let table = model(&CpuBackend::<f64>::new(), Role::Student, 2, 4)
        .params
        .table;
    let all_32 = check_gradient("f32", &table, &g32, &g64, GRAD_REL);
    let all_bf = check_gradient("bf16", &table, &gbf, &g64, GRAD_REL);
    assert!(
        all_bf > 100.0 * all_32,
        "the bf16 gradient is as exact as f32's ({all_bf:e} vs {all_32:e}): nothing was rounded"
    );
}

#[test]
fn two_hundred_bf16_training_steps_follow_the_f32_loss_curve() {
    let steps = 200;
    let f32_run = loss_curve(&CpuBackend::<f32>::new(), steps);
    let bf16_run = loss_curve(&CpuBf16Backend::new(), steps);
    // Each step's loss differs by the objective's own rounding error (≈ 2e-3 measured,
    // LOSS_REL = 1e-2 allowed above) plus the drift of the parameters, whose every update
    // differs by the gradient's rounding error (≈ 1 % of it, uncorrelated from step to
    // step, so it averages out): the bound allows 2 % at every step and 0.5 % on the mean of
    // the last 50 steps, where training has settled.
    let mut worst = 0.0f64;
    for (k, (a, b)) in f32_run.iter().zip(&bf16_run).enumerate() {
        let rel = (a - b).abs() / a.abs();
        worst = worst.max(rel);
        assert!(rel <= 2e-2, "step {k}: f32 loss {a}, bf16 {b}");
    }
    let tail = |v: &[f64]| v[steps - 50..].iter().sum::<f64>() / 50.0;
    let (ta, tb) = (tail(&f32_run), tail(&bf16_run));
    eprintln!(
        "loss: first {:.4} → last-50 mean f32 {ta:.4}, bf16 {tb:.4}; worst step difference {worst:.2e}",
        f32_run[0]
    );
    assert!(
        ta < 0.9 * f32_run[0],
        "the f32 run did not train: {ta} vs {}",
        f32_run[0]
    );
    assert!(
        (ta - tb).abs() <= 5e-3 * ta,
        "last-50 mean: f32 {ta}, bf16 {tb}"
    );
    assert!(worst > 0.0, "the runs are identical: bf16 rounded nothing");
}

#[test]
fn tagged_buffers_round_on_construction_only_when_bf16() {
    let x = vec![1.0 + 1.0 / 150.0, -5.123_457, 1e-20];
    let f = TaggedBuf::f32(x.clone());
    assert_eq!(f.values(), x);
    let h = TaggedBuf::bf16(x.clone());
    assert!(h.values().iter().all(|&v| is_bf16(v)));
    assert_eq!(
        h.values()[0],
        1.0 + 1.0 / 128.0,
        "nearest bf16 of 1 + 1/150"
    );
}

#[test]
fn a_product_takes_an_f32_operand_in_bf16_only_beside_a_bf16_one() {
    let (be, cpu) = (CpuBf16Backend::new(), CpuBackend::<f32>::new());
    let (m, n, k) = (3, 4, 5);
    let shape = Gemm::new(m, n, k, false, false);
    // A in f32 and not bf16 numbers; B as bf16 numbers, held once as f32 and once as bf16.
    let a: Vec<f32> = (0..m * k).map(|i| 1.0 + i as f32 / 300.0).collect();
    let b: Vec<f32> = (0..k * n)
        .map(|i| round_bf16(0.5 - i as f32 / 70.0))
        .collect();
    let a_rounded: Vec<f32> = a.iter().map(|&x| round_bf16(x)).collect();
    let product = |a: &[f32]| {
        let mut c = vec![f32::NAN; m * n];
        cpu.gemm(
            &shape,
            1.0,
            Ref::whole(&a.to_vec()),
            Ref::whole(&b),
            0.0,
            Mut::whole(&mut c),
        );
        c
    };
    let run = |bb: &TaggedBuf| {
        let mut c = be.scratch_full(m * n).expect("scratch");
        let ta = be.upload(&a).expect("upload");
        be.gemm(
            &shape,
            1.0,
            Ref::whole(&ta),
            Ref::whole(bb),
            0.0,
            Mut::whole(&mut c),
        );
        assert_eq!(c.dtype(), Precision::F32);
        c.values().to_vec()
    };
    assert_ne!(product(&a), product(&a_rounded), "the rounding must show");
    assert_eq!(run(&TaggedBuf::bf16(b.clone())), product(&a_rounded));
    assert_eq!(run(&TaggedBuf::f32(b.clone())), product(&a));
}

/// Random numbers that are exact bf16 values (so both backends read the same inputs).
fn bf16_values(seed: u64, n: usize) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n)
        .map(|_| round_bf16(rng.gen_range(-2.0f32..2.0)))
        .collect()
}

/// Operations the model tests do not reach through the reference (the f32 backend runs
/// them inside its attention and linear compositions), each on bf16 buffers: the output is
/// the f32 backend's on the same numbers, rounded to bf16, element for element; an f32
/// output (LayerNorm statistics) is not rounded.
#[test]
fn each_operation_is_the_f32_one_rounded_on_store() {
    let (be, cpu) = (CpuBf16Backend::new(), CpuBackend::<f32>::new());
    let tag = |v: &[f32]| TaggedBuf::bf16(v.to_vec());
    let rounded = |v: Vec<f32>| v.into_iter().map(round_bf16).collect::<Vec<f32>>();
    let poison = |n: usize| vec![f32::NAN; n];
    let (batch, heads, l, d) = (2, 2, 5, 4);
    let lens_host = vec![3u32, 0];
    let lens = be.upload_ids(&lens_host).expect("ids");

    // masked_softmax and its backward.
    let n = batch * heads * l * l;
    let s0 = bf16_values(1, n);
    let (mut got, mut want) = (tag(&s0), s0.clone());
    be.masked_softmax(batch, heads, l, l, &lens, 0, 0.5, Mut::whole(&mut got));
    cpu.masked_softmax(
        batch,
        heads,
        l,
        l,
        &lens_host,
        0,
        0.5,
        Mut::whole(&mut want),
    );
    assert_eq!(got.values(), rounded(want.clone()), "masked_softmax");
    let (p, dp) = (got.values().to_vec(), bf16_values(2, n));
    let (mut got_ds, mut want_ds) = (tag(&poison(n)), poison(n));
    be.masked_softmax_backward(
        batch,
        heads,
        l,
        l,
        &lens,
        0.5,
        Ref::whole(&tag(&p)),
        Ref::whole(&tag(&dp)),
        Mut::whole(&mut got_ds),
    );
    cpu.masked_softmax_backward(
        batch,
        heads,
        l,
        l,
        &lens_host,
        0.5,
        Ref::whole(&p),
        Ref::whole(&dp),
        Mut::whole(&mut want_ds),
    );
    assert_eq!(got_ds.values(), rounded(want_ds), "masked_softmax_backward");

    // gemm_outer: heads outer, rows inner, as attention runs its products.
    let (m, k) = (l, d);
    let g = Gemm {
        batch,
        stride_a: m * k,
        stride_b: m * k,
        stride_c: m * m,
        ..Gemm::new(m, m, k, false, true)
    };
    let outer = mgkd::backend::Outer {
        count: heads,
        stride_a: batch * m * k,
        stride_b: batch * m * k,
        stride_c: batch * m * m,
    };
    let (a, b) = (
        bf16_values(3, heads * batch * m * k),
        bf16_values(4, heads * batch * m * k),
    );
    let (mut got_c, mut want_c) = (tag(&poison(n)), poison(n));
    be.gemm_outer(
        &g,
        &outer,
        1.0,
        Ref::whole(&tag(&a)),
        Ref::whole(&tag(&b)),
        0.0,
        Mut::whole(&mut got_c),
    );
    cpu.gemm_outer(
        &g,
        &outer,
        1.0,
        Ref::whole(&a),
        Ref::whole(&b),
        0.0,
        Mut::whole(&mut want_c),
    );
    assert_eq!(got_c.values(), rounded(want_c), "gemm_outer");

    // add_bias (accumulates into y), gelu.
    let (rows, cols) = (3, 7);
    let (y0, bias) = (bf16_values(5, rows * cols), bf16_values(6, cols));
    let (mut got_y, mut want_y) = (tag(&y0), y0.clone());
    be.add_bias(rows, cols, Ref::whole(&tag(&bias)), Mut::whole(&mut got_y));
    cpu.add_bias(rows, cols, Ref::whole(&bias), Mut::whole(&mut want_y));
    assert_eq!(got_y.values(), rounded(want_y), "add_bias");
    let (mut got_g, mut want_g) = (tag(&poison(rows * cols)), poison(rows * cols));
    be.gelu(rows * cols, Ref::whole(&tag(&y0)), Mut::whole(&mut got_g));
    cpu.gelu(rows * cols, Ref::whole(&y0), Mut::whole(&mut want_g));
    assert_eq!(got_g.values(), rounded(want_g), "gelu");

    // layernorm: y in bf16, the statistics in f32 (not rounded).
    let (x, gb) = (bf16_values(7, rows * cols), bf16_values(8, 2 * cols));
    let mut got_ln = tag(&poison(rows * cols));
    let mut got_st = be.scratch_full(rows * 2).expect("scratch");
    let (mut want_ln, mut want_st) = (poison(rows * cols), poison(rows * 2));
    be.layernorm(
        rows,
        cols,
        Ref::whole(&tag(&x)),
        Ref::whole(&tag(&gb)),
        Mut::whole(&mut got_ln),
        Mut::whole(&mut got_st),
    );
    cpu.layernorm(
        rows,
        cols,
        Ref::whole(&x),
        Ref::whole(&gb),
        Mut::whole(&mut want_ln),
        Mut::whole(&mut want_st),
    );
    assert_eq!(got_ln.values(), rounded(want_ln), "layernorm output");
    assert_eq!(got_st.values(), want_st, "layernorm statistics stay f32");
    assert!(got_st.values().iter().any(|&v| !is_bf16(v)));
}
