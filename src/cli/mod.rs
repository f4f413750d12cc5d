//! The `mgkd-train` command line: one module per subcommand.

pub mod import;
pub mod inspect;
pub mod synth;
