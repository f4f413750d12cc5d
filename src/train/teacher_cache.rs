//! Computing a [`TeacherCache`] once for a student stage (see [`crate::model::teacher`]): the
//! frozen teacher runs forward over the train split's rows, in batches sorted by in-service
//! length (little padding), and each batch's logits, representations and valid token outputs
//! are copied into the cache on the device. Every epoch of every student trained under that
//! teacher then gathers its batches' rows from it.
//!
//! The cache is built when a student objective reads the teacher (L_soft, L_coarse or
//! L_fine; tokens only for L_fine) and it fits the memory budget; otherwise the teacher runs
//! forward on every batch, as it would without a cache.

use std::time::Instant;

use crate::backend::{Backend, EmbMode, EmbTable, Mut, Ref};
use crate::data::Dataset;
use crate::loss::LossConfig;
use crate::model::{Model, TeacherCache, TeacherIndex};
use crate::train::batching::kept_lengths;
use crate::train::pipeline::Pipeline;
use crate::train::TRAIN;
use crate::Result;

/// Default memory budget of a teacher cache, in MiB (on the device that trains).
pub const DEFAULT_BUDGET_MIB: u64 = 2048;

/// What the student objectives `losses` read of their teacher: `None` when nothing (every
/// distillation term off), `Some(tokens)` when its logits and representations, and its token
/// outputs too when `tokens` (some objective has L_fine on).
pub fn teacher_needs<'a>(losses: impl IntoIterator<Item = &'a LossConfig>) -> Option<bool> {
    losses
        .into_iter()
        .filter(|l| l.soft || l.coarse || l.fine)
        .fold(None, |acc, l| Some(acc.unwrap_or(false) || l.fine))
}

/// What [`cache_teacher`] did, in one line for the user.
#[derive(Debug, Clone, PartialEq)]
pub enum CacheOutcome {
    /// No student objective reads the teacher, or the budget is 0: nothing to cache.
    Off,
    /// Built: rows, tokens cached, bytes, seconds it took.
    Built {
        /// Rows cached.
        rows: usize,
        /// Token outputs cached (0 when L_fine is off).
        tokens: usize,
        /// Bytes on the device.
        bytes: u64,
        /// Seconds the teacher's pass took.
        seconds: f64,
    },
    /// The cache would take `bytes`, more than the budget: the teacher runs on every batch.
    OverBudget {
        /// Bytes the cache would take.
        bytes: u64,
        /// The budget.
        budget: u64,
    },
}

impl std::fmt::Display for CacheOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
        match self {
            CacheOutcome::Off => write!(f, "teacher outputs not cached (none needed, or budget 0)"),
            CacheOutcome::Built {
                rows,
                tokens,
                bytes,
                seconds,
            } => write!(
                f,
                "teacher outputs cached for {rows} train rows ({tokens} token outputs, {:.1} MiB) \
                 in {seconds:.1} s; every student epoch reads them instead of running the teacher",
                mib(*bytes)
            ),
            CacheOutcome::OverBudget { bytes, budget } => write!(
                f,
                "teacher outputs not cached: they take {:.1} MiB, over the budget of {:.0} MiB \
                 (--teacher-cache-mib); the teacher runs forward on every batch",
                mib(*bytes),
                mib(*budget)
            ),
        }
    }
}

/// Caches `teacher`'s outputs for the train split of `ds`, as the student objectives
/// `losses` need them (see [`teacher_needs`]), in batches of `batch` rows, when they fit in
/// `budget` bytes (0: never). Returns the cache, if built, and what was done.
pub fn cache_teacher<'a, B: Backend>(
    be: &B,
    teacher: &Model<B>,
    ds: &Dataset,
    losses: impl IntoIterator<Item = &'a LossConfig>,
    batch: usize,
    budget: u64,
) -> Result<(Option<TeacherCache<B>>, CacheOutcome)> {
    let Some(tokens) = teacher_needs(losses).filter(|_| budget > 0) else {
        return Ok((None, CacheOutcome::Off));
    };
    let start = Instant::now();
    let rows = ds.rows_of_split(TRAIN);
    let lens = kept_lengths(ds, &rows)?;
    // Slots in order of in-service length, so that each building batch is little padded.
    let mut order: Vec<(u32, u64)> = lens.iter().map(|l| l.1).zip(rows).collect();
    order.sort_unstable();
    let (slot_lens, slot_rows): (Vec<u32>, Vec<u64>) = order.into_iter().unzip();
    let n_tokens: usize = slot_lens.iter().map(|&l| l as usize).sum();
    let full = std::mem::size_of::<B::F>();
    let act = be.precision().act_bytes(full);
    let d = teacher.config.d;
    let n_slots = slot_rows.len();
    let bytes = TeacherCache::<B>::bytes(n_slots, tokens.then_some(n_tokens), d, full, act);
    if bytes > budget {
        return Ok((None, CacheOutcome::OverBudget { bytes, budget }));
    }
    let index = TeacherIndex::new(&slot_rows, &slot_lens, tokens)?;
    let mut cache = TeacherCache::zeros(be, index, teacher)?;
    let batches: Vec<Vec<u64>> = slot_rows
        .chunks(batch.max(1))
        .map(<[u64]>::to_vec)
        .collect();
    let mut pipeline = Pipeline::new(be, ds.schema(), batch.max(1))?;
    let (mut slot, mut token) = (0usize, 0usize);
    pipeline.run(be, ds, &batches, None, |_, dev| {
        let f = teacher.infer(be, &dev)?;
        let n = dev.rows;
        be.copy(n, Ref::whole(&f.logits), Mut::at(&mut cache.logits, slot));
        be.copy(
            n * d,
            Ref::whole(&f.hidden),
            Mut::at(&mut cache.hidden, slot * d),
        );
        if let Some(table) = cache.tokens.as_mut() {
            // The valid tokens of the batch's rows, in row order, from the padded output.
            let len = dev.in_service.len;
            let ids: Vec<u32> = slot_lens[slot..slot + n]
                .iter()
                .enumerate()
                .flat_map(|(r, &l)| (0..l).map(move |t| (r * len) as u32 + t))
                .collect();
            if !ids.is_empty() {
                let padded = EmbTable {
                    offset: 0,
                    vocab: n * len,
                };
                let ids_dev = be.upload_ids(&ids)?;
                let out = Mut::at(table, token * d);
                let src = &f.tokens;
                be.embedding(
                    ids.len(),
                    d,
                    &[padded],
                    &ids_dev,
                    src,
                    EmbMode::Concat,
                    out,
                    d,
                );
                token += ids.len();
            }
        }
        slot += n;
        Ok(())
    })?;
    be.synchronize()?;
    let outcome = CacheOutcome::Built {
        rows: slot,
        tokens: token,
        bytes,
        seconds: start.elapsed().as_secs_f64(),
    };
    Ok((Some(cache), outcome))
}
