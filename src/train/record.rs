//! The training record stored in a checkpoint's metadata (key [`KEY_TRAINING`]): everything
//! that produced the model besides its [`crate::model::ModelConfig`] (which holds the data
//! schema), so that `eval`, `predict` and a reader of the file know how it was trained.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::backend::Precision;
use crate::loss::LossConfig;
use crate::model::Role;
use crate::train::trainer::{BestEpoch, TrainConfig, KEY_BEST};
use crate::{Error, Result};

/// Checkpoint metadata key of the [`TrainingRecord`] JSON.
pub const KEY_TRAINING: &str = "mgkd.training";

/// How a checkpoint was trained.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainingRecord {
    /// Teacher or student stage.
    pub stage: Role,
    /// Optimisation settings.
    pub train: TrainConfig,
    /// Loss settings (the teacher stage uses only `rho` and `reweight`).
    pub loss: LossConfig,
    /// Class weights `[w_0, w_1]` used (docs/model.md §5.1).
    pub class_weights: [f64; 2],
    /// The dataset directory trained on, as given.
    pub dataset: String,
    /// Rows of its train split.
    pub train_rows: u64,
    /// Student stage: the teacher checkpoint's path, as given.
    pub teacher: Option<String>,
    /// Student stage: lower-case hex SHA-256 of the teacher checkpoint file.
    pub teacher_sha256: Option<String>,
    /// Storage type of the run's activations (parameters are f32 either way); absent in
    /// checkpoints written before the precision scheme, which ran in f32.
    #[serde(default)]
    pub precision: Precision,
    /// Student stage with `--soft-labels`: the file L_soft's targets were read from, as given
    /// (absent when they were the teacher's logits).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub soft_labels: Option<String>,
    /// Lower-case hex SHA-256 of that file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub soft_labels_sha256: Option<String>,
}

impl TrainingRecord {
    /// The record of a `stage` run on `ds` (directory `data` as given) with `train` and
    /// `loss`: the train split's size and class weights are read from `ds`; `teacher` is a
    /// student's teacher checkpoint and its SHA-256; `precision` the backend's.
    pub fn of_run(
        ds: &crate::data::Dataset,
        data: &std::path::Path,
        stage: Role,
        train: &TrainConfig,
        loss: &LossConfig,
        teacher: Option<(&std::path::Path, String)>,
        precision: Precision,
    ) -> Result<TrainingRecord> {
        let rows = ds.rows_of_split(crate::train::TRAIN);
        let labels = crate::train::labels_of(ds, &rows, "training")?;
        let pos = labels.iter().filter(|&&y| y == 1).count() as u64;
        let neg = labels.len() as u64 - pos;
        Ok(TrainingRecord {
            stage,
            train: train.clone(),
            loss: loss.clone(),
            class_weights: crate::loss::class_weights(neg, pos, loss.rho, loss.reweight)?,
            dataset: data.display().to_string(),
            train_rows: rows.len() as u64,
            teacher: teacher.as_ref().map(|(p, _)| p.display().to_string()),
            teacher_sha256: teacher.map(|(_, s)| s),
            precision,
            soft_labels: None,
            soft_labels_sha256: None,
        })
    }

    /// The record as checkpoint metadata (`KEY_TRAINING` → JSON).
    pub fn to_metadata(&self) -> Result<BTreeMap<String, String>> {
        let json = serde_json::to_string(self)
            .map_err(|e| Error::invalid(format!("training record to JSON: {e}")))?;
        Ok(BTreeMap::from([(KEY_TRAINING.to_string(), json)]))
    }

    /// The record in checkpoint metadata, when there is one; `file` names the checkpoint
    /// in errors.
    pub fn from_metadata(
        file: &std::path::Path,
        meta: &BTreeMap<String, String>,
    ) -> Result<Option<TrainingRecord>> {
        meta.get(KEY_TRAINING)
            .map(|j| {
                serde_json::from_str(j)
                    .map_err(|e| Error::format(file, format!("metadata {KEY_TRAINING}: {e}")))
            })
            .transpose()
    }
}

/// The validation metrics of the kept parameters recorded in checkpoint metadata, when
/// present; `file` names the checkpoint in errors.
pub fn best_from_metadata(
    file: &std::path::Path,
    meta: &BTreeMap<String, String>,
) -> Result<Option<BestEpoch>> {
    meta.get(KEY_BEST)
        .map(|j| {
            serde_json::from_str(j)
                .map_err(|e| Error::format(file, format!("metadata {KEY_BEST}: {e}")))
        })
        .transpose()
}
