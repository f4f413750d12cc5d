//! How a test that cannot run on this machine says so: one `skipped: <reason> (<test>)`
//! line on the process's standard error, which a plain `cargo test` shows.
//!
//! libtest captures what `print!` and `eprint!` write and shows it only for a failing test
//! (or with `--nocapture`), so a skip printed that way passes unseen. Writes through
//! `std::io::stderr()` itself are not captured (measured with Rust 1.95; `tests/skip_line.rs`
//! checks it), so the line is written that way. Enabling each skipped group: README,
//! "Tests that need more than Rust".
#![allow(dead_code)]

use std::cell::Cell;
use std::io::Write;

thread_local! {
    /// Whether this test (libtest runs each test on a thread of its own) has said it.
    static SAID: Cell<bool> = const { Cell::new(false) };
}

/// Says, once per test, that the test skipped and why.
pub fn skip(reason: &str) {
    if SAID.with(|s| s.replace(true)) {
        return;
    }
    let test = std::thread::current()
        .name()
        .filter(|n| *n != "main")
        .map(|n| format!(" ({n})"))
        .unwrap_or_default();
    // One line, whatever the reason holds (a tool's multi-line message).
    let reason: Vec<&str> = reason.lines().map(str::trim).collect();
    let line = format!("skipped: {}{test}\n", reason.join(" "));
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

/// [`skip`], except under CI (`CI` set), whose set-up (`.ci/run`) provides what the test
/// needs: there the test fails with the reason instead.
pub fn skip_unless_ci(reason: &str) {
    if std::env::var_os("CI").is_some() {
        panic!("CI is set, and this test cannot run: {reason} (.ci/run provides what it needs)");
    }
    skip(reason);
}
