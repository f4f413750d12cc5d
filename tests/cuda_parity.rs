//! Parity of the CUDA backend with the CPU reference: every op and loss on random inputs of
//! several shapes (odd sizes, empty sequences, windows at an offset inside larger buffers),
//! run on `CpuBackend<f32>`, `CpuBackend<f64>` and `CudaBackend`, then compared.
//!
//! - Outputs an op overwrites are poisoned with NaN on every backend before the call; the
//!   reference leaves exactly the elements outside the contract NaN, so the GPU must write
//!   the same elements (an unwritten element, or a write outside the window, is a failure).
//! - Windows an op accumulates into are pre-filled with random values and surrounded by a
//!   sentinel that must come back bit-identical.
//! - Error: `‖gpu − ref‖₂ / ‖ref‖₂ ≤ 1e-5` over the written elements, against the f32 CPU and
//!   against the f64 CPU (the latter is the gradient reference). The norm-wise form is the
//!   one that is meaningful for f32: element-wise relative error is unbounded where a value
//!   cancels to near zero, and the two backends sum in different orders (cuBLAS tiles,
//!   warp-shuffle trees), so agreement is to rounding, not to the bit.
//! - Reductions on the GPU must be deterministic: the ops with sums (bias/LayerNorm/embedding/
//!   position gradients, losses, Σx²) are run twice and must agree bit for bit.
//!
//! Without a usable GPU every test prints that it skipped and passes; with
//! `MGKD_REQUIRE_GPU=1` a missing GPU is a failure. `MGKD_PARITY_SELFTEST=1` (no GPU) runs
//! the cases on the two CPU backends and holds f32 against f64 to the same bound, a check of
//! the harness that needs no device.

mod cuda_common;
mod kernel_emu;
mod skip;

use cuda_common::{gpu, selftest};
use mgkd::backend::cpu::CpuBackend;
use mgkd::backend::cuda::{AttentionKernels, CudaBackend};
use mgkd::backend::{
    AdamW, AttnShape, Backend, EmbMode, EmbTable, FineGrads, FineShape, Float, Gemm, Mut, Outer,
    Ref, ValidTokens,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Norm-wise relative tolerance (see the module documentation).
const TOL: f64 = 1e-5;
/// Value around accumulate windows that must stay untouched.
const SENT: f64 = 12345.0;
/// Elements of padding around every window.
const PAD: usize = 3;

// ---- harness ---------------------------------------------------------------------------

/// One named output of a case (a full buffer, pads included, as f64).
struct Out {
    name: &'static str,
    data: Vec<f64>,
    /// Lower bound of the norm the error is relative to (for loss values whose f32 formula
    /// cancels: the magnitude of the summed parts, computed on the host in f64).
    floor: f64,
    /// Bound against the f64 CPU (default [`TOL`]).
    tol64: f64,
}

/// An output compared with the default bounds.
fn named(name: &'static str, data: Vec<f64>) -> Out {
    Out {
        name,
        data,
        floor: 0.0,
        tol64: TOL,
    }
}

/// Outputs of one case.
type Outs = Vec<Out>;

/// Runs `case` on the GPU (twice, for determinism when `deterministic`), the f32 CPU and the
/// f64 CPU, and compares.
fn parity<C: Case>(label: &str, case: &C) {
    let want32 = case.run(&CpuBackend::<f32>::new());
    let want64 = case.run(&CpuBackend::<f64>::new());
    let Some(g) = gpu() else {
        // Harness self-test without a GPU: the f32 CPU stands in for the device, which checks
        // the cases themselves (windows, poison, sentinels) and that the f32-vs-f64 bound
        // holds for f32 arithmetic on these inputs.
        if selftest() {
            for (a, b) in want32.iter().zip(&want64) {
                let what = format!("{label}: {} cpu-f32 vs cpu-f64", a.name);
                check(&what, &a.data, &b.data, a.tol64, a.floor);
            }
        }
        return;
    };
    let got = case.run(g);
    assert_eq!(got.len(), want32.len());
    for ((o, w32), w64) in got.iter().zip(&want32).zip(&want64) {
        check(
            &format!("{label}: {} vs cpu-f32", o.name),
            &o.data,
            &w32.data,
            TOL,
            o.floor,
        );
        check(
            &format!("{label}: {} vs cpu-f64", o.name),
            &o.data,
            &w64.data,
            o.tol64,
            o.floor,
        );
    }
    let again = case.run(g);
    for (a, b) in got.iter().zip(&again) {
        let same = a
            .data
            .iter()
            .zip(&b.data)
            .all(|(x, y)| x.to_bits() == y.to_bits());
        assert!(same, "{label}: {} differs between two GPU runs", a.name);
    }
}

/// Compares one output (see the module documentation).
fn check(what: &str, got: &[f64], want: &[f64], tol: f64, floor: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let (mut num, mut den, mut compared) = (0.0f64, 0.0f64, 0usize);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        if w.is_nan() {
            assert!(
                g.is_nan(),
                "{what}: element {i} = {g} written outside the contract"
            );
            continue;
        }
        assert!(g.is_finite(), "{what}: element {i} = {g}, expected {w}");
        if w == SENT {
            assert_eq!(g, SENT, "{what}: element {i} outside the window changed");
            continue;
        }
        num += (g - w) * (g - w);
        den += w * w;
        compared += 1;
    }
    let scale = den.sqrt().max(floor);
    let err = if scale > 0.0 {
        num.sqrt() / scale
    } else {
        num.sqrt()
    };
    assert!(
        err <= tol,
        "{what}: relative error {err:.3e} > {tol:.0e} over {compared} elements"
    );
}

/// One parity case: shapes and host inputs fixed, run on any backend.
trait Case {
    fn run<B: Backend>(&self, be: &B) -> Outs;
}

fn up<B: Backend>(be: &B, x: &[f64]) -> B::Buf {
    let v: Vec<B::F> = x.iter().map(|&v| <B::F as Float>::from_f64(v)).collect();
    be.upload(&v).expect("upload")
}

fn down<B: Backend>(be: &B, b: &B::Buf) -> Vec<f64> {
    be.download(b)
        .expect("download")
        .iter()
        .map(|&v| <B::F as Float>::to_f64(v))
        .collect()
}

/// A buffer of `n` NaNs with `PAD` NaNs either side (an overwrite target; window at PAD).
fn poisoned<B: Backend>(be: &B, n: usize) -> B::Buf {
    up(be, &vec![f64::NAN; n + 2 * PAD])
}

/// `x` with `PAD` sentinels either side (an accumulate target; window at PAD).
fn padded(x: &[f64]) -> Vec<f64> {
    let mut v = vec![SENT; PAD];
    v.extend_from_slice(x);
    v.extend([SENT; PAD]);
    v
}

/// `x` with `PAD` junk values either side (an input; window at PAD).
fn junk_padded(x: &[f64]) -> Vec<f64> {
    let mut v = vec![-7.5; PAD];
    v.extend_from_slice(x);
    v.extend([9.25; PAD]);
    v
}

fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// f32-representable uniform values in (−1, 1).
fn randv(r: &mut ChaCha8Rng, n: usize) -> Vec<f64> {
    (0..n).map(|_| r.gen_range(-1.0f32..1.0) as f64).collect()
}

/// f32-representable values of scale `s`.
fn scaled(r: &mut ChaCha8Rng, n: usize, s: f64) -> Vec<f64> {
    randv(r, n)
        .into_iter()
        .map(|v| (v * s) as f32 as f64)
        .collect()
}

/// Lengths in 0..=max, forcing one 0 and one max when there are at least two rows.
fn lens(r: &mut ChaCha8Rng, n: usize, max: usize) -> Vec<u32> {
    let mut v: Vec<u32> = (0..n).map(|_| r.gen_range(0..=max) as u32).collect();
    if n >= 2 {
        v[0] = 0;
        v[n - 1] = max as u32;
    }
    v
}

fn cst<B: Backend>(x: f64) -> B::F {
    <B::F as Float>::from_f64(x)
}

fn val<B: Backend>(x: B::F) -> f64 {
    <B::F as Float>::to_f64(x)
}

// ---- memory ------------------------------------------------------------------------------

struct MemCase {
    n: usize,
    x: Vec<f64>,
    y: Vec<f64>,
    rows: usize,
    cols: usize,
    src_ld: usize,
    dst_ld: usize,
}

impl Case for MemCase {
    fn run<B: Backend>(&self, be: &B) -> Outs {
        let n = self.n;
        let x = up(be, &junk_padded(&self.x));
        let z = be.zeros(n + 1).expect("zeros");
        assert_eq!(be.len(&z), n + 1);
        let mut fill = poisoned(be, n);
        be.fill(n, cst::<B>(0.375), Mut::at(&mut fill, PAD));
        let mut copy = poisoned(be, n);
        be.copy(n, Ref::at(&x, PAD), Mut::at(&mut copy, PAD));
        let mut axpy = up(be, &padded(&self.y));
        be.axpy(
            n,
            cst::<B>(-1.25),
            Ref::at(&x, PAD),
            Mut::at(&mut axpy, PAD),
        );
        let (r, c) = (self.rows, self.cols);
        let src = up(be, &junk_padded(&self.x[..r * self.src_ld]));
        let ext = (r - 1) * self.dst_ld + c;
        let mut c2 = poisoned(be, ext);
        be.copy_2d(
            r,
            c,
            Ref::at(&src, PAD),
            self.src_ld,
            Mut::at(&mut c2, PAD),
            self.dst_ld,
            false,
        );
        let mut c2a = up(be, &padded(&self.y[..ext]));
        be.copy_2d(
            r,
            c,
            Ref::at(&src, PAD),
            self.src_ld,
            Mut::at(&mut c2a, PAD),
            self.dst_ld,
            true,
        );
        vec![
            named("zeros", down(be, &z)),
            named("upload/download", down(be, &x)),
            named("fill", down(be, &fill)),
            named("copy", down(be, &copy)),
            named("axpy", down(be, &axpy)),
            named("copy_2d", down(be, &c2)),
            named("copy_2d accumulate", down(be, &c2a)),
        ]
    }
}

#[test]
fn memory_ops() {
    for (seed, n, rows, cols, src_ld, dst_ld) in [
        (1, 1, 1, 1, 1, 1),
        (2, 1000, 7, 13, 20, 17),
        (3, 70_001, 300, 37, 37, 40),
    ] {
        let mut r = rng(seed);
        let case = MemCase {
            n,
            x: randv(&mut r, n.max(rows * src_ld)),
            y: randv(&mut r, n.max(rows * dst_ld)),
            rows,
            cols,
            src_ld,
            dst_ld,
        };
        parity(&format!("memory n={n}"), &case);
    }
    let Some(g) = gpu() else { return };
    let empty = g.zeros(0).expect("empty buffer");
    assert_eq!(g.len(&empty), 0);
    assert!(g.download(&empty).expect("download empty").is_empty());
}

// ---- dense -------------------------------------------------------------------------------

struct GemmCase {
    s: Gemm,
    alpha: f64,
    beta: f64,
    a: Vec<f64>,
    b: Vec<f64>,
    c: Vec<f64>,
}

impl Case for GemmCase {
    fn run<B: Backend>(&self, be: &B) -> Outs {
        let a = up(be, &junk_padded(&self.a));
        let b = up(be, &junk_padded(&self.b));
        // β = 0 must not read C: poison it; otherwise start from C.
        let mut c = if self.beta == 0.0 {
            poisoned(be, self.c.len())
        } else {
            up(be, &padded(&self.c))
        };
        be.gemm(
            &self.s,
            cst::<B>(self.alpha),
            Ref::at(&a, PAD),
            Ref::at(&b, PAD),
            cst::<B>(self.beta),
            Mut::at(&mut c, PAD),
        );
        vec![named("C", down(be, &c))]
    }
}

/// Extent of a batch of row-major matrices.
fn ext(rows: usize, cols: usize, ld: usize, batch: usize, stride: usize) -> usize {
    if rows == 0 || cols == 0 || batch == 0 {
        0
    } else {
        (batch - 1) * stride + (rows - 1) * ld + cols
    }
}

#[test]
fn gemm_every_transpose_and_batching() {
    let mut r = rng(10);
    let shapes = [
        (1, 1, 1),
        (37, 53, 29),
        (128, 384, 128),
        (5, 3, 0),
        (64, 33, 257),
    ];
    for &(m, n, k) in &shapes {
        for ta in [false, true] {
            for tb in [false, true] {
                for (batch, extra_ld) in [(1, 0), (3, 2)] {
                    let mut s = Gemm::new(m, n, k, ta, tb);
                    s.lda += extra_ld;
                    s.ldb += extra_ld;
                    s.ldc += extra_ld;
                    let (ar, ac) = if ta { (k, m) } else { (m, k) };
                    let (br, bc) = if tb { (n, k) } else { (k, n) };
                    s.batch = batch;
                    s.stride_a = ar * s.lda + 1;
                    s.stride_b = br * s.ldb;
                    s.stride_c = m * s.ldc + 2;
                    let a = randv(&mut r, ext(ar, ac, s.lda, batch, s.stride_a));
                    let b = randv(&mut r, ext(br, bc, s.ldb, batch, s.stride_b));
                    let c = randv(&mut r, ext(m, n, s.ldc, batch, s.stride_c));
                    for (alpha, beta) in [(1.0, 0.0), (0.5, 1.0), (-1.25, 0.75)] {
                        let case = GemmCase {
                            s,
                            alpha,
                            beta,
                            a: a.clone(),
                            b: b.clone(),
                            c: c.clone(),
                        };
                        parity(
                            &format!(
                                "gemm {m}x{n}x{k} ta={ta} tb={tb} batch={batch} α={alpha} β={beta}"
                            ),
                            &case,
                        );
                    }
                }
            }
        }
    }
}

/// Batches whose C matrices share elements (all on one C, or overlapping by a few columns):
/// the trait's `for b in 0..batch` runs them one after the other, so C accumulates every
/// product (β applied once per batch); a concurrent strided-batched call would race.
#[test]
fn gemm_batches_sharing_c() {
    let mut r = rng(12);
    for (m, n, k) in [(5, 4, 3), (33, 40, 17), (5, 4, 0)] {
        for stride_c in [0, 2] {
            let batch = 3;
            let mut s = Gemm::new(m, n, k, false, true);
            s.batch = batch;
            s.stride_a = m * k;
            s.stride_b = n * k;
            s.stride_c = stride_c;
            let a = randv(&mut r, batch * m * k);
            let b = randv(&mut r, batch * n * k);
            let c = randv(&mut r, ext(m, n, s.ldc, batch, stride_c));
            for (alpha, beta) in [(1.0, 1.0), (-1.25, 0.75), (0.5, 0.0)] {
                let case = GemmCase {
                    s,
                    alpha,
                    beta,
                    a: a.clone(),
                    b: b.clone(),
                    c: c.clone(),
                };
                parity(
                    &format!("gemm {m}x{n}x{k} batch={batch} stride_c={stride_c} β={beta}"),
                    &case,
                );
            }
        }
    }
}

/// Attention-style batched products on column blocks inside common rows (per-head
/// `Q·Kᵀ` with `stride = dh` inside rows of width d).
#[test]
fn gemm_heads_side_by_side() {
    let mut r = rng(11);
    let (l, d, heads) = (19, 48, 4);
    let dh = d / heads;
    let q = randv(&mut r, l * d);
    let k = randv(&mut r, l * d);
    let s = Gemm {
        m: l,
        n: l,
        k: dh,
        trans_a: false,
        trans_b: true,
        lda: d,
        ldb: d,
        ldc: l,
        batch: heads,
        stride_a: dh,
        stride_b: dh,
        stride_c: l * l,
    };
    let case = GemmCase {
        s,
        alpha: 0.25,
        beta: 0.0,
        a: q,
        b: k,
        c: vec![0.0; heads * l * l],
    };
    parity("gemm heads", &case);
}

/// A two-level batched product ([`Backend::gemm_outer`]): one pointer-array batched call on
/// CUDA where the C matrices are disjoint, the per-repetition loop otherwise.
struct GemmOuterCase {
    s: Gemm,
    outer: Outer,
    beta: f64,
    a: Vec<f64>,
    b: Vec<f64>,
    c: Vec<f64>,
}

impl Case for GemmOuterCase {
    fn run<B: Backend>(&self, be: &B) -> Outs {
        let a = up(be, &junk_padded(&self.a));
        let b = up(be, &junk_padded(&self.b));
        // β = 0 must not read C: poison it (C elements no product writes stay NaN on every
        // backend); otherwise start from C.
        let mut c = if self.beta == 0.0 {
            poisoned(be, self.c.len())
        } else {
            up(be, &padded(&self.c))
        };
        be.gemm_outer(
            &self.s,
            &self.outer,
            cst::<B>(0.75),
            Ref::at(&a, PAD),
            Ref::at(&b, PAD),
            cst::<B>(self.beta),
            Mut::at(&mut c, PAD),
        );
        vec![named("C", down(be, &c))]
    }
}

/// The attention products as heads × batch rows (Q·Kᵀ into per-head score blocks, P·V
/// into head columns of the context, dV = Pᵀ·dC into the V columns of a Q|K|V buffer),
/// and an outer batch whose repetitions share C (run in order: C accumulates).
#[test]
fn gemm_outer_heads_by_rows() {
    let mut r = rng(13);
    let (batch, l, heads, dh) = (5, 11, 3, 8);
    let d = heads * dh;
    let qkv = randv(&mut r, batch * l * 3 * d);
    let probs = randv(&mut r, batch * heads * l * l);
    let ctx = randv(&mut r, batch * l * d);
    let s = AttnShape {
        batch,
        len: l,
        heads,
        d,
    };
    let (scores, heads_qk) = s.scores_product(3 * d, 3 * d);
    let (pv, heads_pv) = s.probs_product(false, 3 * d, d);
    let (dv, heads_dv) = s.probs_product(true, d, 3 * d);
    let shared = Outer {
        count: 3,
        stride_a: 7,
        stride_b: 5,
        stride_c: 1,
    };
    let cases = [
        (
            "Q·Kᵀ",
            scores,
            heads_qk,
            &qkv,
            &qkv[d..],
            batch * heads * l * l,
        ),
        ("P·V", pv, heads_pv, &probs, &qkv[2 * d..], batch * l * d),
        ("Pᵀ·dC", dv, heads_dv, &probs, &ctx, batch * l * 3 * d),
        (
            "shared C",
            scores,
            shared,
            &qkv,
            &qkv[d..],
            batch * heads * l * l + 2,
        ),
    ];
    for (name, s, outer, a, b, c_len) in cases {
        assert_eq!(
            outer.disjoint(&s),
            name != "shared C",
            "{name}: disjointness"
        );
        for beta in [0.0, 0.5] {
            let case = GemmOuterCase {
                s,
                outer,
                beta,
                a: a.to_vec(),
                b: b.to_vec(),
                c: randv(&mut r, c_len),
            };
            parity(&format!("gemm_outer {name} β={beta}"), &case);
        }
    }
}

/// The linear map: each backend's `linear_forward` and `linear_residual` (fused on CUDA)
/// against the CPU's composition, overwriting (output poisoned), accumulating (output
/// random, sentinels around it) and with a residual input (output poisoned).
struct LinearCase {
    rows: usize,
    inp: usize,
    out: usize,
    x: Vec<f64>,
    w: Vec<f64>,
    b: Vec<f64>,
    y: Vec<f64>,
}

impl Case for LinearCase {
    fn run<B: Backend>(&self, be: &B) -> Outs {
        let (r, i, o) = (self.rows, self.inp, self.out);
        let x = up(be, &junk_padded(&self.x));
        let w = up(be, &junk_padded(&self.w));
        let b = up(be, &junk_padded(&self.b));
        let (xr, wr, br) = (Ref::at(&x, PAD), Ref::at(&w, PAD), Ref::at(&b, PAD));
        let mut y0 = poisoned(be, r * o);
        be.linear_forward(r, i, o, xr, wr, br, Mut::at(&mut y0, PAD), false);
        let mut y1 = up(be, &padded(&self.y));
        be.linear_forward(r, i, o, xr, wr, br, Mut::at(&mut y1, PAD), true);
        let resid = up(be, &junk_padded(&self.y));
        let mut y2 = poisoned(be, r * o);
        let rr = Ref::at(&resid, PAD);
        be.linear_residual(r, i, o, xr, wr, br, rr, Mut::at(&mut y2, PAD));
        vec![
            named("y = x·Wᵀ + b", down(be, &y0)),
            named("y += x·Wᵀ + b", down(be, &y1)),
            named("y = r + x·Wᵀ + b", down(be, &y2)),
        ]
    }
}

#[test]
fn linear_forward_overwriting_accumulating_and_residual() {
    let mut r = rng(35);
    for (rows, inp, out) in [
        (1, 1, 1),
        (7, 5, 3),
        (33, 288, 128),
        (4096, 128, 512),
        (4096, 512, 128),
    ] {
        let case = LinearCase {
            rows,
            inp,
            out,
            x: randv(&mut r, rows * inp),
            w: randv(&mut r, out * inp),
            b: randv(&mut r, out),
            y: randv(&mut r, rows * out),
        };
        parity(&format!("linear {rows}x{inp} -> {out}"), &case);
    }
}

struct BiasCase {
    rows: usize,
    n: usize,
    bias: Vec<f64>,
    y: Vec<f64>,
    db: Vec<f64>,
}

impl Case for BiasCase {
    fn run<B: Backend>(&self, be: &B) -> Outs {
        let bias = up(be, &junk_padded(&self.bias));
        let mut y = up(be, &padded(&self.y));
        be.add_bias(self.rows, self.n, Ref::at(&bias, PAD), Mut::at(&mut y, PAD));
        let dy = up(be, &junk_padded(&self.y));
        let mut db = up(be, &padded(&self.db));
        be.bias_backward(self.rows, self.n, Ref::at(&dy, PAD), Mut::at(&mut db, PAD));
        vec![
            named("add_bias", down(be, &y)),
            named("bias_backward", down(be, &db)),
        ]
    }
}

#[test]
fn bias_forward_and_backward() {
    let mut r = rng(20);
    for (rows, n) in [(0, 5), (1, 1), (7, 37), (1000, 128), (20_000, 3)] {
        let case = BiasCase {
            rows,
            n,
            bias: randv(&mut r, n),
            y: randv(&mut r, rows * n),
            db: randv(&mut r, n),
        };
        parity(&format!("bias rows={rows} n={n}"), &case);
    }
}

/// More rows than 128-row chunks fit in the grid's y limit (128·65535): the column sums then
/// use longer chunks (129 rows here). Integer data so that every order of summation is exact
/// in f32 and the sums must agree to the bit with the f64 reference; a chunk lost or added
/// twice shows as an integer difference.
#[test]
fn bias_backward_beyond_the_chunk_grid_limit() {
    let mut r = rng(21);
    let rows = 8_400_000;
    let y: Vec<f64> = (0..rows).map(|_| r.gen_range(-1i32..=1) as f64).collect();
    let case = BiasCase {
        rows,
        n: 1,
        bias: vec![0.25],
        y,
        db: vec![3.0],
    };
    parity(&format!("bias rows={rows} n=1"), &case);
}

// ---- element-wise and normalisation ------------------------------------------------------

struct GeluCase {
    x: Vec<f64>,
    dy: Vec<f64>,
}

impl Case for GeluCase {
    fn run<B: Backend>(&self, be: &B) -> Outs {
        let n = self.x.len();
        let x = up(be, &junk_padded(&self.x));
        let dy = up(be, &junk_padded(&self.dy));
        let mut y = poisoned(be, n);
        be.gelu(n, Ref::at(&x, PAD), Mut::at(&mut y, PAD));
        // In place: x again, with junk around it that must stay.
        let mut xy = up(be, &junk_padded(&self.x));
        be.gelu_in_place(n, Mut::at(&mut xy, PAD));
        let mut dx = poisoned(be, n);
        be.gelu_backward(
            n,
            Ref::at(&x, PAD),
            Ref::at(&dy, PAD),
            Mut::at(&mut dx, PAD),
        );
        vec![
            named("gelu", down(be, &y)),
            named("gelu_in_place", down(be, &xy)),
            named("gelu_backward", down(be, &dx)),
        ]
    }
}

#[test]
fn gelu_forward_and_backward() {
    let mut r = rng(30);
    for n in [1, 31, 1000, 100_003] {
        let case = GeluCase {
            x: scaled(&mut r, n, 4.0),
            dy: randv(&mut r, n),
        };
        parity(&format!("gelu n={n}"), &case);
    }
}

/// GELU's backward with the bias gradient of the map before it, in place and fused on CUDA:
/// `dx` (written over `dy`) and `db` (accumulated onto random values, sentinels around)
/// against the CPU.
struct GeluBiasCase {
    rows: usize,
    n: usize,
    x: Vec<f64>,
    dy: Vec<f64>,
    db: Vec<f64>,
}

impl Case for GeluBiasCase {
    fn run<B: Backend>(&self, be: &B) -> Outs {
        let (rows, n) = (self.rows, self.n);
        let x = up(be, &junk_padded(&self.x));
        let mut dx = up(be, &padded(&self.dy));
        let mut db = up(be, &padded(&self.db));
        be.gelu_bias_backward(
            rows,
            n,
            Ref::at(&x, PAD),
            Mut::at(&mut dx, PAD),
            Mut::at(&mut db, PAD),
        );
        vec![named("dx", down(be, &dx)), named("db", down(be, &db))]
    }
}

fn gelu_bias_case(r: &mut ChaCha8Rng, rows: usize, n: usize) -> GeluBiasCase {
    GeluBiasCase {
        rows,
        n,
        x: scaled(r, rows * n, 4.0),
        dy: randv(r, rows * n),
        db: randv(r, n),
    }
}

#[test]
fn gelu_bias_backward_fused() {
    let mut r = rng(31);
    for (rows, n) in [(1, 1), (7, 33), (300, 129), (4096, 512)] {
        let case = gelu_bias_case(&mut r, rows, n);
        parity(&format!("gelu_bias_backward {rows}x{n}"), &case);
    }
}

/// On the GPU the fused pass gives bit for bit what `gelu_backward` then `bias_backward`
/// give (same chunks, same order, no contraction).
#[test]
fn gelu_bias_backward_fused_equals_composition_on_the_gpu() {
    let Some(g) = gpu() else {
        return;
    };
    let mut r = rng(32);
    for (rows, n) in [(300, 129), (4096, 512)] {
        let c = gelu_bias_case(&mut r, rows, n);
        let fused = c.run(g);
        let x = up(g, &c.x);
        let dy = up(g, &c.dy);
        // NaN where gelu_backward writes, the fused case's sentinels either side (the
        // comparison covers the padding: neither pass may write there).
        let mut dx = up(g, &padded(&vec![f64::NAN; rows * n]));
        let mut db = up(g, &padded(&c.db));
        g.gelu_backward(
            rows * n,
            Ref::whole(&x),
            Ref::whole(&dy),
            Mut::at(&mut dx, PAD),
        );
        g.bias_backward(rows, n, Ref::at(&dx, PAD), Mut::at(&mut db, PAD));
        for (out, want) in fused.iter().zip([down(g, &dx), down(g, &db)]) {
            let same = out.data.len() == want.len()
                && out
                    .data
                    .iter()
                    .zip(&want)
                    .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(
                same,
                "gelu_bias_backward {rows}x{n}: {} differs from the composition",
                out.name
            );
        }
    }
}

struct LnCase {
    rows: usize,
    d: usize,
    x: Vec<f64>,
    gb: Vec<f64>,
    dy: Vec<f64>,
    dx0: Vec<f64>,
    dgb0: Vec<f64>,
}

impl Case for LnCase {
    fn run<B: Backend>(&self, be: &B) -> Outs {
        let (rows, d) = (self.rows, self.d);
        let x = up(be, &junk_padded(&self.x));
        let gb = up(be, &junk_padded(&self.gb));
        let mut y = poisoned(be, rows * d);
        let mut st = poisoned(be, 2 * rows);
        be.layernorm(
            rows,
            d,
            Ref::at(&x, PAD),
            Ref::at(&gb, PAD),
            Mut::at(&mut y, PAD),
            Mut::at(&mut st, PAD),
        );
        let dy = up(be, &junk_padded(&self.dy));
        let mut dx = up(be, &padded(&self.dx0));
        let mut dgb = up(be, &padded(&self.dgb0));
        be.layernorm_backward(
            rows,
            d,
            Ref::at(&x, PAD),
            Ref::at(&gb, PAD),
            Ref::at(&st, PAD),
            Ref::at(&dy, PAD),
            Mut::at(&mut dx, PAD),
            Mut::at(&mut dgb, PAD),
        );
        vec![
            named("y", down(be, &y)),
            named("stats", down(be, &st)),
            named("dx", down(be, &dx)),
            named("dgamma_beta", down(be, &dgb)),
        ]
    }
}

#[test]
fn layernorm_forward_and_backward() {
    let mut r = rng(40);
    for (rows, d) in [(1, 1), (1, 37), (7, 128), (300, 256), (2_000, 64)] {
        let case = LnCase {
            rows,
            d,
            x: randv(&mut r, rows * d)
                .into_iter()
                .map(|v| (v * 3.0 + 0.5) as f32 as f64)
                .collect(),
            gb: randv(&mut r, 2 * d),
            dy: randv(&mut r, rows * d),
            dx0: randv(&mut r, rows * d),
            dgb0: randv(&mut r, 2 * d),
        };
        parity(&format!("layernorm rows={rows} d={d}"), &case);
    }
}

// ---- embeddings --------------------------------------------------------------------------

struct EmbCase {
    n: usize,
    width: usize,
    tables: Vec<EmbTable>,
    ids: Vec<u32>,
    params: Vec<f64>,
    mode: EmbMode,
    out_ld: usize,
    dout: Vec<f64>,
    grads: Vec<f64>,
    /// Row lengths and slots per row (padded tokens skipped by the backward).
    valid: Option<(Vec<u32>, usize)>,
}

impl Case for EmbCase {
    fn run<B: Backend>(&self, be: &B) -> Outs {
        let ids = be.upload_ids(&self.ids).expect("ids");
        let params = up(be, &self.params);
        let fields = self.tables.len();
        let w = match self.mode {
            EmbMode::Sum => self.width,
            EmbMode::Concat => fields * self.width,
        };
        let ext = if self.n == 0 {
            0
        } else {
            (self.n - 1) * self.out_ld + w
        };
        let mut out = poisoned(be, ext);
        be.embedding(
            self.n,
            self.width,
            &self.tables,
            &ids,
            &params,
            self.mode,
            Mut::at(&mut out, PAD),
            self.out_ld,
        );
        let dout = up(be, &junk_padded(&self.dout));
        let mut grads = up(be, &self.grads);
        let lens = self
            .valid
            .as_ref()
            .map(|(l, _)| be.upload_ids(l).expect("lens"));
        let valid = lens
            .as_ref()
            .zip(self.valid.as_ref())
            .map(|(lens, (_, l))| ValidTokens { lens, max_len: *l });
        be.embedding_backward(
            self.n,
            self.width,
            &self.tables,
            &ids,
            self.mode,
            Ref::at(&dout, PAD),
            self.out_ld,
            &mut grads,
            valid,
        );
        vec![
            named("out", down(be, &out)),
            named("grads", down(be, &grads)),
        ]
    }
}

fn emb_case(
    seed: u64,
    n: usize,
    width: usize,
    vocabs: &[usize],
    mode: EmbMode,
    extra_ld: usize,
) -> EmbCase {
    let mut r = rng(seed);
    let mut tables = Vec::new();
    let mut off = 5; // other parameters before the first table
    for &v in vocabs {
        tables.push(EmbTable {
            offset: off,
            vocab: v,
        });
        off += v * width + 3; // and between tables
    }
    let total = off + 4;
    let ids: Vec<u32> = (0..n)
        .flat_map(|_| {
            vocabs
                .iter()
                .map(|&v| r.gen_range(0..v) as u32)
                .collect::<Vec<_>>()
        })
        .collect();
    let w = match mode {
        EmbMode::Sum => width,
        EmbMode::Concat => vocabs.len() * width,
    };
    let out_ld = w + extra_ld;
    // The gradient buffer: random in the tables, sentinels elsewhere (must stay untouched).
    let mut grads = vec![SENT; total];
    for t in &tables {
        for (j, g) in grads[t.offset..t.offset + t.vocab * width]
            .iter_mut()
            .enumerate()
        {
            *g = ((j % 97) as f64 - 48.0) / 64.0;
        }
    }
    EmbCase {
        n,
        width,
        tables,
        ids,
        params: randv(&mut r, total),
        mode,
        out_ld,
        dout: randv(&mut r, n * out_ld),
        grads,
        valid: None,
    }
}

#[test]
fn embedding_sum_and_concat() {
    for (seed, n, width, vocabs, extra) in [
        (50, 1, 1, vec![1usize], 0),
        (51, 37, 33, vec![5, 300, 1], 3),
        (52, 2_000, 128, vec![64, 1024, 16, 168], 0),
        (53, 517, 16, vec![100; 16], 1),
    ] {
        for mode in [EmbMode::Sum, EmbMode::Concat] {
            let case = emb_case(seed, n, width, &vocabs, mode, extra);
            parity(&format!("embedding n={n} width={width} {mode:?}"), &case);
        }
    }
    // Padded sequences (64 rows of 32 slots, the §8 event fields): the backward skips the
    // padded tokens, whose output-gradient rows hold random values here.
    let mut r = rng(54);
    for mode in [EmbMode::Sum, EmbMode::Concat] {
        let mut case = emb_case(54, 64 * 32, 128, &[64, 1024, 16, 168], mode, 0);
        case.valid = Some((lens(&mut r, 64, 32), 32));
        parity(&format!("embedding padded 64x32 {mode:?}"), &case);
    }
}

/// No field at all: Sum writes zero rows, Concat writes nothing, the backward adds nothing.
#[test]
fn embedding_without_fields() {
    for mode in [EmbMode::Sum, EmbMode::Concat] {
        let case = emb_case(54, 9, 6, &[], mode, 2);
        parity(&format!("embedding no field {mode:?}"), &case);
    }
}

/// A vocabulary of more than 16·65535 rows: the scatter's grid is capped at 65535 row
/// groups in y and its blocks stride over the rest; half the ids hit the groups past the cap
/// (with repeats, so that their order matters), the last row included.
#[test]
fn embedding_backward_vocabulary_beyond_the_grid_limit() {
    let vocab = 16 * 65_535 + 100;
    for mode in [EmbMode::Sum, EmbMode::Concat] {
        let mut case = emb_case(55, 64, 3, &[vocab], mode, 1);
        for (i, id) in case.ids.iter_mut().enumerate() {
            if i % 2 == 0 {
                *id = (vocab - 1 - (i / 2) % 7) as u32;
            }
        }
        parity(&format!("embedding vocab={vocab} {mode:?}"), &case);
    }
}

#[test]
fn embedding_id_beyond_vocab_is_an_error_not_a_write() {
    if gpu().is_none() {
        return;
    }
    // A backend of its own: the fault flag it raises must not reach the other tests.
    let g = &CudaBackend::new(0).expect("a second backend on the same device");
    let ids = g.upload_ids(&[0, 7, 2]).expect("ids");
    let params = g.upload(&[0.5f32; 40]).expect("params");
    let tables = [EmbTable {
        offset: 0,
        vocab: 5,
    }];
    let mut out = g.upload(&[f32::NAN; 24]).expect("out");
    g.embedding(
        3,
        8,
        &tables,
        &ids,
        &params,
        EmbMode::Sum,
        Mut::whole(&mut out),
        8,
    );
    let err = g
        .download(&out)
        .expect_err("an id ≥ vocab must be reported");
    assert!(err.to_string().contains("vocabulary"), "{err}");
    // The flag is cleared once reported.
    g.synchronize().expect("no error after the report");
}

struct PosCase {
    batch: usize,
    max_len: usize,
    d: usize,
    lens: Vec<u32>,
    pos: Vec<f64>,
    x: Vec<f64>,
    dpos: Vec<f64>,
}

impl Case for PosCase {
    fn run<B: Backend>(&self, be: &B) -> Outs {
        let lens = be.upload_ids(&self.lens).expect("lens");
        let pos = up(be, &junk_padded(&self.pos));
        let mut x = up(be, &padded(&self.x));
        be.add_positions(
            self.batch,
            self.max_len,
            self.d,
            &lens,
            Ref::at(&pos, PAD),
            Mut::at(&mut x, PAD),
        );
        let dx = up(be, &junk_padded(&self.x));
        let mut dpos = up(be, &padded(&self.dpos));
        be.add_positions_backward(
            self.batch,
            self.max_len,
            self.d,
            &lens,
            Ref::at(&dx, PAD),
            Mut::at(&mut dpos, PAD),
        );
        vec![named("x", down(be, &x)), named("dpos", down(be, &dpos))]
    }
}

#[test]
fn positions_forward_and_backward() {
    let mut r = rng(60);
    for (batch, max_len, d) in [
        (1, 1, 1),
        (5, 7, 37),
        (64, 128, 128),
        (3, 32, 8),
        (4, 5, 300),
        (70, 9, 33),
    ] {
        let case = PosCase {
            batch,
            max_len,
            d,
            lens: lens(&mut r, batch, max_len),
            pos: randv(&mut r, max_len * d),
            x: randv(&mut r, batch * max_len * d),
            dpos: randv(&mut r, max_len * d),
        };
        parity(&format!("positions b={batch} L={max_len} d={d}"), &case);
    }
}

// ---- attention and pooling ---------------------------------------------------------------

struct SoftmaxCase {
    batch: usize,
    heads: usize,
    lq: usize,
    lk: usize,
    lens: Vec<u32>,
    scale: f64,
    s: Vec<f64>,
    dp: Vec<f64>,
}

impl Case for SoftmaxCase {
    fn run<B: Backend>(&self, be: &B) -> Outs {
        let lens = be.upload_ids(&self.lens).expect("lens");
        // The forward reads its rows' lengths from a window one row in: a length read from
        // the row before it (poison, above every lk) is an error.
        let shifted: Vec<u32> = std::iter::once(u32::MAX).chain(self.lens.clone()).collect();
        let shifted = be.upload_ids(&shifted).expect("lens");
        let n = self.s.len();
        let mut p = up(be, &junk_padded(&self.s));
        be.masked_softmax(
            self.batch,
            self.heads,
            self.lq,
            self.lk,
            &shifted,
            1,
            cst::<B>(self.scale),
            Mut::at(&mut p, PAD),
        );
        let dp = up(be, &junk_padded(&self.dp));
        let mut ds = poisoned(be, n);
        be.masked_softmax_backward(
            self.batch,
            self.heads,
            self.lq,
            self.lk,
            &lens,
            cst::<B>(self.scale),
            Ref::at(&p, PAD),
            Ref::at(&dp, PAD),
            Mut::at(&mut ds, PAD),
        );
        vec![
            named("probs", down(be, &p)),
            named("dscores", down(be, &ds)),
        ]
    }
}

#[test]
fn masked_softmax_forward_and_backward() {
    let mut r = rng(70);
    for (batch, heads, lq, lk) in [
        (1, 1, 1, 1),
        (3, 4, 5, 33),
        (8, 4, 128, 128),
        (2, 1, 3, 200),
    ] {
        let n = batch * heads * lq * lk;
        let case = SoftmaxCase {
            batch,
            heads,
            lq,
            lk,
            lens: lens(&mut r, batch, lk),
            scale: 0.125,
            s: scaled(&mut r, n, 20.0),
            dp: randv(&mut r, n),
        };
        parity(
            &format!("softmax b={batch} h={heads} lq={lq} lk={lk}"),
            &case,
        );
    }
}

/// Attention as one operation ([`Backend::attention`] and its backward): what the model
/// calls, composed on the CPU, fused where a backend fuses it. `saved` is the backend's own
/// (probabilities, or row statistics): poisoned before, compared only through what the
/// backward makes of it.
struct AttentionCase {
    s: AttnShape,
    lens: Vec<u32>,
    scale: f64,
    qkv: Vec<f64>,
    dctx: Vec<f64>,
}

impl Case for AttentionCase {
    fn run<B: Backend>(&self, be: &B) -> Outs {
        let s = &self.s;
        let lens = be.upload_ids(&self.lens).expect("lens");
        let qkv = up(be, &junk_padded(&self.qkv));
        let tokens = s.batch * s.len;
        let mut ctx = poisoned(be, tokens * s.d);
        let mut saved = poisoned(be, be.attention_saved_len(s));
        let scale = cst::<B>(self.scale);
        be.attention(
            s,
            &lens,
            scale,
            Ref::at(&qkv, PAD),
            Mut::at(&mut ctx, PAD),
            Mut::at(&mut saved, PAD),
        );
        let dctx = up(be, &junk_padded(&self.dctx));
        let mut dqkv = poisoned(be, tokens * 3 * s.d);
        be.attention_backward(
            s,
            &lens,
            scale,
            Ref::at(&qkv, PAD),
            Ref::at(&saved, PAD),
            Ref::at(&dctx, PAD),
            Mut::at(&mut dqkv, PAD),
        )
        .expect("attention backward");
        vec![named("ctx", down(be, &ctx)), named("dqkv", down(be, &dqkv))]
    }
}

/// The attention cases, seeded.
fn attention_cases() -> Vec<(String, AttentionCase)> {
    let mut r = rng(71);
    let mut cases = Vec::new();
    // (batch, len, heads, dh): one token; odd lengths; the §8 student and teacher shapes
    // (dh 32, len 32 and 128) and one past them; dh above a warp; a shape whose tables
    // exceed a CUDA block's shared memory (the composition runs there).
    for (batch, len, heads, dh) in [
        (1, 1, 1, 4),
        (5, 11, 3, 8),
        (4, 32, 4, 32),
        (3, 128, 4, 32),
        (2, 129, 4, 32),
        (3, 19, 2, 40),
        (2, 160, 2, 48),
    ] {
        let d = heads * dh;
        let tokens = batch * len;
        let case = AttentionCase {
            s: AttnShape {
                batch,
                len,
                heads,
                d,
            },
            lens: lens(&mut r, batch, len),
            scale: 1.0 / (dh as f64).sqrt(),
            qkv: scaled(&mut r, tokens * 3 * d, 2.0),
            dctx: randv(&mut r, tokens * d),
        };
        cases.push((
            format!("attention b={batch} l={len} h={heads} dh={dh}"),
            case,
        ));
    }
    cases
}

/// Attention as the backend runs it by default (`MGKD_CUDA_ATTENTION` unset: the
/// composition on CUDA).
#[test]
fn attention_forward_and_backward() {
    for (label, case) in attention_cases() {
        parity(&label, &case);
    }
}

/// The fused attention kernels (a second backend with `AttentionKernels::Fused`) against the
/// f32 and f64 CPU compositions, and bit-identical across two runs; shapes beyond a block's
/// shared memory run the composition there.
#[test]
fn fused_attention_forward_and_backward() {
    if gpu().is_none() {
        return;
    }
    let mut f = CudaBackend::new(0).expect("a second CUDA backend");
    f.set_attention_kernels(AttentionKernels::Fused);
    for (label, case) in attention_cases() {
        let fused = f.attention_saved_len(&case.s) != case.s.probs_len();
        println!("{label}: {}", if fused { "fused" } else { "composed" });
        let got = case.run(&f);
        let want32 = case.run(&CpuBackend::<f32>::new());
        let want64 = case.run(&CpuBackend::<f64>::new());
        for ((o, w32), w64) in got.iter().zip(&want32).zip(&want64) {
            check(
                &format!("fused {label}: {} vs cpu-f32", o.name),
                &o.data,
                &w32.data,
                TOL,
                0.0,
            );
            check(
                &format!("fused {label}: {} vs cpu-f64", o.name),
                &o.data,
                &w64.data,
                TOL,
                0.0,
            );
        }
        let again = case.run(&f);
        for (a, b) in got.iter().zip(&again) {
            let same = a
                .data
                .iter()
                .zip(&b.data)
                .all(|(x, y)| x.to_bits() == y.to_bits());
            assert!(same, "fused {label}: {} differs between two runs", a.name);
        }
    }
}

#[test]
fn key_length_beyond_padding_is_an_error() {
    if gpu().is_none() {
        return;
    }
    // A backend of its own: the fault flag it raises must not reach the other tests.
    let g = &CudaBackend::new(0).expect("a second backend on the same device");
    let lens = g.upload_ids(&[2, 5]).expect("lens"); // 5 > lk = 4
    let mut s = g.upload(&[0.5f32; 2 * 3 * 4]).expect("scores");
    g.masked_softmax(2, 1, 3, 4, &lens, 0, 1.0, Mut::whole(&mut s));
    let err = g
        .download(&s)
        .expect_err("a key length > lk must be reported");
    assert!(err.to_string().contains("padded length"), "{err}");
    // Clamped, not out of bounds: the row with the bad length is a softmax over all 4 keys.
    let p = g.download(&s).expect("the flag is cleared once reported");
    assert!(p[12..].iter().all(|&x| (x - 0.25).abs() < 1e-6), "{p:?}");
}

struct MeanCase {
    batch: usize,
    max_len: usize,
    d: usize,
    lens: Vec<u32>,
    x: Vec<f64>,
    empty: Vec<f64>,
    dout: Vec<f64>,
    dempty: Vec<f64>,
}

impl Case for MeanCase {
    fn run<B: Backend>(&self, be: &B) -> Outs {
        let (b, l, d) = (self.batch, self.max_len, self.d);
        let lens = be.upload_ids(&self.lens).expect("lens");
        let x = up(be, &junk_padded(&self.x));
        let empty = up(be, &junk_padded(&self.empty));
        let mut out = poisoned(be, b * d);
        be.masked_mean(
            b,
            l,
            d,
            &lens,
            Ref::at(&x, PAD),
            Ref::at(&empty, PAD),
            Mut::at(&mut out, PAD),
        );
        let dout = up(be, &junk_padded(&self.dout));
        let mut dx = poisoned(be, b * l * d);
        let mut de = up(be, &padded(&self.dempty));
        be.masked_mean_backward(
            b,
            l,
            d,
            &lens,
            Ref::at(&dout, PAD),
            Mut::at(&mut dx, PAD),
            Mut::at(&mut de, PAD),
        );
        vec![
            named("out", down(be, &out)),
            named("dx", down(be, &dx)),
            named("dempty", down(be, &de)),
        ]
    }
}

#[test]
fn masked_mean_forward_and_backward() {
    let mut r = rng(80);
    for (batch, max_len, d) in [
        (1, 1, 1),
        (6, 7, 37),
        (64, 128, 128),
        (4, 0, 5),
        (5, 3, 300),
        (70, 9, 33),
    ] {
        let case = MeanCase {
            batch,
            max_len,
            d,
            lens: lens(&mut r, batch, max_len),
            x: randv(&mut r, batch * max_len * d),
            empty: randv(&mut r, d),
            dout: randv(&mut r, batch * d),
            dempty: randv(&mut r, d),
        };
        parity(&format!("masked_mean b={batch} L={max_len} d={d}"), &case);
    }
}

struct EmptyRowsCase {
    lens: Vec<u32>,
    max_len: usize,
    d: usize,
    vec: Vec<f64>,
    seq: Vec<f64>,
    dseq: Vec<f64>,
    dvec: Vec<f64>,
}

impl Case for EmptyRowsCase {
    fn run<B: Backend>(&self, be: &B) -> Outs {
        let (b, l, d) = (self.lens.len(), self.max_len, self.d);
        let lens = be.upload_ids(&self.lens).expect("upload lens");
        let v = up(be, &junk_padded(&self.vec));
        let mut seq = up(be, &padded(&self.seq));
        be.put_empty_rows(b, l, d, &lens, Ref::at(&v, PAD), Mut::at(&mut seq, PAD));
        let mut ds = up(be, &padded(&self.dseq));
        let mut dv = up(be, &padded(&self.dvec));
        be.put_empty_rows_backward(b, l, d, &lens, Mut::at(&mut ds, PAD), Mut::at(&mut dv, PAD));
        vec![
            named("seq", down(be, &seq)),
            named("dseq", down(be, &ds)),
            named("dvec", down(be, &dv)),
        ]
    }
}

#[test]
fn put_empty_rows_forward_and_backward() {
    let mut r = rng(85);
    for (batch, max_len, d) in [(1, 1, 1), (6, 7, 37), (1024, 32, 128), (5, 3, 300)] {
        let case = EmptyRowsCase {
            lens: lens(&mut r, batch, max_len),
            max_len,
            d,
            vec: randv(&mut r, batch * d),
            seq: randv(&mut r, batch * max_len * d),
            dseq: randv(&mut r, batch * max_len * d),
            dvec: randv(&mut r, batch * d),
        };
        parity(
            &format!("put_empty_rows b={batch} L={max_len} d={d}"),
            &case,
        );
    }
}

// ---- losses ------------------------------------------------------------------------------

struct PointLossCase {
    z: Vec<f64>,
    y: Vec<f64>,
    t: Vec<f64>,
    w: Vec<f64>,
    g0: Vec<f64>,
}

impl Case for PointLossCase {
    fn run<B: Backend>(&self, be: &B) -> Outs {
        let n = self.z.len();
        let z = up(be, &junk_padded(&self.z));
        let y = up(be, &junk_padded(&self.y));
        let t = up(be, &junk_padded(&self.t));
        let w = up(be, &junk_padded(&self.w));
        let coef = cst::<B>(0.7);
        let bce0 = be
            .bce_loss(
                n,
                Ref::at(&z, PAD),
                Ref::at(&y, PAD),
                Ref::at(&w, PAD),
                coef,
                None,
            )
            .expect("bce");
        let mut dz = up(be, &padded(&self.g0));
        let bce = be
            .bce_loss(
                n,
                Ref::at(&z, PAD),
                Ref::at(&y, PAD),
                Ref::at(&w, PAD),
                coef,
                Some(Mut::at(&mut dz, PAD)),
            )
            .expect("bce");
        let tau = cst::<B>(2.0);
        let mut ds = up(be, &padded(&self.g0));
        let kl = be
            .bernoulli_kl_loss(
                n,
                Ref::at(&z, PAD),
                Ref::at(&t, PAD),
                Some(Ref::at(&w, PAD)),
                tau,
                coef,
                Some(Mut::at(&mut ds, PAD)),
            )
            .expect("kl");
        let mut ds1 = up(be, &padded(&self.g0));
        let kl1 = be
            .bernoulli_kl_loss(
                n,
                Ref::at(&z, PAD),
                Ref::at(&t, PAD),
                None,
                cst::<B>(0.5),
                coef,
                Some(Mut::at(&mut ds1, PAD)),
            )
            .expect("kl unweighted");
        assert!(be
            .bernoulli_kl_loss(
                n,
                Ref::at(&z, PAD),
                Ref::at(&t, PAD),
                None,
                cst::<B>(0.0),
                coef,
                None
            )
            .is_err());
        // Magnitudes of the summed parts (f64, host): BCE's softplus(z) − y·z and KL's
        // softplus(b) − softplus(a) + σ(a)·(a − b) cancel, so a value's f32 rounding is
        // relative to these, not to the (possibly tiny) value.
        let sp = |x: f64| x.max(0.0) + (-x.abs()).exp().ln_1p();
        let sg = |x: f64| 1.0 / (1.0 + (-x).exp());
        let nf = n as f64;
        let bce_mag = (0..n)
            .map(|i| self.w[i] * (sp(self.z[i]) + (self.y[i] * self.z[i]).abs()))
            .sum::<f64>()
            / nf;
        let kl_mag = |tau: f64, weighted: bool| {
            let m = (0..n)
                .map(|i| {
                    let (a, b) = (self.t[i] / tau, self.z[i] / tau);
                    let w = if weighted { self.w[i] } else { 1.0 };
                    w * (sp(b) + sp(a) + (sg(a) * (a - b)).abs())
                })
                .sum::<f64>();
            tau * tau * m / nf
        };
        let floored = |name, v: B::F, floor: f64| Out {
            floor,
            ..named(name, vec![val::<B>(v)])
        };
        vec![
            floored("bce value (no grad)", bce0, bce_mag),
            floored("bce value", bce, bce_mag),
            named("bce dlogits", down(be, &dz)),
            floored("kl value", kl, kl_mag(2.0, true)),
            named("kl dstudent", down(be, &ds)),
            floored("kl unweighted value", kl1, kl_mag(0.5, false)),
            named("kl unweighted dstudent", down(be, &ds1)),
        ]
    }
}

#[test]
fn bce_and_bernoulli_kl() {
    let mut r = rng(90);
    for n in [1, 37, 1024, 5_000] {
        let case = PointLossCase {
            z: scaled(&mut r, n, 12.0),
            y: (0..n).map(|_| r.gen_range(0..2) as f64).collect(),
            t: scaled(&mut r, n, 12.0),
            w: (0..n).map(|_| r.gen_range(0.2f32..2.0) as f64).collect(),
            g0: randv(&mut r, n),
        };
        parity(&format!("bce/kl n={n}"), &case);
    }
}

struct CoarseCase {
    n: usize,
    d: usize,
    p: Vec<f64>,
    t: Vec<f64>,
    w: Vec<f64>,
    g0: Vec<f64>,
}

impl Case for CoarseCase {
    fn run<B: Backend>(&self, be: &B) -> Outs {
        let (n, d) = (self.n, self.d);
        let p = up(be, &junk_padded(&self.p));
        let t = up(be, &junk_padded(&self.t));
        let w = up(be, &junk_padded(&self.w));
        let mut outs = Vec::new();
        for cosine in [false, true] {
            let v0 = be
                .coarse_loss(
                    n,
                    d,
                    Ref::at(&p, PAD),
                    Ref::at(&t, PAD),
                    Ref::at(&w, PAD),
                    cosine,
                    cst::<B>(1.5),
                    None,
                )
                .expect("coarse");
            let mut g = up(be, &padded(&self.g0));
            let v = be
                .coarse_loss(
                    n,
                    d,
                    Ref::at(&p, PAD),
                    Ref::at(&t, PAD),
                    Ref::at(&w, PAD),
                    cosine,
                    cst::<B>(1.5),
                    Some(Mut::at(&mut g, PAD)),
                )
                .expect("coarse");
            let (a, b, c) = if cosine {
                ("cosine value (no grad)", "cosine value", "cosine dpred")
            } else {
                ("mse value (no grad)", "mse value", "mse dpred")
            };
            outs.push(named(a, vec![val::<B>(v0)]));
            outs.push(named(b, vec![val::<B>(v)]));
            outs.push(named(c, down(be, &g)));
        }
        outs
    }
}

#[test]
fn coarse_mse_and_cosine() {
    let mut r = rng(100);
    for (n, d) in [(1, 1), (9, 37), (1024, 128), (3, 256)] {
        let mut p = randv(&mut r, n * d);
        let mut t = randv(&mut r, n * d);
        if n >= 3 {
            // A zero prediction and a zero target: cosine 0, no gradient.
            p[..d].iter_mut().for_each(|x| *x = 0.0);
            t[2 * d..3 * d].iter_mut().for_each(|x| *x = 0.0);
        }
        let case = CoarseCase {
            n,
            d,
            p,
            t,
            w: (0..n).map(|_| r.gen_range(0.2f32..2.0) as f64).collect(),
            g0: randv(&mut r, n * d),
        };
        parity(&format!("coarse n={n} d={d}"), &case);
    }
}

struct FineCase {
    shape: FineShape,
    q: Vec<f64>,
    v: Vec<f64>,
    t: Vec<f64>,
    ql: Vec<u32>,
    kl: Vec<u32>,
    w: Vec<f64>,
    gq: Vec<f64>,
    gv: Vec<f64>,
}

impl Case for FineCase {
    fn run<B: Backend>(&self, be: &B) -> Outs {
        let q = up(be, &junk_padded(&self.q));
        let v = up(be, &junk_padded(&self.v));
        let t = up(be, &junk_padded(&self.t));
        let w = up(be, &junk_padded(&self.w));
        let ql = be.upload_ids(&self.ql).expect("q_lens");
        let kl = be.upload_ids(&self.kl).expect("k_lens");
        let coef = cst::<B>(0.9);
        let v0 = be
            .fine_loss(
                self.shape,
                Ref::at(&q, PAD),
                Ref::at(&v, PAD),
                Ref::at(&t, PAD),
                &ql,
                &kl,
                Ref::at(&w, PAD),
                coef,
                None,
            )
            .expect("fine");
        let mut dq = up(be, &padded(&self.gq));
        let mut dv = up(be, &padded(&self.gv));
        let v1 = be
            .fine_loss(
                self.shape,
                Ref::at(&q, PAD),
                Ref::at(&v, PAD),
                Ref::at(&t, PAD),
                &ql,
                &kl,
                Ref::at(&w, PAD),
                coef,
                Some(FineGrads {
                    dq: Mut::at(&mut dq, PAD),
                    dv: Mut::at(&mut dv, PAD),
                }),
            )
            .expect("fine");
        vec![
            named("value (no grad)", vec![val::<B>(v0)]),
            named("value", vec![val::<B>(v1)]),
            named("dq", down(be, &dq)),
            named("dv", down(be, &dv)),
        ]
    }
}

fn fine_case(seed: u64, batch: usize, lq: usize, lk: usize, d: usize) -> FineCase {
    let mut r = rng(seed);
    let mut ql = lens(&mut r, batch, lq);
    let kl = lens(&mut r, batch, lk);
    if batch >= 3 {
        ql[1] = 0; // a row with keys but no query: counts in |R|, contributes 0
    }
    let (nq, nk) = (batch * lq * d, batch * lk * d);
    FineCase {
        shape: FineShape { batch, lq, lk, d },
        q: scaled(&mut r, nq, 2.0),
        v: randv(&mut r, nq),
        t: randv(&mut r, nk),
        ql,
        kl,
        w: (0..batch)
            .map(|_| r.gen_range(0.2f32..2.0) as f64)
            .collect(),
        gq: randv(&mut r, nq),
        gv: randv(&mut r, nq),
    }
}

#[test]
fn fine_alignment() {
    for (seed, batch, lq, lk, d) in [
        (110, 1, 1, 1, 1),
        (111, 5, 7, 13, 37),
        (112, 16, 32, 128, 128),
        (113, 2, 80, 128, 256), // 80 student tokens at d = 256: one tile
        (114, 4, 0, 6, 8),      // no student token anywhere
        (116, 3, 100, 700, 64), // 4 warps, tiles of 48 student tokens (48 + 48 + 4)
        (117, 2, 9, 1000, 128), // keys too many for 4 warps: 2 warps
        // The largest lk accepted at d = 64: one warp, 4·(lk + d) + 4 = 12272 of the 12272
        // floats of dynamic shared memory, tiles of 4 tokens (2 tiles per row).
        (115, 3, 5, 3003, 64),
    ] {
        parity(
            &format!("fine b={batch} lq={lq} lk={lk} d={d}"),
            &fine_case(seed, batch, lq, lk, d),
        );
    }
}

#[test]
fn fine_rejects_lengths_beyond_padding() {
    if gpu().is_none() {
        return;
    }
    // A backend of its own: the kernel checks the lengths and raises the fault flag, which
    // must not reach the other tests.
    let g = &CudaBackend::new(0).expect("a second backend on the same device");
    let shape = FineShape {
        batch: 2,
        lq: 2,
        lk: 2,
        d: 4,
    };
    let x = g.upload(&[0.5f32; 16]).expect("x");
    let w = g.upload(&[1.0f32; 2]).expect("w");
    let ql = g.upload_ids(&[1, 3]).expect("q_lens");
    let kl = g.upload_ids(&[1, 1]).expect("k_lens");
    let x4 = Ref::whole(&x);
    let err = g
        .fine_loss(shape, x4, x4, x4, &ql, &kl, Ref::whole(&w), 1.0, None)
        .expect_err("q_lens[1] = 3 > lq = 2");
    assert!(err.to_string().contains("padded length"), "{err}");
}

#[test]
fn fine_refuses_shapes_beyond_shared_memory() {
    let Some(g) = gpu() else { return };
    // lk = 3004 at d = 64 leaves no room for a tile with one warp (4·(lk + d) = 12272 of the
    // 12272 floats); see fine_alignment for lk = 3003, the last one accepted.
    for lk in [3004, 4000] {
        let shape = FineShape {
            batch: 1,
            lq: 1,
            lk,
            d: 64,
        };
        let q = g.upload(&[0.5f32; 64]).expect("q");
        let k = g.upload(&vec![0.5f32; lk * 64]).expect("k");
        let w = g.upload(&[1.0f32]).expect("w");
        let ql = g.upload_ids(&[1]).expect("q_lens");
        let kl = g.upload_ids(&[lk as u32]).expect("k_lens");
        let err = g
            .fine_loss(
                shape,
                Ref::whole(&q),
                Ref::whole(&q),
                Ref::whole(&k),
                &ql,
                &kl,
                Ref::whole(&w),
                1.0,
                None,
            )
            .expect_err("the shape exceeds the kernel's shared memory");
        assert!(err.to_string().contains("too large"), "{err}");
    }
}

// ---- optimizer ---------------------------------------------------------------------------

/// AdamW at lr 1e-2 with the betas, ε and weight decay of docs/model.md §6.1, at `step` with
/// clipping factor `grad_scale`.
fn adamw_hp(step: u64, grad_scale: f64) -> AdamW {
    AdamW {
        lr: 1e-2,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.01,
        step,
        grad_scale,
    }
}

struct OptCase {
    p: Vec<f64>,
    g: Vec<f64>,
    mask: Vec<f64>,
}

impl Case for OptCase {
    fn run<B: Backend>(&self, be: &B) -> Outs {
        let n = self.p.len();
        let g = up(be, &junk_padded(&self.g));
        let ss = be.sum_squares(n, Ref::at(&g, PAD)).expect("sum_squares");
        let mut p = up(be, &self.p);
        let gw = up(be, &self.g);
        let mut m = be.zeros(n).expect("m");
        let mut v = be.zeros(n).expect("v");
        let mask = up(be, &self.mask);
        for step in 1..=3 {
            let hp = adamw_hp(step, 0.5);
            be.adamw(&hp, &mut p, &gw, &mut m, &mut v, &mask);
        }
        // The clipping factor read from the device: ‖g‖ from sum_squares_into, clipped at
        // 1.0 (these gradients' norms are above it, but for n = 1) and at 1e9 (no clipping).
        let mut clipped = Vec::new();
        for clip in [1.0, 1e9] {
            let mut ss_slot = be.zeros(1).expect("slot");
            be.sum_squares_into(n, Ref::at(&g, PAD), Mut::whole(&mut ss_slot))
                .expect("sum_squares_into");
            let mut p2 = up(be, &self.p);
            let mut m2 = be.zeros(n).expect("m");
            let mut v2 = be.zeros(n).expect("v");
            for step in 1..=3 {
                let hp = adamw_hp(step, 1.0);
                be.adamw_clipped(
                    &hp,
                    clip,
                    Ref::whole(&ss_slot),
                    None,
                    &mut p2,
                    &gw,
                    &mut m2,
                    &mut v2,
                    &mask,
                )
                .expect("adamw_clipped");
            }
            clipped.push(down(be, &p2));
        }
        // Against f64 the moments differ by the rounding of the constants themselves:
        // 1 − β2 = 0.001 is 0.0010000467 in f32 (4.7e-5 relative), which v and, through
        // √v̂, the update carry; 1e-4 bounds it (the GPU against the f32 CPU stays at 1e-5).
        let loose = |name, data| Out {
            tol64: 1e-4,
            ..named(name, data)
        };
        vec![
            named("sum_squares", vec![val::<B>(ss)]),
            loose("params after 3 steps", down(be, &p)),
            loose("m", down(be, &m)),
            loose("v", down(be, &v)),
            loose("params after 3 clipped steps (clip 1)", clipped[0].clone()),
            loose(
                "params after 3 clipped steps (clip 1e9)",
                clipped[1].clone(),
            ),
        ]
    }
}

#[test]
fn sum_squares_and_adamw() {
    let mut r = rng(120);
    for n in [1, 255, 257, 100_000, 1_000_003] {
        let case = OptCase {
            p: randv(&mut r, n),
            g: randv(&mut r, n),
            mask: (0..n).map(|i| (i % 3 != 0) as u8 as f64).collect(),
        };
        parity(&format!("optimizer n={n}"), &case);
    }
}

#[test]
fn adamw_with_a_non_finite_norm_changes_nothing_and_is_an_error() {
    let n = 1000;
    let check = |what: &str, p0: Vec<f64>, after: Vec<f64>| {
        assert_eq!(p0, after, "{what}: the parameters changed");
    };
    let mut r = rng(121);
    let p0 = randv(&mut r, n);
    let g0 = randv(&mut r, n);
    // The CPU reports it at once.
    let cpu = CpuBackend::<f32>::new();
    let hp = adamw_hp(1, 1.0);
    {
        let be = &cpu;
        let (mut p, g, mask) = (up(be, &p0), up(be, &g0), up(be, &vec![1.0; n]));
        let (mut m, mut v) = (be.zeros(n).unwrap(), be.zeros(n).unwrap());
        let nan = up(be, &[f64::NAN]);
        let err = be
            .adamw_clipped(
                &hp,
                1.0,
                Ref::whole(&nan),
                None,
                &mut p,
                &g,
                &mut m,
                &mut v,
                &mask,
            )
            .expect_err("a NaN norm is an error");
        assert!(err.to_string().contains("diverged"), "{err}");
        check("cpu", down(be, &up(be, &p0)), down(be, &p));
    }
    if gpu().is_none() {
        return;
    }
    // A backend of its own: the fault flag it raises must not reach the other tests.
    let be = &CudaBackend::new(0).expect("a second backend on the same device");
    let (mut p, g, mask) = (up(be, &p0), up(be, &g0), up(be, &vec![1.0; n]));
    let (mut m, mut v) = (be.zeros(n).unwrap(), be.zeros(n).unwrap());
    let inf = up(be, &[f64::INFINITY]);
    be.adamw_clipped(
        &hp,
        1.0,
        Ref::whole(&inf),
        None,
        &mut p,
        &g,
        &mut m,
        &mut v,
        &mask,
    )
    .expect("queued: reported at the next synchronising call");
    let err = be
        .download(&p)
        .expect_err("an infinite norm must be reported");
    assert!(err.to_string().contains("diverged"), "{err}");
    check("cuda", down(be, &up(be, &p0)), down(be, &p));
}
