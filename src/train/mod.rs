//! Training (docs/model.md §6): the learning-rate schedule, the epoch's batches (optionally
//! length-bucketed) and the training loop shared by the teacher and student stages. Generic
//! over the [`crate::backend::Backend`], so every backend runs the same loop; the CLI and an
//! ablation driver call [`train`] as a library function.

pub mod ablation;
pub mod batching;
pub mod bench;
pub mod pipeline;
pub mod record;
pub mod resume;
pub mod schedule;
pub mod soft_labels;
pub mod teacher_cache;
pub mod trainer;
pub mod tune;

pub use batching::{cost_key, epoch_batches, kept_lengths, BUCKET_WINDOW_BATCHES};
pub use record::{best_from_metadata, TrainingRecord, KEY_TRAINING};
pub use schedule::{lr_at, warmup_steps};
pub use teacher_cache::{cache_teacher, teacher_needs, CacheOutcome};
pub use trainer::{
    labels_of, progress_bar, queue_objective, score_rows, sigmoid, train, train_distributed,
    BestEpoch, EpochLog, RunOptions, Stage, TermMeans, TrainConfig, TrainReport, EXPLODE, KEY_BEST,
    MAX_BATCH, MAX_EPOCHS, SCORE_BATCH, TEST, TRAIN, VALID,
};
