//! The fused attention kernels run on the CPU: their own source, compiled by g++ against the
//! CUDA emulation of `tests/kernel_emu/shim.h` (one block at a time, threads as fibers,
//! barriers, shuffles, and `mma.sync.m16n8k16` rebuilt from the fragment layouts of the PTX
//! ISA), on random bf16-exact inputs, against the f64 CPU composition of
//! [`Backend::attention`] on the same inputs. It checks what a GPU run checks of the kernels'
//! indexing, masking, chunking and statistics, without a GPU; it cannot check the hardware
//! (the emulated mma lays out its fragments as the kernel's header states and sums its
//! products in f64). `tests/cuda_parity.rs` and `tests/cuda_bf16_parity.rs` run the same
//! kernels on a GPU.
//!
//! Three kernel sets ([`VARIANTS`]): the tensor-core kernels (`kernels/attention_mma.cu`,
//! bf16), and the CUDA-core kernels (`kernels/attention.cu`) in bf16 and in f32. The f32 ones
//! passed on a GPU (H200, 2026-12-04): the emulation must reproduce them to f32's accuracy,
//! a check of the emulation itself.
//!
//! Bounds (u = 2⁻⁸, bf16's unit roundoff). The tensor-core kernels round each probability
//! once (relative error ≤ u/2) before P·V, each ds once before dS·K and dSᵀ·Q, and each output
//! once; scores, sums and statistics stay in f32. An output is a sum of terms with one or two
//! such roundings, and is rounded itself: its error is of order u ≈ 3.9e-3 in norm, and the
//! bound, 1e-2, leaves room for the cancellation in ds = p·(dp − D) (the rounded p also moves
//! D). Measured here: 0.6e-3 to 3.0e-3. The CUDA-core kernels in bf16 round only their
//! outputs (same bound; measured 0.5e-3 to 1.7e-3); in f32, 1e-5 as tests/cuda_parity.rs
//! (measured 0.4e-7 to 2.3e-7). The statistics: m (the max of
//! f32 scores) and 1/Σ within 1e-5 relative of f64 (f32 exponentials and sums of ≤ 272 terms).

mod kernel_emu;
mod skip;

use half::bf16;
use kernel_emu::{Arg, Data, Emulator, Launch};
use mgkd::backend::cpu::CpuBackend;
use mgkd::backend::cuda::attention::{cores_smem, mma_smem};
use mgkd::backend::{AttnShape, Backend, Mut, Ref};

/// Relative bound on the saved statistics m and 1/Σ.
const STAT_REL: f64 = 1e-5;

/// MGKD_ERR_LEN (kernels/common.cuh).
const ERR_LEN: u32 = 2;

/// One set of fused attention kernels.
struct Variant {
    /// The set, in messages.
    name: &'static str,
    /// Kernel file in `kernels/`.
    file: &'static str,
    /// The three kernels: forward, query pass, key pass.
    kernels: [&'static str; 3],
    /// Whether the element type is bf16 (else f32).
    bf16: bool,
    /// Norm-wise relative bound on ctx, dQ, dK, dV and D against f64.
    rel: f64,
}

/// The kernel sets this test runs (module documentation).
const VARIANTS: [Variant; 3] = [
    Variant {
        name: "tensor cores, bf16",
        file: "attention_mma.cu",
        kernels: [
            "attn_mma_forward_bf16",
            "attn_mma_backward_q_bf16",
            "attn_mma_backward_kv_bf16",
        ],
        bf16: true,
        rel: 1e-2,
    },
    Variant {
        name: "CUDA cores, bf16",
        file: "attention.cu",
        kernels: [
            "attn_forward_bf16",
            "attn_backward_q_bf16",
            "attn_backward_kv_bf16",
        ],
        bf16: true,
        rel: 1e-2,
    },
    Variant {
        name: "CUDA cores, f32",
        file: "attention.cu",
        kernels: [
            "attn_forward_f32",
            "attn_backward_q_f32",
            "attn_backward_kv_f32",
        ],
        bf16: false,
        rel: 1e-5,
    },
];

/// Dynamic shared memory of the forward, query pass and key pass of `v` for shape `s`, in
/// bytes: what the backend gives them (`mma_smem`, `cores_smem`).
fn smem(v: &Variant, s: &AttnShape) -> [u32; 3] {
    let bytes = if v.file == "attention_mma.cu" {
        mma_smem(s)
    } else {
        cores_smem(s)
    };
    bytes
        .unwrap_or_else(|| panic!("{}: the backend does not run shape {s:?}", v.name))
        .map(|x| x as u32)
}

/// One attention case: shape, key lengths, scale, and bf16 inputs.
struct Case {
    s: AttnShape,
    lens: Vec<u32>,
    scale: f32,
    qkv: Vec<bf16>,
    dctx: Vec<bf16>,
}

/// What the kernels wrote (widened to f64).
struct Emulated {
    ctx: Vec<f64>,
    saved: Vec<f64>,
    dqkv: Vec<f64>,
    dsum: Vec<f64>,
    err: u32,
}

/// A small xorshift generator (the cases are fixed by their seeds).
struct Rng(u64);

impl Rng {
    fn uniform(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }

    fn values(&mut self, n: usize, scale: f64) -> Vec<bf16> {
        (0..n)
            .map(|_| bf16::from_f64(scale * (2.0 * self.uniform() - 1.0)))
            .collect()
    }
}

impl Case {
    fn new(seed: u64, batch: usize, len: usize, heads: usize, dh: usize, lens: Vec<u32>) -> Case {
        assert_eq!(lens.len(), batch);
        let mut r = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        let d = heads * dh;
        Case {
            s: AttnShape {
                batch,
                len,
                heads,
                d,
            },
            lens,
            scale: 1.0 / (dh as f32).sqrt(),
            // Scores of a few units: softmax rows neither flat nor one-hot.
            qkv: r.values(batch * len * 3 * d, 2.0),
            dctx: r.values(batch * len * d, 1.0),
        }
    }

    fn label(&self) -> String {
        let s = &self.s;
        format!(
            "b={} l={} h={} dh={} lens={:?}",
            s.batch,
            s.len,
            s.heads,
            s.dh(),
            self.lens
        )
    }

    /// Runs the emulated kernels of `v`, launched as the backend launches them (`None`: no
    /// emulator here).
    fn emulate(&self, v: &Variant) -> Option<Emulated> {
        let s = &self.s;
        let emu = Emulator::of(v.file)?;
        let tokens = s.batch * s.len;
        let rows = s.batch * s.heads * s.len;
        let elems = |x: &[bf16]| {
            if v.bf16 {
                Data::Bf16(x.iter().map(|y| y.to_bits()).collect())
            } else {
                Data::F32(x.iter().map(|y| y.to_f32()).collect())
            }
        };
        let poisoned = |n: usize| {
            if v.bf16 {
                Data::bf16_nan(n)
            } else {
                Data::f32_nan(n)
            }
        };
        // 0 lens, 1 qkv, 2 ctx, 3 saved, 4 dctx, 5 dqkv, 6 dsum, 7 err.
        let mut bufs = vec![
            Data::U32(self.lens.clone()),
            elems(&self.qkv),
            poisoned(tokens * s.d),
            Data::f32_nan(rows * 2),
            elems(&self.dctx),
            poisoned(tokens * 3 * s.d),
            Data::f32_nan(rows),
            Data::U32(vec![0]),
        ];
        let shape = [s.heads, s.len, s.dh()].map(|x| Arg::Int(x as i64));
        let [sf, sq, sk] = smem(v, s);
        let launch = |kernel, smem, tail: &[usize]| Launch {
            kernel,
            grid: ((s.batch * s.heads) as u32, 1),
            block: 128,
            smem,
            args: shape
                .iter()
                .copied()
                .chain([Arg::Buf(0), Arg::F32(self.scale)])
                .chain(tail.iter().map(|&i| Arg::Buf(i)))
                .collect(),
        };
        emu.run(
            &mut bufs,
            &[
                launch(v.kernels[0], sf, &[1, 2, 3, 7]),
                launch(v.kernels[1], sq, &[1, 3, 4, 5, 6, 7]),
                launch(v.kernels[2], sk, &[1, 3, 4, 6, 5, 7]),
            ],
        );
        let Data::U32(err) = &bufs[7] else {
            unreachable!("the error word")
        };
        Some(Emulated {
            ctx: bufs[2].to_f64(),
            saved: bufs[3].to_f64(),
            dqkv: bufs[5].to_f64(),
            dsum: bufs[6].to_f64(),
            err: err[0],
        })
    }

    /// The f64 CPU composition on the same inputs: (ctx, dqkv).
    fn reference(&self) -> (Vec<f64>, Vec<f64>) {
        let be = CpuBackend::<f64>::new();
        let s = &self.s;
        let widen = |v: &[bf16]| v.iter().map(|x| x.to_f64()).collect::<Vec<f64>>();
        let lens = be.upload_ids(&self.lens).expect("lens");
        let qkv = be.upload(&widen(&self.qkv)).expect("qkv");
        let dctx = be.upload(&widen(&self.dctx)).expect("dctx");
        let mut ctx = be.zeros(s.batch * s.len * s.d).expect("ctx");
        let mut saved = be.attention_saved(s).expect("saved");
        let mut dqkv = be.zeros(s.batch * s.len * 3 * s.d).expect("dqkv");
        let scale = self.scale as f64;
        be.attention(
            s,
            &lens,
            scale,
            Ref::whole(&qkv),
            Mut::whole(&mut ctx),
            Mut::whole(&mut saved),
        );
        be.attention_backward(
            s,
            &lens,
            scale,
            Ref::whole(&qkv),
            Ref::whole(&saved),
            Ref::whole(&dctx),
            Mut::whole(&mut dqkv),
        )
        .expect("backward");
        (
            be.download(&ctx).expect("ctx"),
            be.download(&dqkv).expect("dqkv"),
        )
    }

    /// Per query row (b, h, i), in f64 from the inputs: the softmax's max m of s·scale, 1/Σ,
    /// and D = Σ_j p_j·dp_j (zeros for a row without keys).
    fn statistics(&self) -> Vec<[f64; 3]> {
        let s = &self.s;
        let (d, dh) = (s.d, s.dh());
        let q = |b: usize, i: usize, h: usize, part: usize, c: usize| {
            self.qkv[(b * s.len + i) * 3 * d + part * d + h * dh + c].to_f64()
        };
        let mut out = Vec::new();
        for b in 0..s.batch {
            let l = (self.lens[b] as usize).min(s.len);
            for h in 0..s.heads {
                for i in 0..s.len {
                    if l == 0 {
                        out.push([0.0; 3]);
                        continue;
                    }
                    let scores: Vec<f64> = (0..l)
                        .map(|j| {
                            (0..dh)
                                .map(|c| q(b, i, h, 0, c) * q(b, j, h, 1, c))
                                .sum::<f64>()
                                * self.scale as f64
                        })
                        .collect();
                    let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let sum: f64 = scores.iter().map(|x| (x - m).exp()).sum();
                    let dsum: f64 = (0..l)
                        .map(|j| {
                            let dp: f64 = (0..dh)
                                .map(|c| {
                                    self.dctx[(b * s.len + i) * d + h * dh + c].to_f64()
                                        * q(b, j, h, 2, c)
                                })
                                .sum();
                            (scores[j] - m).exp() / sum * dp
                        })
                        .sum();
                    out.push([m, 1.0 / sum, dsum]);
                }
            }
        }
        out
    }
}

/// `‖a − b‖/‖b‖` over the elements `pick` selects.
fn rel_err(a: &[f64], b: &[f64], pick: impl Fn(usize) -> bool) -> f64 {
    let (mut num, mut den) = (0.0, 0.0);
    for (k, (x, y)) in a.iter().zip(b).enumerate() {
        if pick(k) {
            num += (x - y) * (x - y);
            den += y * y;
        }
    }
    (num / den.max(1e-300)).sqrt()
}

/// Runs `case` on the kernels of `v` and checks every output against f64 within `v`'s bound
/// (nothing without the emulator).
fn check(case: &Case, v: &Variant) {
    let label = format!("{} ({})", case.label(), v.name);
    let Some(got) = case.emulate(v) else {
        return;
    };
    assert_eq!(got.err, 0, "{label}: error flag");
    for (name, v) in [
        ("ctx", &got.ctx),
        ("saved", &got.saved),
        ("dqkv", &got.dqkv),
        ("dsum", &got.dsum),
    ] {
        if let Some(k) = v.iter().position(|x| !x.is_finite()) {
            panic!(
                "{label}: {name}[{k}] = {} (not written, or not finite)",
                v[k]
            );
        }
    }
    let (ctx, dqkv) = case.reference();
    let d = case.s.d;
    let part = |p: usize| move |k: usize| (k % (3 * d)) / d == p;
    let [c, dq, dk, dv, dd] = [
        rel_err(&got.ctx, &ctx, |_| true),
        rel_err(&got.dqkv, &dqkv, part(0)),
        rel_err(&got.dqkv, &dqkv, part(1)),
        rel_err(&got.dqkv, &dqkv, part(2)),
        {
            let stats = case.statistics();
            let want: Vec<f64> = stats.iter().map(|r| r[2]).collect();
            for (row, r) in stats.iter().enumerate() {
                let (m, inv) = (got.saved[2 * row], got.saved[2 * row + 1]);
                for (name, g, w) in [("m", m, r[0]), ("1/Σ", inv, r[1])] {
                    assert!(
                        (g - w).abs() <= STAT_REL * w.abs().max(1.0),
                        "{label}: row {row}: {name} {g}, f64 {w}"
                    );
                }
            }
            rel_err(&got.dsum, &want, |_| true)
        },
    ];
    println!(
        "{label}: relative error vs f64: ctx {c:.2e}, dQ {dq:.2e}, dK {dk:.2e}, dV {dv:.2e}, \
         D {dd:.2e}"
    );
    for (name, e) in [("ctx", c), ("dQ", dq), ("dK", dk), ("dV", dv), ("D", dd)] {
        assert!(e <= v.rel, "{label}: {name} {e:e}");
    }
    // Rows of keys past a sequence's length get exactly zero dK and dV.
    for (b, &l) in case.lens.iter().enumerate() {
        for j in (l as usize).min(case.s.len)..case.s.len {
            let row = &got.dqkv[(b * case.s.len + j) * 3 * d + d..(b * case.s.len + j + 1) * 3 * d];
            assert!(
                row.iter().all(|x| *x == 0.0),
                "{label}: key {j} of row {b} is past its length: dK, dV must be 0"
            );
        }
    }
}

/// Shapes every kernel set takes: head widths 16 to 64, lengths not a multiple of 16, one past
/// a 64-key chunk, the §8 teacher shape (len 128, dh 32); key lengths of 0, 1, full, and in
/// between.
fn cases() -> Vec<Case> {
    vec![
        Case::new(1, 3, 19, 2, 16, vec![19, 0, 7]),
        Case::new(2, 2, 70, 2, 32, vec![70, 65]),
        Case::new(3, 2, 33, 1, 64, vec![1, 33]),
        Case::new(4, 2, 40, 3, 48, vec![17, 40]),
        Case::new(5, 1, 128, 2, 32, vec![101]),
    ]
}

#[test]
fn tensor_core_kernels_match_the_f64_composition() {
    let mut all = cases();
    // Too long for the CUDA-core kernels' tables, not for these: four 64-key chunks.
    all.push(Case::new(7, 1, 200, 1, 32, vec![197]));
    for case in &all {
        check(case, &VARIANTS[0]);
    }
}

#[test]
fn cuda_core_kernels_in_bf16_match_the_f64_composition() {
    let mut all = cases();
    // A head narrower than the tensor-core kernels take.
    all.push(Case::new(8, 5, 11, 3, 8, vec![11, 3, 0, 9, 1]));
    for case in &all {
        check(case, &VARIANTS[1]);
    }
}

/// The kernels that passed on a GPU: the emulation reproduces them to f32's accuracy.
#[test]
fn cuda_core_kernels_in_f32_match_the_f64_composition_as_on_the_gpu() {
    let mut all = cases();
    all.push(Case::new(8, 5, 11, 3, 8, vec![11, 3, 0, 9, 1]));
    for case in &all {
        check(case, &VARIANTS[2]);
    }
}

/// A key length past the padded extent raises MGKD_ERR_LEN (and is clamped), in every set.
#[test]
fn a_key_length_past_the_padding_raises_the_length_error() {
    for v in &VARIANTS {
        let mut case = Case::new(6, 1, 16, 1, 16, vec![16]);
        case.lens = vec![17];
        if let Some(got) = case.emulate(v) {
            assert_eq!(got.err, ERR_LEN, "{}", v.name);
        }
    }
}
