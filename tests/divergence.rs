//! The divergence guard through the binary (issue 17): a teacher at learning rates 2 to 200
//! used to end with exit status 0 and a constant model (AUC 0.5000, KS 0); at 1e20 the
//! gradient becomes infinite. Now such a run
//! stops with a non-zero status and a message saying that it diverged and what was kept;
//! no diverged model is written as a result, and a checkpoint kept from the epochs before
//! the divergence is a working model (its scores are not constant), whole, and recorded as
//! that earlier epoch.

mod train_common;

use std::path::Path;
use std::process::{Command, Output};

use mgkd::train::resume::resume_path;
use train_common::Spec;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_mgkd-train"))
}

fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Trains a tiny teacher at `lr` (further flags in `extra`) into `out`; returns the output.
fn teacher(data: &Path, out: &Path, lr: &str, extra: &[&str]) -> Output {
    bin()
        .args(["teacher", "--data", p(data), "--out", p(out), "--lr", lr])
        .args(["--d", "8", "--heads", "2", "--blocks", "1", "--d-cat", "4"])
        .args([
            "--batch", "32", "--epochs", "6", "--quiet", "--device", "cpu",
        ])
        .args(extra)
        .output()
        .expect("run mgkd-train")
}

/// Asserts that `o` is a divergence: non-zero status, the message, no panic, no resume
/// checkpoint left for `out`.
fn assert_diverged(o: &Output, out: &Path) -> String {
    let t = text(o);
    assert!(
        !o.status.success(),
        "a diverging run ended with success:\n{t}"
    );
    assert!(!t.contains("panicked"), "panic:\n{t}");
    assert!(
        t.contains("error: teacher training diverged at epoch")
            && t.contains("try a lower learning rate"),
        "no divergence message:\n{t}"
    );
    assert!(
        !resume_path(out).exists(),
        "the resume checkpoint of a diverged run stays (resuming would diverge again)"
    );
    t
}

/// The logged epochs of `out`'s log.
fn logged_epochs(out: &Path) -> Vec<serde_json::Value> {
    let mut log = out.as_os_str().to_owned();
    log.push(".log.jsonl");
    std::fs::read_to_string(&log)
        .expect("log")
        .lines()
        .map(|l| serde_json::from_str(l).expect("log line"))
        .collect()
}

#[test]
fn a_teacher_at_learning_rates_2_to_200_stops_as_diverged() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    train_common::write(&data, Spec::labelled(1200, 31));
    for lr in ["2", "20", "200", "1e20"] {
        let out = tmp.path().join(format!("t{lr}.safetensors"));
        let o = teacher(&data, &out, lr, &[]);
        let t = assert_diverged(&o, &out);
        // Each guard: lr 2 collapses to a constant score, lr 200 explodes the loss, lr 1e20
        // makes the gradient infinite.
        let why = match lr {
            "2" => "every validation row gets the same score",
            "200" => "the first stops the run",
            "1e20" => "the gradient is not finite",
            _ => "",
        };
        assert!(t.contains(why), "lr {lr}: {t}");
        // At these rates the first epoch already diverges: nothing is written as a model.
        assert!(
            t.contains(&format!("nothing was written to {}", p(&out))),
            "lr {lr}: {t}"
        );
        assert!(!out.exists(), "lr {lr}: a diverged model was written");
        assert!(
            logged_epochs(&out).is_empty(),
            "lr {lr}: a diverged epoch was logged"
        );
    }
}

#[test]
fn a_run_that_diverges_later_keeps_its_best_earlier_checkpoint() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    train_common::write(&data, Spec::labelled(1200, 31));
    // Warm-up over every step: the learning rate climbs to 2 over six epochs, so the first
    // epochs train and a later one diverges.
    let config = tmp.path().join("warm.toml");
    std::fs::write(&config, "[train]\nwarmup = 1.0\n").expect("config");
    let out = tmp.path().join("t.safetensors");
    let o = teacher(&data, &out, "2", &["--config", p(&config)]);
    let t = assert_diverged(&o, &out);
    let ck = mgkd::model::checkpoint::read(&out).expect("the kept checkpoint is whole");
    let best = mgkd::train::best_from_metadata(&out, &ck.metadata)
        .expect("metadata")
        .expect("mgkd.best");
    let epochs = logged_epochs(&out);
    assert!(!epochs.is_empty(), "no epoch before the divergence:\n{t}");
    let diverged_at = epochs.len() + 1;
    assert!(
        t.contains(&format!("diverged at epoch {diverged_at}"))
            && t.contains(&format!("{} keeps epoch {}", p(&out), best.epoch)),
        "{t}"
    );
    assert!(best.epoch < diverged_at);
    let logged_best = &epochs[best.epoch - 1];
    assert_eq!(logged_best["valid_auc"].as_f64(), Some(best.valid_auc));
    // The kept model works: eval scores the valid split as it did when it was kept, with
    // scores that are not all the same.
    let o = bin()
        .args([
            "eval",
            "--data",
            p(&data),
            "--model",
            p(&out),
            "--split",
            "valid",
            "--json",
        ])
        .output()
        .expect("eval");
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("eval json");
    let auc = v["auc"].as_f64().expect("auc");
    assert!(
        (auc - best.valid_auc).abs() < 1e-6,
        "eval AUC {auc}, kept {}",
        best.valid_auc
    );
    assert!(
        v["ks"].as_f64().expect("ks") > 0.0,
        "the kept model's scores are constant"
    );
}
