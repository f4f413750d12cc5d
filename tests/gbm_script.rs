//! `tools/gbm.py`, the LightGBM baseline beside the ablation: every feature it builds equals
//! a row-by-row recomputation from the shards (`tests/fixtures/gbm_features_check.py`, needs
//! numpy and safetensors), and end to end it writes a result file that the ablation's
//! `--gbm` check accepts for this dataset, with in-service aggregates that separate the
//! planted signal, and a score CSV that `mgkd-train compare` reads (needs lightgbm).
//!
//! The interpreter is `$MGKD_PYTHON`, else `python3`. Without the modules the tests say they
//! skipped and pass, except under `$CI` (whose `.ci/run` installs them): then they fail.

mod cli_run;
mod skip;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use mgkd::cli::gbm::GbmResults;
use mgkd::data::Dataset;

fn python() -> String {
    std::env::var("MGKD_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// Whether the interpreter imports `modules`; says the test skipped when not.
fn has(modules: &str) -> bool {
    let ok = Command::new(python())
        .args(["-c", &format!("import {modules}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok {
        skip::skip_unless_ci(&format!(
            "{} cannot import {modules} (set MGKD_PYTHON to an interpreter with them)",
            python()
        ));
    }
    ok
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("run");
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A synthetic cohort of `users` in `dir` (short sequences).
fn synth(dir: &Path, users: &str) -> PathBuf {
    cli_run::synth(dir, users, "16", "8")
}

#[test]
fn every_gbm_feature_is_the_aggregate_it_names() {
    if !has("numpy, safetensors") {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = synth(tmp.path(), "400");
    let out = run(Command::new(python())
        .arg(root().join("tests/fixtures/gbm_features_check.py"))
        .arg(root().join("tools/gbm.py"))
        .arg(&data));
    let said = String::from_utf8_lossy(&out.stdout);
    let n: usize = said
        .trim()
        .strip_prefix("checked ")
        .and_then(|s| s.strip_suffix(" feature values"))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("unexpected output {said}"));
    // 400 users × 279 features × 2 input kinds.
    assert_eq!(n, 400 * 279 * 2);
}

#[test]
fn the_gbm_script_writes_a_file_the_ablation_accepts() {
    if !has("numpy, safetensors, lightgbm") {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = synth(tmp.path(), "3000");
    let file = tmp.path().join("gbm.json");
    let scores = tmp.path().join("gbm.csv");
    run(Command::new(python())
        .arg(root().join("tools/gbm.py"))
        .args([
            "--data",
            data.to_str().unwrap(),
            "--inputs",
            "in-service",
            "--seeds",
            "2",
        ])
        .arg("--out")
        .arg(&file)
        .arg("--predictions")
        .arg(&scores)
        .env("OMP_NUM_THREADS", "2"));
    let ds = Dataset::open(&data).expect("open");
    let g = GbmResults::read(&file, &ds).expect("the ablation's check accepts it");
    assert_eq!(g.inputs, "in-service");
    assert_eq!(g.runs.len(), 2);
    // The synthetic label is written in the in-service behaviour: the trees find it.
    for r in &g.runs {
        assert!(r.test_auc > 0.8 && r.trees > 0, "{r:?}");
    }
    // Every row scored, in `predict`'s format: `compare` joins it to the test rows (against
    // itself: no difference), and its AUC there is the trees'.
    let csv = std::fs::read_to_string(&scores).expect("scores");
    assert!(csv.starts_with("row,probability,logit\n"), "{}", &csv[..40]);
    assert_eq!(csv.lines().count() as u64, ds.rows() + 1);
    let s = scores.to_str().unwrap();
    let out = cli_run::ok(&["compare", "--data", data.to_str().unwrap(), s, s, "--json"]);
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(
        (j["diff"].as_f64(), j["p"].as_f64()),
        (Some(0.0), Some(1.0))
    );
    assert!(j["auc_a"].as_f64().unwrap() > 0.8, "{j}");
    // Another dataset's file is refused.
    let dir = tmp.path().join("other");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let other = synth(&dir, "300");
    let other = Dataset::open(&other).expect("open");
    let err = GbmResults::read(&file, &other).expect_err("refused");
    assert!(err.to_string().contains("made on another dataset"), "{err}");
}
