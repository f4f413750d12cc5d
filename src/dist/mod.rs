//! Data-parallel training over several processes (one per GPU, on one machine or many),
//! launched the way clusters launch jobs (docs/cluster.md):
//!
//! - [`launch`]: where this process stands, from torchrun's or Slurm's variables.
//! - [`comm`]: the rendezvous at `MASTER_ADDR:MASTER_PORT` and the host collectives over
//!   its connections (gathers, broadcasts, the CPU backend's gradient sums, failure news).
//! - [`split`]: which rows each rank trains on and scores, and its share of each batch.
//! - [`nccl`]: NCCL, loaded at run time, for the CUDA backend's gradient all-reduce.
//!
//! The trainer ([`crate::train::train_distributed`]) puts them together: the same global
//! batches as one process, each rank's part run with its share of the batch, the flat
//! gradient summed in one call, the same AdamW step on every rank, validation scores
//! gathered, and rank 0 alone writing.

pub mod comm;
pub mod launch;
pub mod nccl;
pub mod split;

pub use comm::{Attached, Comm};
pub use launch::Launch;
pub use split::{batch_part, owned_rows, BatchShare, Part};
