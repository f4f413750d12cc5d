//! # mgkd — Multi-Granularity Knowledge Distillation engine
//!
//! Trains credit-default risk models: a **teacher** reads a user's in-service behaviour
//! sequence, a **student** reads only application-time (pre-service) data and is trained
//! under the frozen teacher's guidance (soft labels, sequence- and behaviour-level
//! alignment, self-distillation, class re-weighting). `docs/model.md` specifies what it
//! computes (data, model, losses with their gradients, training, metrics); the README says
//! how to run it.
//!
//! Architecture, in the order data flows:
//! - [`data`]: the on-disk dataset format (safetensors shards + `dataset.json`), the
//!   synthetic generator, CSV import and batch assembly.
//! - [`model`]: parameter table and storage, checkpoints, layers, teacher and student.
//! - [`loss`]: class weights and the teacher/student objectives of docs/model.md §5.
//! - [`optim`]: global-norm clipping and AdamW over the flat buffers.
//! - [`train`]: the training loop (schedule, bucketed batches, early stopping, best
//!   checkpoint) over any backend.
//! - [`metrics`]: evaluation of scores against labels (AUC, KS, log-loss, PR-AUC, approval
//!   and lift tables).
//! - [`dist`]: data-parallel training over several processes (launcher variables,
//!   rendezvous, collectives, NCCL).
//! - [`backend`] (beside them): the numerical primitives (CPU reference, CUDA) behind one
//!   trait.
//! - [`export`]: the student as an ONNX model for scoring outside the engine.
//! - [`monitor`]: population and characteristic stability indices (drift of new
//!   applicants against the training cohort).
//! - [`explain`]: reason codes (occlusion of input groups against a baseline).
//! - [`cli`]: the `mgkd-train` subcommands.
//! - [`io`]: safe outputs (checks and locks of `--out`), the temporary files removed on
//!   SIGINT/SIGTERM, printing that reports a closed pipe instead of panicking.

pub mod backend;
pub mod cli;
pub mod data;
pub mod dist;
pub mod error;
pub mod explain;
pub mod export;
pub mod io;
pub mod loss;
pub mod metrics;
pub mod model;
pub mod monitor;
pub mod optim;
pub mod train;

pub use error::{Error, Result};
