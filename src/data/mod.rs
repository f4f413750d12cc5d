//! The data layer (docs/model.md §2–§3): dataset directories of safetensors shards described by a
//! `dataset.json` manifest, written by [`writer::DatasetWriter`] and read back zero-copy by
//! [`dataset::Dataset`] (each shard validated by [`shard::validate_shard_bytes`]).

pub mod batch;
pub mod dataset;
pub mod import;
pub mod manifest;
pub mod schema;
pub mod scores;
pub mod shard;
pub mod synth;
pub mod writer;

pub use batch::{Batch, EventBatch};
pub use dataset::{check_manifest, Dataset, EpochOrder, VerifyReport, GATHER_CHUNK_ROWS};
pub use manifest::{Manifest, ShardInfo, SplitStats, TimeSpans, WindowSpan};
pub use schema::{CatField, NumField, Schema};
pub use shard::{validate_shard_bytes, EventsView, Shard, ShardView, UserIdsView};
pub use synth::{synthesize, SynthConfig};
pub use writer::{DatasetWriter, RowData, WriterOptions};
