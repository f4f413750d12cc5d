//! `mgkd-train monitor`: population and characteristic stability against a reference.
//!
//! - A dataset compared with itself: every index exactly 0, every flag stable.
//! - A second draw of the same cohort (another seed): every characteristic stable and a
//!   score PSI far below the watch threshold.
//! - A shifted cohort (`synth --risk-shift 2 --activity-shift 2`: riskier, more active
//!   applicants encoded like the reference): the activity-driven inputs
//!   (`txn_count_90d`, the pre-service length) flagged *act*, the score PSI at least
//!   *watch*, higher bad rates in the score bands, the SVG chart written.
//! - Refusals: data of another schema, `--svg` without `--model`, an empty split.

use std::path::Path;
use std::process::{Command, Output};

use mgkd::data::{synthesize, SynthConfig};
use serde_json::Value;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_mgkd-train"))
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn ok(args: &[&str]) -> String {
    let o = bin().args(args).output().expect("run mgkd-train");
    assert!(o.status.success(), "{args:?} failed:\n{}", text(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn refused(args: &[&str], needles: &[&str]) {
    let o = bin().args(args).output().expect("run mgkd-train");
    let t = text(&o);
    assert!(!o.status.success(), "{args:?} should fail:\n{t}");
    assert!(!t.contains("panicked"), "{args:?} panicked:\n{t}");
    for n in needles {
        assert!(t.contains(n), "{args:?}: message lacks {n:?}:\n{t}");
    }
}

fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

fn cohort(dir: &Path, users: u64, seed: u64, shift: (f64, f64), pre_len: usize) {
    let cfg = SynthConfig {
        users,
        seed,
        pre_len,
        in_len: 16,
        risk_shift: shift.0,
        activity_shift: shift.1,
        ..SynthConfig::default()
    };
    synthesize(dir, &cfg).expect("synthesize");
}

fn monitor_json(reference: &Path, data: &Path, extra: &[&str]) -> Value {
    let mut a = vec![
        "monitor",
        "--reference",
        p(reference),
        "--data",
        p(data),
        "--json",
        "--device",
        "cpu",
    ];
    a.extend(extra);
    serde_json::from_str(&ok(&a)).expect("JSON report")
}

/// (name → (index, flag)) of the characteristics.
fn csi(r: &Value) -> std::collections::BTreeMap<String, (f64, String)> {
    r["characteristics"]
        .as_array()
        .expect("characteristics")
        .iter()
        .map(|c| {
            (
                c["name"].as_str().unwrap().to_string(),
                (
                    c["index"].as_f64().unwrap(),
                    c["flag"].as_str().unwrap().to_string(),
                ),
            )
        })
        .collect()
}

#[test]
fn monitor_flags_a_shifted_cohort_and_not_an_identical_one() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (reference, same, shifted) = (
        tmp.path().join("reference"),
        tmp.path().join("same"),
        tmp.path().join("shifted"),
    );
    cohort(&reference, 6000, 1, (0.0, 0.0), 8);
    cohort(&same, 3000, 3, (0.0, 0.0), 8);
    cohort(&shifted, 3000, 3, (2.0, 2.0), 8);
    let t = tmp.path().join("teacher.safetensors");
    let s = tmp.path().join("student.safetensors");
    let widths = [
        "--d", "16", "--heads", "2", "--blocks", "1", "--d-cat", "4", "--device", "cpu",
    ];
    let mut a = vec![
        "teacher",
        "--data",
        p(&reference),
        "--out",
        p(&t),
        "--epochs",
        "2",
    ];
    a.extend(widths);
    ok(&a);
    let mut a = vec![
        "student",
        "--data",
        p(&reference),
        "--teacher",
        p(&t),
        "--out",
        p(&s),
        "--epochs",
        "3",
    ];
    a.extend(widths);
    ok(&a);
    let model = ["--model", p(&s)];

    // Identical: every index exactly 0.
    let r = monitor_json(&reference, &reference, &model);
    assert_eq!(r["score"]["psi"].as_f64(), Some(0.0), "{}", r["score"]);
    assert_eq!(r["score"]["flag"], "stable");
    let c = csi(&r);
    assert_eq!(c.len(), 32 + 16 + 1);
    assert!(c.values().all(|(i, f)| *i == 0.0 && f == "stable"), "{c:?}");
    assert_eq!(r["flags"]["stable"], 49);

    // A second draw of the same population.
    let r = monitor_json(&reference, &same, &model);
    let same_psi = r["score"]["psi"].as_f64().unwrap();
    assert!(same_psi < 0.05, "same-population PSI {same_psi}");
    assert_eq!(r["flags"]["stable"], 49, "{:?}", csi(&r));

    // The shifted cohort.
    let svg = tmp.path().join("scores.svg");
    let r = monitor_json(&reference, &shifted, &["--model", p(&s), "--svg", p(&svg)]);
    let c = csi(&r);
    for name in ["txn_count_90d", "pre_service_length"] {
        assert_eq!(c[name].1, "act", "{name}: {:?}", c[name]);
    }
    let psi = r["score"]["psi"].as_f64().unwrap();
    assert!(
        psi >= 0.10 && psi > 10.0 * same_psi,
        "shifted PSI {psi}, same-population PSI {same_psi}"
    );
    assert_ne!(r["score"]["flag"], "stable");
    let bands = r["score"]["bands"].as_array().expect("bands");
    assert_eq!(bands.len(), 10);
    let last = &bands[9];
    assert!((last["reference_approval"].as_f64().unwrap() - 1.0).abs() < 1e-9);
    assert!((last["new_approval"].as_f64().unwrap() - 1.0).abs() < 1e-9);
    // The reference's bands hold a tenth each (its own deciles).
    for b in bands {
        let share = b["reference_share"].as_f64().unwrap();
        assert!((share - 0.1).abs() < 0.002, "{b}");
    }
    // Riskier applicants: more defaulters in most bands.
    let worse = bands
        .iter()
        .filter(|b| b["new_bad_rate"].as_f64() > b["reference_bad_rate"].as_f64())
        .count();
    assert!(worse >= 8, "new bad rate higher in only {worse} bands");
    assert!(r["new"]["bad_rate"].as_f64() > r["reference"]["bad_rate"].as_f64());
    let chart = std::fs::read_to_string(&svg).expect("chart written");
    assert!(
        chart.starts_with("<svg") && chart.contains("PSI"),
        "{chart:.200}"
    );
    assert!(chart.matches("<polyline").count() >= 2);

    // The table output names the flags.
    let out = ok(&[
        "monitor",
        "--reference",
        p(&reference),
        "--data",
        p(&shifted),
        "--device",
        "cpu",
    ]);
    assert!(
        out.contains("txn_count_90d") && out.contains("act"),
        "{out}"
    );
    assert!(!out.contains("score PSI"), "no model, no score PSI: {out}");

    // Refusals.
    let other = tmp.path().join("other");
    cohort(&other, 500, 4, (0.0, 0.0), 12);
    refused(
        &["monitor", "--reference", p(&reference), "--data", p(&other)],
        &[
            "another schema",
            "pre-service length limit: 12 here, 8 wanted",
        ],
    );
    refused(
        &[
            "monitor",
            "--reference",
            p(&reference),
            "--data",
            p(&same),
            "--svg",
            p(&svg),
        ],
        &["--svg", "needs --model"],
    );
    let tiny = tmp.path().join("tiny");
    let cfg = SynthConfig {
        users: 50,
        pre_len: 8,
        in_len: 16,
        split: [100, 0, 0],
        ..SynthConfig::default()
    };
    synthesize(&tiny, &cfg).expect("synthesize");
    refused(
        &[
            "monitor",
            "--reference",
            p(&reference),
            "--data",
            p(&tiny),
            "--split",
            "test",
        ],
        &["no rows in the test split"],
    );
}
