//! The sequence encoder (event embedding, N pre-LN blocks, final LayerNorm, masked mean with
//! the learned empty vector `s_∅`) and the profile encoder (docs/model.md §4.2–§4.4).

use crate::backend::{Backend, EmbMode, EmbTable, Mut, Ref, ValidTokens};
use crate::model::device_batch::DeviceSeq;
use crate::model::layers::{
    one, uninit, uninit_full, zeros, zeros_full, Block, BlockCache, LayerNorm, Linear, SeqShape,
};
use crate::model::params::ParamTable;
use crate::model::InferChunks;
use crate::{Error, Result};

/// Sequence encoder: `e_t = Σ_k Emb_k[cat_tk] + W_num·num_t + b_num + Pos[len−1−t]`,
/// `h ← block_l(h)` for `l < N`, `T = LN_f(h_N)`, `s = masked_mean(T)` (or `s_∅`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeqEncoder {
    /// Event categorical tables (`[vocab_k, d]`).
    pub cat: Vec<EmbTable>,
    /// Numeric projection `[d, E_d]`.
    pub num: Linear,
    /// Offset of the positions `[len_limit, d]`.
    pub pos: usize,
    /// The blocks.
    pub blocks: Vec<Block>,
    /// Final LayerNorm.
    pub ln_f: LayerNorm,
    /// Offset of `s_∅` (`[d]`).
    pub empty: usize,
    /// Width d.
    pub d: usize,
}

/// Final-LN tokens and their masked mean for one stream position (the last block's output,
/// or an auxiliary head's block output).
pub struct Pooled<B: Backend> {
    /// `T = LN_f(h)`, `tokens×d`.
    pub tokens: B::Buf,
    /// LN statistics.
    stats: B::Buf,
    /// `s = masked_mean(T)`, `batch×d`.
    pub s: B::Buf,
}

/// What the encoder's backward needs, plus its outputs.
pub struct EncoderCache<B: Backend> {
    /// Shape of the padded sequences.
    pub shape: SeqShape,
    /// Residual stream `h_0 … h_N` (block inputs, then the last output).
    hs: Vec<B::Buf>,
    blocks: Vec<BlockCache<B>>,
    /// Final output (tokens `T`, sequence vector `s`).
    pub out: Pooled<B>,
    /// Pooled outputs of blocks `0 … N−2` (the student's auxiliary heads), when asked for.
    pub aux: Vec<AuxPooled<B>>,
}

/// An auxiliary head's pooled block output: its tokens `LN_f(h_{l+1})` are given back once
/// pooled (no loss reads them, and the backward needs only the LN statistics).
pub struct AuxPooled<B: Backend> {
    /// LN statistics.
    stats: B::Buf,
    /// `s_l = masked_mean(LN_f(h_{l+1}))`, `batch×d`.
    pub s: B::Buf,
}

impl SeqEncoder {
    /// The encoder of `table` with `blocks` blocks and `heads` heads.
    pub fn from_table(table: &ParamTable, blocks: usize, heads: usize) -> Result<SeqEncoder> {
        let mut cat = Vec::new();
        let mut k = 0;
        while let Ok(e) = table.get(&format!("encoder.embed.cat.{k}.weight")) {
            cat.push(EmbTable {
                offset: e.offset,
                vocab: e.shape[0],
            });
            k += 1;
        }
        let num = Linear::from_table(table, "encoder.embed.num")?;
        Ok(SeqEncoder {
            cat,
            num,
            pos: table.offset("encoder.embed.pos.weight")?,
            blocks: (0..blocks)
                .map(|l| Block::from_table(table, &format!("encoder.blocks.{l}"), heads))
                .collect::<Result<_>>()?,
            ln_f: LayerNorm::from_table(table, "encoder.ln_f")?,
            empty: table.offset("encoder.empty")?,
            d: num.out,
        })
    }

    fn pool<B: Backend>(
        &self,
        be: &B,
        params: &B::Buf,
        sh: SeqShape,
        seq: &DeviceSeq<B>,
        h: &B::Buf,
    ) -> Result<Pooled<B>> {
        let (tokens, stats) = self.ln_f.normed(be, params, sh.tokens(), h)?;
        let mut s = uninit(be, sh.batch * self.d)?;
        let empty = Ref::at(params, self.empty);
        let tr = Ref::whole(&tokens);
        be.masked_mean(
            sh.batch,
            sh.len,
            self.d,
            &seq.lens,
            tr,
            empty,
            Mut::whole(&mut s),
        );
        Ok(Pooled { tokens, stats, s })
    }

    /// The block input `h_0 = e` (`tokens×d`): embeddings, numeric map and positions.
    fn embed<B: Backend>(
        &self,
        be: &B,
        params: &B::Buf,
        rows: usize,
        seq: &DeviceSeq<B>,
    ) -> Result<B::Buf> {
        let n = rows * seq.len;
        // The embedding writes every token (the numeric map then adds to it); without
        // categorical fields the sum starts from zero.
        let mut h = if self.cat.is_empty() {
            zeros_full(be, n * self.d)?
        } else {
            uninit_full(be, n * self.d)?
        };
        if !self.cat.is_empty() {
            let out = Mut::whole(&mut h);
            be.embedding(
                n,
                self.d,
                &self.cat,
                &seq.cat,
                params,
                EmbMode::Sum,
                out,
                self.d,
            );
        }
        let num = Ref::whole(&seq.num);
        self.num
            .forward(be, params, n, num, Mut::whole(&mut h), true);
        let pos = Ref::at(params, self.pos);
        be.add_positions(rows, seq.len, self.d, &seq.lens, pos, Mut::whole(&mut h));
        Ok(h)
    }

    /// The padded shape of `seq` over `rows` rows.
    fn shape<B: Backend>(&self, rows: usize, seq: &DeviceSeq<B>) -> SeqShape {
        SeqShape {
            batch: rows,
            len: seq.len,
            d: self.d,
        }
    }

    /// Forward over `seq`, keeping what the backward needs; with `aux` also pools the
    /// outputs of blocks `0 … N−2`.
    pub fn forward<B: Backend>(
        &self,
        be: &B,
        params: &B::Buf,
        rows: usize,
        seq: &DeviceSeq<B>,
        aux: bool,
    ) -> Result<EncoderCache<B>> {
        let sh = self.shape(rows, seq);
        let mut hs = vec![self.embed(be, params, rows, seq)?];
        let mut caches = Vec::with_capacity(self.blocks.len());
        let mut pooled = Vec::new();
        for (l, block) in self.blocks.iter().enumerate() {
            let (out, cache) = block.forward(be, params, sh, &seq.lens, &hs[l])?;
            caches.push(cache);
            if aux && l + 1 < self.blocks.len() {
                let Pooled { stats, s, .. } = self.pool(be, params, sh, seq, &out)?;
                pooled.push(AuxPooled { stats, s });
            }
            hs.push(out);
        }
        let last = &hs[self.blocks.len()];
        let out = self.pool(be, params, sh, seq, last)?;
        Ok(EncoderCache {
            shape: sh,
            hs,
            blocks: caches,
            out,
            aux: pooled,
        })
    }

    /// Forward over `seq` for inference: the final tokens `T` and `s` only, as
    /// [`SeqEncoder::forward`] computes them ([`Block::infer`] per block, over the numbers
    /// of tokens `chunks` names), keeping no block's activations.
    pub fn infer<B: Backend>(
        &self,
        be: &B,
        params: &B::Buf,
        rows: usize,
        seq: &DeviceSeq<B>,
        chunks: InferChunks,
    ) -> Result<Pooled<B>> {
        let sh = self.shape(rows, seq);
        let mut h = self.embed(be, params, rows, seq)?;
        for block in &self.blocks {
            h = block.infer(be, params, sh, &seq.lens, h, chunks)?;
        }
        self.pool(be, params, sh, seq, &h)
    }

    /// Backward of `pool`: `dh += LN_f'ᵀ·masked_mean'ᵀ·ds (+ dtokens)`.
    #[allow(clippy::too_many_arguments)]
    fn pool_backward<B: Backend>(
        &self,
        be: &B,
        params: &B::Buf,
        grads: &mut B::Buf,
        sh: SeqShape,
        seq: &DeviceSeq<B>,
        h: &B::Buf,
        stats: &B::Buf,
        ds: Option<&B::Buf>,
        dtokens: Option<&B::Buf>,
        dh: &mut B::Buf,
    ) -> Result<()> {
        let n = sh.tokens();
        let mut dt = zeros(be, n * self.d)?;
        if let Some(ds) = ds {
            let dempty = Mut::at(grads, self.empty);
            let (dsr, dtm) = (Ref::whole(ds), Mut::whole(&mut dt));
            be.masked_mean_backward(sh.batch, sh.len, self.d, &seq.lens, dsr, dtm, dempty);
        }
        if let Some(extra) = dtokens {
            be.axpy(
                n * self.d,
                one::<B::F>(),
                Ref::whole(extra),
                Mut::whole(&mut dt),
            );
        }
        self.ln_f.backward(
            be,
            params,
            grads,
            n,
            Ref::whole(h),
            Ref::whole(stats),
            Ref::whole(&dt),
            Mut::whole(dh),
        );
        Ok(())
    }

    /// Backward: `ds` = ∂L/∂s (`batch×d`), `dtokens` = extra ∂L/∂T (`tokens×d`, zero on
    /// padded slots), `daux[l]` = ∂L/∂s_l for the pooled block outputs. Accumulates every
    /// parameter gradient into `grads`. The cache is consumed as the backward goes down:
    /// `T`, `dtokens` and the last output once the final LayerNorm's backward has read them,
    /// each block's output once the auxiliary head above it has, each block's cache once
    /// its backward is done.
    #[allow(clippy::too_many_arguments)]
    pub fn backward<B: Backend>(
        &self,
        be: &B,
        params: &B::Buf,
        grads: &mut B::Buf,
        seq: &DeviceSeq<B>,
        c: EncoderCache<B>,
        ds: &B::Buf,
        dtokens: Option<B::Buf>,
        daux: &[B::Buf],
    ) -> Result<()> {
        let EncoderCache {
            shape: sh,
            mut hs,
            blocks,
            out,
            aux,
        } = c;
        let (n, nb) = (sh.tokens(), self.blocks.len());
        if hs.len() != nb + 1 || blocks.len() != nb {
            return Err(Error::invalid(
                "encoder backward: the cache has another depth",
            ));
        }
        let mut dh = zeros_full(be, n * self.d)?;
        self.pool_backward(
            be,
            params,
            grads,
            sh,
            seq,
            &hs[nb],
            &out.stats,
            Some(ds),
            dtokens.as_ref(),
            &mut dh,
        )?;
        drop((out, dtokens));
        hs.truncate(nb);
        // Block by block down, each cache given back at the end of its turn.
        for (l, bc) in blocks.into_iter().enumerate().rev() {
            // h_{l+1}, block l's output, is still held below the last block: the input of
            // block l+1 (done), read here by the auxiliary head on block l.
            if let (Some(p), Some(d), Some(h)) = (aux.get(l), daux.get(l), hs.get(l + 1)) {
                let st = &p.stats;
                self.pool_backward(be, params, grads, sh, seq, h, st, Some(d), None, &mut dh)?;
            }
            hs.truncate(l + 1);
            self.blocks[l].backward(be, params, grads, sh, &seq.lens, &hs[l], &bc, &mut dh)?;
        }
        if !self.cat.is_empty() {
            let dr = Ref::whole(&dh);
            be.embedding_backward(
                n,
                self.d,
                &self.cat,
                &seq.cat,
                EmbMode::Sum,
                dr,
                self.d,
                grads,
                Some(ValidTokens {
                    lens: &seq.lens,
                    max_len: sh.len,
                }),
            );
        }
        let (num, dr) = (Ref::whole(&seq.num), Ref::whole(&dh));
        self.num
            .backward(be, params, grads, n, num, dr, None, false);
        let dpos = Mut::at(grads, self.pos);
        be.add_positions_backward(sh.batch, sh.len, self.d, &seq.lens, dr, dpos);
        Ok(())
    }
}

/// Profile encoder: `p = GELU(W_p·[num ; Emb_0[c_0] ; … ] + b_p)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProfileEncoder {
    /// Categorical tables (`[vocab_j, d_cat]`).
    pub cat: Vec<EmbTable>,
    /// Projection `[d, F_d + F_c·d_cat]`.
    pub proj: Linear,
    /// Embedding width.
    pub d_cat: usize,
    /// F_d.
    pub f_num: usize,
}

/// What the profile encoder's backward needs, plus its output `p`.
pub struct ProfileCache<B: Backend> {
    x: B::Buf,
    pre: B::Buf,
    /// `p`, `batch×d`.
    pub p: B::Buf,
}

impl ProfileEncoder {
    /// The profile encoder of `table` (`d_cat` embedding width, `f_num` dense fields).
    pub fn from_table(table: &ParamTable, d_cat: usize, f_num: usize) -> Result<Self> {
        let mut cat = Vec::new();
        let mut j = 0;
        while let Ok(e) = table.get(&format!("profile.cat.{j}.weight")) {
            cat.push(EmbTable {
                offset: e.offset,
                vocab: e.shape[0],
            });
            j += 1;
        }
        Ok(ProfileEncoder {
            cat,
            proj: Linear::from_table(table, "profile.proj")?,
            d_cat,
            f_num,
        })
    }

    /// Forward: assembles the input row `[num ; embeddings]` and projects it.
    pub fn forward<B: Backend>(
        &self,
        be: &B,
        params: &B::Buf,
        rows: usize,
        num: &B::Buf,
        ids: &B::Ids,
    ) -> Result<ProfileCache<B>> {
        let (w, d) = (self.proj.inp, self.proj.out);
        let mut x = zeros(be, rows * w)?;
        if self.f_num > 0 {
            let dst = Mut::whole(&mut x);
            be.copy_2d(rows, self.f_num, Ref::whole(num), self.f_num, dst, w, false);
        }
        if !self.cat.is_empty() {
            let out = Mut::at(&mut x, self.f_num);
            be.embedding(
                rows,
                self.d_cat,
                &self.cat,
                ids,
                params,
                EmbMode::Concat,
                out,
                w,
            );
        }
        let mut pre = uninit(be, rows * d)?;
        self.proj.forward(
            be,
            params,
            rows,
            Ref::whole(&x),
            Mut::whole(&mut pre),
            false,
        );
        let mut p = uninit(be, rows * d)?;
        be.gelu(rows * d, Ref::whole(&pre), Mut::whole(&mut p));
        Ok(ProfileCache { x, pre, p })
    }

    /// Backward from `dp` = ∂L/∂p; accumulates into `grads`.
    #[allow(clippy::too_many_arguments)]
    pub fn backward<B: Backend>(
        &self,
        be: &B,
        params: &B::Buf,
        grads: &mut B::Buf,
        rows: usize,
        ids: &B::Ids,
        c: &ProfileCache<B>,
        dp: &B::Buf,
    ) -> Result<()> {
        let (w, d) = (self.proj.inp, self.proj.out);
        let mut dpre = uninit(be, rows * d)?;
        be.gelu_backward(
            rows * d,
            Ref::whole(&c.pre),
            Ref::whole(dp),
            Mut::whole(&mut dpre),
        );
        let mut dx = uninit(be, rows * w)?;
        let want_dx = (!self.cat.is_empty()).then(|| Mut::whole(&mut dx));
        let (x, dpr) = (Ref::whole(&c.x), Ref::whole(&dpre));
        self.proj
            .backward(be, params, grads, rows, x, dpr, want_dx, false);
        if !self.cat.is_empty() {
            let dout = Ref::at(&dx, self.f_num);
            be.embedding_backward(
                rows,
                self.d_cat,
                &self.cat,
                ids,
                EmbMode::Concat,
                dout,
                w,
                grads,
                None,
            );
        }
        Ok(())
    }
}
