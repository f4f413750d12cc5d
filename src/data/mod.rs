//! The data layer (SPEC §2–§3): dataset directories of safetensors shards described by a
//! `dataset.json` manifest, written by [`writer::DatasetWriter`] and read back zero-copy.

pub mod batch;
pub mod manifest;
pub mod schema;
pub mod synth;
pub mod writer;

pub use batch::{Batch, EventBatch};
pub use manifest::{Manifest, ShardInfo, SplitStats};
pub use schema::{CatField, NumField, Schema};
pub use synth::{synthesize, SynthConfig};
pub use writer::{DatasetWriter, RowData, WriterOptions};
