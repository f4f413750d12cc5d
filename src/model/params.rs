//! The parameter table (every named tensor of a network, in the fixed order and naming of
//! the engine design) and the flat parameter storage on a backend: values, gradients, both
//! Adam moments and the weight-decay mask, one buffer each (docs/model.md §6.1).

use std::collections::HashMap;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

use crate::backend::{Backend, Float, Mut, Precision, Ref};
use crate::model::config::{ModelConfig, Role};
use crate::model::layers::zero;
use crate::{Error, Result};

/// Standard deviation of the normal initialisation of matrices and embeddings (docs/model.md §4.7).
pub const INIT_STD: f64 = 0.02;

/// Every tensor of the flat buffers starts at a multiple of this many elements (32 bytes in
/// f32, 16 in bf16; the buffers themselves are allocated at least 256-byte aligned), so that
/// a weight or bias read by a tensor-core GEMM, in the f32 values or in their bf16 compute
/// copy, meets the 16-byte alignment of the vectorised kernels without a staging copy. The
/// gap before a tensor holds zeros that no operation reads: its gradient stays 0, and AdamW
/// leaves it 0. The one exception is a LayerNorm's shift, which follows its scale directly
/// (the LayerNorm kernels take `[γ ; β]` as one window).
pub const TENSOR_ALIGN: usize = 8;

/// How a tensor is initialised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Init {
    /// normal(0, [`INIT_STD`]): linear weights, embedding tables, positions, `encoder.empty`.
    Normal,
    /// Zeros: biases and LayerNorm shifts.
    Zeros,
    /// Ones: LayerNorm scales.
    Ones,
}

/// One named tensor of the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamEntry {
    /// Checkpoint name, e.g. `encoder.blocks.0.attn.in_proj.weight`.
    pub name: String,
    /// Shape (PyTorch convention: a linear weight is `[out, in]`).
    pub shape: Vec<usize>,
    /// Element offset in the flat buffers (a multiple of [`TENSOR_ALIGN`], except a
    /// LayerNorm's shift, which follows its scale).
    pub offset: usize,
    /// Whether AdamW's weight decay applies (weights of linear maps only).
    pub decay: bool,
    /// Initialisation.
    pub init: Init,
}

impl ParamEntry {
    /// Number of elements, the product of the shape.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// The ordered list of a network's tensors and their places in the flat buffers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamTable {
    entries: Vec<ParamEntry>,
    index: HashMap<String, usize>,
    /// Length of the flat buffers, alignment gaps included.
    total: usize,
    /// Number of parameters, the sum of the entries' sizes.
    count: usize,
}

impl ParamTable {
    /// The table of `cfg` in the engine design's order: encoder (embeddings, numeric
    /// projection, positions, blocks, final LN, `s_∅`), profile, fusion, head, then for the
    /// student the auxiliary heads, the coarse projection and the fine projections.
    pub fn new(cfg: &ModelConfig) -> ParamTable {
        let mut t = ParamTable {
            entries: Vec::new(),
            index: HashMap::new(),
            total: 0,
            count: 0,
        };
        let d = cfg.d;
        for (k, &v) in cfg.event_vocabs.iter().enumerate() {
            t.push(
                format!("encoder.embed.cat.{k}.weight"),
                &[v as usize, d],
                Init::Normal,
                false,
            );
        }
        t.linear("encoder.embed.num", d, cfg.event_num);
        t.push(
            "encoder.embed.pos.weight".into(),
            &[cfg.len_limit, d],
            Init::Normal,
            false,
        );
        for l in 0..cfg.blocks {
            let p = format!("encoder.blocks.{l}");
            t.layernorm(&format!("{p}.ln1"), d);
            t.linear(&format!("{p}.attn.in_proj"), 3 * d, d);
            t.linear(&format!("{p}.attn.out_proj"), d, d);
            t.layernorm(&format!("{p}.ln2"), d);
            t.linear(&format!("{p}.ffn.fc1"), 4 * d, d);
            t.linear(&format!("{p}.ffn.fc2"), d, 4 * d);
        }
        t.layernorm("encoder.ln_f", d);
        t.push("encoder.empty".into(), &[d], Init::Normal, false);
        for (j, &v) in cfg.profile_vocabs.iter().enumerate() {
            t.push(
                format!("profile.cat.{j}.weight"),
                &[v as usize, cfg.d_cat],
                Init::Normal,
                false,
            );
        }
        t.linear("profile.proj", d, cfg.profile_in());
        t.linear("fuse", d, 2 * d);
        t.linear("head", 1, d);
        if cfg.role == Role::Student {
            for l in 0..cfg.blocks.saturating_sub(1) {
                t.linear(&format!("aux.{l}"), 1, 2 * d);
            }
            t.linear("coarse", d, d);
            t.linear("fine.q", d, d);
            t.linear("fine.k", d, d);
            t.linear("fine.v", d, d);
        }
        t
    }

    /// Appends the tensor `name` at the next multiple of [`TENSOR_ALIGN`].
    fn push(&mut self, name: String, shape: &[usize], init: Init, decay: bool) {
        self.total = self.total.next_multiple_of(TENSOR_ALIGN);
        self.push_packed(name, shape, init, decay);
    }

    /// Appends the tensor `name` directly after the previous one.
    fn push_packed(&mut self, name: String, shape: &[usize], init: Init, decay: bool) {
        let e = ParamEntry {
            name: name.clone(),
            shape: shape.to_vec(),
            offset: self.total,
            decay,
            init,
        };
        self.total += e.numel();
        self.count += e.numel();
        self.index.insert(name, self.entries.len());
        self.entries.push(e);
    }

    fn linear(&mut self, prefix: &str, out: usize, inp: usize) {
        self.push(format!("{prefix}.weight"), &[out, inp], Init::Normal, true);
        self.push(format!("{prefix}.bias"), &[out], Init::Zeros, false);
    }

    /// Scale and shift, adjacent: the LayerNorm kernels read and write them as one window.
    fn layernorm(&mut self, prefix: &str, d: usize) {
        self.push(format!("{prefix}.weight"), &[d], Init::Ones, false);
        self.push_packed(format!("{prefix}.bias"), &[d], Init::Zeros, false);
    }

    /// The entries, in table order.
    pub fn entries(&self) -> &[ParamEntry] {
        &self.entries
    }

    /// Length of each flat buffer: the parameters and the zero gaps that align each tensor
    /// ([`TENSOR_ALIGN`]).
    pub fn total(&self) -> usize {
        self.total
    }

    /// Number of parameters (the sum of the tensors' sizes, gaps excluded).
    pub fn count(&self) -> usize {
        self.count
    }

    /// A flat buffer laid out by the table: zeros, then `fill` called on each tensor's window
    /// in table order.
    pub fn flat<F: Float>(&self, mut fill: impl FnMut(&ParamEntry, &mut [F])) -> Vec<F> {
        let mut v = vec![<F as num_traits::Zero>::zero(); self.total];
        for e in &self.entries {
            fill(e, &mut v[e.offset..e.offset + e.numel()]);
        }
        v
    }

    /// The entry named `name`.
    pub fn get(&self, name: &str) -> Result<&ParamEntry> {
        self.index
            .get(name)
            .and_then(|&i| self.entries.get(i))
            .ok_or_else(|| Error::invalid(format!("no parameter tensor named {name}")))
    }

    /// Element offset of the tensor `name`.
    pub fn offset(&self, name: &str) -> Result<usize> {
        Ok(self.get(name)?.offset)
    }

    /// The decay mask on the host: 1 on the elements of tensors with `decay`, 0 elsewhere.
    pub fn decay_mask<F: Float>(&self) -> Vec<F> {
        self.flat(|e, w: &mut [F]| {
            if e.decay {
                w.fill(<F as num_traits::One>::one())
            }
        })
    }

    /// Seeded initial values (docs/model.md §4.7): a ChaCha8 stream from `seed`, tensors drawn in
    /// table order, normal(0, 0.02) for [`Init::Normal`] tensors, 0 or 1 for the others (which draw
    /// nothing).
    pub fn init_values<F: Float>(&self, seed: u64) -> Vec<F> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let normal = Normal::new(0.0, INIT_STD).expect("INIT_STD is a valid standard deviation");
        self.flat(|e, w: &mut [F]| match e.init {
            Init::Normal => w
                .iter_mut()
                .for_each(|x| *x = <F as Float>::from_f64(normal.sample(&mut rng))),
            Init::Zeros => w.fill(<F as num_traits::Zero>::zero()),
            Init::Ones => w.fill(<F as num_traits::One>::one()),
        })
    }
}

/// The flat storage of one network on backend `B`: parameter values, gradients, the Adam
/// moments m and v, and the decay mask, each `table.total()` long and laid out by `table`.
pub struct ParamStore<B: Backend> {
    /// The table that lays out every buffer.
    pub table: ParamTable,
    /// Parameter values θ.
    pub values: B::Buf,
    /// Gradients ∂L/∂θ (accumulated by the backward ops; zero them once per step).
    pub grads: B::Buf,
    /// Adam first moment.
    pub m: B::Buf,
    /// Adam second moment.
    pub v: B::Buf,
    /// 1 where weight decay applies, 0 elsewhere.
    pub decay_mask: B::Buf,
    /// The copy of `values` the forward and backward read, in the backend's activation
    /// precision, when that is not full precision (bf16: made once per step by
    /// [`ParamStore::refresh_compute`]); `None` when they read `values` itself.
    compute_copy: Option<B::Buf>,
}

impl<B: Backend> ParamStore<B> {
    /// Storage for `table` holding `values` (host, table order), zero gradients and moments.
    pub fn from_values(be: &B, table: ParamTable, values: &[B::F]) -> Result<Self> {
        if values.len() != table.total() {
            return Err(Error::invalid(format!(
                "parameter values: {} elements given, the table has {}",
                values.len(),
                table.total()
            )));
        }
        let n = table.total();
        let compute_copy = match be.precision() {
            Precision::F32 => None,
            Precision::Bf16 => Some(be.act_zeros(n)?),
        };
        let mut store = ParamStore {
            values: be.upload(values)?,
            grads: be.zeros(n)?,
            m: be.zeros(n)?,
            v: be.zeros(n)?,
            decay_mask: be.upload(&table.decay_mask::<B::F>())?,
            compute_copy,
            table,
        };
        store.refresh_compute(be);
        Ok(store)
    }

    /// The parameter values the forward and backward passes read: the compute copy in the
    /// activation precision where there is one, else the values themselves.
    pub fn compute(&self) -> &B::Buf {
        self.compute_copy.as_ref().unwrap_or(&self.values)
    }

    /// [`ParamStore::compute`] and the gradient buffer at once (a backward reads the one and
    /// accumulates into the other).
    pub fn weights_and_grads(&mut self) -> (&B::Buf, &mut B::Buf) {
        (
            self.compute_copy.as_ref().unwrap_or(&self.values),
            &mut self.grads,
        )
    }

    /// Brings the compute copy up to date with the values (one conversion of the flat
    /// buffer, queued: the optimizer calls it after every update); nothing to do without one.
    pub fn refresh_compute(&mut self, be: &B) {
        if let Some(copy) = &mut self.compute_copy {
            let n = self.table.total();
            be.copy(n, Ref::whole(&self.values), Mut::whole(copy));
        }
    }

    /// Seeded initial storage (see [`ParamTable::init_values`]).
    pub fn init(be: &B, table: ParamTable, seed: u64) -> Result<Self> {
        let values = table.init_values::<B::F>(seed);
        Self::from_values(be, table, &values)
    }

    /// Zeroes the gradient buffer (once per step, before the backward passes).
    pub fn zero_grads(&mut self, be: &B) {
        be.fill(
            self.table.total(),
            zero::<B::F>(),
            Mut::whole(&mut self.grads),
        );
    }

    /// Replaces the values with `host` (table order).
    pub fn set_values(&mut self, be: &B, host: &[B::F]) -> Result<()> {
        if host.len() != self.table.total() {
            return Err(Error::invalid(format!(
                "parameter values: {} elements given, the table has {}",
                host.len(),
                self.table.total()
            )));
        }
        self.values = be.upload(host)?;
        self.refresh_compute(be);
        Ok(())
    }

    /// Read window on the values of the tensor `name`.
    pub fn value(&self, name: &str) -> Result<Ref<'_, B::Buf>> {
        Ok(Ref::at(&self.values, self.table.offset(name)?))
    }

    /// Read window on the gradient of the tensor `name`.
    pub fn grad(&self, name: &str) -> Result<Ref<'_, B::Buf>> {
        Ok(Ref::at(&self.grads, self.table.offset(name)?))
    }

    /// The values of the tensor `name`, on the host.
    pub fn value_host(&self, be: &B, name: &str) -> Result<Vec<B::F>> {
        let e = self.table.get(name)?;
        let all = be.download(&self.values)?;
        Ok(all[e.offset..e.offset + e.numel()].to_vec())
    }
}
