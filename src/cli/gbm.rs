//! The gradient-boosted baseline beside the ablation: `tools/gbm.py` trains LightGBM on
//! per-user aggregates of a dataset (the student's inputs, or the teacher's) and writes its
//! metrics per seed; `mgkd-train ablation --gbm FILE` reads that file, checks it was made on
//! the same dataset, and shows it as a row of the report.

use std::fmt::Write as _;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::data::writer::sha256_hex;
use crate::train::ablation::{mean_std, Variant, VariantSummary, TEACHER};
use crate::{Error, Result};

/// One LightGBM seed's metrics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GbmRun {
    /// Seed of LightGBM's sub-sampling.
    pub seed: u64,
    /// Trees kept by early stopping on the valid split.
    pub trees: u64,
    /// Valid-split AUC.
    pub valid_auc: f64,
    /// Valid-split KS.
    pub valid_ks: f64,
    /// Test-split AUC.
    pub test_auc: f64,
    /// Test-split KS.
    pub test_ks: f64,
}

/// Rows per split the GBM used.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GbmRows {
    /// Train rows.
    pub train: u64,
    /// Valid rows.
    pub valid: u64,
    /// Test rows.
    pub test: u64,
}

/// The probabilities a GBM was trained on instead of the labels (`tools/gbm.py
/// --soft-labels`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GbmSoftLabels {
    /// The CSV as the script was given it.
    pub file: String,
    /// The column read (`probability` for a `predict` CSV, `default_probability` for
    /// `synth --latents`).
    pub column: String,
    /// SHA-256 of the CSV.
    pub sha256: String,
}

/// The content of a `tools/gbm.py` result file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GbmResults {
    /// `mgkd-gbm`.
    pub format: String,
    /// 1.
    pub version: u32,
    /// `student` (profile + pre-service) or `in-service` (profile + in-service).
    pub inputs: String,
    /// SHA-256 of the dataset's `dataset.json` it was computed on.
    pub dataset_sha256: String,
    /// The dataset directory as the script was given it.
    pub data: String,
    /// Number of features.
    pub features: u64,
    /// Rows per split.
    pub rows: GbmRows,
    /// Seconds the script took.
    pub seconds: f64,
    /// One entry per seed.
    pub runs: Vec<GbmRun>,
    /// The soft labels the trees were trained on, when not the labels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub soft_labels: Option<GbmSoftLabels>,
}

impl GbmResults {
    /// Reads and checks the result file `path` against the open dataset `ds`: format and
    /// version, the dataset's manifest hash, the split sizes, one run at least, metrics in
    /// [0, 1]. Every refusal names the file and what is wrong.
    pub fn read(path: &Path, ds: &crate::data::Dataset) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let g: GbmResults = serde_json::from_slice(&bytes)
            .map_err(|e| Error::format(path, format!("not a tools/gbm.py result file: {e}")))?;
        let bad = |m: String| Err(Error::format(path, m));
        if g.format != "mgkd-gbm" || g.version != 1 {
            return bad(format!(
                "format {:?} version {}, expected \"mgkd-gbm\" version 1",
                g.format, g.version
            ));
        }
        if g.inputs != "student" && g.inputs != "in-service" {
            return bad(format!(
                "inputs {:?}: expected \"student\" or \"in-service\"",
                g.inputs
            ));
        }
        let manifest = ds.dir().join(crate::data::manifest::MANIFEST_FILE);
        let sha = sha256_hex(&std::fs::read(&manifest).map_err(|e| Error::io(&manifest, e))?);
        if g.dataset_sha256 != sha {
            return bad(format!(
                "made on another dataset (its dataset.json has SHA-256 {}, {} has {sha}): run \
                 tools/gbm.py on this dataset",
                g.dataset_sha256,
                manifest.display()
            ));
        }
        let split = |s| ds.rows_of_split(s).len() as u64;
        let want = GbmRows {
            train: split(crate::train::TRAIN),
            valid: split(crate::train::VALID),
            test: split(crate::train::TEST),
        };
        if g.rows != want {
            return bad(format!(
                "split sizes {:?} differ from the dataset's {want:?}",
                g.rows
            ));
        }
        if g.runs.is_empty() {
            return bad("no runs".into());
        }
        for (i, r) in g.runs.iter().enumerate() {
            let metrics = [r.valid_auc, r.valid_ks, r.test_auc, r.test_ks];
            if !metrics.iter().all(|m| (0.0..=1.0).contains(m)) {
                return bad(format!("run {i}: a metric outside [0, 1]: {r:?}"));
            }
        }
        Ok(g)
    }

    /// The row label in the report.
    pub fn label(&self) -> String {
        let inputs = match self.inputs.as_str() {
            "student" => "student's inputs",
            _ => "in-service inputs",
        };
        match &self.soft_labels {
            None => format!("LightGBM ({inputs})"),
            Some(soft) => format!(
                "LightGBM ({inputs}, trained on the soft labels {}:{})",
                soft.file, soft.column
            ),
        }
    }
}

/// The report's section on the GBM rows: per file, its test and valid metrics over its seeds,
/// and how far the full and the plain student's mean test AUC lie above it (unpaired: the
/// GBM's seeds are its own, only the split is shared).
pub fn gbm_markdown(gbm: &[GbmResults], summary: &[VariantSummary]) -> String {
    let mut s = String::new();
    if gbm.is_empty() {
        return s;
    }
    // Mean test and validation AUC of a model of the ablation.
    let means = |name: &str| {
        summary
            .iter()
            .find(|x| x.variant == name)
            .map(|x| (x.auc.mean, x.valid_auc.as_ref().map(|v| v.mean)))
    };
    s.push_str(
        "\nBeside gradient-boosted trees on per-user aggregates of the same split \
         (`tools/gbm.py`; mean ± sample std over its own seeds, so the differences in the last \
         columns are of means, unpaired): the students against trees on the student's \
         inputs, the teacher against trees on in-service inputs; the validation columns \
         compare each model's best epoch with the trees' early-stopped score.\n\n",
    );
    s.push_str("| model | seeds | features | test AUC | test KS | valid AUC | − it, test AUC | − it, valid AUC |\n|---|---|---|---|---|---|---|---|\n");
    for g in gbm {
        let col = |f: fn(&GbmRun) -> f64| mean_std(&g.runs.iter().map(f).collect::<Vec<_>>());
        let (auc, ks, vauc) = (
            col(|r| r.test_auc),
            col(|r| r.test_ks),
            col(|r| r.valid_auc),
        );
        let against = if g.inputs == "in-service" {
            vec![TEACHER]
        } else {
            vec![Variant::Full.name(), Variant::Plain.name()]
        };
        let diffs = |valid: bool| {
            let cells: Vec<String> = against
                .iter()
                .filter_map(|&name| {
                    let (test, valid_mean) = means(name)?;
                    let m = if valid {
                        valid_mean? - vauc.0
                    } else {
                        test - auc.0
                    };
                    Some(format!("{name} {m:+.4}"))
                })
                .collect();
            if cells.is_empty() {
                "—".to_string()
            } else {
                cells.join(", ")
            }
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {:.4} ± {:.4} | {:.4} ± {:.4} | {:.4} ± {:.4} | {} | {} |",
            g.label(),
            g.runs.len(),
            g.features,
            auc.0,
            auc.1,
            ks.0,
            ks.1,
            vauc.0,
            vauc.1,
            diffs(false),
            diffs(true)
        );
    }
    s
}
