//! The batch: rows of one split gathered into contiguous, padded host buffers that any
//! backend can upload as they are.
//!
//! Sequence layout: for each row, the kept events (at most the schema's length limit, the
//! most recent ones when a sequence is longer) occupy slots `0..len` in time order, oldest
//! first; slots `len..max_len` are padding (ids 0, numbers 0.0) and must be masked. The
//! learned position of slot `t` counts back from the most recent event:
//! `pos(t) = len − 1 − t` (docs/model.md §2.3), so `pos = 0` is always the last event.

/// Padded events of one sequence kind (pre- or in-service) for a batch.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EventBatch {
    /// Padded length: the largest kept length in this batch (0 when every sequence is empty).
    pub max_len: usize,
    /// Kept length of each row, `rows` entries, each ≤ `max_len`.
    pub lens: Vec<u32>,
    /// Categorical event fields, `[rows, max_len, E_c]` row-major.
    pub cat: Vec<u32>,
    /// Numeric event fields (standardised), `[rows, max_len, E_d]` row-major.
    pub num: Vec<f32>,
}

/// A batch of rows, ready for a backend.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Batch {
    /// Number of rows.
    pub rows: usize,
    /// Dataset-global index of each row (for scoring output and debugging).
    pub row_index: Vec<u64>,
    /// Labels (1 = default), `rows` entries; `None` when the dataset has no labels.
    pub labels: Option<Vec<u8>>,
    /// Dense profile fields, `[rows, F_d]`.
    pub profile_num: Vec<f32>,
    /// Categorical profile fields, `[rows, F_c]`.
    pub profile_cat: Vec<u32>,
    /// Pre-service events (application time; always available).
    pub pre: EventBatch,
    /// In-service events (after activation; empty for new applicants).
    pub in_service: EventBatch,
}
