//! A [`Batch`] on its way to a backend: checked against the model's schema (so that no id
//! or length read from a file can index out of bounds on the device) while it is laid out in
//! the backend's host staging memory ([`StagedBatch`]), then uploaded ([`DeviceBatch`]).
//! The first half can run on a background thread ([`crate::train::pipeline`]).

use crate::backend::{Backend, Float, HostStaging, Mut, Ref};
use crate::data::{Batch, EventBatch, Schema};
use crate::model::teacher::{TeacherIds, TeacherIndex};
use crate::{Error, Result};
/// One padded sequence kind on the device. The padded length is at least 1 (an all-empty
/// batch gets one padding slot) so that no buffer is zero-sized.
pub struct DeviceSeq<B: Backend> {
    /// Padded length `max(max_len, 1)`.
    pub len: usize,
    /// Per-row lengths (device).
    pub lens: B::Ids,
    /// Per-row lengths (host copy).
    pub lens_host: Vec<u32>,
    /// `max(len_b, 1)` per row (device): the student's fine-loss token count, where an empty
    /// pre-service sequence is replaced by the profile vector.
    pub lens_or_one: B::Ids,
    /// Categorical fields `[rows, len, E_c]`.
    pub cat: B::Ids,
    /// Numeric fields `[rows, len, E_d]`.
    pub num: B::Buf,
}

/// A batch on the device.
pub struct DeviceBatch<B: Backend> {
    /// Number of rows.
    pub rows: usize,
    /// Dense profile `[rows, F_d]`.
    pub profile_num: B::Buf,
    /// Categorical profile `[rows, F_c]`.
    pub profile_cat: B::Ids,
    /// Pre-service events.
    pub pre: DeviceSeq<B>,
    /// In-service events.
    pub in_service: DeviceSeq<B>,
    /// Labels as 0/1 floats, when the batch has labels.
    pub labels: Option<B::Buf>,
    /// Labels on the host.
    pub labels_host: Option<Vec<u8>>,
    /// The schema the batch was checked against (a model only reads batches of its own).
    pub schema: Schema,
    /// Where its rows' outputs lie in a teacher cache, when staged with one's index.
    pub teacher: Option<TeacherIds<B>>,
}

/// Where one sequence kind of a staged batch lies in its staging (element offsets).
#[derive(Debug, Clone)]
struct StagedSeq {
    /// Padded length `max(max_len, 1)`.
    len: usize,
    /// Per-row lengths (host copy, also staged at `lens`).
    lens_host: Vec<u32>,
    lens: usize,
    lens_or_one: usize,
    cat: usize,
    num: usize,
}

/// A batch checked and laid out in a backend's [`HostStaging`]: floats
/// `[profile_num | pre num | in-service num | labels]` and ids
/// `[profile_cat | pre lens, lens_or_one, cat | in-service lens, lens_or_one, cat |
/// teacher-cache ids]`.
#[derive(Debug, Clone)]
pub struct StagedBatch {
    rows: usize,
    profile_num: usize,
    profile_cat: usize,
    pre: StagedSeq,
    in_service: StagedSeq,
    labels: Option<usize>,
    labels_host: Option<Vec<u8>>,
    schema: Schema,
    /// Offsets of the teacher-cache ids: the rows' slots, then (with tokens) the token ids.
    teacher: Option<(usize, Option<usize>)>,
}

/// Floats and ids that a batch of `rows` rows, padded to lengths `pre` and `in_service`,
/// takes in a staging (with room for teacher-cache ids with tokens when `teacher`).
fn staged_size(
    schema: &Schema,
    rows: usize,
    pre: usize,
    in_service: usize,
    teacher: bool,
) -> (usize, usize) {
    let (ec, ed) = (schema.e_cat(), schema.e_num());
    let floats = rows * (schema.f_num() + (pre + in_service) * ed + 1);
    let cache_ids = if teacher { 1 + in_service } else { 0 };
    let ids = rows * (schema.f_cat() + 4 + (pre + in_service) * ec + cache_ids);
    (floats, ids)
}

/// A cursor handing out consecutive regions of a staging slice.
struct Cursor<'a, T> {
    buf: &'a mut [T],
    at: usize,
}

impl<'a, T> Cursor<'a, T> {
    /// The next `len` elements and their offset; an error when the staging is too small.
    fn take(&mut self, len: usize) -> Result<(usize, &mut [T])> {
        let off = self.at;
        let end = off + len;
        if end > self.buf.len() {
            return Err(Error::invalid(format!(
                "a batch needs {end} staging elements, the staging holds {}",
                self.buf.len()
            )));
        }
        self.at = end;
        Ok((off, &mut self.buf[off..end]))
    }
}

/// Copies ids `src` into `dst`, checking each against its field's vocabulary; `src` is laid
/// out `[items, fields]` and `place(i)` names item `i` in an error.
fn stage_ids(
    what: &str,
    src: &[u32],
    vocabs: &[u32],
    dst: &mut [u32],
    place: impl Fn(usize) -> String,
) -> Result<()> {
    let k = vocabs.len();
    for (i, (d, s)) in dst.chunks_mut(k).zip(src.chunks(k)).enumerate() {
        for (f, ((d, &id), &v)) in d.iter_mut().zip(s).zip(vocabs).enumerate() {
            if id >= v {
                return Err(Error::invalid(format!(
                    "batch {what}: {}, field {f} has id {id}, vocabulary is {v}",
                    place(i)
                )));
            }
            *d = id;
        }
    }
    Ok(())
}

/// Converts `src` into `dst` in the backend's element type, refusing a non-finite number.
fn stage_floats<F: Float>(what: &str, src: &[f32], dst: &mut [F]) -> Result<()> {
    for (i, (d, &x)) in dst.iter_mut().zip(src).enumerate() {
        if !x.is_finite() {
            return Err(Error::invalid(format!(
                "batch {what}: element {i} is {x}, not a finite number"
            )));
        }
        *d = <F as Float>::from_f64(f64::from(x));
    }
    Ok(())
}

/// Checks one sequence kind of a batch and stages it.
fn stage_seq<F: Float>(
    what: &str,
    rows: usize,
    e: &EventBatch,
    schema: &Schema,
    limit: usize,
    floats: &mut Cursor<'_, F>,
    ids: &mut Cursor<'_, u32>,
) -> Result<StagedSeq> {
    let (ec, ed) = (schema.e_cat(), schema.e_num());
    let bad = |m: String| Err(Error::invalid(format!("batch {what}: {m}")));
    if e.lens.len() != rows {
        return bad(format!("{} lengths for {rows} rows", e.lens.len()));
    }
    if e.max_len > limit {
        return bad(format!(
            "padded length {} exceeds the limit {limit}",
            e.max_len
        ));
    }
    if let Some(r) = e.lens.iter().position(|&l| l as usize > e.max_len) {
        return bad(format!(
            "row {r} has length {} > padded length {}",
            e.lens[r], e.max_len
        ));
    }
    if e.cat.len() != rows * e.max_len * ec || e.num.len() != rows * e.max_len * ed {
        return bad("event buffers do not match rows × max_len × fields".into());
    }
    let len = e.max_len.max(1);
    let (lens, d) = ids.take(rows)?;
    d.copy_from_slice(&e.lens);
    let (lens_or_one, d) = ids.take(rows)?;
    for (d, &l) in d.iter_mut().zip(&e.lens) {
        *d = l.max(1);
    }
    let (cat, d) = ids.take(rows * len * ec)?;
    if e.max_len == 0 {
        d.fill(0);
    } else {
        let vocabs: Vec<u32> = schema.event_cat.iter().map(|f| f.vocab).collect();
        let place = |i: usize| format!("row {}, event {}", i / len, i % len);
        stage_ids(&format!("{what} events"), &e.cat, &vocabs, d, place)?;
    }
    let (num, d) = floats.take(rows * len * ed)?;
    if e.max_len == 0 {
        d.fill(F::zero());
    } else {
        stage_floats(&format!("{what} event numbers"), &e.num, d)?;
    }
    Ok(StagedSeq {
        len,
        lens_host: e.lens.clone(),
        lens,
        lens_or_one,
        cat,
        num,
    })
}

impl StagedBatch {
    /// Floats and ids a staging needs for any batch of at most `rows` rows of `schema`
    /// (sequences at the schema's length limits, teacher-cache ids included).
    pub fn capacity(schema: &Schema, rows: usize) -> (usize, usize) {
        staged_size(
            schema,
            rows,
            schema.pre_len.max(1),
            schema.in_len.max(1),
            true,
        )
    }

    /// Checks `batch` against `schema` (buffer sizes, lengths within the schema's limits,
    /// ids below their vocabularies, finite numbers, labels 0/1) and lays it out in
    /// `staging` (waiting first for any upload still reading it), with the ids that gather
    /// its rows from a teacher cache of index `teacher`.
    pub fn stage<F: Float>(
        batch: &Batch,
        schema: &Schema,
        teacher: Option<&TeacherIndex>,
        staging: &mut impl HostStaging<F>,
    ) -> Result<StagedBatch> {
        let rows = batch.rows;
        if rows == 0 {
            return Err(Error::invalid("batch has no rows"));
        }
        if batch.profile_num.len() != rows * schema.f_num()
            || batch.profile_cat.len() != rows * schema.f_cat()
        {
            return Err(Error::invalid(
                "batch profile buffers do not match rows × profile fields",
            ));
        }
        if let Some(l) = &batch.labels {
            if l.len() != rows {
                return Err(Error::invalid(format!(
                    "batch: {} labels for {rows} rows",
                    l.len()
                )));
            }
            if let Some(r) = l.iter().position(|&y| y > 1) {
                return Err(Error::invalid(format!("batch: row {r} has label {}", l[r])));
            }
        }
        let (floats, ids) = staging.regions()?;
        let mut floats = Cursor { buf: floats, at: 0 };
        let mut ids = Cursor { buf: ids, at: 0 };
        let (profile_num, d) = floats.take(rows * schema.f_num())?;
        stage_floats("profile numbers", &batch.profile_num, d)?;
        let (profile_cat, d) = ids.take(rows * schema.f_cat())?;
        let vocabs: Vec<u32> = schema.profile_cat.iter().map(|f| f.vocab).collect();
        if !vocabs.is_empty() {
            let place = |i: usize| format!("row {i}");
            stage_ids("profile", &batch.profile_cat, &vocabs, d, place)?;
        }
        let pre = stage_seq(
            "pre-service",
            rows,
            &batch.pre,
            schema,
            schema.pre_len,
            &mut floats,
            &mut ids,
        )?;
        let in_service = stage_seq(
            "in-service",
            rows,
            &batch.in_service,
            schema,
            schema.in_len,
            &mut floats,
            &mut ids,
        )?;
        let labels = match &batch.labels {
            Some(l) => {
                let (off, d) = floats.take(rows)?;
                for (d, &y) in d.iter_mut().zip(l) {
                    *d = <F as Float>::from_f64(f64::from(y));
                }
                Some(off)
            }
            None => None,
        };
        let teacher = match teacher {
            Some(index) => {
                let len = in_service.len;
                let (off, d) = ids.take(index.staged_ids(rows, len))?;
                index.stage(batch, len, d)?;
                Some((off, index.has_tokens().then_some(off + rows)))
            }
            None => None,
        };
        Ok(StagedBatch {
            rows,
            profile_num,
            profile_cat,
            pre,
            in_service,
            labels,
            labels_host: batch.labels.clone(),
            schema: schema.clone(),
            teacher,
        })
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.rows
    }
}

fn upload_seq<B: Backend>(
    be: &B,
    staging: &B::Staging,
    s: &StagedSeq,
    rows: usize,
    schema: &Schema,
) -> Result<DeviceSeq<B>> {
    let slots = rows * s.len;
    Ok(DeviceSeq {
        len: s.len,
        lens: be.upload_staged_ids(staging, s.lens, rows)?,
        lens_host: s.lens_host.clone(),
        lens_or_one: be.upload_staged_ids(staging, s.lens_or_one, rows)?,
        cat: be.upload_staged_ids(staging, s.cat, slots * schema.e_cat())?,
        num: be.upload_staged(staging, s.num, slots * schema.e_num())?,
    })
}

/// A batch whose upload is queued and may still be running beside the work queued before
/// it ([`DeviceBatch::queue_upload`]): [`PendingBatch::ready`] gives the batch once the work
/// queued after it will read the data.
pub struct PendingBatch<B: Backend> {
    // Dropped first: an unwaited fence makes the device wait for the copies before the
    // batch's buffers are given back.
    fence: B::Fence,
    batch: DeviceBatch<B>,
}

impl<B: Backend> PendingBatch<B> {
    /// The batch, for work queued from now on (the device waits for its copies; the host
    /// does not).
    pub fn ready(self, be: &B) -> Result<DeviceBatch<B>> {
        let PendingBatch { fence, batch } = self;
        be.wait_upload(&fence)?;
        Ok(batch)
    }
}

impl<B: Backend> DeviceBatch<B> {
    /// Queues the upload of `staged`, laid out in `staging` by [`StagedBatch::stage`], and
    /// returns the batch for the work queued after it. The copies are asynchronous where the
    /// backend can make them so: `staging` may be handed back to the thread that fills it at
    /// once ([`HostStaging::regions`] waits for them).
    pub fn from_staged(be: &B, staging: &B::Staging, staged: &StagedBatch) -> Result<Self> {
        Self::queue_upload(be, staging, staged)?.ready(be)
    }

    /// [`DeviceBatch::from_staged`] without making the work queued next wait for it: on
    /// CUDA the copies run on the copy stream beside the steps already queued, so the next
    /// batch's upload overlaps the step before it.
    pub fn queue_upload(
        be: &B,
        staging: &B::Staging,
        staged: &StagedBatch,
    ) -> Result<PendingBatch<B>> {
        let (rows, s) = (staged.rows, &staged.schema);
        let batch = DeviceBatch {
            rows,
            profile_num: be.upload_staged(staging, staged.profile_num, rows * s.f_num())?,
            profile_cat: be.upload_staged_ids(staging, staged.profile_cat, rows * s.f_cat())?,
            pre: upload_seq(be, staging, &staged.pre, rows, s)?,
            in_service: upload_seq(be, staging, &staged.in_service, rows, s)?,
            labels: match staged.labels {
                Some(off) => Some(be.upload_staged(staging, off, rows)?),
                None => None,
            },
            labels_host: staged.labels_host.clone(),
            schema: s.clone(),
            teacher: match staged.teacher {
                Some((at, tokens)) => Some(TeacherIds {
                    rows: be.upload_staged_ids(staging, at, rows)?,
                    tokens: match tokens {
                        Some(at) => {
                            let len = rows * staged.in_service.len;
                            Some(be.upload_staged_ids(staging, at, len)?)
                        }
                        None => None,
                    },
                }),
                None => None,
            },
        };
        Ok(PendingBatch {
            fence: be.upload_fence()?,
            batch,
        })
    }

    /// Checks `batch` against `schema` (as [`StagedBatch::stage`]) and uploads it through a
    /// staging allocated for it alone. For a stream of batches, reuse stagings instead
    /// ([`crate::train::pipeline`]): allocating one is slow on CUDA.
    pub fn upload(be: &B, batch: &Batch, schema: &Schema) -> Result<Self> {
        Self::upload_for(be, batch, schema, None)
    }

    /// [`DeviceBatch::upload`] with the ids that gather its rows from a teacher cache of
    /// index `teacher`.
    pub fn upload_for(
        be: &B,
        batch: &Batch,
        schema: &Schema,
        teacher: Option<&TeacherIndex>,
    ) -> Result<Self> {
        let (floats, ids) = staged_size(
            schema,
            batch.rows,
            batch.pre.max_len.max(1),
            batch.in_service.max_len.max(1),
            teacher.is_some(),
        );
        let mut staging = be.alloc_staging(floats, ids)?;
        let staged = StagedBatch::stage(batch, schema, teacher, &mut staging)?;
        Self::from_staged(be, &staging, &staged)
    }

    /// Copies `src` (a batch of the same rows and padded lengths) into this batch's buffers,
    /// on the device and queued: a recorded graph that reads this batch then runs on `src`.
    pub fn copy_from(&mut self, be: &B, src: &DeviceBatch<B>) -> Result<()> {
        let same = self.rows == src.rows
            && self.pre.len == src.pre.len
            && self.in_service.len == src.in_service.len
            && self.schema == src.schema
            && self.labels.is_some() == src.labels.is_some()
            && self.teacher.as_ref().map(|t| t.tokens.is_some())
                == src.teacher.as_ref().map(|t| t.tokens.is_some());
        if !same {
            return Err(Error::invalid(
                "copy_from: the batches differ in rows, padded lengths, schema, labels or \
                 teacher-cache ids",
            ));
        }
        let (rows, s) = (self.rows, &self.schema);
        be.copy(
            rows * s.f_num(),
            Ref::whole(&src.profile_num),
            Mut::whole(&mut self.profile_num),
        );
        be.copy_ids(rows * s.f_cat(), &src.profile_cat, &mut self.profile_cat);
        for (dst, from) in [
            (&mut self.pre, &src.pre),
            (&mut self.in_service, &src.in_service),
        ] {
            let slots = rows * dst.len;
            be.copy_ids(rows, &from.lens, &mut dst.lens);
            be.copy_ids(rows, &from.lens_or_one, &mut dst.lens_or_one);
            be.copy_ids(slots * s.e_cat(), &from.cat, &mut dst.cat);
            be.copy(
                slots * s.e_num(),
                Ref::whole(&from.num),
                Mut::whole(&mut dst.num),
            );
            dst.lens_host.clone_from(&from.lens_host);
        }
        if let (Some(d), Some(f)) = (self.labels.as_mut(), src.labels.as_ref()) {
            be.copy(rows, Ref::whole(f), Mut::whole(d));
        }
        self.labels_host.clone_from(&src.labels_host);
        if let (Some(d), Some(f)) = (self.teacher.as_mut(), src.teacher.as_ref()) {
            be.copy_ids(rows, &f.rows, &mut d.rows);
            if let (Some(d), Some(f)) = (d.tokens.as_mut(), f.tokens.as_ref()) {
                be.copy_ids(rows * self.in_service.len, f, d);
            }
        }
        Ok(())
    }
}
