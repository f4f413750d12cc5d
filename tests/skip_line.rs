//! The skip line of `tests/skip` shows in a plain `cargo test`: this test binary runs itself
//! on its ignored probe test, which calls `skip::skip` twice (the first reason on two lines),
//! without `--nocapture`, and the line must be in its standard error exactly once, on one
//! line, while a captured `eprintln!` is not.

mod skip;

use std::process::Command;

/// Not a test of its own: `the_skip_line_is_not_captured` runs it.
#[test]
#[ignore = "run by the_skip_line_is_not_captured"]
fn skip_line_probe() {
    eprintln!("captured line");
    skip::skip("the probe's\nreason");
    skip::skip("said once per test");
}

#[test]
fn the_skip_line_is_not_captured() {
    let exe = std::env::current_exe().expect("test binary");
    let o = Command::new(exe)
        .args([
            "skip_line_probe",
            "--exact",
            "--ignored",
            "--test-threads",
            "1",
        ])
        .output()
        .expect("run the probe");
    let err = String::from_utf8_lossy(&o.stderr);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "the probe failed:\n{out}{err}");
    assert!(out.contains("1 passed"), "the probe did not run:\n{out}");
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("skipped:")).collect();
    assert_eq!(
        lines,
        ["skipped: the probe's reason (skip_line_probe)"],
        "stderr:\n{err}"
    );
    assert!(
        !err.contains("captured line") && !out.contains("captured line"),
        "eprintln! was not captured; the check is moot:\n{out}{err}"
    );
}
