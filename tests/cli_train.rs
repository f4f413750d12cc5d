//! `mgkd-train teacher | student | eval | predict` end to end through the binary: training
//! on a planted signal, eval --json against `metrics::auc` on predict's scores, scoring
//! unlabelled data without in-service events, refusals of mismatched checkpoints and
//! datasets, config files, and bit-identical checkpoints for 1 and 2 threads.

mod train_common;

use std::path::Path;
use std::process::{Command, Output};

use mgkd::data::Dataset;
use mgkd::metrics;
use train_common::Spec;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_mgkd-train"))
}

fn run(args: &[&str]) -> Output {
    bin().args(args).output().expect("run mgkd-train")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn ok(args: &[&str]) -> String {
    let o = run(args);
    assert!(o.status.success(), "{args:?} failed:\n{}", text(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Runs a command that must be refused: non-zero exit, an `error:` line containing every
/// one of `needles`, no panic.
fn refused(args: &[&str], needles: &[&str]) {
    let o = run(args);
    let t = text(&o);
    assert!(!o.status.success(), "{args:?} should fail:\n{t}");
    assert!(!t.contains("panicked"), "{args:?} panicked:\n{t}");
    assert!(t.contains("error:"), "{args:?}: no error line:\n{t}");
    for n in needles {
        assert!(t.contains(n), "{args:?}: message lacks {n:?}:\n{t}");
    }
}

const TINY: [&str; 12] = [
    "--d", "8", "--heads", "2", "--blocks", "2", "--d-cat", "4", "--batch", "32", "--lr", "5e-3",
];

fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

fn teacher(data: &Path, out: &Path, extra: &[&str]) -> String {
    let mut a = vec![
        "teacher",
        "--data",
        p(data),
        "--out",
        p(out),
        "--epochs",
        "4",
    ];
    a.extend(TINY);
    a.extend(extra);
    ok(&a)
}

/// Parses `predict`'s CSV into (first column, probability, logit).
fn read_scores(path: &Path) -> (Vec<String>, Vec<f64>, Vec<f64>) {
    let mut r = csv::Reader::from_path(path).expect("csv");
    let header: Vec<String> = r
        .headers()
        .expect("header")
        .iter()
        .map(String::from)
        .collect();
    assert_eq!(header[1..], ["probability", "logit"]);
    let (mut ids, mut ps, mut zs) = (Vec::new(), Vec::new(), Vec::new());
    for rec in r.records() {
        let rec = rec.expect("record");
        ids.push(rec[0].to_string());
        ps.push(rec[1].parse::<f64>().expect("probability"));
        zs.push(rec[2].parse::<f64>().expect("logit"));
    }
    (ids, ps, zs)
}

#[test]
fn teacher_student_eval_predict_end_to_end() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    train_common::write(&data, Spec::labelled(800, 21));
    let t = tmp.path().join("teacher.safetensors");
    let s = tmp.path().join("student.safetensors");
    let out = teacher(&data, &t, &[]);
    assert!(out.contains("best epoch"), "{out}");
    // One JSONL line per epoch next to the checkpoint.
    let log =
        std::fs::read_to_string(tmp.path().join("teacher.safetensors.log.jsonl")).expect("log");
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    assert_eq!(lines.len(), 4);
    assert_eq!(lines[3]["epoch"], 4);
    assert!(lines[0]["samples_per_s"].as_f64().is_some_and(|v| v > 0.0));

    let mut a = vec![
        "student",
        "--data",
        p(&data),
        "--teacher",
        p(&t),
        "--out",
        p(&s),
        "--epochs",
        "4",
        "--no-coarse",
        "--alpha",
        "0.5",
    ];
    a.extend(&TINY[8..]);
    ok(&a);
    let leftovers: Vec<String> = std::fs::read_dir(tmp.path())
        .expect("dir")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // The full configuration is in the checkpoint: widths inherited from the teacher, the
    // loss switches and coefficients, the teacher's hash.
    let ck = mgkd::model::checkpoint::read(&s).expect("student checkpoint");
    assert_eq!((ck.config.d, ck.config.heads, ck.config.d_cat), (8, 2, 4));
    let rec = mgkd::train::TrainingRecord::from_metadata(&s, &ck.metadata)
        .expect("record")
        .expect("present");
    assert!(!rec.loss.coarse && rec.loss.soft && rec.loss.fine);
    assert_eq!(rec.loss.alpha, 0.5);
    let sha = mgkd::data::writer::sha256_hex(&std::fs::read(&t).expect("teacher"));
    assert_eq!(rec.teacher_sha256.as_deref(), Some(sha.as_str()));
    assert!(ck.metadata.contains_key(mgkd::train::KEY_BEST));

    // eval --json agrees with metrics::auc on predict's scores, for both models.
    let ds = Dataset::open(&data).expect("open");
    for (model, floor) in [(&t, 0.85), (&s, 0.65)] {
        let j: serde_json::Value = serde_json::from_str(&ok(&[
            "eval",
            "--data",
            p(&data),
            "--model",
            p(model),
            "--json",
        ]))
        .expect("eval JSON");
        let auc = j["auc"].as_f64().expect("auc");
        assert!(auc > floor, "{}: test AUC {auc}", model.display());
        assert_eq!(j["split"], "test");
        assert_eq!(j["deciles"].as_array().map(Vec::len), Some(10));
        assert_eq!(j["approval"].as_array().map(Vec::len), Some(9));
        let scores = tmp.path().join("scores.csv");
        ok(&[
            "predict",
            "--data",
            p(&data),
            "--model",
            p(model),
            "--out",
            p(&scores),
            "--split",
            "test",
        ]);
        let (ids, probs, logits) = read_scores(&scores);
        let rows: Vec<u64> = ids.iter().map(|i| i.parse().expect("row index")).collect();
        assert_eq!(rows, ds.rows_of_split(2));
        let labels: Vec<u8> = rows
            .iter()
            .map(|&r| ds.label(r).expect("label").expect("labelled"))
            .collect();
        // (serde_json may parse the last bit of a float differently.)
        assert!((metrics::auc(&probs, &labels).expect("auc") - auc).abs() < 1e-15);
        let ll = metrics::log_loss(&probs, &labels).expect("log-loss");
        assert!((ll - j["log_loss"].as_f64().expect("log_loss")).abs() < 1e-12);
        for (p, z) in probs.iter().zip(&logits) {
            assert!((p - 1.0 / (1.0 + (-z).exp())).abs() < 1e-12);
        }
    }
    // The text report names the metrics.
    let txt = ok(&[
        "eval",
        "--data",
        p(&data),
        "--model",
        p(&s),
        "--split",
        "valid",
    ]);
    for w in ["AUC", "KS", "log-loss", "PR-AUC", "approval", "decile"] {
        assert!(txt.contains(w), "{w} missing:\n{txt}");
    }

    // New applicants: no labels, no in-service events, user ids; all rows by default.
    let new = tmp.path().join("new");
    train_common::write(
        &new,
        Spec {
            labels: false,
            in_service: false,
            user_ids: true,
            ..Spec::labelled(150, 22)
        },
    );
    let scores = tmp.path().join("new.csv");
    ok(&[
        "predict",
        "--data",
        p(&new),
        "--model",
        p(&s),
        "--out",
        p(&scores),
    ]);
    let (ids, probs, _) = read_scores(&scores);
    assert_eq!(ids.len(), 150);
    assert_eq!(ids[0], "u00000");
    assert!(probs.iter().all(|p| (0.0..=1.0).contains(p)));
    let header = std::fs::read_to_string(&scores).expect("csv");
    assert!(header.starts_with("user_id,probability,logit"));
    // A teacher cannot score it, eval needs labels: both say why.
    refused(
        &[
            "predict",
            "--data",
            p(&new),
            "--model",
            p(&t),
            "--out",
            p(&scores),
        ],
        &["in-service"],
    );
    refused(&["eval", "--data", p(&new), "--model", p(&s)], &["labels"]);
    let labelled_new = tmp.path().join("labelled-new");
    train_common::write(
        &labelled_new,
        Spec {
            in_service: false,
            ..Spec::labelled(150, 23)
        },
    );
    refused(
        &["eval", "--data", p(&labelled_new), "--model", p(&t)],
        &["in-service", "has none"],
    );
    ok(&["eval", "--data", p(&labelled_new), "--model", p(&s)]);
    // predict wrote atomically: no temporary file is left.
    let leftovers: Vec<String> = std::fs::read_dir(tmp.path())
        .expect("dir")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// `teacher --help` and `student --help` show the defaults of the settings a config file
/// may also set (the library's own defaults, not a copy of them).
#[test]
fn help_shows_the_training_defaults() {
    let t = mgkd::train::TrainConfig::default();
    let w = mgkd::model::config::Widths::defaults();
    let l = mgkd::loss::LossConfig::default();
    for cmd in ["teacher", "student", "ablation"] {
        let help = ok(&[cmd, "--help"]);
        let flat = help.split_whitespace().collect::<Vec<_>>().join(" ");
        for (flag, value) in [
            ("--epochs", t.epochs.to_string()),
            ("--batch", t.batch.to_string()),
            ("--lr", t.lr.to_string()),
            ("--patience", t.patience.to_string()),
            ("--d", w.d.to_string()),
            ("--heads", w.heads.to_string()),
            ("--blocks", w.blocks.to_string()),
            ("--d-cat", w.d_cat.to_string()),
            ("--rho", l.rho.to_string()),
        ] {
            let line = flat
                .split(&format!("{flag} <"))
                .nth(1)
                .unwrap_or_else(|| panic!("{cmd} --help has no {flag}:\n{help}"));
            let until_next = line.split(" --").next().unwrap_or(line);
            assert!(
                until_next.contains(&format!("[default: {value}")),
                "{cmd} {flag}: {until_next:?}"
            );
        }
    }
    let help = ok(&["student", "--help"]);
    for value in [l.alpha, l.beta, l.gamma, l.delta, l.tau] {
        assert!(
            help.contains(&format!("[default: {value}")),
            "{value}: {help}"
        );
    }
}

/// Sizes that could exhaust the machine are refused before any work, naming the flag (or
/// the config key) and the range; nothing is written.
#[test]
fn sizes_beyond_their_bounds_are_refused_naming_the_flag() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    train_common::write(&data, Spec::labelled(200, 33));
    let out = tmp.path().join("t.safetensors");
    let (d, o) = (p(&data), p(&out));
    let max_threads = std::thread::available_parallelism().map_or(1, |n| n.get()) * 4;
    let too_many = (max_threads + 1).to_string();
    let cases: Vec<(Vec<&str>, Vec<&str>)> = vec![
        (
            vec!["teacher", "--data", d, "--out", o, "--threads", "100000"],
            vec!["--threads 100000", "out of range", "CPUs available"],
        ),
        (
            vec!["teacher", "--data", d, "--out", o, "--threads", &too_many],
            vec!["--threads", "out of range"],
        ),
        (
            vec!["teacher", "--data", d, "--out", o, "--blocks", "100000"],
            vec!["--blocks 100000", "1 to 64"],
        ),
        (
            vec![
                "teacher",
                "--data",
                d,
                "--out",
                o,
                "--epochs",
                "18446744073709551615",
            ],
            vec!["--epochs 18446744073709551615", "1 to 10000"],
        ),
        (
            vec!["teacher", "--data", d, "--out", o, "--batch", "10000000"],
            vec!["--batch 10000000", "1 to 65536"],
        ),
        (
            vec!["teacher", "--data", d, "--out", o, "--d", "100000"],
            vec!["--d 100000", "1 to 4096"],
        ),
        (
            vec!["eval", "--data", d, "--model", o, "--threads", "100000"],
            vec!["--threads 100000"],
        ),
        (
            vec!["synth", "--out", o, "--users", "18446744073709551615"],
            vec!["--users 18446744073709551615", "1 to 1000000000"],
        ),
        (
            vec!["quickstart", "--users", "18446744073709551615"],
            vec!["--users 18446744073709551615"],
        ),
        (
            vec!["quickstart", "--epochs", "100000"],
            vec!["--epochs 100000", "1 to 10000"],
        ),
        (
            vec!["ablation", "--data", d, "--out", o, "--seeds", "100000"],
            vec!["--seeds 100000", "1 to 1000"],
        ),
        (
            vec!["bench", "--device", "cpu", "--blocks", "100000"],
            vec!["--blocks 100000"],
        ),
        (
            vec![
                "bench",
                "--device",
                "cpu",
                "--steps",
                "18446744073709551615",
            ],
            vec!["--steps 18446744073709551615"],
        ),
    ];
    for (args, needles) in cases {
        refused(&args, &needles);
    }
    // A config file's value is named by its key.
    let cfg = tmp.path().join("c.toml");
    std::fs::write(&cfg, "[model]\nblocks = 100000\n").expect("config");
    refused(
        &["teacher", "--data", d, "--out", o, "--config", p(&cfg)],
        &["`[model] blocks` = 100000", "1 to 64", "--config file"],
    );
    let left: Vec<_> = std::fs::read_dir(tmp.path())
        .expect("dir")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(left.len(), 2, "{left:?}"); // data and c.toml
}

/// The config file's `[teacher]` section: its keys set the teacher's optimisation and class
/// weighting over `[train]` and `[loss]` (the record in the checkpoint says so), a flag sets
/// both, a key it does not take (a width) or a bad value in it is refused by name.
#[test]
fn the_teacher_section_sets_the_teachers_own_settings() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    train_common::write(&data, Spec::labelled(200, 33));
    let cfg = tmp.path().join("c.toml");
    let out = tmp.path().join("t.safetensors");
    let args = |extra: &'static [&'static str]| {
        let mut a = vec![
            "teacher",
            "--data",
            p(&data),
            "--out",
            p(&out),
            "--config",
            p(&cfg),
        ];
        a.extend([
            "--quiet", "--d", "8", "--heads", "2", "--blocks", "1", "--d-cat", "4",
        ]);
        a.extend(extra);
        a
    };
    // Trains a teacher with `text` as the config file; its training record.
    let train_with = |text: &str, extra: &'static [&'static str]| {
        std::fs::write(&cfg, text).expect("write");
        ok(&args(extra));
        let ck = mgkd::model::checkpoint::read(&out).expect("checkpoint");
        let r = mgkd::train::TrainingRecord::from_metadata(&out, &ck.metadata)
            .expect("record")
            .expect("present");
        std::fs::remove_file(&out).expect("remove the checkpoint");
        r
    };
    let base =
        "[train]\nepochs = 2\nbatch = 64\nlr = 2e-3\nweight_decay = 0.05\n[loss]\nrho = 0.25\n";
    let r = train_with(
        &format!(
            "{base}[teacher]\nepochs = 3\nlr = 4e-3\nbucket = false\nwarmup = 0.1\nclip = 0.5\n\
             rho = 0.75\nreweight = false\n"
        ),
        &["--batch", "32"],
    );
    // [teacher] over [train] and [loss], the flag over both, the rest from [train].
    assert_eq!((r.train.epochs, r.train.lr, r.train.batch), (3, 4e-3, 32));
    assert_eq!(
        (r.train.bucket, r.train.warmup, r.train.clip),
        (false, 0.1, 0.5)
    );
    assert_eq!(r.train.weight_decay, 0.05);
    assert_eq!((r.loss.rho, r.loss.reweight), (0.75, false));
    // Without [teacher] the teacher takes [train] and [loss].
    let r = train_with(base, &[]);
    assert_eq!((r.train.epochs, r.train.batch, r.train.lr), (2, 64, 2e-3));
    assert_eq!((r.train.bucket, r.train.weight_decay), (true, 0.05));
    assert_eq!((r.loss.rho, r.loss.reweight), (0.25, true));
    // Widths are shared: `[teacher] d` is an unknown key; a bad value names the section.
    for (text, needles) in [
        ("[teacher]\nd = 16\n", ["c.toml", "unknown field `d`"]),
        ("[teacher]\nlr = -1.0\n", ["[teacher]", "lr = -1"]),
        (
            "[teacher]\nepochs = 0\n",
            ["[teacher] epochs", "--config file"],
        ),
    ] {
        std::fs::write(&cfg, text).expect("write");
        refused(&args(&[]), &needles);
    }
}

#[test]
fn mismatched_schemas_and_bad_options_are_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    let other = tmp.path().join("other");
    train_common::write(&data, Spec::labelled(200, 31));
    train_common::write(
        &other,
        Spec {
            event_vocab: 9,
            ..Spec::labelled(200, 32)
        },
    );
    let t = tmp.path().join("teacher.safetensors");
    let mut a = vec![
        "teacher",
        "--data",
        p(&data),
        "--out",
        p(&t),
        "--epochs",
        "1",
        "--quiet",
    ];
    a.extend(TINY);
    ok(&a);
    let s = tmp.path().join("student.safetensors");
    // A student on data of another schema than its teacher's.
    refused(
        &[
            "student",
            "--data",
            p(&other),
            "--teacher",
            p(&t),
            "--out",
            p(&s),
            "--epochs",
            "1",
        ],
        &[
            "teacher.safetensors",
            "event categorical fields",
            "event categorical fields `event_type`: vocabulary 6 here, vocabulary 9 wanted",
            "another schema",
        ],
    );
    assert!(!s.exists());
    // A checkpoint evaluated / scored on a dataset of another schema.
    refused(
        &["eval", "--data", p(&other), "--model", p(&t)],
        &["another schema", "event categorical fields"],
    );
    refused(
        &[
            "predict",
            "--data",
            p(&other),
            "--model",
            p(&t),
            "--out",
            p(&s),
        ],
        &["another schema"],
    );
    // A student as a teacher, a width other than the teacher's.
    let mut a = vec![
        "student",
        "--data",
        p(&data),
        "--teacher",
        p(&t),
        "--out",
        p(&s),
    ];
    a.extend(["--epochs", "1", "--quiet"]);
    ok(&a);
    let s2 = tmp.path().join("s2.safetensors");
    refused(
        &[
            "student",
            "--data",
            p(&data),
            "--teacher",
            p(&s),
            "--out",
            p(&s2),
        ],
        &["teacher checkpoint"],
    );
    refused(
        &[
            "student",
            "--data",
            p(&data),
            "--teacher",
            p(&t),
            "--out",
            p(&s2),
            "--d",
            "16",
        ],
        &["width d = 16"],
    );
    refused(
        &[
            "student",
            "--data",
            p(&data),
            "--teacher",
            p(&t),
            "--out",
            p(&t),
        ],
        &["is the input --teacher"],
    );
    let missing = tmp.path().join("no-such-dir").join("t.safetensors");
    refused(
        &[
            "teacher",
            "--data",
            p(&data),
            "--out",
            p(&missing),
            "--epochs",
            "1",
        ],
        &["no-such-dir", "does not exist"],
    );
    // Not a checkpoint at all.
    let junk = tmp.path().join("junk.safetensors");
    std::fs::write(&junk, b"not a checkpoint").expect("write");
    refused(
        &["eval", "--data", p(&data), "--model", p(&junk)],
        &["junk.safetensors"],
    );
    // Without a usable CUDA device, an explicit `--device cuda` is a clear error (with one,
    // it trains on the GPU: tools/gpu-check covers that).
    if mgkd::backend::device::probe_cuda(0).is_err() {
        refused(
            &[
                "teacher",
                "--data",
                p(&data),
                "--out",
                p(&s2),
                "--device",
                "cuda",
            ],
            &["cuda:0 cannot be used"],
        );
    }
    // Config files: unknown keys are named; flags override the file.
    let cfg = tmp.path().join("model.toml");
    std::fs::write(&cfg, "[train]\nepochs = 1\nlearning_rate = 0.1\n").expect("write");
    refused(
        &[
            "teacher",
            "--data",
            p(&data),
            "--out",
            p(&s2),
            "--config",
            p(&cfg),
        ],
        &["model.toml", "learning_rate"],
    );
    std::fs::write(
        &cfg,
        "[model]\nd = 8\nheads = 2\nblocks = 1\nd_cat = 4\n[train]\nepochs = 3\nbatch = 64\n[loss]\nrho = 0.25\n",
    )
    .expect("write");
    ok(&[
        "teacher",
        "--data",
        p(&data),
        "--out",
        p(&s2),
        "--config",
        p(&cfg),
        "--epochs",
        "1",
        "--quiet",
    ]);
    let ck = mgkd::model::checkpoint::read(&s2).expect("checkpoint");
    assert_eq!((ck.config.d, ck.config.blocks), (8, 1));
    let rec = mgkd::train::TrainingRecord::from_metadata(&s2, &ck.metadata)
        .expect("record")
        .expect("present");
    assert_eq!((rec.train.epochs, rec.train.batch), (1, 64));
    assert_eq!(rec.loss.rho, 0.25);
    refused(
        &["teacher", "--data", p(&data), "--out", p(&s2), "--lr", "0"],
        &["lr"],
    );
}

#[test]
fn checkpoints_are_bit_identical_for_1_and_2_threads() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    train_common::write(&data, Spec::labelled(240, 41));
    // Each run in its own directory with the same relative file names, so that the paths
    // recorded in the checkpoints are the same.
    let train_with = |threads: &str| -> (Vec<u8>, Vec<u8>) {
        let dir = tmp.path().join(format!("threads-{threads}"));
        std::fs::create_dir(&dir).expect("mkdir");
        for args in [
            vec!["teacher", "--data", p(&data), "--out", "t.safetensors"],
            vec![
                "student",
                "--data",
                p(&data),
                "--teacher",
                "t.safetensors",
                "--out",
                "s.safetensors",
            ],
        ] {
            let mut a = args;
            a.extend(["--epochs", "2", "--quiet", "--seed", "5"]);
            a.extend(if a[0] == "teacher" {
                &TINY[..]
            } else {
                &TINY[8..]
            });
            let o = bin()
                .args(&a)
                .current_dir(&dir)
                .env("RAYON_NUM_THREADS", threads)
                .output()
                .expect("run");
            assert!(o.status.success(), "{}", text(&o));
        }
        let read = |n: &str| std::fs::read(dir.join(n)).expect("checkpoint");
        (read("t.safetensors"), read("s.safetensors"))
    };
    let one = train_with("1");
    let two = train_with("2");
    assert!(
        one.0 == two.0,
        "teacher checkpoints differ between 1 and 2 threads"
    );
    assert!(
        one.1 == two.1,
        "student checkpoints differ between 1 and 2 threads"
    );
}

#[test]
fn quickstart_runs_small_and_prints_the_comparison() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let work = tmp.path().join("work");
    let out = ok(&[
        "quickstart",
        "--users",
        "1200",
        "--epochs",
        "1",
        "--d",
        "8",
        "--seed",
        "3",
        "--quiet",
        "--workdir",
        p(&work),
    ]);
    for name in [
        "teacher (in-service)",
        "plain (hard, re-weighted)",
        "full MGKD",
        "AUC",
        "log-loss",
    ] {
        assert!(out.contains(name), "{name} missing:\n{out}");
    }
    for f in [
        "checkpoints/seed3-teacher.safetensors",
        "checkpoints/seed3-plain.safetensors",
        "checkpoints/seed3-full.safetensors",
        "data/dataset.json",
    ] {
        assert!(work.join(f).exists(), "{f} missing");
    }
    // The plain student has every distillation term off, the MGKD student every one on.
    let rec = |f: &str| {
        let path = work.join(f);
        let ck = mgkd::model::checkpoint::read(&path).expect("checkpoint");
        mgkd::train::TrainingRecord::from_metadata(&path, &ck.metadata)
            .expect("record")
            .expect("present")
    };
    let (plain, full) = (
        rec("checkpoints/seed3-plain.safetensors"),
        rec("checkpoints/seed3-full.safetensors"),
    );
    assert!(!plain.loss.soft && !plain.loss.coarse && !plain.loss.fine && !plain.loss.self_distill);
    assert!(plain.loss.reweight);
    assert!(full.loss.soft && full.loss.coarse && full.loss.fine && full.loss.self_distill);
    // The MGKD student uses the default coefficients; the split is 20/20/60.
    assert_eq!(full.loss, mgkd::loss::LossConfig::default());
    let m: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(work.join("data/dataset.json")).expect("manifest"),
    )
    .expect("json");
    let rows: Vec<u64> = m["splits"]
        .as_array()
        .expect("splits")
        .iter()
        .map(|s| s["rows"].as_u64().expect("rows"))
        .collect();
    assert_eq!(rows.iter().sum::<u64>(), 1200);
    assert!(rows[2] > 2 * rows[0], "{rows:?}");
}

/// `--precision bf16` trains on the CPU (the scheme's reference), the checkpoint records it
/// and keeps f32 master weights, `eval` scores it, the bench reports it, and an unknown
/// precision is refused naming the value.
#[test]
fn bf16_precision_trains_is_recorded_and_benched() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    train_common::write(&data, Spec::labelled(400, 31));
    let (t16, t32) = (
        tmp.path().join("t16.safetensors"),
        tmp.path().join("t32.safetensors"),
    );
    let out = teacher(&data, &t16, &["--precision", "bf16", "--device", "cpu"]);
    assert!(out.contains("best epoch"), "{out}");
    teacher(&data, &t32, &["--device", "cpu"]);
    let record = |path: &Path| {
        let ck = mgkd::model::checkpoint::read(path).expect("checkpoint");
        let rec = mgkd::train::TrainingRecord::from_metadata(path, &ck.metadata)
            .expect("record")
            .expect("present");
        (rec.precision, ck)
    };
    let (p16, ck16) = record(&t16);
    let (p32, ck32) = record(&t32);
    assert_eq!(
        (p16, p32),
        (
            mgkd::backend::Precision::Bf16,
            mgkd::backend::Precision::F32
        )
    );
    // Master weights: f32 values that are not all bf16 numbers, and not the f32 run's.
    let (v16, v32) = (ck16.values, ck32.values);
    let rounded = v16
        .iter()
        .filter(|&&x| mgkd::backend::precision::round_bf16(x) == x)
        .count();
    assert!(
        rounded < v16.len() / 2,
        "{rounded} of {} are bf16",
        v16.len()
    );
    assert_ne!(
        v16, v32,
        "the bf16 run computed exactly what the f32 run did"
    );
    let eval = ok(&["eval", "--data", p(&data), "--model", p(&t16), "--json"]);
    let v: serde_json::Value = serde_json::from_str(&eval).expect("eval JSON");
    assert!(v["auc"].as_f64().is_some_and(|a| a > 0.6), "{eval}");

    let v = student_bench_json(&["--precision", "bf16", "--batch", "4", "--d", "8"]);
    let rows = v["results"].as_array().expect("results");
    assert!(
        !rows.is_empty() && rows.iter().all(|r| r["precision"] == "bf16"),
        "{v}"
    );

    refused(
        &[
            "teacher",
            "--data",
            p(&data),
            "--out",
            p(&tmp.path().join("x.safetensors")),
            "--precision",
            "fp16",
        ],
        &["fp16", "f32 or bf16"],
    );
}

/// `bench --json` on the CPU: one timed step, no warm-up, the student step on padded
/// batches, 2 heads, then `extra`.
fn student_bench_json(extra: &[&str]) -> serde_json::Value {
    let mut args = vec![
        "bench",
        "--device",
        "cpu",
        "--json",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--heads",
        "2",
        "--stages",
        "student",
        "--batching",
        "padded",
    ];
    args.extend_from_slice(extra);
    let out = ok(&args);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("bench JSON: {e}\n{out}"))
}

/// `bench` on the CPU reports the peak memory its steps held (the binary's counting
/// allocator): present, and growing with the batch by at least 20 buffers of a student
/// row's `Lp×d` floats per row (a training block alone keeps about 18 of them).
#[test]
fn cpu_bench_reports_peak_memory_growing_with_the_batch() {
    let peak = |batch: &str| {
        let v = student_bench_json(&["--pool", "1", "--batch", batch, "--d", "32"]);
        v["results"][0]["peak_mem_bytes"]
            .as_u64()
            .unwrap_or_else(|| panic!("no peak memory: {v}"))
    };
    let (small, large) = (peak("8"), peak("64"));
    let (pre_len, d) = (32, 32);
    let per_row = (large.saturating_sub(small)) / 56;
    assert!(
        small > 0 && per_row >= 20 * pre_len * d * 4,
        "peak {small} bytes at batch 8, {large} at batch 64: {per_row} per row"
    );
}

/// The tensors of a checkpoint, by name.
fn tensors(path: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    let bytes = std::fs::read(path).expect("checkpoint");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
    st.tensors()
        .into_iter()
        .map(|(name, view)| (name, view.data().to_vec()))
        .collect()
}

/// `student --data D --teacher T --out O --epochs 3` with the tiny settings, then `extra`.
fn student_args(data: &Path, teacher: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    let a: Vec<String> = [
        "student",
        "--data",
        p(data),
        "--teacher",
        p(teacher),
        "--out",
        p(out),
    ]
    .iter()
    .chain(&["--epochs", "3"])
    .chain(&TINY[8..])
    .chain(extra)
    .map(|s| s.to_string())
    .collect();
    a
}

/// `args` as the `&str` slice the helpers take.
fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

#[test]
fn soft_labels_from_a_file_take_the_place_of_the_teachers_logits() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    train_common::write(
        &data,
        Spec {
            user_ids: true,
            ..Spec::labelled(600, 33)
        },
    );
    let t = tmp.path().join("teacher.safetensors");
    teacher(&data, &t, &[]);
    let scores = tmp.path().join("teacher.csv");
    ok(&[
        "predict",
        "--data",
        p(&data),
        "--model",
        p(&t),
        "--out",
        p(&scores),
    ]);
    let student = |out: &Path, extra: &[&str]| student_args(&data, &t, out, extra);

    // The teacher's own scores as the file: the same student, tensor for tensor (predict's
    // logits round-trip exactly), and the checkpoint records the file.
    let (a, b) = (
        tmp.path().join("a.safetensors"),
        tmp.path().join("b.safetensors"),
    );
    ok(&strs(&student(&a, &[])));
    let said = text(&run(&strs(&student(&b, &["--soft-labels", p(&scores)]))));
    assert!(said.contains("L_soft's targets: the logits of"), "{said}");
    assert_eq!(tensors(&a), tensors(&b));
    let ck = mgkd::model::checkpoint::read(&b).expect("read");
    let record: serde_json::Value =
        serde_json::from_str(&ck.metadata[mgkd::train::KEY_TRAINING]).expect("record");
    assert_eq!(record["soft_labels"], p(&scores));
    assert_eq!(
        record["soft_labels_sha256"].as_str().map(str::len),
        Some(64)
    );
    let ck = mgkd::model::checkpoint::read(&a).expect("read");
    assert!(!ck.metadata[mgkd::train::KEY_TRAINING].contains("soft_labels"));

    // The file's logits are the targets: a constant +3 for every row pulls the student's
    // scores up, a constant −3 down, against the same hard labels (L_soft weighted 20).
    let ds = Dataset::open(&data).expect("open");
    let keys: Vec<String> = (0..ds.rows())
        .map(|r| ds.user_id(r).expect("id").expect("ids").to_string())
        .collect();
    let constant = |name: &str, logit: f64| {
        let path = tmp.path().join(name);
        let rows: String = keys.iter().map(|k| format!("{k},0.5,{logit}\n")).collect();
        std::fs::write(&path, format!("user_id,probability,logit\n{rows}")).expect("write");
        path
    };
    let mean_probability = |soft: &Path, name: &str| {
        let out = tmp.path().join(format!("{name}.safetensors"));
        ok(&strs(&student(
            &out,
            &["--soft-labels", p(soft), "--alpha", "20"],
        )));
        let csv = tmp.path().join(format!("{name}.csv"));
        ok(&[
            "predict",
            "--data",
            p(&data),
            "--model",
            p(&out),
            "--split",
            "train",
            "--out",
            p(&csv),
        ]);
        let (_, probs, _) = read_scores(&csv);
        probs.iter().sum::<f64>() / probs.len() as f64
    };
    let up = mean_probability(&constant("up.csv", 3.0), "up");
    let down = mean_probability(&constant("down.csv", -3.0), "down");
    assert!(
        up > down + 0.2,
        "mean probability {up} (+3) against {down} (−3)"
    );

    // Bad files and settings: an error naming the file (and line), no checkpoint.
    let good = std::fs::read_to_string(&scores).expect("scores");
    let mut lines: Vec<&str> = good.lines().collect();
    let first_train = ds.rows_of_split(mgkd::train::TRAIN)[0] as usize;
    let without_train_row = {
        lines.remove(first_train + 1);
        lines.join("\n") + "\n"
    };
    let cases = [
        (good.replace("logit", "score"), "no `logit` column"),
        (good.replacen("user_id", "row", 1), "no `user_id` column"),
        (without_train_row, "rows of the train split are not scored"),
        (
            format!("{good}nobody,0.5,0.0\n"),
            "user_id nobody is not a row of",
        ),
        (
            format!("{good}{},0.5,0.0\n", keys[0]),
            "again (first on line 2)",
        ),
        (
            good.replacen(
                &format!("\n{},", keys[0]),
                &format!("\n{},0.5,nan\nx,", keys[0]),
                1,
            ),
            "line 2: logit `nan` is not a finite number",
        ),
    ];
    let out = tmp.path().join("never.safetensors");
    for (i, (text, want)) in cases.iter().enumerate() {
        let bad = tmp.path().join(format!("bad{i}.csv"));
        std::fs::write(&bad, text).expect("write");
        refused(
            &strs(&student(&out, &["--soft-labels", p(&bad)])),
            &[p(&bad), want],
        );
        assert!(!out.exists(), "case {i}");
    }
    refused(
        &strs(&student(&out, &["--soft-labels", p(&scores), "--no-soft"])),
        &["L_soft is off"],
    );
    refused(
        &strs(&student(
            &out,
            &["--soft-labels", p(&scores), "--teacher-cache-mib", "0"],
        )),
        &["raise --teacher-cache-mib"],
    );
    refused(
        &strs(&student(&scores, &["--soft-labels", p(&scores)])),
        &["--soft-labels"],
    );
    assert!(!out.exists());
    assert_eq!(std::fs::read_to_string(&scores).expect("kept"), good);
}
