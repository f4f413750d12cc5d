//! Running the `mgkd-train` binary from a test: the output of a command, one that must
//! succeed, and a small synthetic cohort (shared by the ablation, tuning and GBM tests).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// `mgkd-train args…` on 2 threads.
pub fn bin(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mgkd-train"))
        .args(args)
        .env("RAYON_NUM_THREADS", "2")
        .output()
        .expect("run mgkd-train")
}

/// `mgkd-train args…`, which must succeed (else the test fails with its stderr).
pub fn ok(args: &[&str]) -> Output {
    let out = bin(args);
    assert!(
        out.status.success(),
        "mgkd-train {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `synth` of `users` users into `dir/data` (default rate 0.2, limits `in_len`, `pre_len`).
pub fn synth(dir: &Path, users: &str, in_len: &str, pre_len: &str) -> PathBuf {
    let data = dir.join("data");
    ok(&[
        "synth",
        "--out",
        data.to_str().unwrap(),
        "--users",
        users,
        "--default-rate",
        "0.2",
        "--in-len",
        in_len,
        "--pre-len",
        pre_len,
    ]);
    data
}
