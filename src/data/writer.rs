//! Streaming dataset writer: rows go in one at a time, shards of a bounded size come out.
//!
//! Crash safety: each shard is written to `shard-NNNNN.safetensors.tmp`, flushed, synced and
//! then renamed; `dataset.json` is written the same way, last of all. A directory without
//! `dataset.json` is never taken for a dataset, so a crash never leaves something that looks
//! complete. A writer dropped without [`DatasetWriter::finish`] (an error part-way) removes
//! every file it created, and the directory too when it created it; until `finish` they are
//! also registered with [`crate::io::cleanup`], so SIGINT/SIGTERM remove them as well.

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, TensorView, View};
use sha2::{Digest, Sha256};

use super::manifest::{
    Manifest, ShardInfo, SplitStats, TimeSpans, FORMAT_NAME, FORMAT_VERSION, MANIFEST_FILE,
    SPLIT_NAMES,
};
use super::schema::Schema;
use crate::io::cleanup::{self, Registration, Removal};
use crate::{Error, Result};

/// Default target size of one shard file.
pub const DEFAULT_SHARD_BYTES: u64 = 256 << 20;

/// Options of a [`DatasetWriter`].
#[derive(Debug, Clone)]
pub struct WriterOptions {
    /// Close a shard once its tensors reach this many bytes.
    pub shard_bytes: u64,
    /// Close a shard once it holds this many rows (in addition to the byte bound).
    pub shard_rows: Option<usize>,
    /// Whether rows carry labels (false: new applicants, no `label` tensor).
    pub has_label: bool,
    /// Whether rows carry user ids (stored as UTF-8 in `user_id_offsets`/`user_id_bytes`).
    pub has_user_id: bool,
    /// Free text stored in the manifest's `source` field.
    pub source: String,
}

impl Default for WriterOptions {
    fn default() -> Self {
        WriterOptions {
            shard_bytes: DEFAULT_SHARD_BYTES,
            shard_rows: None,
            has_label: true,
            has_user_id: false,
            source: String::new(),
        }
    }
}

/// One row to write, borrowed from the caller. Event slices are flattened row-major:
/// `pre_cat` is `[n_pre, E_c]`, `pre_num` is `[n_pre, E_d]`, events oldest first.
#[derive(Debug, Clone, Copy)]
pub struct RowData<'a> {
    /// Label 0/1; must be `Some` exactly when the writer was opened with `has_label`.
    pub label: Option<u8>,
    /// Split id 0/1/2.
    pub split: u8,
    /// User id; must be `Some` exactly when the writer was opened with `has_user_id`.
    pub user_id: Option<&'a str>,
    /// Dense profile fields, F_d values, already standardised.
    pub profile_num: &'a [f32],
    /// Categorical profile ids, F_c values.
    pub profile_cat: &'a [u32],
    /// Pre-service event categorical ids, `[n_pre, E_c]`.
    pub pre_cat: &'a [u32],
    /// Pre-service event numbers, `[n_pre, E_d]`, standardised.
    pub pre_num: &'a [f32],
    /// In-service event categorical ids, `[n_in, E_c]`.
    pub in_cat: &'a [u32],
    /// In-service event numbers, `[n_in, E_d]`, standardised.
    pub in_num: &'a [f32],
}

/// Column buffers of the shard being filled.
#[derive(Default)]
struct ShardBuffers {
    rows: usize,
    label: Vec<u8>,
    split: Vec<u8>,
    profile_num: Vec<f32>,
    profile_cat: Vec<u32>,
    pre_offsets: Vec<u64>,
    pre_cat: Vec<u32>,
    pre_num: Vec<f32>,
    in_offsets: Vec<u64>,
    in_cat: Vec<u32>,
    in_num: Vec<f32>,
    user_id_offsets: Vec<u64>,
    user_id_bytes: Vec<u8>,
}

impl ShardBuffers {
    fn new() -> Self {
        ShardBuffers {
            pre_offsets: vec![0],
            in_offsets: vec![0],
            user_id_offsets: vec![0],
            ..Default::default()
        }
    }

    /// Empties the buffers for the next shard, keeping their allocations (the next shard
    /// is usually as large, so it neither reallocates nor faults its pages in again).
    fn clear(&mut self) {
        self.rows = 0;
        for v in [&mut self.label, &mut self.split, &mut self.user_id_bytes] {
            v.clear();
        }
        for v in [&mut self.profile_num, &mut self.pre_num, &mut self.in_num] {
            v.clear();
        }
        for v in [&mut self.profile_cat, &mut self.pre_cat, &mut self.in_cat] {
            v.clear();
        }
        for v in [
            &mut self.pre_offsets,
            &mut self.in_offsets,
            &mut self.user_id_offsets,
        ] {
            v.clear();
            v.push(0);
        }
    }

    /// Bytes of tensor data held so far.
    fn bytes(&self) -> u64 {
        (self.label.len()
            + self.split.len()
            + self.user_id_bytes.len()
            + 4 * (self.profile_num.len()
                + self.profile_cat.len()
                + self.pre_cat.len()
                + self.pre_num.len()
                + self.in_cat.len()
                + self.in_num.len())
            + 8 * (self.pre_offsets.len() + self.in_offsets.len() + self.user_id_offsets.len()))
            as u64
    }
}

/// Writes a dataset directory shard by shard; see the module documentation.
pub struct DatasetWriter {
    dir: PathBuf,
    created_dir: bool,
    schema: Schema,
    options: WriterOptions,
    buffers: ShardBuffers,
    shards: Vec<ShardInfo>,
    /// Files written so far (final names), removed if the writer is dropped unfinished.
    written: Vec<PathBuf>,
    /// The directory (when created) and every file, registered for removal on a signal
    /// until the dataset is finished.
    registrations: Vec<Registration>,
    split_rows: [u64; 3],
    split_positives: [u64; 3],
    rows: u64,
    finished: bool,
    /// The manifest's `times` (set by `import`).
    times: Option<TimeSpans>,
}

impl DatasetWriter {
    /// Starts a dataset in `dir`. The directory is created if missing; an existing one must
    /// not already hold a dataset (a `dataset.json`) or shard files.
    pub fn create(dir: &Path, schema: Schema, options: WriterOptions) -> Result<DatasetWriter> {
        if options.shard_bytes == 0 || options.shard_rows == Some(0) {
            return Err(Error::invalid(
                "shard size must be at least one byte and one row",
            ));
        }
        let created_dir = !dir.exists();
        let mut registrations = Vec::new();
        if created_dir {
            let ((), reg) = cleanup::create(dir, Removal::EmptyDir, |d| fs::create_dir_all(d))
                .map_err(|e| Error::io(dir, e))?;
            registrations.push(reg);
        } else {
            let entries = fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
            for entry in entries {
                let entry = entry.map_err(|e| Error::io(dir, e))?;
                let name = entry.file_name();
                let name = name.to_string_lossy();
                if name == MANIFEST_FILE {
                    return Err(Error::invalid(format!(
                        "{}: already holds a dataset ({name}); choose an empty or new directory",
                        dir.display()
                    )));
                }
                if name.starts_with("shard-") {
                    return Err(Error::invalid(format!(
                        "{}: holds {name} but no {MANIFEST_FILE}: the remains of a run that was \
                         killed before it finished (an interrupted run removes its files; \
                         SIGKILL cannot be caught); remove the shard-* files, or choose an \
                         empty or new directory",
                        dir.display()
                    )));
                }
            }
        }
        Ok(DatasetWriter {
            dir: dir.to_path_buf(),
            created_dir,
            schema,
            options,
            buffers: ShardBuffers::new(),
            shards: Vec::new(),
            written: Vec::new(),
            registrations,
            split_rows: [0; 3],
            split_positives: [0; 3],
            rows: 0,
            finished: false,
            times: None,
        })
    }

    /// Makes `path` (a file the caller writes into the dataset directory, e.g. a sidecar)
    /// part of the dataset: registered for removal on a signal until [`finish`] and removed
    /// when the writer is dropped unfinished.
    ///
    /// [`finish`]: DatasetWriter::finish
    pub fn adopt(&mut self, path: &Path) {
        self.registrations
            .push(cleanup::register(path, Removal::File));
        self.written.push(path.to_path_buf());
    }

    /// The schema rows are checked against.
    pub fn schema(&self) -> &Schema {
        &self.schema
    }

    /// Rows pushed so far.
    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// Checks `row` against the schema and appends it; writes a shard when the current one
    /// is full. Errors name the row (0-based, in push order) and the field.
    pub fn push(&mut self, row: &RowData<'_>) -> Result<()> {
        self.check_row(row)?;
        let b = &mut self.buffers;
        b.rows += 1;
        if let Some(label) = row.label {
            b.label.push(label);
            self.split_positives[row.split as usize] += label as u64;
        }
        b.split.push(row.split);
        self.split_rows[row.split as usize] += 1;
        b.profile_num.extend_from_slice(row.profile_num);
        b.profile_cat.extend_from_slice(row.profile_cat);
        b.pre_cat.extend_from_slice(row.pre_cat);
        b.pre_num.extend_from_slice(row.pre_num);
        let n_pre = Self::events(
            row.pre_cat,
            self.schema.e_cat(),
            row.pre_num,
            self.schema.e_num(),
        );
        b.pre_offsets
            .push(b.pre_offsets[b.pre_offsets.len() - 1] + n_pre as u64);
        b.in_cat.extend_from_slice(row.in_cat);
        b.in_num.extend_from_slice(row.in_num);
        let n_in = Self::events(
            row.in_cat,
            self.schema.e_cat(),
            row.in_num,
            self.schema.e_num(),
        );
        b.in_offsets
            .push(b.in_offsets[b.in_offsets.len() - 1] + n_in as u64);
        if let Some(id) = row.user_id {
            b.user_id_bytes.extend_from_slice(id.as_bytes());
            b.user_id_offsets.push(b.user_id_bytes.len() as u64);
        }
        self.rows += 1;
        let full_rows = self.options.shard_rows.is_some_and(|n| b.rows >= n);
        if full_rows || b.bytes() >= self.options.shard_bytes {
            self.flush_shard()?;
        }
        Ok(())
    }

    /// Number of events in a flattened event slice pair (already checked consistent).
    fn events(cat: &[u32], e_cat: usize, num: &[f32], e_num: usize) -> usize {
        cat.len()
            .checked_div(e_cat)
            .or_else(|| num.len().checked_div(e_num))
            .unwrap_or(0)
    }

    fn check_row(&self, row: &RowData<'_>) -> Result<()> {
        let r = self.rows;
        let s = &self.schema;
        let bad = |msg: String| Err(Error::invalid(format!("row {r}: {msg}")));
        match (row.label, self.options.has_label) {
            (Some(l), true) if l > 1 => return bad(format!("label is {l}, must be 0 or 1")),
            (Some(_), true) | (None, false) => {}
            (None, true) => return bad("label missing in a labelled dataset".into()),
            (Some(_), false) => return bad("label given in an unlabelled dataset".into()),
        }
        if row.split > 2 {
            return bad(format!("split is {}, must be 0, 1 or 2", row.split));
        }
        if row.user_id.is_some() != self.options.has_user_id {
            return bad("user id present in some rows and not others".into());
        }
        if row.profile_num.len() != s.f_num() {
            return bad(format!(
                "profile_num has {} values, the schema has {}",
                row.profile_num.len(),
                s.f_num()
            ));
        }
        if row.profile_cat.len() != s.f_cat() {
            return bad(format!(
                "profile_cat has {} values, the schema has {}",
                row.profile_cat.len(),
                s.f_cat()
            ));
        }
        for (j, (&v, f)) in row.profile_num.iter().zip(&s.profile_num).enumerate() {
            if !v.is_finite() {
                return bad(format!("profile_num[{j}] ({}) is {v}", f.name));
            }
        }
        for (j, (&v, f)) in row.profile_cat.iter().zip(&s.profile_cat).enumerate() {
            if v >= f.vocab {
                return bad(format!(
                    "profile_cat[{j}] ({}) id {v} is not below the vocabulary size {}",
                    f.name, f.vocab
                ));
            }
        }
        for (kind, cat, num) in [
            ("pre", row.pre_cat, row.pre_num),
            ("in", row.in_cat, row.in_num),
        ] {
            let (ec, ed) = (s.e_cat(), s.e_num());
            let n = Self::events(cat, ec, num, ed);
            if cat.len() != n * ec || num.len() != n * ed {
                return bad(format!(
                    "{kind}_cat has {} values and {kind}_num {}: not a whole number of events of {ec} + {ed} fields",
                    cat.len(),
                    num.len()
                ));
            }
            // Fast path: a whole-event scan without index arithmetic; only a failing slice
            // is walked again value by value to name the first bad one.
            let cat_ok = ec == 0
                || cat
                    .chunks_exact(ec)
                    .all(|ev| ev.iter().zip(&s.event_cat).all(|(&v, f)| v < f.vocab));
            let num_ok = num.iter().all(|v| v.is_finite());
            if cat_ok && num_ok {
                continue;
            }
            for (i, &v) in cat.iter().enumerate() {
                let f = &s.event_cat[i % ec];
                if v >= f.vocab {
                    return bad(format!(
                        "{kind}_cat event {} field {} ({}) id {v} is not below the vocabulary size {}",
                        i / ec,
                        i % ec,
                        f.name,
                        f.vocab
                    ));
                }
            }
            for (i, &v) in num.iter().enumerate() {
                if !v.is_finite() {
                    return bad(format!(
                        "{kind}_num event {} field {} ({}) is {v}",
                        i / ed,
                        i % ed,
                        s.event_num[i % ed].name
                    ));
                }
            }
        }
        Ok(())
    }

    /// Writes the buffered rows as the next shard (temporary name, sync, rename).
    fn flush_shard(&mut self) -> Result<()> {
        if self.buffers.rows == 0 {
            return Ok(());
        }
        let result = self.write_shard();
        // The rows are gone whether or not the shard could be written (as before: a failed
        // flush is an error the caller reports; the buffers start afresh either way).
        self.buffers.clear();
        result
    }

    /// Serialises the buffered rows and writes them as the next shard.
    fn write_shard(&mut self) -> Result<()> {
        let b = &self.buffers;
        let s = &self.schema;
        let n = b.rows;
        let n_pre = (b.pre_offsets[n]) as usize;
        let n_in = (b.in_offsets[n]) as usize;
        let mut tensors: Vec<(&str, TensorView<'_>)> = Vec::with_capacity(13);
        fn view<'a>(
            name: &str,
            dtype: Dtype,
            shape: Vec<usize>,
            data: &'a [u8],
        ) -> Result<TensorView<'a>> {
            TensorView::new(dtype, shape, data)
                .map_err(|e| Error::invalid(format!("internal: tensor {name}: {e:?}")))
        }
        if self.options.has_label {
            tensors.push(("label", view("label", Dtype::U8, vec![n], &b.label)?));
        }
        tensors.push(("split", view("split", Dtype::U8, vec![n], &b.split)?));
        tensors.push((
            "profile_num",
            view(
                "profile_num",
                Dtype::F32,
                vec![n, s.f_num()],
                bytemuck::cast_slice(&b.profile_num),
            )?,
        ));
        tensors.push((
            "profile_cat",
            view(
                "profile_cat",
                Dtype::U32,
                vec![n, s.f_cat()],
                bytemuck::cast_slice(&b.profile_cat),
            )?,
        ));
        tensors.push((
            "pre_offsets",
            view(
                "pre_offsets",
                Dtype::U64,
                vec![n + 1],
                bytemuck::cast_slice(&b.pre_offsets),
            )?,
        ));
        tensors.push((
            "pre_cat",
            view(
                "pre_cat",
                Dtype::U32,
                vec![n_pre, s.e_cat()],
                bytemuck::cast_slice(&b.pre_cat),
            )?,
        ));
        tensors.push((
            "pre_num",
            view(
                "pre_num",
                Dtype::F32,
                vec![n_pre, s.e_num()],
                bytemuck::cast_slice(&b.pre_num),
            )?,
        ));
        tensors.push((
            "in_offsets",
            view(
                "in_offsets",
                Dtype::U64,
                vec![n + 1],
                bytemuck::cast_slice(&b.in_offsets),
            )?,
        ));
        tensors.push((
            "in_cat",
            view(
                "in_cat",
                Dtype::U32,
                vec![n_in, s.e_cat()],
                bytemuck::cast_slice(&b.in_cat),
            )?,
        ));
        tensors.push((
            "in_num",
            view(
                "in_num",
                Dtype::F32,
                vec![n_in, s.e_num()],
                bytemuck::cast_slice(&b.in_num),
            )?,
        ));
        if self.options.has_user_id {
            tensors.push((
                "user_id_offsets",
                view(
                    "user_id_offsets",
                    Dtype::U64,
                    vec![n + 1],
                    bytemuck::cast_slice(&b.user_id_offsets),
                )?,
            ));
            tensors.push((
                "user_id_bytes",
                view(
                    "user_id_bytes",
                    Dtype::U8,
                    vec![b.user_id_bytes.len()],
                    &b.user_id_bytes,
                )?,
            ));
        }
        let metadata: HashMap<String, String> =
            [("format".to_string(), FORMAT_NAME.to_string())].into();
        // The file is exactly what `safetensors::tensor::serialize` returns, written without
        // first copying every tensor into one buffer: the library lays out the header and
        // the data order (see `HeaderOnly`), the data go to the file from the column buffers.
        let order = RefCell::new(Vec::with_capacity(tensors.len()));
        let header = safetensors::tensor::serialize(
            tensors.iter().enumerate().map(|(index, (name, view))| {
                (
                    *name,
                    HeaderOnly {
                        view,
                        index,
                        order: &order,
                    },
                )
            }),
            &Some(metadata),
        )
        .map_err(|e| Error::invalid(format!("internal: serialising a shard: {e:?}")))?;
        let order = order.into_inner();
        let mut pieces: Vec<&[u8]> = Vec::with_capacity(tensors.len() + 1);
        pieces.push(&header);
        for &i in &order {
            if let Some((_, view)) = tensors.get(i) {
                pieces.push(view.data());
            }
        }
        let mut sorted = order.clone();
        sorted.sort_unstable();
        if !sorted.iter().copied().eq(0..tensors.len()) {
            return Err(Error::invalid(
                "internal: the serialiser did not lay out every tensor exactly once",
            ));
        }
        let bytes_len: usize = pieces.iter().map(|p| p.len()).sum();
        let file = format!("shard-{:05}.safetensors", self.shards.len());
        let path = self.dir.join(&file);
        self.registrations
            .push(cleanup::register(&path, Removal::File));
        let sha256 = write_atomic_hashed(&path, &pieces)?;
        self.written.push(path);
        self.shards.push(ShardInfo {
            file,
            rows: n as u64,
            pre_events: n_pre as u64,
            in_events: n_in as u64,
            bytes: bytes_len as u64,
            sha256,
        });
        Ok(())
    }

    /// Records the time spans the manifest will hold (`import`).
    pub fn set_times(&mut self, times: TimeSpans) {
        self.times = Some(times);
    }

    /// Writes the last shard and then the manifest, and returns the manifest.
    pub fn finish(mut self) -> Result<Manifest> {
        self.flush_shard()?;
        let splits = (0..3)
            .map(|i| SplitStats {
                split: i as u8,
                name: SPLIT_NAMES[i].to_string(),
                rows: self.split_rows[i],
                positives: self.split_positives[i],
                default_rate: if self.split_rows[i] > 0 {
                    self.split_positives[i] as f64 / self.split_rows[i] as f64
                } else {
                    0.0
                },
            })
            .collect();
        let manifest = Manifest {
            format: FORMAT_NAME.to_string(),
            version: FORMAT_VERSION,
            schema: self.schema.clone(),
            rows: self.rows,
            has_label: self.options.has_label,
            has_user_id: self.options.has_user_id,
            splits,
            shards: self.shards.clone(),
            source: self.options.source.clone(),
            times: self.times.clone(),
        };
        let text = serde_json::to_string_pretty(&manifest)
            .map_err(|e| Error::invalid(format!("internal: manifest: {e}")))?;
        let manifest_path = self.dir.join(MANIFEST_FILE);
        self.registrations
            .push(cleanup::register(&manifest_path, Removal::File));
        write_atomic(&manifest_path, text.as_bytes())?;
        self.finished = true;
        cleanup::release_all(std::mem::take(&mut self.registrations));
        Ok(manifest)
    }
}

impl Drop for DatasetWriter {
    /// An unfinished writer removes what it wrote (best effort: this runs on error paths).
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        for path in &self.written {
            let _ = fs::remove_file(path);
        }
        if self.created_dir {
            let _ = fs::remove_dir(&self.dir);
        }
    }
}

/// Lower-case hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// Lower-case hex of a digest.
fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes `bytes` to `path` atomically: a `.tmp` sibling is written, synced and renamed over
/// `path`, and the directory is synced. On failure the temporary file is removed and `path`
/// is untouched (unless only the directory's sync failed, after the rename). `path` must be
/// absent or a regular file (a link, a directory, a device or a FIFO is never replaced); the
/// temporary file is created anew (a stale one from a killed run is replaced, never written
/// through) and registered with [`crate::io::cleanup`] while it exists.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, &[bytes], |_| {})
}

/// Syncs the directory holding `path`, so that a rename into it survives a crash of the
/// machine (on Unix; elsewhere a no-op).
fn sync_parent(path: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        fs::File::open(dir)?.sync_all()?;
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

/// A tensor handed to `safetensors::tensor::serialize` that reports its dtype, shape and
/// length but yields no bytes, recording instead when the serialiser asks for them: the
/// serialiser then returns just `[header length: u64 LE][header]`, and `order` lists the
/// tensors in the order it lays their data out after the header.
struct HeaderOnly<'a> {
    view: &'a TensorView<'a>,
    index: usize,
    order: &'a RefCell<Vec<usize>>,
}

impl View for HeaderOnly<'_> {
    fn dtype(&self) -> Dtype {
        self.view.dtype()
    }
    fn shape(&self) -> &[usize] {
        self.view.shape()
    }
    fn data(&self) -> Cow<'_, [u8]> {
        self.order.borrow_mut().push(self.index);
        Cow::Borrowed(&[])
    }
    fn data_len(&self) -> usize {
        self.view.data().len()
    }
}

/// [`write_atomic`] of the concatenation of `pieces` that also returns its
/// [`sha256_hex`], hashing each piece just before writing it, while it is still in the CPU
/// cache (one pass over memory, not two).
fn write_atomic_hashed(path: &Path, pieces: &[&[u8]]) -> Result<String> {
    let mut hasher = Sha256::new();
    write_atomic_with(path, pieces, |piece| hasher.update(piece))?;
    Ok(hex(&hasher.finalize()))
}

/// Bytes per `write` call of [`write_atomic_with`] (small enough to stay in the cache).
const WRITE_PIECE: usize = 1 << 20;

/// The body of [`write_atomic`]: the concatenation of `pieces` goes to the `.tmp` sibling
/// in writes of at most [`WRITE_PIECE`] bytes; `on_piece` sees each before it is written.
fn write_atomic_with(path: &Path, pieces: &[&[u8]], mut on_piece: impl FnMut(&[u8])) -> Result<()> {
    if let Ok(m) = fs::symlink_metadata(path) {
        if let Some(what) = crate::io::output::special_kind(&m.file_type()) {
            return Err(Error::invalid(format!(
                "{}: is {what}; it is replaced only when it is a regular file",
                path.display()
            )));
        }
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    if fs::symlink_metadata(&tmp).is_ok_and(|m| !m.is_dir()) {
        let _ = fs::remove_file(&tmp);
    }
    let result = (|| {
        let (mut f, _registration) = cleanup::create(&tmp, Removal::File, |p| {
            fs::OpenOptions::new().write(true).create_new(true).open(p)
        })?;
        for piece in pieces.iter().flat_map(|p| p.chunks(WRITE_PIECE)) {
            on_piece(piece);
            f.write_all(piece)?;
        }
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        sync_parent(path)
    })();
    result.map_err(|e| {
        let _ = fs::remove_file(&tmp);
        Error::io(path, e)
    })
}
