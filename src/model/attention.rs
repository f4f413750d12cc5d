//! Multi-head self-attention with a key-padding mask, forward and hand-written backward:
//! the fused Q/K/V projection, one [`Backend::attention`] call (the scores, the masked
//! softmax and the product with V over heads × batch rows; composed from primitives by
//! default, fused where a backend offers it), and the output projection on the residual
//! stream.

use crate::backend::{AttnShape, Backend, Float, Mut, Ref};
use crate::model::layers::{uninit, uninit_full, Linear, SeqShape};
use crate::Result;

/// Multi-head self-attention with a key-padding mask:
/// `[Q K V] = x·W_inᵀ + b_in`, per head `P = softmax_mask(Q_h·K_hᵀ/√dh)`, `C_h = P·V_h`,
/// `out = C·W_outᵀ + b_out`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attention {
    /// The fused Q/K/V projection `[3d, d]`.
    pub in_proj: Linear,
    /// The output projection `[d, d]`.
    pub out_proj: Linear,
    /// Number of heads.
    pub heads: usize,
}

/// What [`Attention`]'s backward needs besides its input (which the block recomputes, and
/// from it the projected `[Q K V]`): what the attention saved for its backward, and the
/// context `C`.
pub struct AttentionCache<B: Backend> {
    saved: B::Buf,
    ctx: B::Buf,
}

impl Attention {
    /// The shape of the attention call on `sh`.
    fn shape(&self, sh: SeqShape) -> AttnShape {
        AttnShape {
            batch: sh.batch,
            len: sh.len,
            heads: self.heads,
            d: sh.d,
        }
    }

    /// The score scale `1/√dh`.
    fn scale<F: Float>(&self, d: usize) -> F {
        <F as Float>::from_f64(1.0 / ((d / self.heads) as f64).sqrt())
    }

    /// Forward: `x` is the LayerNorm output (`tokens×d`); returns
    /// `out = resid + out_proj(MHSA(x))` (`resid` is the residual stream, `tokens×d`, and
    /// `out` is in full precision like it) and what the backward needs. `x` is given back
    /// once projected and `[Q K V]` once the attention has read it: the backward takes `x`
    /// again (the block recomputes it, which costs a LayerNorm instead of holding a
    /// `tokens×d` buffer per block from the forward to the backward) and projects it again
    /// (a product instead of holding `tokens×3d`). `lens` masks the keys.
    pub fn forward<B: Backend>(
        &self,
        be: &B,
        params: &B::Buf,
        sh: SeqShape,
        lens: &B::Ids,
        x: B::Buf,
        resid: Ref<B::Buf>,
    ) -> Result<(B::Buf, AttentionCache<B>)> {
        let (n, s) = (sh.tokens(), self.shape(sh));
        let qkv = self.project_in(be, params, n, Ref::whole(&x))?;
        drop(x);
        let mut ctx = uninit(be, n * sh.d)?;
        let mut saved = be.attention_saved(&s)?;
        be.attention(
            &s,
            lens,
            self.scale::<B::F>(sh.d),
            Ref::whole(&qkv),
            Mut::whole(&mut ctx),
            Mut::whole(&mut saved),
        );
        drop(qkv);
        let out = self.project(be, params, n, &ctx, resid)?;
        Ok((out, AttentionCache { saved, ctx }))
    }

    /// [`Attention::forward`] for inference, in place on the residual stream: `h +=
    /// out_proj(MHSA(x))` (the same operations as `resid + out_proj(…)`, so the same bits
    /// on the CPU), through [`Backend::attention_infer`], which saves nothing. `sh` may be
    /// a window of a batch's rows, the first being row `first_row` of `lens`. `x` is given
    /// back once projected, and `[Q K V]` before the output projection, so that at most
    /// `h`, `[Q K V]` and the context are held at once.
    #[allow(clippy::too_many_arguments)]
    pub fn infer_into<B: Backend>(
        &self,
        be: &B,
        params: &B::Buf,
        sh: SeqShape,
        lens: &B::Ids,
        first_row: usize,
        x: B::Buf,
        h: Mut<B::Buf>,
    ) -> Result<()> {
        let (n, s) = (sh.tokens(), self.shape(sh));
        let qkv = self.project_in(be, params, n, Ref::whole(&x))?;
        drop(x);
        let mut ctx = uninit(be, n * sh.d)?;
        let (q, c) = (Ref::whole(&qkv), Mut::whole(&mut ctx));
        be.attention_infer(&s, lens, first_row, self.scale::<B::F>(sh.d), q, c)?;
        drop(qkv);
        self.out_proj
            .forward(be, params, n, Ref::whole(&ctx), h, true);
        Ok(())
    }

    /// `[Q K V] = x·W_inᵀ + b_in` over `n` tokens, in the activation precision.
    fn project_in<B: Backend>(
        &self,
        be: &B,
        params: &B::Buf,
        n: usize,
        x: Ref<B::Buf>,
    ) -> Result<B::Buf> {
        let mut qkv = uninit(be, n * self.in_proj.out)?;
        self.in_proj
            .forward(be, params, n, x, Mut::whole(&mut qkv), false);
        Ok(qkv)
    }

    /// `resid + out_proj(ctx)` over `n` tokens, in full precision.
    fn project<B: Backend>(
        &self,
        be: &B,
        params: &B::Buf,
        n: usize,
        ctx: &B::Buf,
        resid: Ref<B::Buf>,
    ) -> Result<B::Buf> {
        let mut out = uninit_full(be, n * self.out_proj.out)?;
        let c = Ref::whole(ctx);
        self.out_proj
            .forward_residual(be, params, n, c, resid, Mut::whole(&mut out));
        Ok(out)
    }

    /// [`Attention::forward`]'s output again from its cache and the same `resid`: the same
    /// product, so the same bits (the block backward recomputes `h_mid` rather than keep it).
    pub fn output<B: Backend>(
        &self,
        be: &B,
        params: &B::Buf,
        sh: SeqShape,
        cache: &AttentionCache<B>,
        resid: Ref<B::Buf>,
    ) -> Result<B::Buf> {
        self.project(be, params, sh.tokens(), &cache.ctx, resid)
    }

    /// Backward: `x` is the forward's input (the LayerNorm output, recomputed by the caller),
    /// `dout` the gradient of the attention output (the residual stream's); returns `dx`
    /// (`tokens×d`, the gradient of the LayerNorm output) and accumulates every parameter
    /// gradient into `grads`. `[Q K V]` is projected from `x` again, with the forward's
    /// product, so it is the forward's bits (`6·tokens·d²` FLOPs).
    #[allow(clippy::too_many_arguments)]
    pub fn backward<B: Backend>(
        &self,
        be: &B,
        params: &B::Buf,
        grads: &mut B::Buf,
        sh: SeqShape,
        lens: &B::Ids,
        x: Ref<B::Buf>,
        cache: &AttentionCache<B>,
        dout: Ref<B::Buf>,
    ) -> Result<B::Buf> {
        let (n, d) = (sh.tokens(), sh.d);
        let mut dctx = uninit(be, n * d)?;
        let ctx = Ref::whole(&cache.ctx);
        self.out_proj.backward(
            be,
            params,
            grads,
            n,
            ctx,
            dout,
            Some(Mut::whole(&mut dctx)),
            false,
        );
        let qkv = self.project_in(be, params, n, x)?;
        let mut dqkv = uninit(be, n * 3 * d)?;
        be.attention_backward(
            &self.shape(sh),
            lens,
            self.scale::<B::F>(d),
            Ref::whole(&qkv),
            Ref::whole(&cache.saved),
            Ref::whole(&dctx),
            Mut::whole(&mut dqkv),
        )?;
        drop((dctx, qkv));
        let mut dx = uninit(be, n * d)?;
        self.in_proj.backward(
            be,
            params,
            grads,
            n,
            x,
            Ref::whole(&dqkv),
            Some(Mut::whole(&mut dx)),
            false,
        );
        Ok(dx)
    }
}
