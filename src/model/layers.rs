//! The dense building blocks, each a set of parameter offsets with a forward that keeps what
//! its backward needs and a hand-written backward (no autodiff): linear map, LayerNorm,
//! multi-head self-attention with a key-padding mask, and the pre-LN Transformer block.
//!
//! Activations are `rows×width` row-major buffers; sequences are `batch×len×d` with per-row
//! lengths (padded slots hold finite garbage, masked everywhere, and receive zero gradient).

use crate::backend::{Backend, Float, Gemm, Mut, Ref};
pub use crate::model::attention::{Attention, AttentionCache};
use crate::model::params::ParamTable;
use crate::model::InferChunks;
use crate::{Error, Result};

/// The element 1.
pub(crate) fn one<F: Float>() -> F {
    <F as Float>::from_f64(1.0)
}

/// The element 0.
pub(crate) fn zero<F: Float>() -> F {
    <F as Float>::from_f64(0.0)
}

/// A zero-filled activation, gradient or scratch buffer of one step (shorthand for
/// [`Backend::scratch_zeros`]).
pub(crate) fn zeros<B: Backend>(be: &B, n: usize) -> Result<B::Buf> {
    be.scratch_zeros(n)
}

/// Tokens of whole rows an inference pass of a block ([`Block::infer`]) runs at once by
/// default ([`crate::model::InferChunks`]): 2¹⁵, the §8 teacher's batch of 1 024 × 128 in
/// four windows of 256 rows, the student's (1 024 × 32) in one.
pub const INFER_BLOCK_TOKENS: usize = 1 << 15;

/// An activation, gradient or scratch buffer of one step whose every element the caller
/// writes before reading any (shorthand for [`Backend::scratch`]: no zero fill; NaN on the
/// CPU, so that a missed element shows).
pub(crate) fn uninit<B: Backend>(be: &B, n: usize) -> Result<B::Buf> {
    be.scratch(n)
}

/// [`uninit`] in full precision (the backend's element type whatever the run's
/// [`crate::backend::Precision`]): LayerNorm statistics, logits, row weights and loss terms
/// (shorthand for [`Backend::scratch_full`]).
pub(crate) fn uninit_full<B: Backend>(be: &B, n: usize) -> Result<B::Buf> {
    be.scratch_full(n)
}

/// [`zeros`] in full precision (shorthand for [`Backend::scratch_full_zeros`]).
pub(crate) fn zeros_full<B: Backend>(be: &B, n: usize) -> Result<B::Buf> {
    be.scratch_full_zeros(n)
}

/// A linear map `y = x·Wᵀ + b` with `W` stored `[out, in]` at `w` and `b` (`[out]`) at `b`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Linear {
    /// Offset of the weight.
    pub w: usize,
    /// Offset of the bias.
    pub b: usize,
    /// Output width.
    pub out: usize,
    /// Input width.
    pub inp: usize,
}

impl Linear {
    /// The linear map `{prefix}.weight` / `{prefix}.bias` of `table`.
    pub fn from_table(table: &ParamTable, prefix: &str) -> Result<Linear> {
        let w = table.get(&format!("{prefix}.weight"))?;
        let b = table.get(&format!("{prefix}.bias"))?;
        match w.shape[..] {
            [out, inp] => Ok(Linear {
                w: w.offset,
                b: b.offset,
                out,
                inp,
            }),
            _ => Err(Error::invalid(format!("{prefix}.weight is not a matrix"))),
        }
    }

    /// `y = x·Wᵀ + b` on `rows` rows (`x` packed `rows×in`, `y` packed `rows×out`); with
    /// `accumulate` the result is added to `y` (`y += x·Wᵀ + b`, a residual connection).
    pub fn forward<B: Backend>(
        &self,
        be: &B,
        params: &B::Buf,
        rows: usize,
        x: Ref<B::Buf>,
        y: Mut<B::Buf>,
        accumulate: bool,
    ) {
        let (w, b) = (Ref::at(params, self.w), Ref::at(params, self.b));
        be.linear_forward(rows, self.inp, self.out, x, w, b, y, accumulate);
    }

    /// `y = resid + x·Wᵀ + b` on `rows` rows (a residual connection written to a fresh
    /// buffer; `resid` packed `rows×out`).
    #[allow(clippy::too_many_arguments)]
    pub fn forward_residual<B: Backend>(
        &self,
        be: &B,
        params: &B::Buf,
        rows: usize,
        x: Ref<B::Buf>,
        resid: Ref<B::Buf>,
        y: Mut<B::Buf>,
    ) {
        let (w, b) = (Ref::at(params, self.w), Ref::at(params, self.b));
        be.linear_residual(rows, self.inp, self.out, x, w, b, resid, y);
    }

    /// Backward: `dW += dyᵀ·x`, `db += Σ_rows dy`, and when `dx` is given
    /// `dx = dy·W` (or `dx += dy·W` with `accumulate_dx`).
    #[allow(clippy::too_many_arguments)]
    pub fn backward<B: Backend>(
        &self,
        be: &B,
        params: &B::Buf,
        grads: &mut B::Buf,
        rows: usize,
        x: Ref<B::Buf>,
        dy: Ref<B::Buf>,
        dx: Option<Mut<B::Buf>>,
        accumulate_dx: bool,
    ) {
        be.bias_backward(rows, self.out, dy, Mut::at(grads, self.b));
        self.backward_weight_and_input(be, params, grads, rows, x, dy, dx, accumulate_dx);
    }

    /// Backward when `db` has already been accumulated (by the op that produced `dy`, e.g.
    /// [`Backend::gelu_bias_backward`]): `dW += dyᵀ·x` and `dx` as [`Linear::backward`].
    #[allow(clippy::too_many_arguments)]
    pub fn backward_weight_and_input<B: Backend>(
        &self,
        be: &B,
        params: &B::Buf,
        grads: &mut B::Buf,
        rows: usize,
        x: Ref<B::Buf>,
        dy: Ref<B::Buf>,
        dx: Option<Mut<B::Buf>>,
        accumulate_dx: bool,
    ) {
        self.weight_grad(be, grads, rows, dy, x);
        if let Some(dx) = dx {
            self.backward_input(be, params, rows, dy, dx, accumulate_dx);
        }
    }

    /// The input's gradient alone: `dx = dy·W` (or `dx += dy·W` with `accumulate_dx`), the
    /// product [`Linear::backward`] makes last. The same product maps a query `q` (packed
    /// `rows×out`) through the transpose of the weight: `(q·W)·t = q·(W·t)`, the product
    /// with the map's output of `t` less its bias term `q·b`.
    pub fn backward_input<B: Backend>(
        &self,
        be: &B,
        params: &B::Buf,
        rows: usize,
        dy: Ref<B::Buf>,
        dx: Mut<B::Buf>,
        accumulate_dx: bool,
    ) {
        if self.inp > 0 {
            let beta = if accumulate_dx {
                one::<B::F>()
            } else {
                zero::<B::F>()
            };
            let g = Gemm::new(rows, self.inp, self.out, false, false);
            be.gemm(&g, one::<B::F>(), dy, Ref::at(params, self.w), beta, dx);
        }
    }

    /// `dW += aᵀ·b` over `rows` rows (`a` packed `rows×out`, `b` packed `rows×in`): the
    /// weight gradient of the map (`a = dy`, `b = x`) and of its transpose (`a = x`,
    /// `b = dy`).
    fn weight_grad<B: Backend>(
        &self,
        be: &B,
        grads: &mut B::Buf,
        rows: usize,
        a: Ref<B::Buf>,
        b: Ref<B::Buf>,
    ) {
        if self.inp > 0 {
            let g = Gemm::new(self.out, self.inp, rows, true, false);
            be.gemm(
                &g,
                one::<B::F>(),
                a,
                b,
                one::<B::F>(),
                Mut::at(grads, self.w),
            );
        }
    }

    /// Backward of the transposed map `y = x·W` ([`Linear::backward_input`] used forward,
    /// `x` packed `rows×out`): `dW += xᵀ·dy` and `dx = dy·Wᵀ` (`dy` packed `rows×in`, `dx`
    /// packed `rows×out`).
    #[allow(clippy::too_many_arguments)]
    pub fn transpose_backward<B: Backend>(
        &self,
        be: &B,
        params: &B::Buf,
        grads: &mut B::Buf,
        rows: usize,
        x: Ref<B::Buf>,
        dy: Ref<B::Buf>,
        dx: Mut<B::Buf>,
    ) {
        self.weight_grad(be, grads, rows, x, dy);
        let g = Gemm::new(rows, self.out, self.inp, false, true);
        be.gemm(
            &g,
            one::<B::F>(),
            dy,
            Ref::at(params, self.w),
            zero::<B::F>(),
            dx,
        );
    }
}

/// LayerNorm over width `d` with γ at `gb` and β right after it (ε = 1e-5):
/// `y = (x − μ)/√(σ² + ε)·γ + β`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerNorm {
    /// Offset of γ (β follows at `gb + d`).
    pub gb: usize,
    /// Width.
    pub d: usize,
}

impl LayerNorm {
    /// The LayerNorm `{prefix}.weight` / `{prefix}.bias` of `table` (adjacent by design).
    pub fn from_table(table: &ParamTable, prefix: &str) -> Result<LayerNorm> {
        let w = table.get(&format!("{prefix}.weight"))?;
        let b = table.get(&format!("{prefix}.bias"))?;
        let d = w.numel();
        if b.offset != w.offset + d {
            return Err(Error::invalid(format!(
                "{prefix}: LayerNorm scale and shift are not adjacent"
            )));
        }
        Ok(LayerNorm { gb: w.offset, d })
    }

    /// Forward on `rows` rows into `y`, per-row (μ, rstd) into `stats` (`rows×2`).
    pub fn forward<B: Backend>(
        &self,
        be: &B,
        params: &B::Buf,
        rows: usize,
        x: Ref<B::Buf>,
        y: Mut<B::Buf>,
        stats: Mut<B::Buf>,
    ) {
        be.layernorm(rows, self.d, x, Ref::at(params, self.gb), y, stats);
    }

    /// [`LayerNorm::forward`] of the `rows` rows at `x` into a new buffer, in the
    /// activation precision, for inference (the statistics are made and given back).
    pub fn normed_window<B: Backend>(
        &self,
        be: &B,
        params: &B::Buf,
        rows: usize,
        x: Ref<B::Buf>,
    ) -> Result<B::Buf> {
        Ok(self.normed_at(be, params, rows, x)?.0)
    }

    /// [`LayerNorm::forward`] of `h` on `rows` rows into new buffers: the output (in the
    /// activation precision) and the statistics (in full precision).
    pub fn normed<B: Backend>(
        &self,
        be: &B,
        params: &B::Buf,
        rows: usize,
        h: &B::Buf,
    ) -> Result<(B::Buf, B::Buf)> {
        self.normed_at(be, params, rows, Ref::whole(h))
    }

    /// [`LayerNorm::forward`] of the `rows` rows at `x`: the output and the statistics.
    fn normed_at<B: Backend>(
        &self,
        be: &B,
        params: &B::Buf,
        rows: usize,
        x: Ref<B::Buf>,
    ) -> Result<(B::Buf, B::Buf)> {
        let mut y = uninit(be, rows * self.d)?;
        let mut stats = uninit_full(be, rows * 2)?;
        let (ym, st) = (Mut::whole(&mut y), Mut::whole(&mut stats));
        self.forward(be, params, rows, x, ym, st);
        Ok((y, stats))
    }

    /// Backward: `dx += ∂L/∂x` (accumulates into the residual stream's gradient) and
    /// `dγ, dβ +=` into `grads`.
    #[allow(clippy::too_many_arguments)]
    pub fn backward<B: Backend>(
        &self,
        be: &B,
        params: &B::Buf,
        grads: &mut B::Buf,
        rows: usize,
        x: Ref<B::Buf>,
        stats: Ref<B::Buf>,
        dy: Ref<B::Buf>,
        dx: Mut<B::Buf>,
    ) {
        let gb = Ref::at(params, self.gb);
        be.layernorm_backward(rows, self.d, x, gb, stats, dy, dx, Mut::at(grads, self.gb));
    }
}

/// Shape of a padded sequence batch: `batch` rows of `len` slots, width `d`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeqShape {
    /// Rows.
    pub batch: usize,
    /// Padded length (≥ 1).
    pub len: usize,
    /// Width d.
    pub d: usize,
}

impl SeqShape {
    /// Number of token slots `batch·len`.
    pub fn tokens(&self) -> usize {
        self.batch * self.len
    }
}

/// One pre-LN Transformer block:
/// `h_mid = h + out_proj(MHSA(LN1(h)))`, `h_out = h_mid + fc2(GELU(fc1(LN2(h_mid))))`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Block {
    /// LN before attention.
    pub ln1: LayerNorm,
    /// Self-attention.
    pub attn: Attention,
    /// LN before the feed-forward network.
    pub ln2: LayerNorm,
    /// FFN expansion `[4d, d]`.
    pub fc1: Linear,
    /// FFN contraction `[d, 4d]`.
    pub fc2: Linear,
}

/// What [`Block`]'s backward keeps from the forward (its input `h` is kept by the encoder):
/// the attention's cache. The attention's output `h_mid = h + out_proj(C)`, the two
/// LayerNorm outputs, the FFN's pre-activation `f1 = fc1(LN2(h_mid))` and GELU's output are
/// recomputed in the backward from `h` and that cache with the forward's kernels (so with
/// its bits): per block that is three `tokens×d` and two `tokens×4d` buffers fewer held
/// from the forward to the backward, for three LayerNorms (LN2's output is made twice, so
/// that it is not held beside the FFN's `tokens×4d` buffers), one GELU and the `out_proj`
/// and `fc1` products (`10·tokens·d²` FLOPs) more.
pub struct BlockCache<B: Backend> {
    attn: AttentionCache<B>,
}

impl Block {
    /// The block `{prefix}` (`encoder.blocks.{l}`) of `table`.
    pub fn from_table(table: &ParamTable, prefix: &str, heads: usize) -> Result<Block> {
        Ok(Block {
            ln1: LayerNorm::from_table(table, &format!("{prefix}.ln1"))?,
            attn: Attention {
                in_proj: Linear::from_table(table, &format!("{prefix}.attn.in_proj"))?,
                out_proj: Linear::from_table(table, &format!("{prefix}.attn.out_proj"))?,
                heads,
            },
            ln2: LayerNorm::from_table(table, &format!("{prefix}.ln2"))?,
            fc1: Linear::from_table(table, &format!("{prefix}.ffn.fc1"))?,
            fc2: Linear::from_table(table, &format!("{prefix}.ffn.fc2"))?,
        })
    }

    /// Forward of `h` (`tokens×d`), keeping what the backward needs: returns the output
    /// `h_out` and the cache.
    pub fn forward<B: Backend>(
        &self,
        be: &B,
        params: &B::Buf,
        sh: SeqShape,
        lens: &B::Ids,
        h: &B::Buf,
    ) -> Result<(B::Buf, BlockCache<B>)> {
        let (n, d) = (sh.tokens(), sh.d);
        let (xn1, _) = self.ln1.normed(be, params, n, h)?;
        let (h_mid, attn) = self
            .attn
            .forward(be, params, sh, lens, xn1, Ref::whole(h))?;
        let (xn2, _) = self.ln2.normed(be, params, n, &h_mid)?;
        // f1, then GELU(f1) over it: the backward recomputes f1.
        let mut g = uninit(be, n * 4 * d)?;
        self.fc1
            .forward(be, params, n, Ref::whole(&xn2), Mut::whole(&mut g), false);
        drop(xn2);
        be.gelu_in_place(n * 4 * d, Mut::whole(&mut g));
        let mut out = uninit_full(be, n * d)?;
        let hm = Ref::whole(&h_mid);
        self.fc2
            .forward_residual(be, params, n, Ref::whole(&g), hm, Mut::whole(&mut out));
        let cache = BlockCache { attn };
        Ok((out, cache))
    }

    /// Forward of `h` for inference, in place: `h` becomes the output `h_out` of
    /// [`Block::forward`] (the same operations, so the same bits where a product's rounding
    /// does not depend on its number of rows, as on the CPU), keeping nothing. The batch
    /// runs `chunks.block_tokens` tokens of whole rows at a time (at least one row: rows
    /// attend only to themselves): each window's LayerNorm outputs, Q/K/V, context and
    /// feed-forward hidden layer (over `chunks.ffn_tokens` tokens at a time, GELU in place)
    /// are made and given back before the next window's, and both residual connections add
    /// into `h`'s rows, so beside `h` a pass holds one window's intermediates.
    #[allow(clippy::too_many_arguments)]
    pub fn infer<B: Backend>(
        &self,
        be: &B,
        params: &B::Buf,
        sh: SeqShape,
        lens: &B::Ids,
        mut h: B::Buf,
        chunks: InferChunks,
    ) -> Result<B::Buf> {
        let d = sh.d;
        let rows = (chunks.block_tokens / sh.len.max(1)).clamp(1, sh.batch.max(1));
        for r0 in (0..sh.batch).step_by(rows) {
            let part = SeqShape {
                batch: rows.min(sh.batch - r0),
                ..sh
            };
            let (t0, n) = (r0 * sh.len, part.tokens());
            let xn1 = self.ln1.normed_window(be, params, n, Ref::at(&h, t0 * d))?;
            let hw = Mut::at(&mut h, t0 * d);
            self.attn.infer_into(be, params, part, lens, r0, xn1, hw)?;
            let xn2 = self.ln2.normed_window(be, params, n, Ref::at(&h, t0 * d))?;
            let step = chunks.ffn_tokens.max(1);
            for c0 in (0..n).step_by(step) {
                let c = step.min(n - c0);
                let mut g = uninit(be, c * 4 * d)?;
                let x = Ref::at(&xn2, c0 * d);
                self.fc1
                    .forward(be, params, c, x, Mut::whole(&mut g), false);
                be.gelu_in_place(c * 4 * d, Mut::whole(&mut g));
                let y = Mut::at(&mut h, (t0 + c0) * d);
                self.fc2.forward(be, params, c, Ref::whole(&g), y, true);
            }
        }
        Ok(h)
    }

    /// Backward in place: `dh` holds ∂L/∂h_out on entry and ∂L/∂h (the block input `h`)
    /// on return; parameter gradients accumulate into `grads`.
    #[allow(clippy::too_many_arguments)]
    pub fn backward<B: Backend>(
        &self,
        be: &B,
        params: &B::Buf,
        grads: &mut B::Buf,
        sh: SeqShape,
        lens: &B::Ids,
        h: &B::Buf,
        c: &BlockCache<B>,
        dh: &mut B::Buf,
    ) -> Result<()> {
        let (n, d) = (sh.tokens(), sh.d);
        // The FFN's input and pre-activation again, then two `tokens×4d` buffers at a time:
        // f1 with g for fc2's weight gradient, then f1 with dg, turned into df1 in place.
        // The FFN's input is made a second time for fc1's gradients rather than held beside
        // them (a LayerNorm instead of a `tokens×d` buffer at the block's peak).
        let h_mid = self.attn.output(be, params, sh, &c.attn, Ref::whole(h))?;
        let (xn2, _) = self.ln2.normed(be, params, n, &h_mid)?;
        let mut f1 = uninit(be, n * 4 * d)?;
        self.fc1
            .forward(be, params, n, Ref::whole(&xn2), Mut::whole(&mut f1), false);
        drop(xn2);
        let mut g = uninit(be, n * 4 * d)?;
        be.gelu(n * 4 * d, Ref::whole(&f1), Mut::whole(&mut g));
        self.fc2.backward(
            be,
            params,
            grads,
            n,
            Ref::whole(&g),
            Ref::whole(dh),
            None,
            false,
        );
        drop(g);
        let mut df1 = uninit(be, n * 4 * d)?;
        self.fc2
            .backward_input(be, params, n, Ref::whole(dh), Mut::whole(&mut df1), false);
        be.gelu_bias_backward(
            n,
            4 * d,
            Ref::whole(&f1),
            Mut::whole(&mut df1),
            Mut::at(grads, self.fc1.b),
        );
        drop(f1);
        let (xn2, stats2) = self.ln2.normed(be, params, n, &h_mid)?;
        let mut dxn2 = uninit(be, n * d)?;
        self.fc1.backward_weight_and_input(
            be,
            params,
            grads,
            n,
            Ref::whole(&xn2),
            Ref::whole(&df1),
            Some(Mut::whole(&mut dxn2)),
            false,
        );
        drop((df1, xn2));
        self.ln2.backward(
            be,
            params,
            grads,
            n,
            Ref::whole(&h_mid),
            Ref::whole(&stats2),
            Ref::whole(&dxn2),
            Mut::whole(dh),
        );
        drop((dxn2, h_mid));
        let (xn1, stats1) = self.ln1.normed(be, params, n, h)?;
        let dxn1 = self.attn.backward(
            be,
            params,
            grads,
            sh,
            lens,
            Ref::whole(&xn1),
            &c.attn,
            Ref::whole(dh),
        )?;
        drop(xn1);
        self.ln1.backward(
            be,
            params,
            grads,
            n,
            Ref::whole(h),
            Ref::whole(&stats1),
            Ref::whole(&dxn1),
            Mut::whole(dh),
        );
        Ok(())
    }
}
