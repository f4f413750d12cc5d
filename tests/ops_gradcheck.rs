//! Gradient checks of every op and loss of the CPU backend.
//!
//! For each op a *case* fixes the shapes and the non-differentiable inputs and exposes the
//! forward (`fwd`) and the analytic gradient of the scalar objective `J = Σ r ⊙ out` (`bwd`)
//! over its differentiable inputs, both generic over the element type. [`run_case`] then
//! checks, for every case:
//! - the analytic gradient in f64 against central finite differences (relative error
//!   `‖g − g_fd‖/‖g_fd‖ ≤ 1e-6`);
//! - f32 against f64, forward and backward (relative ≤ 1e-4);
//! - masked invariants: changing padded inputs changes no output bit, padded inputs receive
//!   exactly zero gradient, masked outputs are exactly zero.
//!
//! Outputs that an op overwrites are poisoned with NaN before the call (a missed element
//! shows as a NaN); gradient windows that an op accumulates into are pre-filled with random
//! values and the test looks at the difference (and checks untouched slots bit for bit).

use mgkd::backend::cpu::CpuBackend;
use mgkd::backend::{
    AdamW, AttnShape, Backend, EmbMode, EmbTable, FineGrads, FineShape, Float, Gemm, Mut, Ref,
    ValidTokens,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

// ---- helpers ---------------------------------------------------------------------------

fn be<F: Float>() -> CpuBackend<F> {
    CpuBackend::new()
}

fn up<F: Float>(x: &[f64]) -> Vec<F> {
    x.iter().map(|&v| <F as Float>::from_f64(v)).collect()
}

fn down<F: Float>(x: &[F]) -> Vec<f64> {
    x.iter().map(|&v| <F as Float>::to_f64(v)).collect()
}

fn nan<F: Float>(n: usize) -> Vec<F> {
    vec![F::nan(); n]
}

/// Uniform values in ±[0.1, 1.0] (never zero).
fn randv(rng: &mut ChaCha8Rng, n: usize) -> Vec<f64> {
    (0..n)
        .map(|_| {
            let m: f64 = rng.gen_range(0.1..1.0);
            if rng.gen_bool(0.5) {
                m
            } else {
                -m
            }
        })
        .collect()
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn norm(a: &[f64]) -> f64 {
    a.iter().map(|x| x * x).sum::<f64>().sqrt()
}

fn rel(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let diff: Vec<f64> = a.iter().zip(b).map(|(x, y)| x - y).collect();
    norm(&diff) / norm(b)
}

/// Central finite differences of `f` at `x`.
fn fd(x: &[f64], f: impl Fn(&[f64]) -> f64) -> Vec<f64> {
    let mut xp = x.to_vec();
    (0..x.len())
        .map(|i| {
            let h = 1e-5;
            xp[i] = x[i] + h;
            let fp = f(&xp);
            xp[i] = x[i] - h;
            let fm = f(&xp);
            xp[i] = x[i];
            (fp - fm) / (2.0 * h)
        })
        .collect()
}

/// One op under test: differentiable inputs `x` (concatenated), output vector, analytic
/// gradient of `Σ r ⊙ out` over `x`.
trait Case {
    fn inputs(&self) -> Vec<f64>;
    fn fwd<F: Float>(&self, x: &[f64]) -> Vec<f64>;
    fn bwd<F: Float>(&self, x: &[f64], r: &[f64]) -> Vec<f64>;
    /// Indices of `x` that are padding (no influence, zero gradient).
    fn padded(&self) -> Vec<usize> {
        Vec::new()
    }
    /// Indices of the output that are masked (exactly zero).
    fn zero_outputs(&self) -> Vec<usize> {
        Vec::new()
    }
}

/// Runs every generic check on one case and returns (analytic f64 gradient, output).
fn run_case<C: Case>(name: &str, c: &C, seed: u64) -> (Vec<f64>, Vec<f64>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let x = c.inputs();
    let y = c.fwd::<f64>(&x);
    assert!(
        y.iter().all(|v| v.is_finite()),
        "{name}: non-finite output {y:?}"
    );
    let r = randv(&mut rng, y.len());
    let g = c.bwd::<f64>(&x, &r);
    assert_eq!(g.len(), x.len(), "{name}: gradient length");
    assert!(
        g.iter().all(|v| v.is_finite()),
        "{name}: non-finite gradient"
    );
    let g_fd = fd(&x, |xx| dot(&r, &c.fwd::<f64>(xx)));
    assert!(
        norm(&g_fd) > 1e-3,
        "{name}: degenerate case, ‖g_fd‖ = {}",
        norm(&g_fd)
    );
    let e = rel(&g, &g_fd);
    assert!(
        e <= 1e-6,
        "{name}: gradient relative error {e:e}\n analytic {g:?}\n fd {g_fd:?}"
    );

    // f32 against f64.
    let y32 = c.fwd::<f32>(&x);
    let ey = if norm(&y) > 0.0 {
        rel(&y32, &y)
    } else {
        norm(&y32)
    };
    assert!(ey <= 1e-4, "{name}: f32 forward relative error {ey:e}");
    let g32 = c.bwd::<f32>(&x, &r);
    let eg = rel(&g32, &g);
    assert!(eg <= 1e-4, "{name}: f32 backward relative error {eg:e}");

    // Masked invariants.
    let pad = c.padded();
    for &i in &pad {
        assert_eq!(g[i], 0.0, "{name}: padded input {i} got gradient {}", g[i]);
        assert_eq!(g32[i], 0.0, "{name}: padded input {i} got f32 gradient");
    }
    if !pad.is_empty() {
        let mut x2 = x.clone();
        for &i in &pad {
            x2[i] = 7.5 + i as f64;
        }
        let y2 = c.fwd::<f64>(&x2);
        let same = y.iter().zip(&y2).all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(same, "{name}: changing padded inputs changed the output");
        let g2 = c.bwd::<f64>(&x2, &r);
        let same = g.iter().zip(&g2).all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(same, "{name}: changing padded inputs changed the gradient");
    }
    for &i in &c.zero_outputs() {
        assert_eq!(y[i], 0.0, "{name}: masked output {i} is {}", y[i]);
    }
    (g, y)
}

/// Lengths as an id buffer.
fn ids(v: &[usize]) -> Vec<u32> {
    v.iter().map(|&l| l as u32).collect()
}

// ---- gemm --------------------------------------------------------------------------------

fn ext(rows: usize, cols: usize, ld: usize) -> usize {
    if rows == 0 || cols == 0 {
        0
    } else {
        (rows - 1) * ld + cols
    }
}

struct GemmCase {
    s: Gemm,
    alpha: f64,
    beta: f64,
}

impl GemmCase {
    fn lens(&self) -> (usize, usize, usize) {
        let s = &self.s;
        let (ar, ac) = if s.trans_a { (s.k, s.m) } else { (s.m, s.k) };
        let (br, bc) = if s.trans_b { (s.n, s.k) } else { (s.k, s.n) };
        let last = s.batch - 1;
        (
            last * s.stride_a + ext(ar, ac, s.lda),
            last * s.stride_b + ext(br, bc, s.ldb),
            last * s.stride_c + ext(s.m, s.n, s.ldc),
        )
    }
    /// Whether element `i` of the C buffer is an element of some C_b.
    fn in_c(&self, i: usize) -> bool {
        let s = &self.s;
        (0..s.batch).any(|b| {
            i >= b * s.stride_c && {
                let o = i - b * s.stride_c;
                o / s.ldc < s.m && o % s.ldc < s.n
            }
        })
    }
    /// Naive reference product (test oracle only).
    fn reference(&self, a: &[f64], b: &[f64], c0: &[f64]) -> Vec<f64> {
        let s = &self.s;
        let mut c = c0.to_vec();
        for bi in 0..s.batch {
            for i in 0..s.m {
                for j in 0..s.n {
                    let mut acc = 0.0;
                    for p in 0..s.k {
                        let av = if s.trans_a {
                            a[bi * s.stride_a + p * s.lda + i]
                        } else {
                            a[bi * s.stride_a + i * s.lda + p]
                        };
                        let bv = if s.trans_b {
                            b[bi * s.stride_b + j * s.ldb + p]
                        } else {
                            b[bi * s.stride_b + p * s.ldb + j]
                        };
                        acc += av * bv;
                    }
                    let ci = bi * s.stride_c + i * s.ldc + j;
                    c[ci] = self.alpha * acc + self.beta * c0[ci];
                }
            }
        }
        c
    }
}

impl Case for GemmCase {
    fn inputs(&self) -> Vec<f64> {
        let (la, lb, lc) = self.lens();
        let mut rng = ChaCha8Rng::seed_from_u64((la * 31 + lb * 7 + lc) as u64);
        randv(&mut rng, la + lb + lc)
    }
    fn fwd<F: Float>(&self, x: &[f64]) -> Vec<f64> {
        let (la, lb, _) = self.lens();
        let a = up::<F>(&x[..la]);
        let b = up::<F>(&x[la..la + lb]);
        let mut c = up::<F>(&x[la + lb..]);
        be::<F>().gemm(
            &self.s,
            <F as Float>::from_f64(self.alpha),
            Ref::whole(&a),
            Ref::whole(&b),
            <F as Float>::from_f64(self.beta),
            Mut::whole(&mut c),
        );
        down(&c)
    }
    fn bwd<F: Float>(&self, x: &[f64], r: &[f64]) -> Vec<f64> {
        let s = self.s;
        let (la, lb, _) = self.lens();
        let bk = be::<F>();
        let a = up::<F>(&x[..la]);
        let b = up::<F>(&x[la..la + lb]);
        let rr = up::<F>(r);
        let mut da = bk.zeros(la).unwrap();
        let mut db = bk.zeros(lb).unwrap();
        let alpha = <F as Float>::from_f64(self.alpha);
        let one = F::one();
        for bi in 0..s.batch {
            let (ao, bo, co) = (bi * s.stride_a, bi * s.stride_b, bi * s.stride_c);
            let ga = if !s.trans_a {
                // dA[m×k] += α·R·op(B)ᵀ
                Gemm {
                    m: s.m,
                    n: s.k,
                    k: s.n,
                    trans_a: false,
                    trans_b: !s.trans_b,
                    lda: s.ldc,
                    ldb: s.ldb,
                    ldc: s.lda,
                    ..Gemm::new(0, 0, 0, false, false)
                }
            } else {
                // dA stored k×m: += α·op(B)·Rᵀ
                Gemm {
                    m: s.k,
                    n: s.m,
                    k: s.n,
                    trans_a: s.trans_b,
                    trans_b: true,
                    lda: s.ldb,
                    ldb: s.ldc,
                    ldc: s.lda,
                    ..Gemm::new(0, 0, 0, false, false)
                }
            };
            if !s.trans_a {
                bk.gemm(
                    &ga,
                    alpha,
                    Ref::at(&rr, co),
                    Ref::at(&b, bo),
                    one,
                    Mut::at(&mut da, ao),
                );
            } else {
                bk.gemm(
                    &ga,
                    alpha,
                    Ref::at(&b, bo),
                    Ref::at(&rr, co),
                    one,
                    Mut::at(&mut da, ao),
                );
            }
            let gb = if !s.trans_b {
                // dB[k×n] += α·op(A)ᵀ·R
                Gemm {
                    m: s.k,
                    n: s.n,
                    k: s.m,
                    trans_a: !s.trans_a,
                    trans_b: false,
                    lda: s.lda,
                    ldb: s.ldc,
                    ldc: s.ldb,
                    ..Gemm::new(0, 0, 0, false, false)
                }
            } else {
                // dB stored n×k: += α·Rᵀ·op(A)
                Gemm {
                    m: s.n,
                    n: s.k,
                    k: s.m,
                    trans_a: true,
                    trans_b: s.trans_a,
                    lda: s.ldc,
                    ldb: s.lda,
                    ldc: s.ldb,
                    ..Gemm::new(0, 0, 0, false, false)
                }
            };
            if !s.trans_b {
                bk.gemm(
                    &gb,
                    alpha,
                    Ref::at(&a, ao),
                    Ref::at(&rr, co),
                    one,
                    Mut::at(&mut db, bo),
                );
            } else {
                bk.gemm(
                    &gb,
                    alpha,
                    Ref::at(&rr, co),
                    Ref::at(&a, ao),
                    one,
                    Mut::at(&mut db, bo),
                );
            }
        }
        let dc: Vec<f64> = r
            .iter()
            .enumerate()
            .map(|(i, &v)| if self.in_c(i) { self.beta * v } else { v })
            .collect();
        let mut g = down(&da);
        g.extend(down(&db));
        g.extend(dc);
        g
    }
}

fn gemm_cases() -> Vec<(String, GemmCase)> {
    let mut v = Vec::new();
    for &(ta, tb) in &[(false, false), (true, false), (false, true), (true, true)] {
        v.push((
            format!("packed ta={ta} tb={tb}"),
            GemmCase {
                s: Gemm::new(3, 5, 7, ta, tb),
                alpha: 0.8,
                beta: 0.0,
            },
        ));
        // Batched with padded strides, a shared B (stride 0) and β ≠ 0.
        let (m, n, k) = (4, 3, 5);
        let lda = if ta { m + 2 } else { k + 1 };
        let ldb = if tb { k + 3 } else { n + 2 };
        let s = Gemm {
            m,
            n,
            k,
            trans_a: ta,
            trans_b: tb,
            lda,
            ldb,
            ldc: n + 1,
            batch: 2,
            stride_a: 40,
            stride_b: 0,
            stride_c: 20,
        };
        v.push((
            format!("batched ta={ta} tb={tb}"),
            GemmCase {
                s,
                alpha: -1.3,
                beta: 0.6,
            },
        ));
    }
    // Attention-heads layout: C matrices side by side in common rows.
    let s = Gemm {
        m: 3,
        n: 2,
        k: 5,
        trans_a: false,
        trans_b: true,
        lda: 10,
        ldb: 10,
        ldc: 4,
        batch: 2,
        stride_a: 5,
        stride_b: 5,
        stride_c: 2,
    };
    v.push((
        "heads layout".into(),
        GemmCase {
            s,
            alpha: 0.45,
            beta: 0.0,
        },
    ));
    // Batch of one with m = 1 and n = 1.
    v.push((
        "m=1".into(),
        GemmCase {
            s: Gemm::new(1, 4, 3, false, true),
            alpha: 1.0,
            beta: 0.0,
        },
    ));
    v.push((
        "n=1".into(),
        GemmCase {
            s: Gemm::new(4, 1, 3, true, false),
            alpha: 1.0,
            beta: 1.0,
        },
    ));
    v
}

#[test]
fn gradcheck_gemm() {
    for (i, (name, c)) in gemm_cases().into_iter().enumerate() {
        let (la, lb, _) = c.lens();
        let x = c.inputs();
        let reference = c.reference(&x[..la], &x[la..la + lb], &x[la + lb..]);
        let y = c.fwd::<f64>(&x);
        assert!(
            rel(&y, &reference) < 1e-14,
            "gemm {name}: forward differs from reference"
        );
        run_case(&format!("gemm {name}"), &c, 100 + i as u64);
    }
}

#[test]
fn gemm_large_and_degenerate() {
    // Large enough to be split into parallel row blocks and batch entries.
    for (ta, tb, batch) in [(false, true, 1), (true, false, 3), (true, true, 2)] {
        let (m, n, k) = (203, 67, 41);
        let mut s = Gemm::new(m, n, k, ta, tb);
        s.batch = batch;
        s.stride_a = m * k;
        s.stride_b = k * n;
        s.stride_c = m * n;
        let c = GemmCase {
            s,
            alpha: 0.7,
            beta: 0.0,
        };
        let (la, lb, lc) = c.lens();
        let mut x = c.inputs();
        let y = c.fwd::<f64>(&{
            x.truncate(la + lb);
            x.extend(std::iter::repeat_n(f64::NAN, lc));
            x.clone()
        });
        let reference = c.reference(&x[..la], &x[la..la + lb], &vec![0.0; lc]);
        assert!(rel(&y, &reference) < 1e-13, "gemm large ta={ta} tb={tb}");
        let y32 = c.fwd::<f32>(&x);
        assert!(
            rel(&y32, &reference) < 1e-5,
            "gemm large f32 ta={ta} tb={tb}"
        );
    }
    // Batches sharing one C (stride 0, β = 1): the products add up in batch order, exactly as
    // one call per batch entry would.
    let (m, n, k, batch) = (2100, 128, 64, 2);
    let mut rng = ChaCha8Rng::seed_from_u64(60);
    let a = randv(&mut rng, batch * m * k);
    let b = randv(&mut rng, batch * k * n);
    let c0 = randv(&mut rng, m * n);
    let mut s = Gemm::new(m, n, k, false, false);
    s.batch = batch;
    s.stride_a = m * k;
    s.stride_b = k * n;
    let bk = be::<f64>();
    let mut c = c0.clone();
    bk.gemm(
        &s,
        0.9,
        Ref::whole(&a),
        Ref::whole(&b),
        1.0,
        Mut::whole(&mut c),
    );
    let mut want = c0.clone();
    for bi in 0..batch {
        let one = Gemm::new(m, n, k, false, false);
        bk.gemm(
            &one,
            0.9,
            Ref::at(&a, bi * m * k),
            Ref::at(&b, bi * k * n),
            1.0,
            Mut::whole(&mut want),
        );
    }
    assert_eq!(c, want, "gemm with a shared C");
    // k = 0 with β = 0 writes zeros over NaN; with β ≠ 0 scales C.
    let mut c = nan::<f64>(6);
    let empty: Vec<f64> = Vec::new();
    bk.gemm(
        &Gemm::new(2, 3, 0, false, false),
        1.0,
        Ref::whole(&empty),
        Ref::whole(&empty),
        0.0,
        Mut::whole(&mut c),
    );
    assert_eq!(c, vec![0.0; 6]);
    let mut c = vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
    bk.gemm(
        &Gemm::new(2, 3, 0, false, false),
        1.0,
        Ref::whole(&empty),
        Ref::whole(&empty),
        0.5,
        Mut::whole(&mut c),
    );
    assert_eq!(c, vec![0.5, 1.0, 1.5, 2.0, 2.5, 3.0]);
}

// ---- bias --------------------------------------------------------------------------------

struct BiasCase {
    rows: usize,
    n: usize,
}

impl Case for BiasCase {
    fn inputs(&self) -> Vec<f64> {
        randv(
            &mut ChaCha8Rng::seed_from_u64(3),
            self.rows * self.n + self.n,
        )
    }
    fn fwd<F: Float>(&self, x: &[f64]) -> Vec<f64> {
        let rn = self.rows * self.n;
        let mut y = up::<F>(&x[..rn]);
        let b = up::<F>(&x[rn..]);
        be::<F>().add_bias(self.rows, self.n, Ref::whole(&b), Mut::whole(&mut y));
        down(&y)
    }
    fn bwd<F: Float>(&self, _x: &[f64], r: &[f64]) -> Vec<f64> {
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        let g0 = randv(&mut rng, self.n + 2);
        let mut db = up::<F>(&g0);
        let rr = up::<F>(r);
        // Window at offset 1 of a longer buffer: the neighbours must stay untouched.
        be::<F>().bias_backward(self.rows, self.n, Ref::whole(&rr), Mut::at(&mut db, 1));
        let db = down(&db);
        let g0 = down(&up::<F>(&g0));
        assert_eq!(db[0].to_bits(), g0[0].to_bits());
        assert_eq!(db[self.n + 1].to_bits(), g0[self.n + 1].to_bits());
        let mut g = r.to_vec();
        g.extend((0..self.n).map(|j| db[1 + j] - g0[1 + j]));
        g
    }
}

#[test]
fn gradcheck_bias() {
    for (i, &(rows, n)) in [(1, 1), (3, 5), (70, 33), (0, 4)].iter().enumerate() {
        let c = BiasCase { rows, n };
        if rows == 0 {
            // No rows: the bias gradient is left as it was.
            let g = c.bwd::<f64>(&c.inputs(), &[]);
            assert!(g.iter().all(|&v| v == 0.0));
            continue;
        }
        run_case(&format!("bias {rows}x{n}"), &c, 200 + i as u64);
    }
}

// ---- GELU --------------------------------------------------------------------------------

struct GeluCase {
    x: Vec<f64>,
}

impl Case for GeluCase {
    fn inputs(&self) -> Vec<f64> {
        self.x.clone()
    }
    fn fwd<F: Float>(&self, x: &[f64]) -> Vec<f64> {
        let xi = up::<F>(x);
        let mut y = nan::<F>(x.len());
        be::<F>().gelu(x.len(), Ref::whole(&xi), Mut::whole(&mut y));
        down(&y)
    }
    fn bwd<F: Float>(&self, x: &[f64], r: &[f64]) -> Vec<f64> {
        let xi = up::<F>(x);
        let dy = up::<F>(r);
        let mut dx = nan::<F>(x.len());
        be::<F>().gelu_backward(
            x.len(),
            Ref::whole(&xi),
            Ref::whole(&dy),
            Mut::whole(&mut dx),
        );
        down(&dx)
    }
}

#[test]
fn gradcheck_gelu() {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let mut x: Vec<f64> = randv(&mut rng, 37).iter().map(|v| v * 4.0).collect();
    x.extend([-6.0, -3.1, 0.05, 2.5, 6.0]);
    let c = GeluCase { x };
    let (_, y) = run_case("gelu", &c, 300);
    // Spot values of the exact (erf) form.
    let y1 = c.fwd::<f64>(&[1.0, -1.0]);
    assert!((y1[0] - 0.841_344_746_068_542_9).abs() < 1e-15);
    assert!((y1[1] + 0.158_655_253_931_457_05).abs() < 1e-15);
    assert_eq!(y.len(), 42);
}

// ---- LayerNorm ---------------------------------------------------------------------------

struct LnCase {
    rows: usize,
    d: usize,
}

impl LnCase {
    fn run<F: Float>(&self, x: &[f64]) -> (Vec<F>, Vec<F>, Vec<F>, Vec<F>) {
        let rd = self.rows * self.d;
        let xi = up::<F>(&x[..rd]);
        let gb = up::<F>(&x[rd..]);
        let mut y = nan::<F>(rd);
        let mut st = nan::<F>(self.rows * 2);
        be::<F>().layernorm(
            self.rows,
            self.d,
            Ref::whole(&xi),
            Ref::whole(&gb),
            Mut::whole(&mut y),
            Mut::whole(&mut st),
        );
        (xi, gb, y, st)
    }
}

impl Case for LnCase {
    fn inputs(&self) -> Vec<f64> {
        let mut rng = ChaCha8Rng::seed_from_u64(6);
        let mut x = randv(&mut rng, self.rows * self.d);
        // One row with a large offset and small spread (stability of the two-pass variance).
        for v in x.iter_mut().take(self.d) {
            *v = 30.0 + 0.1 * *v;
        }
        let mut gb: Vec<f64> = randv(&mut rng, 2 * self.d);
        for g in gb.iter_mut().take(self.d) {
            *g += 1.0;
        }
        x.extend(gb);
        x
    }
    fn fwd<F: Float>(&self, x: &[f64]) -> Vec<f64> {
        let (xi, _, y, st) = self.run::<F>(x);
        let (xi, st) = (down(&xi), down(&st));
        for r in 0..self.rows {
            let row = &xi[r * self.d..(r + 1) * self.d];
            let mu = row.iter().sum::<f64>() / self.d as f64;
            let var = row.iter().map(|v| (v - mu) * (v - mu)).sum::<f64>() / self.d as f64;
            let rstd = 1.0 / (var + 1e-5).sqrt();
            assert!(
                (st[2 * r] - mu).abs() <= 1e-5 * mu.abs().max(1.0),
                "layernorm mean"
            );
            assert!(
                (st[2 * r + 1] - rstd).abs() <= 1e-4 * rstd,
                "layernorm rstd"
            );
        }
        down(&y)
    }
    fn bwd<F: Float>(&self, x: &[f64], r: &[f64]) -> Vec<f64> {
        let rd = self.rows * self.d;
        let (xi, gb, _, st) = self.run::<F>(x);
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let dx0 = randv(&mut rng, rd);
        let dgb0 = randv(&mut rng, 2 * self.d);
        let mut dx = up::<F>(&dx0);
        let mut dgb = up::<F>(&dgb0);
        let dy = up::<F>(r);
        be::<F>().layernorm_backward(
            self.rows,
            self.d,
            Ref::whole(&xi),
            Ref::whole(&gb),
            Ref::whole(&st),
            Ref::whole(&dy),
            Mut::whole(&mut dx),
            Mut::whole(&mut dgb),
        );
        let (dx0, dgb0) = (down(&up::<F>(&dx0)), down(&up::<F>(&dgb0)));
        let mut g: Vec<f64> = down(&dx).iter().zip(&dx0).map(|(a, b)| a - b).collect();
        g.extend(down(&dgb).iter().zip(&dgb0).map(|(a, b)| a - b));
        g
    }
}

#[test]
fn gradcheck_layernorm() {
    for (i, &(rows, d)) in [(1, 5), (3, 8), (4, 3), (90, 16)].iter().enumerate() {
        run_case(
            &format!("layernorm {rows}x{d}"),
            &LnCase { rows, d },
            400 + i as u64,
        );
    }
}

// ---- embeddings --------------------------------------------------------------------------

struct EmbCase {
    n: usize,
    width: usize,
    tables: Vec<EmbTable>,
    ids: Vec<u32>,
    mode: EmbMode,
    out_ld: usize,
    params_len: usize,
    /// Row lengths and slots per row: tokens past their row's length are padding, whose
    /// output rows the case zeroes (the backward skips them).
    valid: Option<(Vec<u32>, usize)>,
}

impl EmbCase {
    fn new(n: usize, width: usize, vocabs: &[usize], mode: EmbMode, seed: u64) -> EmbCase {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut tables = Vec::new();
        let mut off = 3; // a gap before the first table, and between tables
        for &v in vocabs {
            tables.push(EmbTable {
                offset: off,
                vocab: v,
            });
            off += v * width + 2;
        }
        let fields = vocabs.len();
        let ids = (0..n * fields)
            .map(|i| rng.gen_range(0..vocabs[i % fields]) as u32)
            .collect();
        let out_w = match mode {
            EmbMode::Sum => width,
            EmbMode::Concat => fields * width,
        };
        EmbCase {
            n,
            width,
            tables,
            ids,
            mode,
            out_ld: out_w + 3,
            params_len: off,
            valid: None,
        }
    }
    fn is_valid(&self, i: usize) -> bool {
        self.valid
            .as_ref()
            .is_none_or(|(lens, l)| i % l < lens[i / l] as usize)
    }
    fn out_w(&self) -> usize {
        match self.mode {
            EmbMode::Sum => self.width,
            EmbMode::Concat => self.tables.len() * self.width,
        }
    }
    /// Indices of the parameter buffer outside every table.
    fn gaps(&self) -> Vec<usize> {
        (0..self.params_len)
            .filter(|&i| {
                !self
                    .tables
                    .iter()
                    .any(|t| i >= t.offset && i < t.offset + t.vocab * self.width)
            })
            .collect()
    }
}

impl Case for EmbCase {
    fn inputs(&self) -> Vec<f64> {
        randv(&mut ChaCha8Rng::seed_from_u64(8), self.params_len)
    }
    fn fwd<F: Float>(&self, x: &[f64]) -> Vec<f64> {
        let params = up::<F>(x);
        let idb = self.ids.clone();
        let mut out = nan::<F>(self.n * self.out_ld + 2);
        be::<F>().embedding(
            self.n,
            self.width,
            &self.tables,
            &idb,
            &params,
            self.mode,
            Mut::at(&mut out, 1),
            self.out_ld,
        );
        let out = down(&out);
        let w = self.out_w();
        let mut y = Vec::new();
        for i in 0..self.n {
            for j in 0..self.out_ld {
                let v = out[1 + i * self.out_ld + j];
                if j < w {
                    y.push(if self.is_valid(i) { v } else { 0.0 });
                } else {
                    assert!(v.is_nan(), "embedding wrote outside the row width");
                }
            }
        }
        assert!(out[0].is_nan(), "embedding wrote before its window");
        y
    }
    fn bwd<F: Float>(&self, _x: &[f64], r: &[f64]) -> Vec<f64> {
        let w = self.out_w();
        // Padded tokens' rows stay NaN: the backward must not read them.
        let mut dout = nan::<F>(self.n * self.out_ld);
        for i in (0..self.n).filter(|&i| self.is_valid(i)) {
            for j in 0..w {
                dout[i * self.out_ld + j] = <F as Float>::from_f64(r[i * w + j]);
            }
        }
        let g0 = randv(&mut ChaCha8Rng::seed_from_u64(9), self.params_len);
        let mut grads = up::<F>(&g0);
        be::<F>().embedding_backward(
            self.n,
            self.width,
            &self.tables,
            &self.ids,
            self.mode,
            Ref::whole(&dout),
            self.out_ld,
            &mut grads,
            self.valid.as_ref().map(|(lens, max_len)| ValidTokens {
                lens,
                max_len: *max_len,
            }),
        );
        let g0 = down(&up::<F>(&g0));
        let g = down(&grads);
        for i in self.gaps() {
            assert_eq!(
                g[i].to_bits(),
                g0[i].to_bits(),
                "embedding_backward touched a gap"
            );
        }
        g.iter().zip(&g0).map(|(a, b)| a - b).collect()
    }
    fn padded(&self) -> Vec<usize> {
        self.gaps()
    }
}

#[test]
fn gradcheck_embedding() {
    let cases = [
        ("sum", EmbCase::new(11, 5, &[4, 7, 2], EmbMode::Sum, 10)),
        ("concat", EmbCase::new(6, 3, &[5, 3], EmbMode::Concat, 11)),
        ("sum one token", EmbCase::new(1, 4, &[3], EmbMode::Sum, 12)),
        ("sum wide", EmbCase::new(40, 70, &[3, 5], EmbMode::Sum, 13)),
        (
            "concat wide",
            EmbCase::new(17, 37, &[2, 4, 3], EmbMode::Concat, 14),
        ),
    ];
    for (i, (name, c)) in cases.iter().enumerate() {
        run_case(&format!("embedding {name}"), c, 500 + i as u64);
    }
    // Padded sequences: 4 rows of 5 slots, one row empty; only the valid tokens count.
    for (i, mode) in [EmbMode::Sum, EmbMode::Concat].into_iter().enumerate() {
        let mut c = EmbCase::new(20, 6, &[3, 4], mode, 16 + i as u64);
        c.valid = Some((vec![5, 0, 2, 3], 5));
        run_case(&format!("embedding padded {mode:?}"), &c, 520 + i as u64);
    }
    // Two fields sharing one table, and a table overlapping another (serial scatter path).
    for (i, mode) in [EmbMode::Sum, EmbMode::Concat].into_iter().enumerate() {
        let mut c = EmbCase::new(9, 40, &[6, 6, 3], mode, 15 + i as u64);
        c.tables[1] = c.tables[0];
        c.tables[2].offset = c.tables[0].offset + 7;
        run_case(
            &format!("embedding shared tables {mode:?}"),
            &c,
            510 + i as u64,
        );
    }
}

// ---- positions ---------------------------------------------------------------------------

struct PosCase {
    batch: usize,
    max_len: usize,
    d: usize,
    lens: Vec<usize>,
}

impl Case for PosCase {
    fn inputs(&self) -> Vec<f64> {
        let n = self.batch * self.max_len * self.d + self.max_len * self.d;
        randv(&mut ChaCha8Rng::seed_from_u64(15), n)
    }
    fn fwd<F: Float>(&self, x: &[f64]) -> Vec<f64> {
        let nx = self.batch * self.max_len * self.d;
        let mut xi = up::<F>(&x[..nx]);
        let pos = up::<F>(&x[nx..]);
        be::<F>().add_positions(
            self.batch,
            self.max_len,
            self.d,
            &ids(&self.lens),
            Ref::whole(&pos),
            Mut::whole(&mut xi),
        );
        let y = down(&xi);
        // Padded slots untouched, bit for bit.
        let x0 = down(&up::<F>(&x[..nx]));
        for b in 0..self.batch {
            for t in self.lens[b]..self.max_len {
                for j in 0..self.d {
                    let i = (b * self.max_len + t) * self.d + j;
                    assert_eq!(
                        y[i].to_bits(),
                        x0[i].to_bits(),
                        "add_positions touched padding"
                    );
                }
            }
        }
        y
    }
    fn bwd<F: Float>(&self, _x: &[f64], r: &[f64]) -> Vec<f64> {
        let g0 = randv(&mut ChaCha8Rng::seed_from_u64(16), self.max_len * self.d);
        let mut dpos = up::<F>(&g0);
        let dx = up::<F>(r);
        be::<F>().add_positions_backward(
            self.batch,
            self.max_len,
            self.d,
            &ids(&self.lens),
            Ref::whole(&dx),
            Mut::whole(&mut dpos),
        );
        let g0 = down(&up::<F>(&g0));
        let mut g = r.to_vec();
        g.extend(down(&dpos).iter().zip(&g0).map(|(a, b)| a - b));
        g
    }
    fn padded(&self) -> Vec<usize> {
        // Position rows beyond the longest sequence are never used.
        let nx = self.batch * self.max_len * self.d;
        let longest = self.lens.iter().copied().max().unwrap_or(0);
        (nx + longest * self.d..nx + self.max_len * self.d).collect()
    }
}

#[test]
fn gradcheck_add_positions() {
    let cases = [
        PosCase {
            batch: 3,
            max_len: 7,
            d: 5,
            lens: vec![7, 0, 3],
        },
        PosCase {
            batch: 1,
            max_len: 4,
            d: 3,
            lens: vec![2],
        },
        PosCase {
            batch: 4,
            max_len: 6,
            d: 2,
            lens: vec![1, 6, 0, 6],
        },
    ];
    for (i, c) in cases.iter().enumerate() {
        run_case(&format!("add_positions case {i}"), c, 600 + i as u64);
    }
}

// ---- masked softmax ----------------------------------------------------------------------

struct SoftmaxCase {
    batch: usize,
    heads: usize,
    lq: usize,
    lk: usize,
    lens: Vec<usize>,
    scale: f64,
}

impl SoftmaxCase {
    fn masked(&self) -> Vec<usize> {
        let mut v = Vec::new();
        for b in 0..self.batch {
            for h in 0..self.heads {
                for i in 0..self.lq {
                    let row = ((b * self.heads + h) * self.lq + i) * self.lk;
                    v.extend(row + self.lens[b]..row + self.lk);
                }
            }
        }
        v
    }
    fn probs<F: Float>(&self, x: &[f64]) -> Vec<F> {
        let mut s = up::<F>(x);
        be::<F>().masked_softmax(
            self.batch,
            self.heads,
            self.lq,
            self.lk,
            &ids(&self.lens),
            0,
            <F as Float>::from_f64(self.scale),
            Mut::whole(&mut s),
        );
        s
    }
}

impl Case for SoftmaxCase {
    fn inputs(&self) -> Vec<f64> {
        let n = self.batch * self.heads * self.lq * self.lk;
        randv(&mut ChaCha8Rng::seed_from_u64(17), n)
            .iter()
            .map(|v| v * 3.0)
            .collect()
    }
    fn fwd<F: Float>(&self, x: &[f64]) -> Vec<f64> {
        down(&self.probs::<F>(x))
    }
    fn bwd<F: Float>(&self, x: &[f64], r: &[f64]) -> Vec<f64> {
        let p = self.probs::<F>(x);
        let dp = up::<F>(r);
        let mut ds = nan::<F>(x.len());
        be::<F>().masked_softmax_backward(
            self.batch,
            self.heads,
            self.lq,
            self.lk,
            &ids(&self.lens),
            <F as Float>::from_f64(self.scale),
            Ref::whole(&p),
            Ref::whole(&dp),
            Mut::whole(&mut ds),
        );
        down(&ds)
    }
    fn padded(&self) -> Vec<usize> {
        self.masked()
    }
    fn zero_outputs(&self) -> Vec<usize> {
        self.masked()
    }
}

#[test]
fn gradcheck_masked_softmax() {
    let cases = [
        SoftmaxCase {
            batch: 3,
            heads: 2,
            lq: 3,
            lk: 7,
            lens: vec![7, 0, 4],
            scale: 0.45,
        },
        SoftmaxCase {
            batch: 1,
            heads: 1,
            lq: 3,
            lk: 5,
            lens: vec![5],
            scale: 1.0,
        },
        SoftmaxCase {
            batch: 2,
            heads: 1,
            lq: 1,
            lk: 7,
            lens: vec![1, 3],
            scale: 0.7,
        },
    ];
    for (i, c) in cases.iter().enumerate() {
        let (_, y) = run_case(&format!("masked_softmax case {i}"), c, 700 + i as u64);
        // Valid rows sum to one; a row with no valid key is all zero.
        for (ri, row) in y.chunks(c.lk).enumerate() {
            let b = ri / (c.heads * c.lq);
            let s: f64 = row.iter().sum();
            let want = if c.lens[b] == 0 { 0.0 } else { 1.0 };
            assert!(
                (s - want).abs() < 1e-12,
                "masked_softmax row {ri} sums to {s}"
            );
        }
    }
    // Huge scores: no overflow.
    let c = SoftmaxCase {
        batch: 1,
        heads: 1,
        lq: 1,
        lk: 3,
        lens: vec![3],
        scale: 1.0,
    };
    let y = c.fwd::<f32>(&[1000.0, 999.0, -1000.0]);
    assert!(y.iter().all(|v| v.is_finite()) && (y.iter().sum::<f64>() - 1.0).abs() < 1e-6);
}

// ---- attention ---------------------------------------------------------------------------

/// Multi-head attention as one op ([`Backend::attention`] and its backward) over the fused
/// Q|K|V projection: the differentiable input is `qkv`, the output the context.
struct AttentionCase {
    s: AttnShape,
    lens: Vec<usize>,
    scale: f64,
}

impl AttentionCase {
    /// Forward: the context and the saved state.
    fn run<F: Float>(&self, x: &[f64]) -> (Vec<F>, Vec<F>) {
        let be = be::<F>();
        let s = &self.s;
        let mut ctx = nan::<F>(s.batch * s.len * s.d);
        let mut saved = nan::<F>(be.attention_saved_len(s));
        let qkv = up::<F>(x);
        be.attention(
            s,
            &ids(&self.lens),
            <F as Float>::from_f64(self.scale),
            Ref::whole(&qkv),
            Mut::whole(&mut ctx),
            Mut::whole(&mut saved),
        );
        (ctx, saved)
    }

    /// Whether column `c` of token `t` of `qkv` is a padded key or value (`t`'s position is
    /// at or beyond its row's length), or any input of a row without keys.
    fn is_padded(&self, t: usize, c: usize) -> bool {
        let (b, i) = (t / self.s.len, t % self.s.len);
        self.lens[b] == 0 || (c >= self.s.d && i >= self.lens[b])
    }
}

impl Case for AttentionCase {
    fn inputs(&self) -> Vec<f64> {
        let n = self.s.batch * self.s.len * 3 * self.s.d;
        randv(&mut ChaCha8Rng::seed_from_u64(19), n)
            .iter()
            .map(|v| v * 1.5)
            .collect()
    }
    fn fwd<F: Float>(&self, x: &[f64]) -> Vec<f64> {
        down(&self.run::<F>(x).0)
    }
    fn bwd<F: Float>(&self, x: &[f64], r: &[f64]) -> Vec<f64> {
        let (_, saved) = self.run::<F>(x);
        let (qkv, dctx) = (up::<F>(x), up::<F>(r));
        let mut dqkv = nan::<F>(x.len());
        be::<F>()
            .attention_backward(
                &self.s,
                &ids(&self.lens),
                <F as Float>::from_f64(self.scale),
                Ref::whole(&qkv),
                Ref::whole(&saved),
                Ref::whole(&dctx),
                Mut::whole(&mut dqkv),
            )
            .expect("attention backward");
        down(&dqkv)
    }
    fn padded(&self) -> Vec<usize> {
        let w = 3 * self.s.d;
        (0..self.s.batch * self.s.len * w)
            .filter(|&k| self.is_padded(k / w, k % w))
            .collect()
    }
    fn zero_outputs(&self) -> Vec<usize> {
        // Every output of a row without keys.
        let w = self.s.len * self.s.d;
        (0..self.s.batch * w)
            .filter(|&k| self.lens[k / w] == 0)
            .collect()
    }
}

#[test]
fn gradcheck_attention() {
    let cases = [
        AttentionCase {
            s: AttnShape {
                batch: 3,
                len: 4,
                heads: 2,
                d: 6,
            },
            lens: vec![4, 0, 2],
            scale: 1.0 / 3f64.sqrt(),
        },
        AttentionCase {
            s: AttnShape {
                batch: 1,
                len: 5,
                heads: 1,
                d: 4,
            },
            lens: vec![3],
            scale: 0.5,
        },
    ];
    for (i, c) in cases.iter().enumerate() {
        run_case(&format!("attention case {i}"), c, 750 + i as u64);
    }
}

// ---- masked mean -------------------------------------------------------------------------

struct MeanCase {
    batch: usize,
    max_len: usize,
    d: usize,
    lens: Vec<usize>,
}

impl Case for MeanCase {
    fn inputs(&self) -> Vec<f64> {
        randv(
            &mut ChaCha8Rng::seed_from_u64(18),
            (self.batch * self.max_len + 1) * self.d,
        )
    }
    fn fwd<F: Float>(&self, x: &[f64]) -> Vec<f64> {
        let nx = self.batch * self.max_len * self.d;
        let xi = up::<F>(&x[..nx]);
        let e = up::<F>(&x[nx..]);
        let mut out = nan::<F>(self.batch * self.d);
        be::<F>().masked_mean(
            self.batch,
            self.max_len,
            self.d,
            &ids(&self.lens),
            Ref::whole(&xi),
            Ref::whole(&e),
            Mut::whole(&mut out),
        );
        down(&out)
    }
    fn bwd<F: Float>(&self, _x: &[f64], r: &[f64]) -> Vec<f64> {
        let nx = self.batch * self.max_len * self.d;
        let dout = up::<F>(r);
        let mut dx = nan::<F>(nx);
        let e0 = randv(&mut ChaCha8Rng::seed_from_u64(19), self.d);
        let mut de = up::<F>(&e0);
        be::<F>().masked_mean_backward(
            self.batch,
            self.max_len,
            self.d,
            &ids(&self.lens),
            Ref::whole(&dout),
            Mut::whole(&mut dx),
            Mut::whole(&mut de),
        );
        let e0 = down(&up::<F>(&e0));
        let mut g = down(&dx);
        g.extend(down(&de).iter().zip(&e0).map(|(a, b)| a - b));
        g
    }
    fn padded(&self) -> Vec<usize> {
        let mut v = Vec::new();
        for b in 0..self.batch {
            v.extend((b * self.max_len + self.lens[b]) * self.d..(b + 1) * self.max_len * self.d);
        }
        if self.lens.iter().all(|&l| l > 0) {
            let nx = self.batch * self.max_len * self.d;
            v.extend(nx..nx + self.d);
        }
        v
    }
}

#[test]
fn gradcheck_masked_mean() {
    let cases = [
        MeanCase {
            batch: 3,
            max_len: 7,
            d: 5,
            lens: vec![7, 0, 3],
        },
        MeanCase {
            batch: 1,
            max_len: 3,
            d: 4,
            lens: vec![2],
        },
        MeanCase {
            batch: 2,
            max_len: 4,
            d: 3,
            lens: vec![0, 0],
        },
        MeanCase {
            batch: 2,
            max_len: 0,
            d: 3,
            lens: vec![0, 0],
        },
    ];
    for (i, c) in cases.iter().enumerate() {
        run_case(&format!("masked_mean case {i}"), c, 800 + i as u64);
    }
}

/// `put_empty_rows` as a function of (vec, seq): slot 0 of the empty rows takes `vec`'s row.
struct EmptyRowsCase {
    batch: usize,
    max_len: usize,
    d: usize,
    lens: Vec<usize>,
}

impl Case for EmptyRowsCase {
    fn inputs(&self) -> Vec<f64> {
        randv(
            &mut ChaCha8Rng::seed_from_u64(20),
            self.batch * self.d * (1 + self.max_len),
        )
    }
    fn fwd<F: Float>(&self, x: &[f64]) -> Vec<f64> {
        let nv = self.batch * self.d;
        let v = up::<F>(&x[..nv]);
        let mut seq = up::<F>(&x[nv..]);
        be::<F>().put_empty_rows(
            self.batch,
            self.max_len,
            self.d,
            &ids(&self.lens),
            Ref::whole(&v),
            Mut::whole(&mut seq),
        );
        down(&seq)
    }
    fn bwd<F: Float>(&self, _x: &[f64], r: &[f64]) -> Vec<f64> {
        let nv = self.batch * self.d;
        let mut dseq = up::<F>(r);
        // dvec accumulates: start from random values and take the difference.
        let v0 = randv(&mut ChaCha8Rng::seed_from_u64(21), nv);
        let mut dv = up::<F>(&v0);
        be::<F>().put_empty_rows_backward(
            self.batch,
            self.max_len,
            self.d,
            &ids(&self.lens),
            Mut::whole(&mut dseq),
            Mut::whole(&mut dv),
        );
        let v0 = down(&up::<F>(&v0));
        let mut g: Vec<f64> = down(&dv).iter().zip(&v0).map(|(a, b)| a - b).collect();
        g.extend(down(&dseq));
        g
    }
    fn padded(&self) -> Vec<usize> {
        // vec rows of non-empty sequences, and slot 0 of the empty ones, have no influence.
        let (d, nv) = (self.d, self.batch * self.d);
        let mut v = Vec::new();
        for (b, &l) in self.lens.iter().enumerate() {
            if l > 0 {
                v.extend(b * d..(b + 1) * d);
            } else {
                v.extend(nv + b * self.max_len * d..nv + b * self.max_len * d + d);
            }
        }
        v
    }
}

#[test]
fn gradcheck_put_empty_rows() {
    let cases = [
        EmptyRowsCase {
            batch: 4,
            max_len: 3,
            d: 5,
            lens: vec![0, 2, 0, 3],
        },
        EmptyRowsCase {
            batch: 1,
            max_len: 1,
            d: 2,
            lens: vec![0],
        },
        EmptyRowsCase {
            batch: 2,
            max_len: 2,
            d: 3,
            lens: vec![1, 2],
        },
    ];
    for (i, c) in cases.iter().enumerate() {
        run_case(&format!("put_empty_rows case {i}"), c, 850 + i as u64);
    }
}

// ---- losses ------------------------------------------------------------------------------

struct BceCase {
    z: Vec<f64>,
    y: Vec<f64>,
    w: Vec<f64>,
}

impl Case for BceCase {
    fn inputs(&self) -> Vec<f64> {
        self.z.clone()
    }
    fn fwd<F: Float>(&self, x: &[f64]) -> Vec<f64> {
        let (z, y, w) = (up::<F>(x), up::<F>(&self.y), up::<F>(&self.w));
        let l = be::<F>()
            .bce_loss(
                x.len(),
                Ref::whole(&z),
                Ref::whole(&y),
                Ref::whole(&w),
                F::one(),
                None,
            )
            .unwrap();
        vec![<F as Float>::to_f64(l)]
    }
    fn bwd<F: Float>(&self, x: &[f64], r: &[f64]) -> Vec<f64> {
        let (z, y, w) = (up::<F>(x), up::<F>(&self.y), up::<F>(&self.w));
        let g0 = randv(&mut ChaCha8Rng::seed_from_u64(20), x.len());
        let mut dz = up::<F>(&g0);
        let coef = <F as Float>::from_f64(r[0]);
        let l = be::<F>()
            .bce_loss(
                x.len(),
                Ref::whole(&z),
                Ref::whole(&y),
                Ref::whole(&w),
                coef,
                Some(Mut::whole(&mut dz)),
            )
            .unwrap();
        assert_eq!(
            l,
            be::<F>()
                .bce_loss(
                    x.len(),
                    Ref::whole(&z),
                    Ref::whole(&y),
                    Ref::whole(&w),
                    coef,
                    None
                )
                .unwrap()
        );
        let g0 = down(&up::<F>(&g0));
        down(&dz).iter().zip(&g0).map(|(a, b)| a - b).collect()
    }
}

fn labels(rng: &mut ChaCha8Rng, n: usize) -> Vec<f64> {
    (0..n)
        .map(|i| {
            if i % 3 == 0 || rng.gen_bool(0.3) {
                1.0
            } else {
                0.0
            }
        })
        .collect()
}

fn weights(rng: &mut ChaCha8Rng, n: usize) -> Vec<f64> {
    (0..n).map(|_| rng.gen_range(0.3..2.0)).collect()
}

#[test]
fn gradcheck_bce_loss() {
    let mut rng = ChaCha8Rng::seed_from_u64(21);
    for (i, n) in [1usize, 5, 33].into_iter().enumerate() {
        let z: Vec<f64> = randv(&mut rng, n).iter().map(|v| v * 5.0).collect();
        let c = BceCase {
            y: labels(&mut rng, n),
            w: weights(&mut rng, n),
            z,
        };
        run_case(&format!("bce n={n}"), &c, 900 + i as u64);
    }
    // Extreme logits: finite and equal to the analytic limit.
    let c = BceCase {
        z: vec![80.0, -80.0, 80.0, -80.0],
        y: vec![1.0, 0.0, 0.0, 1.0],
        w: vec![1.0; 4],
    };
    let l = c.fwd::<f32>(&c.z)[0];
    assert!((l - 40.0).abs() < 1e-4, "bce extreme logits {l}");
    let l = c.fwd::<f64>(&c.z)[0];
    assert!((l - 40.0).abs() < 1e-12, "bce extreme logits {l}");
}

struct KlCase {
    s: Vec<f64>,
    t: Vec<f64>,
    w: Option<Vec<f64>>,
    tau: f64,
}

impl KlCase {
    fn call<F: Float>(&self, x: &[f64], coef: f64, g: Option<&mut Vec<F>>) -> f64 {
        let (s, t) = (up::<F>(x), up::<F>(&self.t));
        let w = self.w.as_ref().map(|w| up::<F>(w));
        let l = be::<F>()
            .bernoulli_kl_loss(
                x.len(),
                Ref::whole(&s),
                Ref::whole(&t),
                w.as_ref().map(Ref::whole),
                <F as Float>::from_f64(self.tau),
                <F as Float>::from_f64(coef),
                g.map(Mut::whole),
            )
            .unwrap();
        <F as Float>::to_f64(l)
    }
}

impl Case for KlCase {
    fn inputs(&self) -> Vec<f64> {
        self.s.clone()
    }
    fn fwd<F: Float>(&self, x: &[f64]) -> Vec<f64> {
        vec![self.call::<F>(x, 1.0, None)]
    }
    fn bwd<F: Float>(&self, x: &[f64], r: &[f64]) -> Vec<f64> {
        let g0 = randv(&mut ChaCha8Rng::seed_from_u64(22), x.len());
        let mut g = up::<F>(&g0);
        self.call::<F>(x, r[0], Some(&mut g));
        let g0 = down(&up::<F>(&g0));
        down(&g).iter().zip(&g0).map(|(a, b)| a - b).collect()
    }
}

#[test]
fn gradcheck_bernoulli_kl_loss() {
    let mut rng = ChaCha8Rng::seed_from_u64(23);
    for (i, (n, tau, weighted)) in [
        (1, 2.0, true),
        (7, 2.0, false),
        (19, 1.0, true),
        (5, 0.5, false),
    ]
    .into_iter()
    .enumerate()
    {
        let s: Vec<f64> = randv(&mut rng, n).iter().map(|v| v * 4.0).collect();
        let t: Vec<f64> = randv(&mut rng, n).iter().map(|v| v * 4.0).collect();
        let w = weighted.then(|| weights(&mut rng, n));
        let c = KlCase { s, t, w, tau };
        let (_, y) = run_case(&format!("kl n={n} tau={tau}"), &c, 1000 + i as u64);
        assert!(y[0] > 0.0);
        // Reference: direct formula with probabilities.
        let mut want = 0.0;
        for j in 0..n {
            let p = 1.0 / (1.0 + (-c.t[j] / tau).exp());
            let q = 1.0 / (1.0 + (-c.s[j] / tau).exp());
            let kl = p * (p / q).ln() + (1.0 - p) * ((1.0 - p) / (1.0 - q)).ln();
            want += c.w.as_ref().map_or(1.0, |w| w[j]) * kl;
        }
        want *= tau * tau / n as f64;
        assert!(
            (y[0] - want).abs() < 1e-12 * want.max(1.0),
            "kl value {} vs {want}",
            y[0]
        );
    }
    // Identical logits: zero loss; extreme logits stay finite.
    let c = KlCase {
        s: vec![3.0, -200.0],
        t: vec![3.0, 200.0],
        w: None,
        tau: 2.0,
    };
    let l = c.fwd::<f32>(&c.s)[0];
    assert!(l.is_finite() && (l - 200.0).abs() < 1e-3, "kl extreme {l}");
    assert_eq!(c.fwd::<f64>(&[3.0, 200.0])[0].abs(), 0.0);
    // τ must be positive.
    let b = be::<f64>();
    let v = vec![1.0];
    assert!(b
        .bernoulli_kl_loss(1, Ref::whole(&v), Ref::whole(&v), None, 0.0, 1.0, None)
        .is_err());
}

struct CoarseCase {
    n: usize,
    d: usize,
    pred: Vec<f64>,
    target: Vec<f64>,
    w: Vec<f64>,
    cosine: bool,
}

impl CoarseCase {
    fn call<F: Float>(&self, x: &[f64], coef: f64, g: Option<&mut Vec<F>>) -> f64 {
        let (p, t, w) = (up::<F>(x), up::<F>(&self.target), up::<F>(&self.w));
        let l = be::<F>()
            .coarse_loss(
                self.n,
                self.d,
                Ref::whole(&p),
                Ref::whole(&t),
                Ref::whole(&w),
                self.cosine,
                <F as Float>::from_f64(coef),
                g.map(Mut::whole),
            )
            .unwrap();
        <F as Float>::to_f64(l)
    }
}

impl Case for CoarseCase {
    fn inputs(&self) -> Vec<f64> {
        self.pred.clone()
    }
    fn fwd<F: Float>(&self, x: &[f64]) -> Vec<f64> {
        vec![self.call::<F>(x, 1.0, None)]
    }
    fn bwd<F: Float>(&self, x: &[f64], r: &[f64]) -> Vec<f64> {
        let g0 = randv(&mut ChaCha8Rng::seed_from_u64(24), x.len());
        let mut g = up::<F>(&g0);
        self.call::<F>(x, r[0], Some(&mut g));
        let g0 = down(&up::<F>(&g0));
        down(&g).iter().zip(&g0).map(|(a, b)| a - b).collect()
    }
}

fn coarse_gradcheck(cosine: bool) {
    let mut rng = ChaCha8Rng::seed_from_u64(25);
    for (i, (n, d)) in [(1, 5), (4, 3), (9, 16)].into_iter().enumerate() {
        let pred = randv(&mut rng, n * d);
        let mut target = randv(&mut rng, n * d);
        if n > 1 {
            // A zero target row: cosine 0, zero gradient (MSE: ordinary).
            target[d..2 * d].fill(0.0);
        }
        let c = CoarseCase {
            n,
            d,
            pred,
            target,
            w: weights(&mut rng, n),
            cosine,
        };
        run_case(
            &format!("coarse cosine={cosine} n={n} d={d}"),
            &c,
            1100 + i as u64,
        );
    }
    // A zero prediction row has cosine 0 and zero gradient (the contract, not a limit).
    let (n, d) = (2, 4);
    let mut pred = randv(&mut rng, n * d);
    pred[..d].fill(0.0);
    let target = randv(&mut rng, n * d);
    let c = CoarseCase {
        n,
        d,
        pred: pred.clone(),
        target,
        w: vec![1.5, 0.5],
        cosine,
    };
    let g = c.bwd::<f64>(&pred, &[1.0]);
    let l = c.fwd::<f64>(&pred)[0];
    if cosine {
        assert!(
            g[..d].iter().all(|&v| v == 0.0),
            "zero pred row got gradient"
        );
        let p1 = &c.pred[d..];
        let t1 = &c.target[d..];
        let cos1 = dot(p1, t1) / (norm(p1) * norm(t1));
        let want = (1.5 + 0.5 * (1.0 - cos1)) / 2.0;
        assert!(
            (l - want).abs() < 1e-12,
            "coarse cosine zero row value {l} vs {want}"
        );
    } else {
        let want: f64 = (0..n)
            .map(|i| {
                c.w[i]
                    * (0..d)
                        .map(|j| (c.pred[i * d + j] - c.target[i * d + j]).powi(2))
                        .sum::<f64>()
                    / d as f64
            })
            .sum::<f64>()
            / n as f64;
        assert!((l - want).abs() < 1e-12, "coarse mse value {l} vs {want}");
    }
}

#[test]
fn gradcheck_coarse_loss_mse() {
    coarse_gradcheck(false);
}

#[test]
fn gradcheck_coarse_loss_cosine() {
    coarse_gradcheck(true);
}

struct FineCase {
    batch: usize,
    lq: usize,
    lk: usize,
    d: usize,
    qlens: Vec<usize>,
    klens: Vec<usize>,
    t_in: Vec<f64>,
    w: Vec<f64>,
}

impl FineCase {
    fn new(
        d: usize,
        lq: usize,
        lk: usize,
        qlens: Vec<usize>,
        klens: Vec<usize>,
        seed: u64,
    ) -> FineCase {
        let batch = qlens.len();
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let t_in = randv(&mut rng, batch * lk * d);
        let w = weights(&mut rng, batch);
        FineCase {
            batch,
            lq,
            lk,
            d,
            qlens,
            klens,
            t_in,
            w,
        }
    }
    fn shape(&self) -> FineShape {
        FineShape {
            batch: self.batch,
            lq: self.lq,
            lk: self.lk,
            d: self.d,
        }
    }
    /// Elements of the queries (and of the values), then of the teacher tokens.
    fn sizes(&self) -> (usize, usize) {
        (self.batch * self.lq * self.d, self.batch * self.lk * self.d)
    }
    /// The loss at `x = [q, v]` with the teacher tokens `t_in` as the keys.
    fn call<F: Float>(
        &self,
        x: &[f64],
        t_in: &[f64],
        coef: f64,
        g: Option<&mut [Vec<F>; 2]>,
    ) -> f64 {
        let (nq, _) = self.sizes();
        let q = up::<F>(&x[..nq]);
        let v = up::<F>(&x[nq..]);
        let t = up::<F>(t_in);
        let w = up::<F>(&self.w);
        let grads = g.map(|[dq, dv]| FineGrads {
            dq: Mut::whole(dq),
            dv: Mut::whole(dv),
        });
        let l = be::<F>()
            .fine_loss(
                self.shape(),
                Ref::whole(&q),
                Ref::whole(&v),
                Ref::whole(&t),
                &ids(&self.qlens),
                &ids(&self.klens),
                Ref::whole(&w),
                <F as Float>::from_f64(coef),
                grads,
            )
            .unwrap();
        <F as Float>::to_f64(l)
    }
    /// Reference value (straightforward f64 loops, test oracle).
    fn reference(&self, x: &[f64]) -> f64 {
        let (nq, _) = self.sizes();
        let (q, v, k) = (&x[..nq], &x[nq..], &self.t_in);
        let d = self.d;
        let mut total = 0.0;
        let mut nr = 0;
        for b in 0..self.batch {
            let (lq, lk) = (self.qlens[b], self.klens[b]);
            if lk == 0 {
                continue;
            }
            nr += 1;
            let mut row = 0.0;
            for j in 0..lq {
                let qj = &q[(b * self.lq + j) * d..][..d];
                let s: Vec<f64> = (0..lk)
                    .map(|kk| dot(qj, &k[(b * self.lk + kk) * d..][..d]) / (d as f64).sqrt())
                    .collect();
                let mx = s.iter().cloned().fold(f64::MIN, f64::max);
                let e: Vec<f64> = s.iter().map(|v| (v - mx).exp()).collect();
                let z: f64 = e.iter().sum();
                let mut err = 0.0;
                for c in 0..d {
                    let ctx: f64 = (0..lk)
                        .map(|kk| e[kk] / z * self.t_in[(b * self.lk + kk) * d + c])
                        .sum();
                    err += (v[(b * self.lq + j) * d + c] - ctx).powi(2);
                }
                row += err / d as f64;
            }
            if lq > 0 {
                total += self.w[b] * row / lq as f64;
            }
        }
        if nr == 0 {
            0.0
        } else {
            total / nr as f64
        }
    }
}

impl Case for FineCase {
    fn inputs(&self) -> Vec<f64> {
        let (nq, _) = self.sizes();
        let mut rng = ChaCha8Rng::seed_from_u64(26);
        let mut x = randv(&mut rng, 2 * nq);
        // Larger q: peaked attention.
        for v in x[..nq].iter_mut() {
            *v *= 2.0;
        }
        x
    }
    fn fwd<F: Float>(&self, x: &[f64]) -> Vec<f64> {
        vec![self.call::<F>(x, &self.t_in, 1.0, None)]
    }
    fn bwd<F: Float>(&self, x: &[f64], r: &[f64]) -> Vec<f64> {
        let (nq, _) = self.sizes();
        let mut rng = ChaCha8Rng::seed_from_u64(27);
        let g0 = [randv(&mut rng, nq), randv(&mut rng, nq)];
        let mut g = [up::<F>(&g0[0]), up::<F>(&g0[1])];
        self.call::<F>(x, &self.t_in, r[0], Some(&mut g));
        let mut out = Vec::new();
        for (gi, g0i) in g.iter().zip(&g0) {
            let g0i = down(&up::<F>(g0i));
            out.extend(down(gi).iter().zip(&g0i).map(|(a, b)| a - b));
        }
        out
    }
    fn padded(&self) -> Vec<usize> {
        let (nq, _) = self.sizes();
        let d = self.d;
        let mut v = Vec::new();
        for b in 0..self.batch {
            let (lq, lk) = (self.qlens[b], self.klens[b]);
            let qv_valid = if lk == 0 { 0 } else { lq };
            for j in qv_valid..self.lq {
                for c in 0..d {
                    v.push((b * self.lq + j) * d + c);
                    v.push(nq + (b * self.lq + j) * d + c);
                }
            }
        }
        v
    }
}

#[test]
fn gradcheck_fine_loss() {
    let cases = [
        FineCase::new(5, 3, 7, vec![3, 2, 1, 0], vec![7, 0, 4, 5], 30),
        FineCase::new(5, 3, 7, vec![3], vec![7], 31),
        FineCase::new(4, 1, 6, vec![1, 1, 1], vec![2, 6, 1], 32),
        FineCase::new(8, 5, 3, vec![5, 4], vec![3, 3], 33),
    ];
    for (i, c) in cases.iter().enumerate() {
        let (_, y) = run_case(&format!("fine case {i}"), c, 1200 + i as u64);
        let x = c.inputs();
        let want = c.reference(&x);
        assert!(
            (y[0] - want).abs() < 1e-12 * want.max(1.0),
            "fine value {} vs {want}",
            y[0]
        );
        // Teacher tokens at padded slots do not matter.
        let mut t2 = c.t_in.clone();
        for b in 0..c.batch {
            for kk in c.klens[b]..c.lk {
                for j in 0..c.d {
                    t2[(b * c.lk + kk) * c.d + j] = 99.0;
                }
            }
        }
        assert_eq!(c.call::<f64>(&x, &t2, 1.0, None).to_bits(), y[0].to_bits());
    }
    // No row with teacher tokens: loss 0, gradients untouched.
    let c = FineCase::new(5, 3, 7, vec![3, 2], vec![0, 0], 34);
    let x = c.inputs();
    assert_eq!(c.fwd::<f64>(&x), vec![0.0]);
    assert!(c.bwd::<f64>(&x, &[1.0]).iter().all(|&v| v == 0.0));
    // A length beyond the padded extent is an error, not a panic.
    let bad = FineCase::new(5, 3, 7, vec![4], vec![7], 35);
    let bk = be::<f64>();
    let (nq, nk) = bad.sizes();
    let (q, k) = (vec![0.5; nq], vec![0.5; nk]);
    let w = vec![1.0];
    let r = bk.fine_loss(
        bad.shape(),
        Ref::whole(&q),
        Ref::whole(&q),
        Ref::whole(&k),
        &ids(&bad.qlens),
        &ids(&bad.klens),
        Ref::whole(&w),
        1.0,
        None,
    );
    assert!(r.is_err());
}

// ---- memory, optimizer -------------------------------------------------------------------

/// `axpy`, `copy_2d` (accumulating) are linear: gradcheck them as ops too.
struct Copy2dCase {
    rows: usize,
    cols: usize,
    src_ld: usize,
    dst_ld: usize,
    dst0: Vec<f64>,
}

impl Case for Copy2dCase {
    fn inputs(&self) -> Vec<f64> {
        randv(&mut ChaCha8Rng::seed_from_u64(40), self.rows * self.src_ld)
    }
    fn fwd<F: Float>(&self, x: &[f64]) -> Vec<f64> {
        let src = up::<F>(x);
        let mut dst = up::<F>(&self.dst0);
        be::<F>().copy_2d(
            self.rows,
            self.cols,
            Ref::whole(&src),
            self.src_ld,
            Mut::at(&mut dst, 1),
            self.dst_ld,
            true,
        );
        down(&dst)
    }
    fn bwd<F: Float>(&self, _x: &[f64], r: &[f64]) -> Vec<f64> {
        // ∂/∂src = the matching block of r, gathered with copy_2d (overwriting mode).
        let rr = up::<F>(r);
        let mut g = nan::<F>(self.rows * self.src_ld);
        let b = be::<F>();
        b.fill(g.len(), F::zero(), Mut::whole(&mut g));
        b.copy_2d(
            self.rows,
            self.cols,
            Ref::at(&rr, 1),
            self.dst_ld,
            Mut::whole(&mut g),
            self.src_ld,
            false,
        );
        down(&g)
    }
    fn padded(&self) -> Vec<usize> {
        (0..self.rows * self.src_ld)
            .filter(|i| i % self.src_ld >= self.cols)
            .collect()
    }
}

#[test]
fn gradcheck_copy_2d_and_axpy() {
    let dst0 = randv(&mut ChaCha8Rng::seed_from_u64(41), 1 + 4 * 7);
    let c = Copy2dCase {
        rows: 4,
        cols: 5,
        src_ld: 6,
        dst_ld: 7,
        dst0,
    };
    run_case("copy_2d", &c, 1300);
    // Overwriting copy_2d leaves the gaps alone; copy, fill, axpy.
    let b = be::<f64>();
    let src = randv(&mut ChaCha8Rng::seed_from_u64(42), 12);
    let mut dst = vec![f64::NAN; 14];
    b.copy_2d(3, 2, Ref::whole(&src), 4, Mut::at(&mut dst, 1), 4, false);
    for r in 0..3 {
        for c in 0..4 {
            let v = dst[1 + r * 4 + c];
            if c < 2 {
                assert_eq!(v, src[r * 4 + c]);
            } else {
                assert!(v.is_nan());
            }
        }
    }
    let mut y = randv(&mut ChaCha8Rng::seed_from_u64(43), 40_000);
    let y0 = y.clone();
    let x: Vec<f64> = (0..40_000).map(|i| i as f64 * 0.001).collect();
    b.axpy(39_999, -0.5, Ref::whole(&x), Mut::at(&mut y, 1));
    assert_eq!(y[0], y0[0]);
    for i in 1..40_000 {
        assert_eq!(y[i], y0[i] - 0.5 * x[i - 1]);
    }
    let mut z = vec![f64::NAN; 5];
    b.fill(3, 2.5, Mut::at(&mut z, 1));
    assert!(z[0].is_nan() && z[4].is_nan() && z[1..4] == [2.5; 3]);
    b.copy(2, Ref::at(&x, 10), Mut::at(&mut z, 0));
    assert_eq!(&z[..2], &x[10..12]);
    assert_eq!(b.len(&z), 5);
    assert_eq!(b.download(&b.upload(&x).unwrap()).unwrap(), x);
    assert_eq!(b.zeros(3).unwrap(), vec![0.0; 3]);
}

#[test]
fn sum_squares_and_adamw() {
    let b = be::<f64>();
    let x = randv(&mut ChaCha8Rng::seed_from_u64(44), 50_001);
    let s = b.sum_squares(50_000, Ref::at(&x, 1)).unwrap();
    let want: f64 = x[1..].iter().map(|v| v * v).sum();
    assert!((s - want).abs() < 1e-10 * want);
    let s32 = be::<f32>()
        .sum_squares(50_000, Ref::at(&up::<f32>(&x), 1))
        .unwrap();
    assert!(((s32 as f64) - want).abs() < 1e-4 * want);

    let n = 40_000;
    let mut rng = ChaCha8Rng::seed_from_u64(45);
    let p0 = randv(&mut rng, n);
    let g = randv(&mut rng, n);
    let m0 = randv(&mut rng, n);
    let v0: Vec<f64> = randv(&mut rng, n).iter().map(|v| v * v).collect();
    let mask: Vec<f64> = (0..n).map(|i| (i % 3 == 0) as u8 as f64).collect();
    let hp = AdamW {
        lr: 0.01,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.1,
        step: 3,
        grad_scale: 0.5,
    };
    let (mut p, mut m, mut v) = (p0.clone(), m0.clone(), v0.clone());
    b.adamw(&hp, &mut p, &g, &mut m, &mut v, &mask);
    let mut p32 = up::<f32>(&p0);
    let (mut m32, mut v32) = (up::<f32>(&m0), up::<f32>(&v0));
    be::<f32>().adamw(
        &hp,
        &mut p32,
        &up::<f32>(&g),
        &mut m32,
        &mut v32,
        &up::<f32>(&mask),
    );
    for i in 0..n {
        let gi = 0.5 * g[i];
        let mi = 0.9 * m0[i] + 0.1 * gi;
        let vi = 0.999 * v0[i] + 0.001 * gi * gi;
        let mh = mi / (1.0 - 0.9f64.powi(3));
        let vh = vi / (1.0 - 0.999f64.powi(3));
        let pi = p0[i] - 0.01 * (mh / (vh.sqrt() + 1e-8) + 0.1 * mask[i] * p0[i]);
        assert!(
            (m[i] - mi).abs() < 1e-15 && (v[i] - vi).abs() < 1e-15,
            "adamw moments at {i}"
        );
        assert!(
            (p[i] - pi).abs() < 1e-14,
            "adamw param at {i}: {} vs {pi}",
            p[i]
        );
        assert!((p32[i] as f64 - pi).abs() < 1e-5, "adamw f32 param at {i}");
    }
}
