//! SIGINT/SIGTERM through the binary (src/io/cleanup.rs): the run's temporary files (a
//! partial dataset's shards and `.tmp` files, the quickstart's temporary directory, lock
//! files) are removed, the exit status is 130/143, and an interrupted `synth` does not block
//! its re-run.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_mgkd-train"))
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Waits until `ready()` holds while `child` runs (at most two minutes); panics when the
/// child ends first.
fn wait_for(child: &mut Child, what: &str, ready: impl Fn() -> bool) {
    let start = Instant::now();
    while !ready() {
        if let Some(st) = child.try_wait().expect("try_wait") {
            panic!("the command ended ({st}) before {what}");
        }
        assert!(start.elapsed() < Duration::from_secs(120), "no {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn signal(child: &Child, sig: &str) {
    let st = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(st.success());
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|r| {
            r.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn has_shard(dir: &Path) -> bool {
    names(dir).iter().any(|n| n.starts_with("shard-"))
}

#[test]
fn sigterm_during_synth_removes_the_partial_dataset_and_the_rerun_works() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("syn");
    let mut child = bin()
        .args([
            "synth",
            "--users",
            "20000000",
            "--shard-rows",
            "4096",
            "--out",
            s(&out),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for(&mut child, "a shard was written", || has_shard(&out));
    signal(&child, "-TERM");
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(143), "{err}");
    assert!(err.contains("stopped by SIGTERM"), "{err}");
    assert!(!out.exists(), "left behind: {:?}", names(&out));
    assert_eq!(
        names(tmp.path()),
        Vec::<String>::new(),
        "lock or other leftovers"
    );
    // The re-run into the same directory is not blocked.
    let o = bin()
        .args(["synth", "--users", "500", "--out", s(&out)])
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");
    assert!(out.join("dataset.json").exists());
}

#[test]
fn sigint_during_quickstart_removes_its_temporary_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let mut child = bin()
        .args(["quickstart", "--users", "400000", "--quiet"])
        .env("TMPDIR", tmp.path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let data = |t: &Path| -> Option<PathBuf> {
        names(t)
            .iter()
            .find(|n| n.starts_with("mgkd-quickstart-"))
            .map(|n| t.join(n).join("data"))
    };
    wait_for(&mut child, "the temporary dataset had a shard", || {
        data(tmp.path()).is_some_and(|d| has_shard(&d))
    });
    signal(&child, "-INT");
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(130), "{err}");
    assert_eq!(names(tmp.path()), Vec::<String>::new(), "{err}");
}

#[test]
fn sigterm_during_training_keeps_the_finished_checkpoints_and_nothing_else() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let o = bin()
        .args([
            "synth",
            "--users",
            "20000",
            "--default-rate",
            "0.2",
            "--out",
            s(&data),
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");
    let ck = tmp.path().join("t.safetensors");
    let mut child = bin()
        .args([
            "teacher",
            "--data",
            s(&data),
            "--out",
            s(&ck),
            "--device",
            "cpu",
        ])
        .args([
            "--d", "8", "--heads", "2", "--blocks", "1", "--epochs", "1000", "--quiet",
        ])
        .args(["--patience", "1000"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let state = mgkd::train::resume::resume_path(&ck);
    wait_for(&mut child, "the first checkpoint", || {
        ck.exists() && state.exists()
    });
    signal(&child, "-TERM");
    let o = child.wait_with_output().unwrap();
    assert_eq!(
        o.status.code(),
        Some(143),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // The best checkpoint so far (complete, renamed into place), the log and the resume
    // checkpoint (for `--resume`) stay; no temporary or lock file does.
    assert_eq!(
        names(tmp.path()),
        [
            "data",
            "t.safetensors",
            "t.safetensors.log.jsonl",
            "t.safetensors.resume.safetensors"
        ]
    );
    mgkd::model::checkpoint::read(&ck).expect("the kept checkpoint is whole");
    mgkd::train::resume::read_progress(&state).expect("the resume checkpoint is whole");
}
