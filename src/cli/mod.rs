//! The `mgkd-train` command line: one module per subcommand.

pub mod ablation;
pub mod bench;
pub mod bounds;
pub mod compare;
pub mod devices;
pub mod eval;
pub mod export;
pub mod gbm;
pub mod import;
pub mod inspect;
pub mod kernels;
pub mod monitor;
pub mod predict;
pub mod quickstart;
pub mod synth;
pub mod train;
pub mod tune;
