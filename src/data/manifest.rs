//! `dataset.json`: the manifest of a dataset directory (docs/model.md §3.1).

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::schema::Schema;
use crate::{Error, Result};

/// Value of the manifest's `format` field.
pub const FORMAT_NAME: &str = "mgkd-dataset";
/// The on-disk format version this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// File name of the manifest inside a dataset directory.
pub const MANIFEST_FILE: &str = "dataset.json";
/// Names of the three splits, by split id.
pub const SPLIT_NAMES: [&str; 3] = ["train", "valid", "test"];

/// Row and default counts of one split.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SplitStats {
    /// Split id: 0 train, 1 valid, 2 test.
    pub split: u8,
    /// Split name (`train`, `valid`, `test`).
    pub name: String,
    /// Rows in the split.
    pub rows: u64,
    /// Rows with label 1 (0 when the dataset has no labels).
    pub positives: u64,
    /// `positives / rows` (0 for an empty split or an unlabelled dataset).
    pub default_rate: f64,
}

/// One shard file of the dataset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardInfo {
    /// File name, relative to the dataset directory (`shard-00000.safetensors`).
    pub file: String,
    /// Rows stored in the shard.
    pub rows: u64,
    /// Total pre-service events stored in the shard (P).
    pub pre_events: u64,
    /// Total in-service events stored in the shard.
    pub in_events: u64,
    /// File size in bytes.
    pub bytes: u64,
    /// Lower-case hex SHA-256 of the whole file.
    pub sha256: String,
}

/// The manifest: everything a reader needs to validate and interpret the shards.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Always [`FORMAT_NAME`].
    pub format: String,
    /// Format version, [`FORMAT_VERSION`].
    pub version: u32,
    /// Field names, kinds, vocabularies, normalisation and length limits.
    pub schema: Schema,
    /// Total rows over all shards.
    pub rows: u64,
    /// Whether shards carry a `label` tensor (false for new applicants to be scored).
    pub has_label: bool,
    /// Whether shards carry `user_id_offsets`/`user_id_bytes` (UTF-8 user ids).
    pub has_user_id: bool,
    /// Per-split counts, always three entries (train, valid, test).
    pub splits: Vec<SplitStats>,
    /// The shards, in row order.
    pub shards: Vec<ShardInfo>,
    /// How the dataset was made (free text, e.g. the synth command line).
    #[serde(default)]
    pub source: String,
    /// What `import` saw of the times (absent for datasets without times, and in manifests
    /// written before it existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub times: Option<TimeSpans>,
}

/// The time span of an imported dataset: its activations, and each window's events
/// measured from their user's activation (docs/import.md, "Checks on the times").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TimeSpans {
    /// The earliest activation (ISO 8601, UTC).
    pub activation_first: String,
    /// The latest activation (ISO 8601, UTC).
    pub activation_last: String,
    /// The in-service window in days, when the import set one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window_days: Option<f64>,
    /// Stored pre-service events: days before their user's activation (none without
    /// event times).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pre: Option<WindowSpan>,
    /// Stored in-service events: days after their user's activation.
    #[serde(default, skip_serializing_if = "Option::is_none", rename = "in")]
    pub in_service: Option<WindowSpan>,
}

/// The events of one window, in days from their user's activation (before it for the
/// pre-service window, after it for the in-service one).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WindowSpan {
    /// Events in the window.
    pub events: u64,
    /// The nearest event to the activation, in days (absent without events).
    pub min_days: Option<f64>,
    /// The median distance, in days.
    pub median_days: Option<f64>,
    /// The farthest event from the activation, in days.
    pub max_days: Option<f64>,
}

impl Manifest {
    /// Reads and parses `dir/dataset.json` (structure only; [`crate::data`]'s reader checks
    /// it against the shards).
    pub fn load(dir: &Path) -> Result<Manifest> {
        let path = dir.join(MANIFEST_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        Manifest::from_json(&path, &text)
    }

    /// Parses manifest text (structure, format name and version only); `path` names the file
    /// in errors. Used by [`Manifest::load`] and by fuzzing.
    pub fn from_json(path: &Path, text: &str) -> Result<Manifest> {
        let manifest: Manifest = serde_json::from_str(text)
            .map_err(|e| Error::format(path, format!("not a valid manifest: {e}")))?;
        if manifest.format != FORMAT_NAME {
            return Err(Error::format(
                path,
                format!(
                    "field `format` is {:?}, expected {FORMAT_NAME:?}",
                    manifest.format
                ),
            ));
        }
        if manifest.version != FORMAT_VERSION {
            return Err(Error::format(
                path,
                format!(
                    "field `version` is {}, this build reads version {FORMAT_VERSION}",
                    manifest.version
                ),
            ));
        }
        Ok(manifest)
    }
}
