//! Upper bounds on the sizes a command line (or a `--config` file) can ask for, so that a
//! typo such as `--threads 100000` or `--epochs 18446744073709551615` is refused with a
//! message naming the flag and the accepted range instead of exhausting the machine.
//! The model and training bounds themselves live with their types
//! ([`crate::model::config`], [`crate::train::TrainConfig`]); this module adds the thread
//! bound and the helper that names the flag.

use std::ops::RangeInclusive;

use crate::{Error, Result};

/// Worker threads allowed per available CPU: more only adds contention.
pub const THREADS_PER_CPU: usize = 4;

/// Most seeds one ablation runs.
pub const MAX_SEEDS: u64 = 1_000;

/// Most timed (or warm-up) steps per row of `bench`.
pub const MAX_BENCH_STEPS: usize = 100_000;

/// Most batches `bench` draws and uploads before timing.
pub const MAX_BENCH_POOL: usize = 1_024;

/// The most worker threads `--threads` accepts: [`THREADS_PER_CPU`] × the CPUs available to
/// this process.
pub fn max_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get()) * THREADS_PER_CPU
}

/// `Ok` when `value` is in `range`; otherwise an error naming `flag` (e.g. `--blocks`, or
/// `` `[model] blocks` in the --config file ``), the value and the range, with `why` (what
/// the bound is, may be empty) after it.
pub fn check<T>(flag: &str, value: T, range: RangeInclusive<T>, why: &str) -> Result<()>
where
    T: PartialOrd + std::fmt::Display,
{
    if range.contains(&value) {
        return Ok(());
    }
    Err(Error::invalid(format!(
        "{flag} {value} is out of range: it must be {} to {}{}",
        range.start(),
        range.end(),
        if why.is_empty() {
            String::new()
        } else {
            format!(" ({why})")
        }
    )))
}

/// [`check`] of `--threads`.
pub fn check_threads(threads: usize) -> Result<()> {
    let max = max_threads();
    check(
        "--threads",
        threads,
        1..=max,
        &format!(
            "{THREADS_PER_CPU} × the {} CPUs available",
            max / THREADS_PER_CPU
        ),
    )
}
