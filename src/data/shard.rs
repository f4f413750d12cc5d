//! Reading one shard file (docs/model.md §3.2–§3.3): a safetensors file, memory-mapped and exposed
//! as zero-copy typed slices after a full validation against the manifest.
//!
//! Validation happens in two steps, both in [`validate_shard_bytes`] (a pure function of the
//! bytes, so it can be fuzzed):
//! 1. **Structure**: the 8-byte header length, the JSON header, every tensor's dtype, shape
//!    and `data_offsets` (in bounds, exactly `elements × dtype size` bytes, tensors tiling the
//!    data region without gap or overlap, as the safetensors format requires), the expected
//!    set of tensors (no missing, no extra), alignment of each buffer for its element type,
//!    and the file size recorded in the manifest.
//! 2. **Content**: split ids ≤ 2, labels 0/1, CSR offsets starting at 0, monotone and ending
//!    at the event count, categorical ids below their vocabulary, numeric values finite, user
//!    ids valid UTF-8.
//!
//! Every failure is an [`Error::Format`] naming the file, the tensor, and the row and field
//! where that applies.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::tensor::{Dtype, TensorInfo};

use super::manifest::{Manifest, ShardInfo};
use super::schema::{CatField, NumField, Schema};
use crate::{Error, Result};

/// Largest JSON header accepted (the safetensors crate's own limit).
pub const MAX_HEADER_BYTES: u64 = 100_000_000;

/// The CSR event tensors of one sequence kind (pre- or in-service) of a shard: events of row
/// `i` are `offsets[i]..offsets[i+1]`; `cat` is `[P, E_c]` and `num` is `[P, E_d]` row-major.
#[derive(Debug, Clone, Copy)]
pub struct EventsView<'a> {
    /// `rows + 1` offsets into the event arrays, starting at 0, monotone, last = P.
    pub offsets: &'a [u64],
    /// Categorical event fields, `[P, E_c]`.
    pub cat: &'a [u32],
    /// Numeric event fields (standardised), `[P, E_d]`.
    pub num: &'a [f32],
}

impl EventsView<'_> {
    /// Event range `start..end` of local row `row` (`None` when `row` is out of range).
    pub fn range(&self, row: usize) -> Option<Range<usize>> {
        let start = *self.offsets.get(row)?;
        let end = *self.offsets.get(row.checked_add(1)?)?;
        let start = usize::try_from(start).ok()?;
        let end = usize::try_from(end).ok()?;
        (start <= end).then_some(start..end)
    }
}

/// The user-id tensors of a shard: the id of row `i` is the UTF-8 string
/// `bytes[offsets[i]..offsets[i+1]]`.
#[derive(Debug, Clone, Copy)]
pub struct UserIdsView<'a> {
    /// `rows + 1` byte offsets, starting at 0, monotone, last = `bytes.len()`.
    pub offsets: &'a [u64],
    /// Concatenated UTF-8 ids.
    pub bytes: &'a [u8],
}

impl<'a> UserIdsView<'a> {
    /// The id of local row `row`, or `None` when `row` is out of range or the bytes are not
    /// UTF-8 (neither happens in a validated shard).
    pub fn get(&self, row: usize) -> Option<&'a str> {
        let start = usize::try_from(*self.offsets.get(row)?).ok()?;
        let end = usize::try_from(*self.offsets.get(row.checked_add(1)?)?).ok()?;
        std::str::from_utf8(self.bytes.get(start..end)?).ok()
    }
}

/// Zero-copy typed view of a validated shard's tensors.
#[derive(Debug, Clone, Copy)]
pub struct ShardView<'a> {
    /// Rows in the shard (n).
    pub rows: usize,
    /// `label u8[n]`, present when the dataset has labels.
    pub label: Option<&'a [u8]>,
    /// `split u8[n]`.
    pub split: &'a [u8],
    /// `profile_num f32[n, F_d]`.
    pub profile_num: &'a [f32],
    /// `profile_cat u32[n, F_c]`.
    pub profile_cat: &'a [u32],
    /// `pre_offsets`, `pre_cat`, `pre_num`.
    pub pre: EventsView<'a>,
    /// `in_offsets`, `in_cat`, `in_num`.
    pub in_service: EventsView<'a>,
    /// `user_id_offsets`, `user_id_bytes`, present when the dataset has user ids.
    pub user_id: Option<UserIdsView<'a>>,
}

/// Byte ranges (inside the whole file) of each tensor of a structurally valid shard.
#[derive(Debug, Clone)]
struct ShardLayout {
    rows: usize,
    /// Pre- and in-service event counts (P and the in-service total) from the manifest.
    events: [usize; 2],
    label: Option<Range<usize>>,
    split: Range<usize>,
    profile_num: Range<usize>,
    profile_cat: Range<usize>,
    pre: [Range<usize>; 3],
    in_service: [Range<usize>; 3],
    user_id: Option<[Range<usize>; 2]>,
}

/// Casts `bytes[range]` to `&[T]`; `range` must have been checked in bounds and aligned by
/// [`parse_layout`] (which uses the fallible cast on the very same bytes), so this cannot fail
/// on a layout built from these bytes.
fn cast<'a, T: bytemuck::AnyBitPattern>(bytes: &'a [u8], range: &Range<usize>) -> &'a [T] {
    if range.is_empty() {
        return &[];
    }
    bytemuck::cast_slice(&bytes[range.clone()])
}

impl ShardLayout {
    /// Typed view of `bytes`, which must be the bytes this layout was parsed from.
    fn view<'a>(&self, bytes: &'a [u8]) -> ShardView<'a> {
        let events = |r: &[Range<usize>; 3]| EventsView {
            offsets: cast(bytes, &r[0]),
            cat: cast(bytes, &r[1]),
            num: cast(bytes, &r[2]),
        };
        ShardView {
            rows: self.rows,
            label: self.label.as_ref().map(|r| cast(bytes, r)),
            split: cast(bytes, &self.split),
            profile_num: cast(bytes, &self.profile_num),
            profile_cat: cast(bytes, &self.profile_cat),
            pre: events(&self.pre),
            in_service: events(&self.in_service),
            user_id: self.user_id.as_ref().map(|[o, b]| UserIdsView {
                offsets: cast(bytes, o),
                bytes: cast(bytes, b),
            }),
        }
    }
}

/// What a shard must contain: name, dtype and shape (`None`: any 1-D length).
struct Expected {
    name: &'static str,
    dtype: Dtype,
    shape: Option<Vec<usize>>,
}

/// A manifest count as `usize`, or a format error naming the manifest field.
fn count(file: &Path, what: &str, v: u64) -> Result<usize> {
    usize::try_from(v).map_err(|_| {
        Error::format(
            file,
            format!("manifest {what} = {v} does not fit in memory"),
        )
    })
}

fn expected_tensors(file: &Path, info: &ShardInfo, manifest: &Manifest) -> Result<Vec<Expected>> {
    let s = &manifest.schema;
    let n = count(file, "rows", info.rows)?;
    let n1 = n
        .checked_add(1)
        .ok_or_else(|| Error::format(file, "manifest rows overflow"))?;
    let p = count(file, "pre_events", info.pre_events)?;
    let q = count(file, "in_events", info.in_events)?;
    let mut v = Vec::with_capacity(12);
    let e = |name, dtype, shape: Vec<usize>| Expected {
        name,
        dtype,
        shape: Some(shape),
    };
    if manifest.has_label {
        v.push(e("label", Dtype::U8, vec![n]));
    }
    v.push(e("split", Dtype::U8, vec![n]));
    v.push(e("profile_num", Dtype::F32, vec![n, s.f_num()]));
    v.push(e("profile_cat", Dtype::U32, vec![n, s.f_cat()]));
    v.push(e("pre_offsets", Dtype::U64, vec![n1]));
    v.push(e("pre_cat", Dtype::U32, vec![p, s.e_cat()]));
    v.push(e("pre_num", Dtype::F32, vec![p, s.e_num()]));
    v.push(e("in_offsets", Dtype::U64, vec![n1]));
    v.push(e("in_cat", Dtype::U32, vec![q, s.e_cat()]));
    v.push(e("in_num", Dtype::F32, vec![q, s.e_num()]));
    if manifest.has_user_id {
        v.push(e("user_id_offsets", Dtype::U64, vec![n1]));
        v.push(Expected {
            name: "user_id_bytes",
            dtype: Dtype::U8,
            shape: None,
        });
    }
    Ok(v)
}

/// Explains which manifest number a dimension of tensor `name` comes from.
fn shape_hint(name: &str) -> &'static str {
    match name {
        "label" | "split" | "profile_num" | "profile_cat" | "pre_offsets" | "in_offsets"
        | "user_id_offsets" => "rows from the manifest's shard entry, fields from the schema",
        "pre_cat" | "pre_num" => {
            "pre_events from the manifest's shard entry, fields from the schema"
        }
        "in_cat" | "in_num" => "in_events from the manifest's shard entry, fields from the schema",
        _ => "the manifest",
    }
}

/// Checks that `bytes[range]` can be viewed as `&[T]` (alignment and length).
fn check_cast<T: bytemuck::AnyBitPattern>(
    file: &Path,
    name: &str,
    bytes: &[u8],
    range: &Range<usize>,
) -> Result<()> {
    if range.is_empty() {
        return Ok(());
    }
    let slice = bytes
        .get(range.clone())
        .ok_or_else(|| Error::format(file, format!("tensor `{name}`: data out of bounds")))?;
    bytemuck::try_cast_slice::<u8, T>(slice)
        .map(|_| ())
        .map_err(|e| {
            Error::format(
                file,
                format!(
                "tensor `{name}`: its data at byte {} cannot be read as {}-byte elements ({e:?}); \
                 buffers must be aligned to their element size",
                range.start,
                std::mem::size_of::<T>()
            ),
            )
        })
}

/// Parses and checks the structure of a shard (step 1 of the module documentation).
fn parse_layout(
    file: &Path,
    bytes: &[u8],
    info: &ShardInfo,
    manifest: &Manifest,
) -> Result<ShardLayout> {
    let len = bytes.len();
    let Some(prefix) = bytes.get(..8) else {
        return Err(Error::format(
            file,
            format!("file is {len} bytes, too short for the 8-byte safetensors header length (truncated?)"),
        ));
    };
    let mut n_bytes = [0u8; 8];
    n_bytes.copy_from_slice(prefix);
    let header_len = u64::from_le_bytes(n_bytes);
    if header_len > MAX_HEADER_BYTES {
        return Err(Error::format(
            file,
            format!("safetensors header length {header_len} exceeds the limit {MAX_HEADER_BYTES} (corrupt file?)"),
        ));
    }
    // Bounded by MAX_HEADER_BYTES, so the conversion and the addition cannot overflow.
    let header_end = 8 + header_len as usize;
    let header = bytes.get(8..header_end).ok_or_else(|| {
        Error::format(
            file,
            format!("safetensors header of {header_len} bytes runs past the end of the {len}-byte file (truncated?)"),
        )
    })?;
    let header = std::str::from_utf8(header)
        .map_err(|e| Error::format(file, format!("safetensors header is not UTF-8: {e}")))?;
    let entries: HashMap<String, serde_json::Value> =
        serde_json::from_str(header).map_err(|e| {
            Error::format(
                file,
                format!("safetensors header is not a JSON object: {e}"),
            )
        })?;
    let data_len = len - header_end;

    let mut infos: HashMap<&str, TensorInfo> = HashMap::with_capacity(entries.len());
    for (name, value) in &entries {
        if name == "__metadata__" {
            serde_json::from_value::<HashMap<String, String>>(value.clone()).map_err(|e| {
                Error::format(
                    file,
                    format!("safetensors `__metadata__` is not a map of strings: {e}"),
                )
            })?;
            continue;
        }
        let ti: TensorInfo = serde_json::from_value(value.clone()).map_err(|e| {
            Error::format(
                file,
                format!("tensor `{name}`: malformed header entry: {e}"),
            )
        })?;
        infos.insert(name.as_str(), ti);
    }

    let expected = expected_tensors(file, info, manifest)?;
    let expected_names: HashSet<&str> = expected.iter().map(|e| e.name).collect();
    let mut extra: Vec<&str> = infos
        .keys()
        .copied()
        .filter(|k| !expected_names.contains(k))
        .collect();
    extra.sort_unstable();
    if let Some(name) = extra.first() {
        return Err(Error::format(
            file,
            format!(
                "unexpected tensor `{name}` (has_label = {}, has_user_id = {} in the manifest)",
                manifest.has_label, manifest.has_user_id
            ),
        ));
    }

    let mut ranges: HashMap<&str, Range<usize>> = HashMap::with_capacity(expected.len());
    for exp in &expected {
        let name = exp.name;
        let ti = infos
            .get(name)
            .ok_or_else(|| Error::format(file, format!("tensor `{name}` is missing")))?;
        if ti.dtype != exp.dtype {
            return Err(Error::format(
                file,
                format!(
                    "tensor `{name}`: dtype {:?}, expected {:?}",
                    ti.dtype, exp.dtype
                ),
            ));
        }
        match &exp.shape {
            Some(shape) if &ti.shape != shape => {
                return Err(Error::format(
                    file,
                    format!(
                        "tensor `{name}`: shape {:?}, expected {:?} ({})",
                        ti.shape,
                        shape,
                        shape_hint(name)
                    ),
                ));
            }
            None if ti.shape.len() != 1 => {
                return Err(Error::format(
                    file,
                    format!(
                        "tensor `{name}`: shape {:?}, expected one dimension",
                        ti.shape
                    ),
                ));
            }
            _ => {}
        }
        let (start, end) = ti.data_offsets;
        let nbytes = ti
            .shape
            .iter()
            .try_fold(exp.dtype.size(), |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| {
                Error::format(
                    file,
                    format!("tensor `{name}`: shape {:?} overflows", ti.shape),
                )
            })?;
        if end < start || end > data_len {
            return Err(Error::format(
                file,
                format!(
                    "tensor `{name}`: data_offsets [{start}, {end}] outside the data region of {data_len} bytes (truncated file or corrupt header)"
                ),
            ));
        }
        if end - start != nbytes {
            return Err(Error::format(
                file,
                format!(
                    "tensor `{name}`: data_offsets [{start}, {end}] span {} bytes, its shape {:?} of {:?} needs {nbytes}",
                    end - start,
                    ti.shape,
                    ti.dtype
                ),
            ));
        }
        ranges.insert(name, header_end + start..header_end + end);
    }

    // The tensors must tile the data region exactly (the safetensors format's rule).
    let mut spans: Vec<(usize, usize, &str)> = expected
        .iter()
        .filter_map(|e| {
            infos
                .get(e.name)
                .map(|t| (t.data_offsets.0, t.data_offsets.1, e.name))
        })
        .collect();
    spans.sort_unstable();
    let mut at = 0usize;
    for &(start, end, name) in &spans {
        if start != at {
            return Err(Error::format(
                file,
                format!(
                    "tensor `{name}`: data starts at {start}, expected {at} (tensor buffers overlap or leave a gap)"
                ),
            ));
        }
        at = end;
    }
    if at != data_len {
        return Err(Error::format(
            file,
            format!(
                "tensor data ends at {at} but the data region is {data_len} bytes (trailing bytes)"
            ),
        ));
    }
    if len as u64 != info.bytes {
        return Err(Error::format(
            file,
            format!(
                "file is {len} bytes, the manifest records {} bytes",
                info.bytes
            ),
        ));
    }

    let take = |name: &str| ranges.get(name).cloned();
    let get = |name: &str| {
        take(name).ok_or_else(|| Error::format(file, format!("tensor `{name}` is missing")))
    };
    let layout = ShardLayout {
        rows: count(file, "rows", info.rows)?,
        events: [
            count(file, "pre_events", info.pre_events)?,
            count(file, "in_events", info.in_events)?,
        ],
        label: if manifest.has_label {
            Some(get("label")?)
        } else {
            None
        },
        split: get("split")?,
        profile_num: get("profile_num")?,
        profile_cat: get("profile_cat")?,
        pre: [get("pre_offsets")?, get("pre_cat")?, get("pre_num")?],
        in_service: [get("in_offsets")?, get("in_cat")?, get("in_num")?],
        user_id: if manifest.has_user_id {
            Some([get("user_id_offsets")?, get("user_id_bytes")?])
        } else {
            None
        },
    };
    check_cast::<f32>(file, "profile_num", bytes, &layout.profile_num)?;
    check_cast::<u32>(file, "profile_cat", bytes, &layout.profile_cat)?;
    for (kind, r) in [("pre", &layout.pre), ("in", &layout.in_service)] {
        check_cast::<u64>(file, &format!("{kind}_offsets"), bytes, &r[0])?;
        check_cast::<u32>(file, &format!("{kind}_cat"), bytes, &r[1])?;
        check_cast::<f32>(file, &format!("{kind}_num"), bytes, &r[2])?;
    }
    if let Some([o, _]) = &layout.user_id {
        check_cast::<u64>(file, "user_id_offsets", bytes, o)?;
    }
    Ok(layout)
}

/// Checks a CSR offsets tensor: starts at 0, monotone, ends at `total`.
fn check_offsets(file: &Path, name: &str, offsets: &[u64], total: usize, what: &str) -> Result<()> {
    match offsets.first() {
        Some(0) => {}
        Some(&v) => {
            return Err(Error::format(
                file,
                format!("tensor `{name}`: row 0 starts at {v}, offsets must start at 0"),
            ))
        }
        None => return Err(Error::format(file, format!("tensor `{name}` is empty"))),
    }
    for (row, w) in offsets.windows(2).enumerate() {
        if w[1] < w[0] {
            return Err(Error::format(
                file,
                format!(
                    "tensor `{name}`: offsets not monotone at row {row}: {} then {}",
                    w[0], w[1]
                ),
            ));
        }
        if w[1] > total as u64 {
            return Err(Error::format(
                file,
                format!(
                    "tensor `{name}`: row {row} ends at {}, past the {total} {what}",
                    w[1]
                ),
            ));
        }
    }
    let last = offsets.last().copied().unwrap_or(0);
    if last != total as u64 {
        return Err(Error::format(
            file,
            format!("tensor `{name}`: last offset is {last}, expected {total} ({what})"),
        ));
    }
    Ok(())
}

/// Checks `[n, fields.len()]` categorical ids against the vocabularies; `row_of` maps an
/// element row to the dataset row named in the error.
fn check_cat(
    file: &Path,
    name: &str,
    values: &[u32],
    fields: &[CatField],
    row_of: &dyn Fn(usize) -> String,
) -> Result<()> {
    if fields.is_empty() {
        return Ok(());
    }
    for (r, chunk) in values.chunks_exact(fields.len()).enumerate() {
        for (j, (&v, f)) in chunk.iter().zip(fields).enumerate() {
            if v >= f.vocab {
                return Err(Error::format(
                    file,
                    format!(
                        "tensor `{name}`: {}, field {j} ({}): id {v} is not below the vocabulary size {}",
                        row_of(r),
                        f.name,
                        f.vocab
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// Checks `[n, fields.len()]` numeric values are finite.
fn check_num(
    file: &Path,
    name: &str,
    values: &[f32],
    fields: &[NumField],
    row_of: &dyn Fn(usize) -> String,
) -> Result<()> {
    if fields.is_empty() {
        return Ok(());
    }
    for (r, chunk) in values.chunks_exact(fields.len()).enumerate() {
        for (j, (&v, f)) in chunk.iter().zip(fields).enumerate() {
            if !v.is_finite() {
                return Err(Error::format(
                    file,
                    format!(
                        "tensor `{name}`: {}, field {j} ({}): value {v} is not finite",
                        row_of(r),
                        f.name
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// Checks the content of a structurally valid shard (step 2 of the module documentation).
fn validate_content(
    file: &Path,
    layout: &ShardLayout,
    bytes: &[u8],
    schema: &Schema,
) -> Result<()> {
    let v = layout.view(bytes);
    for (row, &s) in v.split.iter().enumerate() {
        if s > 2 {
            return Err(Error::format(
                file,
                format!("tensor `split`: row {row}: split id {s}, must be 0, 1 or 2"),
            ));
        }
    }
    if let Some(label) = v.label {
        for (row, &l) in label.iter().enumerate() {
            if l > 1 {
                return Err(Error::format(
                    file,
                    format!("tensor `label`: row {row}: label {l}, must be 0 or 1"),
                ));
            }
        }
    }
    let plain_row = |r: usize| format!("row {r}");
    check_cat(
        file,
        "profile_cat",
        v.profile_cat,
        &schema.profile_cat,
        &plain_row,
    )?;
    check_num(
        file,
        "profile_num",
        v.profile_num,
        &schema.profile_num,
        &plain_row,
    )?;
    for ((kind, ev), events) in [("pre", &v.pre), ("in", &v.in_service)]
        .into_iter()
        .zip(layout.events)
    {
        check_offsets(
            file,
            &format!("{kind}_offsets"),
            ev.offsets,
            events,
            "events",
        )?;
        // Offsets are valid: map an event index to its row by walking the offsets.
        let row_of = |e: usize| {
            let row = ev
                .offsets
                .partition_point(|&o| o <= e as u64)
                .saturating_sub(1);
            format!("row {row} (event {e})")
        };
        check_cat(
            file,
            &format!("{kind}_cat"),
            ev.cat,
            &schema.event_cat,
            &row_of,
        )?;
        check_num(
            file,
            &format!("{kind}_num"),
            ev.num,
            &schema.event_num,
            &row_of,
        )?;
    }
    if let Some(ids) = &v.user_id {
        check_offsets(
            file,
            "user_id_offsets",
            ids.offsets,
            ids.bytes.len(),
            "bytes of user_id_bytes",
        )?;
        for row in 0..v.rows {
            if ids.get(row).is_none() {
                return Err(Error::format(
                    file,
                    format!("tensor `user_id_bytes`: row {row}: user id is not valid UTF-8"),
                ));
            }
        }
    }
    Ok(())
}

/// Validates a whole shard file given as bytes against its manifest entry `info` and the
/// manifest's schema and flags, and returns the typed zero-copy view of its tensors.
///
/// `file` is only used in error messages. Pure (no I/O), total (never panics on any input):
/// the entry point for fuzzing.
pub fn validate_shard_bytes<'a>(
    file: &Path,
    bytes: &'a [u8],
    info: &ShardInfo,
    manifest: &Manifest,
) -> Result<ShardView<'a>> {
    let layout = parse_layout(file, bytes, info, manifest)?;
    validate_content(file, &layout, bytes, &manifest.schema)?;
    Ok(layout.view(bytes))
}

/// The bytes of an open shard: a memory map, or an empty buffer for a zero-length file
/// (which cannot be mapped on every platform).
enum Bytes {
    Mapped(Mmap),
    Empty,
}

impl Bytes {
    fn as_slice(&self) -> &[u8] {
        match self {
            Bytes::Mapped(m) => m,
            Bytes::Empty => &[],
        }
    }
}

/// One open, validated shard file.
pub struct Shard {
    path: PathBuf,
    bytes: Bytes,
    layout: ShardLayout,
}

impl std::fmt::Debug for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shard")
            .field("path", &self.path)
            .field("rows", &self.layout.rows)
            .finish()
    }
}

impl Shard {
    /// Memory-maps `path` and validates it fully against `info` and `manifest` (see
    /// [`validate_shard_bytes`]). A missing file is an [`Error::Io`] naming it.
    pub fn open(path: &Path, info: &ShardInfo, manifest: &Manifest) -> Result<Shard> {
        let f = File::open(path).map_err(|e| Error::io(path, e))?;
        let len = f.metadata().map_err(|e| Error::io(path, e))?.len();
        let bytes = if len == 0 {
            Bytes::Empty
        } else {
            // SAFETY: the map is read-only. As with every memory-mapped reader, another process
            // truncating the file while it is mapped is outside what we can guard against; the
            // readers below still bounds-check every file-derived index.
            Bytes::Mapped(unsafe { Mmap::map(&f) }.map_err(|e| Error::io(path, e))?)
        };
        let data = bytes.as_slice();
        let layout = parse_layout(path, data, info, manifest)?;
        validate_content(path, &layout, data, &manifest.schema)?;
        Ok(Shard {
            path: path.to_path_buf(),
            bytes,
            layout,
        })
    }

    /// The file this shard was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Rows in the shard.
    pub fn rows(&self) -> usize {
        self.layout.rows
    }

    /// The whole file's bytes (the memory map).
    pub fn bytes(&self) -> &[u8] {
        self.bytes.as_slice()
    }

    /// Zero-copy typed view of the tensors (validated at [`Shard::open`]).
    pub fn view(&self) -> ShardView<'_> {
        self.layout.view(self.bytes.as_slice())
    }
}
