//! The CPU reference backend: [`CpuBackend<F>`], generic over `f32` (speed) and `f64`
//! (gradient checks), multi-core through rayon.
//!
//! Determinism: work is split into chunks whose size depends only on the shapes, never on the
//! number of threads, and every reduction (bias and LayerNorm parameter gradients, embedding
//! and position scatter-adds, loss sums, `sum_squares`) adds its terms in one fixed order, so
//! results are bit-identical whatever `RAYON_NUM_THREADS` is. Matrix products go through
//! [`Float::gemm_raw`] (matrixmultiply); large products are split over output rows and batch
//! entries, never over the inner (reduction) dimension.
//!
//! Shape arguments that do not fit the buffers are programming errors of the caller and
//! panic with a message (checked slicing); the loss methods, which return a `Result`, report
//! lengths that exceed their padded extent as [`Error::Invalid`].
//!
//! One case the trait leaves open: in [`Backend::fine_loss`] a row with `ℓk > 0` but
//! `ℓq = 0` (no student token) still counts in `|R|` and contributes a row loss of 0.

use std::marker::PhantomData;

use rayon::prelude::*;

use super::{
    extent, sched_values, AdamW, Backend, EmbMode, EmbTable, FineGrads, FineShape, Float, Gemm,
    HostStaging, Mut, Ref, ValidTokens,
};
use crate::{Error, Result};

/// Target number of elements handled by one parallel task of an element-wise or row-wise op.
const CHUNK: usize = 1 << 14;
/// Columns per task in column-parallel reductions (bias, LayerNorm parameters, embeddings).
const COL_CHUNK: usize = 32;
/// Multiply-adds per parallel task of a matrix product (products smaller than this run as
/// one call).
const GEMM_TASK_WORK: usize = 1 << 23;
/// Fewest output rows per parallel task of a matrix product: each task repacks the whole
/// right operand, so small row blocks would spend their time packing.
const GEMM_MIN_ROWS: usize = 128;

/// The CPU reference backend over element type `F` (`f32` or `f64`); buffers are `Vec<F>`,
/// id buffers `Vec<u32>`. Stateless: every method works on the buffers it is given.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuBackend<F: Float> {
    _f: PhantomData<fn() -> F>,
}

impl<F: Float> CpuBackend<F> {
    /// A new CPU backend (threads come from rayon's global pool, or the pool the caller
    /// installs).
    pub fn new() -> Self {
        CpuBackend { _f: PhantomData }
    }

    /// `grad[i] = grad[i]·GELU'(x[i])` for `i < len`: [`Backend::gelu_backward`] with `dy`
    /// and `dx` in one buffer (the same bits).
    pub(crate) fn gelu_backward_in_place(&self, len: usize, x: Ref<Vec<F>>, grad: Mut<Vec<F>>) {
        let x = rd(x, len);
        wr(grad, len)
            .par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK))
            .for_each(|(gc, xc)| {
                for (g, &x) in gc.iter_mut().zip(xc) {
                    *g *= gelu_slope(x);
                }
            });
    }
}

/// `x` as an `F` (rounding for `f32`).
#[inline]
fn cst<F: Float>(x: f64) -> F {
    <F as Float>::from_f64(x)
}

/// `x` as an `f64`.
#[inline]
fn wide<F: Float>(x: F) -> f64 {
    <F as Float>::to_f64(x)
}

/// The read-only slice of `len` elements a window starts.
#[inline]
fn rd<'a, F>(r: Ref<'a, Vec<F>>, len: usize) -> &'a [F] {
    &r.buf[r.off..r.off + len]
}

/// The writable slice of `len` elements a window starts.
#[inline]
fn wr<'a, F>(m: Mut<'a, Vec<F>>, len: usize) -> &'a mut [F] {
    &mut m.buf[m.off..m.off + len]
}

/// Rows per parallel task for rows of `width` elements.
#[inline]
fn rows_per_task(width: usize) -> usize {
    (CHUNK / width.max(1)).max(1)
}

/// Stable `log(1 + eˣ)`.
#[inline]
fn softplus<F: Float>(x: F) -> F {
    x.max(F::zero()) + (-x.abs()).exp().ln_1p()
}

/// GELU `x·Φ(x) = x·(1 + erf(x/√2))/2` (exact, through erf).
#[inline]
fn gelu_value<F: Float>(x: F) -> F {
    let inv_sqrt2 = cst::<F>(std::f64::consts::FRAC_1_SQRT_2);
    cst::<F>(0.5) * x * (F::one() + (x * inv_sqrt2).erf())
}

/// GELU's derivative `Φ(x) + x·φ(x)` (exact, through erf).
#[inline]
fn gelu_slope<F: Float>(x: F) -> F {
    let half = cst::<F>(0.5);
    let cdf = half * (F::one() + (x * cst::<F>(std::f64::consts::FRAC_1_SQRT_2)).erf());
    let pdf = cst::<F>(0.398_942_280_401_432_7) * (-half * x * x).exp();
    cdf + x * pdf
}

/// Stable logistic sigmoid.
#[inline]
fn sigmoid<F: Float>(x: F) -> F {
    if x >= F::zero() {
        F::one() / (F::one() + (-x).exp())
    } else {
        let e = x.exp();
        e / (F::one() + e)
    }
}

/// A length from an id buffer as `usize`, checked against its padded extent.
fn checked_len(lens: &[u32], b: usize, max: usize, what: &str) -> Result<usize> {
    let l = usize::try_from(lens[b])
        .map_err(|_| Error::invalid(format!("{what}[{b}] does not fit in usize")))?;
    if l > max {
        return Err(Error::invalid(format!(
            "{what}[{b}] = {l} exceeds the padded length {max}"
        )));
    }
    Ok(l)
}

/// A length from an id buffer for the non-`Result` ops; a length beyond the padded extent is
/// a caller bug.
#[inline]
fn seq_len(lens: &[u32], b: usize, max: usize) -> usize {
    let l = lens[b] as usize;
    assert!(
        l <= max,
        "length {l} of row {b} exceeds the padded length {max}"
    );
    l
}

/// Sums per-chunk partial results in chunk order (the fixed reduction order).
fn ordered_sum(parts: Vec<f64>) -> f64 {
    parts.into_iter().fold(0.0, |a, b| a + b)
}

/// A raw pointer that may cross threads; used only where tasks write disjoint elements.
#[derive(Clone, Copy)]
struct SendPtr<T>(*mut T);
// SAFETY: the pointer is only dereferenced by tasks that touch disjoint elements, while the
// owning `&mut` borrow is held by the spawning call.
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}

/// Dense product on slices with row-major operands:
/// `C[m×n] = α·op(A)·op(B) + β·C`, `A` stored with row stride `lda`, etc. Single-threaded.
#[allow(clippy::too_many_arguments)]
fn gemm_slices<F: Float>(
    m: usize,
    n: usize,
    k: usize,
    alpha: F,
    a: &[F],
    lda: usize,
    trans_a: bool,
    b: &[F],
    ldb: usize,
    trans_b: bool,
    beta: F,
    c: &mut [F],
    ldc: usize,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        c.len() >= extent(m, n, ldc) && ldc >= n,
        "gemm: C window too small"
    );
    if k == 0 {
        scale_rows(m, n, beta, c, ldc);
        return;
    }
    let (ar, ac) = if trans_a { (k, m) } else { (m, k) };
    let (br, bc) = if trans_b { (n, k) } else { (k, n) };
    assert!(a.len() >= extent(ar, ac, lda), "gemm: A window too small");
    assert!(b.len() >= extent(br, bc, ldb), "gemm: B window too small");
    let (rsa, csa) = if trans_a { (1, lda) } else { (lda, 1) };
    let (rsb, csb) = if trans_b { (1, ldb) } else { (ldb, 1) };
    // SAFETY: extents checked above; `c` is a distinct `&mut` slice.
    unsafe {
        F::gemm_raw(
            m,
            k,
            n,
            alpha,
            a.as_ptr(),
            rsa as isize,
            csa as isize,
            b.as_ptr(),
            rsb as isize,
            csb as isize,
            beta,
            c.as_mut_ptr(),
            ldc as isize,
            1,
        )
    }
}

/// `C ← β·C` on an `m×n` block (β = 0 writes zeros, whatever C held).
fn scale_rows<F: Float>(m: usize, n: usize, beta: F, c: &mut [F], ldc: usize) {
    for r in 0..m {
        let row = &mut c[r * ldc..r * ldc + n];
        if beta == F::zero() {
            row.fill(F::zero());
        } else {
            row.iter_mut().for_each(|x| *x *= beta);
        }
    }
}

impl<F: Float> CpuBackend<F> {
    /// Per-row part of [`Backend::fine_loss`]: returns `rowloss_b` and, with `grads`, adds
    /// `f·∂rowloss/∂(q,v)` scaled so that `f = coef·w_b/|R|`.
    #[allow(clippy::too_many_arguments)]
    fn fine_row(
        d: usize,
        lq: usize,
        lk: usize,
        q: &[F],
        v: &[F],
        t: &[F],
        f: F,
        grads: Option<(&mut [F], &mut [F])>,
    ) -> f64 {
        if lq == 0 || lk == 0 {
            return 0.0;
        }
        let inv_sqrt_d = F::one() / cst::<F>(d as f64).sqrt();
        // S = Q·Tᵀ/√d (the teacher tokens are the keys), then row softmax (all keys < lk are
        // valid).
        let mut a = vec![F::zero(); lq * lk];
        gemm_slices(
            lq,
            lk,
            d,
            inv_sqrt_d,
            q,
            d,
            false,
            t,
            d,
            true,
            F::zero(),
            &mut a,
            lk,
        );
        for row in a.chunks_mut(lk) {
            let mx = row.iter().fold(F::neg_infinity(), |m, &x| m.max(x));
            let mut s = F::zero();
            for x in row.iter_mut() {
                *x = (*x - mx).exp();
                s += *x;
            }
            let inv = F::one() / s;
            row.iter_mut().for_each(|x| *x *= inv);
        }
        // R = V − A·T (residuals).
        let mut r = v[..lq * d].to_vec();
        gemm_slices(
            lq,
            d,
            lk,
            -F::one(),
            &a,
            lk,
            false,
            t,
            d,
            false,
            F::one(),
            &mut r,
            d,
        );
        let inv_d = F::one() / cst::<F>(d as f64);
        let mut loss = 0.0f64;
        for row in r.chunks(d) {
            let e: F = row.iter().map(|&x| x * x).sum();
            loss += wide(e * inv_d);
        }
        loss /= lq as f64;
        if let Some((dq, dv)) = grads {
            // ∂/∂v_j = g·r_j with g = 2f/(d·ℓq); ∂/∂c_j = −g·r_j.
            let g = cst::<F>(2.0) * f * inv_d / cst::<F>(lq as f64);
            for (dvx, &rx) in dv[..lq * d].iter_mut().zip(&r) {
                *dvx += g * rx;
            }
            // dA = (−g·R)·Tᵀ.
            let mut da = vec![F::zero(); lq * lk];
            gemm_slices(
                lq,
                lk,
                d,
                -g,
                &r,
                d,
                false,
                t,
                d,
                true,
                F::zero(),
                &mut da,
                lk,
            );
            // dS = A ⊙ (dA − Σ_k A·dA), then the 1/√d of the scores.
            for (arow, drow) in a.chunks(lk).zip(da.chunks_mut(lk)) {
                let dot: F = arow.iter().zip(drow.iter()).map(|(&p, &dp)| p * dp).sum();
                for (dx, &p) in drow.iter_mut().zip(arow) {
                    *dx = p * (*dx - dot);
                }
            }
            // dQ += dS·T/√d.
            gemm_slices(
                lq,
                d,
                lk,
                inv_sqrt_d,
                &da,
                lk,
                false,
                t,
                d,
                false,
                F::one(),
                dq,
                d,
            );
        }
        loss
    }
}

/// Writes a loss value into its one-element window (the `*_into` methods' output).
fn store<F: Float>(out: Mut<Vec<F>>, value: F) -> Result<()> {
    wr(out, 1)[0] = value;
    Ok(())
}

/// The CPU's batch staging: two plain vectors (an "upload" is a copy out of them).
pub struct CpuStaging<F> {
    floats: Vec<F>,
    ids: Vec<u32>,
}

impl<F: Float> HostStaging<F> for CpuStaging<F> {
    fn regions(&mut self) -> Result<(&mut [F], &mut [u32])> {
        Ok((&mut self.floats, &mut self.ids))
    }
}

/// `v[off..off + len]`, or an error naming `what` when the range does not lie in `v`.
fn staged_range<'a, T>(v: &'a [T], off: usize, len: usize, what: &str) -> Result<&'a [T]> {
    off.checked_add(len)
        .and_then(|end| v.get(off..end))
        .ok_or_else(|| {
            Error::invalid(format!(
                "staged upload of {what} [{off}, +{len}) beyond the staging's {} elements",
                v.len()
            ))
        })
}

impl<F: Float> Backend for CpuBackend<F> {
    type F = F;
    type Buf = Vec<F>;
    type Ids = Vec<u32>;
    type Graph = std::convert::Infallible;
    type Staging = CpuStaging<F>;
    type Fence = ();

    fn name(&self) -> String {
        format!("cpu-{}", std::any::type_name::<F>())
    }

    // ---- memory ------------------------------------------------------------------------

    fn zeros(&self, len: usize) -> Result<Vec<F>> {
        Ok(vec![F::zero(); len])
    }

    fn uninit(&self, len: usize) -> Result<Vec<F>> {
        Ok(vec![<F as Float>::from_f64(f64::NAN); len])
    }

    fn upload(&self, host: &[F]) -> Result<Vec<F>> {
        Ok(host.to_vec())
    }

    fn upload_ids(&self, host: &[u32]) -> Result<Vec<u32>> {
        Ok(host.to_vec())
    }

    fn download(&self, buf: &Vec<F>) -> Result<Vec<F>> {
        Ok(buf.clone())
    }

    fn alloc_staging(&self, floats: usize, ids: usize) -> Result<CpuStaging<F>> {
        Ok(CpuStaging {
            floats: vec![F::zero(); floats],
            ids: vec![0; ids],
        })
    }

    fn upload_staged(&self, staging: &CpuStaging<F>, off: usize, len: usize) -> Result<Vec<F>> {
        Ok(staged_range(&staging.floats, off, len, "floats")?.to_vec())
    }

    fn upload_staged_ids(
        &self,
        staging: &CpuStaging<F>,
        off: usize,
        len: usize,
    ) -> Result<Vec<u32>> {
        Ok(staged_range(&staging.ids, off, len, "ids")?.to_vec())
    }

    fn upload_fence(&self) -> Result<()> {
        Ok(())
    }

    fn wait_upload(&self, _fence: &()) -> Result<()> {
        Ok(())
    }

    fn len(&self, buf: &Vec<F>) -> usize {
        buf.len()
    }

    fn capture(&self, _queue: &mut dyn FnMut() -> Result<()>) -> Result<Option<Self::Graph>> {
        Ok(None)
    }

    fn replay(&self, graph: &Self::Graph) -> Result<()> {
        match *graph {}
    }

    fn write(&self, host: &[F], dst: Mut<Vec<F>>) -> Result<()> {
        wr(dst, host.len()).copy_from_slice(host);
        Ok(())
    }

    fn copy_ids(&self, len: usize, src: &Vec<u32>, dst: &mut Vec<u32>) {
        dst[..len].copy_from_slice(&src[..len]);
    }

    fn synchronize(&self) -> Result<()> {
        Ok(())
    }

    fn peak_memory(&self) -> Option<u64> {
        super::host_memory::peak_bytes()
    }

    fn reset_peak_memory(&self) {
        super::host_memory::reset_peak();
    }

    fn fill(&self, len: usize, value: F, x: Mut<Vec<F>>) {
        wr(x, len).fill(value);
    }

    fn copy(&self, len: usize, src: Ref<Vec<F>>, dst: Mut<Vec<F>>) {
        wr(dst, len).copy_from_slice(rd(src, len));
    }

    fn copy_2d(
        &self,
        rows: usize,
        cols: usize,
        src: Ref<Vec<F>>,
        src_ld: usize,
        dst: Mut<Vec<F>>,
        dst_ld: usize,
        accumulate: bool,
    ) {
        if rows == 0 || cols == 0 {
            return;
        }
        assert!(
            src_ld >= cols && dst_ld >= cols,
            "copy_2d: row stride below cols"
        );
        let s = rd(src, extent(rows, cols, src_ld));
        let d = wr(dst, extent(rows, cols, dst_ld));
        let rpt = rows_per_task(cols);
        d.par_chunks_mut(dst_ld * rpt)
            .enumerate()
            .for_each(|(ci, dchunk)| {
                for (ri, drow) in dchunk.chunks_mut(dst_ld).enumerate() {
                    let r = ci * rpt + ri;
                    let srow = &s[r * src_ld..r * src_ld + cols];
                    let drow = &mut drow[..cols];
                    if accumulate {
                        drow.iter_mut().zip(srow).for_each(|(y, &x)| *y += x);
                    } else {
                        drow.copy_from_slice(srow);
                    }
                }
            });
    }

    fn axpy(&self, len: usize, alpha: F, x: Ref<Vec<F>>, y: Mut<Vec<F>>) {
        let x = rd(x, len);
        wr(y, len)
            .par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK))
            .for_each(|(yc, xc)| yc.iter_mut().zip(xc).for_each(|(y, &x)| *y += alpha * x));
    }

    // ---- dense -------------------------------------------------------------------------

    fn gemm(&self, s: &Gemm, alpha: F, a: Ref<Vec<F>>, b: Ref<Vec<F>>, beta: F, c: Mut<Vec<F>>) {
        let (m, n, k) = (s.m, s.n, s.k);
        if s.batch == 0 || m == 0 || n == 0 {
            return;
        }
        assert!(s.ldc >= n, "gemm: ldc {} < n {n}", s.ldc);
        let last = s.batch - 1;
        let (a_ext, b_ext) = s.operand_spans();
        let c_ext = last * s.stride_c + extent(m, n, s.ldc);
        let a_s = rd(a, a_ext);
        let b_s = rd(b, b_ext);
        let c_s = wr(c, c_ext);
        // Output row blocks: a fixed size from the shape only.
        let work_per_row = n * k.max(1);
        let rows_per =
            (GEMM_TASK_WORK / work_per_row.max(1)).clamp(GEMM_MIN_ROWS, m.max(GEMM_MIN_ROWS));
        let nblk = m.div_ceil(rows_per);
        // Batches may run in parallel only when their C matrices provably share no element:
        // stacked blocks, or side-by-side column blocks inside common rows.
        let batch_disjoint = s.c_disjoint();
        let total_work = s.batch * m * work_per_row;
        let (rsa, csa) = if s.trans_a { (1, s.lda) } else { (s.lda, 1) };
        let (rsb, csb) = if s.trans_b { (1, s.ldb) } else { (s.ldb, 1) };
        let a_ptr = a_s.as_ptr() as usize;
        let b_ptr = b_s.as_ptr() as usize;
        let c_ptr = SendPtr(c_s.as_mut_ptr());
        let task = |t: usize| {
            let (bi, blk) = (t / nblk, t % nblk);
            let r0 = blk * rows_per;
            let rows = rows_per.min(m - r0);
            let cp = c_ptr;
            // SAFETY: all extents were checked against the windows above; each task writes
            // its own rows of its own C matrix, and C matrices of different batches were
            // shown disjoint before running them concurrently.
            unsafe {
                let c0 = cp.0.add(bi * s.stride_c + r0 * s.ldc);
                if k == 0 {
                    let c_blk = std::slice::from_raw_parts_mut(c0, extent(rows, n, s.ldc));
                    scale_rows(rows, n, beta, c_blk, s.ldc);
                } else {
                    let a0 = (a_ptr as *const F).add(bi * s.stride_a + r0 * rsa);
                    let b0 = (b_ptr as *const F).add(bi * s.stride_b);
                    F::gemm_raw(
                        rows,
                        k,
                        n,
                        alpha,
                        a0,
                        rsa as isize,
                        csa as isize,
                        b0,
                        rsb as isize,
                        csb as isize,
                        beta,
                        c0,
                        s.ldc as isize,
                        1,
                    );
                }
            }
        };
        let ntasks = s.batch * nblk;
        if total_work <= GEMM_TASK_WORK || ntasks == 1 {
            (0..ntasks).for_each(task);
        } else if batch_disjoint {
            (0..ntasks).into_par_iter().for_each(task);
        } else {
            // Batches in order; row blocks of one matrix in parallel.
            for bi in 0..s.batch {
                (bi * nblk..(bi + 1) * nblk).into_par_iter().for_each(task);
            }
        }
    }

    fn add_bias(&self, rows: usize, n: usize, bias: Ref<Vec<F>>, y: Mut<Vec<F>>) {
        if rows == 0 || n == 0 {
            return;
        }
        let bias = rd(bias, n);
        let rpt = rows_per_task(n);
        wr(y, rows * n).par_chunks_mut(rpt * n).for_each(|ch| {
            for row in ch.chunks_mut(n) {
                row.iter_mut().zip(bias).for_each(|(y, &b)| *y += b);
            }
        });
    }

    fn bias_backward(&self, rows: usize, n: usize, dy: Ref<Vec<F>>, db: Mut<Vec<F>>) {
        if n == 0 {
            return;
        }
        let dy = rd(dy, rows * n);
        // Column blocks in parallel; each column sums its rows in row order.
        wr(db, n)
            .par_chunks_mut(COL_CHUNK)
            .enumerate()
            .for_each(|(ci, dbc)| {
                let c0 = ci * COL_CHUNK;
                let w = dbc.len();
                let mut acc = vec![F::zero(); w];
                for r in 0..rows {
                    let row = &dy[r * n + c0..r * n + c0 + w];
                    acc.iter_mut().zip(row).for_each(|(a, &x)| *a += x);
                }
                dbc.iter_mut().zip(&acc).for_each(|(d, &a)| *d += a);
            });
    }

    // ---- element-wise and normalisation ----------------------------------------------

    fn gelu(&self, len: usize, x: Ref<Vec<F>>, y: Mut<Vec<F>>) {
        let x = rd(x, len);
        wr(y, len)
            .par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK))
            .for_each(|(yc, xc)| {
                for (y, &x) in yc.iter_mut().zip(xc) {
                    *y = gelu_value(x);
                }
            });
    }

    fn gelu_in_place(&self, len: usize, xy: Mut<Vec<F>>) {
        wr(xy, len).par_chunks_mut(CHUNK).for_each(|c| {
            for v in c.iter_mut() {
                *v = gelu_value(*v);
            }
        });
    }

    fn gelu_backward(&self, len: usize, x: Ref<Vec<F>>, dy: Ref<Vec<F>>, dx: Mut<Vec<F>>) {
        let x = rd(x, len);
        let dy = rd(dy, len);
        wr(dx, len)
            .par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK).zip(dy.par_chunks(CHUNK)))
            .for_each(|(dc, (xc, gc))| {
                for ((d, &x), &g) in dc.iter_mut().zip(xc).zip(gc) {
                    *d = g * gelu_slope(x);
                }
            });
    }

    fn gelu_bias_backward(
        &self,
        rows: usize,
        n: usize,
        x: Ref<Vec<F>>,
        mut grad: Mut<Vec<F>>,
        db: Mut<Vec<F>>,
    ) {
        self.gelu_backward_in_place(rows * n, x, grad.reborrow());
        self.bias_backward(rows, n, Ref::at(&*grad.buf, grad.off), db);
    }

    fn layernorm(
        &self,
        rows: usize,
        d: usize,
        x: Ref<Vec<F>>,
        gamma_beta: Ref<Vec<F>>,
        y: Mut<Vec<F>>,
        stats: Mut<Vec<F>>,
    ) {
        if rows == 0 || d == 0 {
            return;
        }
        let x = rd(x, rows * d);
        let gb = rd(gamma_beta, 2 * d);
        let (gamma, beta) = gb.split_at(d);
        let eps = cst::<F>(1e-5);
        let inv_d = F::one() / cst::<F>(d as f64);
        let rpt = rows_per_task(d);
        wr(y, rows * d)
            .par_chunks_mut(rpt * d)
            .zip(wr(stats, rows * 2).par_chunks_mut(rpt * 2))
            .enumerate()
            .for_each(|(ci, (yc, sc))| {
                for (ri, st) in sc.chunks_mut(2).enumerate() {
                    let r = ci * rpt + ri;
                    let xr = &x[r * d..(r + 1) * d];
                    let mu = xr.iter().copied().sum::<F>() * inv_d;
                    let var = xr.iter().map(|&v| (v - mu) * (v - mu)).sum::<F>() * inv_d;
                    let rstd = F::one() / (var + eps).sqrt();
                    st[0] = mu;
                    st[1] = rstd;
                    let yr = &mut yc[ri * d..(ri + 1) * d];
                    for j in 0..d {
                        yr[j] = (xr[j] - mu) * rstd * gamma[j] + beta[j];
                    }
                }
            });
    }

    fn layernorm_backward(
        &self,
        rows: usize,
        d: usize,
        x: Ref<Vec<F>>,
        gamma_beta: Ref<Vec<F>>,
        stats: Ref<Vec<F>>,
        dy: Ref<Vec<F>>,
        dx: Mut<Vec<F>>,
        dgamma_beta: Mut<Vec<F>>,
    ) {
        if rows == 0 || d == 0 {
            return;
        }
        let x = rd(x, rows * d);
        let gamma = &rd(gamma_beta, 2 * d)[..d];
        let st = rd(stats, rows * 2);
        let dy = rd(dy, rows * d);
        let inv_d = F::one() / cst::<F>(d as f64);
        let rpt = rows_per_task(d);
        // dx += rstd·(g − mean(g) − x̂·mean(g·x̂)), g = dy·γ.
        wr(dx, rows * d)
            .par_chunks_mut(rpt * d)
            .enumerate()
            .for_each(|(ci, dxc)| {
                let mut g = vec![F::zero(); d];
                for (ri, dxr) in dxc.chunks_mut(d).enumerate() {
                    let r = ci * rpt + ri;
                    let (mu, rstd) = (st[2 * r], st[2 * r + 1]);
                    let xr = &x[r * d..(r + 1) * d];
                    let dyr = &dy[r * d..(r + 1) * d];
                    let mut sg = F::zero();
                    let mut sgx = F::zero();
                    for j in 0..d {
                        g[j] = dyr[j] * gamma[j];
                        sg += g[j];
                        sgx += g[j] * (xr[j] - mu) * rstd;
                    }
                    let (mg, mgx) = (sg * inv_d, sgx * inv_d);
                    for j in 0..d {
                        let xh = (xr[j] - mu) * rstd;
                        dxr[j] += rstd * (g[j] - mg - xh * mgx);
                    }
                }
            });
        // dγ += Σ_r dy·x̂, dβ += Σ_r dy: column blocks in parallel, rows in order.
        let dgb = wr(dgamma_beta, 2 * d);
        let (dgamma, dbeta) = dgb.split_at_mut(d);
        dgamma
            .par_chunks_mut(COL_CHUNK)
            .zip(dbeta.par_chunks_mut(COL_CHUNK))
            .enumerate()
            .for_each(|(ci, (dg, db))| {
                let c0 = ci * COL_CHUNK;
                let w = dg.len();
                let mut ag = vec![F::zero(); w];
                let mut ab = vec![F::zero(); w];
                for r in 0..rows {
                    let (mu, rstd) = (st[2 * r], st[2 * r + 1]);
                    for j in 0..w {
                        let g = dy[r * d + c0 + j];
                        ag[j] += g * (x[r * d + c0 + j] - mu) * rstd;
                        ab[j] += g;
                    }
                }
                dg.iter_mut().zip(&ag).for_each(|(o, &a)| *o += a);
                db.iter_mut().zip(&ab).for_each(|(o, &a)| *o += a);
            });
    }

    // ---- embeddings --------------------------------------------------------------------

    fn embedding(
        &self,
        n: usize,
        width: usize,
        tables: &[EmbTable],
        ids: &Vec<u32>,
        params: &Vec<F>,
        mode: EmbMode,
        out: Mut<Vec<F>>,
        out_ld: usize,
    ) {
        let fields = tables.len();
        let out_w = mode.row_width(fields, width);
        if n == 0 || out_w == 0 {
            return;
        }
        assert!(
            out_ld >= out_w,
            "embedding: out_ld {out_ld} < row width {out_w}"
        );
        let ids = &ids[..n * fields];
        for t in tables {
            assert!(
                t.offset + t.vocab * width <= params.len(),
                "embedding: table at {} exceeds the parameter buffer",
                t.offset
            );
        }
        let row = |i: usize, k: usize| -> &[F] {
            let id = ids[i * fields + k] as usize;
            let t = &tables[k];
            assert!(
                id < t.vocab,
                "embedding: id {id} ≥ vocab {} (token {i}, field {k})",
                t.vocab
            );
            &params[t.offset + id * width..t.offset + (id + 1) * width]
        };
        let rpt = rows_per_task(out_w);
        wr(out, extent(n, out_w, out_ld))
            .par_chunks_mut(rpt * out_ld)
            .enumerate()
            .for_each(|(ci, oc)| {
                for (ri, orow) in oc.chunks_mut(out_ld).enumerate() {
                    let i = ci * rpt + ri;
                    match mode {
                        EmbMode::Sum => {
                            let o = &mut orow[..width];
                            o.fill(F::zero());
                            for k in 0..fields {
                                o.iter_mut().zip(row(i, k)).for_each(|(y, &e)| *y += e);
                            }
                        }
                        EmbMode::Concat => {
                            for k in 0..fields {
                                orow[k * width..(k + 1) * width].copy_from_slice(row(i, k));
                            }
                        }
                    }
                }
            });
    }

    fn embedding_backward(
        &self,
        n: usize,
        width: usize,
        tables: &[EmbTable],
        ids: &Vec<u32>,
        mode: EmbMode,
        dout: Ref<Vec<F>>,
        dout_ld: usize,
        grads: &mut Vec<F>,
        valid: Option<ValidTokens<'_, Vec<u32>>>,
    ) {
        let fields = tables.len();
        let out_w = mode.row_width(fields, width);
        if n == 0 || width == 0 || fields == 0 {
            return;
        }
        assert!(
            dout_ld >= out_w,
            "embedding_backward: dout_ld {dout_ld} < {out_w}"
        );
        let ids = &ids[..n * fields];
        let dout = rd(dout, extent(n, out_w, dout_ld));
        if let Some(v) = valid {
            assert!(
                v.max_len > 0 && n.is_multiple_of(v.max_len) && v.lens.len() >= n / v.max_len,
                "embedding_backward: {n} tokens are not rows of {} slots with a length each",
                v.max_len
            );
        }
        for (k, t) in tables.iter().enumerate() {
            assert!(
                t.offset + t.vocab * width <= grads.len(),
                "embedding_backward: table {k} exceeds the gradient buffer"
            );
            for i in 0..n {
                let id = ids[i * fields + k] as usize;
                assert!(
                    id < t.vocab,
                    "embedding_backward: id {id} ≥ vocab {}",
                    t.vocab
                );
            }
        }
        // Column blocks in parallel; inside a block tables in order, tokens in order, so each
        // gradient element receives its terms in one fixed order. Distinct column blocks touch
        // distinct elements when the tables do not overlap (distinct parameters); tables that
        // share elements are processed one block after the other (same order, same result).
        let mut spans: Vec<(usize, usize)> = tables
            .iter()
            .map(|t| (t.offset, t.offset + t.vocab * width))
            .collect();
        spans.sort_unstable();
        let disjoint = spans.windows(2).all(|p| p[0].1 <= p[1].0);
        let g = SendPtr(grads.as_mut_ptr());
        let nblk = width.div_ceil(COL_CHUNK);
        let block = |blk: usize| {
            let gp = g;
            let c0 = blk * COL_CHUNK;
            let w = COL_CHUNK.min(width - c0);
            for (k, t) in tables.iter().enumerate() {
                let src0 = match mode {
                    EmbMode::Sum => 0,
                    EmbMode::Concat => k * width,
                };
                for i in (0..n).filter(|&i| valid.is_none_or(|v| v.is_valid(i))) {
                    let id = ids[i * fields + k] as usize;
                    let src = &dout[i * dout_ld + src0 + c0..i * dout_ld + src0 + c0 + w];
                    // SAFETY: bounds checked above (`id < vocab`, table inside the buffer);
                    // concurrent blocks write disjoint columns of disjoint tables.
                    unsafe {
                        let dst = gp.0.add(t.offset + id * width + c0);
                        for (j, &s) in src.iter().enumerate() {
                            *dst.add(j) += s;
                        }
                    }
                }
            }
        };
        if disjoint {
            (0..nblk).into_par_iter().for_each(block);
        } else {
            (0..nblk).for_each(block);
        }
    }

    fn add_positions(
        &self,
        batch: usize,
        max_len: usize,
        d: usize,
        lens: &Vec<u32>,
        pos: Ref<Vec<F>>,
        x: Mut<Vec<F>>,
    ) {
        if batch == 0 || max_len == 0 || d == 0 {
            return;
        }
        let pos = rd(pos, max_len * d);
        let lens = &lens[..batch];
        wr(x, batch * max_len * d)
            .par_chunks_mut(max_len * d)
            .enumerate()
            .for_each(|(b, xb)| {
                let l = seq_len(lens, b, max_len);
                for t in 0..l {
                    let p = &pos[(l - 1 - t) * d..(l - t) * d];
                    xb[t * d..(t + 1) * d]
                        .iter_mut()
                        .zip(p)
                        .for_each(|(y, &v)| *y += v);
                }
            });
    }

    fn add_positions_backward(
        &self,
        batch: usize,
        max_len: usize,
        d: usize,
        lens: &Vec<u32>,
        dx: Ref<Vec<F>>,
        dpos: Mut<Vec<F>>,
    ) {
        if batch == 0 || max_len == 0 || d == 0 {
            return;
        }
        let dx = rd(dx, batch * max_len * d);
        let lens = &lens[..batch];
        for b in 0..batch {
            seq_len(lens, b, max_len);
        }
        // Position rows in parallel; each sums its batch rows in order.
        wr(dpos, max_len * d)
            .par_chunks_mut(d)
            .enumerate()
            .for_each(|(p, dp)| {
                for (b, &l) in lens.iter().enumerate() {
                    let l = l as usize;
                    if p < l {
                        let t = l - 1 - p;
                        let src = &dx[(b * max_len + t) * d..(b * max_len + t + 1) * d];
                        dp.iter_mut().zip(src).for_each(|(y, &v)| *y += v);
                    }
                }
            });
    }

    // ---- attention and pooling ---------------------------------------------------------

    fn masked_softmax(
        &self,
        batch: usize,
        heads: usize,
        lq: usize,
        lk: usize,
        key_lens: &Vec<u32>,
        first_row: usize,
        scale: F,
        scores: Mut<Vec<F>>,
    ) {
        let rows = batch * heads * lq;
        if rows == 0 || lk == 0 {
            return;
        }
        let per_b = heads * lq;
        let lens = &key_lens[first_row..first_row + batch];
        let rpt = rows_per_task(lk);
        wr(scores, rows * lk)
            .par_chunks_mut(rpt * lk)
            .enumerate()
            .for_each(|(ci, sc)| {
                for (ri, row) in sc.chunks_mut(lk).enumerate() {
                    let b = (ci * rpt + ri) / per_b;
                    let l = seq_len(lens, b, lk);
                    let (valid, pad) = row.split_at_mut(l);
                    pad.fill(F::zero());
                    if l == 0 {
                        continue;
                    }
                    let mx = valid
                        .iter()
                        .fold(F::neg_infinity(), |m, &s| m.max(s * scale));
                    let mut sum = F::zero();
                    for s in valid.iter_mut() {
                        *s = (*s * scale - mx).exp();
                        sum += *s;
                    }
                    let inv = F::one() / sum;
                    valid.iter_mut().for_each(|p| *p *= inv);
                }
            });
    }

    fn masked_softmax_backward(
        &self,
        batch: usize,
        heads: usize,
        lq: usize,
        lk: usize,
        key_lens: &Vec<u32>,
        scale: F,
        probs: Ref<Vec<F>>,
        dprobs: Ref<Vec<F>>,
        dscores: Mut<Vec<F>>,
    ) {
        let rows = batch * heads * lq;
        if rows == 0 || lk == 0 {
            return;
        }
        let per_b = heads * lq;
        let lens = &key_lens[..batch];
        let p = rd(probs, rows * lk);
        let dp = rd(dprobs, rows * lk);
        let rpt = rows_per_task(lk);
        wr(dscores, rows * lk)
            .par_chunks_mut(rpt * lk)
            .enumerate()
            .for_each(|(ci, dc)| {
                for (ri, drow) in dc.chunks_mut(lk).enumerate() {
                    let r = ci * rpt + ri;
                    let l = seq_len(lens, r / per_b, lk);
                    let pr = &p[r * lk..r * lk + l];
                    let gr = &dp[r * lk..r * lk + l];
                    let dot: F = pr.iter().zip(gr).map(|(&a, &b)| a * b).sum();
                    let (valid, pad) = drow.split_at_mut(l);
                    pad.fill(F::zero());
                    for ((o, &a), &g) in valid.iter_mut().zip(pr).zip(gr) {
                        *o = scale * a * (g - dot);
                    }
                }
            });
    }

    fn masked_mean(
        &self,
        batch: usize,
        max_len: usize,
        d: usize,
        lens: &Vec<u32>,
        x: Ref<Vec<F>>,
        empty: Ref<Vec<F>>,
        out: Mut<Vec<F>>,
    ) {
        if batch == 0 || d == 0 {
            return;
        }
        let x = rd(x, batch * max_len * d);
        let empty = rd(empty, d);
        let lens = &lens[..batch];
        let rpt = rows_per_task(max_len * d);
        wr(out, batch * d)
            .par_chunks_mut(rpt * d)
            .enumerate()
            .for_each(|(ci, oc)| {
                for (ri, o) in oc.chunks_mut(d).enumerate() {
                    let b = ci * rpt + ri;
                    let l = seq_len(lens, b, max_len);
                    if l == 0 {
                        o.copy_from_slice(empty);
                        continue;
                    }
                    o.fill(F::zero());
                    for t in 0..l {
                        let xr = &x[(b * max_len + t) * d..(b * max_len + t + 1) * d];
                        o.iter_mut().zip(xr).for_each(|(y, &v)| *y += v);
                    }
                    let lf = cst::<F>(l as f64);
                    o.iter_mut().for_each(|y| *y = *y / lf);
                }
            });
    }

    fn masked_mean_backward(
        &self,
        batch: usize,
        max_len: usize,
        d: usize,
        lens: &Vec<u32>,
        dout: Ref<Vec<F>>,
        dx: Mut<Vec<F>>,
        dempty: Mut<Vec<F>>,
    ) {
        if batch == 0 || d == 0 {
            return;
        }
        let dout = rd(dout, batch * d);
        let lens = &lens[..batch];
        if max_len > 0 {
            wr(dx, batch * max_len * d)
                .par_chunks_mut(max_len * d)
                .enumerate()
                .for_each(|(b, xb)| {
                    let l = seq_len(lens, b, max_len);
                    let g = &dout[b * d..(b + 1) * d];
                    let lf = cst::<F>(l.max(1) as f64);
                    for (t, xr) in xb.chunks_mut(d).enumerate() {
                        if t < l {
                            xr.iter_mut().zip(g).for_each(|(y, &v)| *y = v / lf);
                        } else {
                            xr.fill(F::zero());
                        }
                    }
                });
        }
        let de = wr(dempty, d);
        for (b, &l) in lens.iter().enumerate() {
            if l == 0 {
                de.iter_mut()
                    .zip(&dout[b * d..(b + 1) * d])
                    .for_each(|(y, &v)| *y += v);
            }
        }
    }

    fn put_empty_rows(
        &self,
        batch: usize,
        max_len: usize,
        d: usize,
        lens: &Vec<u32>,
        vec: Ref<Vec<F>>,
        seq: Mut<Vec<F>>,
    ) {
        if batch == 0 || d == 0 {
            return;
        }
        assert!(max_len >= 1, "put_empty_rows: max_len must be at least 1");
        let src = rd(vec, batch * d);
        let dst = wr(seq, batch * max_len * d);
        for (b, _) in lens[..batch].iter().enumerate().filter(|(_, &l)| l == 0) {
            dst[b * max_len * d..][..d].copy_from_slice(&src[b * d..(b + 1) * d]);
        }
    }

    fn put_empty_rows_backward(
        &self,
        batch: usize,
        max_len: usize,
        d: usize,
        lens: &Vec<u32>,
        dseq: Mut<Vec<F>>,
        dvec: Mut<Vec<F>>,
    ) {
        if batch == 0 || d == 0 {
            return;
        }
        assert!(
            max_len >= 1,
            "put_empty_rows_backward: max_len must be at least 1"
        );
        let ds = wr(dseq, batch * max_len * d);
        let dv = wr(dvec, batch * d);
        for (b, _) in lens[..batch].iter().enumerate().filter(|(_, &l)| l == 0) {
            let slot = &mut ds[b * max_len * d..][..d];
            dv[b * d..(b + 1) * d]
                .iter_mut()
                .zip(slot.iter_mut())
                .for_each(|(g, s)| {
                    *g += *s;
                    *s = F::zero();
                });
        }
    }

    // ---- losses ------------------------------------------------------------------------

    fn bce_loss_into(
        &self,
        n: usize,
        logits: Ref<Vec<F>>,
        labels: Ref<Vec<F>>,
        weights: Ref<Vec<F>>,
        coef: F,
        dlogits: Option<Mut<Vec<F>>>,
        out: Mut<Vec<F>>,
    ) -> Result<()> {
        if n == 0 {
            return store(out, F::zero());
        }
        let z = rd(logits, n);
        let y = rd(labels, n);
        let w = rd(weights, n);
        let parts: Vec<f64> = z
            .par_chunks(CHUNK)
            .zip(y.par_chunks(CHUNK).zip(w.par_chunks(CHUNK)))
            .map(|(zc, (yc, wc))| {
                zc.iter()
                    .zip(yc)
                    .zip(wc)
                    .map(|((&z, &y), &w)| wide(w * (softplus(z) - y * z)))
                    .fold(0.0, |a, b| a + b)
            })
            .collect();
        let loss = ordered_sum(parts) / n as f64;
        if let Some(dz) = dlogits {
            let f = coef / cst::<F>(n as f64);
            wr(dz, n)
                .par_chunks_mut(CHUNK)
                .zip(
                    z.par_chunks(CHUNK)
                        .zip(y.par_chunks(CHUNK).zip(w.par_chunks(CHUNK))),
                )
                .for_each(|(dc, (zc, (yc, wc)))| {
                    for (((d, &z), &y), &w) in dc.iter_mut().zip(zc).zip(yc).zip(wc) {
                        *d += f * w * (sigmoid(z) - y);
                    }
                });
        }
        store(out, cst(loss))
    }

    #[allow(clippy::too_many_arguments)]
    fn bernoulli_kl_loss_into(
        &self,
        n: usize,
        student: Ref<Vec<F>>,
        target: Ref<Vec<F>>,
        weights: Option<Ref<Vec<F>>>,
        tau: F,
        coef: F,
        dstudent: Option<Mut<Vec<F>>>,
        out: Mut<Vec<F>>,
    ) -> Result<()> {
        if tau.is_nan() || tau <= F::zero() {
            return Err(Error::invalid(format!(
                "bernoulli_kl_loss: temperature τ = {tau} must be positive"
            )));
        }
        if n == 0 {
            return store(out, F::zero());
        }
        let s = rd(student, n);
        let t = rd(target, n);
        let w = weights.map(|w| rd(w, n));
        let wt = |i: usize| w.map_or(F::one(), |w| w[i]);
        let inv_tau = F::one() / tau;
        // KL(Bern(σ(a)) ‖ Bern(σ(b))) = softplus(b) − softplus(a) + σ(a)·(a − b).
        let nchunks = n.div_ceil(CHUNK);
        let parts: Vec<f64> = (0..nchunks)
            .into_par_iter()
            .map(|c| {
                (c * CHUNK..n.min((c + 1) * CHUNK))
                    .map(|i| {
                        let a = t[i] * inv_tau;
                        let b = s[i] * inv_tau;
                        wide(wt(i) * (softplus(b) - softplus(a) + sigmoid(a) * (a - b)))
                    })
                    .fold(0.0, |x, y| x + y)
            })
            .collect();
        let tau2 = wide(tau) * wide(tau);
        let loss = tau2 * ordered_sum(parts) / n as f64;
        if let Some(ds) = dstudent {
            let f = coef * tau / cst::<F>(n as f64);
            wr(ds, n)
                .par_chunks_mut(CHUNK)
                .enumerate()
                .for_each(|(c, dc)| {
                    for (j, d) in dc.iter_mut().enumerate() {
                        let i = c * CHUNK + j;
                        *d += f * wt(i) * (sigmoid(s[i] * inv_tau) - sigmoid(t[i] * inv_tau));
                    }
                });
        }
        store(out, cst(loss))
    }

    #[allow(clippy::too_many_arguments)]
    fn coarse_loss_into(
        &self,
        n: usize,
        d: usize,
        pred: Ref<Vec<F>>,
        target: Ref<Vec<F>>,
        weights: Ref<Vec<F>>,
        cosine: bool,
        coef: F,
        dpred: Option<Mut<Vec<F>>>,
        out: Mut<Vec<F>>,
    ) -> Result<()> {
        if n == 0 || d == 0 {
            return store(out, F::zero());
        }
        let p = rd(pred, n * d);
        let t = rd(target, n * d);
        let w = rd(weights, n);
        let inv_d = F::one() / cst::<F>(d as f64);
        let inv_n = F::one() / cst::<F>(n as f64);
        let rpt = rows_per_task(d);
        // Per row: loss term and, with a gradient, ∂term/∂pred written in place.
        let row_term = |i: usize, g: Option<&mut [F]>| -> f64 {
            let pr = &p[i * d..(i + 1) * d];
            let tr = &t[i * d..(i + 1) * d];
            if cosine {
                let pp: F = pr.iter().map(|&x| x * x).sum();
                let tt: F = tr.iter().map(|&x| x * x).sum();
                let pt: F = pr.iter().zip(tr).map(|(&a, &b)| a * b).sum();
                if pp == F::zero() || tt == F::zero() {
                    return wide(w[i]);
                }
                let (np, nt) = (pp.sqrt(), tt.sqrt());
                let cos = pt / (np * nt);
                if let Some(g) = g {
                    // ∂(1 − cos)/∂p = −(t/(‖p‖‖t‖) − cos·p/‖p‖²).
                    let f = coef * w[i] * inv_n;
                    for ((gx, &a), &b) in g.iter_mut().zip(pr).zip(tr) {
                        *gx += f * (cos * a / pp - b / (np * nt));
                    }
                }
                wide(w[i] * (F::one() - cos))
            } else {
                let se: F = pr.iter().zip(tr).map(|(&a, &b)| (a - b) * (a - b)).sum();
                if let Some(g) = g {
                    let f = cst::<F>(2.0) * coef * w[i] * inv_n * inv_d;
                    for ((gx, &a), &b) in g.iter_mut().zip(pr).zip(tr) {
                        *gx += f * (a - b);
                    }
                }
                wide(w[i] * se * inv_d)
            }
        };
        let parts: Vec<f64> = match dpred {
            Some(dp) => wr(dp, n * d)
                .par_chunks_mut(rpt * d)
                .enumerate()
                .map(|(ci, gc)| {
                    gc.chunks_mut(d)
                        .enumerate()
                        .map(|(ri, g)| row_term(ci * rpt + ri, Some(g)))
                        .fold(0.0, |a, b| a + b)
                })
                .collect(),
            None => (0..n.div_ceil(rpt))
                .into_par_iter()
                .map(|ci| {
                    (ci * rpt..n.min((ci + 1) * rpt))
                        .map(|i| row_term(i, None))
                        .fold(0.0, |a, b| a + b)
                })
                .collect(),
        };
        store(out, cst(ordered_sum(parts) / n as f64))
    }

    #[allow(clippy::too_many_arguments)]
    fn fine_loss_into(
        &self,
        shape: FineShape,
        q: Ref<Vec<F>>,
        v: Ref<Vec<F>>,
        t_in: Ref<Vec<F>>,
        q_lens: &Vec<u32>,
        k_lens: &Vec<u32>,
        weights: Ref<Vec<F>>,
        coef: F,
        grads: Option<FineGrads<'_, Vec<F>>>,
        out: Mut<Vec<F>>,
    ) -> Result<()> {
        let FineShape { batch, lq, lk, d } = shape;
        if batch == 0 {
            return store(out, F::zero());
        }
        if q_lens.len() < batch || k_lens.len() < batch {
            return Err(Error::invalid(format!(
                "fine_loss: {} query / {} key lengths for a batch of {batch}",
                q_lens.len(),
                k_lens.len()
            )));
        }
        let mut lens = Vec::with_capacity(batch);
        for b in 0..batch {
            lens.push((
                checked_len(q_lens, b, lq, "fine_loss q_lens")?,
                checked_len(k_lens, b, lk, "fine_loss k_lens")?,
            ));
        }
        let n_r = lens.iter().filter(|&&(_, lkb)| lkb > 0).count();
        if n_r == 0 || d == 0 {
            return store(out, F::zero());
        }
        let (sq, sk) = (lq * d, lk * d);
        let q = rd(q, batch * sq);
        let v = rd(v, batch * sq);
        let t = rd(t_in, batch * sk);
        let w = rd(weights, batch);
        let inv_r = F::one() / cst::<F>(n_r as f64);
        let row = |b: usize, g: Option<(&mut [F], &mut [F])>| -> f64 {
            let (lqb, lkb) = lens[b];
            let rl = Self::fine_row(
                d,
                lqb,
                lkb,
                &q[b * sq..(b + 1) * sq],
                &v[b * sq..(b + 1) * sq],
                &t[b * sk..(b + 1) * sk],
                coef * w[b] * inv_r,
                g,
            );
            wide(w[b]) * rl
        };
        let parts: Vec<f64> = match grads {
            Some(FineGrads { dq, dv }) if lq > 0 && lk > 0 => wr(dq, batch * sq)
                .par_chunks_mut(sq)
                .zip(wr(dv, batch * sq).par_chunks_mut(sq))
                .enumerate()
                .map(|(b, (gq, gv))| row(b, Some((gq, gv))))
                .collect(),
            _ => (0..batch).into_par_iter().map(|b| row(b, None)).collect(),
        };
        store(out, cst(ordered_sum(parts) / n_r as f64))
    }

    // ---- optimizer ---------------------------------------------------------------------

    fn sum_squares_into(&self, len: usize, x: Ref<Vec<F>>, out: Mut<Vec<F>>) -> Result<()> {
        let x = rd(x, len);
        let parts: Vec<f64> = x
            .par_chunks(CHUNK)
            .map(|c| c.iter().map(|&v| wide(v) * wide(v)).fold(0.0, |a, b| a + b))
            .collect();
        store(out, cst(ordered_sum(parts)))
    }

    fn adamw(
        &self,
        hp: &AdamW,
        params: &mut Vec<F>,
        grads: &Vec<F>,
        m: &mut Vec<F>,
        v: &mut Vec<F>,
        decay_mask: &Vec<F>,
    ) {
        let len = params.len();
        assert!(
            grads.len() == len && m.len() == len && v.len() == len && decay_mask.len() == len,
            "adamw: parameter, gradient, moment and mask buffers differ in length"
        );
        assert!(hp.step >= 1, "adamw: the step number is 1-based");
        let [lr, bc1, bc2] = sched_values::<F>(hp);
        let (b1, b2) = (cst::<F>(hp.beta1), cst::<F>(hp.beta2));
        let (eps, wd, gs) = (
            cst::<F>(hp.eps),
            cst::<F>(hp.weight_decay),
            cst::<F>(hp.grad_scale),
        );
        let one = F::one();
        params
            .par_chunks_mut(CHUNK)
            .zip(m.par_chunks_mut(CHUNK))
            .zip(v.par_chunks_mut(CHUNK))
            .zip(grads.par_chunks(CHUNK).zip(decay_mask.par_chunks(CHUNK)))
            .for_each(|(((pc, mc), vc), (gc, dc))| {
                for i in 0..pc.len() {
                    let g = gs * gc[i];
                    mc[i] = b1 * mc[i] + (one - b1) * g;
                    vc[i] = b2 * vc[i] + (one - b2) * g * g;
                    let mh = mc[i] / bc1;
                    let vh = vc[i] / bc2;
                    pc[i] = pc[i] - lr * (mh / (vh.sqrt() + eps) + wd * dc[i] * pc[i]);
                }
            });
    }
}
