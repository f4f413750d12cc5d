//! Printing without panics. `println!` panics when standard output cannot be written
//! (`mgkd-train … | head` closes the pipe; `> /dev/full` has no space), which ends the
//! process with status 101 and a backtrace. The commands print through [`outln!`] and
//! [`out!`] instead: a write error becomes [`Error::Stdout`], returned like any other error.
//! `mgkd-train` then ends quietly with status 141 (128 + SIGPIPE, what a shell reports for a
//! program killed by a closed pipe) when the pipe was closed, and with an error message and
//! status 1 for any other write error. Notes on standard error ([`note`]) ignore errors:
//! there is nowhere left to report them.

use std::fmt;
use std::io::Write;

use crate::{Error, Result};

/// The exit status of a command whose standard output was closed (128 + SIGPIPE).
pub const BROKEN_PIPE_STATUS: u8 = 141;

/// Writes `args` to standard output and flushes it; a failure is [`Error::Stdout`].
pub fn print(args: fmt::Arguments<'_>) -> Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_fmt(args)
        .and_then(|()| out.flush())
        .map_err(Error::Stdout)
}

/// Set on the ranks of a data-parallel job other than rank 0, which say nothing unless
/// they fail ([`silence_notes`]).
static SILENT: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// From now on [`note`] writes nothing (a data-parallel rank other than 0: rank 0 speaks for
/// the job). Errors are still printed, by `main`.
pub fn silence_notes() {
    SILENT.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// Writes one line to standard error, ignoring failures (notes, progress lines, warnings);
/// nothing after [`silence_notes`].
pub fn note(args: fmt::Arguments<'_>) {
    if SILENT.load(std::sync::atomic::Ordering::Relaxed) {
        return;
    }
    let mut err = std::io::stderr().lock();
    let _ = err.write_fmt(args);
    let _ = err.write_all(b"\n");
}

/// `println!` that returns a [`Result`](crate::Result) instead of panicking (see
/// [`crate::io::stdout`]).
#[macro_export]
macro_rules! outln {
    () => {
        $crate::io::stdout::print(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::io::stdout::print(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// `print!` that returns a [`Result`](crate::Result) instead of panicking.
#[macro_export]
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::io::stdout::print(format_args!($($arg)*))
    };
}

/// `eprintln!` that never panics (see [`note`]).
#[macro_export]
macro_rules! noteln {
    ($($arg:tt)*) => {
        $crate::io::stdout::note(format_args!($($arg)*))
    };
}
