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

/// `tools/gbm.py --data DATA --inputs in-service --seeds 1 --out OUT extra…`.
fn gbm(data: &Path, out: &Path, extra: &[&str]) -> Output {
    Command::new(python())
        .arg(root().join("tools/gbm.py"))
        .arg("--data")
        .arg(data)
        .args(["--inputs", "in-service", "--seeds", "1", "--out"])
        .arg(out)
        .args(extra)
        .env("OMP_NUM_THREADS", "2")
        .output()
        .expect("run gbm.py")
}

#[test]
fn the_gbm_trains_on_soft_labels_and_refuses_bad_ones() {
    if !has("numpy, safetensors, lightgbm") {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    let latents = tmp.path().join("latents.csv");
    let (d, l) = (data.to_str().unwrap(), latents.to_str().unwrap());
    cli_run::ok(&[
        "synth",
        "--out",
        d,
        "--users",
        "3000",
        "--default-rate",
        "0.2",
        "--in-len",
        "16",
        "--pre-len",
        "8",
        "--latents",
        l,
    ]);
    let ds = Dataset::open(&data).expect("open");

    // The generator's true probabilities: the trees learn the risk from them.
    let file = tmp.path().join("gbm-true.json");
    let out = gbm(
        &data,
        &file,
        &["--soft-labels", l, "--soft-column", "default_probability"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let g = GbmResults::read(&file, &ds).expect("the ablation's check accepts it");
    let soft = g
        .soft_labels
        .as_ref()
        .expect("the soft labels are recorded");
    assert_eq!(
        (soft.file.as_str(), soft.column.as_str()),
        (l, "default_probability")
    );
    assert_eq!(soft.sha256.len(), 64);
    assert!(g.label().contains("soft labels"), "{}", g.label());
    assert!(g.runs[0].test_auc > 0.8, "{:?}", g.runs);

    // The targets are what the trees fit: the same probability for every train row leaves
    // nothing to learn, whatever the labels say (the labels alone give > 0.8, above).
    let flat = tmp.path().join("flat.csv");
    let rows: String = (0..ds.rows()).map(|r| format!("{r},0.5\n")).collect();
    std::fs::write(&flat, format!("row,probability\n{rows}")).expect("write");
    let file = tmp.path().join("gbm-flat.json");
    let out = gbm(&data, &file, &["--soft-labels", flat.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let g = GbmResults::read(&file, &ds).expect("read");
    assert_eq!(
        (g.runs[0].valid_auc, g.runs[0].test_auc),
        (0.5, 0.5),
        "{:?}",
        g.runs
    );

    // Bad files: a clear error naming the file and line, nothing written.
    let train_row = ds.rows_of_split(mgkd::train::TRAIN)[0];
    let cases: Vec<(String, &str)> = vec![
        ("key,probability\n0,0.5\n".into(), "no column 'row'"),
        (format!("row,probability\n{rows}{}\n", "0,0.5"), "line 3002"),
        (
            format!("row,probability\n{rows}").replace(
                &format!("\n{train_row},0.5\n"),
                &format!("\n{train_row},1.5\n"),
            ),
            "is not a probability",
        ),
        (
            format!("row,probability\n{rows}").replace(&format!("\n{train_row},0.5\n"), "\n"),
            "train rows have no value",
        ),
        (
            format!("row,probability\n{rows}99999,0.5\n"),
            "not a row of the dataset",
        ),
        (
            format!("row,probability\n{rows}").replace(",0.5\n", ",nan\n"),
            "line 2",
        ),
    ];
    let target = tmp.path().join("gbm-bad.json");
    for (i, (text, want)) in cases.iter().enumerate() {
        let bad = tmp.path().join(format!("bad{i}.csv"));
        std::fs::write(&bad, text).expect("write");
        let out = gbm(&data, &target, &["--soft-labels", bad.to_str().unwrap()]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "case {i}: {stderr}");
        assert!(
            stderr.contains(bad.to_str().unwrap()) && stderr.contains(want),
            "case {i}: expected {want:?} in {stderr}"
        );
        assert!(!stderr.contains("Traceback"), "case {i}: {stderr}");
        assert!(!target.exists(), "case {i}: an output was written");
    }
}
