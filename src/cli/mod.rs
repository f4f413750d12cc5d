//! The `mgkd-train` command line: one module per subcommand.
pub mod devices;
pub mod import;
