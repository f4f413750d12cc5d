//! The bf16 scheme op by op on the GPU: each operation the model runs, with its buffers in
//! the types the scheme gives them (docs/cuda.md "bf16": activations bf16, the residual
//! stream, statistics and parameter gradients f32), on `CudaBackend` opened with
//! `Precision::Bf16`, against the scheme's CPU reference ([`CpuBf16Backend`]) and against
//! the f64 CPU backend on the same inputs (rounded to bf16 or f32 on the host first, so
//! every backend starts from the same numbers). Where a whole-model check
//! (`tests/cuda_bf16_parity.rs`) fails, these say which operation.
//!
//! Per output, over the elements the reference writes (outputs are NaN-poisoned before the
//! call; the device must leave NaN exactly where the reference does):
//! - against the reference, `‖gpu − ref‖/‖ref‖ ≤ 4e-3` (u = 2⁻⁸): both compute in f32 and
//!   round the same stores, in another summation order, so a stored value differs by one
//!   bf16 ulp only where its f32 value lies within f32 noise of a rounding boundary, and an
//!   f32 output computed from such a store moves by at most as much;
//! - against f64, `≤ 1e-2`: an output carries the rounding of its bf16 inputs' products and of
//!   its own store, of order u, with the cancellation of a sum left room for;
//! - two GPU runs bit-identical.
//!
//! Without a GPU every test reports a skip (`MGKD_REQUIRE_GPU=1` makes that a failure);
//! `MGKD_PARITY_SELFTEST=1` runs the reference in the device's place, which checks the cases
//! and the bound against f64.

mod cuda_common;
mod kernel_emu;
mod skip;

use std::sync::OnceLock;

use cuda_common::{gpu, selftest};
use mgkd::backend::cpu::CpuBackend;
use mgkd::backend::cpu_bf16::CpuBf16Backend;
use mgkd::backend::cuda::CudaBackend;
use mgkd::backend::{
    AttnShape, Backend, EmbMode, EmbTable, FineGrads, FineShape, Float, Gemm, Mut, Outer,
    Precision, Ref,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Bound against the CPU reference (module documentation).
const REF_REL: f64 = 4e-3;
/// Bound against f64.
const EXACT_REL: f64 = 1e-2;

/// A buffer's type under the scheme.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    /// An activation, or the weights' compute copy: bf16.
    Act,
    /// f32 whatever the precision (residual stream, statistics, gradients of parameters).
    Full,
}

/// The value `x` has once stored as `kind` (what every backend is given).
fn stored(kind: Kind, x: f64) -> f64 {
    match kind {
        Kind::Act => half::bf16::from_f64(x).to_f64(),
        Kind::Full => x as f32 as f64,
    }
}

/// A buffer of `kind` on `be` holding `host` (already representable).
fn buf<B: Backend>(be: &B, kind: Kind, host: &[f64]) -> B::Buf {
    let mut b = match kind {
        Kind::Act => be.scratch(host.len()),
        Kind::Full => be.scratch_full(host.len()),
    }
    .expect("buffer");
    let v: Vec<B::F> = host.iter().map(|&x| B::F::from_f64(x)).collect();
    be.write(&v, Mut::whole(&mut b)).expect("write");
    b
}

/// A buffer of `kind` and length `n`, every element NaN.
fn poisoned<B: Backend>(be: &B, kind: Kind, n: usize) -> B::Buf {
    buf(be, kind, &vec![f64::NAN; n])
}

fn down<B: Backend>(be: &B, b: &B::Buf) -> Vec<f64> {
    be.download(b)
        .expect("download")
        .iter()
        .map(|x| x.to_f64())
        .collect()
}

fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// `n` values uniform in (−scale, scale), as stored in `kind`.
fn values(r: &mut ChaCha8Rng, kind: Kind, n: usize, scale: f64) -> Vec<f64> {
    (0..n)
        .map(|_| stored(kind, scale * r.gen_range(-1.0..1.0)))
        .collect()
}

/// Key lengths in 0..=len, the first full and (with two rows or more) the second empty.
fn lens(r: &mut ChaCha8Rng, batch: usize, len: usize) -> Vec<u32> {
    (0..batch)
        .map(|b| match b {
            0 => len as u32,
            1 => 0,
            _ => r.gen_range(0..=len as u32),
        })
        .collect()
}

/// Outputs of one case, by name.
type Outs = Vec<(&'static str, Vec<f64>)>;

/// One operation on any backend.
trait Case {
    fn run<B: Backend>(&self, be: &B) -> Outs;
}

/// The bf16 CUDA backend of the process, or none without a GPU.
fn device() -> Option<&'static CudaBackend> {
    static DEV: OnceLock<CudaBackend> = OnceLock::new();
    gpu()?;
    Some(DEV.get_or_init(|| CudaBackend::with_precision(0, Precision::Bf16).expect("bf16 backend")))
}

fn rel(got: &[f64], want: &[f64]) -> f64 {
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (g, w) in got.iter().zip(want) {
        if !w.is_nan() {
            num += (g - w) * (g - w);
            den += w * w;
        }
    }
    if den > 0.0 {
        (num / den).sqrt()
    } else {
        num.sqrt()
    }
}

/// Compares `got` with the reference and f64 (module documentation).
fn compare(label: &str, got: &Outs, reference: &Outs, exact: &Outs) {
    for (((name, g), (_, r)), (_, e)) in got.iter().zip(reference).zip(exact) {
        for (i, (x, w)) in g.iter().zip(r).enumerate() {
            assert_eq!(
                x.is_nan(),
                w.is_nan(),
                "{label}: {name}[{i}] = {x}, reference {w} (written outside the contract, or not written)"
            );
        }
        let written = r.iter().filter(|w| !w.is_nan()).count();
        assert!(
            written > 0
                && e.iter()
                    .all(|x| !x.is_nan() || r.iter().any(|w| w.is_nan())),
            "{label}: {name}: the reference wrote nothing (a case that checks nothing)"
        );
        let (er, ee) = (rel(g, r), rel(g, e));
        println!("{label}: {name}: {er:.2e} from the reference, {ee:.2e} from f64");
        assert!(er <= REF_REL, "{label}: {name}: {er:e} from the reference");
        assert!(ee <= EXACT_REL, "{label}: {name}: {ee:e} from f64");
    }
}

/// Runs `case` on the device (twice), the reference and f64, and compares.
fn check<C: Case>(label: &str, case: &C) {
    let reference = case.run(&CpuBf16Backend::new());
    let exact = case.run(&CpuBackend::<f64>::new());
    match device() {
        Some(d) => {
            let got = case.run(d);
            compare(label, &got, &reference, &exact);
            let again = case.run(d);
            for ((name, a), (_, b)) in got.iter().zip(&again) {
                let same = a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
                assert!(same, "{label}: {name} differs between two runs");
            }
        }
        None if selftest() => compare(
            &format!("{label} (self-test)"),
            &reference,
            &reference,
            &exact,
        ),
        None => {}
    }
}

// ---- linear maps (cuBLASLt) ------------------------------------------------------------

/// `y = x·Wᵀ + b` with x, W and b bf16 (W and b at element offsets 1 and 3 of the weights'
/// copy: addresses off 16 bytes, which the backend copies to aligned windows), into a bf16 output
/// (overwritten, and accumulated), into an f32 output (the logits), and with an f32 residual
/// (the residual stream).
struct LinearCase {
    rows: usize,
    inp: usize,
    out: usize,
    seed: u64,
}

impl Case for LinearCase {
    fn run<B: Backend>(&self, be: &B) -> Outs {
        let (r, i, o) = (self.rows, self.inp, self.out);
        let mut g = rng(self.seed);
        let x = buf(be, Kind::Act, &values(&mut g, Kind::Act, r * i, 1.0));
        // The weights' copy: W at offset 1, b at offset 1 + o·i + 2.
        let params = values(&mut g, Kind::Act, 1 + o * i + 2 + o, 0.3);
        let p = buf(be, Kind::Act, &params);
        let (w, b) = (Ref::at(&p, 1), Ref::at(&p, 1 + o * i + 2));
        let mut y_act = poisoned(be, Kind::Act, r * o);
        be.linear_forward(r, i, o, Ref::whole(&x), w, b, Mut::whole(&mut y_act), false);
        let mut y_acc = buf(be, Kind::Act, &values(&mut g, Kind::Act, r * o, 1.0));
        be.linear_forward(r, i, o, Ref::whole(&x), w, b, Mut::whole(&mut y_acc), true);
        let mut y_full = poisoned(be, Kind::Full, r * o);
        be.linear_forward(
            r,
            i,
            o,
            Ref::whole(&x),
            w,
            b,
            Mut::whole(&mut y_full),
            false,
        );
        let resid = buf(be, Kind::Full, &values(&mut g, Kind::Full, r * o, 1.0));
        let mut y_res = poisoned(be, Kind::Full, r * o);
        be.linear_residual(
            r,
            i,
            o,
            Ref::whole(&x),
            w,
            b,
            Ref::whole(&resid),
            Mut::whole(&mut y_res),
        );
        vec![
            ("y (bf16)", down(be, &y_act)),
            ("y (bf16, accumulated)", down(be, &y_acc)),
            ("y (f32)", down(be, &y_full)),
            ("y (f32 residual)", down(be, &y_res)),
        ]
    }
}

#[test]
fn linear_maps() {
    for (k, (rows, inp, out)) in [(37, 40, 24), (64, 128, 384), (5, 16, 1)]
        .into_iter()
        .enumerate()
    {
        let case = LinearCase {
            rows,
            inp,
            out,
            seed: k as u64,
        };
        check(&format!("linear {rows}×{inp} → {out}"), &case);
    }
}

// ---- products (cuBLAS) -----------------------------------------------------------------

/// A product with the given operand and output kinds (an f32 operand beside a bf16 one is
/// rounded first).
struct GemmCase {
    s: Gemm,
    kinds: [Kind; 3],
    beta: f64,
    seed: u64,
}

impl Case for GemmCase {
    fn run<B: Backend>(&self, be: &B) -> Outs {
        let s = &self.s;
        let mut g = rng(self.seed);
        let ((ar, ac), (br, bc)) = s.stored_shapes();
        let ext = |rows: usize, cols: usize, ld: usize, stride: usize| {
            (s.batch - 1) * stride + (rows - 1) * ld + cols
        };
        let [ka, kb, kc] = self.kinds;
        let a = buf(
            be,
            ka,
            &values(&mut g, ka, ext(ar, ac, s.lda, s.stride_a), 1.0),
        );
        let b = buf(
            be,
            kb,
            &values(&mut g, kb, ext(br, bc, s.ldb, s.stride_b), 1.0),
        );
        let c_len = ext(s.m, s.n, s.ldc, s.stride_c);
        let mut c = if self.beta == 0.0 {
            poisoned(be, kc, c_len)
        } else {
            buf(be, kc, &values(&mut g, kc, c_len, 1.0))
        };
        let f = |x: f64| B::F::from_f64(x);
        be.gemm(
            s,
            f(0.75),
            Ref::whole(&a),
            Ref::whole(&b),
            f(self.beta),
            Mut::whole(&mut c),
        );
        vec![("C", down(be, &c))]
    }
}

/// Every transpose, one and three batch entries, into f32 (a weight gradient) and into bf16
/// (an activation gradient), bf16 × bf16 and f32 × bf16.
#[test]
fn products_every_transpose() {
    use Kind::{Act, Full};
    let mut seed = 0;
    for (m, n, k) in [(37, 53, 29), (64, 128, 32)] {
        for ta in [false, true] {
            for tb in [false, true] {
                for batch in [1, 3] {
                    for (kinds, beta) in [
                        ([Act, Act, Full], 0.0),
                        ([Act, Act, Full], 1.0),
                        ([Act, Act, Act], 0.0),
                        ([Full, Act, Act], 0.0),
                    ] {
                        let mut s = Gemm::new(m, n, k, ta, tb);
                        let ((ar, ac), (br, bc)) = s.stored_shapes();
                        s.batch = batch;
                        s.stride_a = ar * ac;
                        s.stride_b = br * bc;
                        s.stride_c = m * n;
                        seed += 1;
                        let case = GemmCase {
                            s,
                            kinds,
                            beta,
                            seed,
                        };
                        check(
                            &format!(
                                "gemm {m}×{n}×{k} ta={ta} tb={tb} batch={batch} {kinds:?} β={beta}"
                            ),
                            &case,
                        );
                    }
                }
            }
        }
    }
}

/// The attention products over heads × rows (bf16 in and out): a length that is a multiple
/// of 8 (the batched pointer-array call) and one that is not (one strided call per head).
struct OuterCase {
    s: Gemm,
    outer: Outer,
    lens: [usize; 3],
    seed: u64,
}

impl Case for OuterCase {
    fn run<B: Backend>(&self, be: &B) -> Outs {
        let mut g = rng(self.seed);
        let [la, lb, lc] = self.lens;
        let a = buf(be, Kind::Act, &values(&mut g, Kind::Act, la, 1.0));
        let b = buf(be, Kind::Act, &values(&mut g, Kind::Act, lb, 1.0));
        let mut c = poisoned(be, Kind::Act, lc);
        let f = |x: f64| B::F::from_f64(x);
        be.gemm_outer(
            &self.s,
            &self.outer,
            f(1.0),
            Ref::whole(&a),
            Ref::whole(&b),
            f(0.0),
            Mut::whole(&mut c),
        );
        vec![("C", down(be, &c))]
    }
}

#[test]
fn attention_products_over_heads_and_rows() {
    for (batch, l, heads, dh) in [(5, 11, 3, 8), (4, 16, 4, 32)] {
        let d = heads * dh;
        let s = AttnShape {
            batch,
            len: l,
            heads,
            d,
        };
        let (scores, heads_qk) = s.scores_product(3 * d, 3 * d);
        let (pv, heads_pv) = s.probs_product(false, 3 * d, d);
        let (dv, heads_dv) = s.probs_product(true, d, 3 * d);
        let qkv = batch * l * 3 * d;
        let probs = batch * heads * l * l;
        for (k, (name, g, outer, lens)) in [
            ("Q·Kᵀ", scores, heads_qk, [qkv, qkv - d, probs]),
            ("P·V", pv, heads_pv, [probs, qkv - 2 * d, batch * l * d]),
            ("Pᵀ·dC", dv, heads_dv, [probs, batch * l * d, qkv]),
        ]
        .into_iter()
        .enumerate()
        {
            let case = OuterCase {
                s: g,
                outer,
                lens,
                seed: k as u64,
            };
            check(&format!("{name} b={batch} l={l} h={heads} dh={dh}"), &case);
        }
    }
}

// ---- LayerNorm ---------------------------------------------------------------------------

/// LayerNorm of the f32 residual stream with bf16 γ|β into a bf16 output (f32 statistics),
/// and its backward from a bf16 dy accumulated into the f32 stream gradient and f32 dγ|dβ.
struct LnCase {
    rows: usize,
    d: usize,
}

impl Case for LnCase {
    fn run<B: Backend>(&self, be: &B) -> Outs {
        let (r, d) = (self.rows, self.d);
        let mut g = rng(5);
        let x = buf(be, Kind::Full, &values(&mut g, Kind::Full, r * d, 2.0));
        let mut gb_host = values(&mut g, Kind::Act, 2 * d, 0.5);
        for v in &mut gb_host[..d] {
            *v = stored(Kind::Act, 1.0 + *v);
        }
        let gb = buf(be, Kind::Act, &gb_host);
        let mut y = poisoned(be, Kind::Act, r * d);
        let mut stats = poisoned(be, Kind::Full, 2 * r);
        be.layernorm(
            r,
            d,
            Ref::whole(&x),
            Ref::whole(&gb),
            Mut::whole(&mut y),
            Mut::whole(&mut stats),
        );
        let dy = buf(be, Kind::Act, &values(&mut g, Kind::Act, r * d, 1.0));
        // Both accumulate.
        let mut dx = buf(be, Kind::Full, &values(&mut g, Kind::Full, r * d, 1.0));
        let mut dgb = buf(be, Kind::Full, &values(&mut g, Kind::Full, 2 * d, 1.0));
        be.layernorm_backward(
            r,
            d,
            Ref::whole(&x),
            Ref::whole(&gb),
            Ref::whole(&stats),
            Ref::whole(&dy),
            Mut::whole(&mut dx),
            Mut::whole(&mut dgb),
        );
        vec![
            ("y", down(be, &y)),
            ("stats", down(be, &stats)),
            ("dx", down(be, &dx)),
            ("dγ|dβ", down(be, &dgb)),
        ]
    }
}

#[test]
fn layernorm_forward_and_backward() {
    for (rows, d) in [(1, 16), (37, 128), (300, 40)] {
        check(&format!("layernorm {rows}×{d}"), &LnCase { rows, d });
    }
}

// ---- GELU, bias ----------------------------------------------------------------------------

/// GELU on bf16, its backward fused with the bias gradient (bf16 dx, f32 db), and a bf16
/// bias added to a bf16 and to an f32 output.
struct GeluCase {
    rows: usize,
    n: usize,
}

impl Case for GeluCase {
    fn run<B: Backend>(&self, be: &B) -> Outs {
        let (r, n) = (self.rows, self.n);
        let mut g = rng(6);
        let xh = values(&mut g, Kind::Act, r * n, 3.0);
        let x = buf(be, Kind::Act, &xh);
        let mut y = poisoned(be, Kind::Act, r * n);
        be.gelu(r * n, Ref::whole(&x), Mut::whole(&mut y));
        let mut xy = buf(be, Kind::Act, &xh);
        be.gelu_in_place(r * n, Mut::whole(&mut xy));
        // dy, turned into dx in place.
        let mut dx = buf(be, Kind::Act, &values(&mut g, Kind::Act, r * n, 1.0));
        let mut db = buf(be, Kind::Full, &values(&mut g, Kind::Full, n, 1.0)); // accumulates
        be.gelu_bias_backward(
            r,
            n,
            Ref::whole(&x),
            Mut::whole(&mut dx),
            Mut::whole(&mut db),
        );
        let bias = buf(be, Kind::Act, &values(&mut g, Kind::Act, n, 1.0));
        let mut ya = buf(be, Kind::Act, &values(&mut g, Kind::Act, r * n, 1.0));
        be.add_bias(r, n, Ref::whole(&bias), Mut::whole(&mut ya));
        let mut yf = buf(be, Kind::Full, &values(&mut g, Kind::Full, r * n, 1.0));
        be.add_bias(r, n, Ref::whole(&bias), Mut::whole(&mut yf));
        vec![
            ("gelu", down(be, &y)),
            ("gelu in place", down(be, &xy)),
            ("dx", down(be, &dx)),
            ("db", down(be, &db)),
            ("y + b (bf16)", down(be, &ya)),
            ("y + b (f32)", down(be, &yf)),
        ]
    }
}

#[test]
fn gelu_and_bias() {
    for (rows, n) in [(3, 7), (300, 512)] {
        check(&format!("gelu/bias {rows}×{n}"), &GeluCase { rows, n });
    }
}

// ---- embeddings and positions --------------------------------------------------------------

/// Gathers from bf16 tables (the weights' copy): summed over fields into the f32 residual
/// stream, concatenated into a bf16 row; the backward from a bf16 gradient into f32 table
/// gradients; positions (bf16) added to the f32 stream and their f32 gradient.
struct EmbCase {
    n: usize,
    width: usize,
}

impl Case for EmbCase {
    fn run<B: Backend>(&self, be: &B) -> Outs {
        let (n, w) = (self.n, self.width);
        let mut g = rng(7);
        let vocabs = [5usize, 64, 3];
        let mut tables = Vec::new();
        let mut off = 1; // off 16 bytes: the gathers take any element offset
        for &v in &vocabs {
            tables.push(EmbTable {
                offset: off,
                vocab: v,
            });
            off += v * w;
        }
        let params = buf(be, Kind::Act, &values(&mut g, Kind::Act, off, 1.0));
        let ids_host: Vec<u32> = (0..n * vocabs.len())
            .map(|k| g.gen_range(0..vocabs[k % vocabs.len()] as u32))
            .collect();
        let ids = be.upload_ids(&ids_host).expect("ids");
        let mut sum = poisoned(be, Kind::Full, n * w);
        be.embedding(
            n,
            w,
            &tables,
            &ids,
            &params,
            EmbMode::Sum,
            Mut::whole(&mut sum),
            w,
        );
        let cw = vocabs.len() * w;
        let mut cat = poisoned(be, Kind::Act, n * cw);
        be.embedding(
            n,
            w,
            &tables,
            &ids,
            &params,
            EmbMode::Concat,
            Mut::whole(&mut cat),
            cw,
        );
        let dout = buf(be, Kind::Act, &values(&mut g, Kind::Act, n * cw, 1.0));
        let mut grads = buf(be, Kind::Full, &vec![0.0; off]);
        be.embedding_backward(
            n,
            w,
            &tables,
            &ids,
            EmbMode::Concat,
            Ref::whole(&dout),
            cw,
            &mut grads,
            None,
        );
        // Positions: n tokens as batch rows of max_len, bf16 table, f32 stream.
        let (batch, max_len) = (n.div_ceil(8), 8);
        let lens_host = lens(&mut g, batch, max_len);
        let lens = be.upload_ids(&lens_host).expect("lens");
        let pos = buf(be, Kind::Act, &values(&mut g, Kind::Act, max_len * w, 1.0));
        let mut x = buf(
            be,
            Kind::Full,
            &values(&mut g, Kind::Full, batch * max_len * w, 1.0),
        );
        be.add_positions(
            batch,
            max_len,
            w,
            &lens,
            Ref::whole(&pos),
            Mut::whole(&mut x),
        );
        let dx = buf(
            be,
            Kind::Full,
            &values(&mut g, Kind::Full, batch * max_len * w, 1.0),
        );
        let mut dpos = buf(
            be,
            Kind::Full,
            &values(&mut g, Kind::Full, max_len * w, 1.0),
        ); // accumulates
        be.add_positions_backward(
            batch,
            max_len,
            w,
            &lens,
            Ref::whole(&dx),
            Mut::whole(&mut dpos),
        );
        vec![
            ("sum", down(be, &sum)),
            ("concat", down(be, &cat)),
            ("table gradients", down(be, &grads)),
            ("x + positions", down(be, &x)),
            ("position gradient", down(be, &dpos)),
        ]
    }
}

#[test]
fn embeddings_and_positions() {
    for (n, width) in [(1, 8), (300, 16)] {
        check(
            &format!("embedding n={n} width={width}"),
            &EmbCase { n, width },
        );
    }
}

// ---- masked softmax ----------------------------------------------------------------------

/// The composed attention's softmax in place on bf16 scores, and its backward (bf16).
struct SoftmaxCase {
    batch: usize,
    heads: usize,
    l: usize,
}

impl Case for SoftmaxCase {
    fn run<B: Backend>(&self, be: &B) -> Outs {
        let (b, h, l) = (self.batch, self.heads, self.l);
        let mut g = rng(8);
        let n = b * h * l * l;
        let key_lens = lens(&mut g, b, l);
        let ids = be.upload_ids(&key_lens).expect("lens");
        let scale = B::F::from_f64(0.25);
        let mut p = buf(be, Kind::Act, &values(&mut g, Kind::Act, n, 8.0));
        be.masked_softmax(b, h, l, l, &ids, 0, scale, Mut::whole(&mut p));
        let dp = buf(be, Kind::Act, &values(&mut g, Kind::Act, n, 1.0));
        let mut ds = poisoned(be, Kind::Act, n);
        be.masked_softmax_backward(
            b,
            h,
            l,
            l,
            &ids,
            scale,
            Ref::whole(&p),
            Ref::whole(&dp),
            Mut::whole(&mut ds),
        );
        vec![("p", down(be, &p)), ("ds", down(be, &ds))]
    }
}

#[test]
fn masked_softmax_forward_and_backward() {
    for (batch, heads, l) in [(3, 2, 5), (4, 4, 33)] {
        check(
            &format!("masked softmax b={batch} h={heads} l={l}"),
            &SoftmaxCase { batch, heads, l },
        );
    }
}

// ---- pooling -------------------------------------------------------------------------------

/// The masked mean over a bf16 sequence (with the learned empty-sequence vector, bf16) and
/// its backward (bf16 dx, f32 dempty, accumulated), and the empty-row substitution of the
/// fine loss and its backward (bf16).
struct PoolCase {
    batch: usize,
    max_len: usize,
    d: usize,
}

impl Case for PoolCase {
    fn run<B: Backend>(&self, be: &B) -> Outs {
        let (b, l, d) = (self.batch, self.max_len, self.d);
        let mut g = rng(9);
        let lens_host = lens(&mut g, b, l);
        let lens = be.upload_ids(&lens_host).expect("lens");
        let x = buf(be, Kind::Act, &values(&mut g, Kind::Act, b * l * d, 1.0));
        let empty = buf(be, Kind::Act, &values(&mut g, Kind::Act, d, 1.0));
        let mut out = poisoned(be, Kind::Act, b * d);
        be.masked_mean(
            b,
            l,
            d,
            &lens,
            Ref::whole(&x),
            Ref::whole(&empty),
            Mut::whole(&mut out),
        );
        let dout = buf(be, Kind::Act, &values(&mut g, Kind::Act, b * d, 1.0));
        let mut dx = poisoned(be, Kind::Act, b * l * d);
        let mut dempty = buf(be, Kind::Full, &values(&mut g, Kind::Full, d, 1.0));
        be.masked_mean_backward(
            b,
            l,
            d,
            &lens,
            Ref::whole(&dout),
            Mut::whole(&mut dx),
            Mut::whole(&mut dempty),
        );
        let vec = buf(be, Kind::Act, &values(&mut g, Kind::Act, b * d, 1.0));
        let mut seq = buf(be, Kind::Act, &values(&mut g, Kind::Act, b * l * d, 1.0));
        be.put_empty_rows(b, l, d, &lens, Ref::whole(&vec), Mut::whole(&mut seq));
        let mut dseq = buf(be, Kind::Act, &values(&mut g, Kind::Act, b * l * d, 1.0));
        let mut dvec = buf(be, Kind::Act, &values(&mut g, Kind::Act, b * d, 1.0));
        be.put_empty_rows_backward(b, l, d, &lens, Mut::whole(&mut dseq), Mut::whole(&mut dvec));
        vec![
            ("mean", down(be, &out)),
            ("dx", down(be, &dx)),
            ("dempty", down(be, &dempty)),
            ("seq", down(be, &seq)),
            ("dseq", down(be, &dseq)),
            ("dvec", down(be, &dvec)),
        ]
    }
}

#[test]
fn pooling_and_empty_rows() {
    for (batch, max_len, d) in [(3, 4, 8), (70, 32, 128)] {
        check(
            &format!("pooling b={batch} l={max_len} d={d}"),
            &PoolCase { batch, max_len, d },
        );
    }
}

// ---- losses ----------------------------------------------------------------------------------

/// The coarse (MSE and cosine) and fine alignment losses on bf16 representations, f32 row
/// weights, gradients accumulated into bf16 windows; the values as outputs too.
struct LossCase {
    batch: usize,
    lq: usize,
    lk: usize,
    d: usize,
}

impl Case for LossCase {
    fn run<B: Backend>(&self, be: &B) -> Outs {
        let (b, lq, lk, d) = (self.batch, self.lq, self.lk, self.d);
        let mut g = rng(10);
        let f = |x: f64| B::F::from_f64(x);
        let w = buf(
            be,
            Kind::Full,
            &(0..b)
                .map(|_| stored(Kind::Full, g.gen_range(0.2..2.0)))
                .collect::<Vec<_>>(),
        );
        let pred = buf(be, Kind::Act, &values(&mut g, Kind::Act, b * d, 1.0));
        let target = buf(be, Kind::Act, &values(&mut g, Kind::Act, b * d, 1.0));
        let mut outs = Vec::new();
        for (cosine, name, gname) in [
            (false, "coarse (MSE)", "dpred (MSE)"),
            (true, "coarse (cosine)", "dpred (cosine)"),
        ] {
            // Accumulated into: small values, so that the gradient (of order coef/n) shows.
            let mut dpred = buf(be, Kind::Act, &values(&mut g, Kind::Act, b * d, 1e-3));
            let v = be
                .coarse_loss(
                    b,
                    d,
                    Ref::whole(&pred),
                    Ref::whole(&target),
                    Ref::whole(&w),
                    cosine,
                    f(0.7),
                    Some(Mut::whole(&mut dpred)),
                )
                .expect("coarse");
            outs.push((name, vec![v.to_f64()]));
            outs.push((gname, down(be, &dpred)));
        }
        let mut ql = lens(&mut g, b, lq);
        let kl = lens(&mut g, b, lk);
        if b >= 3 {
            ql[2] = 0;
        }
        let (ql, kl) = (
            be.upload_ids(&ql).expect("q_lens"),
            be.upload_ids(&kl).expect("k_lens"),
        );
        let (nq, nk) = (b * lq * d, b * lk * d);
        let q = buf(be, Kind::Act, &values(&mut g, Kind::Act, nq, 2.0));
        let v = buf(be, Kind::Act, &values(&mut g, Kind::Act, nq, 1.0));
        let t = buf(be, Kind::Act, &values(&mut g, Kind::Act, nk, 1.0));
        let mut dq = buf(be, Kind::Act, &values(&mut g, Kind::Act, nq, 1e-4));
        let mut dv = buf(be, Kind::Act, &values(&mut g, Kind::Act, nq, 1e-4));
        let value = be
            .fine_loss(
                FineShape {
                    batch: b,
                    lq,
                    lk,
                    d,
                },
                Ref::whole(&q),
                Ref::whole(&v),
                Ref::whole(&t),
                &ql,
                &kl,
                Ref::whole(&w),
                f(0.9),
                Some(FineGrads {
                    dq: Mut::whole(&mut dq),
                    dv: Mut::whole(&mut dv),
                }),
            )
            .expect("fine");
        outs.push(("fine", vec![value.to_f64()]));
        outs.push(("fine dq", down(be, &dq)));
        outs.push(("fine dv", down(be, &dv)));
        outs
    }
}

#[test]
fn coarse_and_fine_losses() {
    for (batch, lq, lk, d) in [(3, 5, 9, 8), (16, 32, 128, 128)] {
        check(
            &format!("losses b={batch} lq={lq} lk={lk} d={d}"),
            &LossCase { batch, lq, lk, d },
        );
    }
}
