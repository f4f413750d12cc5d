//! Printing commands whose standard output cannot be written: a closed pipe
//! (`mgkd-train … | head`) ends the command quietly with status 141, a full disk
//! (`> /dev/full`) with an error message and status 1; never a panic (status 101).

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// Where the command's standard output goes.
#[derive(Debug, Clone, Copy)]
enum Sink {
    /// A pipe whose reading end is closed before the command starts.
    ClosedPipe,
    /// `/dev/full`: every write fails with ENOSPC.
    DevFull,
}

fn run_into(args: &[String], sink: Sink) -> Output {
    let stdout = match sink {
        Sink::ClosedPipe => {
            // Close-on-exec: a process another test thread spawns meanwhile must not inherit
            // the reading end (it would keep the pipe open, and the write succeed).
            let (reader, writer) =
                rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).expect("pipe");
            drop(reader);
            Stdio::from(writer)
        }
        Sink::DevFull => Stdio::from(
            std::fs::OpenOptions::new()
                .write(true)
                .open("/dev/full")
                .expect("/dev/full"),
        ),
    };
    Command::new(env!("CARGO_BIN_EXE_mgkd-train"))
        .args(args)
        .stdout(stdout)
        .stderr(Stdio::piped())
        .output()
        .expect("run mgkd-train")
}

fn s(p: &Path) -> String {
    p.to_str().expect("utf-8 path").to_string()
}

/// A small dataset, a teacher checkpoint and the argument lists of every printing command,
/// each writing (where it writes) to fresh paths under `dir` tagged with `tag`.
struct Setup {
    dir: tempfile::TempDir,
    data: PathBuf,
    teacher: PathBuf,
}

const TINY: [&str; 10] = [
    "--d", "8", "--heads", "2", "--blocks", "1", "--d-cat", "4", "--epochs", "1",
];

impl Setup {
    fn new() -> Setup {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("data");
        let teacher = dir.path().join("t.safetensors");
        let bin = env!("CARGO_BIN_EXE_mgkd-train");
        let o = Command::new(bin)
            .args([
                "synth",
                "--users",
                "3000",
                "--in-len",
                "16",
                "--pre-len",
                "8",
            ])
            .args(["--out", &s(&data), "--default-rate", "0.2"])
            .output()
            .expect("synth");
        assert!(o.status.success(), "{o:?}");
        let o = Command::new(bin)
            .args(["teacher", "--data", &s(&data), "--out", &s(&teacher)])
            .args(TINY)
            .args(["--device", "cpu", "--quiet"])
            .output()
            .expect("teacher");
        assert!(o.status.success(), "{o:?}");
        Setup { dir, data, teacher }
    }

    fn commands(&self, tag: &str) -> Vec<Vec<String>> {
        let fresh = |name: &str| s(&self.dir.path().join(format!("{tag}-{name}")));
        let (data, teacher) = (s(&self.data), s(&self.teacher));
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/import/long.toml");
        let mut cmds: Vec<Vec<&str>> = vec![
            vec!["devices"],
            vec!["inspect", &data],
            vec!["inspect", &data, "--json"],
            vec![
                "eval", "--data", &data, "--model", &teacher, "--device", "cpu",
            ],
            vec![
                "eval", "--data", &data, "--model", &teacher, "--device", "cpu", "--json",
            ],
            vec!["--help"],
            vec!["teacher", "--help"],
        ];
        let owned: Vec<Vec<String>> = vec![
            vec![
                "synth".into(),
                "--users".into(),
                "200".into(),
                "--out".into(),
                fresh("syn"),
            ],
            vec![
                "import".into(),
                "--config".into(),
                s(&fixture),
                "--out".into(),
                fresh("imp"),
            ],
            vec![
                "predict".into(),
                "--data".into(),
                data.clone(),
                "--model".into(),
                teacher.clone(),
                "--device".into(),
                "cpu".into(),
                "--out".into(),
                fresh("scores.csv"),
            ],
            ["teacher", "--data", &data, "--device", "cpu", "--out"]
                .iter()
                .map(|a| a.to_string())
                .chain([fresh("t2.safetensors")])
                .chain(TINY.iter().map(|a| a.to_string()))
                .collect(),
            [
                "bench",
                "--device",
                "cpu",
                "--batch",
                "4",
                "--d",
                "8",
                "--heads",
                "2",
                "--blocks",
                "1",
                "--d-cat",
                "4",
                "--in-len",
                "8",
                "--pre-len",
                "4",
                "--steps",
                "1",
                "--warmup",
                "0",
                "--pool",
                "1",
                "--stages",
                "student",
                "--batching",
                "padded",
            ]
            .iter()
            .map(|a| a.to_string())
            .collect(),
            [
                "ablation",
                "--data",
                &data,
                "--seeds",
                "1",
                "--variants",
                "plain",
                "--device",
                "cpu",
                "--no-checkpoints",
                "--quiet",
                "--out",
            ]
            .iter()
            .map(|a| a.to_string())
            .chain([fresh("abl")])
            .chain(TINY.iter().map(|a| a.to_string()))
            .collect(),
            [
                "quickstart",
                "--users",
                "3000",
                "--epochs",
                "1",
                "--d",
                "8",
                "--quiet",
                "--workdir",
            ]
            .iter()
            .map(|a| a.to_string())
            .chain([fresh("qs")])
            .collect(),
        ];
        let mut all: Vec<Vec<String>> = cmds
            .drain(..)
            .map(|c| c.iter().map(|a| a.to_string()).collect())
            .collect();
        all.extend(owned);
        all
    }
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn a_closed_pipe_ends_every_printing_command_quietly_with_141() {
    let setup = Setup::new();
    for args in setup.commands("pipe") {
        let o = run_into(&args, Sink::ClosedPipe);
        let err = stderr(&o);
        assert!(!err.contains("panicked"), "{args:?} panicked:\n{err}");
        // clap's own --help output ends with 0 (it ignores the failed write); every command
        // of the engine reports the closed pipe as 141 and prints nothing about it.
        let want = if args.iter().any(|a| a == "--help") {
            0
        } else {
            141
        };
        assert_eq!(o.status.code(), Some(want), "{args:?}:\n{err}");
        assert!(
            !err.contains("error") && !err.contains("Broken pipe"),
            "{args:?} is not quiet:\n{err}"
        );
    }
}

#[test]
fn a_full_disk_on_stdout_is_an_error_message_not_a_panic() {
    let setup = Setup::new();
    for args in setup.commands("full") {
        if args.iter().any(|a| a == "--help") {
            continue; // clap's help: not the engine's printing.
        }
        let o = run_into(&args, Sink::DevFull);
        let err = stderr(&o);
        assert!(!err.contains("panicked"), "{args:?} panicked:\n{err}");
        assert_eq!(o.status.code(), Some(1), "{args:?}:\n{err}");
        assert!(
            err.contains("error: writing to standard output")
                && err.contains("No space left on device"),
            "{args:?}:\n{err}"
        );
    }
}
