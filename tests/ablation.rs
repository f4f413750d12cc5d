//! `mgkd-train ablation` end to end on a tiny synthetic cohort: the files, the 8 runs per
//! seed, the report's paired differences recomputed from results.json, determinism, and the
//! kept checkpoints read back by `eval`.

mod cli_run;

use std::path::Path;
use std::process::Output;

use cli_run::{bin, ok};

use serde_json::Value;

const NAMES: [&str; 8] = [
    "teacher",
    "plain",
    "soft",
    "coarse",
    "fine",
    "self",
    "full",
    "full-no-reweight",
];

const LABELS: [&str; 8] = [
    "teacher (in-service)",
    "plain (hard, re-weighted)",
    "+ soft",
    "+ coarse",
    "+ fine",
    "+ self",
    "full MGKD",
    "full, no re-weighting",
];

/// `ablation` with the tests' small model (d 8, 2 blocks, 2 epochs, batch 64) and `extra`;
/// it must succeed.
fn ablation(data: &Path, out: &Path, seeds: &str, extra: &[&str]) -> Output {
    let mut args = vec![
        "--epochs", "2", "--d", "8", "--heads", "2", "--blocks", "2", "--d-cat", "4", "--batch",
        "64",
    ];
    args.extend_from_slice(extra);
    ok(&ablation_args(data, out, seeds, &args))
}

/// `ablation` on the CPU with `extra` and no model flags (the settings come from the config
/// files `extra` names), quiet, without checkpoints.
fn bare_ablation(data: &Path, out: &Path, seeds: &str, extra: &[&str]) -> Output {
    let mut args = vec!["--no-checkpoints"];
    args.extend_from_slice(extra);
    bin(&ablation_args(data, out, seeds, &args))
}

/// The arguments of `ablation` on the CPU, quiet, over `data` into `out` with `seeds`, then
/// `extra`.
fn ablation_args<'a>(
    data: &'a Path,
    out: &'a Path,
    seeds: &'a str,
    extra: &[&'a str],
) -> Vec<&'a str> {
    let mut args = vec![
        "ablation",
        "--data",
        data.to_str().expect("utf-8 path"),
        "--out",
        out.to_str().expect("utf-8 path"),
        "--seeds",
        seeds,
        "--device",
        "cpu",
        "--quiet",
    ];
    args.extend_from_slice(extra);
    args
}

fn mean_std(xs: &[f64]) -> (f64, f64) {
    let n = xs.len() as f64;
    let m = xs.iter().sum::<f64>() / n;
    let v = xs.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n - 1.0);
    (m, v.sqrt())
}

fn runs(dir: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(dir.join("results.json")).expect("results.json");
    let v: Value = serde_json::from_str(&text).expect("results.json parses");
    v["runs"].as_array().expect("runs array").clone()
}

fn metric(runs: &[Value], variant: &str, seed: u64, key: &str) -> f64 {
    runs.iter()
        .find(|r| r["variant"] == variant && r["seed"] == seed)
        .unwrap_or_else(|| panic!("no run {variant} seed {seed}"))[key]
        .as_f64()
        .expect("number")
}

#[test]
fn ablation_report_is_paired_complete_and_deterministic() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = cli_run::synth(tmp.path(), "1200", "16", "8");
    let rep = tmp.path().join("rep");
    let out = ablation(&data, &rep, "2", &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stdout.contains("full MGKD"),
        "summary table on stdout: {stdout}"
    );
    assert_eq!(
        stderr
            .lines()
            .filter(|l| l.starts_with("ablation: seed"))
            .count(),
        16,
        "one progress line per run: {stderr}"
    );
    for f in [
        "results.json",
        "report.md",
        "roc.svg",
        "ks.svg",
        "training.svg",
    ] {
        assert!(rep.join(f).is_file(), "{f} missing");
    }
    for f in ["roc.svg", "ks.svg", "training.svg"] {
        let svg = std::fs::read_to_string(rep.join(f)).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("<polyline"), "{f}");
    }
    let runs = runs(&rep);
    assert_eq!(runs.len(), 16);
    for seed in [0u64, 1] {
        let mut names: Vec<&str> = runs
            .iter()
            .filter(|r| r["seed"] == seed)
            .map(|r| r["variant"].as_str().unwrap())
            .collect();
        names.sort_unstable();
        let mut want = NAMES.to_vec();
        want.sort_unstable();
        assert_eq!(names, want, "seed {seed}");
        for name in NAMES {
            let ck = rep.join(format!("checkpoints/seed{seed}-{name}.safetensors"));
            assert!(ck.is_file(), "{} missing", ck.display());
        }
    }
    for r in &runs {
        for k in ["test_auc", "test_ks", "test_log_loss", "test_pr_auc"] {
            let x = r[k].as_f64().expect(k);
            assert!(x.is_finite() && x >= 0.0, "{k} = {x}");
        }
        assert!(r["best_epoch"].as_u64().unwrap() >= 1);
        assert_eq!(r["epochs_run"].as_u64().unwrap(), 2);
        assert_eq!(r["valid_auc"].as_array().unwrap().len(), 2);
        assert!(r["config"]["loss"]["alpha"].is_number());
    }
    // The variants really differ from one another (the switches reach the trainer).
    assert_ne!(
        metric(&runs, "plain", 0, "test_log_loss"),
        metric(&runs, "full", 0, "test_log_loss")
    );

    // The report's rows equal the statistics recomputed here from results.json (the
    // validation columns: the validation AUC of each run's best epoch).
    let report = std::fs::read_to_string(rep.join("report.md")).unwrap();
    assert!(report.contains("mgkd-train") && report.contains("ablation --data"));
    let value = |name: &str, seed: u64, key: &str| {
        if key != "best_valid" {
            return metric(&runs, name, seed, key);
        }
        let r = runs
            .iter()
            .find(|r| r["variant"] == name && r["seed"] == seed)
            .expect("run");
        r["valid_auc"][r["best_epoch"].as_u64().unwrap() as usize - 1]
            .as_f64()
            .unwrap()
    };
    for (name, label) in NAMES.iter().zip(LABELS) {
        let line = report
            .lines()
            .find(|l| l.starts_with(&format!("| {label} |")))
            .unwrap_or_else(|| panic!("no report row for {label}:\n{report}"));
        for key in ["test_auc", "test_ks", "best_valid"] {
            let xs: Vec<f64> = [0u64, 1].iter().map(|&s| value(name, s, key)).collect();
            let (m, s) = mean_std(&xs);
            let cell = format!("{m:.4} ± {s:.4}");
            assert!(line.contains(&cell), "{label} {key}: want {cell} in {line}");
            if *name == "teacher" || *name == "plain" {
                continue;
            }
            let d: Vec<f64> = [0u64, 1]
                .iter()
                .map(|&s| value(name, s, key) - value("plain", s, key))
                .collect();
            let (dm, ds) = mean_std(&d);
            let k = d.iter().filter(|&&x| x > 0.0).count();
            let cell = format!("{dm:+.4} ± {ds:.4} ({k}/2)");
            assert!(
                line.contains(&cell),
                "{label} Δ{key}: want {cell} in {line}"
            );
        }
    }

    // Each student's DeLong comparison with the plain student of its seed: its difference is
    // the two recorded test AUCs', and the report's last column counts the seeds above and
    // below plain at p < 0.05.
    for (name, label) in NAMES.iter().zip(LABELS) {
        let mut counts = [0usize; 2];
        for seed in [0u64, 1] {
            let run = runs
                .iter()
                .find(|r| r["variant"] == *name && r["seed"] == seed)
                .expect("run");
            let c = &run["vs_plain"];
            if *name == "teacher" || *name == "plain" {
                assert!(c.is_null(), "{run}");
                continue;
            }
            let (diff, se, p) = (
                c["diff"].as_f64().expect("diff"),
                c["se"].as_f64().expect("se"),
                c["p"].as_f64().expect("p"),
            );
            let want =
                metric(&runs, name, seed, "test_auc") - metric(&runs, "plain", seed, "test_auc");
            assert!(
                (diff - want).abs() < 1e-12,
                "{name} seed {seed}: {diff} vs {want}"
            );
            assert!(
                se.is_finite() && se >= 0.0 && (0.0..=1.0).contains(&p),
                "{c}"
            );
            if p < 0.05 {
                counts[usize::from(diff < 0.0)] += 1;
            }
        }
        if *name == "teacher" || *name == "plain" {
            continue;
        }
        let line = report
            .lines()
            .find(|l| l.starts_with(&format!("| {label} |")))
            .expect("row");
        let cell = format!("| {} / {} |", counts[0], counts[1]);
        assert!(line.contains(&cell), "{label}: want {cell} in {line}");
    }

    // Same seed, same results (only the timings may differ), also when only some variants
    // run: a variant's run does not depend on which others are trained.
    let rep2 = tmp.path().join("rep2");
    ablation(
        &data,
        &rep2,
        "1",
        &["--no-checkpoints", "--json", "--variants", "full,plain"],
    );
    assert!(!rep2.join("checkpoints").exists());
    let again = self::runs(&rep2);
    let names: Vec<&str> = again
        .iter()
        .map(|r| r["variant"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["teacher", "plain", "full"],
        "table order, chosen variants"
    );
    for r in &again {
        let first = runs
            .iter()
            .find(|x| x["variant"] == r["variant"] && x["seed"] == 0)
            .unwrap();
        let strip = |v: &Value| {
            let mut v = v.clone();
            v.as_object_mut().unwrap().remove("seconds");
            v.as_object_mut().unwrap().remove("samples_per_s");
            v
        };
        assert_eq!(strip(first), strip(r), "{}", r["variant"]);
    }

    // A kept checkpoint is a regular one: `eval` reproduces the recorded test AUC.
    let ck = rep.join("checkpoints/seed1-full.safetensors");
    let out = ok(&[
        "eval",
        "--data",
        data.to_str().unwrap(),
        "--model",
        ck.to_str().unwrap(),
        "--json",
        "--device",
        "cpu",
    ]);
    let ev: Value = serde_json::from_slice(&out.stdout).expect("eval --json");
    let auc = ev["auc"].as_f64().unwrap();
    assert!((auc - metric(&runs, "full", 1, "test_auc")).abs() < 1e-12);
}

#[test]
fn ablation_refuses_zero_seeds_and_missing_data() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = bin(&[
        "ablation",
        "--data",
        tmp.path().join("none").to_str().unwrap(),
        "--out",
        tmp.path().join("rep").to_str().unwrap(),
        "--seeds",
        "0",
        "--device",
        "cpu",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--seeds 0 is out of range"));
    let out = bin(&[
        "ablation",
        "--data",
        tmp.path().join("none").to_str().unwrap(),
        "--out",
        tmp.path().join("rep").to_str().unwrap(),
        "--device",
        "cpu",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("none") && !err.contains("panicked"), "{err}");
}

/// `--variants full` trains plain too (the baseline, as --help says), the per-run progress
/// lines give samples/s, and an unknown variant is refused.
#[test]
fn ablation_adds_plain_and_refuses_unknown_variants() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = cli_run::synth(tmp.path(), "300", "8", "4");
    let rep = tmp.path().join("rep-full");
    let out = ablation(
        &data,
        &rep,
        "1",
        &["--no-checkpoints", "--variants", "full"],
    );
    let names: Vec<String> = runs(&rep)
        .iter()
        .map(|r| r["variant"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["teacher", "plain", "full"]);
    assert!(runs(&rep)
        .iter()
        .all(|r| r["samples_per_s"].as_f64().unwrap() > 0.0));
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("ablation:")).collect();
    assert_eq!(lines.len(), 3, "{err}");
    assert!(lines.iter().all(|l| l.contains(" samples/s")), "{err}");
    // The full student's line ends with its DeLong comparison with plain; the others do not.
    for l in &lines {
        assert_eq!(
            l.contains("full"),
            l.contains("− plain") && l.ends_with(')'),
            "{l}"
        );
    }
    let out = bin(&[
        "ablation",
        "--data",
        data.to_str().unwrap(),
        "--out",
        tmp.path().join("rep").to_str().unwrap(),
        "--variants",
        "plain,fulll",
        "--device",
        "cpu",
    ]);
    assert!(!out.status.success(), "--variants plain,fulll accepted");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("unknown variant 'fulll'") && !err.contains("panicked"),
        "{err}"
    );
}

#[test]
fn shipped_ablation_configs_parse() {
    for (name, d) in [("synthetic", 16), ("taiwan", 32)] {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("tools/configs/{name}.toml"));
        let cfg = mgkd::cli::train::FileConfig::load(&p).expect("config parses");
        assert_eq!(cfg.model.d, Some(d), "{name}");
        assert!(
            cfg.loss.alpha.is_some() && cfg.train.epochs.is_some(),
            "{name}"
        );
    }
}

/// A `tools/gbm.py` result file (written here by hand, in the script's format) is shown
/// beside the students in report.md, results.json and the printed table; a file of another
/// dataset, one that does not parse and one with a metric out of range are refused by name
/// before any training.
#[test]
fn ablation_shows_a_gbm_row_and_refuses_a_foreign_one() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = cli_run::synth(tmp.path(), "300", "8", "4");
    let manifest = std::fs::read(data.join("dataset.json")).expect("manifest");
    let sha = {
        use sha2::Digest;
        let d = sha2::Sha256::digest(&manifest);
        d.iter().map(|b| format!("{b:02x}")).collect::<String>()
    };
    let m: Value = serde_json::from_slice(&manifest).expect("manifest JSON");
    let rows = |s: usize| m["splits"][s]["rows"].as_u64().expect("rows");
    let gbm_file_of = |name: &str, sha: &str, auc: f64, inputs: &str| {
        let path = tmp.path().join(name);
        let v = serde_json::json!({
            "format": "mgkd-gbm", "version": 1, "inputs": inputs, "dataset_sha256": sha,
            "data": "x", "features": 42,
            "rows": {"train": rows(0), "valid": rows(1), "test": rows(2)}, "seconds": 1.0,
            "runs": [
                {"seed": 0, "trees": 10, "valid_auc": 0.6, "valid_ks": 0.2, "test_auc": auc, "test_ks": 0.25},
                {"seed": 1, "trees": 12, "valid_auc": 0.62, "valid_ks": 0.2, "test_auc": 0.5, "test_ks": 0.15}
            ]
        });
        std::fs::write(&path, v.to_string()).expect("write");
        path
    };
    let gbm_file = |name: &str, sha: &str, auc: f64| gbm_file_of(name, sha, auc, "student");
    let good = gbm_file("gbm.json", &sha, 0.7);
    let in_service = gbm_file_of("gbm-in.json", &sha, 0.9, "in-service");
    let rep = tmp.path().join("rep");
    let out = ablation(
        &data,
        &rep,
        "1",
        &[
            "--no-checkpoints",
            "--variants",
            "full",
            "--gbm",
            good.to_str().unwrap(),
            "--gbm",
            in_service.to_str().unwrap(),
        ],
    );
    let report = std::fs::read_to_string(rep.join("report.md")).expect("report");
    let row = report
        .lines()
        .find(|l| l.starts_with("| LightGBM (student's inputs) |"))
        .unwrap_or_else(|| panic!("no GBM row in\n{report}"));
    assert!(
        row.contains("| 2 | 42 | 0.6000 ± 0.1414 | 0.2000 ± 0.0707 | 0.6100 ± 0.0141 |"),
        "{row}"
    );
    // Students against the trees on their inputs, on test and at their best epoch on
    // validation (the trees' test AUC: mean of 0.7 and 0.5; valid: of 0.6 and 0.62).
    let all = runs(&rep);
    let best_valid = |variant: &str| {
        let r = all.iter().find(|r| r["variant"] == variant).expect("run");
        r["valid_auc"][r["best_epoch"].as_u64().unwrap() as usize - 1]
            .as_f64()
            .unwrap()
    };
    let test_cell = format!(
        "| full {:+.4}, plain {:+.4} |",
        metric(&all, "full", 0, "test_auc") - 0.6,
        metric(&all, "plain", 0, "test_auc") - 0.6
    );
    let valid_cell = format!(
        "| full {:+.4}, plain {:+.4} |",
        best_valid("full") - 0.61,
        best_valid("plain") - 0.61
    );
    assert!(
        row.contains(&test_cell) && row.ends_with(&valid_cell),
        "{row}"
    );
    // The teacher against the trees on in-service inputs.
    let row = report
        .lines()
        .find(|l| l.starts_with("| LightGBM (in-service inputs) |"))
        .unwrap_or_else(|| panic!("no in-service GBM row in\n{report}"));
    let cells = format!(
        "| teacher {:+.4} | teacher {:+.4} |",
        metric(&all, "teacher", 0, "test_auc") - 0.7,
        best_valid("teacher") - 0.61
    );
    assert!(row.ends_with(&cells), "{row}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("LightGBM (student's inputs)"), "{stdout}");
    let results: Value =
        serde_json::from_str(&std::fs::read_to_string(rep.join("results.json")).expect("r"))
            .expect("results.json");
    assert_eq!(results["gbm"][0]["runs"][0]["test_auc"], 0.7);

    let refused = |file: &Path, want: &str| {
        let out = bin(&[
            "ablation",
            "--data",
            data.to_str().unwrap(),
            "--out",
            tmp.path().join("rep2").to_str().unwrap(),
            "--device",
            "cpu",
            "--gbm",
            file.to_str().unwrap(),
        ]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{} accepted", file.display());
        assert!(
            err.contains(&file.display().to_string())
                && err.contains(want)
                && !err.contains("panicked")
                && !err.contains("epoch"),
            "{err}"
        );
        assert!(!tmp.path().join("rep2").join("results.json").exists());
    };
    refused(
        &gbm_file("other.json", &"0".repeat(64), 0.7),
        "made on another dataset",
    );
    refused(&gbm_file("range.json", &sha, 1.5), "outside [0, 1]");
    let junk = tmp.path().join("junk.json");
    std::fs::write(&junk, "{\"format\": \"mgkd-gbm\"").expect("write");
    refused(&junk, "not a tools/gbm.py result file");
}

/// A config file's `[teacher]` section reaches the teachers alone: results.json records the
/// teachers' settings apart from the students', and report.md states both.
#[test]
fn the_teacher_section_trains_the_teachers_and_the_report_says_so() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = cli_run::synth(tmp.path(), "600", "16", "8");
    let cfg = tmp.path().join("c.toml");
    std::fs::write(
        &cfg,
        "[train]\nlr = 2e-3\n[loss]\nrho = 0.25\n[teacher]\nlr = 4e-3\nrho = 0.75\n",
    )
    .expect("write");
    let rep = tmp.path().join("rep");
    let extra = ["--variants", "full", "--config", cfg.to_str().unwrap()];
    ablation(&data, &rep, "1", &extra);
    for r in runs(&rep) {
        let (lr, rho) = match r["variant"].as_str() {
            Some("teacher") => (4e-3, 0.75),
            _ => (2e-3, 0.25),
        };
        assert_eq!(r["config"]["train"]["lr"].as_f64(), Some(lr), "{r}");
        assert_eq!(r["config"]["loss"]["rho"].as_f64(), Some(rho), "{r}");
        assert_eq!(r["config"]["train"]["epochs"].as_u64(), Some(2), "{r}");
    }
    let report = std::fs::read_to_string(rep.join("report.md")).expect("report");
    let line = |start: &str| line_starting(&report, start);
    let t = line("- teachers: train");
    assert!(t.contains("\"lr\":0.004") && t.contains("ρ 0.75"), "{t}");
    let s = line("- students: train");
    assert!(
        s.contains("\"lr\":0.002") && s.contains("\"rho\":0.25"),
        "{s}"
    );
    assert!(s.contains("the full student's"), "{s}");
}

/// The first line of `report` that starts with `start` (the test fails without one).
fn line_starting(report: &str, start: &str) -> String {
    report
        .lines()
        .find(|l| l.starts_with(start))
        .unwrap_or_else(|| panic!("no line {start:?} in\n{report}"))
        .to_string()
}

/// `--plain-config` trains the plain student with its own file's settings (here another
/// width, depth, schedule and ρ than the teacher's): its runs are those of an ablation of that
/// file alone, the teachers and full students those of an ablation without the flag, every
/// number to the last bit; the paired differences are against it, and the report says where
/// its settings came from.
#[test]
fn a_plain_config_gives_the_plain_student_its_own_settings() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = cli_run::synth(tmp.path(), "600", "16", "8");
    let full_cfg = tmp.path().join("full.toml");
    let plain_cfg = tmp.path().join("plain.toml");
    std::fs::write(
        &full_cfg,
        "[model]\nd = 8\nheads = 2\nblocks = 2\nd_cat = 4\n[train]\nepochs = 2\nbatch = 64\n\
         lr = 2e-3\n[loss]\nrho = 0.25\n",
    )
    .expect("write");
    std::fs::write(
        &plain_cfg,
        "[model]\nd = 12\nheads = 2\nblocks = 1\nd_cat = 4\n[train]\nepochs = 3\nbatch = 64\n\
         lr = 1e-3\n[loss]\nrho = 0.75\n",
    )
    .expect("write");
    let run = |out: &Path, extra: &[&str]| {
        let o = bare_ablation(&data, out, "2", extra);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        runs(out)
    };
    let (f, p) = (full_cfg.to_str().unwrap(), plain_cfg.to_str().unwrap());
    let both = tmp.path().join("both");
    let paired = run(
        &both,
        &["--config", f, "--plain-config", p, "--variants", "full"],
    );
    let alone = run(
        &tmp.path().join("plain"),
        &["--config", p, "--variants", "plain"],
    );
    let without = run(
        &tmp.path().join("full"),
        &["--config", f, "--variants", "full"],
    );
    // Every run but its wall time and throughput.
    let same = |a: &Value, b: &Value| {
        for key in [
            "test_auc",
            "test_ks",
            "test_log_loss",
            "valid_auc",
            "best_epoch",
            "config",
        ] {
            assert!(!a[key].is_null(), "{key} missing in {a}");
            assert_eq!(a[key], b[key], "{key}: {a} against {b}");
        }
    };
    for seed in 0..2u64 {
        let find = |runs: &[Value], variant: &str| {
            runs.iter()
                .find(|r| r["variant"] == variant && r["seed"] == seed)
                .unwrap_or_else(|| panic!("no {variant} seed {seed}"))
                .clone()
        };
        let plain = find(&paired, "plain");
        same(&plain, &find(&alone, "plain"));
        assert_eq!(plain["config"]["model"]["d"], 12);
        assert_eq!(plain["config"]["loss"]["rho"], 0.75);
        for variant in ["teacher", "full"] {
            same(&find(&paired, variant), &find(&without, variant));
        }
        assert_eq!(find(&paired, "teacher")["config"]["model"]["d"], 8);
    }
    let text = std::fs::read_to_string(both.join("results.json")).expect("results.json");
    let file: Value = serde_json::from_str(&text).expect("parses");
    assert_eq!(file["plain_config"], p);
    let summary = file["summary"].as_array().expect("summary");
    let full = summary
        .iter()
        .find(|v| v["variant"] == "full")
        .expect("full row");
    let diffs: Vec<f64> = (0..2)
        .map(|s| metric(&paired, "full", s, "test_auc") - metric(&paired, "plain", s, "test_auc"))
        .collect();
    let (m, _) = mean_std(&diffs);
    let got = full["auc"]["diff_mean"].as_f64().expect("diff_mean");
    assert!((got - m).abs() < 1e-12, "{got} against {m}");
    let report = std::fs::read_to_string(both.join("report.md")).expect("report");
    let line = line_starting(&report, "- the plain student, from");
    assert!(
        line.contains(p) && line.contains("\"d\":12") && line.contains("ρ 0.75"),
        "{line}"
    );
    assert!(report.contains("trained with its own settings"), "{report}");
}

/// A `--plain-config` that cannot be read (named by its path), or whose file asks for a width
/// out of range (named by the key and the flag), is refused before any training.
#[test]
fn a_bad_plain_config_is_refused_by_name() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = cli_run::synth(tmp.path(), "300", "16", "8");
    let bad = tmp.path().join("bad.toml");
    std::fs::write(&bad, "[model]\nd = 0\n").expect("write");
    let missing = tmp.path().join("missing.toml");
    let cases = [
        (
            &bad,
            "`[model] d` = 0 is out of range: it must be 1 to 4096 (in the --plain-config file)",
        ),
        (&missing, "missing.toml"),
    ];
    for (file, why) in cases {
        let out_dir = tmp.path().join("rep");
        let out = bare_ablation(
            &data,
            &out_dir,
            "1",
            &["--plain-config", file.to_str().unwrap()],
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{} accepted", file.display());
        assert!(err.contains(why), "{err}");
        assert!(!err.contains("panicked"), "{err}");
        assert!(!out_dir.exists(), "{err}");
    }
}
