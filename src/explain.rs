//! Reason codes: per applicant, the inputs that raised the student's risk score most,
//! measured by **occlusion against a baseline** (docs/deploy.md, "Reason codes").
//!
//! The inputs are cut into groups: each numeric profile field, each categorical profile
//! field, and the pre-service events grouped by the value of one categorical event field
//! (the event type by default). A group's contribution is
//!
//! ```text
//! c_g = z(x) − z(x with group g set to its baseline)
//! ```
//!
//! in logit units (log-odds of default), where the baseline of a numeric field is 0 (the
//! train-split mean in the stored, standardised units), the baseline of a categorical field
//! is id 0 (missing or unknown), and the baseline of an event group is the applicant's
//! pre-service sequence without those events (the other events keep their order; positions
//! count back from the most recent event as always, docs/model.md §2.3). Only the events the
//! model reads (the `pre_len` most recent) are grouped. A positive `c_g` means the group
//! made the applicant riskier than its baseline would; the reasons are the groups with the
//! largest positive contributions. Each `c_g` is one extra forward pass of the unchanged
//! model, so it is exact: scoring the occluded applicant with `predict` gives `z(x) − c_g`.
//! Contributions are not additive: their sum differs from `z(x)` minus the score of the
//! all-baseline applicant by the interactions between groups.

use crate::backend::{Backend, Float};
use crate::data::import::Vocabularies;
use crate::data::{Batch, EventBatch, Schema};
use crate::model::{DeviceBatch, Model, Role};
use crate::{Error, Result};

/// Rows scored per forward pass.
const CHUNK: usize = 512;

/// One reason: an input group and how much it raised the logit.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Reason {
    /// The group, readable: `income`, `region=north`, `events:event_type=late_payment`.
    pub input: String,
    /// `z(x) − z(x with the group at its baseline)`, in logit units; positive.
    pub contribution: f64,
}

/// What can be occluded: one group of an applicant's inputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Group {
    /// Numeric profile field `f`.
    ProfileNum(usize),
    /// Categorical profile field `f`.
    ProfileCat(usize),
    /// The kept pre-service events whose event field (the grouping field) has id `v`.
    Events(u32),
}

/// One applicant as the model reads it: profile and kept pre-service events.
#[derive(Debug, Clone)]
struct Applicant {
    profile_num: Vec<f32>,
    profile_cat: Vec<u32>,
    /// `[len, E_c]`.
    pre_cat: Vec<u32>,
    /// `[len, E_d]`.
    pre_num: Vec<f32>,
}

/// Names groups for the output, with the value names of `vocab.json` when known.
pub struct Labeller<'a> {
    schema: &'a Schema,
    vocab: Option<&'a Vocabularies>,
    /// The event field that groups the pre-service events.
    field: usize,
}

/// Value name of id `id` in a `vocab.json` field, or `#id`.
fn value_name(v: Option<&crate::data::import::FieldVocab>, id: u32) -> String {
    if id == 0 {
        return "missing".into();
    }
    v.and_then(|f| f.ids.iter().find(|(_, &i)| i == id))
        .map_or_else(|| format!("#{id}"), |(name, _)| name.clone())
}

impl<'a> Labeller<'a> {
    /// A labeller for `schema`, grouping events by `event_field` (a categorical event field's
    /// name; `None`: the first one), naming values through `vocab` when given.
    pub fn new(
        schema: &'a Schema,
        vocab: Option<&'a Vocabularies>,
        event_field: Option<&str>,
    ) -> Result<Self> {
        let field = match event_field {
            None => 0,
            Some(name) => schema
                .event_cat
                .iter()
                .position(|f| f.name == name)
                .ok_or_else(|| {
                    let names: Vec<&str> =
                        schema.event_cat.iter().map(|f| f.name.as_str()).collect();
                    Error::invalid(format!(
                        "--reason-events {name}: not a categorical event field (the schema has \
                         [{}])",
                        names.join(", ")
                    ))
                })?,
        };
        Ok(Labeller {
            schema,
            vocab,
            field,
        })
    }

    fn label(&self, g: Group, a: &Applicant) -> String {
        let s = self.schema;
        match g {
            Group::ProfileNum(f) => s.profile_num[f].name.clone(),
            Group::ProfileCat(f) => {
                let v = self.vocab.and_then(|v| v.profile_cat.get(f));
                format!(
                    "{}={}",
                    s.profile_cat[f].name,
                    value_name(v, a.profile_cat[f])
                )
            }
            Group::Events(id) => {
                let v = self.vocab.and_then(|v| v.event_cat.get(self.field));
                format!(
                    "events:{}={}",
                    s.event_cat[self.field].name,
                    value_name(v, id)
                )
            }
        }
    }
}

/// The groups of `a` whose baseline differs from the applicant (a field already at its
/// baseline contributes exactly 0 and is left out).
fn groups(schema: &Schema, field: Option<usize>, a: &Applicant) -> Vec<Group> {
    let mut g = Vec::new();
    for (f, &x) in a.profile_num.iter().enumerate() {
        if x != 0.0 {
            g.push(Group::ProfileNum(f));
        }
    }
    for (f, &id) in a.profile_cat.iter().enumerate() {
        if id != 0 {
            g.push(Group::ProfileCat(f));
        }
    }
    if let Some(k) = field {
        let ec = schema.e_cat();
        let mut ids: Vec<u32> = a.pre_cat.chunks(ec).map(|e| e[k]).collect();
        ids.sort_unstable();
        ids.dedup();
        g.extend(ids.into_iter().map(Group::Events));
    }
    g
}

/// `a` with group `g` at its baseline.
fn occlude(schema: &Schema, field: usize, a: &Applicant, g: Group) -> Applicant {
    let mut b = a.clone();
    match g {
        Group::ProfileNum(f) => b.profile_num[f] = 0.0,
        Group::ProfileCat(f) => b.profile_cat[f] = 0,
        Group::Events(id) => {
            let (ec, ed) = (schema.e_cat(), schema.e_num());
            let len = a.pre_cat.len() / ec;
            b.pre_cat.clear();
            b.pre_num.clear();
            for t in 0..len {
                if a.pre_cat[t * ec + field] != id {
                    b.pre_cat
                        .extend_from_slice(&a.pre_cat[t * ec..(t + 1) * ec]);
                    b.pre_num
                        .extend_from_slice(&a.pre_num[t * ed..(t + 1) * ed]);
                }
            }
        }
    }
    b
}

/// The applicants of a gathered batch.
fn applicants(schema: &Schema, batch: &Batch) -> Vec<Applicant> {
    let (fd, fc, ec, ed) = (
        schema.f_num(),
        schema.f_cat(),
        schema.e_cat(),
        schema.e_num(),
    );
    let ml = batch.pre.max_len;
    (0..batch.rows)
        .map(|i| {
            let l = batch.pre.lens[i] as usize;
            Applicant {
                profile_num: batch.profile_num[i * fd..(i + 1) * fd].to_vec(),
                profile_cat: batch.profile_cat[i * fc..(i + 1) * fc].to_vec(),
                pre_cat: batch.pre.cat[i * ml * ec..(i * ml + l) * ec].to_vec(),
                pre_num: batch.pre.num[i * ml * ed..(i * ml + l) * ed].to_vec(),
            }
        })
        .collect()
}

/// A batch of applicants (no in-service events, no labels), padded to the longest.
fn pack(schema: &Schema, apps: &[&Applicant]) -> Batch {
    let (ec, ed) = (schema.e_cat(), schema.e_num());
    let lens: Vec<u32> = apps
        .iter()
        .map(|a| {
            a.pre_cat
                .len()
                .checked_div(ec)
                .unwrap_or(a.pre_num.len() / ed.max(1)) as u32
        })
        .collect();
    let ml = lens.iter().copied().max().unwrap_or(0) as usize;
    let n = apps.len();
    let mut cat = vec![0u32; n * ml * ec];
    let mut num = vec![0f32; n * ml * ed];
    for (i, a) in apps.iter().enumerate() {
        cat[i * ml * ec..i * ml * ec + a.pre_cat.len()].copy_from_slice(&a.pre_cat);
        num[i * ml * ed..i * ml * ed + a.pre_num.len()].copy_from_slice(&a.pre_num);
    }
    Batch {
        rows: n,
        row_index: (0..n as u64).collect(),
        labels: None,
        profile_num: apps.iter().flat_map(|a| a.profile_num.clone()).collect(),
        profile_cat: apps.iter().flat_map(|a| a.profile_cat.clone()).collect(),
        pre: EventBatch {
            max_len: ml,
            lens,
            cat,
            num,
        },
        in_service: EventBatch {
            max_len: 0,
            lens: vec![0; n],
            cat: Vec::new(),
            num: Vec::new(),
        },
    }
}

/// Logits of `apps` under `model`, scored in chunks of [`CHUNK`].
fn logits<B: Backend>(
    be: &B,
    model: &Model<B>,
    schema: &Schema,
    apps: &[&Applicant],
) -> Result<Vec<f64>> {
    let mut out = Vec::with_capacity(apps.len());
    for chunk in apps.chunks(CHUNK) {
        let batch = pack(schema, chunk);
        let dev = DeviceBatch::upload(be, &batch, schema)?;
        let fwd = model.infer(be, &dev)?;
        out.extend(be.download(&fwd.logits)?.into_iter().map(Float::to_f64));
    }
    Ok(out)
}

/// The `k` reasons of every row of `batch` (gathered from a dataset of `model`'s schema):
/// per row, the groups with the largest positive contributions, largest first (ties by
/// group order: numeric profile fields, categorical profile fields, event values by id),
/// at most `k` of them and none whose contribution is ≤ 0. Only a student has reasons.
pub fn reasons<B: Backend>(
    be: &B,
    model: &Model<B>,
    batch: &Batch,
    labeller: &Labeller<'_>,
    k: usize,
) -> Result<Vec<Vec<Reason>>> {
    if model.config.role != Role::Student {
        return Err(Error::invalid(
            "reason codes are computed for a student (the deployed model); this is a teacher",
        ));
    }
    let schema = &model.config.schema;
    let field = (schema.e_cat() > 0).then_some(labeller.field);
    let apps = applicants(schema, batch);
    let mut variants: Vec<Applicant> = Vec::new();
    let mut spans: Vec<(usize, Vec<Group>)> = Vec::with_capacity(apps.len());
    for a in &apps {
        let gs = groups(schema, field, a);
        spans.push((variants.len(), gs.clone()));
        variants.extend(gs.iter().map(|&g| occlude(schema, labeller.field, a, g)));
    }
    let base: Vec<&Applicant> = apps.iter().collect();
    let z = logits(be, model, schema, &base)?;
    let occluded: Vec<&Applicant> = variants.iter().collect();
    let zo = logits(be, model, schema, &occluded)?;
    let mut out = Vec::with_capacity(apps.len());
    for (i, (start, gs)) in spans.iter().enumerate() {
        let mut c: Vec<(f64, usize)> = gs
            .iter()
            .enumerate()
            .map(|(j, _)| (z[i] - zo[start + j], j))
            .filter(|(c, _)| *c > 0.0)
            .collect();
        c.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        out.push(
            c.into_iter()
                .take(k)
                .map(|(contribution, j)| Reason {
                    input: labeller.label(gs[j], &apps[i]),
                    contribution,
                })
                .collect(),
        );
    }
    Ok(out)
}
