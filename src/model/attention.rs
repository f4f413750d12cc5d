//! Multi-head self-attention with a key-padding mask, forward and hand-written backward.
//! Q, K and V stay where the fused input projection writes them (`tokens×3d`, head `h` in
//! columns `h·dh ..`); each attention product is one [`Backend::gemm_outer`] call over
//! heads × batch rows (heads outer, rows inner), which CUDA runs as one batched GEMM.

use crate::backend::{Backend, Float, Gemm, Mut, Outer, Ref};
use crate::model::layers::{one, uninit, zero, Linear, SeqShape};
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

/// The heads as the outer batch of an attention product: head `h`'s A, B and C matrices
/// start `h·stride_*` elements after head 0's.
fn heads_outer(heads: usize, stride_a: usize, stride_b: usize, stride_c: usize) -> Outer {
    Outer {
        count: heads,
        stride_a,
        stride_b,
        stride_c,
    }
}

impl Attention {
    fn dh(&self, d: usize) -> usize {
        d / self.heads
    }

    /// The score scale `1/√dh`.
    fn scale<F: Float>(&self, d: usize) -> F {
        <F as Float>::from_f64(1.0 / (self.dh(d) as f64).sqrt())
    }

    /// Forward: `x` is the LayerNorm output (`tokens×d`); writes
    /// `out = resid + out_proj(MHSA(x))` (`resid` is the residual stream). `lens` masks the
    /// keys.
    #[allow(clippy::too_many_arguments)]
    pub fn forward<B: Backend>(
        &self,
        be: &B,
        params: &B::Buf,
        sh: SeqShape,
        lens: &B::Ids,
        x: Ref<B::Buf>,
        resid: Ref<B::Buf>,
        out: Mut<B::Buf>,
    ) -> Result<AttentionCache<B>> {
        let (n, d, l, h) = (sh.tokens(), sh.d, sh.len, self.heads);
        let dh = self.dh(d);
        let mut qkv = uninit(be, n * 3 * d)?;
        self.in_proj
            .forward(be, params, n, x, Mut::whole(&mut qkv), false);
        let mut probs = uninit(be, sh.batch * h * l * l)?;
        // S[b,h,i,j] = Σ_p Q[b,i,h·dh+p]·K[b,j,h·dh+p], one product per (head, row).
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
        let heads = heads_outer(h, dh, dh, l * l);
        be.gemm_outer(
            &g,
            &heads,
            one::<B::F>(),
            Ref::whole(&qkv),
            Ref::at(&qkv, d),
            zero::<B::F>(),
            Mut::whole(&mut probs),
        );
        let scale = self.scale::<B::F>(d);
        be.masked_softmax(sh.batch, h, l, l, lens, scale, Mut::whole(&mut probs));
        let mut ctx = uninit(be, n * d)?;
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
        let heads = heads_outer(h, l * l, dh, dh);
        be.gemm_outer(
            &g,
            &heads,
            one::<B::F>(),
            Ref::whole(&probs),
            Ref::at(&qkv, 2 * d),
            zero::<B::F>(),
            Mut::whole(&mut ctx),
        );
        self.out_proj
            .forward_residual(be, params, n, Ref::whole(&ctx), resid, out);
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
        let mut dprobs = uninit(be, sh.batch * h * l * l)?;
        let mut dqkv = uninit(be, n * 3 * d)?;
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
        let dc = Ref::whole(&dctx);
        let v = Ref::at(&cache.qkv, 2 * d);
        let heads = heads_outer(h, dh, dh, l * l);
        be.gemm_outer(&g, &heads, one, dc, v, zero, Mut::whole(&mut dprobs));
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
        let p = Ref::whole(&cache.probs);
        let heads = heads_outer(h, l * l, dh, dh);
        be.gemm_outer(&g, &heads, one, p, dc, zero, Mut::at(&mut dqkv, 2 * d));
        let mut dscores = uninit(be, sh.batch * h * l * l)?;
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
        // dQ[b,i,:] = Σ_j dS[b,h,i,j]·K[b,j,:];  dK[b,j,:] = Σ_i dS[b,h,i,j]·Q[b,i,:]
        let ds = Ref::whole(&dscores);
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
            let b = Ref::at(&cache.qkv, src);
            let heads = heads_outer(h, l * l, dh, dh);
            be.gemm_outer(&g, &heads, one, ds, b, zero, Mut::at(&mut dqkv, dst));
        }
        let mut dx = uninit(be, n * d)?;
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
