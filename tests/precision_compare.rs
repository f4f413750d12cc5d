//! `tools/precision_compare.py` (stdlib Python; `$MGKD_PYTHON`, else `python3`): the
//! seed-by-seed comparison of an f32 and a bf16 ablation that `tools/gpu-quality-check`
//! prints. Its verdict (exit 0 within the bound, 1 beyond it, 2 when the files cannot be
//! compared) and the numbers it prints, on hand-made `results.json` files.

use std::path::Path;
use std::process::Command;

fn python() -> String {
    std::env::var("MGKD_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// A `results.json` with the given (variant, seed, test AUC) runs in `precision` on `data`.
fn results(
    dir: &Path,
    name: &str,
    data: &str,
    precision: &str,
    runs: &[(&str, u32, f64)],
) -> String {
    let runs: Vec<String> = runs
        .iter()
        .map(|(v, s, auc)| {
            format!(
                r#"{{"variant": "{v}", "seed": {s}, "test_auc": {auc}, "config": {{"precision": "{precision}"}}}}"#
            )
        })
        .collect();
    let path = dir.join(name);
    std::fs::write(
        &path,
        format!(r#"{{"data": "{data}", "runs": [{}]}}"#, runs.join(", ")),
    )
    .expect("write");
    path.to_string_lossy().into_owned()
}

/// Runs the script: (exit code, standard output).
fn compare(a: &str, b: &str, extra: &[&str]) -> (i32, String) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/precision_compare.py");
    let out = Command::new(python())
        .arg(script)
        .args([a, b])
        .args(extra)
        .output()
        .expect("python runs");
    (
        out.status.code().expect("an exit code"),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn within_beyond_and_incomparable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let f32_runs = [
        ("teacher", 0, 0.88),
        ("plain", 0, 0.6465),
        ("full", 0, 0.6544),
        ("plain", 1, 0.6470),
        ("full", 1, 0.6550),
    ];
    let a = results(dir.path(), "a.json", "syn", "f32", &f32_runs);
    // bf16: every run within 0.003 (the largest 0.0021).
    let close = [
        ("teacher", 0, 0.8821),
        ("plain", 0, 0.6460),
        ("full", 0, 0.6540),
        ("plain", 1, 0.6475),
        ("full", 1, 0.6529),
    ];
    let b = results(dir.path(), "b.json", "syn", "bf16", &close);
    let (code, out) = compare(&a, &b, &[]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("precision f32") && out.contains("precision bf16"),
        "{out}"
    );
    assert!(
        out.contains("largest |difference| 0.0021: within 0.003"),
        "{out}"
    );
    // The paired gain over plain in each precision: (0.0079 + 0.0080)/2 and (0.0080 + 0.0054)/2.
    assert!(out.contains("+0.0080 / +0.0067"), "{out}");

    // One run 0.0031 away: beyond the bound, and marked.
    let mut far = close;
    far[2].2 = 0.6544 + 0.0031;
    let c = results(dir.path(), "c.json", "syn", "bf16", &far);
    let (code, out) = compare(&a, &c, &[]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("+0.0031  > max"), "{out}");
    // A looser bound accepts it.
    assert_eq!(compare(&a, &c, &["--max-diff", "0.004"]).0, 0);

    // Other data, or nothing in common: not comparable.
    let d = results(dir.path(), "d.json", "other", "bf16", &close);
    let (code, out) = compare(&a, &d, &[]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("different datasets"), "{out}");
    let e = results(dir.path(), "e.json", "syn", "bf16", &[("plain", 7, 0.6)]);
    let (code, out) = compare(&a, &e, &[]);
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("no (variant, seed) trained in both runs"),
        "{out}"
    );
    let (code, _) = compare(&a, &dir.path().join("missing.json").to_string_lossy(), &[]);
    assert_eq!(code, 2);

    // Malformed files: an error naming the file and the run, never a traceback.
    for (name, text, says) in [
        (
            "f.json",
            "{\"data\": \"syn\", \"runs\": [1]}",
            "runs[0]: not an object",
        ),
        (
            "g.json",
            r#"{"data": "syn", "runs": [{"variant": "plain", "seed": "0", "test_auc": 0.6}]}"#,
            "runs[0]: `variant`",
        ),
        (
            "h.json",
            r#"{"data": "syn", "runs": [{"variant": "plain", "seed": 0, "test_auc": "x"}]}"#,
            "`test_auc` is not a number",
        ),
        (
            "i.json",
            r#"{"data": "syn", "runs": [{"variant": "plain", "seed": 0, "test_auc": 0.6465, "config": 3}]}"#,
            "",
        ),
        ("j.json", "[1, 2]", "no `runs` list"),
        ("k.json", "{not json", "error"),
    ] {
        let path = dir.path().join(name);
        std::fs::write(&path, text).expect("write");
        let (code, out) = compare(&a, &path.to_string_lossy(), &[]);
        if says.is_empty() {
            // A `config` that is not an object: the run still counts, its precision unknown.
            assert_eq!(code, 0, "{name}: {out}");
        } else {
            assert_eq!(code, 2, "{name}: {out}");
            assert!(out.contains(says) && out.contains(name), "{name}: {out}");
        }
    }
}
