//! How the work of a data-parallel job is divided among its ranks.
//!
//! - **Training batches** ([`batch_part`]): every rank draws the same global batches from the
//!   seed (the single-process order, whatever the world size) and takes the rows at
//!   positions `rank, rank + N, rank + 2N, …` of each: the parts differ by at most one row,
//!   and, the rows of a length-bucketed batch being sorted by length, each part spans the
//!   batch's lengths (no rank gets all the long rows). A rank whose part would be empty (a
//!   last batch of fewer than N rows) runs the batch's first row with a zero share, which
//!   contributes exactly nothing.
//! - **Loss normalisation** ([`BatchShare`]): each rank's terms are scaled by its share of the
//!   global batch, so that the ranks' gradients *sum* to the gradient of the global batch's
//!   mean (and L_fine's mean over the rows with in-service events).
//! - **Per-row passes** (validation scoring; [`owned_rows`]): each rank takes the rows of its
//!   own shards, or a row range of the split when the split lies in fewer shards than there
//!   are ranks; the scores are gathered in the split's order.

use crate::data::Dataset;

/// A rank's part of one global batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    /// Dataset rows of the part (one stand-in row when `stand_in`).
    pub rows: Vec<u64>,
    /// The part is empty: `rows` holds the batch's first row, run with a zero share.
    pub stand_in: bool,
}

/// Rank `rank`'s part of the global batch `global` among `world` ranks (see the module
/// documentation). `global` must not be empty.
pub fn batch_part(global: &[u64], rank: usize, world: usize) -> Part {
    let rows: Vec<u64> = global
        .iter()
        .skip(rank)
        .step_by(world.max(1))
        .copied()
        .collect();
    if rows.is_empty() {
        Part {
            rows: global.iter().take(1).copied().collect(),
            stand_in: true,
        }
    } else {
        Part {
            rows,
            stand_in: false,
        }
    }
}

/// A rank's share of a global batch: the factors its per-row weights are scaled by.
/// `rows = n_part / n_batch` scales L_hard, L_soft, L_coarse, L_self and the teacher's
/// L_T (means over rows); `fine = |R_part| / |R_batch|` scales L_fine (a mean over the rows
/// `R` whose in-service sequence is not empty). Both are 0 for a stand-in part.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BatchShare {
    /// Share of the batch's rows.
    pub rows: f64,
    /// Share of the batch's rows with in-service events.
    pub fine: f64,
}

impl BatchShare {
    /// The share of `part` in a global batch of `batch_rows` rows of which
    /// `batch_with_events` have in-service events, `part_with_events` of them in the part.
    pub fn of(
        part: &Part,
        batch_rows: usize,
        part_with_events: usize,
        batch_with_events: usize,
    ) -> BatchShare {
        if part.stand_in || batch_rows == 0 {
            return BatchShare {
                rows: 0.0,
                fine: 0.0,
            };
        }
        BatchShare {
            rows: part.rows.len() as f64 / batch_rows as f64,
            fine: if batch_with_events == 0 {
                0.0
            } else {
                part_with_events as f64 / batch_with_events as f64
            },
        }
    }
}

/// The positions in `rows` (rows of one split, in the split's order) that each rank of
/// `world` scores (element `k`: rank `k`'s, ascending): the rows of the shards it owns — the
/// split's shards dealt out in contiguous runs, shard `j` of `S` to rank `⌊j·N/S⌋` — or,
/// when the split lies in fewer shards than there are ranks, the `k`-th of `world`
/// contiguous, near-equal ranges.
pub fn owned_rows(ds: &Dataset, rows: &[u64], world: usize) -> Vec<Vec<usize>> {
    let world = world.max(1);
    let shard: Vec<usize> = rows
        .iter()
        .map(|&r| ds.locate(r).map_or(usize::MAX, |(s, _)| s))
        .collect();
    let mut runs = shard.clone();
    runs.dedup();
    let mut distinct = runs.clone();
    distinct.sort_unstable();
    distinct.dedup();
    let mut parts = vec![Vec::new(); world];
    if distinct.len() >= world && runs.len() == distinct.len() {
        // Each shard's rows are contiguous in the split: deal the shards out.
        for (i, s) in shard.iter().enumerate() {
            let j = distinct.binary_search(s).unwrap_or(0);
            parts[j * world / distinct.len()].push(i);
        }
    } else {
        let n = rows.len();
        for (k, part) in parts.iter_mut().enumerate() {
            part.extend(n * k / world..n * (k + 1) / world);
        }
    }
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_are_strided_and_cover_the_batch_once() {
        let global: Vec<u64> = (100..111).collect();
        for world in 1..=5 {
            let mut seen: Vec<u64> = Vec::new();
            for rank in 0..world {
                let p = batch_part(&global, rank, world);
                assert!(!p.stand_in);
                let want: Vec<u64> = (0..global.len())
                    .filter(|i| i % world == rank)
                    .map(|i| global[i])
                    .collect();
                assert_eq!(p.rows, want);
                seen.extend(&p.rows);
            }
            seen.sort_unstable();
            assert_eq!(seen, global, "world {world}");
        }
    }

    #[test]
    fn an_empty_part_gets_a_stand_in_with_zero_share() {
        let global = [7u64, 8];
        let p = batch_part(&global, 2, 3);
        assert_eq!(
            p,
            Part {
                rows: vec![7],
                stand_in: true
            }
        );
        let s = BatchShare::of(&p, 2, 0, 1);
        assert_eq!((s.rows, s.fine), (0.0, 0.0));
    }

    #[test]
    fn shares_sum_to_one() {
        let global: Vec<u64> = (0..10).collect();
        let with_events = |rows: &[u64]| rows.iter().filter(|&&r| r % 3 != 0).count();
        let total_events = with_events(&global);
        let (mut rows, mut fine) = (0.0, 0.0);
        for rank in 0..4 {
            let p = batch_part(&global, rank, 4);
            let s = BatchShare::of(&p, global.len(), with_events(&p.rows), total_events);
            rows += s.rows;
            fine += s.fine;
        }
        assert!((rows - 1.0).abs() < 1e-15 && (fine - 1.0).abs() < 1e-15);
        // No row with events in the batch: L_fine is 0 on every rank.
        let s = BatchShare::of(&batch_part(&global, 0, 2), 10, 0, 0);
        assert_eq!(s.fine, 0.0);
    }
}
