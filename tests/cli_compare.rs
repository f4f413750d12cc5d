//! `mgkd-train compare`: two score files joined to a split's rows by their key, compared by
//! DeLong's paired test (`metrics::paired_auc`, tested in `tests/metrics.rs`), and every
//! malformed file refused with its name and line.

mod cli_run;

use std::fmt::Write as _;
use std::path::Path;

use cli_run::{bin, ok, synth};
use mgkd::data::Dataset;
use mgkd::metrics::paired_auc;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Writes a score CSV (`row,probability,logit`) of `rows` in the given order.
fn write_scores(path: &Path, rows: &[(u64, f64)]) {
    let mut s = String::from("row,probability,logit\n");
    for &(r, z) in rows {
        writeln!(s, "{r},{},{z}", 1.0 / (1.0 + (-z).exp())).unwrap();
    }
    std::fs::write(path, s).unwrap();
}

fn stderr_of(args: &[&str]) -> String {
    let out = bin(args);
    assert!(!out.status.success(), "mgkd-train {args:?} succeeded");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn compare_joins_rows_by_key_and_reports_delong() {
    let tmp = tempfile::tempdir().unwrap();
    let data = synth(tmp.path(), "3000", "8", "4");
    let ds = Dataset::open(&data).unwrap();
    let n = ds.rows();
    let test = ds.rows_of_split(2);
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    // A follows the label, B less so; both score every row, in different orders.
    let label = |r: u64| f64::from(ds.label(r).unwrap().unwrap());
    let a: Vec<(u64, f64)> = (0..n)
        .map(|r| (r, 2.0 * label(r) + rng.gen_range(-1.0..1.0)))
        .collect();
    let mut b: Vec<(u64, f64)> = (0..n)
        .map(|r| (r, 0.3 * label(r) + rng.gen_range(-1.0..1.0)))
        .collect();
    b.reverse();
    let (fa, fb) = (tmp.path().join("a.csv"), tmp.path().join("b.csv"));
    write_scores(&fa, &a);
    write_scores(&fb, &b);
    let args = |x: &Path, y: &Path, json: bool| {
        let mut v = vec![
            "compare".to_string(),
            "--data".into(),
            data.to_str().unwrap().into(),
            x.to_str().unwrap().into(),
            y.to_str().unwrap().into(),
        ];
        if json {
            v.push("--json".into());
        }
        v
    };
    let run = |v: &[String]| {
        let v: Vec<&str> = v.iter().map(String::as_str).collect();
        ok(&v)
    };
    let j: serde_json::Value = serde_json::from_slice(&run(&args(&fa, &fb, true)).stdout).unwrap();
    // The same numbers from the library on the test rows, in the split's order.
    let labels: Vec<u8> = test
        .iter()
        .map(|&r| ds.label(r).unwrap().unwrap())
        .collect();
    let za: Vec<f64> = test.iter().map(|&r| a[r as usize].1).collect();
    let zb: Vec<f64> = test
        .iter()
        .map(|&r| b.iter().find(|x| x.0 == r).unwrap().1)
        .collect();
    let want = paired_auc(&za, &zb, &labels).unwrap();
    assert_eq!(j["split"], "test");
    assert_eq!(j["n"].as_u64().unwrap(), test.len() as u64);
    // The written logits are decimal: agreement to their rounding.
    for (key, w) in [
        ("auc_a", want.auc_a),
        ("auc_b", want.auc_b),
        ("se", want.se),
        ("p", want.p),
    ] {
        assert!((j[key].as_f64().unwrap() - w).abs() < 1e-9, "{key}: {j}");
    }
    assert!(want.diff > 0.1 && want.p < 1e-3, "{want:?}");
    let text = String::from_utf8_lossy(&run(&args(&fa, &fb, false)).stdout).into_owned();
    assert!(text.contains(&format!("{} rows", test.len())), "{text}");
    assert!(text.contains(&format!("AUC {:.4}", want.auc_a)), "{text}");
    assert!(text.contains("(DeLong, paired)"), "{text}");

    // Refusals, each naming the file and the line or the row.
    let bad = tmp.path().join("bad.csv");
    let refuse = |rows: &[(u64, f64)], raw: Option<&str>, needle: &str| {
        match raw {
            Some(r) => std::fs::write(&bad, r).unwrap(),
            None => write_scores(&bad, rows),
        }
        let v = args(&fa, &bad, false);
        let err = stderr_of(&v.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(
            err.contains("bad.csv") && err.contains(needle),
            "{needle}: {err}"
        );
    };
    let missing: Vec<(u64, f64)> = a.iter().copied().filter(|x| x.0 != test[3]).collect();
    refuse(&missing, None, &format!("e.g. row {}", test[3]));
    let mut twice = a.clone();
    twice.push(a[test[0] as usize]);
    refuse(&twice, None, &format!("row {} again", test[0]));
    let mut foreign = a.clone();
    foreign.push((n + 7, 0.5));
    refuse(&foreign, None, "is not a row of");
    refuse(
        &[],
        Some("row,probability,logit\n0,0.5,NaN\n"),
        "line 2: logit `NaN`",
    );
    refuse(&[], Some("row,probability\n0,0.5\n"), "no `logit` column");
    refuse(&[], Some("user_id,logit\nu1,0.5\n"), "no `row` column");
}
