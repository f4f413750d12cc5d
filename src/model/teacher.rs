//! The frozen teacher of the student stage, run live or read from a cache of its outputs.
//!
//! The student objective reads three things of its teacher per batch row: the logit `z_t`
//! (L_soft), the representation `H_in` (L_coarse) and the in-service token outputs `T_in`
//! (L_fine). The teacher is frozen, so these depend on the row alone: a [`TeacherCache`]
//! holds them for a split's rows, computed once (`crate::train::teacher_cache`) and shared by
//! every epoch and every student trained under that teacher, and each batch gathers its rows'
//! outputs from it instead of running the teacher's forward.
//!
//! **Exactness.** Every operation of the forward is row-local (attention and pooling are
//! masked to the row's own valid tokens, GEMMs accumulate each output element in a fixed
//! order whatever the number of rows), so on the CPU backend a row's cached outputs are the
//! bits the live forward computes for it in any batch, and a student trained with the cache
//! is bit-identical to one trained without (`tests/teacher_cache.rs`). Padded token slots,
//! which the live forward fills with finite values that every term masks, read as zeros.
//! On CUDA, cuBLAS chooses its algorithm per matrix shape, so the live forward itself may
//! differ in the last bits between batches of different shapes; the cache then holds one
//! of those equally valid roundings.
//!
//! **Layout.** Rows get consecutive *slots*; `logits` is `[slots]`, `hidden` `[slots, d]`,
//! and `tokens` holds each slot's valid tokens back to back (`[Σ len, d]`) followed by one
//! zero row that padded slots read. A batch carries, per row, its slot and, per padded
//! token slot, the cache token it reads ([`TeacherIds`]); the gathers are one embedding
//! lookup each.

use std::collections::HashMap;

use crate::backend::{Backend, EmbMode, EmbTable, Mut};
use crate::data::Batch;
use crate::model::layers::{uninit, uninit_full};
use crate::model::{DeviceBatch, Model, Role};
use crate::{Error, Result};

/// What the student objective reads of its teacher for one batch.
pub struct TeacherOutputs<B: Backend> {
    /// Logits `z_t`, `rows`.
    pub logits: B::Buf,
    /// Representations `H_in`, `rows×d`.
    pub hidden: B::Buf,
    /// In-service token outputs `T_in`, `rows×len×d` (`len` the batch's padded in-service
    /// length), when asked for.
    pub tokens: Option<B::Buf>,
}

/// The teacher a student trains under: its model and, optionally, a cache of its outputs for
/// the rows the student trains on.
pub struct Teacher<'a, B: Backend> {
    /// The frozen teacher.
    pub model: &'a Model<B>,
    /// Its outputs, computed once; `None` runs the teacher's forward on every batch.
    pub cache: Option<&'a TeacherCache<B>>,
}

impl<B: Backend> Clone for Teacher<'_, B> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<B: Backend> Copy for Teacher<'_, B> {}

impl<'a, B: Backend> Teacher<'a, B> {
    /// The teacher `model`, run forward on every batch.
    pub fn live(model: &'a Model<B>) -> Self {
        Teacher { model, cache: None }
    }

    /// The teacher `model` with its outputs read from `cache` (built from this model).
    pub fn cached(model: &'a Model<B>, cache: &'a TeacherCache<B>) -> Self {
        Teacher {
            model,
            cache: Some(cache),
        }
    }

    /// The index that batches must be staged with for this teacher (`None` when it runs
    /// live).
    pub fn index(&self) -> Option<&'a TeacherIndex> {
        self.cache.map(|c| &c.index)
    }

    /// The teacher's outputs for `batch`, with the token outputs when `tokens`: gathered
    /// from the cache when it holds what is asked for, else from the teacher's forward.
    pub fn outputs(
        &self,
        be: &B,
        batch: &DeviceBatch<B>,
        tokens: bool,
    ) -> Result<TeacherOutputs<B>> {
        match self.cache {
            Some(c) if !tokens || c.tokens.is_some() => c.gather(be, batch, tokens),
            _ => {
                let f = self.model.infer(be, batch)?;
                Ok(TeacherOutputs {
                    logits: f.logits,
                    hidden: f.hidden,
                    tokens: tokens.then_some(f.tokens),
                })
            }
        }
    }
}

/// The host half of a [`TeacherCache`]: which slot each dataset row has, and where its
/// tokens are. Batches are staged with it ([`TeacherIndex::stage`]).
#[derive(Debug, Clone)]
pub struct TeacherIndex {
    /// Dataset row → slot.
    slot_of_row: HashMap<u64, u32>,
    /// Per slot: its in-service length (as kept within the length limit).
    lens: Vec<u32>,
    /// Per slot: its first token in the token table (when tokens are cached).
    starts: Option<Vec<u32>>,
    /// The zero token row that padded slots read (the token table's last row).
    pad: u32,
}

impl TeacherIndex {
    /// The index of `rows` (dataset rows, slot `i` for `rows[i]`) of in-service lengths
    /// `lens`, with token positions when `tokens`. Errors on a repeated row, or on more tokens
    /// than 32-bit ids can address.
    pub fn new(rows: &[u64], lens: &[u32], tokens: bool) -> Result<Self> {
        if rows.len() != lens.len() {
            return Err(Error::invalid(format!(
                "teacher cache: {} rows but {} lengths",
                rows.len(),
                lens.len()
            )));
        }
        let slots = u32::try_from(rows.len())
            .map_err(|_| Error::invalid("teacher cache: more than 2³² − 1 rows"))?;
        let mut slot_of_row = HashMap::with_capacity(rows.len());
        for (slot, &row) in (0..slots).zip(rows) {
            if slot_of_row.insert(row, slot).is_some() {
                return Err(Error::invalid(format!(
                    "teacher cache: row {row} appears twice"
                )));
            }
        }
        let (mut starts, mut pad) = (None, 0);
        if tokens {
            let total: u64 = lens.iter().map(|&l| u64::from(l)).sum();
            // The zero row's id, `total`, must be a u32 too.
            pad = u32::try_from(total)
                .ok()
                .filter(|&p| p < u32::MAX)
                .ok_or_else(|| {
                    Error::invalid(format!(
                        "teacher cache: {total} in-service tokens exceed 32-bit token ids"
                    ))
                })?;
            let mut at = 0u32;
            starts = Some(
                lens.iter()
                    .map(|&l| {
                        let s = at;
                        at += l;
                        s
                    })
                    .collect(),
            );
        }
        Ok(TeacherIndex {
            slot_of_row,
            lens: lens.to_vec(),
            starts,
            pad,
        })
    }

    /// Number of slots (cached rows).
    pub fn slots(&self) -> usize {
        self.lens.len()
    }

    /// The dataset row of every slot, in slot order.
    pub fn rows_by_slot(&self) -> Vec<u64> {
        let mut rows = vec![0u64; self.slots()];
        for (&row, &slot) in &self.slot_of_row {
            rows[slot as usize] = row;
        }
        rows
    }

    /// Number of valid tokens cached (0 when tokens are not).
    pub fn tokens(&self) -> usize {
        if self.starts.is_some() {
            self.pad as usize
        } else {
            0
        }
    }

    /// Whether token outputs are cached.
    pub fn has_tokens(&self) -> bool {
        self.starts.is_some()
    }

    /// Ids a batch of `rows` rows padded to in-service length `len` takes.
    pub fn staged_ids(&self, rows: usize, len: usize) -> usize {
        rows + if self.has_tokens() { rows * len } else { 0 }
    }

    /// Writes `batch`'s gather ids into `dst` (`staged_ids(rows, len)` long, `len` the
    /// batch's padded in-service length, at least 1): each row's slot, then, with tokens, each
    /// padded token slot's cache token (the zero row past a row's length). Errors on a row the
    /// cache does not hold, or whose in-service length differs from the cached one (a cache
    /// of another dataset).
    pub fn stage(&self, batch: &Batch, len: usize, dst: &mut [u32]) -> Result<()> {
        let rows = batch.rows;
        if batch.row_index.len() != rows || dst.len() != self.staged_ids(rows, len) {
            return Err(Error::invalid(
                "teacher cache: the batch's row list or the id region has the wrong size",
            ));
        }
        let (slots, tokens) = dst.split_at_mut(rows);
        for (i, (&row, slot)) in batch.row_index.iter().zip(slots.iter_mut()).enumerate() {
            let &s = self.slot_of_row.get(&row).ok_or_else(|| {
                Error::invalid(format!(
                    "teacher cache: dataset row {row} (batch row {i}) is not cached"
                ))
            })?;
            let (want, have) = (self.lens[s as usize], batch.in_service.lens[i]);
            if want != have {
                return Err(Error::invalid(format!(
                    "teacher cache: dataset row {row} has {have} in-service events, the cache \
                     {want}: it was built from another dataset"
                )));
            }
            *slot = s;
        }
        if let Some(starts) = &self.starts {
            for (t, &s) in tokens.chunks_mut(len).zip(slots.iter()) {
                let (start, n) = (starts[s as usize], self.lens[s as usize] as usize);
                for (j, id) in t.iter_mut().enumerate() {
                    *id = if j < n { start + j as u32 } else { self.pad };
                }
            }
        }
        Ok(())
    }
}

/// Where a batch's gather ids lie on the device ([`DeviceBatch::teacher`]).
pub struct TeacherIds<B: Backend> {
    /// Per row: its cache slot.
    pub rows: B::Ids,
    /// Per padded in-service token slot: its cache token (when tokens are cached).
    pub tokens: Option<B::Ids>,
}

/// A teacher's outputs for a split's rows, on the backend (see the module documentation).
pub struct TeacherCache<B: Backend> {
    /// Slots and token positions (host).
    pub index: TeacherIndex,
    /// Width d.
    pub d: usize,
    /// `z_t` per slot.
    pub logits: B::Buf,
    /// `H_in` per slot, `slots×d`.
    pub hidden: B::Buf,
    /// Valid tokens of every slot back to back, then one zero row: `(tokens + 1)×d`.
    pub tokens: Option<B::Buf>,
}

impl<B: Backend> TeacherCache<B> {
    /// Bytes a cache of `slots` rows and `tokens` cached tokens (0 when tokens are not
    /// cached) of width `d` takes: the logits in elements of `full` bytes, the
    /// representations and tokens in elements of `act` bytes (the activation precision's:
    /// they hold activations, so a bf16 run caches them in bf16, exactly).
    pub fn bytes(slots: usize, tokens: Option<usize>, d: usize, full: usize, act: usize) -> u64 {
        let acts = slots * d + tokens.map_or(0, |t| (t + 1) * d);
        (slots * full + acts * act) as u64
    }

    /// A zero-filled cache laid out by `index` for a teacher of width `d`.
    pub fn zeros(be: &B, index: TeacherIndex, teacher: &Model<B>) -> Result<Self> {
        if teacher.config.role != Role::Teacher {
            return Err(Error::invalid("a teacher cache needs a teacher model"));
        }
        let d = teacher.config.d;
        let slots = index.slots().max(1);
        let tokens = match index.has_tokens() {
            true => Some(be.act_zeros((index.tokens() + 1) * d)?),
            false => None,
        };
        Ok(TeacherCache {
            logits: be.zeros(slots)?,
            hidden: be.act_zeros(slots * d)?,
            tokens,
            index,
            d,
        })
    }

    /// Gathers `batch`'s rows (staged with this cache's index).
    fn gather(&self, be: &B, batch: &DeviceBatch<B>, tokens: bool) -> Result<TeacherOutputs<B>> {
        let ids = batch.teacher.as_ref().ok_or_else(|| {
            Error::invalid(
                "a batch staged without the teacher cache's ids reached a cached teacher",
            )
        })?;
        let (n, d) = (batch.rows, self.d);
        let slots = EmbTable {
            offset: 0,
            vocab: self.index.slots(),
        };
        let mut logits = uninit_full(be, n)?;
        let out = Mut::whole(&mut logits);
        be.embedding(
            n,
            1,
            &[slots],
            &ids.rows,
            &self.logits,
            EmbMode::Concat,
            out,
            1,
        );
        let mut hidden = uninit(be, n * d)?;
        let out = Mut::whole(&mut hidden);
        be.embedding(
            n,
            d,
            &[slots],
            &ids.rows,
            &self.hidden,
            EmbMode::Concat,
            out,
            d,
        );
        let tokens = match (tokens, &self.tokens, &ids.tokens) {
            (false, _, _) => None,
            (true, Some(table), Some(tok_ids)) => {
                let slots_n = n * batch.in_service.len;
                let vocab = EmbTable {
                    offset: 0,
                    vocab: self.index.tokens() + 1,
                };
                let mut t = uninit(be, slots_n * d)?;
                let out = Mut::whole(&mut t);
                be.embedding(
                    slots_n,
                    d,
                    &[vocab],
                    tok_ids,
                    table,
                    EmbMode::Concat,
                    out,
                    d,
                );
                Some(t)
            }
            _ => {
                return Err(Error::invalid(
                    "the teacher cache holds no token outputs, or the batch no token ids",
                ))
            }
        };
        Ok(TeacherOutputs {
            logits,
            hidden,
            tokens,
        })
    }
}
