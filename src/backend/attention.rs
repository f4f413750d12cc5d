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

    /// The heads as the outer batch of an attention product: head `h`'s A, B and C
    /// matrices start `h·stride_*` elements after head 0's.
    fn heads(&self, stride_a: usize, stride_b: usize, stride_c: usize) -> Outer {
        Outer {
            count: self.heads,
            stride_a,
            stride_b,
            stride_c,
        }
    }

    /// The product per (head, row) `[len × len] = [len × dh]·[len × dh]ᵀ` of two column
    /// blocks of row stride `lda` and `ldb` (scores `Q·Kᵀ`, or `dP = dC·Vᵀ`), into the
    /// probabilities' layout, as one [`Backend::gemm_outer`] call over heads × rows.
    pub fn scores_product(&self, lda: usize, ldb: usize) -> (Gemm, Outer) {
        let (l, dh, h) = (self.len, self.dh(), self.heads);
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
        (g, self.heads(dh, dh, l * l))
    }

    /// The product per (head, row) `[len × dh] = op(P)·[len × dh]` with `P` in the
    /// probabilities' layout (`Pᵀ` when `trans`), the right factor of row stride `ldb`, the
    /// result of row stride `ldc` (`C = P·V`, `dV = Pᵀ·dC`, `dQ = dS·K`, `dK = dSᵀ·Q`), as
    /// one [`Backend::gemm_outer`] call over heads × rows.
    pub fn probs_product(&self, trans: bool, ldb: usize, ldc: usize) -> (Gemm, Outer) {
        let (l, dh, h) = (self.len, self.dh(), self.heads);
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
        (g, self.heads(l * l, dh, dh))
    }
}

/// [`Backend::attention`] from the primitives: the scores as one [`Backend::gemm_outer`]
/// over heads × rows into `saved` (`probs_len` elements), [`Backend::masked_softmax`] in
/// place, then `C = P·V`. `saved` keeps the probabilities.
#[allow(clippy::too_many_arguments)]
pub fn attention_composed<B: Backend + ?Sized>(
    be: &B,
    s: &AttnShape,
    lens: &B::Ids,
    scale: B::F,
    qkv: Ref<B::Buf>,
    ctx: Mut<B::Buf>,
    mut saved: Mut<B::Buf>,
) {
    let (one, zero) = (B::F::from_f64(1.0), B::F::from_f64(0.0));
    let d = s.d;
    let (g, heads) = s.scores_product(3 * d, 3 * d);
    let k = Ref::at(qkv.buf, qkv.off + d);
    be.gemm_outer(&g, &heads, one, qkv, k, zero, saved.reborrow());
    be.masked_softmax(
        s.batch,
        s.heads,
        s.len,
        s.len,
        lens,
        scale,
        saved.reborrow(),
    );
    let (g, heads) = s.probs_product(false, 3 * d, d);
    let p = Ref::at(&*saved.buf, saved.off);
    let v = Ref::at(qkv.buf, qkv.off + 2 * d);
    be.gemm_outer(&g, &heads, one, p, v, zero, ctx);
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
