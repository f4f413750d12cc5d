//! `--resume` through the binary: a teacher and a student run killed with SIGKILL at several
//! moments (after a mid-epoch resume checkpoint and some steps past it, right after an
//! epoch's end, and again after a resume) and resumed end with a checkpoint byte-identical to
//! an uninterrupted run's, and with the same log lines (timings aside); the resume
//! checkpoint is removed at the end. The refusals: `--resume` without a resume checkpoint, a
//! fresh run over an interrupted one, a resume with other settings, a missing log, a
//! corrupted resume checkpoint, a bad `--checkpoint-every`. An ablation killed twice resumes
//! to the uninterrupted ablation's results and checkpoints; and through the library, runs
//! resumed from copies of mid-epoch and epoch-end resume checkpoints end bit-identical (the
//! path `tests/cuda_train.rs` runs on a GPU). `--checkpoint-every` values parse and print;
//! a fresh run over a finished one says that it replaces the log.

mod train_common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use mgkd::train::resume::{read_progress, resume_path, Progress};
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

/// Tiny model, one thread, a resume checkpoint every 7 steps (132 steps per epoch on the
/// 2 100 train rows at batch 16).
const SETTINGS: [&str; 16] = [
    "--d",
    "8",
    "--heads",
    "2",
    "--blocks",
    "2",
    "--d-cat",
    "4",
    "--batch",
    "16",
    "--lr",
    "5e-3",
    "--threads",
    "1",
    "--checkpoint-every",
    "7",
];

/// The arguments of a run writing `out` in its directory: `teacher` or `student` (under
/// `t.safetensors`), 4 epochs unless `extra` sets `--epochs`.
fn args(stage: &str, data: &Path, out: &str, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = vec![stage.into(), "--data".into(), p(data).into()];
    if stage == "student" {
        a.extend(["--teacher".into(), "t.safetensors".into()]);
    }
    a.extend([
        "--out".into(),
        out.into(),
        "--quiet".into(),
        "--device".into(),
        "cpu".into(),
    ]);
    a.extend(SETTINGS.iter().map(|s| s.to_string()));
    if !extra.contains(&"--epochs") {
        a.extend(["--epochs".into(), "4".into()]);
    }
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

fn run_in(dir: &Path, a: &[String]) -> Output {
    bin()
        .args(a)
        .current_dir(dir)
        .output()
        .expect("run mgkd-train")
}

fn ok_in(dir: &Path, a: &[String]) {
    let o = run_in(dir, a);
    assert!(o.status.success(), "{a:?} failed:\n{}", text(&o));
}

/// Where a kill lands.
#[derive(Debug, Clone, Copy)]
enum KillAt {
    /// Once the resume checkpoint reports at least this many steps, after `delay_ms` more.
    Step(u64, u64),
    /// As soon as the resume checkpoint is the one written at the end of this epoch.
    EpochEnd(usize),
}

impl KillAt {
    fn reached(self, pr: &Progress) -> bool {
        match self {
            KillAt::Step(s, _) => pr.step >= s,
            KillAt::EpochEnd(e) => pr.epoch > e,
        }
    }
}

/// Starts `a` in `dir` and kills it (SIGKILL) at `at`; returns the step of the resume
/// checkpoint it left. Panics when the run ends before.
fn kill_at(dir: &Path, a: &[String], state: &Path, at: KillAt) -> u64 {
    let mut child: Child = bin()
        .args(a)
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let start = Instant::now();
    loop {
        if let Ok(pr) = read_progress(state) {
            if at.reached(&pr) {
                break;
            }
        }
        if let Some(st) = child.try_wait().expect("try_wait") {
            let out = child.wait_with_output().expect("output");
            panic!(
                "the run ended ({st}) before the kill at {at:?}:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        assert!(start.elapsed() < Duration::from_secs(120), "no {at:?}");
        std::thread::sleep(Duration::from_micros(300));
    }
    if let KillAt::Step(_, ms) = at {
        std::thread::sleep(Duration::from_millis(ms));
    }
    assert!(
        child.try_wait().expect("try_wait").is_none(),
        "the run ended before the kill at {at:?}"
    );
    child.kill().expect("SIGKILL");
    child.wait().expect("wait");
    read_progress(state)
        .expect("a resume checkpoint after the kill")
        .step
}

/// The log's lines without their timings (which differ from run to run).
fn log_lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .expect("log")
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).expect("log line");
            let o = v.as_object_mut().expect("object");
            for k in [
                "samples_per_s",
                "train_seconds",
                "data_seconds",
                "gather_seconds",
                "valid_seconds",
            ] {
                assert!(o.remove(k).is_some(), "log line without {k}");
            }
            v
        })
        .collect()
}

/// Runs `stage` uninterrupted in `reference` and killed at each of `kills` then resumed in
/// `interrupted`; the final checkpoints must be byte-identical and the logs the same.
fn compare(stage: &str, data: &Path, reference: &Path, interrupted: &Path, kills: &[KillAt]) {
    let out = format!("{}.safetensors", &stage[..1]);
    ok_in(reference, &args(stage, data, &out, &[]));
    let state = resume_path(&interrupted.join(&out));
    let mut last = 0;
    for (k, &at) in kills.iter().enumerate() {
        let extra: &[&str] = if k == 0 { &[] } else { &["--resume"] };
        let step = kill_at(interrupted, &args(stage, data, &out, extra), &state, at);
        assert!(
            step >= last,
            "the resume checkpoint went back from step {last} to {step}"
        );
        last = step;
    }
    ok_in(interrupted, &args(stage, data, &out, &["--resume"]));
    assert!(
        !state.exists(),
        "the resume checkpoint stays after the run completed"
    );
    let a = std::fs::read(reference.join(&out)).expect("reference checkpoint");
    let b = std::fs::read(interrupted.join(&out)).expect("resumed checkpoint");
    assert!(
        a == b,
        "{stage}: the resumed run's checkpoint differs from the uninterrupted run's"
    );
    let log = format!("{out}.log.jsonl");
    let (la, lb) = (
        log_lines(&reference.join(&log)),
        log_lines(&interrupted.join(&log)),
    );
    assert_eq!(la.len(), 4, "{stage}: four epochs in the reference log");
    assert_eq!(la, lb, "{stage}: the logs differ");
}

fn dirs(root: &Path) -> (PathBuf, PathBuf) {
    let (r, i) = (root.join("reference"), root.join("interrupted"));
    std::fs::create_dir(&r).expect("mkdir");
    std::fs::create_dir(&i).expect("mkdir");
    (r, i)
}

#[test]
fn killed_runs_resume_to_the_uninterrupted_parameters() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    train_common::write(&data, Spec::labelled(3000, 8));
    let (reference, interrupted) = dirs(tmp.path());
    // Teacher: killed mid-epoch 1 a few steps past a checkpoint, again in epoch 2 after a
    // resume, right after the end of epoch 3, and once more in epoch 4.
    compare(
        "teacher",
        &data,
        &reference,
        &interrupted,
        &[
            KillAt::Step(20, 2),
            KillAt::Step(200, 5),
            KillAt::EpochEnd(3),
            KillAt::Step(430, 1),
        ],
    );
    // Student, under the teacher just trained (the same file in both directories).
    compare(
        "student",
        &data,
        &reference,
        &interrupted,
        &[
            KillAt::Step(60, 3),
            KillAt::EpochEnd(2),
            KillAt::Step(300, 0),
        ],
    );
}

#[test]
fn resume_refusals_name_the_problem() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    train_common::write(&data, Spec::labelled(600, 9));
    let dir = tmp.path();
    let refused = |a: &[String], needles: &[&str]| {
        let o = run_in(dir, a);
        let t = text(&o);
        assert!(!o.status.success(), "{a:?} should fail:\n{t}");
        assert!(!t.contains("panicked"), "{a:?} panicked:\n{t}");
        for n in needles {
            assert!(t.contains(n), "{a:?}: message lacks {n:?}:\n{t}");
        }
    };
    // Nothing to resume.
    refused(
        &args("teacher", &data, "t.safetensors", &["--resume"]),
        &[
            "--resume",
            "no resume checkpoint",
            "t.safetensors.resume.safetensors",
        ],
    );
    // An interrupted run: its resume checkpoint after epoch 1 (kept, as a kill would).
    let state = resume_path(&dir.join("t.safetensors"));
    kill_at(
        dir,
        &args("teacher", &data, "t.safetensors", &["--epochs", "40"]),
        &state,
        KillAt::EpochEnd(1),
    );
    let log = dir.join("t.safetensors.log.jsonl");
    let log_before = std::fs::read(&log).expect("log");
    refused(
        &args("teacher", &data, "t.safetensors", &["--epochs", "40"]),
        &[
            "interrupted run",
            "--resume",
            "t.safetensors.resume.safetensors",
        ],
    );
    assert_eq!(
        std::fs::read(&log).expect("log"),
        log_before,
        "a refused run changed the log"
    );
    // Other settings: each difference named.
    refused(
        &args(
            "teacher",
            &data,
            "t.safetensors",
            &["--epochs", "40", "--rho", "0.25", "--resume"],
        ),
        &["other settings", "loss.rho: 0.5 → 0.25"],
    );
    refused(
        &args("teacher", &data, "t.safetensors", &["--resume"]),
        &["train.epochs: 40 → 4"],
    );
    refused(
        &args(
            "teacher",
            &data,
            "t.safetensors",
            &["--epochs", "40", "--precision", "bf16", "--resume"],
        ),
        &["other settings", "precision", "f32", "bf16"],
    );
    // The log of the interrupted run is gone.
    std::fs::rename(&log, dir.join("log.away")).expect("move the log");
    refused(
        &args(
            "teacher",
            &data,
            "t.safetensors",
            &["--epochs", "40", "--resume"],
        ),
        &[
            "t.safetensors.log.jsonl",
            "log of the interrupted run is missing",
        ],
    );
    std::fs::rename(dir.join("log.away"), &log).expect("restore the log");
    // A flipped bit in the tensor data.
    let mut bytes = std::fs::read(&state).expect("state");
    let last = bytes.len() - 3;
    bytes[last] ^= 0x10;
    std::fs::write(&state, &bytes).expect("write");
    refused(
        &args(
            "teacher",
            &data,
            "t.safetensors",
            &["--epochs", "40", "--resume"],
        ),
        &["t.safetensors.resume.safetensors", "checksum"],
    );
    // A bad --checkpoint-every, with the reason.
    for (bad, why) in [
        ("0", "at least 1"),
        ("5x", "not a step count"),
        ("-3", "not a step count"),
        ("999h", "at most a week"),
        ("2000000000", "at most 1000000000 steps"),
    ] {
        let flag = format!("--checkpoint-every={bad}");
        let a: Vec<String> = [
            "teacher",
            "--data",
            p(&data),
            "--out",
            "u.safetensors",
            &flag,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        refused(&a, &["--checkpoint-every", why]);
    }
}

/// The arguments of a small ablation (teacher, plain and full students of seed 0) writing
/// `rep` in its directory.
fn ablation_args(data: &Path, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = [
        "ablation",
        "--data",
        p(data),
        "--out",
        "rep",
        "--seeds",
        "1",
        "--variants",
        "plain,full",
        "--epochs",
        "3",
        "--quiet",
        "--device",
        "cpu",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.extend(SETTINGS.iter().map(|s| s.to_string()));
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

/// `results.json`'s runs without their timings.
fn ablation_runs(dir: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(dir.join("rep/results.json")).expect("results.json");
    let v: serde_json::Value = serde_json::from_str(&text).expect("results.json parses");
    v["runs"]
        .as_array()
        .expect("runs")
        .iter()
        .map(|r| {
            let mut r = r.clone();
            let o = r.as_object_mut().expect("object");
            assert!(o.remove("seconds").is_some() && o.remove("samples_per_s").is_some());
            r
        })
        .collect()
}

#[test]
fn a_killed_ablation_resumes_keeping_its_finished_runs() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    train_common::write(&data, Spec::labelled(1500, 12));
    let (reference, interrupted) = dirs(tmp.path());
    ok_in(&reference, &ablation_args(&data, &[]));
    let ck = |name: &str| interrupted.join(format!("rep/checkpoints/seed0-{name}.safetensors"));
    // Killed while the teacher trains, then while the plain student trains (the teacher
    // finished and is kept), then while the full student trains (the plain student finished:
    // its scores, the baseline of the full student's DeLong test, are read back from its
    // checkpoint), then resumed to the end.
    kill_at(
        &interrupted,
        &ablation_args(&data, &[]),
        &resume_path(&ck("teacher")),
        KillAt::Step(30, 2),
    );
    kill_at(
        &interrupted,
        &ablation_args(&data, &["--resume"]),
        &resume_path(&ck("plain")),
        KillAt::Step(20, 1),
    );
    let runs_file = interrupted.join("rep/runs.jsonl");
    assert_eq!(
        std::fs::read_to_string(&runs_file)
            .expect("runs.jsonl")
            .lines()
            .count(),
        1,
        "the teacher's run is recorded as finished"
    );
    kill_at(
        &interrupted,
        &ablation_args(&data, &["--resume"]),
        &resume_path(&ck("full")),
        KillAt::Step(20, 1),
    );
    assert_eq!(
        std::fs::read_to_string(&runs_file)
            .expect("runs.jsonl")
            .lines()
            .count(),
        2,
        "the teacher's and the plain student's runs are recorded as finished"
    );
    // A fresh ablation over the interrupted one is refused.
    let o = run_in(&interrupted, &ablation_args(&data, &[]));
    assert!(
        !o.status.success() && text(&o).contains("--resume"),
        "{}",
        text(&o)
    );
    let o = run_in(&interrupted, &ablation_args(&data, &["--resume"]));
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("2 run(s) finished earlier are kept"),
        "{}",
        text(&o)
    );
    assert!(!runs_file.exists(), "runs.jsonl stays after the report");
    assert_eq!(ablation_runs(&reference), ablation_runs(&interrupted));
    for name in ["teacher", "plain", "full"] {
        let a = std::fs::read(reference.join(format!("rep/checkpoints/seed0-{name}.safetensors")))
            .expect("reference checkpoint");
        assert!(
            a == std::fs::read(ck(name)).expect("resumed checkpoint"),
            "{name}: the resumed ablation's checkpoint differs"
        );
        assert!(
            !resume_path(&ck(name)).exists(),
            "{name}: resume checkpoint left"
        );
    }
}

/// The library path the CUDA test (`tests/cuda_train.rs`) runs on the GPU, here on the
/// CPU: resumed from a mid-epoch and an epoch-end resume checkpoint, a teacher and a student
/// end bit-identical to the uninterrupted runs.
#[test]
fn library_runs_resume_bit_identically_on_the_cpu() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    train_common::write(&data, Spec::labelled(3000, 8));
    let ds = mgkd::data::Dataset::open(&data).expect("open");
    let be = mgkd::backend::cpu::CpuBackend::<f32>::new();
    let checked = train_common::resumed_runs_match(&be, &ds, tmp.path());
    assert_eq!(checked.len(), 2, "{checked:?}");
}

#[test]
fn checkpoint_intervals_parse_and_print() {
    use mgkd::train::resume::{Every, DEFAULT_EVERY};
    for (text, every, shown) in [
        ("500", Every::Steps(500), "500"),
        ("90s", Every::Seconds(90), "90s"),
        ("120s", Every::Seconds(120), "2m"),
        ("5m", Every::Seconds(300), "5m"),
        (" 2h ", Every::Seconds(7200), "2h"),
        ("168h", Every::Seconds(604_800), "168h"),
    ] {
        assert_eq!(text.parse::<Every>(), Ok(every), "{text}");
        assert_eq!(every.to_string(), shown);
        assert_eq!(shown.parse::<Every>(), Ok(every), "{shown}");
    }
    assert_eq!(DEFAULT_EVERY, Every::Seconds(300));
    for bad in ["", "m", "0s", "1.5m", "5 m", "169h", "1000000001"] {
        assert!(bad.parse::<Every>().is_err(), "{bad:?} parsed");
    }
}

#[test]
fn a_fresh_run_over_a_finished_one_says_it_replaces_the_log() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    train_common::write(&data, Spec::labelled(300, 4));
    let a = args("teacher", &data, "t.safetensors", &["--epochs", "1"]);
    let first = run_in(tmp.path(), &a);
    assert!(first.status.success(), "{}", text(&first));
    assert!(
        !text(&first).contains("replacing the log"),
        "{}",
        text(&first)
    );
    let again = run_in(tmp.path(), &a);
    assert!(again.status.success(), "{}", text(&again));
    assert!(
        String::from_utf8_lossy(&again.stderr)
            .contains("note: replacing the log t.safetensors.log.jsonl of an earlier run"),
        "{}",
        text(&again)
    );
    let log = std::fs::read_to_string(tmp.path().join("t.safetensors.log.jsonl")).expect("log");
    assert_eq!(
        log.lines().count(),
        1,
        "the replaced log holds the new run only"
    );
}
