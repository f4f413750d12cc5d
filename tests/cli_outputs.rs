//! Outputs through the binary (src/io/output.rs): an `--out` that is a FIFO, a symbolic
//! link or a directory, or that lies inside the input dataset, is refused and left as it
//! was; a second writer of the same output is refused while the first holds its lock.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Mutex, MutexGuard};

/// Held by each test for its whole run, so that the tests of this file never start processes
/// at the same time. A process being started holds a copy of every descriptor of the test
/// process until it executes the binary (close-on-exec closes them only then); on a loaded
/// machine that can last long enough for a lock this file's other test holds and then drops
/// to still be held by that copy, and the run that should take it over is refused.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Takes [`ONE_AT_A_TIME`] (a failed test elsewhere does not poison the others).
fn one_at_a_time() -> MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner())
}

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_mgkd-train"))
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Runs `args`; it must succeed.
fn ok(args: &[&str]) -> String {
    let o = bin().args(args).output().expect("run mgkd-train");
    assert!(o.status.success(), "{args:?} failed:\n{}", text(&o));
    text(&o)
}

/// Runs `args`; it must be refused with status 1 and a message holding every needle.
fn refused(args: &[&str], needles: &[&str]) {
    let o = bin().args(args).output().expect("run mgkd-train");
    let t = text(&o);
    assert_eq!(o.status.code(), Some(1), "{args:?} should be refused:\n{t}");
    assert!(!t.contains("panicked"), "{args:?}:\n{t}");
    for n in needles {
        assert!(t.contains(n), "{args:?}: message lacks {n:?}:\n{t}");
    }
}

const TINY: [&str; 12] = [
    "--d", "8", "--heads", "2", "--blocks", "1", "--d-cat", "4", "--epochs", "1", "--device", "cpu",
];

/// A small synthetic dataset and a teacher trained on it.
struct Setup {
    dir: tempfile::TempDir,
    data: PathBuf,
    teacher: PathBuf,
}

impl Setup {
    fn new() -> Setup {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("data");
        let teacher = dir.path().join("t.safetensors");
        ok(&[
            "synth",
            "--users",
            "2000",
            "--in-len",
            "16",
            "--pre-len",
            "8",
            "--default-rate",
            "0.2",
            "--out",
            s(&data),
        ]);
        let mut a = vec![
            "teacher",
            "--data",
            s(&data),
            "--out",
            s(&teacher),
            "--quiet",
        ];
        a.extend(TINY);
        ok(&a);
        Setup { dir, data, teacher }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn predict(&self, out: &Path) -> Vec<String> {
        [
            "predict",
            "--data",
            s(&self.data),
            "--model",
            s(&self.teacher),
            "--device",
            "cpu",
            "--out",
            s(out),
        ]
        .iter()
        .map(|a| a.to_string())
        .collect()
    }
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn mkfifo(path: &Path) {
    let st = Command::new("mkfifo").arg(path).status().expect("mkfifo");
    assert!(st.success());
}

fn is_fifo(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_fifo())
}

#[test]
fn special_files_links_and_dataset_paths_are_refused_and_left_alone() {
    let _one = one_at_a_time();
    let st = Setup::new();
    // A FIFO: the rename used to replace it with a plain file.
    let fifo = st.path("scores.fifo");
    mkfifo(&fifo);
    refused(
        &strs(&st.predict(&fifo)),
        &["--out", "scores.fifo", "is a FIFO", "regular file"],
    );
    assert!(is_fifo(&fifo), "the FIFO was replaced");
    let mut a = vec!["teacher", "--data", s(&st.data), "--out", s(&fifo)];
    a.extend(TINY);
    refused(&a, &["is a FIFO"]);
    assert!(is_fifo(&fifo));
    let mut a = vec![
        "bench",
        "--out",
        s(&fifo),
        "--device",
        "cpu",
        "--steps",
        "1",
    ];
    a.extend(["--warmup", "0", "--batch", "2", "--d", "8", "--heads", "2"]);
    refused(&a, &["is a FIFO"]);

    // A symbolic link is refused, not written through: link and target stay as they were.
    let target = st.path("kept.csv");
    std::fs::write(&target, "precious\n").unwrap();
    let link = st.path("link.csv");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    refused(
        &strs(&st.predict(&link)),
        &["link.csv", "symbolic link", "never written through"],
    );
    assert!(std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "precious\n");

    // A directory where a file is expected, and a file where a directory is.
    refused(&strs(&st.predict(st.dir.path())), &["is a directory"]);
    refused(
        &["synth", "--users", "10", "--out", s(&target)],
        &["is a regular file, not a directory"],
    );

    // Inside the input dataset: the manifest, a shard, a new file.
    let manifest = std::fs::read(st.data.join("dataset.json")).unwrap();
    let shard = std::fs::read(st.data.join("shard-00000.safetensors")).unwrap();
    for name in ["dataset.json", "shard-00000.safetensors", "scores.csv"] {
        refused(
            &strs(&st.predict(&st.data.join(name))),
            &["lies inside the input dataset", "--data"],
        );
    }
    let out = st.data.join("shard-00000.safetensors");
    let mut a = vec!["teacher", "--data", s(&st.data), "--out", s(&out)];
    a.extend(TINY);
    refused(&a, &["lies inside the input dataset"]);
    let abl = st.data.join("report");
    let mut a = vec!["ablation", "--data", s(&st.data), "--out", s(&abl)];
    a.extend(["--seeds", "1", "--variants", "plain"]);
    a.extend(TINY);
    refused(&a, &["lies inside the input dataset"]);
    refused(
        &["synth", "--users", "10", "--out", s(&st.data.join("sub"))],
        &["lies inside the dataset directory"],
    );
    assert_eq!(
        std::fs::read(st.data.join("dataset.json")).unwrap(),
        manifest
    );
    assert_eq!(
        std::fs::read(st.data.join("shard-00000.safetensors")).unwrap(),
        shard
    );
    assert!(!st.data.join("scores.csv").exists() && !abl.exists());

    // The input checkpoint itself, spelled another way.
    let dotted = st.dir.path().join(".").join("t.safetensors");
    refused(&strs(&st.predict(&dotted)), &["is the input --model"]);
    let mut a = vec![
        "student",
        "--data",
        s(&st.data),
        "--teacher",
        s(&st.teacher),
    ];
    a.extend(["--out", s(&dotted)]);
    a.extend(&TINY[8..]);
    refused(&a, &["is the input --teacher"]);

    // Nothing of the refused runs is left: no temporary files, no lock files.
    let left: Vec<String> = std::fs::read_dir(st.dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp") || n.ends_with(".mgkd-lock"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn a_second_writer_of_the_same_output_is_refused() {
    let _one = one_at_a_time();
    let st = Setup::new();
    let out = st.path("scores.csv");
    // The lock a running `predict --out scores.csv` would hold, taken by this process.
    let lock_path = st.path("scores.csv.mgkd-lock");
    let lock = std::fs::File::create(&lock_path).unwrap();
    std::fs::write(&lock_path, "4242").unwrap();
    rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive).unwrap();
    refused(
        &strs(&st.predict(&out)),
        &[
            "scores.csv",
            "another run is writing this output",
            "process 4242",
            "scores.csv.mgkd-lock",
        ],
    );
    assert!(!out.exists());
    // A training run whose log is locked by another run is refused before it starts.
    let log_lock = st.path("t2.safetensors.log.jsonl.mgkd-lock");
    let lock2 = std::fs::File::create(&log_lock).unwrap();
    rustix::fs::flock(&lock2, rustix::fs::FlockOperation::NonBlockingLockExclusive).unwrap();
    let t2 = st.path("t2.safetensors");
    let mut a = vec!["teacher", "--data", s(&st.data), "--out", s(&t2)];
    a.extend(TINY);
    refused(&a, &["--log", "another run is writing this output"]);
    assert!(!t2.exists());

    // Once released, the lock file left behind (as after a killed run) is taken over, and
    // removed when the run ends.
    drop(lock);
    ok(&strs(&st.predict(&out)));
    assert!(out.exists());
    assert!(!lock_path.exists(), "the lock file was not removed");
}
