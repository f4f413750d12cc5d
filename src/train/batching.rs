//! The batches of one epoch: the split's rows shuffled by seed ([`EpochOrder`]) and, with
//! length bucketing, regrouped so that rows of similar sequence length share a batch.
//!
//! A batch pads every sequence to its longest row, and sequence lengths are heavy-tailed, so
//! plain random batches spend most of their work on padding. Bucketing (on by default):
//! 1. shuffle the rows by `(seed, epoch)` ([`EpochOrder`]);
//! 2. cut that order into windows of [`BUCKET_WINDOW_BATCHES`] batches;
//! 3. sort each window by the row's cost key (stable, so ties keep the shuffled order);
//! 4. cut each window into batches;
//! 5. shuffle the list of batches by `(seed, epoch)` on a second ChaCha stream.
//!
//! Everything depends only on the seed, the epoch, the rows and their lengths, so every
//! variant of a comparison trained with the same seed sees the same batches in the same
//! order, on every machine and thread count.

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;

use crate::data::{Dataset, EpochOrder};
use crate::model::Role;
use crate::{Error, Result};

/// Batches per bucketing window.
pub const BUCKET_WINDOW_BATCHES: usize = 50;

/// Salt XOR-ed into the seed of the batch-order shuffle, so that it is not the same random
/// stream as the row shuffle of [`EpochOrder`].
const BATCH_SHUFFLE_SALT: u64 = 0x6d67_6b64_6261_7463;

/// Kept (truncated to the schema's limits) pre- and in-service lengths of `rows`.
pub fn kept_lengths(ds: &Dataset, rows: &[u64]) -> Result<Vec<(u32, u32)>> {
    let schema = ds.schema();
    let shards = ds.shards();
    rows.iter()
        .map(|&row| {
            let (s, i) = ds.locate(row)?;
            let shard = &shards[s];
            let v = shard.view();
            let len = |r: Option<std::ops::Range<usize>>, what: &str, limit: usize| {
                r.map(|r| r.len().min(limit) as u32).ok_or_else(|| {
                    Error::format(
                        shard.path(),
                        format!("tensor `{what}`: row {i} out of bounds"),
                    )
                })
            };
            Ok((
                len(v.pre.range(i), "pre_offsets", schema.pre_len)?,
                len(v.in_service.range(i), "in_offsets", schema.in_len)?,
            ))
        })
        .collect()
}

/// The cost key a training stage sorts a window by: the teacher reads the in-service
/// sequence only; the student stage runs the teacher forward on the in-service sequence and
/// the student forward and backward (about three passes) on the pre-service sequence, so
/// its key is `in + 3·pre`.
pub fn cost_key(role: Role, (pre, in_service): (u32, u32)) -> u64 {
    match role {
        Role::Teacher => u64::from(in_service),
        Role::Student => u64::from(in_service) + 3 * u64::from(pre),
    }
}

/// The batches of epoch `epoch` over `rows` (a split's rows) of `batch` rows each (the last
/// batch of the epoch, or of a window, may be smaller). With `keys` (one cost key per row
/// of `rows`, in the same order), length-bucketed as described in the module
/// documentation; without, the shuffled order cut into consecutive batches.
pub fn epoch_batches(
    rows: &[u64],
    keys: Option<&[u64]>,
    batch: usize,
    seed: u64,
    epoch: u64,
) -> Result<Vec<Vec<u64>>> {
    if batch == 0 {
        return Err(Error::invalid("batch size must be at least 1"));
    }
    let Some(keys) = keys else {
        let order = EpochOrder::new(rows, seed, epoch);
        return Ok(order.batches(batch)?.map(<[u64]>::to_vec).collect());
    };
    if keys.len() != rows.len() {
        return Err(Error::invalid(format!(
            "bucketing: {} keys for {} rows",
            keys.len(),
            rows.len()
        )));
    }
    // Shuffle positions (not row ids) so the key of each row stays at hand.
    let positions: Vec<u64> = (0..rows.len() as u64).collect();
    let order = EpochOrder::new(&positions, seed, epoch);
    let mut batches = Vec::with_capacity(rows.len().div_ceil(batch));
    for window in order.order().chunks(batch * BUCKET_WINDOW_BATCHES) {
        let mut w = window.to_vec();
        w.sort_by_key(|&p| keys[p as usize]);
        batches.extend(
            w.chunks(batch)
                .map(|c| c.iter().map(|&p| rows[p as usize]).collect::<Vec<u64>>()),
        );
    }
    let mut rng = ChaCha20Rng::seed_from_u64(seed ^ BATCH_SHUFFLE_SALT);
    rng.set_stream(epoch);
    batches.shuffle(&mut rng);
    Ok(batches)
}
