//! Multi-head self-attention with a key-padding mask as one backend operation
//! ([`Backend::attention`], [`Backend::attention_backward`]) and its composition from the
//! primitive ops ([`attention_composed`], [`attention_backward_composed`]): the default of
//! every backend, and the reference a fused implementation is checked against.
//!
//! Q, K and V are the column blocks of one fused projection, `qkv` packed
//! `[batch, len, 3d]` (Q in columns `0..d`, K in `d..2d`, V in `2d..3d`; head `h` in columns
//! `h·dh .. (h+1)·dh` of each block, `dh = d/heads`). Per row `b` and head `h`:
//! `S = Q_h·K_hᵀ·scale`, `P = softmax(S)` over the keys `j < lens[b]` (0 elsewhere, an
//! all-zero row when `lens[b] = 0`), `C_h = P·V_h`, written to `ctx` packed `[batch, len, d]`.
//! Every query position gets an output, padded ones included (the model ignores them).

use super::{Backend, Float, Gemm, Mut, Outer, Ref};
use crate::Result;

/// Shape of one attention call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttnShape {
    /// Batch rows.
    pub batch: usize,
    /// Padded sequence length (queries and keys).
    pub len: usize,
    /// Number of heads (divides `d`).
    pub heads: usize,
    /// Model width d.
    pub d: usize,
}

impl AttnShape {
    /// Width of one head, `d/heads`.
    pub fn dh(&self) -> usize {
        self.d / self.heads
    }

    /// Elements of the probabilities `[batch, heads, len, len]`: what the composition saves
    /// for the backward.
    pub fn probs_len(&self) -> usize {
        self.batch * self.heads * self.len * self.len
    }

    /// The product per (head, row) `[len × len] = [len × dh]·[len × dh]ᵀ` of two column
    /// blocks of row stride `lda` and `ldb` (scores `Q·Kᵀ`, or `dP = dC·Vᵀ`), into the
    /// probabilities' layout, as one [`Backend::gemm_outer`] call over heads × rows.
    pub fn scores_product(&self, lda: usize, ldb: usize) -> (Gemm, Outer) {
        self.scores_product_of(self.heads, lda, ldb)
    }

    /// [`AttnShape::scores_product`] for `h` consecutive heads, into probabilities laid out
    /// `[batch, h, len, len]` (the whole layout when `h` is `heads`).
    fn scores_product_of(&self, h: usize, lda: usize, ldb: usize) -> (Gemm, Outer) {
        let (l, dh) = (self.len, self.dh());
        let g = Gemm {
            m: l,
            n: l,
            k: dh,
            trans_a: false,
            trans_b: true,
            lda,
            ldb,
            ldc: l,
            batch: self.batch,
            stride_a: l * lda,
            stride_b: l * ldb,
            stride_c: h * l * l,
        };
        (g, heads_outer(h, dh, dh, l * l))
    }

    /// The product per (head, row) `[len × dh] = op(P)·[len × dh]` with `P` in the
    /// probabilities' layout (`Pᵀ` when `trans`), the right factor of row stride `ldb`, the
    /// result of row stride `ldc` (`C = P·V`, `dV = Pᵀ·dC`, `dQ = dS·K`, `dK = dSᵀ·Q`), as
    /// one [`Backend::gemm_outer`] call over heads × rows.
    pub fn probs_product(&self, trans: bool, ldb: usize, ldc: usize) -> (Gemm, Outer) {
        self.probs_product_of(self.heads, trans, ldb, ldc)
    }

    /// [`AttnShape::probs_product`] for `h` consecutive heads, with `P` laid out
    /// `[batch, h, len, len]`.
    fn probs_product_of(&self, h: usize, trans: bool, ldb: usize, ldc: usize) -> (Gemm, Outer) {
        let (l, dh) = (self.len, self.dh());
        let g = Gemm {
            m: l,
            n: dh,
            k: l,
            trans_a: trans,
            trans_b: false,
            lda: l,
            ldb,
            ldc,
            batch: self.batch,
            stride_a: h * l * l,
            stride_b: l * ldb,
            stride_c: l * ldc,
        };
        (g, heads_outer(h, l * l, dh, dh))
    }
}

/// `count` heads as the outer batch of an attention product: head `h`'s A, B and C matrices
/// start `h·stride_*` elements after head 0's.
fn heads_outer(count: usize, stride_a: usize, stride_b: usize, stride_c: usize) -> Outer {
    Outer {
        count,
        stride_a,
        stride_b,
        stride_c,
    }
}

/// Elements of the probabilities that [`attention_infer_composed`] holds at once, at most
/// (unless one head of one row alone has more): 2²², 8 MiB in bf16, 16 MiB in f32. The §8
/// teacher (batch 1 024, L 128, 4 heads: 2²⁴ per head over every row) runs one head of 256
/// rows at a time, the student (L 32: 2²⁰ per head) all four heads of every row at once.
pub const INFER_ATTN_ELEMS: usize = 1 << 22;

/// How [`attention_infer_composed`] splits `s`, as (heads, rows) at a time: the most
/// consecutive heads that divide `heads` and whose probabilities over every row fit
/// [`INFER_ATTN_ELEMS`], with every row; else one head over as many rows as fit (at
/// least 1).
pub fn infer_blocks(s: &AttnShape) -> (usize, usize) {
    let per_head = s.batch * s.len * s.len;
    let heads = (1..=s.heads)
        .rev()
        .find(|&g| s.heads.is_multiple_of(g) && g * per_head <= INFER_ATTN_ELEMS);
    match heads {
        Some(g) => (g, s.batch),
        None => (
            1,
            (INFER_ATTN_ELEMS / (s.len * s.len).max(1)).clamp(1, s.batch.max(1)),
        ),
    }
}

/// Elements of the probabilities buffer [`attention_infer_composed`] holds for `s`.
pub fn infer_probs_len(s: &AttnShape) -> usize {
    let (heads, rows) = infer_blocks(s);
    heads * rows * s.len * s.len
}

/// [`Backend::attention_infer`] from the primitives: [`attention_composed`]'s operations
/// over [`infer_blocks`] heads and rows at a time (`attention_by_blocks`), so an inference
/// pass never holds the whole `batch·heads·len²`; the rows' key lengths from
/// `lens[first_row]` on.
#[allow(clippy::too_many_arguments)]
pub fn attention_infer_composed<B: Backend + ?Sized>(
    be: &B,
    s: &AttnShape,
    lens: &B::Ids,
    first_row: usize,
    scale: B::F,
    qkv: Ref<B::Buf>,
    ctx: Mut<B::Buf>,
) -> Result<()> {
    attention_by_blocks(be, s, infer_blocks(s), lens, first_row, scale, qkv, ctx)
}

/// [`attention_composed`]'s output, `heads` consecutive heads (dividing `s.heads`) of `rows`
/// consecutive batch rows at a time, in one scratch buffer of `rows·heads·len²`
/// probabilities: each block is the composition of a batch of those rows, their Q/K/V and
/// context windows `r0·len` tokens in and their key lengths from row `first_row + r0` on.
/// Each product and softmax row is the one [`attention_composed`] computes for the same row
/// and head.
#[allow(clippy::too_many_arguments)]
fn attention_by_blocks<B: Backend + ?Sized>(
    be: &B,
    s: &AttnShape,
    (heads, rows): (usize, usize),
    lens: &B::Ids,
    first_row: usize,
    scale: B::F,
    qkv: Ref<B::Buf>,
    ctx: Mut<B::Buf>,
) -> Result<()> {
    let mut probs = be.scratch(rows * heads * s.len * s.len)?;
    for r0 in (0..s.batch).step_by(rows.max(1)) {
        let part = AttnShape {
            batch: rows.min(s.batch - r0),
            ..*s
        };
        let t0 = r0 * s.len;
        let q = Ref::at(qkv.buf, qkv.off + t0 * 3 * s.d);
        for h0 in (0..s.heads).step_by(heads) {
            let c = Mut::at(&mut *ctx.buf, ctx.off + t0 * s.d);
            let p = Mut::whole(&mut probs);
            heads_forward(be, &part, first_row + r0, h0, heads, lens, scale, q, c, p);
        }
    }
    Ok(())
}

/// The composition for heads `h0 .. h0 + group`: the scores as one
/// [`Backend::gemm_outer`] over those heads × rows into `probs` (laid out
/// `[batch, group, len, len]`), [`Backend::masked_softmax`] in place (the rows' key lengths
/// from `lens[first_row]` on), then their columns of `ctx` as `P·V`.
#[allow(clippy::too_many_arguments)]
fn heads_forward<B: Backend + ?Sized>(
    be: &B,
    s: &AttnShape,
    first_row: usize,
    h0: usize,
    group: usize,
    lens: &B::Ids,
    scale: B::F,
    qkv: Ref<B::Buf>,
    ctx: Mut<B::Buf>,
    mut probs: Mut<B::Buf>,
) {
    let (one, zero) = (B::F::from_f64(1.0), B::F::from_f64(0.0));
    let (d, dh) = (s.d, s.dh());
    let at = |off: usize| Ref::at(qkv.buf, qkv.off + off + h0 * dh);
    let (g, heads) = s.scores_product_of(group, 3 * d, 3 * d);
    be.gemm_outer(&g, &heads, one, at(0), at(d), zero, probs.reborrow());
    let p = probs.reborrow();
    be.masked_softmax(s.batch, group, s.len, s.len, lens, first_row, scale, p);
    let (g, heads) = s.probs_product_of(group, false, 3 * d, d);
    let p = Ref::at(&*probs.buf, probs.off);
    let c = Mut::at(ctx.buf, ctx.off + h0 * dh);
    be.gemm_outer(&g, &heads, one, p, at(2 * d), zero, c);
}

/// [`Backend::attention`] from the primitives: every head at once (`heads_forward`) with
/// the probabilities in `saved` (`probs_len` elements), which keeps them for the backward.
#[allow(clippy::too_many_arguments)]
pub fn attention_composed<B: Backend + ?Sized>(
    be: &B,
    s: &AttnShape,
    lens: &B::Ids,
    scale: B::F,
    qkv: Ref<B::Buf>,
    ctx: Mut<B::Buf>,
    saved: Mut<B::Buf>,
) {
    heads_forward(be, s, 0, 0, s.heads, lens, scale, qkv, ctx, saved);
}

/// [`Backend::attention_backward`] from the primitives, with `saved` the probabilities:
/// `dP = dC·Vᵀ`, `dV = Pᵀ·dC`, `dS` by [`Backend::masked_softmax_backward`] (the scale
/// included), `dQ = dS·K`, `dK = dSᵀ·Q`. Two `probs_len` scratch buffers.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward_composed<B: Backend + ?Sized>(
    be: &B,
    s: &AttnShape,
    lens: &B::Ids,
    scale: B::F,
    qkv: Ref<B::Buf>,
    saved: Ref<B::Buf>,
    dctx: Ref<B::Buf>,
    dqkv: Mut<B::Buf>,
) -> Result<()> {
    let (one, zero) = (B::F::from_f64(1.0), B::F::from_f64(0.0));
    let d = s.d;
    let at = |off: usize| Ref::at(qkv.buf, qkv.off + off);
    let mut dprobs = be.scratch(s.probs_len())?;
    let (g, heads) = s.scores_product(d, 3 * d);
    be.gemm_outer(
        &g,
        &heads,
        one,
        dctx,
        at(2 * d),
        zero,
        Mut::whole(&mut dprobs),
    );
    let (g, heads) = s.probs_product(true, d, 3 * d);
    let dv = Mut::at(&mut *dqkv.buf, dqkv.off + 2 * d);
    be.gemm_outer(&g, &heads, one, saved, dctx, zero, dv);
    let mut dscores = be.scratch(s.probs_len())?;
    be.masked_softmax_backward(
        s.batch,
        s.heads,
        s.len,
        s.len,
        lens,
        scale,
        saved,
        Ref::whole(&dprobs),
        Mut::whole(&mut dscores),
    );
    drop(dprobs);
    let ds = Ref::whole(&dscores);
    // dQ (columns 0..d) from K; dK (columns d..2d) from Q.
    for (trans, src, dst) in [(false, d, 0), (true, 0, d)] {
        let (g, heads) = s.probs_product(trans, 3 * d, 3 * d);
        let out = Mut::at(&mut *dqkv.buf, dqkv.off + dst);
        be.gemm_outer(&g, &heads, one, ds, at(src), zero, out);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuBackend;
    use rand::{Rng, SeedableRng};

    /// The §8 shapes take one head of 256 rows at a time (teacher) or every head of every
    /// row at once (student).
    #[test]
    fn blocks_fit_the_budget() {
        let shape = |batch, len| AttnShape {
            batch,
            len,
            heads: 4,
            d: 128,
        };
        assert_eq!(infer_blocks(&shape(1024, 128)), (1, 256));
        assert_eq!(infer_blocks(&shape(1024, 32)), (4, 1024));
        assert_eq!(infer_blocks(&shape(128, 128)), (2, 128));
        assert_eq!(infer_probs_len(&shape(1024, 128)), INFER_ATTN_ELEMS);
        // One row of one head above the budget still runs, alone.
        assert_eq!(infer_blocks(&shape(8, 4096)), (1, 1));
        assert_eq!(
            infer_blocks(&shape(0, 128)),
            (4, 0),
            "an empty batch holds nothing"
        );
    }

    /// The outputs of [`attention_composed`] and of every (heads, rows) blocking, as bit
    /// patterns, after poisoning each output with NaN (every slot must be written, padded
    /// queries and rows without keys included).
    fn outputs<F: Float>(blocks: &[(usize, usize)]) -> (Vec<u64>, Vec<Vec<u64>>) {
        let be = CpuBackend::<F>::new();
        let s = AttnShape {
            batch: 5,
            len: 7,
            heads: 4,
            d: 16,
        };
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let qkv: Vec<F> = (0..s.batch * s.len * 3 * s.d)
            .map(|_| <F as Float>::from_f64(rng.gen_range(-2.0..2.0)))
            .collect();
        let qkv = be.upload(&qkv).expect("upload");
        let lens = be.upload_ids(&[7, 0, 3, 1, 6]).expect("ids");
        let scale = <F as Float>::from_f64(0.5);
        let nan = vec![<F as Float>::from_f64(f64::NAN); s.batch * s.len * s.d];
        let bits = |buf: &Vec<F>| -> Vec<u64> {
            let v = be.download(buf).expect("download");
            assert!(
                v.iter().all(|x| Float::to_f64(*x).is_finite()),
                "an output slot was not written"
            );
            v.iter().map(|x| Float::to_f64(*x).to_bits()).collect()
        };
        let mut ctx = be.upload(&nan).expect("upload");
        let mut saved = be.scratch(s.probs_len()).expect("scratch");
        let (q, c) = (Ref::whole(&qkv), Mut::whole(&mut ctx));
        attention_composed(&be, &s, &lens, scale, q, c, Mut::whole(&mut saved));
        let whole = bits(&ctx);
        let grouped = blocks
            .iter()
            .map(|&b| {
                let mut ctx = be.upload(&nan).expect("upload");
                let (q, c) = (Ref::whole(&qkv), Mut::whole(&mut ctx));
                attention_by_blocks(&be, &s, b, &lens, 0, scale, q, c).expect("attention");
                bits(&ctx)
            })
            .collect();
        (whole, grouped)
    }

    #[test]
    fn blocks_of_heads_and_rows_give_the_compositions_bits() {
        fn check<F: Float>() {
            // Five rows: whole, and in blocks of 2 (the last one short) and 1.
            let blocks = [(1, 5), (2, 5), (4, 5), (1, 2), (4, 2), (2, 1)];
            let (whole, grouped) = outputs::<F>(&blocks);
            let distinct: std::collections::BTreeSet<u64> = whole.iter().copied().collect();
            assert!(distinct.len() > 100, "{} distinct outputs", distinct.len());
            for ((h, r), out) in blocks.iter().zip(grouped) {
                assert!(
                    out == whole,
                    "{h} heads of {r} rows at a time differ from the composition"
                );
            }
        }
        check::<f32>();
        check::<f64>();
    }
}
