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
/// (unless one head alone has more): 2²⁴, 64 MiB in f32. The §8 teacher (batch 1 024, L 128,
/// 4 heads: 2²⁴ per head) runs one head at a time, the student (L 32) all four at once.
pub const INFER_ATTN_ELEMS: usize = 1 << 24;

/// How many consecutive heads [`attention_infer_composed`] runs at once: the most that
/// divide `heads` and whose probabilities fit [`INFER_ATTN_ELEMS`], at least 1.
pub fn infer_head_group(s: &AttnShape) -> usize {
    let per_head = s.batch * s.len * s.len;
    (1..=s.heads)
        .rev()
        .find(|&g| s.heads.is_multiple_of(g) && g * per_head <= INFER_ATTN_ELEMS)
        .unwrap_or(1)
}

/// [`Backend::attention_infer`] from the primitives: [`attention_composed`]'s operations
/// over [`infer_head_group`] heads at a time ([`attention_by_head_groups`]), so an
/// inference pass never holds the whole `batch·heads·len²`.
pub fn attention_infer_composed<B: Backend + ?Sized>(
    be: &B,
    s: &AttnShape,
    lens: &B::Ids,
    scale: B::F,
    qkv: Ref<B::Buf>,
    ctx: Mut<B::Buf>,
) -> Result<()> {
    attention_by_head_groups(be, s, infer_head_group(s), lens, scale, qkv, ctx)
}

/// [`attention_composed`]'s output, `group` consecutive heads at a time (`group` divides
/// `s.heads`) in one scratch buffer of `batch·group·len²` probabilities. Each product and
/// softmax row is the one [`attention_composed`] computes for the same head.
#[allow(clippy::too_many_arguments)]
fn attention_by_head_groups<B: Backend + ?Sized>(
    be: &B,
    s: &AttnShape,
    group: usize,
    lens: &B::Ids,
    scale: B::F,
    qkv: Ref<B::Buf>,
    mut ctx: Mut<B::Buf>,
) -> Result<()> {
    let mut probs = be.scratch(s.batch * group * s.len * s.len)?;
    for h0 in (0..s.heads).step_by(group) {
        let p = Mut::whole(&mut probs);
        heads_forward(be, s, h0, group, lens, scale, qkv, ctx.reborrow(), p);
    }
    Ok(())
}

/// The composition for heads `h0 .. h0 + group`: the scores as one
/// [`Backend::gemm_outer`] over those heads × rows into `probs` (laid out
/// `[batch, group, len, len]`), [`Backend::masked_softmax`] in place, then their columns of
/// `ctx` as `P·V`.
#[allow(clippy::too_many_arguments)]
fn heads_forward<B: Backend + ?Sized>(
    be: &B,
    s: &AttnShape,
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
    be.masked_softmax(s.batch, group, s.len, s.len, lens, scale, p);
    let (g, heads) = s.probs_product_of(group, false, 3 * d, d);
    let p = Ref::at(&*probs.buf, probs.off);
    let c = Mut::at(ctx.buf, ctx.off + h0 * dh);
    be.gemm_outer(&g, &heads, one, p, at(2 * d), zero, c);
}

/// [`Backend::attention`] from the primitives: every head at once ([`heads_forward`]) with
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
    heads_forward(be, s, 0, s.heads, lens, scale, qkv, ctx, saved);
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

    /// The §8 shapes take the heads one at a time (teacher) or all at once (student).
    #[test]
    fn head_groups_fit_the_budget() {
        let shape = |batch, len| AttnShape {
            batch,
            len,
            heads: 4,
            d: 128,
        };
        assert_eq!(infer_head_group(&shape(1024, 128)), 1);
        assert_eq!(infer_head_group(&shape(1024, 32)), 4);
        assert_eq!(infer_head_group(&shape(512, 128)), 2);
        // One head above the budget still runs, alone.
        assert_eq!(infer_head_group(&shape(4096, 128)), 1);
    }

    /// The outputs of [`attention_composed`] and of every head grouping, as bit patterns,
    /// after poisoning each output with NaN (every slot must be written, padded queries and
    /// rows without keys included).
    fn outputs<F: Float>(group_sizes: &[usize]) -> (Vec<u64>, Vec<Vec<u64>>) {
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
        let grouped = group_sizes
            .iter()
            .map(|&g| {
                let mut ctx = be.upload(&nan).expect("upload");
                let (q, c) = (Ref::whole(&qkv), Mut::whole(&mut ctx));
                attention_by_head_groups(&be, &s, g, &lens, scale, q, c).expect("attention");
                bits(&ctx)
            })
            .collect();
        (whole, grouped)
    }

    #[test]
    fn head_groups_give_the_compositions_bits() {
        fn check<F: Float>() {
            let (whole, grouped) = outputs::<F>(&[1, 2, 4]);
            let distinct: std::collections::BTreeSet<u64> = whole.iter().copied().collect();
            assert!(distinct.len() > 100, "{} distinct outputs", distinct.len());
            for (g, out) in [1, 2, 4].iter().zip(grouped) {
                assert!(
                    out == whole,
                    "{g} heads at a time differ from the composition"
                );
            }
        }
        check::<f32>();
        check::<f64>();
    }
}
