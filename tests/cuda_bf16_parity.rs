//! The bf16 precision scheme on the GPU (docs/model.md §7, docs/cuda.md "bf16"): the CUDA
//! backend opened with `Precision::Bf16` (bf16 activations and weight copy, tensor-core
//! products with f32 accumulation, f32 master weights and statistics), against its CPU
//! reference [`CpuBf16Backend`] and against the f64 CPU backend, for both attention
//! implementations (the composition, the default, and the fused kernels).
//!
//! Bounds. Against f64 the scheme's own bounds (tests/precision_bf16.rs derives them from
//! bf16's unit roundoff u = 2⁻⁸: 5e-2 per gradient tensor, 1e-2 on the objective). Against the
//! reference the GPU performs the same roundings in another summation order, which moves a
//! stored value by one bf16 ulp only where its f32 value lies within f32 noise of a rounding
//! boundary, but it also stores a few values the reference keeps in f32 inside one operation:
//! the composed attention stores its scores, its probabilities before P·V, and in the
//! backward dP and dS in bf16 (four more stores on a chain of ≈ 40, each of relative error
//! ≤ u; the reference runs the composition in f32 and rounds only the saved probabilities and
//! the outputs). Those extra roundings give an error of order u ≈ 4e-3 on a gradient;
//! the tests allow 2e-2 per tensor and 5e-3 on the objective. Device and host must round
//! identically (to nearest, ties to even): that is checked bit for bit.
//!
//! Without a GPU every test reports a skip (`MGKD_REQUIRE_GPU=1` makes that a failure);
//! `MGKD_PARITY_SELFTEST=1` runs the comparisons with the CPU reference in the device's place
//! (a check of the harness and of the bounds against f64).

mod bf16_common;
mod cuda_common;
mod kernel_emu;
mod model_common;
mod skip;

use std::sync::OnceLock;

use bf16_common::{check_gradient, loss_curve, model, objective, random_batch, GRAD_REL, LOSS_REL};
use cuda_common::{gpu, selftest};
use mgkd::backend::cpu::CpuBackend;
use mgkd::backend::cpu_bf16::CpuBf16Backend;
use mgkd::backend::cuda::{AttentionKernels, CudaBackend};
use mgkd::backend::precision::round_bf16;
use mgkd::backend::{AttnShape, Backend, Mut, Precision, Ref};
use mgkd::loss::StudentLoss;
use mgkd::model::Role;

/// Bound on each gradient tensor's relative difference from the CPU reference (see the
/// module documentation).
const REF_GRAD_REL: f64 = 2e-2;
/// Bound on the objective's relative difference from the CPU reference.
const REF_LOSS_REL: f64 = 5e-3;
/// Norm-wise relative bound on each output of attention as one operation (ctx, dQ, dK, dV)
/// against f64 on bf16 inputs; see [`attention_on_bf16_inputs_is_within_the_bf16_bound`].
const ATTENTION_REL: f64 = 1e-2;

/// The bf16 CUDA backends of the process (composed and fused attention), or none without a
/// GPU (the skip is reported by [`gpu`]).
fn bf16_gpus() -> Vec<(&'static str, &'static CudaBackend)> {
    static GPUS: OnceLock<Vec<(&'static str, CudaBackend)>> = OnceLock::new();
    if gpu().is_none() {
        return Vec::new();
    }
    GPUS.get_or_init(|| {
        let open = || CudaBackend::with_precision(0, Precision::Bf16).expect("a bf16 backend");
        let composed = open();
        let mut fused = open();
        fused.set_attention_kernels(AttentionKernels::Fused);
        vec![
            ("cuda bf16, composed attention", composed),
            ("cuda bf16, fused attention", fused),
        ]
    })
    .iter()
    .map(|(label, be)| (*label, be))
    .collect()
}

fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs()
}

/// Rounds values through `be` twice, by the f32 → bf16 copy (on CUDA the conversion kernel)
/// and by `write` into a bf16 buffer (on CUDA the host's conversion), and checks both
/// against `half`'s rounding bit for bit.
fn check_rounding<B: Backend<F = f32>>(label: &str, be: &B) {
    assert_eq!(be.precision(), Precision::Bf16);
    // Ties both ways, values just off a tie, subnormals, overflow to ∞, ∞, signed zero.
    let mut host: Vec<f32> = vec![
        1.0 + 1.0 / 256.0,
        1.0 + 3.0 / 256.0,
        -(1.0 + 1.0 / 256.0),
        f32::from_bits(0x3f80_8001),
        f32::from_bits(0x3f80_7fff),
        1e-40,
        -3e-39,
        3.4e38,
        f32::MAX,
        f32::INFINITY,
        f32::NEG_INFINITY,
        -0.0,
        0.0,
    ];
    let mut x = 0x1234_5678u32;
    host.extend((0..4096).map(|_| {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        // Every sign and mantissa, exponents below 2⁰ (finite).
        f32::from_bits(x & 0xbfff_ffff)
    }));
    let n = host.len();
    let src = be.upload(&host).expect("upload");
    let mut dev = be.scratch(n).expect("scratch");
    be.copy(n, Ref::whole(&src), Mut::whole(&mut dev));
    let mut hst = be.scratch(n).expect("scratch");
    be.write(&host, Mut::whole(&mut hst)).expect("write");
    let (d, h) = (
        be.download(&dev).expect("dl"),
        be.download(&hst).expect("dl"),
    );
    for (i, ((a, b), v)) in d.iter().zip(&h).zip(&host).enumerate() {
        let want = round_bf16(*v);
        assert!(
            a.to_bits() == want.to_bits() && b.to_bits() == want.to_bits(),
            "{label}: element {i} ({v:e}): copied {a:e}, written {b:e}, half {want:e}"
        );
    }
    // A NaN stays a NaN.
    let nan = be.upload(&[f32::NAN]).expect("upload");
    let mut out = be.scratch(1).expect("scratch");
    be.copy(1, Ref::whole(&nan), Mut::whole(&mut out));
    assert!(be.download(&out).expect("dl")[0].is_nan(), "{label}: NaN");
    println!("{label}: {n} values rounded as the host rounds them");
}

#[test]
fn the_device_rounds_to_bf16_as_the_host_does() {
    let gpus = bf16_gpus();
    if gpus.is_empty() && selftest() {
        check_rounding("cpu-bf16 (self-test)", &CpuBf16Backend::new());
    }
    if let Some((label, be)) = gpus.first() {
        check_rounding(label, *be);
    }
}

/// Checks the student objective `(l, g)` of `label` against the reference and f64.
fn check_objective(
    label: &str,
    (l, g): &(StudentLoss, Vec<f64>),
    (lref, gref): &(StudentLoss, Vec<f64>),
    (l64, g64): &(StudentLoss, Vec<f64>),
) {
    let table = model(&CpuBackend::<f64>::new(), Role::Student, 2, 4)
        .params
        .table;
    eprintln!(
        "{label}: objective {:.6}, cpu-bf16 {:.6} (rel {:.1e}), f64 {:.6} (rel {:.1e})",
        l.total,
        lref.total,
        rel(l.total, lref.total),
        l64.total,
        rel(l.total, l64.total)
    );
    assert!(
        rel(l.total, lref.total) <= REF_LOSS_REL,
        "{label}: objective {l:?} vs the reference's {lref:?}"
    );
    assert!(
        rel(l.total, l64.total) <= LOSS_REL,
        "{label}: objective {l:?} vs f64 {l64:?}"
    );
    check_gradient(
        &format!("{label} vs cpu-bf16"),
        &table,
        g,
        gref,
        REF_GRAD_REL,
    );
    let all = check_gradient(&format!("{label} vs cpu-f64"), &table, g, g64, GRAD_REL);
    // f32's whole-gradient error here is ≈ 3e-7: a run at 100× that rounded something.
    assert!(
        all > 3e-5,
        "{label}: the gradient is as exact as f32's ({all:e})"
    );
}

#[test]
fn student_objective_and_gradient_match_the_reference_and_the_scheme_bounds() {
    let gpus = bf16_gpus();
    if gpus.is_empty() && !selftest() {
        return;
    }
    let b = random_batch(7, 32);
    let want64 = objective(&CpuBackend::<f64>::new(), &b);
    let reference = objective(&CpuBf16Backend::new(), &b);
    if gpus.is_empty() {
        println!("harness self-test: the CPU reference in the device's place");
        return check_objective("cpu-bf16 (self-test)", &reference, &reference, &want64);
    }
    for (label, be) in gpus {
        let got = objective(be, &b);
        check_objective(label, &got, &reference, &want64);
        let again = objective(be, &b);
        assert!(
            got.1 == again.1 && got.0.total == again.0.total,
            "{label}: two runs differ"
        );
    }
}

#[test]
fn thirty_training_steps_follow_the_reference_loss_curve() {
    let gpus = bf16_gpus();
    if gpus.is_empty() && !selftest() {
        return;
    }
    let steps = 30;
    let reference = loss_curve(&CpuBf16Backend::new(), steps);
    let f32_run = loss_curve(&CpuBackend::<f32>::new(), steps);
    let runs: Vec<(&str, Vec<f64>)> = if gpus.is_empty() {
        vec![("cpu-bf16 (self-test)", reference.clone())]
    } else {
        gpus.iter()
            .map(|(label, be)| (*label, loss_curve(*be, steps)))
            .collect()
    };
    for (label, run) in runs {
        // The reference's own distance to f32 is ≤ 2e-2 per step (tests/precision_bf16.rs);
        // the device's to the reference is bounded the same way.
        let mut worst = (0.0f64, 0.0f64);
        for (k, ((a, r), f)) in run.iter().zip(&reference).zip(&f32_run).enumerate() {
            let (dr, df) = (rel(*a, *r), rel(*a, *f));
            worst = (worst.0.max(dr), worst.1.max(df));
            assert!(dr <= 2e-2, "{label}: step {k}: loss {a}, reference {r}");
            assert!(df <= 2e-2, "{label}: step {k}: loss {a}, f32 {f}");
        }
        eprintln!(
            "{label}: {steps} steps, loss {:.4} → {:.4}; worst step difference {:.2e} from the \
             reference, {:.2e} from f32",
            run[0],
            run[steps - 1],
            worst.0,
            worst.1
        );
    }
}

/// Relative errors (ctx, dQ, dK, dV) against the f64 composition of [`Backend::attention`] and
/// its backward on `be`, for a shape and key lengths, on bf16-exact random inputs; with the
/// outputs (bit patterns) for a comparison of two runs.
fn attention_errors<B: Backend<F = f32>>(
    be: &B,
    s: &AttnShape,
    lens: &[u32],
    seed: u64,
) -> ([f64; 4], Vec<u32>) {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut values = |n: usize, scale: f32| -> Vec<f32> {
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                round_bf16(scale * (2.0 * ((x >> 40) as f32 / (1u64 << 24) as f32) - 1.0))
            })
            .collect()
    };
    let tokens = s.batch * s.len;
    let (qkv_h, dctx_h) = (values(tokens * 3 * s.d, 2.0), values(tokens * s.d, 1.0));
    let scale = 1.0 / (s.dh() as f32).sqrt();

    let ids = be.upload_ids(lens).expect("lens");
    let act = |host: &[f32]| {
        let mut b = be.scratch(host.len()).expect("scratch");
        be.write(host, Mut::whole(&mut b)).expect("write");
        b
    };
    let poisoned = |n: usize| act(&vec![f32::NAN; n]);
    let (qkv, dctx) = (act(&qkv_h), act(&dctx_h));
    let mut ctx = poisoned(tokens * s.d);
    let mut dqkv = poisoned(tokens * 3 * s.d);
    let mut saved = be.attention_saved(s).expect("saved");
    let n_saved = be.len(&saved);
    be.write(&vec![f32::NAN; n_saved], Mut::whole(&mut saved))
        .expect("poison");
    be.attention(
        s,
        &ids,
        scale,
        Ref::whole(&qkv),
        Mut::whole(&mut ctx),
        Mut::whole(&mut saved),
    );
    be.attention_backward(
        s,
        &ids,
        scale,
        Ref::whole(&qkv),
        Ref::whole(&saved),
        Ref::whole(&dctx),
        Mut::whole(&mut dqkv),
    )
    .expect("attention backward");
    let (got_ctx, got_dqkv) = (
        be.download(&ctx).expect("dl"),
        be.download(&dqkv).expect("dl"),
    );

    let f64be = CpuBackend::<f64>::new();
    let widen = |v: &[f32]| v.iter().map(|&y| y as f64).collect::<Vec<f64>>();
    let ids64 = f64be.upload_ids(lens).expect("lens");
    let qkv64 = f64be.upload(&widen(&qkv_h)).expect("qkv");
    let dctx64 = f64be.upload(&widen(&dctx_h)).expect("dctx");
    let mut ctx64 = f64be.zeros(tokens * s.d).expect("ctx");
    let mut dqkv64 = f64be.zeros(tokens * 3 * s.d).expect("dqkv");
    let mut saved64 = f64be.attention_saved(s).expect("saved");
    let scale64 = scale as f64;
    f64be.attention(
        s,
        &ids64,
        scale64,
        Ref::whole(&qkv64),
        Mut::whole(&mut ctx64),
        Mut::whole(&mut saved64),
    );
    f64be
        .attention_backward(
            s,
            &ids64,
            scale64,
            Ref::whole(&qkv64),
            Ref::whole(&saved64),
            Ref::whole(&dctx64),
            Mut::whole(&mut dqkv64),
        )
        .expect("f64 backward");
    let (want_ctx, want_dqkv) = (
        f64be.download(&ctx64).expect("dl"),
        f64be.download(&dqkv64).expect("dl"),
    );

    let err = |got: &[f32], want: &[f64], pick: &dyn Fn(usize) -> bool| {
        let (mut num, mut den) = (0.0f64, 0.0f64);
        for (k, (g, w)) in got.iter().zip(want).enumerate() {
            if pick(k) {
                num += (*g as f64 - w) * (*g as f64 - w);
                den += w * w;
            }
        }
        (num / den.max(1e-300)).sqrt()
    };
    let d = s.d;
    let errs = [
        err(&got_ctx, &want_ctx, &|_| true),
        err(&got_dqkv, &want_dqkv, &|k| (k % (3 * d)) / d == 0),
        err(&got_dqkv, &want_dqkv, &|k| (k % (3 * d)) / d == 1),
        err(&got_dqkv, &want_dqkv, &|k| (k % (3 * d)) / d == 2),
    ];
    let bits = got_ctx
        .iter()
        .chain(&got_dqkv)
        .map(|v| v.to_bits())
        .collect();
    (errs, bits)
}

/// Attention as one operation under the bf16 scheme, forward and backward, on bf16 inputs,
/// against the f64 composition on the same values: the composition (scores and probabilities
/// stored in bf16) and the fused kernels (tensor cores for heads of 16 to 64 columns on sm_80
/// and later, CUDA cores otherwise), each output within [`ATTENTION_REL`] in norm, NaN-poisoned
/// outputs all written, and two runs bit-identical.
///
/// The bound: each output is a sum of terms that carry one or two bf16 roundings (a stored
/// score or probability, a stored ds; relative ≤ u/2 each, u = 2⁻⁸) and is rounded once
/// itself, so its error is of order u ≈ 3.9e-3 in norm; 1e-2 leaves room for the
/// cancellation in ds = p·(dp − D). Measured: the CPU reference's composition (this test's
/// self-test) 0.5e-3 to 2.8e-3, the tensor-core kernels under emulation 0.6e-3 to 3.0e-3
/// (tests/attention_emulated.rs).
#[test]
fn attention_on_bf16_inputs_is_within_the_bf16_bound() {
    let gpus = bf16_gpus();
    if gpus.is_empty() && !selftest() {
        return;
    }
    let reference = CpuBf16Backend::new();
    let backends: Vec<(&str, &dyn AttentionRunner)> = if gpus.is_empty() {
        vec![("cpu-bf16 (self-test)", &reference)]
    } else {
        gpus.iter()
            .map(|(l, be)| (*l, *be as &dyn AttentionRunner))
            .collect()
    };
    // (batch, len, heads, dh, key lengths): head widths 16 to 64 (tensor cores), 8 (CUDA
    // cores), the §8 shapes, lengths off 16 and past a 64-key chunk, empty and full rows, and
    // a length too long for the CUDA-core tables.
    let cases: [(usize, usize, usize, usize, &[u32]); 7] = [
        (3, 19, 2, 16, &[19, 0, 7]),
        (2, 70, 2, 32, &[70, 65]),
        (2, 33, 1, 64, &[1, 33]),
        (4, 32, 4, 32, &[32, 5, 0, 17]),
        (3, 128, 4, 32, &[128, 101, 64]),
        (5, 11, 3, 8, &[11, 3, 0, 9, 1]),
        (2, 200, 4, 32, &[200, 150]),
    ];
    for (label, be) in backends {
        for (k, (batch, len, heads, dh, lens)) in cases.iter().enumerate() {
            let s = AttnShape {
                batch: *batch,
                len: *len,
                heads: *heads,
                d: heads * dh,
            };
            let (errs, bits) = be.errors(&s, lens, k as u64 + 1);
            let (again, bits2) = be.errors(&s, lens, k as u64 + 1);
            let [c, dq, dk, dv] = errs;
            eprintln!(
                "{label}: b={batch} l={len} h={heads} dh={dh}: relative error vs f64: ctx \
                 {c:.2e}, dQ {dq:.2e}, dK {dk:.2e}, dV {dv:.2e}"
            );
            for (name, e) in [("ctx", c), ("dQ", dq), ("dK", dk), ("dV", dv)] {
                assert!(
                    e <= ATTENTION_REL,
                    "{label}: b={batch} l={len} h={heads} dh={dh}: {name} {e:e} (NaN: not written)"
                );
            }
            assert!(
                bits == bits2 && errs == again,
                "{label}: b={batch} l={len} h={heads} dh={dh}: two runs differ"
            );
        }
    }
}

/// [`attention_errors`] behind a trait object (the GPU and CPU backends in one list).
trait AttentionRunner {
    fn errors(&self, s: &AttnShape, lens: &[u32], seed: u64) -> ([f64; 4], Vec<u32>);
}

impl<B: Backend<F = f32>> AttentionRunner for B {
    fn errors(&self, s: &AttnShape, lens: &[u32], seed: u64) -> ([f64; 4], Vec<u32>) {
        attention_errors(self, s, lens, seed)
    }
}
