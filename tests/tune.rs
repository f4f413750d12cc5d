//! `mgkd-train tune` end to end on a tiny synthetic cohort: the chosen settings, written as
//! `tuned.toml`, reproduce the best trial's validation AUC to the last bit when `student`
//! trains with them under the kept teacher, and when `ablation` trains its own teacher with
//! them (the same as the search's); a resumed search keeps its finished trials and
//! teachers and ends as an uninterrupted one; a trial's draw does not depend on the others;
//! bad settings are refused by name.

mod cli_run;

use std::path::Path;
use std::process::Output;

use cli_run::{bin, ok};

use mgkd::backend::Precision;
use mgkd::train::tune::{SearchSpace, TrialResult};
use serde_json::Value;

fn synth(dir: &Path) -> String {
    cli_run::synth(dir, "600", "8", "4")
        .to_str()
        .unwrap()
        .to_string()
}

/// `tune` on `data` into `out` with `trials` trials (2 seeds, widths 8 and 12, 2–3 epochs).
fn tune(data: &str, out: &Path, trials: &str, extra: &[&str]) -> Output {
    let mut args = vec![
        "tune",
        "--data",
        data,
        "--out",
        out.to_str().unwrap(),
        "--trials",
        trials,
        "--seeds",
        "2",
        "--widths",
        "8,12",
        "--epochs-range",
        "2,3",
        "--epochs",
        "2",
        "--heads",
        "2",
        "--blocks",
        "2",
        "--d-cat",
        "4",
        "--batch",
        "64",
        "--device",
        "cpu",
        "--quiet",
    ];
    args.extend_from_slice(extra);
    bin(&args)
}

/// [`tune`], which must succeed.
fn tune_ok(data: &str, out: &Path, trials: &str, extra: &[&str]) {
    let o = tune(data, out, trials, extra);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

fn trials(dir: &Path) -> Vec<TrialResult> {
    std::fs::read_to_string(dir.join("trials.jsonl"))
        .expect("trials.jsonl")
        .lines()
        .map(|l| serde_json::from_str(l).expect("trial line"))
        .collect()
}

#[test]
fn the_tuned_config_reproduces_the_best_trial() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = synth(tmp.path());
    let dir = tmp.path().join("tune");
    tune_ok(&data, &dir, "3", &[]);
    let all = trials(&dir);
    assert_eq!(all.len(), 3);
    let file: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("tune.json")).expect("json"))
            .expect("tune.json");
    let best = file["best_full"].as_u64().expect("best_full");
    let t = &all[best as usize];
    assert!(all.iter().all(|x| x.full_mean() <= t.full_mean()));
    // `student --config tuned.toml` under the kept teacher of seed 0 is that trial's seed-0
    // full student.
    let teacher = dir.join(format!("teachers/d{}-seed0.safetensors", t.params.d));
    let student = tmp.path().join("s.safetensors");
    ok(&[
        "student",
        "--data",
        &data,
        "--teacher",
        teacher.to_str().unwrap(),
        "--out",
        student.to_str().unwrap(),
        "--config",
        dir.join("tuned.toml").to_str().unwrap(),
        "--seed",
        "0",
        "--device",
        "cpu",
        "--quiet",
    ]);
    let log = std::fs::read_to_string(tmp.path().join("s.safetensors.log.jsonl")).expect("log");
    let best_auc = log
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).expect("line")["valid_auc"]
                .as_f64()
                .unwrap()
        })
        .fold(f64::MIN, f64::max);
    assert_eq!(
        best_auc.to_bits(),
        t.full_valid_auc[0].to_bits(),
        "{best_auc} vs {t:?}"
    );
    let report = std::fs::read_to_string(dir.join("report.md")).expect("report");
    assert!(
        report.contains("validation split only") && !report.contains("test"),
        "{report}"
    );
    assert!(
        report.contains("--config") && report.contains("--plain-config"),
        "no ablation command in {report}"
    );
    // `ablation --config tuned.toml` trains the search's teacher (the file's `[teacher]`
    // holds the settings the search trained it with, not the trial's lr and epochs), so its
    // seed-0 full student is the trial's too; with `--plain-config tuned-plain.toml` its
    // plain student is the seed-0 plain student of the plain student's trial.
    let abl = tmp.path().join("abl");
    ok(&[
        "ablation",
        "--data",
        &data,
        "--out",
        abl.to_str().unwrap(),
        "--config",
        dir.join("tuned.toml").to_str().unwrap(),
        "--plain-config",
        dir.join("tuned-plain.toml").to_str().unwrap(),
        "--variants",
        "full",
        "--seeds",
        "1",
        "--device",
        "cpu",
        "--quiet",
    ]);
    let values = |p: &Path| mgkd::model::checkpoint::read(p).expect("checkpoint").values;
    assert!(
        values(&abl.join("checkpoints/seed0-teacher.safetensors")) == values(&teacher),
        "the ablation's teacher differs from the search's"
    );
    let results: Value =
        serde_json::from_str(&std::fs::read_to_string(abl.join("results.json")).expect("json"))
            .expect("results.json");
    let best_of = |variant: &str| {
        results["runs"]
            .as_array()
            .expect("runs")
            .iter()
            .find(|r| r["variant"] == variant)
            .unwrap_or_else(|| panic!("no {variant} run"))["valid_auc"]
            .as_array()
            .expect("valid_auc")
            .iter()
            .map(|v| v.as_f64().unwrap())
            .fold(f64::MIN, f64::max)
    };
    let best = best_of("full");
    assert_eq!(
        best.to_bits(),
        t.full_valid_auc[0].to_bits(),
        "{best} vs {t:?}"
    );
    let p = &all[file["best_plain"].as_u64().expect("best_plain") as usize];
    let plain = best_of("plain");
    assert_eq!(
        plain.to_bits(),
        p.plain_valid_auc[0].to_bits(),
        "{plain} vs {p:?}"
    );
}

#[test]
fn a_resumed_search_keeps_its_trials_and_ends_as_an_uninterrupted_one() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = synth(tmp.path());
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    assert!(tune(&data, &a, "1", &[]).status.success());
    let first = std::fs::read_to_string(a.join("trials.jsonl")).expect("trials");
    let teachers: Vec<_> = std::fs::read_dir(a.join("teachers"))
        .expect("teachers")
        .map(|e| {
            let e = e.expect("entry");
            (
                e.file_name(),
                e.metadata().expect("meta").modified().expect("mtime"),
            )
        })
        .collect();
    // Without --resume the finished trials are not thrown away.
    let out = tune(&data, &a, "3", &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--resume"), "{err}");
    assert!(tune(&data, &a, "3", &["--resume"]).status.success());
    let resumed = std::fs::read_to_string(a.join("trials.jsonl")).expect("trials");
    assert!(resumed.starts_with(&first));
    for (name, mtime) in teachers {
        let now = std::fs::metadata(a.join("teachers").join(&name)).expect("meta");
        assert_eq!(
            now.modified().expect("mtime"),
            mtime,
            "{name:?} trained again"
        );
    }
    assert!(tune(&data, &b, "3", &[]).status.success());
    let strip = |ts: Vec<TrialResult>| -> Vec<TrialResult> {
        ts.into_iter()
            .map(|t| TrialResult { seconds: 0.0, ..t })
            .collect()
    };
    assert_eq!(strip(trials(&a)), strip(trials(&b)));
    for f in ["tuned.toml", "tuned-plain.toml"] {
        assert_eq!(
            std::fs::read(a.join(f)).expect("a"),
            std::fs::read(b.join(f)).expect("b"),
            "{f}"
        );
    }
    // Another search seed does not continue this search, nor does another precision.
    let out = tune(&data, &a, "4", &["--resume", "--search-seed", "5"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("another search"),
        "{err}"
    );
    let out = tune(&data, &a, "4", &["--resume", "--precision", "bf16"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("finished earlier in f32, this run is in bf16"),
        "{err}"
    );
    assert!(trials(&a).iter().all(|t| t.precision == Precision::F32));
}

#[test]
fn draws_are_independent_of_other_trials_and_within_the_space() {
    let space = SearchSpace::default();
    space.validate().expect("default space");
    let t7 = space.draw(3, 7);
    assert_eq!(t7, space.draw(3, 7));
    assert_ne!(t7, space.draw(3, 8));
    assert_ne!(t7, space.draw(4, 7));
    for k in 0..200 {
        let p = space.draw(1, k);
        assert!(space.widths.contains(&p.d));
        assert!((space.lr.lo..=space.lr.hi).contains(&p.lr));
        assert!((space.epochs.0..=space.epochs.1).contains(&p.epochs));
        assert!((0.0..=1.0).contains(&p.rho));
        for (x, r) in [
            (p.alpha, space.alpha),
            (p.beta, space.beta),
            (p.gamma, space.gamma),
            (p.delta, space.delta),
            (p.tau, space.tau),
        ] {
            assert!((r.lo..=r.hi).contains(&x), "{x} outside {r:?}");
        }
    }
}

#[test]
fn bad_settings_are_refused_by_name() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = synth(tmp.path());
    for (extra, want) in [
        (&["--d", "8"][..], "--widths"),
        (&["--time", "5"][..], "--time takes a time"),
        (
            &["--lr-range", "1e-3"][..],
            "--lr-range 1e-3: expected LO,HI",
        ),
        (&["--lr-range", "1e-2,1e-3"][..], "learning-rate range"),
        (&["--epochs-range", "0,3"][..], "epochs range"),
        (&["--seeds", "0"][..], "--seeds 0"),
    ] {
        let dir = tmp.path().join("t");
        let mut args = vec!["tune", "--data", &data, "--out", dir.to_str().unwrap()];
        args.extend_from_slice(&["--device", "cpu", "--quiet"]);
        args.extend_from_slice(extra);
        let out = bin(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(want) && !err.contains("panicked"),
            "{extra:?}: {err}"
        );
    }
}

/// A resumed search refuses a kept teacher trained with other settings, or damaged.
#[test]
fn a_search_resumed_with_other_teacher_settings_is_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = synth(tmp.path());
    let dir = tmp.path().join("tune");
    tune_ok(&data, &dir, "1", &[]);
    // `--lr` sets the teachers' learning rate too: a kept teacher no longer fits the search.
    let out = tune(&data, &dir, "6", &["--resume", "--lr", "5e-3"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains("teachers/d")
            && err.contains("train.lr: 0.001 → 0.005")
            && !err.contains("panicked"),
        "{err}"
    );
    // A damaged kept teacher is an error naming it, not a panic.
    let kept: Vec<_> = std::fs::read_dir(dir.join("teachers"))
        .expect("teachers")
        .map(|e| e.expect("entry").path())
        .collect();
    let saved: Vec<Vec<u8>> = kept
        .iter()
        .map(|p| std::fs::read(p).expect("read"))
        .collect();
    for p in &kept {
        std::fs::write(p, b"not a checkpoint").expect("write");
    }
    let out = tune(&data, &dir, "6", &["--resume"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains("teachers/d")
            && err.contains("not a readable safetensors file")
            && !err.contains("panicked"),
        "{err}"
    );
    for (p, bytes) in kept.iter().zip(&saved) {
        std::fs::write(p, bytes).expect("restore");
    }
    // With the search's own settings it goes on.
    tune_ok(&data, &dir, "2", &["--resume"]);
    assert_eq!(trials(&dir).len(), 2);
}
