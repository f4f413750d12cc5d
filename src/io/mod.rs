//! Safe outputs.
//!
//! - [`stdout`]: printing that reports a write error instead of panicking; a closed pipe
//!   (`mgkd-train … | head`) ends the command quietly with status 141.

pub mod stdout;
