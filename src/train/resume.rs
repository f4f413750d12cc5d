//! Resume checkpoints: the whole state of an unfinished training run, so that a run killed at
//! any moment (SIGKILL, a lost machine) continues where its last resume checkpoint left it
//! and ends with exactly the parameters of an uninterrupted run.
//!
//! One safetensors file, `<out>.resume.safetensors` beside the output ([`resume_path`]),
//! written atomically (temporary file, fsync, rename, fsync of the directory) every
//! [`Every`] and at the end of every epoch, removed when the run completes. It holds:
//! - tensors (F64, exact for an f32 or f64 backend): `values` (the current parameters),
//!   `adam.m` and `adam.v` (AdamW's moments) and, once an epoch has been validated,
//!   `best.values` (the parameters of the best validation AUC so far);
//! - metadata: `mgkd.format` = `mgkd-resume`, `mgkd.version` = `1`, [`KEY_RUN`] (the run's
//!   settings: stage, model configuration, training and loss configuration, the training
//!   record; a resume with other settings is refused, naming each difference),
//!   [`KEY_PROGRESS`] (the [`Progress`]: optimiser step, which is also the schedule's
//!   position, epoch and batch within it, a SHA-256 of the epoch's batch order, the
//!   epoch's running sums, the best epoch and early-stopping count, the history, the log's
//!   length) and `mgkd.data_sha256`, the SHA-256 of the tensor data, checked on reading as
//!   for checkpoints.
//!
//! The random state is the seed: the initialisation, the row shuffle and the batch order of
//! an epoch are pure functions of `(seed, epoch)` (see [`crate::train::batching`]), and the
//! training step draws nothing, so the seed (in the settings) and the position are the whole
//! of it; the batch-order hash checks that the data did not change under the run.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde::{Deserialize, Serialize};

use crate::backend::Float;
use crate::data::writer::write_atomic;
use crate::loss::Term;
use crate::model::checkpoint::{canonical_header, verify_data, KEY_DATA_SHA256};
use crate::train::trainer::{BestEpoch, EpochLog, TermMeans};
use crate::{Error, Result};

/// Value of the `mgkd.format` metadata key of a resume checkpoint.
pub const FORMAT: &str = "mgkd-resume";
/// Value of its `mgkd.version` key.
pub const VERSION: &str = "1";
/// Metadata key of the run's settings (JSON).
pub const KEY_RUN: &str = "mgkd.run";
/// Metadata key of the [`Progress`] (JSON).
pub const KEY_PROGRESS: &str = "mgkd.progress";
/// Suffix of the resume checkpoint beside an output.
pub const SUFFIX: &str = ".resume.safetensors";
/// Default interval between resume checkpoints within an epoch: five minutes of training.
pub const DEFAULT_EVERY: Every = Every::Seconds(300);
/// Longest interval [`Every`] accepts: 10⁹ steps, or a week.
pub const MAX_EVERY_STEPS: u64 = 1_000_000_000;
/// Longest time interval [`Every`] accepts, in seconds (a week).
pub const MAX_EVERY_SECONDS: u64 = 7 * 24 * 3600;

/// The resume checkpoint of the output `out`: `<out>.resume.safetensors`.
pub fn resume_path(out: &Path) -> PathBuf {
    let mut s = out.as_os_str().to_owned();
    s.push(SUFFIX);
    PathBuf::from(s)
}

/// How often a resume checkpoint is written within an epoch (one is always written at the
/// end of each epoch).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Every {
    /// After every this many optimiser steps.
    Steps(u64),
    /// At the first step after this many seconds of training since the last one.
    Seconds(u64),
}

impl FromStr for Every {
    type Err = String;

    /// `N` (steps), `Ns`, `Nm` or `Nh` (a time); N ≥ 1, at most 10⁹ steps or a week.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let t = s.trim();
        let (digits, unit) = match t.char_indices().last() {
            Some((i, c @ ('s' | 'm' | 'h'))) => (&t[..i], Some(c)),
            _ => (t, None),
        };
        let n: u64 = digits.parse().map_err(|_| {
            format!("{s:?} is not a step count (e.g. 500) or a time (e.g. 90s, 5m, 1h)")
        })?;
        if n == 0 {
            return Err(format!("{s:?}: the interval must be at least 1"));
        }
        match unit {
            None if n > MAX_EVERY_STEPS => Err(format!("{s:?}: at most {MAX_EVERY_STEPS} steps")),
            None => Ok(Every::Steps(n)),
            Some(u) => {
                let secs = n.saturating_mul(match u {
                    's' => 1,
                    'm' => 60,
                    _ => 3600,
                });
                if secs > MAX_EVERY_SECONDS {
                    return Err(format!("{s:?}: at most a week (168h)"));
                }
                Ok(Every::Seconds(secs))
            }
        }
    }
}

impl fmt::Display for Every {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Every::Steps(n) => write!(f, "{n}"),
            Every::Seconds(s) if s % 3600 == 0 => write!(f, "{}h", s / 3600),
            Every::Seconds(s) if s % 60 == 0 => write!(f, "{}m", s / 60),
            Every::Seconds(s) => write!(f, "{s}s"),
        }
    }
}

/// Where a run keeps its resume checkpoint, how often, and whether it starts from one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResumeOptions {
    /// The resume checkpoint ([`resume_path`] of the output, for the commands).
    pub path: PathBuf,
    /// Interval within an epoch.
    pub every: Every,
    /// Continue from the resume checkpoint at `path` (it must exist); otherwise start afresh
    /// (and replace it as the run goes).
    pub resume: bool,
}

/// The running sums of the epoch in progress (their means go to the epoch's log line).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EpochSums {
    /// Σ loss × rows over the steps read back so far.
    pub loss: f64,
    /// Rows of those steps.
    pub rows: u64,
    /// Σ term × rows of each student-stage term (hard, soft, coarse, fine, self).
    pub terms: [f64; 5],
    /// Whether each term was on.
    pub terms_on: [bool; 5],
    /// Padded in-service slots of the batches so far.
    pub slots: u64,
    /// Of those, the slots holding an event.
    pub filled: u64,
    /// Seconds of training in earlier processes (the timing of a resumed epoch adds them;
    /// its `data_seconds` and `gather_seconds` cover the part after the resume).
    pub train_seconds: f64,
}

impl EpochSums {
    /// Adds one step's student-stage `terms` (hard, soft, coarse, fine, self) over `rows`.
    pub fn add_terms(&mut self, terms: [Term; 5], rows: f64) {
        for (k, t) in terms.iter().enumerate() {
            if let Term::On(v) = t {
                self.terms[k] += v * rows;
                self.terms_on[k] = true;
            }
        }
    }

    /// The per-row mean of each term so far (`None` for the terms that were off).
    pub fn term_means(&self) -> TermMeans {
        let rows = self.rows as f64;
        let m = |k: usize| self.terms_on[k].then(|| self.terms[k] / rows);
        TermMeans {
            hard: m(0),
            soft: m(1),
            coarse: m(2),
            fine: m(3),
            self_distill: m(4),
        }
    }
}

/// Where a run stands: everything but the tensors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Progress {
    /// The epoch in progress, or the next one when `batch` is 0 (1-based; `epochs + 1`
    /// when every epoch has run).
    pub epoch: usize,
    /// Batches of `epoch` done.
    pub batch: usize,
    /// Optimiser steps taken (the learning-rate schedule's position and AdamW's bias
    /// correction).
    pub step: u64,
    /// SHA-256 of `epoch`'s batch order (row ids, batch by batch) when `batch` > 0.
    pub order_sha256: Option<String>,
    /// Running sums of `epoch`.
    pub sums: EpochSums,
    /// The best validation so far (its parameters are the `best.values` tensor).
    pub best: Option<BestEpoch>,
    /// Validations since the best one (early stopping).
    pub since_best: usize,
    /// Whether early stopping has ended the run.
    pub stopped_early: bool,
    /// One entry per finished epoch.
    pub history: Vec<EpochLog>,
    /// Seconds of training over the finished epochs.
    pub train_seconds: f64,
    /// Rows trained over the finished epochs.
    pub rows: u64,
    /// Bytes of the JSONL log that these epochs account for (lines after them, written
    /// by an epoch that the checkpoint does not include, are dropped on resume).
    pub log_bytes: u64,
    /// The first training loss read back (the divergence guard's reference).
    pub first_loss: Option<f64>,
}

impl Progress {
    /// A run that has not started.
    pub fn fresh() -> Progress {
        Progress {
            epoch: 1,
            batch: 0,
            step: 0,
            order_sha256: None,
            sums: EpochSums::default(),
            best: None,
            since_best: 0,
            stopped_early: false,
            history: Vec::new(),
            train_seconds: 0.0,
            rows: 0,
            log_bytes: 0,
            first_loss: None,
        }
    }
}

/// A resume checkpoint's contents, the values in the backend's element type `F`.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot<F> {
    /// The run's settings ([`KEY_RUN`]).
    pub run: serde_json::Value,
    /// Where the run stands.
    pub progress: Progress,
    /// Parameter values (table order).
    pub values: Vec<F>,
    /// AdamW first moment.
    pub m: Vec<F>,
    /// AdamW second moment.
    pub v: Vec<F>,
    /// Parameters of the best validation so far (present exactly when `progress.best` is).
    pub best_values: Option<Vec<F>>,
}

const TENSORS: [&str; 4] = ["values", "adam.m", "adam.v", "best.values"];

fn to_json<T: Serialize>(what: &str, v: &T) -> Result<String> {
    serde_json::to_string(v).map_err(|e| Error::invalid(format!("{what} to JSON: {e}")))
}

/// Writes `snap` to `path` atomically (see the module documentation).
pub fn write<F: Float>(path: &Path, snap: &Snapshot<F>) -> Result<()> {
    let n = snap.values.len();
    if snap.m.len() != n
        || snap.v.len() != n
        || snap.best_values.as_ref().is_some_and(|b| b.len() != n)
    {
        return Err(Error::invalid(
            "resume checkpoint: parameter and moment buffers of different lengths",
        ));
    }
    if snap.best_values.is_some() != snap.progress.best.is_some() {
        return Err(Error::invalid(
            "resume checkpoint: the best parameters and the best epoch go together",
        ));
    }
    let bytes = |v: &[F]| -> Vec<u8> {
        v.iter()
            .flat_map(|&x| Float::to_f64(x).to_le_bytes())
            .collect::<Vec<u8>>()
    };
    let mut data = vec![bytes(&snap.values), bytes(&snap.m), bytes(&snap.v)];
    if let Some(b) = &snap.best_values {
        data.push(bytes(b));
    }
    let mut tensors = Vec::with_capacity(data.len());
    for (name, d) in TENSORS.iter().zip(&data) {
        let view = TensorView::new(Dtype::F64, vec![n], d)
            .map_err(|e| Error::format(path, format!("tensor {name}: {e}")))?;
        tensors.push((*name, view));
    }
    let meta: HashMap<String, String> = HashMap::from([
        ("mgkd.format".to_string(), FORMAT.to_string()),
        ("mgkd.version".to_string(), VERSION.to_string()),
        (KEY_RUN.to_string(), to_json("run settings", &snap.run)?),
        (
            KEY_PROGRESS.to_string(),
            to_json("progress", &snap.progress)?,
        ),
    ]);
    let out = safetensors::tensor::serialize(tensors, &Some(meta))
        .map_err(|e| Error::format(path, format!("serialising the resume checkpoint: {e}")))?;
    let out = canonical_header(&out, true).ok_or_else(|| {
        Error::format(path, "serialising the resume checkpoint: unreadable header")
    })?;
    write_atomic(path, &out)
}

/// Reads the resume checkpoint at `path`, checking its format, version and checksum, its
/// settings and progress, and its tensors (names, dtype F64, equal lengths, finite values).
pub fn read<F: Float>(path: &Path) -> Result<Snapshot<F>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let bad = |m: String| Error::format(path, m);
    let (header_len, m) = SafeTensors::read_metadata(&bytes).map_err(|e| {
        bad(format!(
            "not a readable safetensors file (truncated or damaged): {e}"
        ))
    })?;
    let meta: BTreeMap<String, String> = m
        .metadata()
        .as_ref()
        .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
        .unwrap_or_default();
    let get = |k: &str| {
        meta.get(k)
            .ok_or_else(|| bad(format!("not a resume checkpoint: no metadata key {k}")))
    };
    if get("mgkd.format")? != FORMAT {
        return Err(bad(format!(
            "mgkd.format is {:?}, expected {FORMAT:?} (a resume checkpoint)",
            meta["mgkd.format"]
        )));
    }
    if get("mgkd.version")? != VERSION {
        return Err(bad(format!(
            "resume checkpoint version {:?} is not supported (this build reads {VERSION:?})",
            meta["mgkd.version"]
        )));
    }
    get(KEY_DATA_SHA256)?;
    verify_data(path, &bytes, header_len, &meta)?;
    let run: serde_json::Value =
        serde_json::from_str(get(KEY_RUN)?).map_err(|e| bad(format!("metadata {KEY_RUN}: {e}")))?;
    let progress: Progress = serde_json::from_str(get(KEY_PROGRESS)?)
        .map_err(|e| bad(format!("metadata {KEY_PROGRESS}: {e}")))?;
    if progress.epoch == 0 {
        return Err(bad(format!(
            "metadata {KEY_PROGRESS}: epoch 0 (epochs count from 1)"
        )));
    }
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| bad(format!("truncated or damaged safetensors file: {e}")))?;
    let mut found: Vec<Vec<F>> = Vec::new();
    let want = if progress.best.is_some() { 4 } else { 3 };
    for name in &TENSORS[..want] {
        let t = st
            .tensor(name)
            .map_err(|_| bad(format!("tensor {name} is missing")))?;
        if t.dtype() != Dtype::F64 || t.shape().len() != 1 {
            return Err(bad(format!(
                "tensor {name}: dtype {:?} shape {:?}, expected F64 of one dimension",
                t.dtype(),
                t.shape()
            )));
        }
        let v: Vec<f64> = t
            .data()
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect();
        if let Some(i) = v.iter().position(|x| !x.is_finite()) {
            return Err(bad(format!("tensor {name}: element {i} is not finite")));
        }
        if found.first().is_some_and(|f| f.len() != v.len()) {
            return Err(bad(format!(
                "tensor {name}: {} elements, `values` has {}",
                v.len(),
                found[0].len()
            )));
        }
        found.push(v.into_iter().map(<F as Float>::from_f64).collect());
    }
    if st.len() != want {
        let mut extra: Vec<&String> = st
            .names()
            .into_iter()
            .filter(|n| !TENSORS[..want].contains(&n.as_str()))
            .collect();
        extra.sort();
        return Err(bad(format!(
            "unexpected tensors: {} (`best.values` goes with a best epoch in {KEY_PROGRESS})",
            extra
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    let best_values = (want == 4).then(|| found.pop()).flatten();
    let v = found.pop().unwrap_or_default();
    let m = found.pop().unwrap_or_default();
    let values = found.pop().unwrap_or_default();
    Ok(Snapshot {
        run,
        progress,
        values,
        m,
        v,
        best_values,
    })
}

/// The differences between the settings `found` (of the resume checkpoint) and `wanted`
/// (of this run), as `path: found → wanted` lines (empty when they agree).
pub fn differences(found: &serde_json::Value, wanted: &serde_json::Value) -> Vec<String> {
    fn walk(at: &str, a: &serde_json::Value, b: &serde_json::Value, out: &mut Vec<String>) {
        use serde_json::Value::Object;
        match (a, b) {
            (Object(x), Object(y)) => {
                let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
                for k in keys {
                    let null = serde_json::Value::Null;
                    let sub = if at.is_empty() {
                        k.clone()
                    } else {
                        format!("{at}.{k}")
                    };
                    walk(
                        &sub,
                        x.get(k).unwrap_or(&null),
                        y.get(k).unwrap_or(&null),
                        out,
                    );
                }
            }
            // A JSON string holding JSON (the training record's metadata) is compared by
            // its fields.
            (serde_json::Value::String(x), serde_json::Value::String(y)) if x != y => {
                match (
                    serde_json::from_str::<serde_json::Value>(x),
                    serde_json::from_str::<serde_json::Value>(y),
                ) {
                    (Ok(p @ Object(_)), Ok(q @ Object(_))) => walk(at, &p, &q, out),
                    _ => out.push(format!("{at}: {a} → {b}")),
                }
            }
            _ if a != b => out.push(format!("{at}: {a} → {b}")),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk("", found, wanted, &mut out);
    out
}

/// Progress of the resume checkpoint at `path` (checked as [`read`] does), without
/// converting its tensors: for tools and tests that watch a run.
pub fn read_progress(path: &Path) -> Result<Progress> {
    Ok(read::<f64>(path)?.progress)
}
