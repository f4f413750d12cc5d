//! Batch dumps for the independent NumPy reference (`tools/reference/mgkd_ref.py`): one
//! safetensors file holding a [`Batch`] in its padded layout (see [`crate::data::batch`])
//! and the student-stage loss configuration, so that the reference computes the same
//! forward passes and losses (docs/model.md §4–§5) as the engine from the same inputs.
//!
//! Tensors (B rows, `Lp`/`L` the batch's padded lengths, which may be 0):
//! `profile_num f32[B,F_d]`, `profile_cat u32[B,F_c]`, `pre_cat u32[B,Lp,E_c]`,
//! `pre_num f32[B,Lp,E_d]`, `pre_lens u32[B]`, `in_cat u32[B,L,E_c]`, `in_num f32[B,L,E_d]`,
//! `in_lens u32[B]`, `labels u8[B]`. Metadata `mgkd.loss` = JSON `{"alpha", "beta", "gamma",
//! "delta", "tau", "rho", "soft", "coarse", "fine", "self_distill", "reweight",
//! "coarse_cosine", "class_counts": [N0, N1]}`.

use std::collections::HashMap;
use std::path::Path;

use safetensors::tensor::{Dtype, TensorView};

use crate::data::writer::write_atomic;
use crate::data::{Batch, EventBatch, Schema};
use crate::loss::LossConfig;
use crate::{Error, Result};

/// Metadata key of the loss configuration JSON in a batch dump.
pub const KEY_LOSS: &str = "mgkd.loss";

/// Checks that one padded sequence kind of a batch has the shape its lengths and `schema`
/// imply (`what` names it in errors).
fn check_events(what: &str, rows: usize, e: &EventBatch, schema: &Schema) -> Result<()> {
    let bad = |m: String| Err(Error::invalid(format!("batch dump: {what}: {m}")));
    if e.lens.len() != rows {
        return bad(format!("{} lengths for {rows} rows", e.lens.len()));
    }
    if let Some(r) = e.lens.iter().position(|&l| l as usize > e.max_len) {
        return bad(format!(
            "row {r} has length {} > padded length {}",
            e.lens[r], e.max_len
        ));
    }
    let slots = rows * e.max_len;
    if e.cat.len() != slots * schema.e_cat() || e.num.len() != slots * schema.e_num() {
        return bad(format!(
            "event buffers ({} ids, {} numbers) do not match {rows} rows × {} slots × \
             ({} categorical, {} numeric) fields",
            e.cat.len(),
            e.num.len(),
            e.max_len,
            schema.e_cat(),
            schema.e_num()
        ));
    }
    Ok(())
}

/// Writes `batch` (padded layout of [`crate::data::batch`], shapes from `schema`), the loss
/// configuration `loss` and the train split's class counts `[N_0, N_1]` to `path` as a batch
/// dump for the NumPy reference, atomically (temp file, then rename).
///
/// Errors: a batch without rows or labels, buffers that do not match `schema` and the
/// batch's lengths, an invalid `loss`, or `loss.hard` off (the reference always computes
/// L_hard, so such a dump would silently disagree with the engine).
pub fn write_batch_dump(
    path: &Path,
    batch: &Batch,
    schema: &Schema,
    loss: &LossConfig,
    class_counts: [u64; 2],
) -> Result<()> {
    let rows = batch.rows;
    if rows == 0 {
        return Err(Error::invalid("batch dump: the batch has no rows"));
    }
    loss.validate()?;
    if !loss.hard {
        return Err(Error::invalid(
            "batch dump: loss.hard is off; the NumPy reference always includes L_hard",
        ));
    }
    let labels = batch
        .labels
        .as_ref()
        .ok_or_else(|| Error::invalid("batch dump: the batch has no labels"))?;
    if labels.len() != rows {
        return Err(Error::invalid(format!(
            "batch dump: {} labels for {rows} rows",
            labels.len()
        )));
    }
    if batch.profile_num.len() != rows * schema.f_num()
        || batch.profile_cat.len() != rows * schema.f_cat()
    {
        return Err(Error::invalid(format!(
            "batch dump: profile buffers ({} numbers, {} ids) do not match {rows} rows × \
             ({} numeric, {} categorical) fields",
            batch.profile_num.len(),
            batch.profile_cat.len(),
            schema.f_num(),
            schema.f_cat()
        )));
    }
    check_events("pre-service", rows, &batch.pre, schema)?;
    check_events("in-service", rows, &batch.in_service, schema)?;

    let (lp, li) = (batch.pre.max_len, batch.in_service.max_len);
    let (ec, ed) = (schema.e_cat(), schema.e_num());
    let f32s = |v: &[f32]| bytemuck::cast_slice::<f32, u8>(v).to_vec();
    let u32s = |v: &[u32]| bytemuck::cast_slice::<u32, u8>(v).to_vec();
    let data: Vec<(&str, Dtype, Vec<usize>, Vec<u8>)> = vec![
        (
            "profile_num",
            Dtype::F32,
            vec![rows, schema.f_num()],
            f32s(&batch.profile_num),
        ),
        (
            "profile_cat",
            Dtype::U32,
            vec![rows, schema.f_cat()],
            u32s(&batch.profile_cat),
        ),
        (
            "pre_cat",
            Dtype::U32,
            vec![rows, lp, ec],
            u32s(&batch.pre.cat),
        ),
        (
            "pre_num",
            Dtype::F32,
            vec![rows, lp, ed],
            f32s(&batch.pre.num),
        ),
        ("pre_lens", Dtype::U32, vec![rows], u32s(&batch.pre.lens)),
        (
            "in_cat",
            Dtype::U32,
            vec![rows, li, ec],
            u32s(&batch.in_service.cat),
        ),
        (
            "in_num",
            Dtype::F32,
            vec![rows, li, ed],
            f32s(&batch.in_service.num),
        ),
        (
            "in_lens",
            Dtype::U32,
            vec![rows],
            u32s(&batch.in_service.lens),
        ),
        ("labels", Dtype::U8, vec![rows], labels.clone()),
    ];
    let mut tensors = Vec::with_capacity(data.len());
    for (name, dtype, shape, bytes) in &data {
        let view = TensorView::new(*dtype, shape.clone(), bytes)
            .map_err(|e| Error::format(path, format!("tensor {name}: {e}")))?;
        tensors.push((*name, view));
    }
    let meta_json = serde_json::json!({
        "alpha": loss.alpha,
        "beta": loss.beta,
        "gamma": loss.gamma,
        "delta": loss.delta,
        "tau": loss.tau,
        "rho": loss.rho,
        "soft": loss.soft,
        "coarse": loss.coarse,
        "fine": loss.fine,
        "self_distill": loss.self_distill,
        "reweight": loss.reweight,
        "coarse_cosine": loss.coarse_cosine,
        "class_counts": class_counts,
    });
    let meta = HashMap::from([(KEY_LOSS.to_string(), meta_json.to_string())]);
    let out = safetensors::tensor::serialize(tensors, &Some(meta))
        .map_err(|e| Error::format(path, format!("serialising the batch dump: {e}")))?;
    write_atomic(path, &out)
}
