//! A [`Batch`] uploaded to a backend, checked against the model's schema first so that no
//! id or length read from a file can index out of bounds on the device.

use crate::backend::{Backend, Float, Mut, Ref};
use crate::data::{Batch, EventBatch, Schema};
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
}

fn check_ids(what: &str, ids: &[u32], vocabs: &[u32]) -> Result<()> {
    let k = vocabs.len();
    for (i, &id) in ids.iter().enumerate() {
        let v = vocabs[i % k];
        if id >= v {
            return Err(Error::invalid(format!(
                "batch {what}: row {}, field {} has id {id}, vocabulary is {v}",
                i / k,
                i % k
            )));
        }
    }
    Ok(())
}

fn upload_seq<B: Backend>(
    be: &B,
    what: &str,
    rows: usize,
    e: &EventBatch,
    schema: &Schema,
    limit: usize,
) -> Result<DeviceSeq<B>> {
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
    let vocabs: Vec<u32> = schema.event_cat.iter().map(|f| f.vocab).collect();
    if ec > 0 {
        check_ids(&format!("{what} events"), &e.cat, &vocabs)?;
    }
    let len = e.max_len.max(1);
    let (mut cat, mut num) = (e.cat.clone(), e.num.clone());
    if e.max_len == 0 {
        cat = vec![0; rows * ec];
        num = vec![0.0; rows * ed];
    }
    let num: Vec<B::F> = num
        .iter()
        .map(|&x| <B::F as Float>::from_f64(x as f64))
        .collect();
    let or_one: Vec<u32> = e.lens.iter().map(|&l| l.max(1)).collect();
    Ok(DeviceSeq {
        len,
        lens: be.upload_ids(&e.lens)?,
        lens_host: e.lens.clone(),
        lens_or_one: be.upload_ids(&or_one)?,
        cat: be.upload_ids(&cat)?,
        num: be.upload(&num)?,
    })
}

impl<B: Backend> DeviceBatch<B> {
    /// Checks `batch` against `schema` (buffer sizes, lengths within the schema's limits,
    /// ids below their vocabularies, finite numbers, labels 0/1) and uploads it.
    pub fn upload(be: &B, batch: &Batch, schema: &Schema) -> Result<Self> {
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
        let finite = |v: &[f32]| v.iter().all(|x| x.is_finite());
        if !finite(&batch.profile_num) || !finite(&batch.pre.num) || !finite(&batch.in_service.num)
        {
            return Err(Error::invalid("batch holds a non-finite number"));
        }
        let vocabs: Vec<u32> = schema.profile_cat.iter().map(|f| f.vocab).collect();
        if !vocabs.is_empty() {
            check_ids("profile", &batch.profile_cat, &vocabs)?;
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
        let pnum: Vec<B::F> = batch
            .profile_num
            .iter()
            .map(|&x| <B::F as Float>::from_f64(x as f64))
            .collect();
        let labels = match &batch.labels {
            Some(l) => {
                let f: Vec<B::F> = l
                    .iter()
                    .map(|&y| <B::F as Float>::from_f64(y as f64))
                    .collect();
                Some(be.upload(&f)?)
            }
            None => None,
        };
        Ok(DeviceBatch {
            rows,
            profile_num: be.upload(&pnum)?,
            profile_cat: be.upload_ids(&batch.profile_cat)?,
            pre: upload_seq(be, "pre-service", rows, &batch.pre, schema, schema.pre_len)?,
            in_service: upload_seq(
                be,
                "in-service",
                rows,
                &batch.in_service,
                schema,
                schema.in_len,
            )?,
            labels,
            labels_host: batch.labels.clone(),
            schema: schema.clone(),
        })
    }

    /// Copies `src` (a batch of the same rows and padded lengths) into this batch's buffers,
    /// on the device and queued: a recorded graph that reads this batch then runs on `src`.
    pub fn copy_from(&mut self, be: &B, src: &DeviceBatch<B>) -> Result<()> {
        let same = self.rows == src.rows
            && self.pre.len == src.pre.len
            && self.in_service.len == src.in_service.len
            && self.schema == src.schema
            && self.labels.is_some() == src.labels.is_some();
        if !same {
            return Err(Error::invalid(
                "copy_from: the batches differ in rows, padded lengths, schema or labels",
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
        Ok(())
    }
}
