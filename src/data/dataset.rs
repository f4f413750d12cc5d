//! An open dataset directory (docs/model.md §3): the manifest plus every shard memory-mapped and
//! validated, global row lookup, batch assembly ([`Dataset::gather`]) and the per-epoch
//! shuffled order of a split ([`EpochOrder`]).

use std::collections::HashSet;
use std::ops::Range;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use rayon::prelude::*;

use super::batch::{Batch, EventBatch};
use super::manifest::{Manifest, MANIFEST_FILE, SPLIT_NAMES};
use super::schema::{NumField, Schema};
use super::shard::{validate_shard_bytes, EventsView, Shard, ShardView};
use super::writer::sha256_hex;
use crate::{Error, Result};

/// Rows per work item of [`Dataset::gather`]: a constant, so the split of the work (and
/// hence the result) does not depend on the number of threads.
pub const GATHER_CHUNK_ROWS: usize = 64;

/// Checks a manifest's internal consistency (`file` names it in errors): three splits in
/// order whose rows add up to `rows`, shard rows adding up to `rows`, plain and unique shard
/// file names (no `/`, `\`, `..`), well-formed sha256 strings, and a sane schema (every
/// vocabulary ≥ 1, length limits ≥ 1, every numeric field's mean finite and std finite and
/// > 0).
pub fn check_manifest(file: &Path, m: &Manifest) -> Result<()> {
    let bad = |msg: String| Err(Error::format(file, msg));
    check_schema(file, &m.schema)?;
    if m.splits.len() != 3 {
        return bad(format!(
            "field `splits` has {} entries, expected 3 (train, valid, test)",
            m.splits.len()
        ));
    }
    let mut split_rows = 0u64;
    for (i, s) in m.splits.iter().enumerate() {
        if usize::from(s.split) != i || s.name != SPLIT_NAMES[i] {
            return bad(format!(
                "field `splits[{i}]` is split {} {:?}, expected split {i} {:?}",
                s.split, s.name, SPLIT_NAMES[i]
            ));
        }
        if s.positives > s.rows || (!m.has_label && s.positives != 0) {
            return bad(format!(
                "field `splits[{i}].positives` is {} with {} rows (has_label = {})",
                s.positives, s.rows, m.has_label
            ));
        }
        let rate = if s.rows > 0 {
            s.positives as f64 / s.rows as f64
        } else {
            0.0
        };
        if !s.default_rate.is_finite() || (s.default_rate - rate).abs() > 1e-9 {
            return bad(format!(
                "field `splits[{i}].default_rate` is {}, but positives/rows is {rate}",
                s.default_rate
            ));
        }
        split_rows = split_rows
            .checked_add(s.rows)
            .ok_or_else(|| Error::format(file, "field `splits`: row counts overflow"))?;
    }
    if split_rows != m.rows {
        return bad(format!(
            "field `rows` is {}, but the splits hold {split_rows} rows",
            m.rows
        ));
    }
    let mut shard_rows = 0u64;
    let mut names = HashSet::new();
    for (i, s) in m.shards.iter().enumerate() {
        let f = &s.file;
        if f.is_empty()
            || f.contains('/')
            || f.contains('\\')
            || f.contains("..")
            || f.contains('\0')
            || f == "."
            || f == MANIFEST_FILE
        {
            return bad(format!(
                "field `shards[{i}].file` is {f:?}: a shard must be a plain file name inside the dataset directory"
            ));
        }
        if !names.insert(f.as_str()) {
            return bad(format!("field `shards[{i}].file`: {f:?} is listed twice"));
        }
        if s.sha256.len() != 64
            || !s
                .sha256
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return bad(format!(
                "field `shards[{i}].sha256` is {:?}, expected 64 lower-case hex digits",
                s.sha256
            ));
        }
        shard_rows = shard_rows
            .checked_add(s.rows)
            .ok_or_else(|| Error::format(file, "field `shards`: row counts overflow"))?;
    }
    if shard_rows != m.rows {
        return bad(format!(
            "field `rows` is {}, but the shards hold {shard_rows} rows",
            m.rows
        ));
    }
    Ok(())
}

/// Checks the schema part of a manifest (see [`check_manifest`]).
fn check_schema(file: &Path, s: &Schema) -> Result<()> {
    let bad = |msg: String| Err(Error::format(file, msg));
    for (group, fields) in [("profile_cat", &s.profile_cat), ("event_cat", &s.event_cat)] {
        for (j, f) in fields.iter().enumerate() {
            if f.vocab == 0 {
                return bad(format!(
                    "field `schema.{group}[{j}]` ({}): vocab is 0, must be at least 1",
                    f.name
                ));
            }
        }
    }
    let num: [(&str, &Vec<NumField>); 2] =
        [("profile_num", &s.profile_num), ("event_num", &s.event_num)];
    for (group, fields) in num {
        for (j, f) in fields.iter().enumerate() {
            if !f.mean.is_finite() || !f.std.is_finite() || f.std <= 0.0 {
                return bad(format!(
                    "field `schema.{group}[{j}]` ({}): mean {} / std {}: the mean must be finite and the std finite and > 0",
                    f.name, f.mean, f.std
                ));
            }
        }
    }
    if s.pre_len == 0 || s.in_len == 0 {
        return bad(format!(
            "field `schema`: pre_len = {}, in_len = {}: length limits must be at least 1",
            s.pre_len, s.in_len
        ));
    }
    Ok(())
}

/// What [`Dataset::verify`] checked.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct VerifyReport {
    /// Shards re-hashed and re-validated.
    pub shards: usize,
    /// Rows in those shards.
    pub rows: u64,
    /// Bytes hashed.
    pub bytes: u64,
}

/// Where a gathered row comes from, and which of its events are kept.
struct RowRef {
    shard: usize,
    local: usize,
    pre: Range<usize>,
    in_service: Range<usize>,
}

/// The output slices of one chunk of a gathered batch.
struct ChunkOut<'a> {
    refs: &'a [RowRef],
    labels: &'a mut [u8],
    profile_num: &'a mut [f32],
    profile_cat: &'a mut [u32],
    pre_cat: &'a mut [u32],
    pre_num: &'a mut [f32],
    in_cat: &'a mut [u32],
    in_num: &'a mut [f32],
}

/// Splits `buf` into consecutive pieces of `per_row × rows_c` elements for each chunk size
/// `rows_c` (zero-length pieces when `per_row` is 0).
fn split_chunks<'a, T>(mut buf: &'a mut [T], per_row: usize, chunks: &[usize]) -> Vec<&'a mut [T]> {
    let mut out = Vec::with_capacity(chunks.len());
    for &rows in chunks {
        let (head, tail) = std::mem::take(&mut buf).split_at_mut(rows * per_row);
        out.push(head);
        buf = tail;
    }
    out
}

/// The kept (most recent, at most `limit`) events of a row with events `range`.
fn kept(range: Range<usize>, limit: usize) -> Range<usize> {
    range.end.saturating_sub(limit).max(range.start)..range.end
}

/// An open, validated dataset directory.
#[derive(Debug)]
pub struct Dataset {
    dir: PathBuf,
    manifest: Manifest,
    shards: Vec<Shard>,
    /// Cumulative row counts: shard `k` holds global rows `starts[k]..starts[k+1]`.
    starts: Vec<u64>,
}

impl Dataset {
    /// Opens the dataset in `dir`: loads and checks `dataset.json` ([`check_manifest`]),
    /// memory-maps and validates every shard against it (in parallel), and checks the
    /// per-split row and default counts against the shards' data.
    pub fn open(dir: &Path) -> Result<Dataset> {
        let manifest = Manifest::load(dir)?;
        let manifest_path = dir.join(MANIFEST_FILE);
        check_manifest(&manifest_path, &manifest)?;
        let opened: Vec<Result<Shard>> = manifest
            .shards
            .par_iter()
            .map(|info| Shard::open(&dir.join(&info.file), info, &manifest))
            .collect();
        let shards = opened.into_iter().collect::<Result<Vec<_>>>()?;
        let mut starts = Vec::with_capacity(shards.len() + 1);
        starts.push(0u64);
        for info in &manifest.shards {
            // Sums were checked not to overflow in check_manifest.
            starts.push(starts[starts.len() - 1] + info.rows);
        }
        let ds = Dataset {
            dir: dir.to_path_buf(),
            manifest,
            shards,
            starts,
        };
        ds.check_split_counts(&manifest_path)?;
        Ok(ds)
    }

    /// Compares the manifest's per-split rows and positives with the shards' data.
    fn check_split_counts(&self, manifest_path: &Path) -> Result<()> {
        let counts: Vec<[u64; 6]> = self
            .shards
            .par_iter()
            .map(|s| {
                let v = s.view();
                let mut c = [0u64; 6];
                for (i, &sp) in v.split.iter().enumerate() {
                    let sp = usize::from(sp.min(2));
                    c[sp] += 1;
                    c[3 + sp] += v.label.and_then(|l| l.get(i)).copied().map_or(0, u64::from);
                }
                c
            })
            .collect();
        let mut total = [0u64; 6];
        for c in counts {
            for (t, v) in total.iter_mut().zip(c) {
                *t += v;
            }
        }
        for (i, s) in self.manifest.splits.iter().enumerate() {
            if s.rows != total[i] || s.positives != total[3 + i] {
                return Err(Error::format(
                    manifest_path,
                    format!(
                        "field `splits[{i}]` ({}) records {} rows and {} positives, the shards hold {} and {}",
                        s.name, s.rows, s.positives, total[i], total[3 + i]
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The dataset directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The schema.
    pub fn schema(&self) -> &Schema {
        &self.manifest.schema
    }

    /// Total rows.
    pub fn rows(&self) -> u64 {
        self.manifest.rows
    }

    /// The open shards, in row order.
    pub fn shards(&self) -> &[Shard] {
        &self.shards
    }

    /// Maps a global row to (shard index, row inside the shard) by binary search on the
    /// cumulative row counts.
    pub fn locate(&self, row: u64) -> Result<(usize, usize)> {
        if row >= self.rows() {
            return Err(Error::invalid(format!(
                "row {row} is out of range: the dataset {} has {} rows",
                self.dir.display(),
                self.rows()
            )));
        }
        // starts[0] = 0 ≤ row, so the partition point is ≥ 1.
        let shard = self.starts.partition_point(|&s| s <= row) - 1;
        // row − starts[shard] < rows of that shard, which fits in usize (checked at open).
        Ok((shard, (row - self.starts[shard]) as usize))
    }

    /// Global row indices of split `split` (0 train, 1 valid, 2 test), ascending; empty for
    /// any other id.
    pub fn rows_of_split(&self, split: u8) -> Vec<u64> {
        let mut out = Vec::new();
        for (shard, start) in self.shards.iter().zip(&self.starts) {
            out.extend(
                shard
                    .view()
                    .split
                    .iter()
                    .enumerate()
                    .filter(|&(_, &s)| s == split)
                    .map(|(i, _)| start + i as u64),
            );
        }
        out
    }

    /// Label of global row `row` (`None` for an unlabelled dataset).
    pub fn label(&self, row: u64) -> Result<Option<u8>> {
        let (s, i) = self.locate(row)?;
        Ok(self.shards[s].view().label.and_then(|l| l.get(i).copied()))
    }

    /// User id of global row `row` (`None` when the dataset has no user ids).
    pub fn user_id(&self, row: u64) -> Result<Option<&str>> {
        let (s, i) = self.locate(row)?;
        let shard = &self.shards[s];
        match shard.view().user_id {
            None => Ok(None),
            Some(ids) => ids.get(i).map(Some).ok_or_else(|| {
                Error::format(
                    shard.path(),
                    format!("tensor `user_id_bytes`: row {i}: unreadable user id"),
                )
            }),
        }
    }

    /// Re-reads every shard from disk, compares its size and SHA-256 with the manifest and
    /// validates it again (in parallel across shards). The first failing shard in manifest
    /// order is reported.
    pub fn verify(&self) -> Result<VerifyReport> {
        let results: Vec<Result<()>> = self
            .manifest
            .shards
            .par_iter()
            .map(|info| {
                let path = self.dir.join(&info.file);
                let f = std::fs::File::open(&path).map_err(|e| Error::io(&path, e))?;
                let len = f.metadata().map_err(|e| Error::io(&path, e))?.len();
                let map;
                let bytes: &[u8] = if len == 0 {
                    &[]
                } else {
                    // SAFETY: read-only map; see `Shard::open`.
                    map = unsafe { Mmap::map(&f) }.map_err(|e| Error::io(&path, e))?;
                    &map
                };
                let sha = sha256_hex(bytes);
                if sha != info.sha256 {
                    return Err(Error::format(
                        &path,
                        format!(
                            "sha256 is {sha}, the manifest records {} (file changed or corrupt)",
                            info.sha256
                        ),
                    ));
                }
                validate_shard_bytes(&path, bytes, info, &self.manifest).map(|_| ())
            })
            .collect();
        results.into_iter().collect::<Result<Vec<()>>>()?;
        Ok(VerifyReport {
            shards: self.manifest.shards.len(),
            rows: self.rows(),
            bytes: self.manifest.shards.iter().map(|s| s.bytes).sum(),
        })
    }

    /// Assembles the rows `rows` (global indices, any order, repeats allowed) into a
    /// [`Batch`] laid out as documented in [`super::batch`]: per sequence, the most recent
    /// `min(len, limit)` events in slots `0..kept` oldest first, zero padding up to the
    /// batch's largest kept length. Work is split into chunks of [`GATHER_CHUNK_ROWS`] rows
    /// run in parallel; the result does not depend on the number of threads.
    pub fn gather(&self, rows: &[u64]) -> Result<Batch> {
        let schema = self.schema();
        let views: Vec<ShardView<'_>> = self.shards.iter().map(|s| s.view()).collect();
        let out_of_bounds = |shard: usize, tensor: &str, local: usize| {
            Error::format(
                self.shards[shard].path(),
                format!("tensor `{tensor}`: row {local} out of bounds (file changed since it was opened?)"),
            )
        };
        // Pass 1: locate the rows and their kept event ranges.
        let located: Vec<Result<Vec<RowRef>>> = rows
            .par_chunks(GATHER_CHUNK_ROWS)
            .map(|chunk| {
                chunk
                    .iter()
                    .map(|&row| {
                        let (shard, local) = self.locate(row)?;
                        let v = &views[shard];
                        let range = |ev: &EventsView<'_>, name: &str| {
                            ev.range(local)
                                .ok_or_else(|| out_of_bounds(shard, name, local))
                        };
                        Ok(RowRef {
                            shard,
                            local,
                            pre: kept(range(&v.pre, "pre_offsets")?, schema.pre_len),
                            in_service: kept(range(&v.in_service, "in_offsets")?, schema.in_len),
                        })
                    })
                    .collect()
            })
            .collect();
        let mut refs = Vec::with_capacity(rows.len());
        for chunk in located {
            refs.extend(chunk?);
        }
        let max_pre = refs.iter().map(|r| r.pre.len()).max().unwrap_or(0);
        let max_in = refs.iter().map(|r| r.in_service.len()).max().unwrap_or(0);
        let lens = |f: fn(&RowRef) -> usize| -> Result<Vec<u32>> {
            refs.iter()
                .map(|r| {
                    u32::try_from(f(r))
                        .map_err(|_| Error::invalid("sequence length limit exceeds u32"))
                })
                .collect()
        };
        let pre_lens = lens(|r| r.pre.len())?;
        let in_lens = lens(|r| r.in_service.len())?;

        // Pass 2: fill the padded buffers chunk by chunk.
        let n = rows.len();
        let (fd, fc, ec, ed) = (
            schema.f_num(),
            schema.f_cat(),
            schema.e_cat(),
            schema.e_num(),
        );
        let has_label = self.manifest.has_label;
        let size = |per_row: usize| {
            n.checked_mul(per_row)
                .ok_or_else(|| Error::invalid(format!("batch of {n} rows is too large")))
        };
        let mut labels = vec![0u8; if has_label { n } else { 0 }];
        let mut profile_num = vec![0f32; size(fd)?];
        let mut profile_cat = vec![0u32; size(fc)?];
        let mut pre_cat = vec![0u32; size(max_pre * ec)?];
        let mut pre_num = vec![0f32; size(max_pre * ed)?];
        let mut in_cat = vec![0u32; size(max_in * ec)?];
        let mut in_num = vec![0f32; size(max_in * ed)?];
        let chunk_rows: Vec<usize> = refs.chunks(GATHER_CHUNK_ROWS).map(|c| c.len()).collect();
        let mut outs: Vec<ChunkOut<'_>> = refs
            .chunks(GATHER_CHUNK_ROWS)
            .zip(split_chunks(
                &mut labels,
                usize::from(has_label),
                &chunk_rows,
            ))
            .zip(split_chunks(&mut profile_num, fd, &chunk_rows))
            .zip(split_chunks(&mut profile_cat, fc, &chunk_rows))
            .zip(split_chunks(&mut pre_cat, max_pre * ec, &chunk_rows))
            .zip(split_chunks(&mut pre_num, max_pre * ed, &chunk_rows))
            .zip(split_chunks(&mut in_cat, max_in * ec, &chunk_rows))
            .zip(split_chunks(&mut in_num, max_in * ed, &chunk_rows))
            .map(
                |(
                    ((((((refs, labels), profile_num), profile_cat), pre_cat), pre_num), in_cat),
                    in_num,
                )| {
                    ChunkOut {
                        refs,
                        labels,
                        profile_num,
                        profile_cat,
                        pre_cat,
                        pre_num,
                        in_cat,
                        in_num,
                    }
                },
            )
            .collect();
        let filled: Vec<Result<()>> = outs
            .par_iter_mut()
            .map(|out| {
                for (i, r) in out.refs.iter().enumerate() {
                    let v = &views[r.shard];
                    let l = r.local;
                    let oob = |t: &str| out_of_bounds(r.shard, t, l);
                    if has_label {
                        out.labels[i] = *v
                            .label
                            .and_then(|lab| lab.get(l))
                            .ok_or_else(|| oob("label"))?;
                    }
                    copy_rows(out.profile_num, i * fd, v.profile_num, l..l + 1, fd)
                        .ok_or_else(|| oob("profile_num"))?;
                    copy_rows(out.profile_cat, i * fc, v.profile_cat, l..l + 1, fc)
                        .ok_or_else(|| oob("profile_cat"))?;
                    copy_rows(out.pre_cat, i * max_pre * ec, v.pre.cat, r.pre.clone(), ec)
                        .ok_or_else(|| oob("pre_cat"))?;
                    copy_rows(out.pre_num, i * max_pre * ed, v.pre.num, r.pre.clone(), ed)
                        .ok_or_else(|| oob("pre_num"))?;
                    let ins = r.in_service.clone();
                    copy_rows(
                        out.in_cat,
                        i * max_in * ec,
                        v.in_service.cat,
                        ins.clone(),
                        ec,
                    )
                    .ok_or_else(|| oob("in_cat"))?;
                    copy_rows(out.in_num, i * max_in * ed, v.in_service.num, ins, ed)
                        .ok_or_else(|| oob("in_num"))?;
                }
                Ok(())
            })
            .collect();
        drop(outs);
        filled.into_iter().collect::<Result<Vec<()>>>()?;
        Ok(Batch {
            rows: n,
            row_index: rows.to_vec(),
            labels: has_label.then_some(labels),
            profile_num,
            profile_cat,
            pre: EventBatch {
                max_len: max_pre,
                lens: pre_lens,
                cat: pre_cat,
                num: pre_num,
            },
            in_service: EventBatch {
                max_len: max_in,
                lens: in_lens,
                cat: in_cat,
                num: in_num,
            },
        })
    }
}

/// Copies source rows `rows` of width `width` from `src` into `dst` starting at element
/// `at`; `None` when a range is out of bounds.
fn copy_rows<T: Copy>(
    dst: &mut [T],
    at: usize,
    src: &[T],
    rows: Range<usize>,
    width: usize,
) -> Option<()> {
    let s = src.get(rows.start.checked_mul(width)?..rows.end.checked_mul(width)?)?;
    dst.get_mut(at..at.checked_add(s.len())?)?
        .copy_from_slice(s);
    Some(())
}

/// The shuffled row order of one epoch of a split.
///
/// The permutation is a Fisher–Yates shuffle driven by ChaCha20 seeded with `seed`, on
/// stream `epoch` (`set_stream`), so every (seed, epoch) pair has its own independent,
/// reproducible order, identical on every machine and thread count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EpochOrder {
    order: Vec<u64>,
}

impl EpochOrder {
    /// Shuffles `rows` (a split's global row indices) for epoch `epoch` under `seed`.
    pub fn new(rows: &[u64], seed: u64, epoch: u64) -> EpochOrder {
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        rng.set_stream(epoch);
        let mut order = rows.to_vec();
        order.shuffle(&mut rng);
        EpochOrder { order }
    }

    /// The shuffled rows.
    pub fn order(&self) -> &[u64] {
        &self.order
    }

    /// Number of batches of `batch_size` rows (the last partial batch counts).
    pub fn num_batches(&self, batch_size: usize) -> usize {
        if batch_size == 0 {
            0
        } else {
            self.order.len().div_ceil(batch_size)
        }
    }

    /// The order cut into consecutive batches of `batch_size` rows; the last batch keeps the
    /// remainder (it may be smaller). A zero batch size is an error.
    pub fn batches(&self, batch_size: usize) -> Result<std::slice::Chunks<'_, u64>> {
        if batch_size == 0 {
            return Err(Error::invalid("batch size must be at least 1"));
        }
        Ok(self.order.chunks(batch_size))
    }
}
