//! Multi-head self-attention with a key-padding mask, forward and hand-written backward,
//! the per-head products as strided-batched GEMMs over the rows of the batch.

use crate::backend::{Backend, Float, Gemm, Mut, Ref};
use crate::model::layers::{one, zero, zeros, Linear, SeqShape};
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

/// What [`Attention`]'s backward needs.
pub struct AttentionCache<B: Backend> {
    qkv: B::Buf,
    probs: B::Buf,
    ctx: B::Buf,
}

impl Attention {
    fn dh(&self, d: usize) -> usize {
        d / self.heads
    }

    /// The score scale `1/√dh`.
    fn scale<F: Float>(&self, d: usize) -> F {
        <F as Float>::from_f64(1.0 / (self.dh(d) as f64).sqrt())
    }

    /// Forward: `x` is the LayerNorm output (`tokens×d`); adds `out_proj(MHSA(x))` to
    /// `resid` (the residual stream). `lens` masks the keys.
    pub fn forward<B: Backend>(
        &self,
        be: &B,
        params: &B::Buf,
        sh: SeqShape,
        lens: &B::Ids,
        x: Ref<B::Buf>,
        resid: Mut<B::Buf>,
    ) -> Result<AttentionCache<B>> {
        let (n, d, l, h) = (sh.tokens(), sh.d, sh.len, self.heads);
        let dh = self.dh(d);
        let mut qkv = zeros(be, n * 3 * d)?;
        self.in_proj
            .forward(be, params, n, x, Mut::whole(&mut qkv), false);
        let mut probs = zeros(be, sh.batch * h * l * l)?;
        for head in 0..h {
            // S[b,h,i,j] = Σ_p Q[b,i,h·dh+p]·K[b,j,h·dh+p]
            let g = Gemm {
                m: l,
                n: l,
                k: dh,
                trans_a: false,
                trans_b: true,
                lda: 3 * d,
                ldb: 3 * d,
                ldc: l,
                batch: sh.batch,
                stride_a: l * 3 * d,
                stride_b: l * 3 * d,
                stride_c: h * l * l,
            };
            let q = Ref::at(&qkv, head * dh);
            let k = Ref::at(&qkv, d + head * dh);
            be.gemm(
                &g,
                one::<B::F>(),
                q,
                k,
                zero::<B::F>(),
                Mut::at(&mut probs, head * l * l),
            );
        }
        let scale = self.scale::<B::F>(d);
        be.masked_softmax(sh.batch, h, l, l, lens, scale, Mut::whole(&mut probs));
        let mut ctx = zeros(be, n * d)?;
        for head in 0..h {
            // C[b,i,h·dh+p] = Σ_j P[b,h,i,j]·V[b,j,h·dh+p]
            let g = Gemm {
                m: l,
                n: dh,
                k: l,
                trans_a: false,
                trans_b: false,
                lda: l,
                ldb: 3 * d,
                ldc: d,
                batch: sh.batch,
                stride_a: h * l * l,
                stride_b: l * 3 * d,
                stride_c: l * d,
            };
            let p = Ref::at(&probs, head * l * l);
            let v = Ref::at(&qkv, 2 * d + head * dh);
            be.gemm(
                &g,
                one::<B::F>(),
                p,
                v,
                zero::<B::F>(),
                Mut::at(&mut ctx, head * dh),
            );
        }
        self.out_proj
            .forward(be, params, n, Ref::whole(&ctx), resid, true);
        Ok(AttentionCache { qkv, probs, ctx })
    }

    /// Backward: `dout` is the gradient of the attention output (the residual stream's);
    /// returns `dx` (`tokens×d`, the gradient of the LayerNorm output) and accumulates every
    /// parameter gradient into `grads`.
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
        let (n, d, l, h) = (sh.tokens(), sh.d, sh.len, self.heads);
        let dh = self.dh(d);
        let (one, zero) = (one::<B::F>(), zero::<B::F>());
        let mut dctx = zeros(be, n * d)?;
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
        let mut dprobs = zeros(be, sh.batch * h * l * l)?;
        let mut dqkv = zeros(be, n * 3 * d)?;
        for head in 0..h {
            // dP[b,h,i,j] = Σ_p dC[b,i,h·dh+p]·V[b,j,h·dh+p]
            let g = Gemm {
                m: l,
                n: l,
                k: dh,
                trans_a: false,
                trans_b: true,
                lda: d,
                ldb: 3 * d,
                ldc: l,
                batch: sh.batch,
                stride_a: l * d,
                stride_b: l * 3 * d,
                stride_c: h * l * l,
            };
            let dc = Ref::at(&dctx, head * dh);
            let v = Ref::at(&cache.qkv, 2 * d + head * dh);
            be.gemm(&g, one, dc, v, zero, Mut::at(&mut dprobs, head * l * l));
            // dV[b,j,h·dh+p] = Σ_i P[b,h,i,j]·dC[b,i,h·dh+p]
            let g = Gemm {
                m: l,
                n: dh,
                k: l,
                trans_a: true,
                trans_b: false,
                lda: l,
                ldb: d,
                ldc: 3 * d,
                batch: sh.batch,
                stride_a: h * l * l,
                stride_b: l * d,
                stride_c: l * 3 * d,
            };
            let p = Ref::at(&cache.probs, head * l * l);
            be.gemm(&g, one, p, dc, zero, Mut::at(&mut dqkv, 2 * d + head * dh));
        }
        let mut dscores = zeros(be, sh.batch * h * l * l)?;
        let scale = self.scale::<B::F>(d);
        be.masked_softmax_backward(
            sh.batch,
            h,
            l,
            l,
            lens,
            scale,
            Ref::whole(&cache.probs),
            Ref::whole(&dprobs),
            Mut::whole(&mut dscores),
        );
        for head in 0..h {
            let ds = Ref::at(&dscores, head * l * l);
            // dQ[b,i,:] = Σ_j dS[b,h,i,j]·K[b,j,:];  dK[b,j,:] = Σ_i dS[b,h,i,j]·Q[b,i,:]
            for (trans_a, src, dst) in [(false, d, 0), (true, 0, d)] {
                let g = Gemm {
                    m: l,
                    n: dh,
                    k: l,
                    trans_a,
                    trans_b: false,
                    lda: l,
                    ldb: 3 * d,
                    ldc: 3 * d,
                    batch: sh.batch,
                    stride_a: h * l * l,
                    stride_b: l * 3 * d,
                    stride_c: l * 3 * d,
                };
                let b = Ref::at(&cache.qkv, src + head * dh);
                be.gemm(&g, one, ds, b, zero, Mut::at(&mut dqkv, dst + head * dh));
            }
        }
        let mut dx = zeros(be, n * d)?;
        let dq = Ref::whole(&dqkv);
        self.in_proj.backward(
            be,
            params,
            grads,
            n,
            x,
            dq,
            Some(Mut::whole(&mut dx)),
            false,
        );
        Ok(dx)
    }
}
