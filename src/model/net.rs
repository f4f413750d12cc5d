//! The two networks (docs/model.md §4), one type with a [`Role`]: encoders, fusion
//! `H = GELU(W_f·[s ; p] + b_f)`, head `z = w·H + c`, and for the student the auxiliary heads
//! `z_l = u_l·[s_l ; p] + c_l` and the coarse/fine projections used by the losses.

use crate::backend::{Backend, Mut, Ref};
use crate::model::config::{ModelConfig, Role};
use crate::model::device_batch::{DeviceBatch, DeviceSeq};
use crate::model::encoder::{EncoderCache, ProfileCache, ProfileEncoder, SeqEncoder};
use crate::model::layers::{one, uninit, uninit_full, zeros, Linear, INFER_BLOCK_TOKENS};
use crate::model::params::{ParamStore, ParamTable};
use crate::{Error, Result};

/// The student's fine-alignment projections `W_q`, `W_k`, `W_v` (each `[d, d]` + bias).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FineProj {
    /// Query projection of the student tokens.
    pub q: Linear,
    /// Key projection of the teacher tokens.
    pub k: Linear,
    /// Value projection of the student tokens.
    pub v: Linear,
}

/// Where every layer's parameters live in the flat buffers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// Sequence encoder.
    pub encoder: SeqEncoder,
    /// Profile encoder.
    pub profile: ProfileEncoder,
    /// Fusion `[d, 2d]`.
    pub fuse: Linear,
    /// Head `[1, d]`.
    pub head: Linear,
    /// Student auxiliary heads `[1, 2d]`, one per block but the last.
    pub aux: Vec<Linear>,
    /// Student coarse projection `P_c`.
    pub coarse: Option<Linear>,
    /// Student fine projections.
    pub fine: Option<FineProj>,
}

impl Layout {
    /// Resolves every layer of `cfg` in `table` by name.
    pub fn new(cfg: &ModelConfig, table: &ParamTable) -> Result<Layout> {
        let student = cfg.role == Role::Student;
        let aux = if student {
            (0..cfg.blocks.saturating_sub(1))
                .map(|l| Linear::from_table(table, &format!("aux.{l}")))
                .collect::<Result<_>>()?
        } else {
            Vec::new()
        };
        let fine = if student {
            Some(FineProj {
                q: Linear::from_table(table, "fine.q")?,
                k: Linear::from_table(table, "fine.k")?,
                v: Linear::from_table(table, "fine.v")?,
            })
        } else {
            None
        };
        Ok(Layout {
            encoder: SeqEncoder::from_table(table, cfg.blocks, cfg.heads)?,
            profile: ProfileEncoder::from_table(table, cfg.d_cat, cfg.profile_num)?,
            fuse: Linear::from_table(table, "fuse")?,
            head: Linear::from_table(table, "head")?,
            aux,
            coarse: if student {
                Some(Linear::from_table(table, "coarse")?)
            } else {
                None
            },
            fine,
        })
    }
}

/// A teacher or a student: configuration, parameter storage and layout.
pub struct Model<B: Backend> {
    /// The configuration.
    pub config: ModelConfig,
    /// Parameters, gradients, Adam moments.
    pub params: ParamStore<B>,
    /// Resolved layer offsets.
    pub layout: Layout,
}

/// The outputs of a forward pass and everything the backward needs.
pub struct Forward<B: Backend> {
    /// Rows.
    pub rows: usize,
    /// Logits `z`, `rows`.
    pub logits: B::Buf,
    /// Student auxiliary logits `z_l`, one buffer (`rows`) per block but the last.
    pub aux_logits: Vec<B::Buf>,
    /// Fused representation `H` (H_in or H_pre), `rows×d`.
    pub hidden: B::Buf,
    /// Encoder state; `encoder.out.tokens` are T (T_in or T_pre), `encoder.out.s` is s.
    pub encoder: EncoderCache<B>,
    /// Profile state; `profile.p` is p.
    pub profile: ProfileCache<B>,
    cat: B::Buf,
    hpre: B::Buf,
    aux_cat: Vec<B::Buf>,
}

/// Elements of a feed-forward network's hidden layer (`tokens×4d`) that an inference pass
/// ([`Model::infer`]) computes at once: 2²⁴, so its hidden buffer (GELU runs in place over
/// `f1`) takes at most 64 MiB in f32 (32 MiB in bf16) whatever the batch. That is 32 768
/// tokens at d = 128, one block window ([`INFER_BLOCK_TOKENS`]) of the §8 teacher: its
/// batch of 1 024 × 128 runs in four windows of one chunk each.
pub const INFER_FFN_ELEMS: usize = 1 << 24;

/// How many tokens an inference pass ([`Model::infer_in_chunks`]) computes at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InferChunks {
    /// Tokens of whole rows a block runs at once (at least one row):
    /// [`INFER_BLOCK_TOKENS`] by default.
    pub block_tokens: usize,
    /// Tokens a feed-forward network runs at once (within a block's window): those of
    /// [`INFER_FFN_ELEMS`] hidden elements by default.
    pub ffn_tokens: usize,
}

/// The outputs of an inference pass ([`Model::infer`]).
pub struct Inference<B: Backend> {
    /// Logits `z`, `rows`.
    pub logits: B::Buf,
    /// Fused representation `H` (H_in or H_pre), `rows×d`.
    pub hidden: B::Buf,
    /// Final tokens `T` (T_in or T_pre), `rows×len×d` (`len` the batch's padded length).
    pub tokens: B::Buf,
}

/// The fusion's and the head's outputs ([`Model::fuse_and_score`]).
struct Head<B: Backend> {
    cat: B::Buf,
    hpre: B::Buf,
    hidden: B::Buf,
    logits: B::Buf,
}

/// Gradients of the loss with respect to a forward pass's outputs (the inputs of
/// [`Model::backward`]); `None` means zero.
pub struct OutputGrads<B: Backend> {
    /// ∂L/∂z, `rows`.
    pub logits: B::Buf,
    /// ∂L/∂z_l per auxiliary head (empty, or one per head).
    pub aux_logits: Vec<B::Buf>,
    /// ∂L/∂H, `rows×d`.
    pub hidden: Option<B::Buf>,
    /// ∂L/∂T, `rows×len×d`, zero on padded slots.
    pub tokens: Option<B::Buf>,
    /// ∂L/∂p, `rows×d`.
    pub p: Option<B::Buf>,
}

/// `cat = [a ; b]` row-wise, `rows×2d`.
fn concat<B: Backend>(be: &B, rows: usize, d: usize, a: &B::Buf, b: &B::Buf) -> Result<B::Buf> {
    let mut cat = uninit(be, rows * 2 * d)?;
    be.copy_2d(
        rows,
        d,
        Ref::whole(a),
        d,
        Mut::whole(&mut cat),
        2 * d,
        false,
    );
    be.copy_2d(
        rows,
        d,
        Ref::whole(b),
        d,
        Mut::at(&mut cat, d),
        2 * d,
        false,
    );
    Ok(cat)
}

impl<B: Backend> Model<B> {
    /// A freshly initialised model (seeded, docs/model.md §4.7).
    pub fn new(be: &B, config: ModelConfig, seed: u64) -> Result<Self> {
        config.validate()?;
        let table = ParamTable::new(&config);
        let params = ParamStore::init(be, table, seed)?;
        Self::with_params(config, params)
    }

    /// A model over existing storage (its table must be the one of `config`).
    pub fn with_params(config: ModelConfig, params: ParamStore<B>) -> Result<Self> {
        if params.table != ParamTable::new(&config) {
            return Err(Error::invalid(
                "parameter storage does not match the model configuration",
            ));
        }
        let layout = Layout::new(&config, &params.table)?;
        Ok(Model {
            config,
            params,
            layout,
        })
    }

    /// The sequence this model reads: in-service for the teacher, pre-service for the student.
    pub fn sequence<'a>(&self, batch: &'a DeviceBatch<B>) -> &'a DeviceSeq<B> {
        match self.config.role {
            Role::Teacher => &batch.in_service,
            Role::Student => &batch.pre,
        }
    }

    /// The sequence of `batch` this model reads, after checking that the batch's fields and
    /// vocabularies are the model's and its length is within the model's limit.
    fn checked_sequence<'a>(&self, batch: &'a DeviceBatch<B>) -> Result<&'a DeviceSeq<B>> {
        let (bs, ms) = (&batch.schema, &self.config.schema);
        let vocabs = |s: &crate::data::Schema| {
            let v = |f: &[crate::data::CatField]| f.iter().map(|c| c.vocab).collect::<Vec<_>>();
            (v(&s.profile_cat), v(&s.event_cat), s.f_num(), s.e_num())
        };
        if vocabs(bs) != vocabs(ms) {
            return Err(Error::invalid(format!(
                "the batch's fields or vocabularies differ from the {}'s schema",
                self.config.role
            )));
        }
        let seq = self.sequence(batch);
        if seq.len > self.config.len_limit.max(1) {
            return Err(Error::invalid(format!(
                "batch sequence length {} exceeds the {}'s limit {}",
                seq.len, self.config.role, self.config.len_limit
            )));
        }
        Ok(seq)
    }

    /// The fusion and the head on `s` and `p` (`rows×d` each): `[s ; p]`, its projection
    /// before and after GELU (`H`), and the logits.
    fn fuse_and_score(&self, be: &B, rows: usize, s: &B::Buf, p: &B::Buf) -> Result<Head<B>> {
        let (d, lay, params) = (self.config.d, &self.layout, self.params.compute());
        let cat = concat(be, rows, d, s, p)?;
        let mut hpre = uninit(be, rows * d)?;
        lay.fuse.forward(
            be,
            params,
            rows,
            Ref::whole(&cat),
            Mut::whole(&mut hpre),
            false,
        );
        let mut hidden = uninit(be, rows * d)?;
        be.gelu(rows * d, Ref::whole(&hpre), Mut::whole(&mut hidden));
        let mut logits = uninit_full(be, rows)?;
        lay.head.forward(
            be,
            params,
            rows,
            Ref::whole(&hidden),
            Mut::whole(&mut logits),
            false,
        );
        Ok(Head {
            cat,
            hpre,
            hidden,
            logits,
        })
    }

    /// Forward pass to the logits (and the student's auxiliary logits), keeping what
    /// [`Model::backward`] needs.
    pub fn forward(&self, be: &B, batch: &DeviceBatch<B>) -> Result<Forward<B>> {
        let (rows, d, lay) = (batch.rows, self.config.d, &self.layout);
        let params = self.params.compute();
        let seq = self.checked_sequence(batch)?;
        let aux = !lay.aux.is_empty();
        let encoder = lay.encoder.forward(be, params, rows, seq, aux)?;
        let profile =
            lay.profile
                .forward(be, params, rows, &batch.profile_num, &batch.profile_cat)?;
        let head = self.fuse_and_score(be, rows, &encoder.out.s, &profile.p)?;
        let mut aux_cat = Vec::new();
        let mut aux_logits = Vec::new();
        for (head, pooled) in lay.aux.iter().zip(&encoder.aux) {
            let c = concat(be, rows, d, &pooled.s, &profile.p)?;
            let mut z = uninit_full(be, rows)?;
            head.forward(be, params, rows, Ref::whole(&c), Mut::whole(&mut z), false);
            aux_cat.push(c);
            aux_logits.push(z);
        }
        Ok(Forward {
            rows,
            logits: head.logits,
            aux_logits,
            hidden: head.hidden,
            encoder,
            profile,
            cat: head.cat,
            hpre: head.hpre,
            aux_cat,
        })
    }

    /// Forward pass for inference (scoring, a frozen teacher): the logits `z`, the
    /// representation `H` and the tokens `T`, as [`Model::forward`] computes them (the same
    /// operations in the same order), without keeping anything for a backward: each
    /// block's activations are given back as the pass goes on, each block runs over
    /// [`INFER_BLOCK_TOKENS`] tokens of whole rows at a time, and its feed-forward network
    /// over [`INFER_FFN_ELEMS`] hidden elements at a time, so it needs far less memory than
    /// a training forward. On the CPU the results are the same bits; on CUDA a product over
    /// fewer rows may round differently in the last bits.
    pub fn infer(&self, be: &B, batch: &DeviceBatch<B>) -> Result<Inference<B>> {
        let chunks = InferChunks {
            block_tokens: INFER_BLOCK_TOKENS,
            ffn_tokens: (INFER_FFN_ELEMS / (4 * self.config.d)).max(1),
        };
        self.infer_in_chunks(be, batch, chunks)
    }

    /// [`Model::infer`] with each block and its feed-forward network run over the numbers
    /// of tokens `chunks` names.
    pub fn infer_in_chunks(
        &self,
        be: &B,
        batch: &DeviceBatch<B>,
        chunks: InferChunks,
    ) -> Result<Inference<B>> {
        let (rows, lay) = (batch.rows, &self.layout);
        let params = self.params.compute();
        let seq = self.checked_sequence(batch)?;
        let out = lay.encoder.infer(be, params, rows, seq, chunks)?;
        let profile =
            lay.profile
                .forward(be, params, rows, &batch.profile_num, &batch.profile_cat)?;
        let head = self.fuse_and_score(be, rows, &out.s, &profile.p)?;
        Ok(Inference {
            logits: head.logits,
            hidden: head.hidden,
            tokens: out.tokens,
        })
    }

    /// Splits `dcat = ∂L/∂[s ; p]` into a fresh `ds` and adds its second half into `dp`.
    fn split_cat(be: &B, rows: usize, d: usize, dcat: &B::Buf, dp: &mut B::Buf) -> Result<B::Buf> {
        let mut ds = uninit(be, rows * d)?;
        be.copy_2d(
            rows,
            d,
            Ref::whole(dcat),
            2 * d,
            Mut::whole(&mut ds),
            d,
            false,
        );
        be.copy_2d(rows, d, Ref::at(dcat, d), 2 * d, Mut::whole(dp), d, true);
        Ok(ds)
    }

    /// Backward pass: accumulates ∂L/∂θ into `self.params.grads` given the gradients of the
    /// outputs of `fwd` (the forward of the same batch with the current parameters). Both
    /// are consumed: each activation and output gradient is given back once read, so the
    /// encoder's backward never holds the tokens `T`, their gradient or the last block's
    /// output, and each block's cache goes once that block is done.
    pub fn backward(
        &mut self,
        be: &B,
        batch: &DeviceBatch<B>,
        fwd: Forward<B>,
        g: OutputGrads<B>,
    ) -> Result<()> {
        let (rows, d) = (fwd.rows, self.config.d);
        if !g.aux_logits.is_empty() && g.aux_logits.len() != self.layout.aux.len() {
            return Err(Error::invalid(
                "auxiliary logit gradients do not match the heads",
            ));
        }
        let lay = &self.layout;
        let seq = match self.config.role {
            Role::Teacher => &batch.in_service,
            Role::Student => &batch.pre,
        };
        let (params, grads) = self.params.weights_and_grads();
        let mut dhidden = uninit(be, rows * d)?;
        let (hid, dz) = (Ref::whole(&fwd.hidden), Ref::whole(&g.logits));
        lay.head.backward(
            be,
            params,
            grads,
            rows,
            hid,
            dz,
            Some(Mut::whole(&mut dhidden)),
            false,
        );
        if let Some(extra) = &g.hidden {
            be.axpy(
                rows * d,
                one::<B::F>(),
                Ref::whole(extra),
                Mut::whole(&mut dhidden),
            );
        }
        let mut dhpre = uninit(be, rows * d)?;
        let (hp, dh) = (Ref::whole(&fwd.hpre), Ref::whole(&dhidden));
        be.gelu_backward(rows * d, hp, dh, Mut::whole(&mut dhpre));
        let mut dcat = uninit(be, rows * 2 * d)?;
        let (cat, dhp) = (Ref::whole(&fwd.cat), Ref::whole(&dhpre));
        lay.fuse.backward(
            be,
            params,
            grads,
            rows,
            cat,
            dhp,
            Some(Mut::whole(&mut dcat)),
            false,
        );
        let mut dp = zeros(be, rows * d)?;
        if let Some(extra) = &g.p {
            be.copy(rows * d, Ref::whole(extra), Mut::whole(&mut dp));
        }
        let ds = Self::split_cat(be, rows, d, &dcat, &mut dp)?;
        let mut daux = Vec::with_capacity(g.aux_logits.len());
        for ((head, c), dz) in lay.aux.iter().zip(&fwd.aux_cat).zip(&g.aux_logits) {
            let mut dc = uninit(be, rows * 2 * d)?;
            let (cr, dzr) = (Ref::whole(c), Ref::whole(dz));
            head.backward(
                be,
                params,
                grads,
                rows,
                cr,
                dzr,
                Some(Mut::whole(&mut dc)),
                false,
            );
            daux.push(Self::split_cat(be, rows, d, &dc, &mut dp)?);
        }
        let (enc, dtokens) = (fwd.encoder, g.tokens);
        lay.encoder
            .backward(be, params, grads, seq, enc, &ds, dtokens, &daux)?;
        let (ids, pc) = (&batch.profile_cat, &fwd.profile);
        lay.profile
            .backward(be, params, grads, rows, ids, pc, &dp)?;
        Ok(())
    }
}
