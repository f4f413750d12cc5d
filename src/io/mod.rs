//! Safe outputs: where the engine writes and what happens when it is interrupted.
//!
//! - [`output`]: every command's `--out` goes through [`output::OutputPath::prepare`], which
//!   refuses devices, FIFOs, sockets, symbolic links, a directory where a file is expected
//!   (and a file where a directory is), an output inside a dataset directory or equal to an
//!   input, and takes an advisory lock so that a second run writing the same output is
//!   refused.
//! - [`cleanup`]: the registry of the run's temporary files (atomic-write `.tmp` files, shards
//!   of an unfinished dataset, the quickstart's temporary directory, lock files) and the
//!   SIGINT/SIGTERM handler that removes them and exits with status 130/143.
//! - [`stdout`]: printing that reports a write error instead of panicking; a closed pipe
//!   (`mgkd-train … | head`) ends the command quietly with status 141.

pub mod cleanup;
pub mod output;
pub mod stdout;
